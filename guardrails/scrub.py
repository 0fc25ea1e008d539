"""Secrets never leave the activity: every form of a secret is cut out of what does.

A tool's output, its error messages (a partner API that echoes the request's ``Authorization``
header in a 401 body, an HTTP client that quotes a header value), and so what reaches history,
logs, traces, the audit log and the model, pass through :class:`Scrubber` first. It knows each
secret resolved for the call in the forms it is leaked in: as is, JSON-escaped, URL-encoded,
base64 (standard and URL-safe, with or without padding), hex (either case), and in pieces — any
run of :data:`PIECE` characters of a long secret, so a secret split across a line or quoted in
halves is cut too.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import urllib.parse
from collections.abc import Iterable

REDACTED = "[redacted]"
#: The shortest piece of a secret that is cut on its own (secrets at least twice this long).
PIECE = 8


def forms(secret: str) -> set[str]:
    """Every form of `secret` the scrubber looks for."""
    if not secret:
        return set()
    raw = secret.encode()
    found = {
        secret,
        json.dumps(secret)[1:-1],
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret),
        raw.hex(),
        raw.hex().upper(),
    }
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        text = encoded.decode()
        found |= {text, text.rstrip("=")}
    if len(secret) >= 2 * PIECE:
        found |= {secret[i : i + PIECE] for i in range(len(secret) - PIECE + 1)}
    return {f for f in found if len(f) >= min(PIECE, len(secret))}


class Scrubber:
    """Cuts every form of the given secrets out of text and JSON-like values."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._pattern = _pattern(frozenset(secrets))

    def text(self, value: str) -> str:
        return self._pattern.sub(REDACTED, value) if self._pattern else value

    def value(self, value: object) -> object:
        """`value` with every string in it scrubbed (dict keys too), its shape kept."""
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value


@functools.lru_cache(maxsize=64)
def _pattern(secrets: frozenset[str]) -> re.Pattern[str] | None:
    """The pattern for a set of secrets, built once: a tool's calls resolve the same secrets
    (building it is ~0.1 ms per call). Kept in this process's memory only, as the secrets are
    by the worker's secret cache; at most 64 sets."""
    needles: set[str] = set()
    for secret in secrets:
        needles |= forms(secret)
    if not needles:
        return None
    return re.compile("|".join(re.escape(n) for n in sorted(needles, key=len, reverse=True)))
