"""Principals in OpenBao: seeding them, loading their public keys, signing as one of them.

- :func:`seed_principal` (admin, used by ``temporal-dev/up`` and the test kit) makes a principal:
  an Ed25519 transit key ``spine-p-<name>``, an identity entity named ``<name>`` (with an alias
  for its userpass login or AppRole), and the ``spine_principal`` policy that lets an entity sign
  only with its own key.
- :class:`VaultKeyring` (workers) loads every principal's public keys and identity groups into a
  :class:`~spine.guardrails.identity.Keyring` and keeps them fresh.
- :class:`VaultSigner` (clients, and workers signing their ledger operations) signs a claim with
  a principal's OpenBao token.

All of it is I/O with hvac and runs on the worker or the client, never in workflow code.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import hvac
import hvac.exceptions
import requests

from spine.guardrails.identity import (
    KEY_PREFIX,
    NAME,
    Claim,
    IdentityError,
    Keyring,
    PrincipalKeys,
    Purpose,
    message,
)

log = logging.getLogger(__name__)

TRANSIT = "transit"
POLICY = "spine_principal"
#: Every entity may sign with its own key, and read its own token; nothing else.
POLICY_HCL = f"""
path "{TRANSIT}/sign/{KEY_PREFIX}{{{{identity.entity.name}}}}" {{ capabilities = ["update"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
"""
#: What a worker's own identity (AppRole) needs to verify principals.
WORKER_POLICY_HCL = f"""
path "{TRANSIT}/keys" {{ capabilities = ["list"] }}
path "{TRANSIT}/keys/{KEY_PREFIX}*" {{ capabilities = ["read"] }}
path "identity/entity/name/*" {{ capabilities = ["read"] }}
path "identity/group/id/*" {{ capabilities = ["read"] }}
"""


# ------------------------------------------------------------------------------------ seeding


def ensure_identity_engine(root: hvac.Client) -> None:
    """Transit, userpass and the principal policy, idempotently (admin token)."""
    engines = root.sys.list_mounted_secrets_engines()
    if f"{TRANSIT}/" not in engines.get("data", engines):
        root.sys.enable_secrets_engine("transit", path=TRANSIT)
    auths = root.sys.list_auth_methods()
    if "userpass/" not in auths.get("data", auths):
        root.sys.enable_auth_method("userpass", path="userpass")
    root.sys.create_or_update_policy(POLICY, POLICY_HCL)


def seed_principal(
    root: hvac.Client,
    name: str,
    *,
    password: str | None = None,
    approle_role_id: str | None = None,
    approle: str | None = None,
    groups: tuple[str, ...] = (),
) -> None:
    """Make `name` a principal (idempotent): its key, its entity, its login, its groups.

    A person logs in with userpass (`password`); a service with AppRole (`approle`, whose
    role id is the alias). Raises :class:`IdentityError` for a name that is not valid.
    """
    if not NAME.match(name):
        raise IdentityError(f"principal name {name!r} is not valid (lower case, digits, . _ -)")
    ensure_identity_engine(root)
    key = f"{KEY_PREFIX}{name}"
    try:
        root.secrets.transit.read_key(name=key, mount_point=TRANSIT)
    except hvac.exceptions.InvalidPath:
        root.secrets.transit.create_key(name=key, key_type="ed25519", mount_point=TRANSIT)
    root.secrets.identity.create_or_update_entity_by_name(name=name, policies=[POLICY])
    entity_id = root.secrets.identity.read_entity_by_name(name=name)["data"]["id"]
    auths = root.sys.list_auth_methods()
    auths = auths.get("data", auths)
    if password is not None:
        root.auth.userpass.create_or_update_user(username=name, password=password, policies=[])
        _alias(root, name, entity_id, auths["userpass/"]["accessor"])
    if approle is not None and approle_role_id is not None:
        _alias(root, approle_role_id, entity_id, auths["approle/"]["accessor"])
    for group in groups:
        found = (
            root.secrets.identity.read_group_by_name(name=group)
            if _group_exists(root, group)
            else None
        )
        members = set(found["data"].get("member_entity_ids") or []) if found else set()
        root.secrets.identity.create_or_update_group_by_name(
            name=group, member_entity_ids=sorted(members | {entity_id})
        )


def _alias(root: hvac.Client, name: str, entity_id: str, accessor: str) -> None:
    try:
        root.secrets.identity.create_or_update_entity_alias(
            name=name, canonical_id=entity_id, mount_accessor=accessor
        )
    except hvac.exceptions.InvalidRequest as err:
        if "already" not in str(err):
            raise


def _group_exists(root: hvac.Client, group: str) -> bool:
    try:
        root.secrets.identity.read_group_by_name(name=group)
    except hvac.exceptions.InvalidPath:
        return False
    return True


def rotate_principal_key(root: hvac.Client, name: str) -> int:
    """A new key version for `name` (old signatures keep verifying); returns the version."""
    root.secrets.transit.rotate_key(name=f"{KEY_PREFIX}{name}", mount_point=TRANSIT)
    return int(root.secrets.transit.read_key(name=f"{KEY_PREFIX}{name}")["data"]["latest_version"])


# -------------------------------------------------------------------------------- the keyring


def load_keys(client: hvac.Client) -> dict[str, PrincipalKeys]:
    """Every principal's public keys (by version) and identity group names."""
    try:
        listed = client.secrets.transit.list_keys(mount_point=TRANSIT)["data"]["keys"]
    except hvac.exceptions.InvalidPath:
        return {}
    found: dict[str, PrincipalKeys] = {}
    group_names: dict[str, str] = {}
    for key in listed:
        if not key.startswith(KEY_PREFIX):
            continue
        name = key[len(KEY_PREFIX) :]
        data = client.secrets.transit.read_key(name=key, mount_point=TRANSIT)["data"]
        keys = {
            int(version): base64.b64decode(entry["public_key"])
            for version, entry in data["keys"].items()
            if isinstance(entry, Mapping) and entry.get("public_key")
        }
        groups: list[str] = []
        try:
            entity = client.secrets.identity.read_entity_by_name(name=name)["data"]
        except hvac.exceptions.InvalidPath:
            entity = {}
        for group_id in entity.get("group_ids") or []:
            if group_id not in group_names:
                group = client.secrets.identity.read_group(group_id=group_id)["data"]
                group_names[group_id] = group["name"]
            groups.append(group_names[group_id])
        found[name] = PrincipalKeys(keys=keys, groups=tuple(sorted(groups)))
    return found


class VaultKeyring:
    """Keeps a :class:`Keyring` filled from OpenBao, through the worker's own OpenBao client.

    Args:
        keyring: The keyring to fill.
        client: Returns an hvac client logged in as the worker (``fresh=True``: log in again).
        refresh_s: How often :meth:`keep_fresh` reloads.
    """

    #: A principal the keyring does not know makes it reload at most this often.
    MISS_REFRESH_S = 2.0

    def __init__(
        self, keyring: Keyring, client: Callable[..., hvac.Client], refresh_s: float = 30.0
    ) -> None:
        self.keyring = keyring
        self._client = client
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._last = 0.0

    def refresh(self) -> None:
        """Load the keys now; on failure keep the old ones and remember why."""
        with self._lock:
            self._last = time.monotonic()
            try:
                try:
                    keys = load_keys(self._client())
                except hvac.exceptions.Forbidden:
                    keys = load_keys(self._client(fresh=True))  # an expired AppRole token
                self.keyring.replace(keys)
            except (hvac.exceptions.VaultError, requests.RequestException) as err:
                self.keyring.error = f"{type(err).__name__}: {err}"
                log.warning("could not load principal keys from OpenBao: %s", err)

    def refresh_soon(self) -> None:
        """Reload unless that was done moments ago (a principal made since the last load)."""
        if time.monotonic() - self._last >= self.MISS_REFRESH_S:
            self.refresh()

    async def keep_fresh(self) -> None:
        """Refresh every `refresh_s` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.refresh_s)
            await asyncio.to_thread(self.refresh)


# ---------------------------------------------------------------------------------- signing


@dataclass
class VaultSigner:
    """Signs claims with OpenBao transit, as the principal a token belongs to.

    `tokens` maps principal names to their OpenBao tokens (the CLI has one: its login's; the test
    kit has one per seeded principal).
    """

    url: str
    tokens: Mapping[str, str]
    default: str | None = None
    """Who signs when a call names nobody (the CLI's logged-in principal)."""
    _clients: threading.local = field(
        default_factory=threading.local, init=False, repr=False, compare=False
    )

    def _client(self, token: str) -> hvac.Client:
        """This thread's OpenBao client for `token`, kept for the thread's next signature (its
        HTTP connection with it), replaced when the token changes. A worker signs every
        ledger operation, from a few pool threads: a client per signature opened a connection
        (and read ~/.netrc) every time."""
        kept = getattr(self._clients, "kept", None)
        if kept is None or kept[0] != token:
            kept = (token, hvac.Client(url=self.url, token=token, timeout=5))
            self._clients.kept = kept
        return kept[1]

    def names(self) -> list[str]:
        return sorted(self.tokens)

    def token(self, principal: str) -> str | None:
        """The OpenBao token to sign as `principal` with (None: this signer cannot)."""
        return self.tokens.get(principal)

    def sign(
        self,
        principal: str,
        purpose: Purpose,
        workflow_id: str,
        payload_digest: str,
        *,
        issued_at: datetime | None = None,
    ) -> Claim:
        """A claim of `principal` over this purpose, run and payload.

        Raises:
            IdentityError: this signer holds no token for `principal`, or OpenBao refused.
        """
        token = self.token(principal)
        if not token:
            raise IdentityError(
                f"cannot sign as {principal!r}: not logged in as them (signing as "
                f"{', '.join(self.names()) or 'nobody'}); use `spine login`"
            )
        at = (issued_at or datetime.now(UTC)).isoformat()
        data = message(purpose, workflow_id, principal, at, payload_digest)
        try:
            signed = self._client(token).secrets.transit.sign_data(
                name=f"{KEY_PREFIX}{principal}",
                hash_input=base64.b64encode(data).decode(),
                mount_point=TRANSIT,
            )
        except hvac.exceptions.Forbidden:
            raise IdentityError(
                f"OpenBao refused to sign as {principal!r} with this token (not theirs)"
            ) from None
        except (hvac.exceptions.VaultError, requests.RequestException) as err:
            raise IdentityError(f"cannot sign with OpenBao at {self.url}: {err}") from None
        return Claim(
            principal=principal,
            purpose=purpose,
            issued_at=at,
            signature=signed["data"]["signature"],
        )


def login_userpass(url: str, name: str, password: str) -> str:
    """An OpenBao token for `name` (userpass login).

    Raises:
        IdentityError: wrong name or password, or OpenBao cannot be reached.
    """
    client = hvac.Client(url=url, timeout=5)
    try:
        return client.auth.userpass.login(username=name, password=password)["auth"]["client_token"]
    except hvac.exceptions.InvalidRequest:
        raise IdentityError(f"OpenBao refused the login of {name!r} (name or password)") from None
    except (hvac.exceptions.VaultError, requests.RequestException) as err:
        raise IdentityError(f"cannot log in to OpenBao at {url}: {err}") from None


def whoami(url: str, token: str) -> str:
    """The principal (identity entity name) an OpenBao token belongs to."""
    client = hvac.Client(url=url, token=token, timeout=5)
    try:
        data = client.auth.token.lookup_self()["data"]
        entity_id = data.get("entity_id")
        if not entity_id:
            raise IdentityError("this OpenBao token belongs to no identity entity")
        meta = data.get("meta") or {}
        # A userpass login's entity is named after the user (seed_principal makes it so).
        return str(meta.get("username") or data.get("display_name", "").split("-", 1)[-1])
    except (hvac.exceptions.VaultError, requests.RequestException) as err:
        raise IdentityError(f"cannot look up this OpenBao token at {url}: {err}") from None
