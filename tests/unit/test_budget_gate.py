"""BudgetGate, without a server: limits, degrading, asking to go on, reservations, charging."""

from __future__ import annotations

import pytest

from spine.contract import Limits, TokenUsage, Usage
from spine.guardrails.budget import BLOCK_CALLS, BudgetGate, price
from spine.payloads import ChatMessage, LedgerAnswer, LedgerOp, ModelCallResult
from spine.workflows.state import RunState, StopRun, apply_model_turn
from tests.unit.kit import FakeRun, spec

MODELS = [("scripted", "scripted")]


def turn(input_tokens: int, output_tokens: int = 100, model: str = "scripted") -> ModelCallResult:
    return ModelCallResult(
        message=ChatMessage(role="assistant", content="ok"),
        usage=TokenUsage(input_tokens=input_tokens, output_tokens=output_tokens),
        model=model,
        provider="scripted",
    )


class Ledger:
    """A ledger that grants reservations up to `limit` USD, and remembers every operation."""

    def __init__(self, limit: float = 100.0) -> None:
        self.limit = limit
        self.reserved = 0.0
        self.ops: list[LedgerOp] = []

    async def __call__(self, op: LedgerOp) -> LedgerAnswer:
        self.ops.append(op)
        granted = op.reserve_id is None or self.reserved + op.reserve_usd <= self.limit
        if granted and op.reserve_id is not None:
            self.reserved += op.reserve_usd
        return LedgerAnswer(
            granted=granted,
            reason="" if granted else "daily budget is used up",
            day="day:2026-11-29",
            month="mon:2026-11",
            day_committed_usd=0.0,
            day_reserved_usd=self.reserved,
            month_committed_usd=0.0,
            used_fraction=self.reserved / self.limit,
        )


def gate(state: RunState, run: FakeRun, limits: Limits | None = None) -> BudgetGate:
    return BudgetGate(state, limits, record=run.record, run_id="wf-1")


async def never_asked(args: dict[str, object], reason: str, roles: list[str]) -> None:
    raise AssertionError(f"asked to continue: {reason}")


def test_price_uses_the_answering_model_then_the_requested_one():
    """A dated model name the price table lacks is priced as the model that was asked for."""
    prices = {"gpt-4.1": (2.0, 8.0)}
    assert price(prices, 1000, 100, "gpt-4.1-2025-04-14", "gpt-4.1") == pytest.approx(0.0028)
    assert price(prices, 1000, 100, "unknown") is None


def test_limits_only_tighten_the_policy():
    """A request may lower max_usd and max_steps, never raise them."""
    run = FakeRun()
    state = RunState(spec=spec(max_usd=0.5, max_steps=20))
    tight = gate(state, run, Limits(max_usd=0.1, max_steps=5))
    assert (tight.max_usd, tight.max_steps) == (0.1, 5)
    loose = gate(state, run, Limits(max_usd=9.0, max_steps=99))
    assert (loose.max_usd, loose.max_steps) == (0.5, 20)


async def test_a_budget_degrades_then_asks_then_stops():
    """Past 80% the run takes the cheaper model, past 90% it asks a person, at 100% it stops."""
    run = FakeRun()
    state = RunState(spec=spec(account="none"), usage=Usage(usd=0.017))
    budget = gate(state, run, Limits(max_usd=0.02))
    asked: list[str] = []

    async def ask(args: dict[str, object], reason: str, roles: list[str]) -> None:
        asked.append(reason)
        assert roles == ["supervisor"]

    models = await budget.before_call(MODELS, ask=never_asked, ledger=Ledger())
    assert models == [("scripted", "scripted-cheap")]
    assert state.budget.degraded_to == "scripted-cheap"
    assert run.kinds() == ["budget:degraded"]

    state.usage = Usage(usd=0.0184)
    await budget.before_call(MODELS, ask=ask, ledger=Ledger())
    assert asked == ["92% of the budget is used; approve to continue"]
    await budget.before_call(MODELS, ask=ask, ledger=Ledger())  # asked once per run
    assert len(asked) == 1

    state.usage = Usage(usd=0.0199)
    with pytest.raises(StopRun) as stopped:
        await budget.before_call(MODELS, ask=ask, ledger=Ledger())
    assert stopped.value.status == "failed" and stopped.value.keep_status
    assert stopped.value.reason.startswith("budget_exhausted: the run has spent 0.0199 USD")


async def test_a_turn_that_goes_over_the_limit_stops_the_run():
    """Charging a turn past max_usd ends the run, and the turn is still recorded."""
    run = FakeRun()
    state = RunState(spec=spec(account="none"))
    budget = gate(state, run, Limits(max_usd=0.001))
    result = turn(input_tokens=2000)
    usd = budget.cost(result, "scripted")
    apply_model_turn(state, result, usd)
    with pytest.raises(StopRun, match="budget_exhausted: run spent 0.0024 USD, limit 0.0010"):
        budget.charged(result, usd)
    assert run.entries[-1][0] == "model_turn" and run.entries[-1][2]["usd"] == 0.0024


async def test_account_budget_reserves_in_blocks_and_settles_what_was_spent():
    """One ledger call covers several model calls; the next block commits what the last one cost."""
    run, ledger = FakeRun(), Ledger()
    state = RunState(spec=spec(account="acme"), step=1)
    budget = gate(state, run)
    assert budget.may_call_model() is not None  # no reservation yet: the backstop refuses
    block = budget.block_size(budget.estimate(MODELS))
    await budget.before_call(MODELS, ask=never_asked, ledger=ledger)
    assert [op.reserve_usd for op in ledger.ops] == [pytest.approx(block, abs=1e-8)]
    assert budget.may_call_model() is None
    spent = 0.0
    for step in range(2, state.agent.max_steps + 2):
        # A turn that uses what the estimate allowed for: the block runs out in a few calls.
        result = turn(input_tokens=budget.prompt_bound(), output_tokens=state.agent.max_tokens)
        usd = budget.cost(result, "scripted")
        spent += usd
        apply_model_turn(state, result, usd)
        state.step = step
        await budget.before_call(MODELS, ask=never_asked, ledger=ledger)
        if len(ledger.ops) == 2:
            break
    assert len(ledger.ops) == 2, "a second block once the first was spent"
    assert ledger.ops[1].commit == {"wf-1/1": pytest.approx(spent)}
    assert ledger.ops[1].reserve_id == f"wf-1/{state.step}"


def test_blocks_are_sized_to_the_accounts_headroom():
    """A quiet account's run reserves for every call it may still make; as the account fills,
    a block shrinks to a small share of what is left, never below BLOCK_CALLS calls."""
    state = RunState(spec=spec(account="acme"), step=1)
    budget = gate(state, FakeRun())
    estimate = 0.0001  # $5/day: 2% of the headroom is 1000 such calls
    assert budget.block_size(estimate) == pytest.approx(estimate * budget.max_steps)
    state.step = budget.max_steps - 1
    assert budget.block_size(estimate) == pytest.approx(estimate * 2)  # two calls left
    state.step = 1
    estimate = 0.005  # 2% of $5 is 20 such calls; of the 10% left, 2
    assert budget.block_size(estimate) == pytest.approx(estimate * 20)
    state.budget.ledger_fraction = 0.9
    assert budget.block_size(estimate) == pytest.approx(estimate * BLOCK_CALLS)
    state.budget.ledger_fraction = 1.2  # over the limit: no headroom at all
    assert budget.block_size(estimate) == pytest.approx(estimate * BLOCK_CALLS)


async def test_a_denied_block_falls_back_to_one_call_then_stops():
    """Near the account's limit the gate reserves one call; when that is denied too, it stops."""
    run = FakeRun()
    state = RunState(spec=spec(account="acme"), step=1)
    budget = gate(state, run)
    estimate = budget.estimate(MODELS)
    await budget.before_call(MODELS, ask=never_asked, ledger=Ledger(limit=estimate * 1.5))
    assert state.budget.block_usd == pytest.approx(estimate)
    assert [e[2]["decision"] for e in run.entries] == ["denied", "reserved"]
    state.budget.block_id = None
    with pytest.raises(StopRun, match="budget_exhausted: daily budget is used up"):
        await budget.before_call(MODELS, ask=never_asked, ledger=Ledger(limit=estimate / 2))


async def test_settling_commits_the_open_block_and_tolerates_a_silent_ledger():
    """At the end the open block is committed; a ledger that does not answer leaves it queued."""
    run = FakeRun()
    state = RunState(spec=spec(account="acme"), step=3)
    state.budget.block_id, state.budget.block_spent_usd = "wf-1/1", 0.004

    async def silent(op: LedgerOp) -> None:
        return None

    await gate(state, run).settle(silent)
    assert state.budget.to_commit == {"wf-1/1": 0.004} and state.budget.block_id is None
    ledger = Ledger()
    await gate(state, run).settle(ledger)
    assert ledger.ops[0].commit == {"wf-1/1": 0.004} and state.budget.to_commit == {}


async def test_other_runs_reservations_shrink_blocks_but_never_make_a_run_degrade_or_ask():
    """Fifty runs of one account each hold a block: the account is 95% held but 10% spent. The
    next run reserves a small block and goes on with its own model, without asking anyone."""

    class Held(Ledger):
        async def __call__(self, op: LedgerOp) -> LedgerAnswer:
            answer = await super().__call__(op)
            return answer.model_copy(update={"used_fraction": 0.95, "spent_fraction": 0.10})

    run = FakeRun()
    state = RunState(spec=spec(account="acme"), step=1)
    budget = gate(state, run)
    for _ in range(2):
        models = await budget.before_call(MODELS, ask=never_asked, ledger=Held())
        assert models == MODELS and state.budget.degraded_to is None
        state.step += 1
        budget._close_block()  # the next call opens a block of its own
    assert state.budget.ledger_spent_fraction == pytest.approx(0.10)
    assert budget.block_size(budget.estimate(MODELS)) == pytest.approx(
        budget.estimate(MODELS) * BLOCK_CALLS
    )
