"""Verified principals: who starts a run, decides an approval, operates or forks it.

Nobody is who they say they are; they are who they can *sign as*. Every principal (a person or a
worker) has an Ed25519 key in OpenBao's transit engine, ``transit/keys/spine-p-<name>``, and an
OpenBao policy that lets only that principal's identity sign with it (the key name is templated
on ``{{identity.entity.name}}``). A client signs a :class:`Claim` over exactly what it asks for —
the purpose, the workflow id, a digest of the payload (which names the approval and the decision),
and when — and sends it in the Temporal header ``spine_principal`` (``spine`` does this; the
Temporal CLI sends it with ``--headers``). The worker verifies the signature with the key's public
half, read from OpenBao (:class:`Keyring`), and maps the principal, or its OpenBao identity groups,
to roles and accounts through the policy. Free-text ``user``, ``by`` and ``role`` grant nothing:
they must match what the verified principal holds.

What lands in history is a signature bound to one run, one payload and one purpose, not a
credential: it cannot be replayed for another approval, another decision or another run, and
expires after the policy's ``max_claim_age_s``.

This module is pure (no I/O): the keyring's keys are loaded by the worker
(:mod:`spine.guardrails.principals`) and handed to it. A sandbox passthrough module.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, Field, ValidationError

from spine.contract import ACCOUNT_PATTERN, NAME_PATTERN, PRINCIPAL_HEADER, AgentRequest

#: The Temporal header a signed claim travels in.
HEADER = PRINCIPAL_HEADER
#: Transit key name of a principal: ``spine-p-<name>``.
KEY_PREFIX = "spine-p-"
#: Principal names: what OpenBao entity names and transit key suffixes may be.
NAME = re.compile(NAME_PATTERN)
#: Account names: checked before any Vault path or ledger id is built from one.
ACCOUNT = re.compile(ACCOUNT_PATTERN)

Purpose = Literal["start", "decide", "operate", "fork", "ledger"]


class IdentityError(ValueError):
    """A claim is missing, malformed, unsigned, forged, stale or not allowed; the message says
    which, in one line."""


class Claim(BaseModel):
    """What a client signs and sends in the ``spine_principal`` header."""

    principal: str = Field(max_length=63)
    purpose: Purpose
    issued_at: str = Field(max_length=40, description="ISO 8601 UTC, when the client signed")
    signature: str = Field(max_length=200, description="OpenBao transit signature, vault:vN:...")


@dataclass(frozen=True)
class Principal:
    """A verified principal and what the policy grants it."""

    name: str
    roles: tuple[str, ...] = ()
    accounts: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def may_act_for(self, account: str) -> bool:
        return "*" in self.accounts or account in self.accounts


def digest(payload: Mapping[str, object]) -> str:
    """sha256 over the canonical JSON of a payload, as both ends compute it."""
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode()).hexdigest()


def message(
    purpose: Purpose, workflow_id: str, principal: str, issued_at: str, payload_digest: str
) -> bytes:
    """The exact bytes a claim signs: the purpose, the run, who, when, and what."""
    return json.dumps(
        {
            "v": 1,
            "purpose": purpose,
            "workflow_id": workflow_id,
            "principal": principal,
            "issued_at": issued_at,
            "payload": payload_digest,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def parse_claim(raw: object) -> Claim:
    """A claim from a header's decoded value (a JSON object or its text).

    Raises:
        IdentityError: the value is not a claim.
    """
    try:
        if isinstance(raw, str | bytes):
            return Claim.model_validate_json(raw)
        return Claim.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "claim"
        raise IdentityError(
            f"header {HEADER!r} is not a valid claim: {where}: {first['msg']}"
        ) from None


@dataclass
class PrincipalKeys:
    """A principal's public keys by version, and its OpenBao identity groups."""

    keys: dict[int, bytes]
    groups: tuple[str, ...] = ()


@dataclass
class Grants:
    """The policy's mapping of principals and groups to roles and accounts."""

    principals: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    groups: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    workers: tuple[str, ...] = ()
    max_age: timedelta = timedelta(minutes=5)

    def principal(self, name: str, groups: Sequence[str]) -> Principal:
        roles: list[str] = []
        accounts: list[str] = []
        for held_roles, held_accounts in [
            self.principals.get(name, ((), ())),
            *(self.groups.get(g, ((), ())) for g in groups),
        ]:
            roles += [r for r in held_roles if r not in roles]
            accounts += [a for a in held_accounts if a not in accounts]
        return Principal(name, tuple(roles), tuple(accounts), tuple(groups))


class Keyring:
    """Public keys of the principals OpenBao knows, and the grants of the policy.

    Filled and refreshed by the worker (:class:`spine.guardrails.principals.VaultKeyring`);
    :meth:`verify` is pure computation, so update validators may call it.
    """

    def __init__(self, grants: Grants | None = None) -> None:
        self.grants = grants or Grants()
        self._keys: dict[str, PrincipalKeys] = {}
        self._lock = threading.Lock()
        self.loaded_at: datetime | None = None
        self.error: str | None = None
        """Why the last refresh failed (the keys from before it are kept), or None."""
        self.refresher: Callable[[], None] | None = None
        """Reloads the keys (rate-limited) when a claim names a principal not loaded yet."""

    def replace(self, keys: Mapping[str, PrincipalKeys]) -> None:
        with self._lock:
            self._keys = dict(keys)
            self.loaded_at = datetime.now(UTC)
            self.error = None

    def known(self, name: str) -> bool:
        with self._lock:
            return name in self._keys

    def verify(
        self,
        claim: Claim,
        *,
        purpose: Purpose,
        workflow_id: str,
        payload_digest: str,
        now: datetime | None = None,
    ) -> Principal:
        """The principal `claim` proves, with what the policy grants it.

        Raises:
            IdentityError: wrong purpose, unknown principal, bad or forged signature, or a
                claim issued too long ago (or in the future).
        """
        if claim.purpose != purpose:
            raise IdentityError(f"claim is for {claim.purpose!r}, not {purpose!r}")
        if not NAME.match(claim.principal):
            raise IdentityError(f"principal name {claim.principal!r} is not valid")
        with self._lock:
            held = self._keys.get(claim.principal)
        if held is None and self.refresher is not None:
            self.refresher()  # a principal made since the last load
            with self._lock:
                held = self._keys.get(claim.principal)
        if held is None:
            why = f" (keyring not loaded: {self.error})" if self.error else ""
            raise IdentityError(f"unknown principal {claim.principal!r}{why}")
        version, raw = _split_signature(claim.signature)
        public = held.keys.get(version)
        if public is None:
            raise IdentityError(f"principal {claim.principal!r} has no key version {version}")
        try:
            issued = datetime.fromisoformat(claim.issued_at)
        except ValueError:
            raise IdentityError(f"claim issued_at {claim.issued_at!r} is not a time") from None
        if issued.tzinfo is None:
            raise IdentityError("claim issued_at must carry a time zone (UTC)")
        signed = message(purpose, workflow_id, claim.principal, claim.issued_at, payload_digest)
        if not _verify(public, raw, signed):
            raise IdentityError(
                f"signature of {claim.principal!r} does not match this {purpose} of run "
                f"{workflow_id!r} (forged, or signed for something else)"
            )
        now = now or datetime.now(UTC)
        age = now - issued
        if age > self.grants.max_age or age < -timedelta(seconds=60):
            raise IdentityError(
                f"claim of {claim.principal!r} was issued at {claim.issued_at}, outside the "
                f"{self.grants.max_age.total_seconds():.0f}s it is valid for (expired or replayed)"
            )
        return self.grants.principal(claim.principal, held.groups)


def _split_signature(signature: str) -> tuple[int, bytes]:
    parts = signature.split(":")
    if len(parts) != 3 or parts[0] != "vault" or not parts[1].startswith("v"):
        raise IdentityError("signature is not an OpenBao transit signature (vault:vN:...)")
    try:
        return int(parts[1][1:]), base64.b64decode(parts[2], validate=True)
    except ValueError:
        raise IdentityError(
            "signature is not an OpenBao transit signature (vault:vN:...)"
        ) from None


def _verify(public: bytes, signature: bytes, signed: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, signed)
    except (InvalidSignature, ValueError):
        return False
    return True


# The claim that came with the signal or update being handled, set by the identity interceptor
# around the handler (and its validator) so the workflow's handlers can read it.
CURRENT: contextvars.ContextVar[Claim | None] = contextvars.ContextVar(
    "spine_current_claim", default=None
)
VERIFIED: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "spine_verified_principal", default=None
)


def request_digest(request: BaseModel) -> str:
    """The digest a start (or fork) claim signs: the request's fields, without any carry."""
    # The request's own fields only: not a carry, nor what Spine adds (a sub-agent's parent).
    fields = request.model_dump(mode="json", include=set(AgentRequest.model_fields))
    return digest(AgentRequest.model_validate(fields).model_dump(mode="json"))


def payload_digest(payload: BaseModel) -> str:
    """The digest a decision or command claim signs: the payload as the model dumps it."""
    return digest(payload.model_dump(mode="json"))
