"""A model turn's tool calls, run concurrently.

A model may propose several tool calls in one turn. :func:`run_turn` starts one task per call
(each the loop's own per-call coroutine, ``AgentWorkflow.tool_call``: its allowlist and schema
check, its approval, its own activity and idempotency key ``<workflow id>/<step>/<index>``), so
approvals of one turn are pending together and the calls' activities run at once, at most the
agent's ``max_parallel_tool_calls`` at a time (:attr:`ToolCalls.slots
<spine.workflows.toolcalls.ToolCalls.slots>`; a call waiting for a person holds no slot).

Outcomes land in the run state as each call ends, so the side effects keep *completion* order
(the saga undoes them newest first); when every call has ended, :func:`apply_turn_order` puts the
results back in the order the model asked for them.

When one call ends the run (a rejection, a terminal failure, too many invalid calls, an operator's
abort), the turn's other calls are cancelled: a call waiting for approval withdraws its request,
a read-only activity is cancelled, a side effect already in flight is not abandoned but waited for
and recorded (:meth:`ToolCalls.execute <spine.workflows.toolcalls.ToolCalls.execute>`), and a
sub-agent child is asked to cancel and waited for while it undoes its own effects. Then the run
finishes and its saga undoes everything done, this turn's calls first, in reverse completion
order. A hand-off (a sub-agent's answer that ends the run as completed) lets the turn's other
calls finish first.

Calls that count toward one cumulative approval total (refunds of one order, say) run one after
another, in the model's order, so each is checked against what the ones before it added.

Deterministic: tasks are created in the model's order and resumed in the order their results
reach the workflow, which history fixes; workflow code that ran calls one by one before this
module replays the same way (``workflow.patched``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from spine.payloads import ToolCall
    from spine.workflows.state import RunState, StopRun, apply_turn_order, cumulative_amounts

#: `workflow.patched` id guarding concurrent tool calls (runs recorded before ran them in turn).
PATCH_PARALLEL_TOOL_CALLS = "spine-parallel-tool-calls"

RunOne = Callable[[ToolCall, int], Awaitable[None]]
"""Run the call at position `index` of the turn to its end (the loop's ``tool_call``)."""


async def run_turn(state: RunState, calls: Sequence[ToolCall], run_one: RunOne) -> None:
    """Run a turn's calls: concurrently when the agent's policy allows more than one at once.

    Raises:
        StopRun: a call ended the run (the first to do so; the turn's other calls were cancelled
            and their effects recorded), or a hand-off completed it once every call ended.
    """
    parallel = len(calls) > 1 and state.agent.max_parallel_tool_calls > 1
    if not parallel or not workflow.patched(PATCH_PARALLEL_TOOL_CALLS):
        for index, call in enumerate(calls):
            await run_one(call, index)
        return
    stops: list[StopRun] = []
    tasks: list[asyncio.Task[None]] = []

    async def guarded(group: list[int]) -> None:
        try:
            for index in group:
                await run_one(calls[index], index)
        except StopRun as stop:
            stops.append(stop)
            if stop.status != "completed":  # a hand-off waits for its siblings
                for task in tasks:
                    if task is not asyncio.current_task() and not task.done():
                        task.cancel()

    tasks.extend(
        asyncio.create_task(guarded(group), name=f"tool calls {group}")
        for group in _groups(state, calls)
    )
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    ending = [s for s in stops if s.status != "completed"] or stops
    if ending:
        raise ending[0]
    for outcome in outcomes:
        # A sibling cancelled by a stop is expected; anything else is a bug or a workflow error.
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            raise outcome
    apply_turn_order(state, [call.id for call in calls])


def _groups(state: RunState, calls: Sequence[ToolCall]) -> list[list[int]]:
    """The turn's calls as groups that run at once; calls within a group run one after another.

    Calls that count toward the same cumulative approval total (the same tool, argument and
    ``per`` value, e.g. refunds of one order) share a group: each is checked against the total
    the ones before it added, so a turn cannot slip several amounts under a cumulative line at
    once. Every other call is a group of its own. Groups are in the order of their first call.
    """
    parent = list(range(len(calls)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for index, call in enumerate(calls):
        for key, _ in cumulative_amounts(state, call.name, call.args or {}):
            if key in owner:
                first, mine = root(owner[key]), root(index)
                parent[max(first, mine)] = min(first, mine)
            else:
                owner[key] = index
    groups: dict[int, list[int]] = {}
    for index in range(len(calls)):
        groups.setdefault(root(index), []).append(index)
    return list(groups.values())
