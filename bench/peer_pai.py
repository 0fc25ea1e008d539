"""The scripted agent on Pydantic AI's Temporal integration (see :mod:`bench.peer_tools`).

As Pydantic AI's docs do it: the agent, with the ``TemporalDurability`` capability, is defined at
module level next to the workflow that runs it.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from pydantic_ai import Agent
    from pydantic_ai.durable_exec.temporal import PydanticAIWorkflow, TemporalDurability
    from pydantic_ai.messages import (
        ModelMessage,
        ModelRequest,
        ModelResponse,
        TextPart,
        ToolCallPart,
        ToolReturnPart,
        UserPromptPart,
    )
    from pydantic_ai.models.function import AgentInfo, FunctionModel
    from pydantic_ai.usage import UsageLimits

    from bench.peer_tools import INSTRUCTIONS, PLAIN_TOOLS, PeerInput, decision


def _scripted_pydantic(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    prompt = ""
    results = 0
    for message in messages:
        if isinstance(message, ModelRequest):
            for part in message.parts:
                if isinstance(part, UserPromptPart) and not prompt:
                    prompt = str(part.content)
                elif isinstance(part, ToolReturnPart):
                    results += 1
    answer = decision(prompt, results)
    if isinstance(answer, str):
        return ModelResponse(parts=[TextPart(answer)])
    name, args = answer
    return ModelResponse(parts=[ToolCallPart(name, args, tool_call_id=f"call_{results}")])


PAI_AGENT = Agent(
    FunctionModel(_scripted_pydantic, model_name="scripted"),
    name="peer_refund",
    instructions=INSTRUCTIONS,
    tools=list(PLAIN_TOOLS),
    capabilities=[TemporalDurability()],
)


@workflow.defn(name="PeerPydanticAIAgent")
class PydanticAIAgentWorkflow(PydanticAIWorkflow):
    __pydantic_ai_agents__ = [PAI_AGENT]

    @workflow.run
    async def run(self, request: PeerInput) -> str:
        result = await PAI_AGENT.run(
            request.prompt, usage_limits=UsageLimits(request_limit=request.max_turns)
        )
        return str(result.output)
