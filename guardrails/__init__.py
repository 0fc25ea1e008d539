"""Spine's control plane: policy, approvals and secrets.

`policy` and `approvals` are pure and deterministic, so workflow code may use them; `secrets`
does I/O and runs only in activities.
"""
