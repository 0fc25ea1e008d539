"""Spine's control plane: policy, allowlists, approvals, budgets, saga, parking, secrets, codec.

The workflow-side guards are pure and deterministic, so workflow code may use them; `secrets`
and `codec` do I/O and run only on the worker or the client. Observation (audit, telemetry,
metrics, alerts) lives in `spine.observability`.
"""
