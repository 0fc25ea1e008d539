"""The scripted agent on temporal-agent-harness (see :mod:`bench.peer_tools`).

Wired as the harness's own Pydantic AI example and tests wire it (``pydantic_ai_hello``,
``tests/ai_sdks/pydantic_ai``): an ``@agent.defn`` session workflow whose ``AgentWorkflowRunner``
drives turns; one ``@agent.accepts`` handler runs a ``TemporalAgent`` over harness tools adapted
with ``build_harness_toolset`` (which keeps the dispatch in the workflow, where the harness's
approval gate lives). Choices that keep the comparison fair:

* The model is Pydantic AI's ``FunctionModel`` playing the same script as the other arms
  (:func:`bench.peer_pai._scripted_pydantic`); it runs in Pydantic AI's model-request activity,
  exactly as in the Pydantic AI arm. No ``event_stream_handler`` is wired (the scripted model does
  not stream, and neither does the Pydantic AI arm); the harness still publishes its turn and
  tool events onto its workflow stream.
* The tools are ``@agent.activity_tool_defn`` tools (durable, activity-backed, as a tool with side
  effects should be), calling the same demo service code as the other arms; their activity
  bodies publish ``tool_start``/``tool_end`` onto the stream, as the harness does.
* No approval gate (``ToolApprovalPolicy.dangerously_skip_all()``): no arm asks a human.
* ``AgentHarnessPlugin`` with its default large-payload offload (payloads over 1.5 MB go to the
  local filesystem, here a directory of the benchmark's own) is on the client, as the harness
  documents; ``PydanticAIPlugin`` comes first, as the harness asks.

A harness agent is a session: it is started with an ``AgentConfig`` (plus, here, the run's turn
limit as init data), takes each message through the ``send_agent_message`` update and ends on a
``close`` signal once its open turn drains. :class:`bench.peers.HarnessArm` sends one message (the
script's prompt) and then ``close``; that update and signal are in the measured history. A
handler that raises does not fail the session (the harness reports it on the stream), so the
arm reads the turn's outcome back with the ``peer_outcome`` query.
"""

from __future__ import annotations

import warnings

from pydantic import BaseModel
from temporalio import workflow
from temporalio.contrib.workflow_streams import WorkflowStream
from temporalio.workflow import ActivityConfig

with workflow.unsafe.imports_passed_through():
    from pydantic_ai import Agent, PydanticAIDeprecationWarning
    from pydantic_ai.durable_exec.temporal import TemporalAgent
    from pydantic_ai.models.function import FunctionModel
    from pydantic_ai.usage import UsageLimits
    from temporal_agent_harness.ai_sdks.pydantic_ai_harness import (
        HarnessDeps,
        build_harness_toolset,
    )
    from temporal_agent_harness.harness import agent
    from temporal_agent_harness.harness.agent_protocol import (
        AgentConfig,
        TextMessage,
        TextReply,
        ToolApprovalPolicy,
    )
    from temporal_agent_harness.harness.agent_workflow import AgentWorkflowRunner

    from bench import peer_tools
    from bench.peer_pai import _scripted_pydantic
    from bench.peer_tools import INSTRUCTIONS, TOOL_TIMEOUT

_ACTIVITY = ActivityConfig(start_to_close_timeout=TOOL_TIMEOUT)


@agent.activity_tool_defn(activity_config=_ACTIVITY)
async def lookup_order(order_id: str) -> str:
    """Look up an order."""
    return await peer_tools.lookup_order(order_id)


@agent.activity_tool_defn(activity_config=_ACTIVITY)
async def issue_refund(order_id: str, amount: float, reason: str = "") -> str:
    """Refund part of an order."""
    return await peer_tools.issue_refund(order_id, amount, reason)


@agent.activity_tool_defn(activity_config=_ACTIVITY)
async def send_email(order_id: str, subject: str, body: str) -> str:
    """Email the customer of an order."""
    return await peer_tools.send_email(order_id, subject, body)


@agent.activity_tool_defn(activity_config=_ACTIVITY)
async def update_ticket(order_id: str, status: str, note: str = "") -> str:
    """Update the support ticket of an order."""
    return await peer_tools.update_ticket(order_id, status, note)


@agent.activity_tool_defn(activity_config=_ACTIVITY)
async def read_doc(doc_id: int) -> str:
    """Read a (large) document."""
    return await peer_tools.read_doc(doc_id)


HARNESS_TOOLS = (lookup_order, issue_refund, send_email, update_ticket, read_doc)

_TOOLSET, _TOOL_CONFIG = build_harness_toolset(list(HARNESS_TOOLS), id="peer-harness-tools")

# The harness's glue (0.8.0) is written for `TemporalAgent`, which Pydantic AI now marks
# deprecated in favour of the `TemporalDurability` capability; used as the harness documents it.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", PydanticAIDeprecationWarning)
    HARNESS_AGENT = TemporalAgent(
        Agent(
            FunctionModel(_scripted_pydantic, model_name="scripted"),
            instructions=INSTRUCTIONS,
            deps_type=HarnessDeps,
            toolsets=[_TOOLSET],
        ),
        name="peer_harness",
        tool_activity_config=_TOOL_CONFIG,
    )


class RunLimits(BaseModel):
    """How many model requests the run may make (the other arms' ``max_turns``)."""

    max_turns: int


@agent.defn(name="PeerHarnessAgent")
class HarnessAgentWorkflow:
    @agent.init
    def __init__(self, config: AgentConfig, data: RunLimits | None = None) -> None:
        self._runner = AgentWorkflowRunner(
            config,
            stream=WorkflowStream(),
            approval_policy_default=ToolApprovalPolicy.dangerously_skip_all(),
        )
        self._max_turns = data.max_turns if data else 50
        self._outcome = "no message handled"

    @workflow.query(name="peer_outcome")
    def peer_outcome(self) -> str:
        return self._outcome

    @agent.accepts
    async def ask(self, message: TextMessage) -> TextReply:
        """Run the scripted conversation the message names."""
        try:
            result = await HARNESS_AGENT.run(
                message.text,
                deps=HarnessDeps(runner=self._runner),
                usage_limits=UsageLimits(request_limit=self._max_turns),
            )
        except Exception as err:
            self._outcome = f"{type(err).__name__}: {err}"[:500]
            raise
        self._outcome = "completed"
        return TextReply(text=str(result.output))
