"""History stays flat: a 200-step run carries only new messages and continues as new."""

from __future__ import annotations

from spine.client.runs import start_run, wait_result
from tests.helpers import call, policy_file, scripted_request, turn

STEPS = 200


async def history_bytes_per_step(client, workflow_id: str) -> tuple[dict[int, int], int]:
    """Bytes of history events per step, over every run of the continue-as-new chain."""
    per_step: dict[int, int] = {}
    runs = [w async for w in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
    step = 0
    for run in sorted(runs, key=lambda w: w.start_time):
        handle = client.get_workflow_handle(workflow_id, run_id=run.run_id)
        async for event in handle.fetch_history_events():
            attrs = event.activity_task_scheduled_event_attributes
            if attrs.activity_type.name == "spine.model_call":
                step += 1
            per_step[step] = per_step.get(step, 0) + event.ByteSize()
    return per_step, len(runs)


async def test_history_bytes_per_step_do_not_grow(client, make_worker, task_queue, tmp_path):
    """Step 190-200 costs no more history bytes than step 10-20, across continue-as-new."""
    script = [
        turn(call("lookup_order", order_id=f"o-{1100 + i % 50}"), tokens=(1000 + 50 * i, 40))
        for i in range(STEPS - 1)
    ]
    script.append(turn(text="Looked at every order."))
    policy = policy_file(
        tmp_path,
        runtime={"continue_as_new_after_events": 1500},
        agent={"max_steps": STEPS + 5, "max_usd": 100.0},
    )
    async with make_worker(policy_path=policy):
        handle = await start_run(client, scripted_request(script), task_queue=task_queue)
        result = await wait_result(handle)
    assert result.status == "completed", result.reason
    assert result.steps == STEPS
    per_step, runs = await history_bytes_per_step(client, handle.id)
    assert runs >= 2, "the run should have continued as new at least once"
    early = sum(per_step[s] for s in range(10, 20)) / 10
    late = sum(per_step[s] for s in range(190, 200)) / 10
    print(f"history bytes/step: step 10-20 {early:.0f}, step 190-200 {late:.0f}, runs {runs}")
    assert late <= early * 1.15, (early, late)
    assert sum(per_step.values()) < 2_000_000
