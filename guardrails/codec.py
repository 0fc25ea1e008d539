"""Optional end-to-end encryption of every Temporal payload Spine writes, with AES-256-GCM.

With a key configured, workflow inputs and results, activity arguments and results, signals,
updates, queries, memos, summaries and failure messages/stack traces reach the Temporal server
only as ciphertext; workers and clients decrypt with the same keys. Search attributes are never
encrypted (the server indexes them), nor are workflow ids or activity and workflow type names.

Keys, one source only (unset or empty means off, and Spine uses the plain pydantic converter):

- ``SPINE_CODEC_KEYS="k2:<base64>,k1:<base64>"``: a keyring; the first key encrypts, every key
  decrypts, so a key is rotated by putting a new one first and dropping the old one only once no
  history still needs it.
- ``SPINE_CODEC_KEY="<base64>"`` (key id ``default``) or ``"id:<base64>"``: a single key.
- ``SPINE_CODEC_VAULT_PATH="secret/spine/codec"``: a KV v2 secret (mount, then path) whose fields
  are ``<key id>: <base64>``, plus ``current: <key id>`` when there is more than one key; read
  with ``VAULT_ADDR`` and ``VAULT_ROLE_ID`` + ``VAULT_SECRET_ID`` (preferred) or ``VAULT_TOKEN``.

A key is 32 random bytes in base64: ``openssl rand -base64 32``.

Errors::

    CodecError                 base of every error raised here
     +-- CodecConfigError      no usable keys: malformed variable, bad key, unreadable Vault secret
     +-- UnknownKeyError       a payload names a key id this keyring does not hold
     +-- DecryptionError       a payload does not authenticate under its key (wrong or tampered)

The wire format is the one of Temporal's encryption samples (Go, TypeScript, Python): metadata
``encoding: binary/encrypted`` and ``encryption-key-id``, data ``nonce(12) || ciphertext || tag``
over the serialized inner payload.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence

import hvac
import hvac.exceptions
import requests
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
)

__all__ = [
    "ENCODING",
    "KEY_ID_METADATA",
    "CodecConfigError",
    "CodecError",
    "DecryptionError",
    "EncryptionCodec",
    "UnknownKeyError",
    "codec_from_env",
    "data_converter_from_env",
    "encrypted_data_converter",
    "parse_keys",
]

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
DEFAULT_KEY_ID = "default"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96-bit nonce, GCM's native size
KEYS_ENV = "SPINE_CODEC_KEYS"
KEY_ENV = "SPINE_CODEC_KEY"
VAULT_PATH_ENV = "SPINE_CODEC_VAULT_PATH"
VAULT_CURRENT_FIELD = "current"
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEYGEN_HINT = "generate one with `openssl rand -base64 32`"


class CodecError(Exception):
    """Base of the payload encryption errors."""


class CodecConfigError(CodecError):
    """The encryption keys cannot be loaded; the message names the setting and the fix."""


class UnknownKeyError(CodecError):
    """A payload was encrypted with key `key_id`, which this keyring does not hold."""

    def __init__(self, key_id: str, known: Sequence[str]) -> None:
        super().__init__(
            f"payload is encrypted with key id {key_id!r}, which is not in the keyring "
            f"(known: {', '.join(repr(k) for k in known)}); add that key to {KEYS_ENV} "
            f"or the Vault secret"
        )
        self.key_id = key_id


class DecryptionError(CodecError):
    """A payload did not authenticate: the key material is wrong or the payload was altered."""


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM payload codec over a keyring: encrypts with the current key, decrypts with any.

    Args:
        keys: Key id -> 32-byte key, in order; the first is the current key unless `current`
            names another.
        current: The id of the key that encrypts.

    Raises:
        CodecConfigError: no keys, a malformed key id, a key that is not 32 bytes, or an unknown
            `current`.
    """

    def __init__(self, keys: Mapping[str, bytes], *, current: str | None = None) -> None:
        super().__init__()
        if not keys:
            raise CodecConfigError(f"the payload keyring is empty; {_KEYGEN_HINT}")
        for key_id, key in keys.items():
            _check_key(key_id, key)
        current = current if current is not None else next(iter(keys))
        if current not in keys:
            raise CodecConfigError(
                f"current key id {current!r} is not in the keyring ({', '.join(map(repr, keys))})"
            )
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._current = current

    @property
    def current_key_id(self) -> str:
        """The id of the key new payloads are encrypted with."""
        return self._current

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id this codec decrypts, current first."""
        return (self._current, *(k for k in self._ciphers if k != self._current))

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encrypt each payload, whole (metadata included), with the current key."""
        cipher = self._ciphers[self._current]
        key_id = self._current.encode()
        out = []
        for payload in payloads:
            nonce = os.urandom(NONCE_BYTES)
            data = nonce + cipher.encrypt(nonce, payload.SerializeToString(), None)
            out.append(Payload(metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id}, data=data))
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decrypt each encrypted payload with the key it names; pass others through.

        Unencrypted payloads pass so that histories written before encryption was switched on
        stay readable.

        Raises:
            UnknownKeyError: a payload names a key id not in the keyring.
            DecryptionError: a payload is truncated or does not authenticate under its key.
        """
        return [self._decrypt(p) if p.metadata.get("encoding") == ENCODING else p for p in payloads]

    def _decrypt(self, payload: Payload) -> Payload:
        key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode("utf-8", "replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise UnknownKeyError(key_id, self.key_ids)
        data = payload.data
        if len(data) < NONCE_BYTES + 16:  # nonce + GCM tag
            raise DecryptionError(f"payload encrypted with key id {key_id!r} is truncated")
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], None)
        except InvalidTag as err:
            raise DecryptionError(
                f"payload encrypted with key id {key_id!r} does not authenticate: the key "
                "material for that id differs from the one it was written with, or the payload "
                "was altered"
            ) from err
        return Payload.FromString(plain)


def encrypted_data_converter(
    codec: PayloadCodec, base: DataConverter = pydantic_data_converter
) -> DataConverter:
    """`base` with `codec` applied to every payload, failure messages and stack traces included."""
    return dataclasses.replace(
        base,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def data_converter_from_env(env: Mapping[str, str]) -> DataConverter:
    """Spine's data converter: pydantic, encrypted when a key is configured in `env`.

    Reads Vault (blocking) when ``SPINE_CODEC_VAULT_PATH`` is set; from async code call it through
    ``asyncio.to_thread``.

    Raises:
        CodecConfigError: a key setting is present but unusable.
    """
    codec = codec_from_env(env)
    return pydantic_data_converter if codec is None else encrypted_data_converter(codec)


def codec_from_env(env: Mapping[str, str]) -> EncryptionCodec | None:
    """The codec configured in `env`, or None when no key setting is present.

    Raises:
        CodecConfigError: more than one key setting, or one that is unusable.
    """
    given = [name for name in (KEYS_ENV, KEY_ENV, VAULT_PATH_ENV) if env.get(name, "").strip()]
    if not given:
        return None
    if len(given) > 1:
        raise CodecConfigError(
            f"payload keys are configured twice ({' and '.join(given)}); set only one"
        )
    [name] = given
    value = env[name].strip()
    if name == KEYS_ENV:
        return EncryptionCodec(parse_keys(value, source=name))
    if name == KEY_ENV:
        spec = value if ":" in value else f"{DEFAULT_KEY_ID}:{value}"
        keys = parse_keys(spec, source=name)
        if len(keys) > 1:
            raise CodecConfigError(f"{name} holds one key; put a keyring in {KEYS_ENV}")
        return EncryptionCodec(keys)
    keys, current = _keys_from_vault(value, env)
    return EncryptionCodec(keys, current=current)


def parse_keys(spec: str, *, source: str = KEYS_ENV) -> dict[str, bytes]:
    """Parse ``id1:base64,id2:base64`` into an ordered keyring; the first key is the current one.

    Raises:
        CodecConfigError: an entry without an id, a malformed id, a repeated id, or a key that is
            not base64 of 32 bytes. The message names the id, never the key material.
    """
    keys: dict[str, bytes] = {}
    for n, entry in enumerate((e.strip() for e in spec.split(",")), start=1):
        if not entry:
            continue
        key_id, sep, encoded = entry.partition(":")
        key_id = key_id.strip()
        if not sep:
            raise CodecConfigError(f"{source}: entry {n} is not 'id:base64key'")
        if key_id in keys:
            raise CodecConfigError(f"{source}: key id {key_id!r} appears twice")
        keys[key_id] = _decode_key(encoded.strip(), key_id, source)
        _check_key(key_id, keys[key_id], source)
    if not keys:
        raise CodecConfigError(f"{source} holds no key; {_KEYGEN_HINT}")
    return keys


def _decode_key(encoded: str, key_id: str, source: str) -> bytes:
    try:
        return base64.b64decode(encoded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as err:
        raise CodecConfigError(
            f"{source}: key {key_id!r} is not valid base64; {_KEYGEN_HINT}"
        ) from err


def _check_key(key_id: str, key: bytes, source: str = "keyring") -> None:
    if not _KEY_ID.fullmatch(key_id):
        raise CodecConfigError(
            f"{source}: key id {key_id!r} must be 1-64 characters of letters, digits, '.', '_', '-'"
        )
    if len(key) != KEY_BYTES:
        raise CodecConfigError(
            f"{source}: key {key_id!r} is {len(key)} bytes, AES-256 needs {KEY_BYTES}; "
            f"{_KEYGEN_HINT}"
        )


def _keys_from_vault(location: str, env: Mapping[str, str]) -> tuple[dict[str, bytes], str | None]:
    """Read the keyring from the KV v2 secret `location` (``mount/path``)."""
    mount, _, path = location.strip("/").partition("/")
    where = f"{VAULT_PATH_ENV}={location!r}"
    if not path:
        raise CodecConfigError(f"{where} needs a mount and a path, e.g. 'secret/spine/codec'")
    url = env.get("VAULT_ADDR")
    if not url:
        raise CodecConfigError(f"{where} needs VAULT_ADDR (and VAULT_TOKEN or AppRole)")
    role_id, secret_id, token = (
        env.get("VAULT_ROLE_ID"),
        env.get("VAULT_SECRET_ID"),
        env.get("VAULT_TOKEN"),
    )
    try:
        client = hvac.Client(url=url, timeout=5)
        # Same identity rule as guardrails.secrets: the worker's AppRole beats a token.
        if role_id and secret_id:
            client.auth.approle.login(role_id=role_id, secret_id=secret_id)
        elif token:
            client.token = token
        else:
            raise CodecConfigError(f"{where} needs VAULT_TOKEN or VAULT_ROLE_ID + VAULT_SECRET_ID")
        response = client.secrets.kv.v2.read_secret_version(
            path=path, mount_point=mount, raise_on_deleted_version=True
        )
    except hvac.exceptions.InvalidPath as err:
        raise CodecConfigError(f"{where}: no such secret in Vault at {url}") from err
    except hvac.exceptions.Forbidden as err:
        raise CodecConfigError(f"{where}: denied to this Vault identity at {url}") from err
    except (requests.ConnectionError, requests.Timeout) as err:
        raise CodecConfigError(f"{where}: Vault at {url} is unreachable") from err
    except hvac.exceptions.VaultError as err:
        raise CodecConfigError(f"{where}: Vault at {url} answered {type(err).__name__}") from err
    fields = {str(k): str(v) for k, v in response["data"]["data"].items()}
    current = fields.pop(VAULT_CURRENT_FIELD, None)
    keys = {key_id: _decode_key(value, key_id, where) for key_id, value in fields.items()}
    if len(keys) > 1 and current is None:
        raise CodecConfigError(
            f"{where} holds {len(keys)} keys; add a field {VAULT_CURRENT_FIELD!r} naming the one "
            "that encrypts"
        )
    for key_id, key in keys.items():
        _check_key(key_id, key, where)
    if not keys:
        raise CodecConfigError(f"{where} holds no key; {_KEYGEN_HINT}")
    return keys, current
