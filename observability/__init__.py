"""What Spine records about runs: the audit log, traces, metrics and anomaly alerts.

Apart from the guards (`spine.guardrails`), which decide; these observe. `metrics` is
sandbox-safe (workflow code records through it); the rest runs on the worker and the CLI.
"""
