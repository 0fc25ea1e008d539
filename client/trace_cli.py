"""`spine trace RUN`: a run's spans from the shared database or the local trace file, as a tree.

With ``SPINE_DATABASE_URL`` set (and no ``SPINE_TRACE_FILE``), workers store spans in the shared
database and this reads them from there, whichever host ran the run. Otherwise the worker writes
one span per line to the trace file when no OTLP endpoint is configured (see
`spine.observability.telemetry`). A run's trace is found through the `spine.run.id` attribute
(the workflow
id) that every Spine span carries; each span is shown with its start offset, duration, tokens and
cost, followed by totals. The run's own `invoke_agent` span is written when the run closes, so for
a run still in progress its children are shown without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import click

from spine.store import redact_url, shared_database

SpanRecord = dict[str, object]
"""One line of the trace file (see `spine.observability.telemetry.span_record`)."""

RUN_ATTRIBUTES = ("spine.run.id", "gen_ai.conversation.id")


def load_spans(path: Path) -> list[SpanRecord]:
    """Every span in the trace file; lines that are not a span object (a torn write) are skipped."""
    spans = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and {"trace_id", "span_id", "name"} <= record.keys():
                record.setdefault("attributes", {})
                spans.append(record)
    return spans


def _attrs(span: SpanRecord) -> dict[str, object]:
    attrs = span.get("attributes")
    return attrs if isinstance(attrs, dict) else {}


def spans_for_run(spans: Iterable[SpanRecord], run: str) -> list[SpanRecord]:
    """The spans of every trace that has a span of `run`, in start order."""
    spans = list(spans)
    trace_ids = {
        s["trace_id"] for s in spans if any(_attrs(s).get(k) == run for k in RUN_ATTRIBUTES)
    }
    found = [s for s in spans if s["trace_id"] in trace_ids]
    return sorted(found, key=lambda s: (_int(s.get("start_ns")), str(s["span_id"])))


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _duration(ns: int) -> str:
    seconds = ns / 1e9
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:04.1f}s"


def _plural(count: object, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _operation(span: SpanRecord) -> str:
    return str(_attrs(span).get("gen_ai.operation.name") or str(span["name"]).split(" ")[0])


def totals(spans: list[SpanRecord]) -> dict[str, object]:
    """Model calls, tokens and cost summed over `chat` spans; tool calls; the run's own total."""
    chats = [s for s in spans if _operation(s) == "chat"]
    tools = [s for s in spans if _operation(s) == "execute_tool"]
    roots = [s for s in spans if _operation(s) == "invoke_agent"]
    cost = [_number(_attrs(s).get("gen_ai.usage.cost.amount")) for s in chats]
    run_cost = [_number(_attrs(s).get("gen_ai.usage.cost.amount")) for s in roots]
    starts = [_int(s.get("start_ns")) for s in spans]
    ends = [_int(s.get("end_ns")) for s in spans]
    return {
        "spans": len(spans),
        "model_calls": len(chats),
        "model_calls_failed": sum(1 for s in chats if _failed(s)),
        "input_tokens": sum(_int(_attrs(s).get("gen_ai.usage.input_tokens")) for s in chats),
        "output_tokens": sum(_int(_attrs(s).get("gen_ai.usage.output_tokens")) for s in chats),
        "cost_usd": round(sum(c for c in cost if c is not None), 8),
        "tool_calls": len(tools),
        "tool_calls_failed": sum(1 for s in tools if _failed(s)),
        "approvals": sum(1 for s in spans if _operation(s) == "approval"),
        "run_cost_usd": sum(c for c in run_cost if c is not None) if roots else None,
        "run_status": _attrs(roots[-1]).get("spine.run.status") if roots else None,
        "wall_ns": max(ends) - min(starts) if spans else 0,
    }


def _failed(span: SpanRecord) -> bool:
    status = span.get("status")
    return isinstance(status, dict) and status.get("code") == "ERROR"


def _notes(span: SpanRecord) -> str:
    a = _attrs(span)
    notes = []
    if a.get("spine.step") is not None:
        notes.append(f"step {a['spine.step']}")
    if _int(a.get("spine.retry.attempt")) > 1:
        notes.append(f"attempt {a['spine.retry.attempt']}")
    if a.get("spine.policy.decision"):
        notes.append(f"policy {a['spine.policy.decision']}")
    if a.get("spine.approval.by"):
        notes.append(f"by {a['spine.approval.by']} ({a.get('spine.approval.role')})")
    if a.get("spine.run.status"):
        notes.append(str(a["spine.run.status"]))
    if a.get("spine.continued_as_new"):
        notes.append("continued as new")
    if _failed(span):
        notes.append(f"ERROR {a.get('error.type') or ''}".rstrip())
    return "  ".join(notes)


def _tree(spans: list[SpanRecord]) -> list[tuple[str, SpanRecord]]:
    """(tree prefix, span) in display order: parents before children, siblings by start time."""
    ids = {s["span_id"] for s in spans}
    children: dict[object, list[SpanRecord]] = {}
    tops = []
    for s in spans:
        if s.get("parent_id") in ids:
            children.setdefault(s["parent_id"], []).append(s)
        else:
            tops.append(s)
    rows: list[tuple[str, SpanRecord]] = []

    def walk(span: SpanRecord, lead: str, branch: str) -> None:
        rows.append((lead + branch, span))
        kids = children.get(span["span_id"], [])
        inner = lead + ("    " if branch == "└── " else "│   " if branch else "")
        for i, kid in enumerate(kids):
            walk(kid, inner, "└── " if i == len(kids) - 1 else "├── ")

    for top in tops:
        walk(top, "", "")
    return rows


def render(spans: list[SpanRecord], run: str) -> list[str]:
    """The span tree and totals, as terminal lines."""
    origin = min(_int(s.get("start_ns")) for s in spans)
    table = []
    for prefix, span in _tree(spans):
        a = _attrs(span)
        start, end = _int(span.get("start_ns")), _int(span.get("end_ns"))
        tokens = ""
        if "gen_ai.usage.input_tokens" in a:
            tokens = f"{a['gen_ai.usage.input_tokens']}/{a.get('gen_ai.usage.output_tokens', 0)}"
        cost = _number(a.get("gen_ai.usage.cost.amount"))
        table.append(
            (
                prefix + str(span["name"]),
                f"+{(start - origin) / 1e9:.3f}s",
                _duration(max(end - start, 0)),
                tokens,
                f"${cost:.6f}" if cost is not None else "",
                _notes(span),
            )
        )
    header = ("span", "start", "duration", "tokens in/out", "cost", "")
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(5)]
    lines = [f"run {run}  trace {', '.join(sorted({str(s['trace_id']) for s in spans}))}"]
    for row in [header, *table]:
        cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, 5)]
        lines.append("  ".join(cells + [row[5]]).rstrip())
    t = totals(spans)
    lines.append(
        f"totals  {_plural(t['model_calls'], 'model call')} ({t['input_tokens']} in / "
        f"{t['output_tokens']} out tokens, ${t['cost_usd']:.6f}), "
        f"{_plural(t['tool_calls'], 'tool call')} ({t['tool_calls_failed']} failed), "
        f"{_plural(t['approvals'], 'approval')}; {_duration(_int(t['wall_ns']))} wall"
    )
    if t["run_cost_usd"] is not None:
        lines.append(f"run     {t['run_status']}, ${t['run_cost_usd']:.6f} as charged by the run")
    else:
        lines.append(
            "run     still open: its invoke_agent span is written when the run closes "
            "(`spine status` shows where it is)"
        )
    return lines


def _nested(spans: list[SpanRecord]) -> list[dict[str, object]]:
    """The span tree as nested JSON objects with a `children` list each."""
    nodes = {s["span_id"]: {**s, "children": []} for s in spans}
    tops = []
    for s in spans:
        parent = nodes.get(s.get("parent_id"))
        node = nodes[s["span_id"]]
        if parent is not None:
            parent["children"].append(node)  # type: ignore[union-attr]  # built just above
        else:
            tops.append(node)
    return tops


@click.command("trace")
@click.argument("run")
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trace file (default: the shared database with SPINE_DATABASE_URL, else "
    "SPINE_TRACE_FILE, else $SPINE_STATE_DIR/traces.jsonl).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def trace(run: str, path: Path | None, as_json: bool) -> None:
    """Show RUN's trace (a workflow id): spans as a tree with durations, tokens and cost."""
    env = os.environ
    if path is None and shared_database(env) and not env.get("SPINE_TRACE_FILE"):
        spans = _from_database(env, run)
        if not spans:
            _went_to_otlp(env, run)
            raise click.ClickException(
                f"no spans for run {run!r} in the shared database "
                f"({redact_url(env['SPINE_DATABASE_URL'].strip())}); check the workflow id, and "
                "that the worker traced it (spans are stored about a second after they end)"
            )
        _show(run, spans, as_json)
        return
    if path is None:
        from spine.observability.telemetry import (
            default_trace_file,  # lazily: it loads OpenTelemetry
        )

        path = default_trace_file(env)
    if not path.exists():
        _went_to_otlp(env, run)
        raise click.ClickException(
            f"no trace file at '{path}'; the worker writes it when OTEL_EXPORTER_OTLP_ENDPOINT is "
            "unset (or set SPINE_TRACE_FILE / --file to where it writes)"
        )
    try:
        every = load_spans(path)
    except OSError as e:
        raise click.ClickException(f"cannot read trace file '{path}': {e.strerror or e}") from e
    spans = spans_for_run(every, run)
    if not spans:
        _went_to_otlp(env, run)
        raise click.ClickException(
            f"no spans for run {run!r} in '{path}' ({len(every)} spans read); check the workflow "
            "id, and that the worker traced it (spans are flushed about a second after they end)"
        )
    _show(run, spans, as_json)


def _went_to_otlp(env: Mapping[str, str], run: str) -> None:
    """With an OTLP endpoint configured the workers export spans there, not to a trace file or
    the shared database: say so, naming the endpoint, instead of "no spans".

    Raises:
        click.ClickException: OTLP is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
            ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``).
    """
    from spine.observability.telemetry import otlp_endpoint  # lazily: it loads OpenTelemetry

    endpoint = otlp_endpoint(env)
    if endpoint:
        raise click.ClickException(
            f"no spans for run {run!r} here: with OTEL_EXPORTER_OTLP_ENDPOINT set the workers "
            f"send spans to the OTLP endpoint {redact_url(endpoint)}; look the run up in your "
            f"tracing backend (attribute spine.run.id = {run!r}), or set "
            "SPINE_TRACE_FILE on the workers too for `spine trace`"
        )


def _show(run: str, spans: list[SpanRecord], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"run": run, "totals": totals(spans), "spans": _nested(spans)}))
        return
    for line in render(spans, run):
        click.echo(line)


def _from_database(env: Mapping[str, str], run: str) -> list[SpanRecord]:
    """The run's spans from the shared database (`SPINE_DATABASE_URL`)."""
    import asyncio

    from spine.observability.spans import SpanStore  # lazily: it loads OpenTelemetry
    from spine.store import StoreUnavailable, database_from_env

    async def read() -> list[SpanRecord]:
        database = database_from_env(env, read_only=True)
        try:
            return await SpanStore(database).for_run(run)
        finally:
            await database.close()

    try:
        return asyncio.run(read())
    except StoreUnavailable as err:
        raise click.ClickException(err.message) from None
    except ValueError as err:  # an unsupported SPINE_DATABASE_URL
        raise click.ClickException(str(err)) from None
