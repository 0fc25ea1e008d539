"""Test agents for reconcile-before-retry: the control arm's tool has no reconcile tool.

``credit-naive`` calls the demo's legacy credits API exactly as ``issue_store_credit`` does (same
function), but is declared the way a tool without Spine's reconcile would be: it sends its
idempotency key in a header the legacy API ignores, so an ambiguous failure makes its retry write
a second credit.
"""

from __future__ import annotations

from spine.activities.tools import AgentDefinition, Registry, tool
from spine.demo.agent import API_KEY, issue_store_credit

issue_store_credit_naive = tool(
    name="issue_store_credit_naive",
    side_effects=True,
    idempotent_via="Idempotency-Key header (which the legacy API ignores: the control arm)",
    secrets=[API_KEY],
    dependency="demo-service",
    summary_arg="order_id",
    timeout_s=15,
)(issue_store_credit.fn)  # type: ignore[arg-type]  # the same function, declared without reconcile

CREDIT_NAIVE = AgentDefinition(
    name="credit-naive",
    instructions="Give store credit when asked.",
    tools=("issue_store_credit_naive",),
)


def register(registry: Registry) -> None:
    registry.add_tool(issue_store_credit_naive)
    registry.add_agent(CREDIT_NAIVE)
