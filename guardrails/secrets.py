"""Secrets resolved from Vault (or OpenBao) with hvac at execution time, in the activity.

Values are handed to the tool's context only. Nothing here is ever returned to the workflow.
A Vault that cannot be reached is a transient failure (Temporal retries); a secret that does
not exist or is denied is terminal.

**A short cache.** A secret read is kept in the worker's memory for ``SPINE_SECRET_CACHE_TTL_S``
seconds (30 by default; 0 turns the cache off), and never longer than half its Vault lease when
it has one, so a busy worker reads Vault once per secret every half minute instead of once per
tool call. Rotation is respected: a tool whose dependency answers 401/403 with a cached secret is
called once more right away with the secret read afresh (:meth:`VaultSecrets.invalidate`), so a
rotated key costs one extra read, never a failed call. Errors are never cached.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping, Sequence

import hvac
import hvac.exceptions
import requests

from spine.activities.errors import SecretMissing, SecretsUnavailable
from spine.activities.tools import SecretRef
from spine.guardrails.identity import ACCOUNT

log = logging.getLogger(__name__)


class VaultSecrets:
    """Reads KV v2 secrets with token or AppRole auth.

    Args:
        url: Vault address (``VAULT_ADDR``).
        token: A token (``VAULT_TOKEN``), or
        role_id / secret_id: AppRole credentials; the token is obtained at first use and again
            whenever Vault answers 403 (expired or revoked token).
        cache_ttl_s: How long a secret read is reused (see the module doc); 0: never.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        role_id: str | None = None,
        secret_id: str | None = None,
        timeout_s: float = 5.0,
        cache_ttl_s: float = 30.0,
    ) -> None:
        if not token and not (role_id and secret_id):
            raise ValueError("Vault needs VAULT_TOKEN or VAULT_ROLE_ID + VAULT_SECRET_ID")
        self.url = url
        self._token = token
        self._role_id = role_id
        self._secret_id = secret_id
        self._timeout = timeout_s
        self._lock = threading.Lock()
        self._client: hvac.Client | None = None
        self.cache_ttl_s = max(cache_ttl_s, 0.0)
        # (mount, path) -> (the secret's data, monotonic time it expires); values stay here.
        self._cache: dict[tuple[str, str], tuple[Mapping[str, object], float]] = {}
        self.reads = 0
        """Reads that went to Vault (for tests and benchmarks)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> VaultSecrets | None:
        url = env.get("VAULT_ADDR")
        if not url:
            return None
        ttl = (env.get("SPINE_SECRET_CACHE_TTL_S") or "30").strip()
        try:
            cache_ttl_s = float(ttl)
        except ValueError:
            raise ValueError(
                f"SPINE_SECRET_CACHE_TTL_S={ttl!r} is not a number of seconds"
            ) from None
        return cls(
            url,
            token=env.get("VAULT_TOKEN") or None,
            role_id=env.get("VAULT_ROLE_ID") or None,
            secret_id=env.get("VAULT_SECRET_ID") or None,
            cache_ttl_s=cache_ttl_s,
        )

    def _login(self) -> hvac.Client:
        client = hvac.Client(url=self.url, timeout=self._timeout)
        # AppRole is the worker's own, narrowly scoped identity: prefer it over a token.
        if self._role_id and self._secret_id:
            client.auth.approle.login(role_id=self._role_id, secret_id=self._secret_id)
        else:
            client.token = self._token
        return client

    def _client_or_login(self, *, fresh: bool = False) -> hvac.Client:
        with self._lock:
            if fresh or self._client is None:
                self._client = self._login()
            return self._client

    def client(self, *, fresh: bool = False) -> hvac.Client:
        """An hvac client logged in as the worker (token, or AppRole: logged in again with
        `fresh`, e.g. after OpenBao answered 403 to an expired token)."""
        return self._client_or_login(fresh=fresh)

    def _cached(self, ref: SecretRef, account: str) -> Mapping[str, object] | None:
        found = self._cache.get((ref.mount, ref.resolve_path(account)))
        if found is None or found[1] <= time.monotonic():
            return None
        return found[0]

    def _read(self, ref: SecretRef, account: str) -> str:
        if not ACCOUNT.match(account):
            raise SecretMissing(f"account {account[:80]!r} is not a valid account name")
        path = ref.resolve_path(account)
        where = f"{ref.mount}/{path}#{ref.key}"
        data = self._cached(ref, account)
        if data is None:
            data = self._fetch(ref, path, where)
        if ref.key not in data:
            raise SecretMissing(f"secret {where}: key {ref.key!r} is not in the secret")
        value = str(data[ref.key])
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            # A newline or other control character in a credential ends up in error messages
            # (header values are refused by HTTP clients, quoting the value): refuse it here.
            raise SecretMissing(
                f"secret {where} contains control characters (a trailing newline?); store it "
                "without them"
            )
        return value

    def _fetch(self, ref: SecretRef, path: str, where: str) -> Mapping[str, object]:
        try:
            for fresh in (False, True):
                client = self._client_or_login(fresh=fresh)
                try:
                    response = client.secrets.kv.v2.read_secret_version(
                        path=path, mount_point=ref.mount, raise_on_deleted_version=True
                    )
                    break
                except hvac.exceptions.Forbidden:
                    if fresh or not self._role_id:
                        raise
                    log.info("vault token refused; logging in again with AppRole")
        except hvac.exceptions.InvalidPath as err:
            raise SecretMissing(f"secret {where} does not exist") from err
        except hvac.exceptions.Forbidden as err:
            raise SecretMissing(
                f"secret {where} is denied to this worker's Vault identity"
            ) from err
        except (requests.ConnectionError, requests.Timeout) as err:
            raise SecretsUnavailable(
                f"Vault at {self.url} is unreachable while reading {where}"
            ) from err
        except (hvac.exceptions.VaultDown, hvac.exceptions.InternalServerError) as err:
            raise SecretsUnavailable(f"Vault at {self.url} is unavailable: {err}") from err
        self.reads += 1
        data = response["data"]["data"]
        ttl = self.cache_ttl_s
        lease = response.get("lease_duration") or 0
        if lease > 0:
            ttl = min(ttl, lease / 2)  # never past half its lease
        if ttl > 0:
            self._cache[(ref.mount, path)] = (data, time.monotonic() + ttl)
        return data

    def invalidate(self, refs: Sequence[SecretRef], account: str) -> bool:
        """Forget the cached values of `refs` (a dependency refused them: rotated, revoked);
        True if any was cached, so a call made with them is worth retrying afresh."""
        dropped = False
        for ref in refs:
            dropped |= self._cache.pop((ref.mount, ref.resolve_path(account)), None) is not None
        return dropped

    async def resolve(self, refs: Sequence[SecretRef], account: str) -> dict[str, str]:
        """Read every reference; returns name -> value for the tool context only."""
        if all(self._cached(ref, account) is not None for ref in refs):
            return self._resolve_sync(refs, account)  # all in memory: no thread, no Vault
        return await asyncio.to_thread(self._resolve_sync, refs, account)

    def _resolve_sync(self, refs: Sequence[SecretRef], account: str) -> dict[str, str]:
        return {ref.name: self._read(ref, account) for ref in refs}


class NoSecrets:
    """Used when no Vault is configured: any tool that needs a secret fails closed."""

    async def resolve(self, refs: Sequence[SecretRef], account: str) -> dict[str, str]:
        if refs:
            names = ", ".join(f"{r.mount}/{r.resolve_path(account)}#{r.key}" for r in refs)
            raise SecretsUnavailable(
                f"no Vault configured (set VAULT_ADDR and VAULT_TOKEN or AppRole) to read {names}"
            )
        return {}
