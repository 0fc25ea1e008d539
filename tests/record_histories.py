"""Record the event histories that `tests/test_replay_histories.py` replays.

    python -m tests.record_histories          # rewrites tests/histories/*.json

Starts its own Temporal dev server, OpenBao and demo service on free ports, runs each scenario
below on a worker built by ``worker.build_worker``, and writes every run's history, in the format
of ``WorkflowHistory.to_json()`` (stack traces blanked), to
``tests/histories/<scenario>[.<n>].json``; ``.<n>`` numbers the runs of a continue-as-new chain.
The workflow id of each is ``history-<scenario>``. Takes about 15 seconds.

Re-record after an *intended* change of the workflow's commands (and say so in review); a change
that should be replay-safe must pass against the histories recorded before it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from spine.client.demo import build_demo_request
from spine.client.forks import current_registry, plan_fork, start_fork
from spine.client.identity import SigningInterceptor
from spine.client.runs import RunHandle, decide, signal_operator, start_run, wait_result
from spine.client.testing import DemoService, VaultDev, demo_stack, temporal_dev_server
from spine.contract import (
    AgentRequest,
    AgentResult,
    ApprovalDecision,
    Limits,
    OperatorCommand,
    ScriptTurn,
)
from spine.guardrails.secrets import VaultSecrets
from tests.helpers import call, policy_file, scripted_request, turn, wait_for_status

if TYPE_CHECKING:
    from spine.plugin import SpineConfig

HISTORIES = Path(__file__).parent / "histories"
IDENTITY = "spine-history-recorder"  # not pid@host: the files are committed


class Recorder:
    """Runs scenarios on one worker and writes their histories."""

    def __init__(
        self,
        client: Client,
        vault: VaultDev,
        service: DemoService,
        queue: str,
        config: SpineConfig | None = None,
    ) -> None:
        self.client = client
        self.vault = vault
        self.service = service
        self.queue = queue
        self.config = config

    async def start(self, name: str, request: AgentRequest) -> RunHandle:
        return await start_run(
            self.client, request, workflow_id=f"history-{name}", task_queue=self.queue
        )

    def account(self, name: str, *, with_secret: bool = True) -> str:
        account = f"history-{name}"
        if with_secret:
            self.vault.put_secret(f"spine/{account}", {"api_key": self.service.api_key})
        return account

    async def save(self, name: str, handle: RunHandle, out: Path) -> list[Path]:
        """Write every run of the handle's chain; returns the files written."""
        runs = sorted(
            [w async for w in self.client.list_workflows(f"WorkflowId = '{handle.id}'")],
            key=lambda w: w.start_time,
        )
        written = []
        for index, run in enumerate(runs, start=1):
            history = await self.client.get_workflow_handle(
                handle.id, run_id=run.run_id
            ).fetch_history()
            path = out / (f"{name}.{index}.json" if len(runs) > 1 else f"{name}.json")
            path.write_text(json.dumps(_scrubbed(history.to_json_dict()), indent=2) + "\n")
            written.append(path)
        return written


def _scrubbed(value: object) -> object:
    """`value` without stack traces: they name this machine's paths and replay ignores them."""
    if isinstance(value, dict):
        return {k: "" if k == "stackTrace" else _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    return value


def _refund_turns(order: str) -> list[ScriptTurn]:
    return [
        turn(call("issue_refund", order_id=order, amount=40.0), confidence=0.9),
        turn(call("send_email", order_id=order, subject="Refund", body="Refunded 40.")),
    ]


async def _approve_first(handle: RunHandle) -> RunHandle:
    """Wait for the run's first approval and approve it as bob (a supervisor)."""
    state = await wait_for_status(handle, "awaiting_approval")
    await decide(
        handle,
        ApprovalDecision(
            approval_id=state.pending_approvals[0].approval_id,
            decision="approve",
            by="bob",
            role="supervisor",
        ),
    )
    return handle


async def demo_approval(r: Recorder) -> RunHandle:
    """The demo conversation: lookup, a refund a supervisor approves, email, ticket, answer."""
    handle = await r.start("demo-approval", build_demo_request("o-1001"))
    return await _approve_first(handle)


async def lean_demo(r: Recorder) -> RunHandle:
    """The demo conversation on the `spine-lean-run` shape: the agent resolved by a local
    activity, the start's search attributes kept, ledger operations sent as batches."""
    request = build_demo_request("o-1009")
    request.account = r.account("lean-demo")
    handle = await r.start("lean-demo", request)
    return await _approve_first(handle)


async def compensation(r: Recorder) -> RunHandle:
    """A refund and an email, then a terminal model error: both are undone in reverse order."""
    script = [*_refund_turns("o-1002"), turn(text="never")]
    script[-1].error = "terminal"
    request = scripted_request(script)
    request.account = r.account("compensation")
    return await r.start("compensation", request)


async def park_retry(r: Recorder) -> RunHandle:
    """The first tool call parks on a missing secret; an operator retries once it is back."""
    account = r.account("park-retry", with_secret=False)
    script = [
        turn(call("lookup_order", order_id="o-1003")),
        turn(call("issue_refund", order_id="o-1003", amount=20.0), confidence=0.9),
        turn(text="Refunded 20.00."),
    ]
    request = scripted_request(script)
    request.account = account
    handle = await r.start("park-retry", request)
    await wait_for_status(handle, "parked")
    r.vault.put_secret(f"spine/{account}", {"api_key": r.service.api_key})
    await signal_operator(handle, OperatorCommand(action="retry", by="ops", role="operator"))
    return handle


async def continue_as_new(r: Recorder) -> RunHandle:
    """Sixteen lookups under a small history limit: the run continues as new twice or more."""
    script = [turn(call("lookup_order", order_id=f"o-{1010 + i}")) for i in range(16)]
    script.append(turn(text="Looked at every order."))
    request = scripted_request(script)
    request.account = r.account("continue-as-new")
    return await r.start("continue-as-new", request)


async def fork(r: Recorder) -> RunHandle:
    """A run out of budget after a refund and an email, forked from step 2 with more budget."""
    script = [*_refund_turns("o-1004"), turn(text="Refunded and emailed.")]
    for t in script:
        assert t.usage is not None  # helpers.turn always sets it
        t.usage.input_tokens = 2000
    request = scripted_request(script)
    request.account = r.account("fork")
    request.limits = Limits(max_usd=0.011)
    original = await r.start("fork-original", request)
    result = await wait_result(original)
    assert result.status == "failed", result.reason
    plan = await plan_fork(
        r.client,
        original.id,
        2,
        {"limits.max_usd": "0.5"},
        registry=current_registry(),
        new_id="history-fork",
    )
    return await start_fork(r.client, plan, task_queue=r.queue, link_attribute=True)


async def large_output(r: Recorder) -> RunHandle:
    """Tool outputs above the worker's inline limit go by reference (claim check): a lookup and
    an untrusted document, then the answer."""
    doc = r.service.post(
        "/v1/documents", {"order_id": "o-1005", "text": "The parcel arrived crushed. " * 20}
    )
    assert isinstance(doc, dict)
    script = [
        turn(call("lookup_order", order_id="o-1005")),
        turn(call("fetch_document", document_id=doc["document_id"])),
        turn(text="Read the order and its document."),
    ]
    request = scripted_request(script)
    request.account = r.account("large-output")
    return await r.start("large-output", request)


async def parallel(r: Recorder) -> RunHandle:
    """A turn of three calls at once (two lookups and a refund), then an email and the answer."""
    script = [
        turn(
            call("lookup_order", order_id="o-1007"),
            call("lookup_order", order_id="o-1008"),
            call("issue_refund", order_id="o-1007", amount=40.0),
        ),
        turn(call("send_email", order_id="o-1007", subject="Refund", body="Refunded 40.")),
        turn(text="Refunded o-1007."),
    ]
    request = scripted_request(script)
    request.account = r.account("parallel")
    return await r.start("parallel", request)


async def rollout(r: Recorder) -> RunHandle:
    """Worker versioning: a run of build r1 waits for approval while build r2 becomes current;
    approved, it makes its refund on r1, then continues as new onto r2 and completes there."""
    from spine.client.testing import set_current_build
    from spine.plugin import build_worker

    assert r.config is not None and r.config.deployment_name
    await set_current_build(r.client, r.config.deployment_name, "r1")
    request = build_demo_request("o-1006")
    request.account = r.account("rollout")
    handle = await r.start("rollout", request)
    state = await wait_for_status(handle, "awaiting_approval")
    newer = dataclasses.replace(r.config, build_id="r2")
    async with build_worker(r.client, config=newer):
        await set_current_build(r.client, r.config.deployment_name, "r2")
        await decide(
            handle,
            ApprovalDecision(
                approval_id=state.pending_approvals[0].approval_id,
                decision="approve",
                by="bob",
                role="supervisor",
            ),
        )
        await wait_result(handle)
    return handle


SCENARIOS: dict[str, Callable[[Recorder], Awaitable[RunHandle]]] = {
    "demo-approval": demo_approval,
    "compensation": compensation,
    "park-retry": park_retry,
    "continue-as-new": continue_as_new,
    "fork": fork,
    "large-output": large_output,
    "rollout": rollout,
    "parallel": parallel,
    "lean-demo": lean_demo,
}


#: Policy `[runtime]` overrides per scenario (the rest run on the default policy).
RUNTIME: dict[str, dict[str, object]] = {"continue-as-new": {"continue_as_new_after_events": 100}}
#: Worker settings per scenario.
CONFIG: dict[str, dict[str, object]] = {
    "large-output": {"inline_output_bytes": 100},
    "rollout": {
        "deployment_name": "history-rollout",
        "build_id": "r1",
        "ledger_task_queue": "histories-rollout-ledger",
    },
}


def _clear(out: Path, names: list[str]) -> None:
    """Remove the scenarios' old files (a chain may now have fewer runs)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        for stale in [*out.glob(f"{name}.json"), *out.glob(f"{name}.*.json")]:
            stale.unlink()


async def record(out: Path = HISTORIES, only: list[str] | None = None) -> list[Path]:
    """Run the scenarios (all, or `only`) and write their histories to `out`."""
    from spine.plugin import SpineConfig, build_worker  # lazily: it imports every activity

    names = only or list(SCENARIOS)
    _clear(out, names)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="spine-histories-") as tmp:
        async with temporal_dev_server() as env:
            target = env.client.service_client.config.target_host
            with demo_stack(Path(tmp)) as (vault, service):
                client = await Client.connect(
                    target,
                    identity=IDENTITY,
                    data_converter=pydantic_data_converter,
                    interceptors=[SigningInterceptor(vault.signer(vault.tokens))],
                )
                for name in names:
                    config = SpineConfig(
                        task_queue=f"histories-{name}",
                        state_dir=Path(tmp) / "state",
                        policy_path=policy_file(
                            Path(tmp), runtime=RUNTIME.get(name), name=f"{name}.toml"
                        ),
                        settings={"SPINE_DEMO_URL": service.url},
                        secrets=VaultSecrets(vault.url, token=vault.token),
                        providers={},
                        **CONFIG.get(name, {}),  # type: ignore[arg-type]  # SpineConfig fields
                    )
                    recorder = Recorder(client, vault, service, config.task_queue, config)
                    async with build_worker(client, config=config):
                        handle = await SCENARIOS[name](recorder)
                        result: AgentResult = await wait_result(handle)
                    written += await recorder.save(name, handle, out)
                    print(f"{name}: {result.status} after {result.steps} steps", flush=True)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", help=f"default: all of {', '.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path, default=HISTORIES, help="default: tests/histories")
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    for path in asyncio.run(record(args.out, args.scenarios or None)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
