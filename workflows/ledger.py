"""`SpineBudgetLedger`: one entity workflow per account, the budget that cannot be raced.

Every run on an account reserves before a model call and settles after it through an update on
this workflow. Update handlers are synchronous, so Temporal applies them one at a time: two runs
can never both take the last dollar. Windows (UTC day, UTC month) reset by key. The ledger is
durable like any workflow and continues as new to keep its history short.

Why a workflow and not a database: the fleet already shares Temporal, so there is nothing else to
run; every reservation is visible in the ledger's history in the Web UI; and a ledger that cannot
answer (no ledger worker, server down) fails closed because the run does not call the model
without a granted reservation.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from spine.contract import LEDGER_BATCH_UPDATE, LEDGER_UPDATE, LEDGER_WORKFLOW_TYPE
    from spine.payloads import (
        BudgetView,
        BudgetWindowView,
        LedgerAnswer,
        LedgerBatch,
        LedgerBatchAnswer,
        LedgerOp,
        LedgerState,
        Reservation,
        WindowTotals,
    )

#: Updates per run before continuing as new. Kept small: a worker that takes the ledger over
#: (its previous worker died) replays the whole run inside one workflow task, which must finish
#: within the task timeout even on a loaded worker.
MAX_UPDATES_PER_RUN = 250
#: Operations per run before continuing as new (a batch carries many), so the history stays
#: about a megabyte however the operations arrive.
MAX_OPS_PER_RUN = 2_000
#: The ledger's workflow task timeout (Temporal's default is 10 s), for that same replay.
LEDGER_TASK_TIMEOUT = timedelta(seconds=30)
KEEP_WINDOWS = timedelta(days=62)
WINDOW_NAMES = {"day": "daily", "mon": "monthly"}
#: A block that does not fit is cut to this share of what the account has left (as the runs'
#: own sizing does, `spine.guardrails.budget.HEADROOM_SHARE`, but with the ledger's fresh figures).
HEADROOM_SHARE = 0.02
#: A reservation never settled (its run vanished) stops holding budget after this long.
RESERVATION_TTL = timedelta(hours=1)
#: Settled reservations are remembered this long, so a retried request gets the same answer
#: (committed) or a late commit still counts (released); then only the window totals remain.
KEEP_COMMITTED = RESERVATION_TTL
KEEP_RELEASED = timedelta(days=1)
#: At most this many committed reservations (the newest) ride along a continue-as-new, however
#: busy the account: about 0.4 KB each, so the carried state stays far below Temporal's 2 MB
#: payload limit (an account reserving 5,000 blocks an hour would pass it otherwise, and its
#: ledger could not continue). A repeated commit of an older one is ignored, as for any unknown
#: reservation; its spend is already in the window totals.
MAX_COMMITTED_KEPT = 2_000


# Auto-upgrade under worker versioning (the ledger worker's default behaviour, see
# `spine.plugin.ledger_worker`): a ledger is a long-lived entity every run of its account depends
# on, so it follows the deployment's current build at its next task instead of keeping an old
# build's workers alive; its code changes must therefore be replay-safe (`workflow.patched`).
@workflow.defn(name=LEDGER_WORKFLOW_TYPE)
class BudgetLedger:
    @workflow.init
    def __init__(self, state: LedgerState) -> None:
        self._state = state
        self._updates = 0
        self._ops = 0
        self._expired_at: datetime | None = None

    @workflow.run
    async def run(self, state: LedgerState) -> None:
        await workflow.wait_condition(
            lambda: (
                self._updates >= MAX_UPDATES_PER_RUN
                or self._ops >= MAX_OPS_PER_RUN
                or workflow.info().is_continue_as_new_suggested()
            )
        )
        await workflow.wait_condition(workflow.all_handlers_finished)
        self._prune()
        workflow.continue_as_new(self._state, task_timeout=LEDGER_TASK_TIMEOUT)

    def _window(self, key: str) -> WindowTotals:
        return self._state.windows.setdefault(key, WindowTotals())

    def _prune(self) -> None:
        """Forget old settled reservations and windows older than two months."""
        now = workflow.now()
        oldest = (now - KEEP_WINDOWS).strftime("%Y-%m-%d")
        keep_after = {
            "reserved": "",
            "committed": (now - KEEP_COMMITTED).isoformat(),
            "released": (now - KEEP_RELEASED).isoformat(),
        }
        self._state.reservations = kept_reservations(self._state.reservations, keep_after)
        self._state.windows = {
            k: w for k, w in self._state.windows.items() if k[4:] >= oldest[: len(k) - 4]
        }
        today = f"day:{now:%Y-%m-%d}"
        self._state.exposure = {
            k: v for k, v in self._state.exposure.items() if k.split("|", 1)[0] >= today
        }

    @workflow.update(name=LEDGER_UPDATE)
    def apply(self, op: LedgerOp) -> LedgerAnswer:
        self._updates += 1
        return self._apply(op)

    @apply.validator
    def _check(self, op: LedgerOp) -> None:
        """Refuse what no Spine worker would send (the identity interceptor has already checked
        that a worker signed it): bad numbers, and settling another run's reservations."""
        problem = ledger_problem(op, self._state)
        if problem:
            raise ApplicationError(f"ledger: {problem}", type="LedgerRefused", non_retryable=True)

    @workflow.update(name=LEDGER_BATCH_UPDATE)
    def apply_batch(self, batch: LedgerBatch) -> LedgerBatchAnswer:
        """Many runs' operations in one update, each applied (or refused) on its own, in order:
        what a worker sends for a busy account (`spine.activities.budget.LedgerBatcher`)."""
        self._updates += 1
        answers = []
        for op in batch.ops:
            problem = ledger_problem(op, self._state)
            if problem:
                now = workflow.now()
                answers.append(
                    LedgerAnswer(
                        granted=False,
                        reason=f"ledger: {problem}",
                        refused=f"ledger: {problem}",
                        day=f"day:{now:%Y-%m-%d}",
                        month=f"mon:{now:%Y-%m}",
                        day_committed_usd=0.0,
                        day_reserved_usd=0.0,
                        month_committed_usd=0.0,
                        used_fraction=0.0,
                    )
                )
            else:
                answers.append(self._apply(op))
        return LedgerBatchAnswer(answers=answers)

    @apply_batch.validator
    def _check_batch(self, batch: LedgerBatch) -> None:
        """The identity interceptor checks the worker's signature in front of this validator (an
        update without a validator would skip it); the operations are checked one by one when
        applied, so one bad operation refuses only itself."""
        if not batch.ops:
            raise ApplicationError(
                "ledger: an empty batch", type="LedgerRefused", non_retryable=True
            )

    def _apply(self, op: LedgerOp) -> LedgerAnswer:
        self._ops += 1
        for reservation_id, actual in op.commit.items():
            self._settle(reservation_id, actual)
        for reservation_id in op.release:
            self._settle(reservation_id, None)
        now = workflow.now()
        self._expire(now)
        day, month = f"day:{now:%Y-%m-%d}", f"mon:{now:%Y-%m}"
        exposure = {k: self._state.exposure.get(f"{day}|{k}", 0.0) for k in op.exposure_query}
        for key, amount in op.exposure_add.items():
            total = self._state.exposure.get(f"{day}|{key}", 0.0) + amount
            self._state.exposure[f"{day}|{key}"] = round(total, 8)
        if op.reserve_id is None:
            return self._answer(True, "", day, month, 0.0, op, exposure)
        existing = self._state.reservations.get(op.reserve_id)
        if existing is not None:
            # A retried activity asks again: same reservation, same answer.
            answer = self._answer(
                True, "already reserved", existing.day, existing.month, 0.0, op, exposure
            )
            answer.granted_usd = existing.amount_usd
            return answer
        amount = self._sized(op, day, month)
        for key, limit in ((day, op.daily_limit_usd), (month, op.monthly_limit_usd)):
            window = self._window(key)
            if limit is not None and window.committed_usd + window.reserved_usd + amount > limit:
                return self._answer(
                    False,
                    f"{WINDOW_NAMES[key[:3]]} budget of {limit:.4f} USD for account "
                    f"{self._state.account!r}: "
                    f"committed {window.committed_usd:.4f}, reserved {window.reserved_usd:.4f}, "
                    f"this call needs {amount:.4f}",
                    day,
                    month,
                    amount,
                    op,
                    exposure,
                )
        self._state.reservations[op.reserve_id] = Reservation(
            reservation_id=op.reserve_id,
            run_id=op.run_id,
            amount_usd=amount,
            day=day,
            month=month,
            reserved_at=now.isoformat(),
        )
        self._window(day).reserved_usd += amount
        self._window(month).reserved_usd += amount
        answer = self._answer(True, "", day, month, 0.0, op, exposure)
        answer.granted_usd = amount
        return answer

    def _sized(self, op: LedgerOp, day: str, month: str) -> float:
        """The block to grant: for an op that allows less (`reserve_min_usd`), at most a share
        of what is left now (at least the minimum), as the run sized it from what it last
        heard; so runs reserving at once take a shrinking share each and never the whole rest."""
        if op.reserve_min_usd is None:
            return op.reserve_usd
        left = [
            limit - self._window(key).committed_usd - self._window(key).reserved_usd
            for key, limit in ((day, op.daily_limit_usd), (month, op.monthly_limit_usd))
            if limit is not None
        ]
        if not left:
            return op.reserve_usd
        share = max(min(left), 0.0) * HEADROOM_SHARE
        return max(op.reserve_min_usd, min(op.reserve_usd, share))

    def _expire(self, now: datetime) -> None:
        """Release the reservations older than the TTL. Once per moment: a workflow task has one
        `workflow.now()`, and what a batch reserves in it is newer than the cutoff, so scanning
        again for the batch's next operation would find nothing (and a busy account's ledger
        holds thousands of settled reservations)."""
        if now == self._expired_at:
            return
        self._expired_at = now
        cutoff = (now - RESERVATION_TTL).isoformat()
        for reservation in list(self._state.reservations.values()):
            if reservation.state == "reserved" and reservation.reserved_at < cutoff:
                self._settle(reservation.reservation_id, None)

    def _settle(self, reservation_id: str, actual: float | None) -> None:
        reservation = self._state.reservations.get(reservation_id)
        if reservation is None or reservation.state == "committed":
            return  # unknown or already settled: settling is idempotent
        if reservation.state == "released":
            # Expired while its run waited (an approval, say): the spend still counts.
            if actual is not None:
                for key in (reservation.day, reservation.month):
                    self._window(key).committed_usd += actual
                reservation.state = "committed"
                reservation.actual_usd = actual
            return
        for key in (reservation.day, reservation.month):
            window = self._window(key)
            window.reserved_usd = max(window.reserved_usd - reservation.amount_usd, 0.0)
            if actual is not None:
                window.committed_usd += actual
        if actual is None:
            reservation.state = "released"
        else:
            reservation.state = "committed"
            reservation.actual_usd = actual
            self._state.overspend_usd += max(actual - reservation.amount_usd, 0.0)

    def _answer(
        self,
        granted: bool,
        reason: str,
        day: str,
        month: str,
        extra: float,
        op: LedgerOp,
        exposure: dict[str, float],
    ) -> LedgerAnswer:
        d, m = self._window(day), self._window(month)
        fractions = [
            (w.committed_usd + w.reserved_usd + extra) / limit
            for w, limit in ((d, op.daily_limit_usd), (m, op.monthly_limit_usd))
            if limit
        ]
        spent = [
            w.committed_usd / limit
            for w, limit in ((d, op.daily_limit_usd), (m, op.monthly_limit_usd))
            if limit
        ]
        return LedgerAnswer(
            granted=granted,
            reason=reason,
            day=day,
            month=month,
            day_committed_usd=round(d.committed_usd, 8),
            day_reserved_usd=round(d.reserved_usd, 8),
            month_committed_usd=round(m.committed_usd, 8),
            used_fraction=max(fractions, default=0.0),
            spent_fraction=max(spent, default=0.0),
            exposure=exposure,
        )

    @workflow.query(name="show")
    def show(self) -> BudgetView:
        return BudgetView(
            account=self._state.account,
            windows=[
                BudgetWindowView(
                    window=k,
                    committed_usd=round(w.committed_usd, 8),
                    reserved_usd=round(w.reserved_usd, 8),
                )
                for k, w in sorted(self._state.windows.items())
            ],
            open_reservations=sum(
                1 for r in self._state.reservations.values() if r.state == "reserved"
            ),
            overspend_usd=round(self._state.overspend_usd, 8),
        )


#: The most one reservation or settlement may be: far above any real call, far below mischief.
MAX_USD_PER_OP = 1_000.0


def _bad(value: float) -> bool:
    return not math.isfinite(value) or value < 0 or value > MAX_USD_PER_OP


def ledger_problem(op: LedgerOp, state: LedgerState) -> str | None:
    """What is wrong with `op` for this ledger, or None."""
    if not op.run_id or len(op.run_id) > 512:
        return "run_id must be set (and at most 512 characters)"
    if op.reserve_id is not None and not op.reserve_id.startswith(f"{op.run_id}/"):
        return f"reservation {op.reserve_id!r} is not one of run {op.run_id!r}"
    if _bad(op.reserve_usd):
        return f"reserve_usd {op.reserve_usd!r} must be between 0 and {MAX_USD_PER_OP:g}"
    if op.reserve_min_usd is not None and (
        _bad(op.reserve_min_usd) or op.reserve_min_usd > op.reserve_usd
    ):
        return f"reserve_min_usd {op.reserve_min_usd!r} must be between 0 and reserve_usd"
    for reservation_id, actual in op.commit.items():
        if _bad(actual):
            return (
                f"commit of {reservation_id!r}: {actual!r} must be between 0 and {MAX_USD_PER_OP:g}"
            )
    for reservation_id in [*op.commit, *op.release]:
        found = state.reservations.get(reservation_id)
        if found is not None and found.run_id != op.run_id:
            return f"reservation {reservation_id!r} belongs to another run"
    for limit in (op.daily_limit_usd, op.monthly_limit_usd):
        if limit is not None and (not math.isfinite(limit) or limit < 0):
            return f"limit {limit!r} must be a number of USD, 0 or more"
    for key, amount in op.exposure_add.items():
        if len(key) > 512 or not math.isfinite(amount) or amount < 0:
            return f"exposure {key[:80]!r}: {amount!r} must be 0 or more"
    if len(op.exposure_query) > 100 or len(op.commit) + len(op.release) > 1000:
        return "too many keys in one operation"
    return None


def kept_reservations(
    reservations: dict[str, Reservation], keep_after: dict[str, str]
) -> dict[str, Reservation]:
    """The reservations a continue-as-new carries: every open one, settled ones newer than
    `keep_after` (by state), and of the committed ones at most `MAX_COMMITTED_KEPT`, the newest."""
    kept = {k: r for k, r in reservations.items() if r.reserved_at >= keep_after.get(r.state, "")}
    committed = [k for k, r in kept.items() if r.state == "committed"]
    if len(committed) <= MAX_COMMITTED_KEPT:
        return kept
    newest = sorted(committed, key=lambda k: (kept[k].reserved_at, k))[-MAX_COMMITTED_KEPT:]
    dropped = set(committed) - set(newest)
    return {k: r for k, r in kept.items() if k not in dropped}
