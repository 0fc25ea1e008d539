"""Plots and the README "Numbers" table from ``bench/results/*.json``.

Writes PNGs next to the results (success rate per arm, run latency distributions, per-step
latency and history bytes against the peers, history growth over long runs, recovery times)
and prints a Markdown section to paste under "Numbers" in the README, headed by the machine the
figures came from (nproc, memory, CPU model from /proc/cpuinfo).

    python -m bench.report [--results bench/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import RESULTS_DIR, machine


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_compound(data: dict, results: Path) -> list[Path]:
    plt = _plt()
    arms = data["arms"]
    names = list(arms)
    made = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    rates = [arms[n]["success_rate"] * 100 for n in names]
    dupes = [arms[n]["duplicate_side_effects"] for n in names]
    bars = ax[0].bar(names, rates, color=["#c44", "#d93", "#393"][: len(names)])
    ax[0].bar_label(bars, fmt="%.1f%%")
    ax[0].set_ylim(0, 110)
    ax[0].set_ylabel("end-to-end success (%)")
    ax[0].set_title("10-step runs, 15% faults on every call")
    bars = ax[1].bar(names, dupes, color=["#c44", "#d93", "#393"][: len(names)])
    ax[1].bar_label(bars)
    ax[1].set_ylabel("duplicate side effects")
    ax[1].set_title("refunds / emails / tickets > 1 per order")
    fig.tight_layout()
    path = results / "compound_success.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    series = [arms[n]["run_durations_s"] for n in names]
    ax.boxplot(series, tick_labels=names, showfliers=True)
    ax.set_yscale("log")
    ax.set_ylabel("run wall time (s, log)")
    ax.set_title("Run latency per arm (Spine: with worker kills + server restart)")
    fig.tight_layout()
    path = results / "compound_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    return made


def plot_peers(data: dict, results: Path) -> list[Path]:
    plt = _plt()
    ten = data["ten_step"]
    names = list(ten)
    fig, ax = plt.subplots(1, 3, figsize=(13, 4))
    ax[0].boxplot(
        [[s["wall_s"] * 100 for s in ten[n]["samples"]] for n in names], tick_labels=names
    )
    ax[0].set_ylabel("ms per step")
    ax[0].set_title("10-step run: latency per step")
    bars = ax[1].bar(names, [ten[n]["history_bytes_per_step"] / 1024 for n in names])
    ax[1].bar_label(bars, fmt="%.1f")
    ax[1].set_ylabel("KiB of history per step")
    ax[1].set_title("10-step run: history per step")
    docs = data["issue_1890"]
    bars = ax[2].bar(list(docs), [d["bytes"] / 2**20 for d in docs.values()])
    ax[2].bar_label(bars, fmt="%.1f")
    ax[2].axhline(50, color="#c44", linestyle="--", label="50 MiB: run terminated")
    ax[2].axhline(10, color="#d93", linestyle=":", label="10 MiB: warning")
    ax[2].set_ylabel("history (MiB)")
    ax[2].set_title(f"#1890: {data['setup']['docs_calls']} calls x 20 KB")
    ax[2].legend(fontsize=8)
    for a in ax:  # four arms' names side by side overlap
        a.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    path = results / "peers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_long_runs(data: dict, results: Path) -> list[Path]:
    plt = _plt()
    per_step = data["per_step_bytes"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(range(1, len(per_step) + 1), per_step, linewidth=0.6)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("history bytes")
    ax[0].set_title("History bytes per step")
    total, running = [], 0
    for b in per_step:
        running += b
        total.append(running / 2**20)
    ax[1].plot(range(1, len(total) + 1), total)
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("cumulative history (MiB, all runs)")
    most = data["max_bytes_per_run"] / 2**20
    ax[1].set_title(
        f"{len(per_step)} steps, {data['runs_in_chain']} runs "
        f"(max {most:.1f} MiB / {data['max_events_per_run']} events per run)"
    )
    fig.tight_layout()
    path = results / "long_runs.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_overhead(data: dict, results: Path) -> list[Path]:
    plt = _plt()
    paths = list(data["single"])
    spine = [data["single"][p]["spine_step_ms"] for p in paths]
    bare = [data["single"][p]["bare_step_ms"] for p in paths]
    x = range(len(paths))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([i - 0.2 for i in x], bare, width=0.4, label="bare Temporal", color="#888")
    bars = ax.bar([i + 0.2 for i in x], spine, width=0.4, label="Spine", color="#393")
    ax.bar_label(bars, labels=[f"x{s / b:.2f}" for s, b in zip(spine, bare, strict=True)])
    ax.set_xticks(list(x), paths)
    ax.set_ylabel("ms per step (one run at a time)")
    ax.set_title("Per-step latency, same work, same server")
    ax.legend()
    fig.tight_layout()
    path = results / "overhead.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_recovery(data: dict, results: Path) -> list[Path]:
    plt = _plt()
    figures = data["figures"]
    names = list(figures)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot(
        [[s["progress_s"] for s in figures[n]["samples"] if s.get("progress_s")] for n in names],
        tick_labels=names,
    )
    ax.set_ylabel("seconds to the run's next progress")
    ax.set_title("Recovery after a fault")
    fig.tight_layout()
    path = results / "recovery.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is below it, as the README shows it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def markdown(results: Path) -> str:
    m = machine()
    lines = [
        "## Numbers",
        "",
        f"Measured on {m['nproc']} cores ({m['cpu_model']}), {m['memory_gb']} GiB memory, "
        f"Python {m['python']}, temporalio {m['versions']['temporalio']}, shared with other "
        "test suites (load average is recorded in each result file). Reproduce with "
        "`make bench` (quick sizes, into `bench/results/quick/`) or `make bench-full` (these "
        "figures; or one `python -m bench.<name>` at a time).",
        "",
    ]
    compound = _load(results, "compound")
    if compound:
        setup = compound["setup"]
        lines += [
            f"**Compound failure** — 10-step refund runs, {setup['service_fail_rate']:.0%} "
            "transient faults on every tool call and every model call "
            f"(`{compound.get('command', 'python -m bench.compound')}`):",
            "",
            "| arm | runs | success | duplicate side effects | unfinished, effects left "
            "| compensated | parked | run p50 / p95 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        labels = {
            "naive": "plain loop, no retries",
            "retry": f"plain loop, {setup['retry_arm_tries']} tries, SIGKILL + restart",
            "spine": "Spine, workers SIGKILLed + server restarted",
        }
        for name, a in compound["arms"].items():
            lines.append(
                f"| {labels.get(name, name)} | {a['runs']} | {a['success_rate']:.1%} "
                f"| {a['duplicate_side_effects']} | {a['unfinished_with_side_effects_left']} "
                f"| {a['compensated_runs']} | {a['parked']} "
                f"| {_s(a['run_s']['median'])} / {_s(a['run_s']['p95'])} |"
            )
        lines.append("")
    peers = _load(results, "peers")
    if peers:
        lines += [
            f"**Peers** — the same scripted 10-step agent, one run at a time, same dev server "
            f"(`{peers.get('command', 'python -m bench.peers')}`):",
            "",
            "| integration | step p50 | step p95 | history / step | events / step "
            f"| #1890: {peers['setup']['docs_calls']} calls x 20 KB |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for name, a in peers["ten_step"].items():
            d = peers["issue_1890"].get(name, {})
            lines.append(
                f"| {name} | {a['step_ms']['median']:.0f} ms | {a['step_ms']['p95']:.0f} ms "
                f"| {a['history_bytes_per_step'] / 1024:.1f} KiB "
                f"| {a['history_events_per_step']:.1f} "
                f"| {d.get('outcome', '—')[:70]}; {d.get('bytes', 0) / 2**20:.1f} MiB |"
            )
        lines.append("")
    long = _load(results, "long_runs")
    if long:
        lines += [
            f"**Long runs** — {long['setup']['steps']} steps "
            f"(`{long.get('command', 'python -m bench.long_runs')}`): "
            f"{long['runs_in_chain']} runs in the continue-as-new chain, at most "
            f"{long['max_events_per_run']} events and {long['max_bytes_per_run'] / 2**20:.2f} MiB "
            "per run (warning limits: 10,240 events, 10 MiB); history per step "
            f"{long['bytes_per_step_early']:.0f} B early vs {long['bytes_per_step_late']:.0f} B "
            f"late (x{long['late_over_early']:.2f}); {long['ms_per_step']:.0f} ms per step.",
            "",
        ]
    overhead = _load(results, "overhead")
    if overhead:
        labels = {
            "activity": "tool as a regular activity",
            "rate_limited": "tool in a fleet-wide rate-limit group",
            "local": "tool as a local activity",
            "openai": "OpenAI SDK to the local wire-format server, tool as an activity",
            "anthropic": "Anthropic SDK to the local wire-format server, tool as an activity",
        }
        lines += [
            "**Overhead** — a Spine step (every guard, audit log and tracing on) vs a bare "
            "Temporal step doing the same lookup, same server, alternating "
            f"(`{overhead.get('command', 'python -m bench.overhead')}`):",
            "",
            "| path | Spine step | bare step | ratio |",
            "|---|---:|---:|---:|",
        ]
        for path, f in overhead["single"].items():
            lines.append(
                f"| {labels.get(path, path)}, one run at a time | {f['spine_step_ms']:.0f} ms "
                f"| {f['bare_step_ms']:.0f} ms | {f['ratio']:.2f} |"
            )
        c = overhead["concurrent"]
        lines += [
            f"| {c['runs']} concurrent runs of {c['steps_per_run']} steps (throughput), "
            f"{c.get('topology', 'server and workers share every core')} "
            f"| {c['spine_steps_per_s']:.1f} steps/s | {c['bare_steps_per_s']:.1f} steps/s "
            f"| {c['ratio']:.2f} |",
        ]
        separate = overhead.get("concurrent_separate_cores")
        if separate:
            lines.append(
                f"| the same, {separate['topology']} "
                f"| {separate['spine_steps_per_s']:.1f} steps/s "
                f"| {separate['bare_steps_per_s']:.1f} steps/s | {separate['ratio']:.2f} |"
            )
        pg = overhead.get("concurrent_pg3")
        if pg:
            lines.append(
                f"| the same over 3 worker processes sharing PostgreSQL "
                f"| {pg['steps_per_s']:.1f} steps/s | {c['bare_steps_per_s']:.1f} steps/s "
                f"| {pg['ratio_to_bare']:.2f} |"
            )
        for arm in (c, separate or {}):
            cpu = arm.get("cpu_ms_per_step")
            if cpu:
                lines += [
                    "",
                    f"CPU per step in the concurrent arm ({arm.get('topology', 'shared cores')}; "
                    f"from /proc): worker {cpu['spine']['worker']:.1f} ms (bare "
                    f"{cpu['bare']['worker']:.1f} ms), Temporal server "
                    f"{cpu['spine']['server']:.1f} ms (bare {cpu['bare']['server']:.1f} ms).",
                ]
        lines.append("")
    recovery = _load(results, "recovery")
    if recovery:
        lines += [
            f"**Recovery** (`{recovery.get('command', 'python -m bench.recovery')}`), "
            "seconds to the run's next completed task:",
            "",
            "| fault | trials | median | p95 |",
            "|---|---:|---:|---:|",
        ]
        for kind, f in recovery["figures"].items():
            lines.append(
                f"| {kind} | {f['measured']} | {_s(f['progress_s']['median'])} "
                f"| {_s(f['progress_s']['p95'])} |"
            )
        lines += [
            "",
            "A call in flight on a SIGKILLed worker is retried when Temporal notices it is gone: "
            "after its heartbeat timeout (tools heartbeat every second; 5 s for a tool whose "
            "timeout is longer, 10 s for a model call), or its start-to-close timeout if that is "
            "shorter (the `sigkill 3s` row: a tool with a 3 s timeout). `sigkill 15s` is the "
            "demo's tools (15 s timeout, 5 s heartbeat timeout).",
            "",
        ]
    parallel = _load(results, "parallel")
    if parallel:
        command = parallel.get("command", "python -m bench.parallel")
        lines += [
            f"**Parallel tool calls** — one turn of N order lookups ({parallel['latency_ms']} ms "
            "each in the service), run at once vs one by one, turn time from history, median of "
            f"{parallel['rounds']} rounds (`{command}`):",
            "",
            "| calls | parallel turn | one by one | speed-up |",
            "|---:|---:|---:|---:|",
        ]
        for row in parallel["rows"]:
            lines.append(
                f"| {row['calls']} | {_s(row['parallel_turn_s'])} | {_s(row['sequential_turn_s'])} "
                f"| {row['speedup']:.2f}x |"
            )
        lines.append("")
    streaming = _load(results, "streaming")
    if streaming:
        lines += [
            f"**Live streaming** — a {streaming['answer_chars']}-character answer streamed in "
            f"pieces {streaming['piece_ms']} ms apart through each SDK, median of "
            f"{streaming['runs']} runs, from the model call's start "
            f"(`{streaming.get('command', 'python -m bench.streaming')}`):",
            "",
            "| provider | first token | answer done | first token seen by a reader |",
            "|---|---:|---:|---:|",
        ]
        for provider, r in streaming["providers"].items():
            lines.append(
                f"| {provider} | {r['first_token_s'] * 1000:.0f} ms | {_s(r['answer_s'])} "
                f"| {r['first_token_seen_s'] * 1000:.0f} ms |"
            )
        lines.append("")
    images = sorted(p.name for p in results.glob("*.png"))
    if images:
        lines.append("Plots: " + ", ".join(f"`{_shown(results)}/{name}`" for name in images))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = p.parse_args()
    results: Path = args.results
    results.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    for name, plot in (
        ("compound", plot_compound),
        ("peers", plot_peers),
        ("long_runs", plot_long_runs),
        ("recovery", plot_recovery),
        ("overhead", plot_overhead),
    ):
        data = _load(results, name)
        if data is None:
            print(f"no {results / (name + '.json')}; run python -m bench.{name} --out ... first")
            continue
        made += plot(data, results)
    for path in made:
        print(f"wrote {path}")
    print()
    print(markdown(results))


if __name__ == "__main__":
    main()
