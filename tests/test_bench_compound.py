"""The compound-failure benchmark's Spine arm, at its quick size, as a test (no timing asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.compound import run_quick


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_spine_survives_compound_failure_exactly_once(tmp_path: Path):
    """30 ten-step runs under 15% tool and model faults, with worker SIGKILLs and a Temporal
    server restart, complete at least 99% and never duplicate a refund, email or ticket."""
    data = await run_quick(arms=("spine",), tmp=tmp_path, runs=20)
    spine = data["arms"]["spine"]
    assert spine["worker_kills"] >= 1 and spine["server_restarts"] == 1, spine["faults"]
    assert spine["duplicate_side_effects"] == 0, spine
    assert spine["success_rate"] >= 0.99, {
        k: spine[k] for k in ("success", "runs", "not_completed_by_status", "parked")
    }
