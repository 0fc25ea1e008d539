"""Spine vs Temporal's OpenAI Agents integration, Pydantic AI's Temporal integration and
temporal-agent-harness (on its Pydantic AI integration; see :mod:`bench.peer_harness`).

The same scripted agent on each, on one Temporal dev server, against one demo business service:

1. The 10-turn refund conversation (9 tool calls, then the answer), run one at a time with no
   faults: wall time per step and history bytes (and events) per step.
2. The sdk-python#1890 scenario: 100 model calls, each tool result ~20 KB. Does the run finish,
   how big is its history, and where does it die if it dies?

Workers run in this process (in-process for all four, so the comparison is fair); each arm has
its own task queue. Arms alternate round by round to share the machine's noise; the four
#1890 runs go at the same time (their wall times are then not comparable, their histories are).
An arm that cannot run a scenario is recorded as ``n/a: <reason>``, not a crash.

    python -m bench.peers [--quick] [--out bench/results/peers.json]

Quick: 3 rounds of the 10-step run and the full 100-call scenario. Full: 10 rounds.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.converter import DataConverter
from temporalio.worker import Worker

from bench.common import (
    Stack,
    bench_policy,
    bench_stack,
    orders,
    parser,
    spine_request,
    summary,
    write_results,
)
from bench.scripts import call as script_call
from bench.scripts import refund_script, turn
from spine.client.runs import start_run
from spine.contract import AgentResult
from spine.guardrails.secrets import VaultSecrets
from spine.plugin import SpineConfig, build_worker

HISTORY_LIMIT_BYTES = 50 * 1024 * 1024
HISTORY_WARN_BYTES = 10 * 1024 * 1024
DOCS_CALLS = 100
DOCS_DEADLINE_S = 420.0


async def history_stats(client: Client, workflow_id: str) -> dict[str, object]:
    """Events, bytes and the largest event over every run of `workflow_id` (continue-as-new)."""
    runs = [w async for w in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
    events = size = largest = 0
    model_calls = 0
    last = ""
    for run in sorted(runs, key=lambda w: w.start_time):
        handle = client.get_workflow_handle(workflow_id, run_id=run.run_id)
        async for event in handle.fetch_history_events():
            events += 1
            n = event.ByteSize()
            size += n
            largest = max(largest, n)
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                name = event.activity_task_scheduled_event_attributes.activity_type.name
                if "model" in name.lower() or "request" in name.lower():
                    model_calls += 1
            last = EventType.Name(event.event_type)
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED:
                last += f": {event.workflow_execution_terminated_event_attributes.reason}"
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED:
                last += f": {event.workflow_execution_failed_event_attributes.failure.message}"
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                last += f": {event.workflow_task_failed_event_attributes.failure.message[:300]}"
    return {
        "runs": len(runs),
        "events": events,
        "bytes": size,
        "largest_event_bytes": largest,
        "model_calls_scheduled": model_calls,
        "last_event": last,
    }


# --------------------------------------------------------------------------------- arms


class Arm:
    """One framework: how to start a 10-step run and a 100-call run on its own task queue."""

    name: str
    client: Client
    queue: str

    async def start(self, kind: str, arg: str, turns: int) -> WorkflowHandle:
        raise NotImplementedError

    async def outcome(self, handle: WorkflowHandle) -> str:
        """ "completed" or what went wrong, in one line."""
        raise NotImplementedError


class SpineArm(Arm):
    name = "spine"

    def __init__(self, client: Client, queue: str) -> None:
        self.client = client
        self.queue = queue

    async def start(self, kind: str, arg: str, turns: int) -> WorkflowHandle:
        if kind == "refund":
            request = spine_request(refund_script(arg))
        else:
            script = [turn(script_call("read_doc", doc_id=i)) for i in range(1, turns)]
            script.append(turn(text=f"Read {turns - 1} documents."))
            request = spine_request(script, agent="bench-agent", max_steps=turns + 5)
        return await start_run(
            self.client,
            request,
            workflow_id=f"peer-spine-{uuid.uuid4().hex[:8]}",
            task_queue=self.queue,
        )

    async def outcome(self, handle: WorkflowHandle) -> str:
        result: AgentResult = await handle.result()
        return "completed" if result.status == "completed" else f"{result.status}: {result.reason}"


class PeerArm(Arm):
    #: Scenario -> why this arm cannot run it (recorded as "n/a: <reason>").
    unsupported: dict[str, str] = {}

    def __init__(self, name: str, client: Client, queue: str, workflow: str) -> None:
        self.name = name
        self.client = client
        self.queue = queue
        self.workflow = workflow

    async def start(self, kind: str, arg: str, turns: int) -> WorkflowHandle:
        from bench.peer_tools import PeerInput

        return await self.client.start_workflow(
            self.workflow,
            PeerInput(prompt=f"SCRIPT {kind} {arg}", max_turns=turns + 5),
            id=f"peer-{self.name}-{uuid.uuid4().hex[:8]}",
            task_queue=self.queue,
            result_type=str,
        )

    async def outcome(self, handle: WorkflowHandle) -> str:
        await handle.result()
        return "completed"


class HarnessArm(PeerArm):
    """temporal-agent-harness: a session workflow that takes the prompt as one message.

    Started with an ``AgentConfig`` and the run's turn limit, sent the script's prompt through the
    ``send_agent_message`` update, then ``close`` (the session ends once that turn drains). A
    handler that raises leaves the session to complete normally, so the turn's own outcome is read
    back with the ``peer_outcome`` query.
    """

    async def start(self, kind: str, arg: str, turns: int) -> WorkflowHandle:
        from temporal_agent_harness.harness.agent_protocol import (
            SEND_AGENT_MESSAGE_UPDATE,
            AgentConfig,
            AgentMessage,
            AgentMessageReply,
        )

        from bench.peer_harness import RunLimits

        handle = await self.client.start_workflow(
            self.workflow,
            args=[AgentConfig(), RunLimits(max_turns=turns + 5)],
            id=f"peer-{self.name}-{uuid.uuid4().hex[:8]}",
            task_queue=self.queue,
        )
        await handle.execute_update(
            SEND_AGENT_MESSAGE_UPDATE,
            AgentMessage(type="ask", payload={"text": f"SCRIPT {kind} {arg}"}, expected_turn=1),
            result_type=AgentMessageReply,
        )
        await handle.signal("close")
        return handle

    async def outcome(self, handle: WorkflowHandle) -> str:
        await handle.result()
        return await handle.query("peer_outcome", result_type=str)


def _not_applicable(arm: Arm, kind: str) -> str | None:
    why = getattr(arm, "unsupported", {}).get(kind)
    return f"n/a: {why}" if why else None


def _na_sample(outcome: str) -> dict[str, object]:
    return {
        "workflow_id": None,
        "outcome": outcome,
        "status": None,
        "wall_s": 0.0,
        "runs": 0,
        "events": 0,
        "bytes": 0,
        "largest_event_bytes": 0,
        "model_calls_scheduled": 0,
        "last_event": "",
    }


async def _timed(arm: Arm, kind: str, arg: str, turns: int, deadline: float) -> dict[str, object]:
    if na := _not_applicable(arm, kind):
        return _na_sample(na)
    began = time.perf_counter()
    try:
        handle = await arm.start(kind, arg, turns)
    except Exception as err:  # noqa: BLE001  # an arm that cannot even start is a result too
        return _na_sample(f"not started: {type(err).__name__}: {err}"[:500])
    try:
        outcome = await asyncio.wait_for(arm.outcome(handle), deadline)
    except TimeoutError:
        outcome = f"not finished after {deadline:.0f}s"
        described = await handle.describe()
        if described.status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("benchmark deadline")
    except Exception as err:  # noqa: BLE001  # how it died is the measurement
        outcome = f"{type(err).__name__}: {getattr(err, 'cause', None) or err}"
    wall = time.perf_counter() - began
    stats = await history_stats(arm.client, handle.id)
    described = await arm.client.get_workflow_handle(handle.id).describe()
    return {
        "workflow_id": handle.id,
        "outcome": outcome,
        "status": described.status.name if described.status else None,
        "wall_s": wall,
        **stats,
    }


# ------------------------------------------------------------------------------- driver


async def _with_workers(stack: Stack, tmp: Path, body: Callable[[list[Arm]], Awaitable[None]]):
    """Start the four frameworks' workers in this process and run `body` with their arms."""
    from pydantic_ai.durable_exec.temporal import AgentPlugin, PydanticAIPlugin
    from temporal_agent_harness.plugin import AgentHarnessPlugin
    from temporal_agent_harness.utils.large_payload import local_payload_storage
    from temporalio.contrib.openai_agents import ModelActivityParameters, OpenAIAgentsPlugin
    from temporalio.contrib.openai_agents.testing import TestModelProvider

    from bench.peer_harness import HARNESS_AGENT, HARNESS_TOOLS, HarnessAgentWorkflow
    from bench.peer_oai import OpenAIAgentWorkflow, ScriptedOpenAIModel
    from bench.peer_pai import PydanticAIAgentWorkflow
    from bench.peer_tools import OAI_ACTIVITIES

    os.environ["BENCH_DEMO_URL"] = stack.service.url
    os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")  # no key, nowhere to send it
    os.environ["BENCH_DEMO_KEY"] = stack.service.api_key
    base = stack.server.client
    spine_queue = f"peer-spine-{uuid.uuid4().hex[:6]}"
    config = SpineConfig(
        task_queue=spine_queue,
        state_dir=tmp / "state",
        policy_path=bench_policy(tmp),
        agent_modules=("spine.demo.agent", "bench.agents"),
        settings={"SPINE_DEMO_URL": stack.service.url},
        secrets=VaultSecrets(stack.vault.url, token=stack.vault.token),
        providers={},
    )
    oai_plugin = OpenAIAgentsPlugin(
        model_params=ModelActivityParameters(start_to_close_timeout=timedelta_s(60)),
        model_provider=TestModelProvider(ScriptedOpenAIModel()),
    )
    # Each integration brings its own payload converter in place of Spine's pydantic one.
    plain = {**base.config(), "data_converter": DataConverter.default}
    oai_client = Client(**{**plain, "plugins": [oai_plugin]})
    pai_client = Client(**{**plain, "plugins": [PydanticAIPlugin()]})
    oai_queue = f"peer-oai-{uuid.uuid4().hex[:6]}"
    pai_queue = f"peer-pai-{uuid.uuid4().hex[:6]}"
    oai_worker = Worker(
        oai_client,
        task_queue=oai_queue,
        workflows=[OpenAIAgentWorkflow],
        activities=list(OAI_ACTIVITIES),
    )
    pai_worker = Worker(pai_client, task_queue=pai_queue, workflows=[PydanticAIAgentWorkflow])
    # The harness's plugin goes last (it keeps Pydantic AI's converter and adds its large-payload
    # offload, to a directory of this benchmark's own); its tools' activities come with it.
    harness_plugin = AgentHarnessPlugin(
        tools=HARNESS_TOOLS,
        large_payload_offload=local_payload_storage(base_dir=tmp / "harness-payloads"),
    )
    harness_client = Client(**{**plain, "plugins": [PydanticAIPlugin(), harness_plugin]})
    harness_queue = f"peer-harness-{uuid.uuid4().hex[:6]}"
    harness_worker = Worker(
        harness_client,
        task_queue=harness_queue,
        workflows=[HarnessAgentWorkflow],
        plugins=[AgentPlugin(HARNESS_AGENT)],
    )
    arms: list[Arm] = [
        SpineArm(base, spine_queue),
        PeerArm("openai_agents", oai_client, oai_queue, "PeerOpenAIAgent"),
        PeerArm("pydantic_ai", pai_client, pai_queue, "PeerPydanticAIAgent"),
        HarnessArm("agent_harness", harness_client, harness_queue, "PeerHarnessAgent"),
    ]
    async with build_worker(base, config=config), oai_worker, pai_worker, harness_worker:
        await body(arms)


def timedelta_s(seconds: float):
    from datetime import timedelta

    return timedelta(seconds=seconds)


async def run(rounds: int, docs_calls: int = DOCS_CALLS, seed: int = 7) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="spine-bench-peers-"))
    steps: dict[str, list[dict[str, object]]] = {}
    docs: dict[str, dict[str, object]] = {}
    problems: dict[str, str] = {}

    async def body(arms: list[Arm]) -> None:
        targets = iter(orders(len(arms) * (rounds + 1)))
        for arm in arms:  # warm-up, not counted
            warm = await _timed(arm, "refund", next(targets), 10, 120)
            if warm["outcome"] != "completed":
                problems[arm.name] = f"warm-up run: {warm['outcome']}"
        for index in range(rounds):
            for arm in arms if index % 2 == 0 else reversed(arms):
                if arm.name in problems:
                    continue
                sample = await _timed(arm, "refund", next(targets), 10, 120)
                steps.setdefault(arm.name, []).append(sample)
                print(
                    f"  {arm.name:<14} 10-step run: {sample['wall_s'] * 100:.0f} ms/step, "
                    f"{sample['bytes'] / 10 / 1024:.1f} KiB history/step ({sample['outcome']})",
                    flush=True,
                )
        # The #1890 runs go side by side: their history sizes, not their wall times,
        # are the figure, and one after the other they would take minutes.
        print(f"  #1890 scenario: {docs_calls} model calls x ~20 KB, all arms at once ...")
        found = await asyncio.gather(
            *(_timed(arm, "docs", str(docs_calls), docs_calls, DOCS_DEADLINE_S) for arm in arms)
        )
        for arm, d in zip(arms, found, strict=True):
            docs[arm.name] = d
            print(
                f"  {arm.name:<14} -> {d['outcome'][:160]}; history {d['bytes'] / 2**20:.1f} MiB, "
                f"{d['events']} events, {d['model_calls_scheduled']} model calls scheduled, "
                f"{d['wall_s']:.0f}s",
                flush=True,
            )

    async with bench_stack(tmp) as stack:
        await _with_workers(stack, tmp, body)

    per_arm = {}
    for name, samples in steps.items():
        ok = [s for s in samples if s["outcome"] == "completed"]
        per_arm[name] = {
            "completed": f"{len(ok)}/{len(samples)}",
            "step_ms": summary(s["wall_s"] * 100 for s in ok),
            "history_bytes_per_step": statistics.median(s["bytes"] / 10 for s in ok)
            if ok
            else None,
            "history_events_per_step": statistics.median(s["events"] / 10 for s in ok)
            if ok
            else None,
            "samples": samples,
        }
    return {
        "setup": {"steps": 10, "rounds": rounds, "docs_calls": docs_calls, "doc_bytes": 20_000},
        "ten_step": per_arm,
        "issue_1890": docs,
        "problems": problems,
        "limits": {
            "history_error_bytes": HISTORY_LIMIT_BYTES,
            "history_warn_bytes": HISTORY_WARN_BYTES,
        },
    }


def report(data: dict[str, object]) -> None:
    ten: dict[str, dict] = data["ten_step"]  # type: ignore[assignment]
    docs: dict[str, dict] = data["issue_1890"]  # type: ignore[assignment]
    print()
    print(f"{'arm':<14} {'step p50':>9} {'step p95':>9} {'hist B/step':>12} {'events/step':>11}")
    for name, a in ten.items():
        print(
            f"{name:<14} {a['step_ms']['median'] or 0:>7.0f}ms {a['step_ms']['p95'] or 0:>7.0f}ms "
            f"{a['history_bytes_per_step'] or 0:>12.0f} {a['history_events_per_step'] or 0:>11.1f}"
        )
    spine = ten.get("spine")
    for name, a in ten.items():
        if name != "spine" and spine and a["step_ms"]["median"] and spine["step_ms"]["median"]:
            latency = spine["step_ms"]["median"] / a["step_ms"]["median"]
            size = spine["history_bytes_per_step"] / a["history_bytes_per_step"]
            print(f"ratio spine/{name}: step latency {latency:.2f}, history bytes/step {size:.2f}")
    print()
    print(f"sdk-python#1890 ({data['setup']['docs_calls']} model calls, ~20 KB tool results):")
    for name, d in docs.items():
        print(
            f"  {name:<14} {d['outcome'][:120]:<60} history {d['bytes'] / 2**20:6.1f} MiB "
            f"({d['events']} events, largest event {d['largest_event_bytes'] / 1024:.0f} KiB, "
            f"{d['runs']} run(s)), model calls scheduled {d['model_calls_scheduled']}, "
            f"{d['wall_s']:.0f}s"
        )
    for name, why in data["problems"].items():  # type: ignore[union-attr]
        print(f"  problem: {name}: {why}")


def main() -> None:
    p = parser(__doc__, "3 rounds of the 10-step run (the #1890 run is always full size)")
    p.add_argument("--docs-calls", type=int, default=DOCS_CALLS)
    args = p.parse_args()
    began = time.monotonic()
    data = asyncio.run(run(3 if args.quick else 10, args.docs_calls, args.seed))
    data["elapsed_s"] = time.monotonic() - began
    report(data)
    print(f"elapsed {data['elapsed_s']:.0f}s")
    write_results(args.out, "peers", data)


if __name__ == "__main__":
    main()
