"""Spine: durable execution for AI agents on Temporal.

The public API, importable from ``spine``::

    from spine import tool, ToolContext, SecretRef, AgentDefinition, Registry   # declare agents
    from spine import SpinePlugin, SpineConfig                                 # run workers
    from spine import connect, start_run, wait_result                          # drive runs

Names are loaded on first use, so ``import spine`` stays cheap and safe inside the workflow
sandbox (workflow modules live under ``spine.workflows`` and import this package first).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS: dict[str, str] = {
    # declaring tools and agents
    "tool": "spine.activities.tools",
    "sub_agent": "spine.activities.tools",
    "ToolContext": "spine.activities.tools",
    "SecretRef": "spine.activities.tools",
    "AgentDefinition": "spine.activities.tools",
    "Registry": "spine.activities.tools",
    "ToolDefinitionError": "spine.activities.tools",
    "raise_for_status": "spine.activities.tools",
    "json_schema_model": "spine.activities.tools",
    "CompensationInput": "spine.payloads",
    "AgentTask": "spine.payloads",
    "AgentAnswer": "spine.payloads",
    "ReconcileQuery": "spine.payloads",
    "ReconcileAnswer": "spine.payloads",
    # running workers
    "SpinePlugin": "spine.plugin",
    "SpineConfig": "spine.plugin",
    "load_policy": "spine.guardrails.policy",
    # driving runs
    "connect": "spine.client.runs",
    "start_run": "spine.client.runs",
    "wait_result": "spine.client.runs",
    "get_state": "spine.client.runs",
    "decide": "spine.client.runs",
    "SpineClientError": "spine.client.runs",
    # the contract
    "AgentRequest": "spine.contract",
    "AgentResult": "spine.contract",
    "ApprovalDecision": "spine.contract",
    "OperatorCommand": "spine.contract",
    "ModelChoice": "spine.contract",
    "Limits": "spine.contract",
    "ScriptTurn": "spine.contract",
    "ScriptToolCall": "spine.contract",
    "TokenUsage": "spine.contract",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load lazily
    from spine.activities.tools import (
        AgentDefinition,
        Registry,
        SecretRef,
        ToolContext,
        ToolDefinitionError,
        json_schema_model,
        raise_for_status,
        sub_agent,
        tool,
    )
    from spine.client.runs import (
        SpineClientError,
        connect,
        decide,
        get_state,
        start_run,
        wait_result,
    )
    from spine.contract import (
        AgentRequest,
        AgentResult,
        ApprovalDecision,
        Limits,
        ModelChoice,
        OperatorCommand,
        ScriptToolCall,
        ScriptTurn,
        TokenUsage,
    )
    from spine.guardrails.policy import load_policy
    from spine.payloads import (
        AgentAnswer,
        AgentTask,
        CompensationInput,
        ReconcileAnswer,
        ReconcileQuery,
    )
    from spine.plugin import SpinePlugin
