"""Taint: which tool arguments could have come from untrusted content the run has seen.

Outputs of ``untrusted_output`` tools (documents, mail, web pages) are outside content: text a
prompt injection controls. The run remembers *all* of it, however much and however long the run
(no window, no size exemption), as the set of its tokens — lower-cased words and numbers, the
numbers normalised so ``10,000.00`` and ``10000`` are the same — in a fixed-size Bloom filter kept
in the run state. An argument is tainted when every token of its value is in the set: a copied
amount, an account number, an address, a sentence. A Bloom filter only errs towards "seen", so
taint only errs towards asking a person.

Pure and deterministic (sha256 for hashing): a sandbox passthrough module.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping

#: Filter size in bits (16 KiB): a false "seen" for a fresh token is rare below ~5,000 distinct
#: tokens of untrusted text and grows with more; it only ever asks a person more often.
BITS = 1 << 17
HASHES = 4
_WORD = re.compile(r"[0-9][0-9,_]*(?:\.[0-9]+)?|[a-z0-9]+", re.IGNORECASE)


def _number(text: str) -> str | None:
    cleaned = text.replace(",", "").replace("_", "")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return f"{value:.6f}".rstrip("0").rstrip(".")


def tokens(text: str) -> set[str]:
    """The tokens of `text`: numbers in one canonical form, words lower-cased."""
    found = set()
    for match in _WORD.finditer(text):
        word = match.group(0)
        number = _number(word) if word[0].isdigit() else None
        found.add(f"#{number}" if number is not None else word.lower())
    return found


def _positions(token: str) -> Iterable[int]:
    digest = hashlib.sha256(token.encode()).digest()
    for i in range(HASHES):
        yield int.from_bytes(digest[4 * i : 4 * i + 4], "big") % BITS


def remember(filter_b64: str, text: str) -> str:
    """The filter with every token of `text` added."""
    bits = bytearray(base64.b64decode(filter_b64)) if filter_b64 else bytearray(BITS // 8)
    for token in tokens(text):
        for p in _positions(token):
            bits[p // 8] |= 1 << (p % 8)
    return base64.b64encode(bytes(bits)).decode()


def union(filter_b64: str, other_b64: str) -> str:
    """The filter of every token in either (a run remembering an output it was given as a
    filter: one stored by reference, whose text the workflow never holds)."""
    if not filter_b64:
        return other_b64
    if not other_b64:
        return filter_b64
    mine, theirs = base64.b64decode(filter_b64), base64.b64decode(other_b64)
    if len(mine) != len(theirs):
        raise ValueError("taint filters of different sizes cannot be joined")
    return base64.b64encode(bytes(a | b for a, b in zip(mine, theirs, strict=True))).decode()


def _seen(bits: bytes, token: str) -> bool:
    return all(bits[p // 8] & (1 << (p % 8)) for p in _positions(token))


def tainted_args(args: Mapping[str, object], filter_b64: str) -> list[str]:
    """Names of the arguments whose every token was in untrusted content."""
    if not filter_b64:
        return []
    bits = base64.b64decode(filter_b64)
    found = []
    for name, value in args.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            words = {f"#{_number(repr(float(value)))}"}
        elif isinstance(value, str):
            words = tokens(value)
        else:
            words = tokens(str(value))
        if words and all(_seen(bits, w) for w in words):
            found.append(name)
    return found
