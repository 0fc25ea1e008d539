"""Agents the tests add to the demo's.

``triage-agent`` hands every case over to the demo's inspection agent (a hand-off: the
sub-agent's answer is the run's answer).

Reconcile-before-retry's control arm:
``credit-naive`` calls the demo's legacy credits API exactly as ``issue_store_credit`` does (same
function), but is declared the way a tool without Spine's reconcile would be: it sends its
idempotency key in a header the legacy API ignores, so an ambiguous failure makes its retry write
a second credit.
"""

from __future__ import annotations

from spine.activities.tools import AgentDefinition, Registry, sub_agent, tool
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


hand_to_inspection = sub_agent(
    "inspection-agent",
    name="hand_to_inspection",
    description="Hand the whole case to the inspection agent; its answer is the final answer.",
    handoff=True,
    max_usd=0.05,
)

TRIAGE_AGENT = AgentDefinition(
    name="triage-agent",
    instructions="Hand damaged-goods cases to inspection.",
    tools=("hand_to_inspection",),
)

#: Policy for these agents, appended to a copy of the default policy.
POLICY = """
[agents.credit-naive]
max_steps = 5
[agents.credit-naive.roles]
support = ["issue_store_credit_naive"]

[agents.triage-agent]
max_steps = 5
max_usd = 0.50
[agents.triage-agent.roles]
support = ["hand_to_inspection"]
"""


def register(registry: Registry) -> None:
    registry.add_tool(issue_store_credit_naive)
    registry.add_tool(hand_to_inspection)
    registry.add_agent(CREDIT_NAIVE)
    registry.add_agent(TRIAGE_AGENT)
