"""Secrets come from OpenBao inside the activity and go nowhere else; Vault down fails closed."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel

from spine.activities.errors import SecretMissing
from spine.activities.providers import openai_provider_from_env
from spine.activities.tools import Registry, SecretRef, ToolContext, ToolRunner, tool
from spine.client.demo import build_demo_request
from spine.client.runs import decide, operate, start_run, wait_result
from spine.client.testing import DemoService, VaultDev, binary, start_vault_dev
from spine.contract import ApprovalDecision, ModelChoice, OperatorCommand
from spine.guardrails.policy import load_policy
from spine.guardrails.secrets import VaultSecrets
from spine.observability.telemetry import telemetry_from_env
from spine.payloads import ToolCallInput, ToolCallResult
from tests.fakes.llm_server import FakeLLMServer, FakeToolCall
from tests.helpers import call, eventually, scripted_request, turn, wait_for_status


class Echo(BaseModel):
    text: str


async def _show_json(client, workflow_id: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        binary("temporal"),
        "workflow",
        "show",
        "--workflow-id",
        workflow_id,
        "--output",
        "json",
        "--address",
        client.service_client.config.target_host,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_secret_value_appears_nowhere(
    client, make_worker, task_queue, worker_config, service: DemoService, tmp_path, caplog
):
    """History (CLI JSON), worker logs, traces, audit log and model prompts never hold the key."""
    secret = service.api_key
    trace_file = tmp_path / "traces.jsonl"
    telemetry = telemetry_from_env(
        {"SPINE_TRACE_FILE": str(trace_file), "SPINE_TRACE_CONTENT": "1"}
    )
    plugins = telemetry.worker_plugins(load_policy().price_table())
    caplog.set_level(logging.DEBUG)
    with FakeLLMServer() as llm:
        llm.enqueue_openai(tool_calls=[FakeToolCall("lookup_order", {"order_id": "o-1080"})])
        llm.enqueue_openai(
            tool_calls=[
                FakeToolCall(
                    "send_email",
                    {
                        "order_id": "o-1080",
                        "subject": "About your order",
                        "body": "It is on its way.",
                    },
                )
            ]
        )
        llm.enqueue_openai("All done.")
        providers = {"openai": openai_provider_from_env(llm.env())}
        async with make_worker(providers=providers, plugins=plugins):
            demo = await start_run(client, build_demo_request("o-1081"), task_queue=task_queue)
            state = await wait_for_status(demo, "awaiting_approval")
            await decide(
                demo,
                ApprovalDecision(
                    approval_id=state.pending_approvals[0].approval_id,
                    decision="approve",
                    by="bob",
                    role="supervisor",
                ),
            )
            request = scripted_request([])
            request.model = ModelChoice(provider="openai", name="gpt-4.1-mini")
            llm_run = await start_run(client, request, task_queue=task_queue)
            results = [await wait_result(demo), await wait_result(llm_run)]
        prompts = json.dumps([r.body for r in llm.requests])
    telemetry.shutdown()
    assert [r.status for r in results] == ["completed", "completed"]
    assert "o-1080" in prompts and "customer+o-1080@example.com" in prompts  # tool output went in
    places = {
        "history": "".join(
            [await _show_json(client, demo.id), await _show_json(client, llm_run.id)]
        ),
        "worker logs": caplog.text,
        "traces": trace_file.read_text(),
        "model prompts": prompts,
        "audit log": _database_text(worker_config.state_dir / "audit.db"),
        "transcripts and outputs": _database_text(worker_config.state_dir / "state.db"),
    }
    assert len(places["traces"]) > 1000 and len(places["history"]) > 1000
    assert {name: text.count(secret) for name, text in places.items()} == dict.fromkeys(places, 0)


async def test_tool_output_is_scrubbed_of_resolved_secrets(vault: VaultDev, service: DemoService):
    """A tool that echoes its secret returns '[redacted]' in its place."""

    @tool(secrets=[SecretRef(name="api_key", path="spine/{account}", key="api_key")])
    async def leaky(args: Echo, ctx: ToolContext) -> Echo:
        """Echo the text and, carelessly, the key."""
        return Echo(text=f"{args.text} key={ctx.secret('api_key')}")

    registry = Registry()
    registry.add_tool(leaky)
    async with httpx.AsyncClient() as http:
        runner = ToolRunner(registry, VaultSecrets(vault.url, token=vault.token), http, {})
        result: ToolCallResult = await runner.run(
            ToolCallInput(
                run_id="r",
                step=1,
                call_id="c",
                tool="leaky",
                version=1,
                args={"text": "hi"},
                account="acme",
            )
        )
    assert result.output == {"text": "hi key=[redacted]"}


async def test_vault_down_fails_closed_then_recovers(
    client, make_worker, task_queue, service: DemoService, vault: VaultDev
):
    """With OpenBao stopped the refund never runs; once OpenBao is back the run finishes, once."""
    private = start_vault_dev()
    account = f"vault-{uuid.uuid4().hex[:6]}"
    private.put_secret(f"spine/{account}", {"api_key": service.api_key})
    script = [
        turn(call("issue_refund", order_id="o-1082", amount=150.0), confidence=0.9),
        turn(text="done"),
    ]
    request = scripted_request(script)
    request.account = account
    try:
        async with make_worker(
            secrets=VaultSecrets(private.url, token=private.token),
            identity=VaultSecrets(vault.url, token=vault.token),  # principals stay reachable
        ):
            handle = await start_run(client, request, task_queue=task_queue)
            state = await wait_for_status(handle, "awaiting_approval")
            private.stop()
            await decide(
                handle,
                ApprovalDecision(
                    approval_id=state.pending_approvals[0].approval_id,
                    decision="approve",
                    by="bob",
                    role="supervisor",
                ),
            )

            async def failing_attempts() -> int:
                description = await handle.describe()
                pending = description.raw_description.pending_activities
                return max((p.attempt for p in pending if p.last_failure.message), default=0)

            async def retried() -> bool:
                return await failing_attempts() >= 2

            await eventually(retried, timeout=90, what="the refund retrying while Vault is down")
            description = await handle.describe()
            [pending] = description.raw_description.pending_activities
            assert "SecretsUnavailable" in pending.last_failure.application_failure_info.type
            assert service.get("/v1/refunds?order_id=o-1082") == []
            private = start_vault_dev(port=private.port, token=private.token)
            private.put_secret(f"spine/{account}", {"api_key": service.api_key})
            result = await wait_result(handle)
    finally:
        private.stop()
    assert result.status == "completed", result.reason
    assert len(service.get("/v1/refunds?order_id=o-1082")) == 1


class _EchoingPartner:
    """A partner API that answers 401 and echoes the caller's credentials back: as sent, in
    base64, in hex, URL-encoded, and split in two across the message."""

    def __init__(self) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
                import base64 as b64
                import urllib.parse

                auth = self.headers.get("Authorization", "")
                key = auth.removeprefix("Bearer ")
                body = json.dumps(
                    {
                        "error": f"invalid credentials: {auth}",
                        "debug": {
                            "b64": b64.b64encode(key.encode()).decode(),
                            "hex": key.encode().hex(),
                            "url": urllib.parse.quote(key, safe=""),
                            "split": f"{key[: len(key) // 2]} ... {key[len(key) // 2 :]}",
                        },
                    }
                ).encode()
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


def _forms(secret: str) -> dict[str, str]:
    import base64 as b64
    import urllib.parse

    return {
        "plain": secret,
        "base64": b64.b64encode(secret.encode()).decode().rstrip("="),
        "hex": secret.encode().hex(),
        "url": urllib.parse.quote(secret, safe=""),
        "first half": secret[: len(secret) // 2],
        "second half": secret[len(secret) // 2 :],
    }


async def test_a_partner_echoing_the_key_leaks_it_nowhere(
    client, make_worker, task_queue, worker_config, vault: VaultDev, tmp_path, caplog
):
    """A 401 body quoting the request's key (plain, base64, hex, URL-encoded, halves) reaches
    no history, log, trace, audit entry, state or model-visible text."""
    secret = f"sk-live-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    account = f"leak-{uuid.uuid4().hex[:6]}"
    vault.put_secret(f"spine/{account}", {"api_key": secret})
    partner = _EchoingPartner()
    trace_file = tmp_path / "traces.jsonl"
    telemetry = telemetry_from_env(
        {"SPINE_TRACE_FILE": str(trace_file), "SPINE_TRACE_CONTENT": "1"}
    )
    caplog.set_level(logging.DEBUG)
    request = scripted_request([turn(call("lookup_order", order_id="o-1083")), turn(text="ok")])
    request.account = account
    try:
        async with make_worker(
            settings={"SPINE_DEMO_URL": partner.url},
            plugins=telemetry.worker_plugins(load_policy().price_table()),
        ):
            handle = await start_run(client, request, task_queue=task_queue)
            state = await wait_for_status(handle, "parked", timeout=120)
            await operate(handle, OperatorCommand(action="abort", by="ops", role="operator"))
            result = await wait_result(handle)
    finally:
        partner.stop()
        telemetry.shutdown()
    assert "AuthenticationFailed" in (state.reason or "") and "[redacted]" in (state.reason or "")
    places = {
        "history": await _show_json(client, handle.id),
        "worker logs": caplog.text,
        "traces": trace_file.read_text() if trace_file.exists() else "",
        "audit log": (worker_config.state_dir / "audit.db").read_bytes().decode("latin-1"),
        "transcripts": (worker_config.state_dir / "state.db").read_bytes().decode("latin-1"),
        "state and result": state.model_dump_json() + result.model_dump_json(),
    }
    leaks = {
        (place, form)
        for place, text in places.items()
        for form, value in _forms(secret).items()
        if value in text
    }
    assert leaks == set()


async def test_a_secret_with_a_newline_is_refused_without_quoting_it(
    vault: VaultDev, service: DemoService
):
    """A Vault value with a trailing newline (which HTTP clients quote in their errors) is
    refused when it is read, naming the path, never the value."""
    account = f"nl-{uuid.uuid4().hex[:6]}"
    secret = f"key-{uuid.uuid4().hex}"
    vault.put_secret(f"spine/{account}", {"api_key": secret + "\n"})
    resolver = VaultSecrets(vault.url, token=vault.token)
    try:
        await resolver.resolve(
            [SecretRef(name="api_key", path="spine/{account}", key="api_key")], account
        )
        raise AssertionError("a secret with a newline was handed out")
    except SecretMissing as err:
        message = str(err)
    assert "contains control characters" in message and f"spine/{account}" in message
    assert secret not in message


def _database_text(path: Path) -> str:
    """A SQLite database's bytes as text, its write-ahead log included (not checkpointed yet)."""
    wal = path.with_name(path.name + "-wal")
    data = path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    return data.decode("latin-1")


async def test_secrets_are_cached_briefly_and_expire(vault: VaultDev, new_account) -> None:
    """Within the TTL a secret is read from Vault once; after it, again; TTL 0 never caches."""
    account = new_account("cache")
    ref = SecretRef(name="api_key", path="spine/{account}", key="api_key")
    cached = VaultSecrets(vault.url, token=vault.token, cache_ttl_s=0.5)
    for _ in range(5):
        await cached.resolve([ref], account)
    assert cached.reads == 1
    vault.put_secret(f"spine/{account}", {"api_key": "rotated"})
    await asyncio.sleep(0.6)
    assert await cached.resolve([ref], account) == {"api_key": "rotated"}
    assert cached.reads == 2
    uncached = VaultSecrets(vault.url, token=vault.token, cache_ttl_s=0)
    for _ in range(3):
        await uncached.resolve([ref], account)
    assert uncached.reads == 3
    with pytest.raises(ValueError, match="SPINE_SECRET_CACHE_TTL_S='soon'"):
        VaultSecrets.from_env(
            {"VAULT_ADDR": vault.url, "VAULT_TOKEN": "t", "SPINE_SECRET_CACHE_TTL_S": "soon"}
        )


async def test_a_rotated_key_costs_one_read_not_a_failed_call(
    vault: VaultDev, service: DemoService, new_account
) -> None:
    """The worker cached a key that was then rotated: the service refuses it (401), the runner
    reads the secret afresh and calls again, and the lookup succeeds."""
    from spine.demo.agent import lookup_order

    account = new_account("rotate")
    vault.put_secret(f"spine/{account}", {"api_key": "the-old-key"})
    secrets = VaultSecrets(vault.url, token=vault.token, cache_ttl_s=300)
    await secrets.resolve(list(lookup_order.secrets), account)  # cached: the old key
    vault.put_secret(f"spine/{account}", {"api_key": service.api_key})  # rotated
    registry = Registry()
    registry.add_tool(lookup_order)
    async with httpx.AsyncClient() as http:
        runner = ToolRunner(registry, secrets, http, {"SPINE_DEMO_URL": service.url})
        result = await runner.run(
            ToolCallInput(
                run_id="r",
                step=1,
                call_id="c",
                tool="lookup_order",
                version=1,
                args={"order_id": "o-1090"},
                account=account,
            )
        )
    assert result.output["order_id"] == "o-1090"
    assert secrets.reads == 2
