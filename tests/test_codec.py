"""Payload encryption: encrypted runs, ciphertext history, the codec server, rotation, failures."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from uuid import uuid4

import httpx
import pytest
from click.testing import CliRunner
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DefaultFailureConverterWithEncodedAttributes

from spine.client.codec_cli import codec_server
from spine.client.identity import SigningInterceptor
from spine.client.runs import SpineClientError, connect, get_run, start_run, wait_result
from spine.client.testing import REPO_ROOT, DemoService, VaultDev, binary, free_port, wait_until
from spine.contract import AgentRequest, ScriptTurn
from spine.guardrails.codec import (
    ENCODING,
    KEY_ID_METADATA,
    CodecConfigError,
    DecryptionError,
    EncryptionCodec,
    UnknownKeyError,
    codec_from_env,
    data_converter_from_env,
    encrypted_data_converter,
    parse_keys,
)
from spine.plugin import SpineConfig, build_worker
from tests.helpers import call, scripted_request, turn

UI_ORIGIN = "http://localhost:8233"
CODEC_ENV = ("SPINE_CODEC_KEYS", "SPINE_CODEC_KEY", "SPINE_CODEC_VAULT_PATH")

Connect = Callable[..., Awaitable[Client]]


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def _spec(keys: dict[str, bytes], *ids: str) -> str:
    """A ``SPINE_CODEC_KEYS`` value holding `ids` in that order."""
    return ",".join(f"{key_id}:{_b64(keys[key_id])}" for key_id in ids)


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    return {"key-a": os.urandom(32), "key-b": os.urandom(32)}


@pytest.fixture
def connect_encrypted(client: Client, keys: dict[str, bytes], vault: VaultDev) -> Connect:
    """Connect a second client to the session's server, encrypting with the keyring `ids`."""

    async def make(*ids: str) -> Client:
        codec = EncryptionCodec({key_id: keys[key_id] for key_id in ids})
        return await Client.connect(
            client.service_client.config.target_host,
            namespace=client.namespace,
            data_converter=encrypted_data_converter(codec),
            interceptors=[SigningInterceptor(vault.signer(vault.tokens))],
        )

    return make


@pytest.fixture
def enc_config(worker_config: SpineConfig) -> SpineConfig:
    """The test's worker config with its own budget-ledger queue.

    Ledgers are long-lived per-account workflows on a shared queue; one holding ciphertext must
    never be handed to another test's plain worker.
    """
    return dataclasses.replace(
        worker_config, ledger_task_queue=f"{worker_config.task_queue}-ledger"
    )


@pytest.fixture
def account(vault: VaultDev, service: DemoService) -> str:
    """A fresh account (so a fresh budget ledger) whose tools can reach the demo service."""
    name = f"codec-{uuid4().hex[:8]}"
    vault.put_secret(f"spine/{name}", {"api_key": service.api_key})
    return name


def _request(script: list[ScriptTurn], account: str, goal: str = "help") -> AgentRequest:
    request = scripted_request(script, goal=goal)
    request.account = account
    return request


@pytest.fixture(scope="module")
def codec_url(keys: dict[str, bytes]) -> Iterator[str]:
    """``python -m client.codec_cli`` (the `spine codec-server` command) with keyring [B, A]."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in CODEC_ENV}
    env["SPINE_CODEC_KEYS"] = _spec(keys, "key-b", "key-a")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spine.client.codec_cli",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO_ROOT,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"codec server exited with {process.returncode}")
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200

    try:
        wait_until(healthy, what=f"codec server on port {port}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _decode_over_http(url: str, payloads: list[Payload]) -> list[Payload]:
    """POST `payloads` to the codec server's /decode as the Web UI does."""
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{url}/decode",
            json=json_format.MessageToDict(Payloads(payloads=payloads)),
            headers={"X-Namespace": "default", "Origin": UI_ORIGIN},
        )
    response.raise_for_status()
    assert response.headers["access-control-allow-origin"] == UI_ORIGIN
    return list(json_format.Parse(response.content, Payloads()).payloads)


def _raw(events: list[HistoryEvent]) -> bytes:
    return b"".join(e.SerializeToString() for e in events)


def _event(events: list[HistoryEvent], kind: EventType.ValueType) -> HistoryEvent:
    return next(e for e in events if e.event_type == kind)


async def test_encrypted_run_completes_with_ciphertext_history(
    connect_encrypted, enc_config: SpineConfig, account: str, codec_url: str
):
    """An encrypted run completes; its history holds no plaintext, the codec server reveals it."""
    goal, reason, output = (f"{what}-{uuid4().hex}" for what in ("goal", "reason", "output"))
    script = [
        turn(call("issue_refund", order_id="o-1491", amount=12.5, reason=reason), confidence=0.95),
        turn(text=f"Refunded 12.50. {output}"),
    ]
    enc = await connect_encrypted("key-a")
    async with build_worker(enc, config=enc_config):
        handle = await start_run(
            enc, _request(script, account, goal), task_queue=enc_config.task_queue
        )
        result = await wait_result(handle)
    assert result.status == "completed", result.reason
    assert output in (result.output or "")

    events = list((await handle.fetch_history()).events)
    raw = _raw(events)
    for plaintext in (goal, reason, output, "o-1491"):
        assert plaintext.encode() not in raw
    started = _event(events, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)
    [request] = started.workflow_execution_started_event_attributes.input.payloads
    assert request.metadata["encoding"] == ENCODING
    assert request.metadata[KEY_ID_METADATA] == b"key-a"

    [decoded] = await _decode_over_http(codec_url, [request])
    assert decoded.metadata["encoding"] == b"json/plain"
    assert json.loads(decoded.data)["goal"] == goal


async def test_temporal_cli_shows_plaintext_through_the_codec_server(
    client: Client, connect_encrypted, enc_config: SpineConfig, account: str, codec_url: str
):
    """`temporal workflow show --codec-endpoint` (the Web UI's protocol) prints the plaintext."""
    goal = f"goal-{uuid4().hex}"
    enc = await connect_encrypted("key-a")
    async with build_worker(enc, config=enc_config):
        handle = await start_run(
            enc, _request([turn(text="Done.")], account, goal), task_queue=enc_config.task_queue
        )
        await wait_result(handle)

    async def show(*extra: str) -> Payload:
        """The run's input payload as `temporal workflow show -o json` prints it."""
        process = await asyncio.create_subprocess_exec(
            binary("temporal"),
            "workflow",
            "show",
            "--workflow-id",
            handle.id,
            "--address",
            client.service_client.config.target_host,
            "--namespace",
            client.namespace,
            "--output",
            "json",
            *extra,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        started = json.loads(out)["events"][0]["workflowExecutionStartedEventAttributes"]
        return json_format.ParseDict(started["input"]["payloads"][0], Payload())

    assert (await show()).metadata["encoding"] == ENCODING
    decoded = await show("--codec-endpoint", codec_url)
    assert decoded.metadata["encoding"] == b"json/plain"
    assert json.loads(decoded.data)["goal"] == goal


async def test_codec_server_answers_the_web_ui_preflight(codec_url: str):
    """A CORS preflight from the Web UI's origin is allowed with the X-Namespace header."""
    async with httpx.AsyncClient() as http:
        response = await http.options(
            f"{codec_url}/decode",
            headers={
                "Origin": UI_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-namespace",
            },
        )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == UI_ORIGIN
    assert "x-namespace" in response.headers["access-control-allow-headers"].lower()


async def test_codec_server_round_trips_and_refuses_garbage(codec_url: str):
    """/encode then /decode gives the payload back; a body that is not payloads JSON is a 400."""
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'"hello"')
    body = json_format.MessageToDict(Payloads(payloads=[plain]))
    async with httpx.AsyncClient() as http:
        encoded = (await http.post(f"{codec_url}/encode", json=body)).json()
        assert encoded["payloads"][0]["metadata"][KEY_ID_METADATA] == _b64(b"key-b")
        decoded = (await http.post(f"{codec_url}/decode", json=encoded)).json()
        bad = await http.post(f"{codec_url}/decode", content=b"not json")
    assert json_format.ParseDict(decoded, Payloads()).payloads[0] == plain
    assert bad.status_code == 400 and "protobuf JSON" in bad.json()["error"]


async def test_rotation_decodes_old_key_and_encodes_with_new(
    connect_encrypted, enc_config: SpineConfig, account: str
):
    """A run started under key A is served by a worker on [B, A], whose results are under B."""
    script = [turn(text="Nothing to do.")]
    client_a = await connect_encrypted("key-a")
    client_ba = await connect_encrypted("key-b", "key-a")
    async with build_worker(client_ba, config=enc_config):
        handle = await start_run(
            client_a, _request(script, account), task_queue=enc_config.task_queue
        )
        result = await wait_result(get_run(client_ba, handle.id))
    assert result.status == "completed", result.reason

    events = list((await handle.fetch_history()).events)
    started = _event(events, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)
    completed = _event(events, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED)
    [request] = started.workflow_execution_started_event_attributes.input.payloads
    [output] = completed.workflow_execution_completed_event_attributes.result.payloads
    assert request.metadata[KEY_ID_METADATA] == b"key-a"
    assert output.metadata[KEY_ID_METADATA] == b"key-b"

    with pytest.raises(UnknownKeyError, match="'key-b'"):
        await get_run(client_a, handle.id).result()


async def test_failure_messages_are_encrypted(
    connect_encrypted, enc_config: SpineConfig, account: str, codec_url: str
):
    """A failed tool call's message and stack trace are ciphertext; the codec reveals them."""
    script = [turn(call("lookup_order", order_id="o-9999")), turn(text="No such order.")]
    enc = await connect_encrypted("key-a")
    async with build_worker(enc, config=enc_config):
        handle = await start_run(enc, _request(script, account), task_queue=enc_config.task_queue)
        result = await wait_result(handle)
    assert result.status == "completed", result.reason

    events = list((await handle.fetch_history()).events)
    failed = _event(events, EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED)
    failure = failed.activity_task_failed_event_attributes.failure
    assert failure.message == "Encoded failure" and not failure.stack_trace
    assert b"not found" not in _raw(events)
    assert failure.encoded_attributes.metadata["encoding"] == ENCODING

    [attributes] = await _decode_over_http(codec_url, [failure.encoded_attributes])
    decoded = json.loads(attributes.data)
    assert "order 'o-9999' not found" in decoded["message"]
    assert decoded["stack_trace"]


async def test_unknown_key_id_is_named():
    """Decoding a payload under a key id the keyring lacks names that id."""
    other = EncryptionCodec({"retired-2024": os.urandom(32)})
    mine = EncryptionCodec({"k1": os.urandom(32)})
    [payload] = await other.encode([Payload(data=b"x")])
    with pytest.raises(UnknownKeyError, match=r"'retired-2024'.*known: 'k1'"):
        await mine.decode([payload])


async def test_wrong_or_tampered_key_material_does_not_decrypt():
    """Same key id with other key bytes, or a flipped ciphertext byte, fails authentication."""
    codec = EncryptionCodec({"k1": os.urandom(32)})
    [payload] = await codec.encode([Payload(data=b"secret")])
    impostor = EncryptionCodec({"k1": os.urandom(32)})
    with pytest.raises(DecryptionError, match="'k1'"):
        await impostor.decode([payload])
    tampered = Payload()
    tampered.CopyFrom(payload)
    tampered.data = payload.data[:-1] + bytes([payload.data[-1] ^ 1])
    with pytest.raises(DecryptionError):
        await codec.decode([tampered])
    assert (await codec.decode([payload]))[0].data == b"secret"


async def test_unencrypted_payloads_pass_through_decode():
    """Payloads written before encryption was switched on stay readable."""
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b"1")
    assert await EncryptionCodec({"k1": os.urandom(32)}).decode([plain]) == [plain]


def test_no_key_keeps_the_plain_pydantic_converter():
    """Without a key setting the converter is Spine's pydantic one, unchanged."""
    assert data_converter_from_env({"SPINE_CODEC_KEYS": " "}) is pydantic_data_converter


def test_env_keyring_builds_an_encrypting_converter(keys: dict[str, bytes]):
    """SPINE_CODEC_KEYS gives a codec encrypting with its first key and encoded failures."""
    converter = data_converter_from_env({"SPINE_CODEC_KEYS": _spec(keys, "key-b", "key-a")})
    codec = converter.payload_codec
    assert isinstance(codec, EncryptionCodec)
    assert codec.key_ids == ("key-b", "key-a")
    assert converter.failure_converter_class is DefaultFailureConverterWithEncodedAttributes
    assert converter.payload_converter_class is pydantic_data_converter.payload_converter_class


def test_single_key_gets_the_default_id(keys: dict[str, bytes]):
    """SPINE_CODEC_KEY takes a bare key (id 'default') or 'id:key'."""
    bare = codec_from_env({"SPINE_CODEC_KEY": _b64(keys["key-a"])})
    named = codec_from_env({"SPINE_CODEC_KEY": f"k7:{_b64(keys['key-a'])}"})
    assert bare is not None and bare.current_key_id == "default"
    assert named is not None and named.current_key_id == "k7"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SPINE_CODEC_KEYS": "k1:" + _b64(b"short")}, "'k1' is 5 bytes, AES-256 needs 32"),
        ({"SPINE_CODEC_KEYS": "k1:%%%"}, "'k1' is not valid base64"),
        ({"SPINE_CODEC_KEYS": _b64(bytes(32))}, "entry 1 is not 'id:base64key'"),
        ({"SPINE_CODEC_KEYS": "k1:" + _b64(bytes(32)) + ",k1:" + _b64(bytes(32))}, "twice"),
        ({"SPINE_CODEC_KEYS": "a b:" + _b64(bytes(32))}, "key id 'a b' must be"),
        ({"SPINE_CODEC_KEY": "x", "SPINE_CODEC_VAULT_PATH": "secret/x"}, "configured twice"),
        ({"SPINE_CODEC_VAULT_PATH": "secret"}, "needs a mount and a path"),
        ({"SPINE_CODEC_VAULT_PATH": "secret/spine/codec"}, "needs VAULT_ADDR"),
    ],
)
def test_bad_key_settings_are_one_clear_line(env: dict[str, str], message: str):
    """A malformed key setting names the variable and the problem, never the key material."""
    with pytest.raises(CodecConfigError, match=message) as raised:
        codec_from_env(env)
    assert "\n" not in str(raised.value)
    assert _b64(b"short") not in str(raised.value)


def test_parse_keys_keeps_order_and_accepts_urlsafe_base64():
    """Keys keep their order (first is current) and may be written in URL-safe base64."""
    key = bytes(range(250, 256)) * 5 + b"\xfb\xff"
    spec = f"new:{base64.urlsafe_b64encode(key).decode()}, old:{_b64(key)}"
    assert parse_keys(spec) == {"new": key, "old": key}


def test_vault_keyring_uses_the_current_field(vault: VaultDev, keys: dict[str, bytes]):
    """Keys read from a KV v2 secret: one field per key id, `current` picks the encrypting one."""
    path = f"spine/codec-{uuid4().hex[:8]}"
    vault.put_secret(
        path, {"key-a": _b64(keys["key-a"]), "key-b": _b64(keys["key-b"]), "current": "key-b"}
    )
    env = {
        "SPINE_CODEC_VAULT_PATH": f"secret/{path}",
        "VAULT_ADDR": vault.url,
        "VAULT_TOKEN": vault.token,
    }
    codec = codec_from_env(env)
    assert codec is not None and codec.key_ids == ("key-b", "key-a")
    vault.put_secret(path, {"key-a": _b64(keys["key-a"]), "key-b": _b64(keys["key-b"])})
    with pytest.raises(CodecConfigError, match="add a field 'current'"):
        codec_from_env(env)
    with pytest.raises(CodecConfigError, match="no such secret"):
        codec_from_env({**env, "SPINE_CODEC_VAULT_PATH": "secret/spine/none"})


async def test_connect_applies_the_env_keys(
    client: Client, keys: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
):
    """`connect()` encrypts when SPINE_CODEC_KEYS is set and refuses an unusable key clearly."""
    monkeypatch.setenv("TEMPORAL_ADDRESS", client.service_client.config.target_host)
    for name in CODEC_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPINE_CODEC_KEYS", _spec(keys, "key-a"))
    encrypted = await connect()
    assert isinstance(encrypted.data_converter.payload_codec, EncryptionCodec)
    monkeypatch.setenv("SPINE_CODEC_KEYS", "key-a:AAAA")
    with pytest.raises(SpineClientError, match="cannot load payload encryption keys"):
        await connect()


def test_codec_server_without_keys_exits_with_one_line():
    """`spine codec-server` with no key configured says which variables to set."""
    result = CliRunner().invoke(codec_server, [], env=dict.fromkeys(CODEC_ENV))
    assert result.exit_code == 1
    assert "set SPINE_CODEC_KEYS, SPINE_CODEC_KEY or SPINE_CODEC_VAULT_PATH" in result.output
