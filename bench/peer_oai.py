"""The scripted agent on Temporal's OpenAI Agents integration (see :mod:`bench.peer_tools`)."""

from __future__ import annotations

import json
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from agents import Agent, Model, ModelResponse, Runner, Usage
    from openai.types.responses import (
        ResponseFunctionToolCall,
        ResponseOutputMessage,
        ResponseOutputText,
    )
    from temporalio.contrib.openai_agents.workflow import activity_as_tool

    from bench.peer_tools import INSTRUCTIONS, OAI_ACTIVITIES, TOOL_TIMEOUT, PeerInput, decision


class ScriptedOpenAIModel(Model):
    """An OpenAI Agents SDK model that plays the script (runs in the integration's activity)."""

    async def get_response(self, system_instructions, input, *args: Any, **kwargs: Any):
        items = [input] if isinstance(input, str) else list(input)
        prompt = next(
            (i if isinstance(i, str) else str(i.get("content")))
            for i in items
            if isinstance(i, str) or i.get("role") == "user"
        )
        results = sum(
            1 for i in items if isinstance(i, dict) and i.get("type") == "function_call_output"
        )
        answer = decision(prompt, results)
        if isinstance(answer, str):
            output = ResponseOutputMessage(
                id=f"msg_{results}",
                content=[ResponseOutputText(text=answer, annotations=[], type="output_text")],
                role="assistant",
                status="completed",
                type="message",
            )
        else:
            name, args = answer
            output = ResponseFunctionToolCall(
                arguments=json.dumps(args),
                call_id=f"call_{results}",
                name=name,
                type="function_call",
                id=f"fc_{results}",
                status="completed",
            )
        return ModelResponse(output=[output], usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("the scripted model does not stream")


@workflow.defn(name="PeerOpenAIAgent")
class OpenAIAgentWorkflow:
    @workflow.run
    async def run(self, request: PeerInput) -> str:
        agent = Agent(
            name="refund-agent",
            instructions=INSTRUCTIONS,
            tools=[
                activity_as_tool(a, start_to_close_timeout=TOOL_TIMEOUT) for a in OAI_ACTIVITIES
            ],
        )
        result = await Runner.run(agent, input=request.prompt, max_turns=request.max_turns)
        return str(result.final_output)
