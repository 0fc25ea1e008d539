"""History bytes per step over very long Spine runs, across continue-as-new.

One run of N steps (each a scripted model turn plus a ``lookup_order`` call against the demo
service), then every run of its continue-as-new chain is read back: events and bytes per run
against Temporal's warning limits (10,240 events, 10 MB per run), and bytes per step from the
first steps to the last, which should stay flat.

The scripted model's script travels in the workflow input (about 130 bytes a turn, shrinking at
each continue-as-new); it is reported apart, since a real model has no script.

    python -m bench.long_runs [--quick] [--steps N] [--out bench/results/long_runs.json]

Quick: 1,000 steps. Full: 10,000 steps. Policy: the shipped ``continue_as_new_after_events``
(override with ``--can-after``).

``--provider openai`` (or ``anthropic``) runs the same conversation through that provider's real
SDK against the local wire-format server (tests/fakes/llm_server.py) instead of the scripted
model: every model call then loads the whole transcript from the store and sends it, the path a
real model pays, so the milliseconds per step early and late show what a long transcript costs.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

from temporalio.api.enums.v1 import EventType

from bench.common import bench_policy, bench_stack, parser, spine_request, write_results
from spine.activities.providers import anthropic_provider_from_env, openai_provider_from_env
from spine.client.runs import start_run
from spine.contract import ACTIVITY_MODEL_CALL, SA_STEPS, ModelChoice, ScriptToolCall, ScriptTurn
from spine.guardrails.policy import DEFAULT_POLICY_PATH
from spine.guardrails.secrets import VaultSecrets
from spine.plugin import SpineConfig, build_worker
from tests.fakes.llm_server import FakeLLMServer, FakeToolCall

WARN_EVENTS = 10_240
WARN_BYTES = 10 * 1024 * 1024
BUCKETS = 10
STEPS = SA_STEPS


def script(steps: int) -> list[ScriptTurn]:
    turns = [
        ScriptTurn(
            tool_calls=[
                ScriptToolCall(name="lookup_order", args={"order_id": f"o-{1001 + i % 500}"})
            ]
        )
        for i in range(steps - 1)
    ]
    return [*turns, ScriptTurn(text=f"Looked at {steps - 1} orders.")]


async def chain(client, workflow_id: str) -> list[dict[str, object]]:
    """Every run of the chain, oldest first: events, bytes, input bytes, bytes per model step."""
    runs = [w async for w in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
    out = []
    for run in sorted(runs, key=lambda w: w.start_time):
        handle = client.get_workflow_handle(workflow_id, run_id=run.run_id)
        events = size = input_bytes = 0
        steps: list[int] = []
        async for event in handle.fetch_history_events():
            events += 1
            n = event.ByteSize()
            size += n
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
                input_bytes = n
                continue
            attrs = event.activity_task_scheduled_event_attributes
            if (
                event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                and attrs.activity_type.name == ACTIVITY_MODEL_CALL
            ):
                steps.append(0)
            if steps:
                steps[-1] += n
        out.append(
            {"events": events, "bytes": size, "input_bytes": input_bytes, "step_bytes": steps}
        )
    return out


async def run(steps: int, can_after: int | None, provider: str = "scripted") -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="spine-bench-long-"))
    shipped = tomllib.loads(DEFAULT_POLICY_PATH.read_text())["runtime"][
        "continue_as_new_after_events"
    ]
    runtime = {"continue_as_new_after_events": can_after} if can_after else {}
    policy = bench_policy(
        tmp, runtime=runtime, refund_agent={"max_steps": steps + 5, "max_usd": 1_000_000.0}
    )
    async with bench_stack(tmp) as stack:
        client = stack.server.client
        queue = f"bench-long-{uuid.uuid4().hex[:6]}"
        llm = FakeLLMServer().start()
        config = SpineConfig(
            task_queue=queue,
            state_dir=tmp / "state",
            policy_path=policy,
            settings={"SPINE_DEMO_URL": stack.service.url},
            secrets=VaultSecrets(stack.vault.url, token=stack.vault.token),
            providers={
                "openai": openai_provider_from_env(llm.env()),
                "anthropic": anthropic_provider_from_env(llm.env()),
            },
        )
        request = spine_request(script(steps), max_steps=steps + 5)
        if provider != "scripted":
            enqueue = llm.enqueue_openai if provider == "openai" else llm.enqueue_anthropic
            for turn in script(steps):
                if turn.tool_calls:
                    call = turn.tool_calls[0]
                    enqueue(tool_calls=[FakeToolCall(call.name, dict(call.args or {}))])
                else:
                    enqueue(turn.text)
            name = "gpt-4.1" if provider == "openai" else "claude-sonnet-4-6"
            request.model = ModelChoice(provider=provider, name=name)  # type: ignore[arg-type]
        step_times: list[float] = []
        async with build_worker(client, config=config):
            began = time.monotonic()
            handle = await start_run(
                client,
                request,
                workflow_id=f"long-{steps}-{uuid.uuid4().hex[:6]}",
                task_queue=queue,
            )
            waiting = asyncio.ensure_future(handle.result())
            last = (began, 0)
            while not waiting.done():
                await asyncio.wait([waiting], timeout=30)
                if not waiting.done():
                    described = await client.get_workflow_handle(handle.id).describe()
                    step = described.typed_search_attributes.get(STEPS) or 0
                    now = time.monotonic()
                    if step > last[1]:
                        step_times.append((now - last[0]) / (step - last[1]) * 1000)
                    last = (now, step)
                    print(f"  ... {now - began:.0f}s: step {step}", flush=True)
            result = waiting.result()
            wall = time.monotonic() - began
        llm.stop()
        runs = await chain(client, handle.id)

    per_step = [b for r in runs for b in r["step_bytes"]]
    n = len(per_step)
    size = max(n // BUCKETS, 1)
    buckets = [
        {
            "steps": f"{i * size + 1}-{min((i + 1) * size, n)}",
            "bytes_per_step": statistics.mean(per_step[i * size : (i + 1) * size]),
        }
        for i in range(min(BUCKETS, n))
    ]
    early = statistics.mean(per_step[10:110]) if n > 110 else statistics.mean(per_step)
    late = statistics.mean(per_step[-100:])
    return {
        "setup": {
            "steps": steps,
            "continue_as_new_after_events": can_after or shipped,
            "tool": "lookup_order (HTTP to the demo service, Vault secret)",
            "provider": provider,
        },
        "result": {"status": result.status, "steps": result.steps, "reason": result.reason},
        "wall_s": wall,
        "ms_per_step": wall / steps * 1000,
        "ms_per_step_first_30s": step_times[0] if step_times else None,
        "ms_per_step_last_30s": step_times[-1] if step_times else None,
        "runs_in_chain": len(runs),
        "max_events_per_run": max(r["events"] for r in runs),
        "max_bytes_per_run": max(r["bytes"] for r in runs),
        "warn_limits": {"events": WARN_EVENTS, "bytes": WARN_BYTES},
        "under_warn_limits": all(
            r["events"] < WARN_EVENTS and r["bytes"] < WARN_BYTES for r in runs
        ),
        "input_bytes_first_run": runs[0]["input_bytes"],
        "bytes_per_step_early": early,
        "bytes_per_step_late": late,
        "late_over_early": late / early,
        "total_bytes": sum(r["bytes"] for r in runs),
        "buckets": buckets,
        "per_run": [{k: v for k, v in r.items() if k != "step_bytes"} for r in runs],
        "per_step_bytes": per_step,
    }


def report(data: dict[str, object]) -> None:
    print()
    print(
        f"{data['setup']['steps']} steps -> {data['result']['status']} in {data['wall_s']:.0f}s "
        f"({data['ms_per_step']:.0f} ms/step), {data['runs_in_chain']} runs in the chain"
    )
    for r in data["per_run"]:  # type: ignore[union-attr]
        print(
            f"  run: {r['events']:>6} events, {r['bytes'] / 2**20:5.2f} MiB "
            f"(input {r['input_bytes'] / 1024:.0f} KiB)"
        )
    print(
        f"max per run: {data['max_events_per_run']} events (warn {WARN_EVENTS}), "
        f"{data['max_bytes_per_run'] / 2**20:.2f} MiB (warn 10 MiB); "
        f"under warning limits: {data['under_warn_limits']}"
    )
    print(
        f"bytes/step: early {data['bytes_per_step_early']:.0f}, late "
        f"{data['bytes_per_step_late']:.0f}, ratio late/early {data['late_over_early']:.2f}"
    )
    for b in data["buckets"]:  # type: ignore[union-attr]
        print(f"  steps {b['steps']:>13}: {b['bytes_per_step']:.0f} B/step")
    if data["ms_per_step_first_30s"] is not None:
        print(
            f"ms/step ({data['setup']['provider']}): first 30 s "
            f"{data['ms_per_step_first_30s']:.0f}, last 30 s {data['ms_per_step_last_30s']:.0f}"
        )


def main() -> None:
    p = parser(__doc__, "1,000 steps")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps")
    p.add_argument("--can-after", type=int, default=None, help="continue_as_new_after_events")
    p.add_argument(
        "--provider",
        choices=["scripted", "openai", "anthropic"],
        default="scripted",
        help="the model: scripted, or a real SDK against the local wire-format server",
    )
    args = p.parse_args()
    steps = args.steps or (1_000 if args.quick else 10_000)
    data = asyncio.run(run(steps, args.can_after, args.provider))
    report(data)
    write_results(args.out, "long_runs", data)


if __name__ == "__main__":
    main()
