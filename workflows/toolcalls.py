"""Tool calls, workflow side: check what the model proposed, then run it durably.

:meth:`ToolCalls.check` refuses a call the allowlist does not grant or whose arguments fail the
tool's JSON Schema, before anything is scheduled. :meth:`ToolCalls.run` runs the tool as its own
activity (``tool.<name>``; a local activity for fast read-only tools; on a rate-limited task
queue for tools in a fleet-wide rate-limit group), tries the tool's fallback when it keeps
failing, and parks the run for an operator when both do. :meth:`ToolCalls.execute` is the one
place a tool activity is scheduled; the saga's compensations go through it too.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, Literal

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    import jsonschema

    from spine.activities.errors import MODEL_CORRECTABLE, TERMINAL, failure_text
    from spine.contract import SideEffect, rate_limited_queue, tool_activity
    from spine.guardrails.allowlist import Allowlist
    from spine.guardrails.hooks import Record
    from spine.guardrails.parking import Parking, Skipped
    from spine.observability import live
    from spine.observability.metrics import record_policy_refusal
    from spine.payloads import (
        CompensationInput,
        ToolCall,
        ToolCallInput,
        ToolCallResult,
        ToolDescriptor,
        digest,
    )
    from spine.workflows.state import (
        RunState,
        StopRun,
        apply_failed_call,
        apply_refusal,
        apply_retries,
        apply_tool_result,
    )

from spine.workflows.subagents import SubAgents

#: Tools heartbeat; one whose timeout is longer than this gets this heartbeat timeout, so a call
#: in flight on a dead worker is retried after seconds, not after its start-to-close timeout.
TOOL_HEARTBEAT_TIMEOUT = timedelta(seconds=5)

Purpose = Literal["call", "fallback", "compensation"]


class ToolCalls:
    """Validated, durable tool calls for one run."""

    def __init__(
        self,
        state: RunState,
        allowlist: Allowlist,
        parking: Parking,
        *,
        record: Record,
        agent: str,
        account: str,
        user: str,
    ) -> None:
        self.state = state
        self.spec = state.agent
        self.allowlist = allowlist
        self.parking = parking
        self._record = record
        self._agent = agent
        self._account = account
        self._user = user
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        self._late: dict[str, ToolCallResult] = {}
        self._caps: dict[str, int] = {}
        self.last_tool: str | None = None
        self.slots = asyncio.Semaphore(max(1, self.spec.max_parallel_tool_calls))
        """Tool activities of one turn running at once (the policy's
        ``max_parallel_tool_calls``); a call waiting for a person holds none."""
        self.sub_agents: SubAgents | None = None
        """Runs sub-agent tools as child workflows (set by the run once it has resolved)."""

    def check(self, call: ToolCall) -> tuple[ToolDescriptor | None, str]:
        """The tool to run, or None and the error text for the model."""
        tool, problem = self.allowlist.check(call)
        if tool is None:
            return None, problem
        if call.args is None:
            return None, (
                f"error: arguments for {call.name!r} are not a JSON object: "
                f"{(call.raw_args or '')[:200]!r}"
            )
        errors = sorted(self._validator(tool).iter_errors(call.args), key=lambda e: list(e.path))
        if errors:
            detail = "; ".join(
                f"{'.'.join(str(p) for p in e.path) or '(arguments)'}: {e.message}"
                for e in errors[:5]
            )
            return None, f"error: invalid arguments for {call.name!r}: {detail}"
        return tool, ""

    def refuse(self, call: ToolCall, text: str, *, outcome: str = "refused") -> None:
        """Tell the model its call was refused (or `outcome` ``failed``: it failed in a way the
        model can correct); too many refusals end the run.

        Raises:
            StopRun: the run has used up its allowance of invalid calls.
        """
        known = {t.name: t for t in self.spec.tools}.get(call.name)
        risky = bool(known and known.side_effects)
        apply_refusal(self.state, call, text, outcome=outcome, side_effects=risky)
        workflow.logger.info(
            "refused tool call %s at step %d: %s", call.name, self.state.step, text
        )
        self._record("policy_decision", "spine", decision="refused", tool=call.name, reason=text)
        record_policy_refusal(self._agent, call.name, text.split(":", 1)[0])
        limit = self.spec.max_invalid_tool_calls
        if self.state.invalid_calls > limit:
            raise StopRun(
                "failed",
                f"too many invalid tool calls ({self.state.invalid_calls}, limit {limit}); "
                f"last: {text}",
            )

    def _validator(self, tool: ToolDescriptor) -> jsonschema.protocols.Validator:
        key = f"{tool.name}@{tool.version}"
        if key not in self._validators:
            self._validators[key] = jsonschema.Draft202012Validator(tool.input_schema)
        return self._validators[key]

    async def run(
        self, tool: ToolDescriptor, args: dict[str, object], call_id: str, key: str
    ) -> tuple[ToolCallResult, ToolDescriptor, str]:
        """Run a tool, then its fallback; park when both keep failing.

        Returns the result, the tool that produced it and the idempotency key it used.

        Raises:
            ApplicationError: a failure the model should hear about (its type says which).
            Skipped: an operator skipped the call.
            StopRun: the run must end.
        """
        self.last_tool = tool.name
        if tool.sub_agent is not None:
            if self.sub_agents is None:
                raise ApplicationError(f"{tool.name}: this run cannot start sub-agents")
            return await self.sub_agents.run(tool, args, call_id, key)
        by_name = {t.name: t for t in self.spec.tools}
        fallback = by_name.get(tool.fallback or "")
        candidates = [tool] + ([fallback] if fallback else [])
        tried_before = False
        while True:
            failures = []
            for candidate in candidates:
                used_key = key if candidate is tool else f"{key}/{candidate.name}"
                purpose: Purpose = "call" if candidate is tool else "fallback"
                try:
                    async with self.slots:
                        result = await self.execute(
                            candidate, args, call_id, used_key, purpose, tried_before=tried_before
                        )
                except (ActivityError, ApplicationError) as err:  # local tools: the latter
                    kind, message = failure_text(err)
                    self.parking.failed(err, cap=self._caps.pop(used_key, None))
                    if kind in MODEL_CORRECTABLE:
                        self._audit(tool, args, key, "error", f"{kind}: {message}")
                        raise ApplicationError(message, type=kind) from err
                    if kind in TERMINAL:
                        apply_failed_call(
                            self.state,
                            tool.name,
                            "failed",
                            f"{candidate.name}: {kind}: {message}",
                            side_effects=tool.side_effects,
                        )
                        raise StopRun(
                            "failed",
                            f"tool {candidate.name} at step {self.state.step} failed: "
                            f"{kind}: {message}",
                        ) from err
                    failures.append(f"{candidate.name}: {kind}: {message}")
                    continue
                except asyncio.CancelledError:
                    late = self._late.pop(used_key, None)
                    if late is not None and candidate.side_effects:
                        # The side effect finished while the run was being cancelled.
                        call = ToolCall(id=call_id, name=candidate.name, args=args)
                        apply_tool_result(
                            self.state,
                            call,
                            candidate,
                            args,
                            late.output,
                            used_key,
                            late.untrusted_filter,
                        )
                    raise
                self._caps.pop(used_key, None)
                apply_retries(self.state, result.attempt - 1)
                self._audit(
                    candidate,
                    args,
                    used_key,
                    "ok",
                    None,
                    attempt=result.attempt,
                    reconciled=result.reconciled,
                )
                if result.reconciled:
                    self.state.path.append(
                        f"step {self.state.step}: {candidate.name} had already happened "
                        f"(found by {candidate.reconcile}); recorded, not called again"
                    )
                if candidate is not tool:
                    self.state.path.append(
                        f"step {self.state.step}: tool {tool.name} failed, used fallback "
                        f"{candidate.name}"
                    )
                return result, candidate, used_key
            command = await self.parking.park(
                f"tool {tool.name} at step {self.state.step} exhausted its retries: "
                + "; ".join(failures),
                skippable=True,
            )
            if command.action == "skip":
                self._audit(tool, args, key, "skipped", f"skipped by {command.by}")
                raise Skipped(command)
            tried_before = True  # the operator's retry: the effect may have happened already

    def _audit(
        self,
        tool: ToolDescriptor,
        args: dict[str, object],
        key: str,
        outcome: str,
        error: str | None,
        *,
        attempt: int | None = None,
        reconciled: bool = False,
    ) -> None:
        extra = {"reconciled": True} if reconciled else {}
        self._record(
            "tool_call",
            self._user,
            tool=tool.name,
            version=tool.version,
            args_digest=digest(args),
            outcome=outcome,
            error=error,
            idempotency_key=key if tool.side_effects else None,
            attempt=attempt,
            **extra,
        )

    async def undo(self, tool: ToolDescriptor, effect: SideEffect, key: str) -> ToolCallResult:
        """Run the compensation `tool` for `effect` (the saga's undo)."""
        args = CompensationInput(tool=effect.tool, args=effect.args, output=effect.output)
        return await self.execute(
            tool, args.model_dump(mode="json"), effect.call_id, key, "compensation"
        )

    async def execute(
        self,
        tool: ToolDescriptor,
        args: dict[str, object],
        call_id: str,
        key: str | None,
        purpose: Purpose = "call",
        *,
        tried_before: bool = False,
    ) -> ToolCallResult:
        """Schedule one tool activity (its retries are Temporal's) and wait for it."""
        shown = args.get(tool.summary_arg) if tool.summary_arg else None
        call = ToolCallInput(
            run_id=workflow.info().workflow_id,
            step=self.state.step,
            call_id=call_id,
            tool=tool.name,
            version=tool.version,
            args=args,
            idempotency_key=key if tool.side_effects else None,
            account=self._account,
            user=self._user,
            purpose=purpose,
            tried_before=tried_before,
        )
        options: dict[str, Any] = {
            "result_type": ToolCallResult,
            "start_to_close_timeout": timedelta(seconds=tool.start_to_close_s),
            "retry_policy": self.parking.retry_policy(
                tool.max_attempts, tool.initial_interval_s, tool.max_interval_s
            ),
            "summary": f"{tool.name}({shown})" if shown is not None else tool.name,
        }
        if key is not None:  # calls of one turn run at once: each keeps its own attempt cap
            self._caps[key] = options["retry_policy"].maximum_attempts
        live.publish(
            f"tool:{self.state.step}:{call_id}:{purpose}:{tool.name}:{int(tried_before)}",
            "tool_started",
            {"step": self.state.step, "tool": tool.name, "call_id": call_id, "purpose": purpose},
        )
        if tool.local:
            # Fast, read-only tools run as local activities: no round trip through the server.
            return await workflow.execute_local_activity(tool_activity(tool.name), call, **options)
        if tool.start_to_close_s > TOOL_HEARTBEAT_TIMEOUT.total_seconds():
            options["heartbeat_timeout"] = TOOL_HEARTBEAT_TIMEOUT
        group = tool.rate_limit_group
        handle = workflow.start_activity(
            tool_activity(tool.name),
            call,
            task_queue=rate_limited_queue(workflow.info().task_queue, group)
            if group and group in self.spec.rate_limits
            else None,
            **options,
        )
        if not tool.side_effects or key is None:
            return await handle
        try:
            # A side effect in flight is not abandoned on cancellation: compensation must know.
            return await asyncio.shield(handle)
        except asyncio.CancelledError:
            try:
                self._late[key] = await handle
            except ActivityError:
                pass
            raise
