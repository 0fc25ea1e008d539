"""Budgets, workflow side: what a model turn costs, and what may be spent before the next one.

:func:`price` is Spine's only price formula (the workflow, forks and telemetry all use it).
:class:`BudgetGate` holds a run to its limits: the run's own (`max_usd`, `max_steps`, tightened
by the request's `limits`) and the account's daily and monthly budgets, which the account's
ledger workflow enforces for every run at once (:mod:`spine.workflows.ledger`). Before each model
call the gate

1. switches to the policy's cheaper model once past ``soft_fraction`` of a budget;
2. asks a person to approve going on once past ``approval_fraction`` (below 100%);
3. stops the run when the next call could take it over its own limit;
4. reserves on the ledger in blocks sized to the account's headroom (:meth:`BudgetGate.block_size`:
   the calls the run may still make, while that is a small share of what the account has left;
   one ledger round trip per block), settling what the previous block really cost; no
   reservation, no model call.

After each call it charges the turn and stops the run if it went over. Waiting (for a person or
for the ledger) is done through the functions the caller passes in, so the gate is tested without
a server. Deterministic and free of I/O: a sandbox passthrough module.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping

from spine.contract import Limits, TokenUsage
from spine.payloads import AgentSpec, LedgerAnswer, LedgerOp, ModelCallResult, digest
from spine.workflows.state import RunState, StopRun

#: Model calls one account-ledger reservation covers at least (when the run has that many left).
BLOCK_CALLS = 4
#: Model calls one reservation covers at most.
BLOCK_MAX_CALLS = 64
#: The share of the account's remaining budget one reservation may take: 50 runs' blocks at once
#: before blocks shrink towards one call, so a budget is spread over many runs near its limit.
HEADROOM_SHARE = 0.02
#: The smallest prompt (tokens) a reservation assumes before the run has seen one.
MIN_PROMPT_TOKENS = 1000

Models = list[tuple[str, str]]
"""(provider, model) pairs: the model to try first, then its fallbacks."""
Record = Callable[..., None]
"""Queues an audit entry: ``record(kind, actor, **data)``."""
AskToContinue = Callable[[dict[str, object], str, list[str]], Awaitable[None]]
"""Waits for a person to approve going on: ``ask(args, reason, approver_roles)``; raises
:class:`StopRun` when they reject."""
Ledger = Callable[[LedgerOp], Awaitable[LedgerAnswer]]
"""One settle-and-reserve on the account's ledger; fails closed (parks) rather than return."""


def price(
    prices: Mapping[str, tuple[float, float]], input_tokens: int, output_tokens: int, *models: str
) -> float | None:
    """USD for the tokens at the first of `models` with a price (USD per 1M tokens, in/out).

    Providers answer with dated names (``gpt-4.1-2025-04-14``): callers list the answering
    model first, then the one asked for. None when none of them has a price.
    """
    for model in models:
        if model in prices:
            price_in, price_out = prices[model]
            return (input_tokens * price_in + output_tokens * price_out) / 1_000_000
    return None


def exhausted(reason: str, spec: AgentSpec) -> StopRun:
    """The run ends `failed` with reason ``budget_exhausted: ...``, compensating per policy."""
    return StopRun(
        "failed",
        f"budget_exhausted: {reason}",
        keep_status=True,
        compensate=spec.budget.compensate_on_exhausted,
    )


class BudgetGate:
    """A run's budgets: limits, degrading, asking to go on, ledger reservations, charging."""

    def __init__(
        self,
        state: RunState,
        limits: Limits | None,
        *,
        record: Record,
        run_id: str,
    ) -> None:
        self.state = state
        self.spec = state.agent
        self.rules = state.agent.budget
        self._record = record
        self.run_id = run_id
        # What the model is shown of the tools, an upper bound on its part of every prompt.
        self._tools_bytes = sum(
            len(json.dumps(t.input_schema)) + len(t.description) + len(t.name)
            for t in self.spec.tools
        )
        self.max_steps = self.spec.max_steps
        self.max_usd = self.spec.max_usd
        if limits and limits.max_steps is not None:
            self.max_steps = min(self.max_steps, limits.max_steps)
        if limits and limits.max_usd is not None:
            self.max_usd = (
                limits.max_usd if self.max_usd is None else min(self.max_usd, limits.max_usd)
            )

    @property
    def shared(self) -> bool:
        """Whether the run's account has a daily or monthly budget (kept by its ledger)."""
        return self.rules.daily_usd is not None or self.rules.monthly_usd is not None

    def used_fraction(self) -> float:
        """The largest share of a budget spent: the run's own, or the account's committed spend
        as last seen (reservations, sized for the calls ahead, are not spend)."""
        own = self.state.usage.usd / self.max_usd if self.max_usd else 0.0
        return max(own, self.state.budget.ledger_spent_fraction)

    # ------------------------------------------------------------------------ before a call

    async def before_call(self, models: Models, *, ask: AskToContinue, ledger: Ledger) -> Models:
        """Degrade, ask to go on, or stop; reserve on the ledger. Returns the models to try.

        Raises:
            StopRun: the next call could exceed a budget, or a person declined to go on.
        """
        models = self.degrade(models)
        fraction = self.used_fraction()
        # At 100% there is nothing left to approve: the ledger or the run limit stops the run.
        if (
            self.rules.approval_fraction <= fraction < 1.0
            and not self.state.budget.approved_to_continue
        ):
            await ask(
                {"used_fraction": round(fraction, 4), "run_usd": self.state.usage.usd},
                f"{fraction:.0%} of the budget is used; approve to continue",
                list(self.rules.approver_roles),
            )
            self.state.budget.approved_to_continue = True
        estimate = self.estimate(models)
        if self.max_usd is not None and self.state.usage.usd + estimate > self.max_usd:
            raise exhausted(
                f"the run has spent {self.state.usage.usd:.4f} USD of its {self.max_usd:.4f} "
                f"limit and the next call may cost up to {estimate:.4f}",
                self.spec,
            )
        if self.shared:
            await self._reserve(estimate, ledger)
        return models

    def degrade(self, models: Models) -> Models:
        """Past the soft threshold, the run's model becomes the policy's cheaper one, for good."""
        budget = self.state.budget
        fraction = self.used_fraction()
        if fraction >= self.rules.soft_fraction and budget.degraded_to is None:
            cheaper = self.rules.cheaper_models.get(models[0][1])
            if cheaper and cheaper in self.spec.prices:
                budget.degraded_to = cheaper
                self.state.path.append(
                    f"step {self.state.step}: {fraction:.0%} of budget used, switched "
                    f"{models[0][1]} -> {cheaper}"
                )
                self._record(
                    "budget",
                    "spine",
                    decision="degraded",
                    reason=self.state.path[-1],
                    used_fraction=round(fraction, 4),
                )
        if budget.degraded_to is not None:
            return [(models[0][0], budget.degraded_to), *models[1:]]
        return models

    def prompt_bound(self) -> int:
        """The most input tokens the next call can take: no tokenizer makes more tokens than
        the prompt has bytes (the transcript and the tool schemas, both counted as they are
        sent), and never fewer than :data:`MIN_PROMPT_TOKENS` are assumed."""
        return max(self.state.context_bytes + self._tools_bytes, MIN_PROMPT_TOKENS)

    def estimate(self, models: Models) -> float:
        """The most the next call may cost: :meth:`prompt_bound` in, a full answer out."""
        prompt = self.prompt_bound()
        return max(
            (prompt * self.spec.prices[m][0] + self.spec.max_tokens * self.spec.prices[m][1])
            / 1_000_000
            for _, m in models
        )

    async def _reserve(self, estimate: float, ledger: Ledger) -> None:
        budget = self.state.budget
        if budget.block_id is not None and budget.block_spent_usd + estimate <= budget.block_usd:
            return  # the block reserved earlier still covers this call
        self._close_block()
        # Reserve for the calls ahead at once; near the limit, fall back to just this call.
        reservation = f"{self.run_id}/{self.state.step}"
        answer: LedgerAnswer | None = None
        for size in (self.block_size(estimate), estimate):
            # The ledger may cut the block to its share of what is left now, down to the floor
            # (a few calls); when not even that fits, the next try is just this call.
            least = min(size, self.block_floor(estimate))
            answer = await self._apply(ledger, reservation, size, least=least)
            size = answer.granted_usd if answer.granted and answer.granted_usd else size
            self._record(
                "budget",
                "spine",
                decision="reserved" if answer.granted else "denied",
                spent_usd=round(answer.day_committed_usd, 8),
                limit_usd=self.rules.daily_usd
                if self.rules.daily_usd is not None
                else self.rules.monthly_usd,
                reservation_id=reservation,
                amount_usd=round(size, 8),
                used_fraction=round(answer.used_fraction, 4),
                reason=answer.reason,
            )
            if answer.granted:
                budget.ledger_fraction = answer.used_fraction
                budget.ledger_spent_fraction = answer.spent_fraction
                budget.block_id, budget.block_usd, budget.block_spent_usd = reservation, size, 0.0
                return
        assert answer is not None
        raise exhausted(answer.reason, self.spec)

    def block_size(self, estimate: float) -> float:
        """USD one reservation covers: the model calls the run may still make (at least
        :data:`BLOCK_CALLS`, at most :data:`BLOCK_MAX_CALLS`), cut to :data:`HEADROOM_SHARE` of
        what the account has left as the ledger last said, and to what the run may still spend.

        A quiet account's run reserves once for its whole length; near the account's limit the
        blocks shrink, and a denied block falls back to one call (see `_reserve`).
        """
        calls = float(min(self._calls_left(), BLOCK_MAX_CALLS))
        limits = [x for x in (self.rules.daily_usd, self.rules.monthly_usd) if x is not None]
        if limits and estimate > 0:
            headroom = min(limits) * max(1.0 - self.state.budget.ledger_fraction, 0.0)
            calls = min(calls, headroom * HEADROOM_SHARE / estimate)
        size = max(estimate * calls, self.block_floor(estimate))
        if self.max_usd is not None:
            size = min(size, max(self.max_usd - self.state.usage.usd, estimate))
        return max(size, estimate)

    def block_floor(self, estimate: float) -> float:
        """The smallest block worth reserving: :data:`BLOCK_CALLS` calls (or the calls left)."""
        return estimate * min(BLOCK_CALLS, self._calls_left())

    def _calls_left(self) -> int:
        """Model calls this run may still make (this one included)."""
        return max(self.max_steps - self.state.step + 1, 1)

    def _close_block(self) -> None:
        """What the open block really cost is committed with the next ledger call."""
        budget = self.state.budget
        if budget.block_id is not None:
            budget.to_commit[budget.block_id] = round(budget.block_spent_usd, 8)
            budget.block_id = None

    def ledger_op(
        self, reserve_id: str | None, amount: float, least: float | None = None
    ) -> LedgerOp:
        """Settle what is due, and reserve `amount` as `reserve_id` (None: settle only), or as
        little as `least` when the ledger sees less headroom."""
        budget = self.state.budget
        return LedgerOp(
            run_id=self.run_id,
            commit=dict(budget.to_commit),
            release=list(budget.to_release),
            reserve_id=reserve_id,
            reserve_usd=round(amount, 8),
            reserve_min_usd=round(least, 8) if least is not None and least < amount else None,
            daily_limit_usd=self.rules.daily_usd,
            monthly_limit_usd=self.rules.monthly_usd,
        )

    async def _apply(
        self, ledger: Ledger, reserve_id: str | None, amount: float, least: float | None = None
    ) -> LedgerAnswer:
        answer = await ledger(self.ledger_op(reserve_id, amount, least))
        self.state.budget.to_commit.clear()
        self.state.budget.to_release.clear()
        return answer

    def may_call_model(self) -> str | None:
        """The backstop's question: is the next model call covered by a reservation?"""
        if self.shared and self.state.budget.block_id is None:
            return (
                f"no budget reservation covers a model call of account-budgeted run at step "
                f"{self.state.step}"
            )
        return None

    # ------------------------------------------------------------------------- after a call

    def bounded(self, result: ModelCallResult) -> ModelCallResult:
        """The result with usage a model could have reported for this call: negative numbers
        are impossible (the contract refuses them), and more than the prompt could hold or
        than `max_tokens` is clamped and noted. Usage that is missing is charged at the bound:
        a call is never free because a provider said nothing."""
        usage = result.usage
        bound_in, bound_out = self.prompt_bound(), self.spec.max_tokens
        missing = usage.input_tokens == 0 and usage.output_tokens == 0
        if not missing and usage.input_tokens <= bound_in and usage.output_tokens <= bound_out:
            return result
        clamped = TokenUsage(
            input_tokens=bound_in if missing else min(usage.input_tokens, bound_in),
            output_tokens=bound_out if missing else min(usage.output_tokens, bound_out),
        )
        self._record(
            "budget",
            "spine",
            decision="usage_missing" if missing else "usage_clamped",
            reported={"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens},
            charged={"input_tokens": clamped.input_tokens, "output_tokens": clamped.output_tokens},
        )
        return result.model_copy(update={"usage": clamped})

    def cost(self, result: ModelCallResult, requested_model: str) -> float:
        """What the turn cost, priced as the model answered or, failing that, as asked."""
        usd = price(
            self.spec.prices,
            result.usage.input_tokens,
            result.usage.output_tokens,
            result.model,
            requested_model,
        )
        return usd or 0.0

    def charged(self, result: ModelCallResult, usd: float) -> None:
        """Record the turn's cost (already applied to the state); stop if over the run limit."""
        self._record(
            "model_turn",
            result.model,
            model=result.model,
            provider=result.provider,
            input_tokens=result.usage.input_tokens,
            output_tokens=result.usage.output_tokens,
            usd=round(usd, 8),
            finish_reason=result.finish_reason,
            attempt=result.attempt,
            tool_calls=[{"name": c.name} for c in result.message.tool_calls],
            content_digest=digest(result.message.content or ""),
            price_table=self.spec.policy_version,
        )
        if self.max_usd is not None and self.state.usage.usd > self.max_usd:
            raise exhausted(
                f"run spent {self.state.usage.usd:.4f} USD, limit {self.max_usd:.4f}", self.spec
            )

    # -------------------------------------------------------------------------- at the end

    async def settle(self, ledger: Callable[[LedgerOp], Awaitable[LedgerAnswer | None]]) -> None:
        """Commit the open block and anything unsettled. A ledger that does not answer here
        (`ledger` returns None) is left: unsettled reservations expire after the ledger's TTL."""
        self._close_block()
        budget = self.state.budget
        if not (budget.to_commit or budget.to_release):
            return
        if await ledger(self.ledger_op(None, 0.0)) is not None:
            budget.to_commit.clear()
            budget.to_release.clear()
