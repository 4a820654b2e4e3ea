"""Benchmark of retention: the node in office removing ended instances while three nodes work.

Run from the repository root:  python3 bench/bench_retention.py [--quick] [--json FILE]

A database holding 100,000 completed instances that ended over the last 30 days (built as
bench_workflows.build_history builds it: 3-5 journal rows each, and the fence counter its instance
lock leaves) is copied for each cluster of 3 real `serve` processes. With `--keep-instances 7d`
(the default) the node that takes office starts at once to remove the 23 days' worth past
retention (about 77,000 instances), batch by batch; with `--keep-instances 365d` it removes nothing.
Each round runs both on fresh copies, alternating which goes first: after the warm-up, the no-work
workflow of bench_workflows (set / if / set), all instances started up front, rate = instances /
(the last one's `ended` - the time just before the first start), as in bench_workflows.

Rows: the rate with the prune under way and without it, their ratio (median of the ratios of the
rounds' pairs), how many instances the prune removed while the measured load ran (to show they
overlapped), how long it took to remove all of them (from the nodes' start), and the database's
pages after the prune and after a second load of the same size: SQLite keeps freed pages on its
free list, so the second load reuses them and the file does not grow. That is how one week of
retained load follows the next without the file growing.

Targets are printed as PASS or MISS, never asserted. The standard library only.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import bench_workflows as wf  # bench/ is first on sys.path: the script's own folder
import benchlib
from benchlib import Row, verdict

import nodeflow

TARGET_RATIO = 0.80  # throughput while the prune runs, against without it
KEEP = 7 * 86400.0
NODES = 3


class Plan:
    def __init__(self, rounds: int, instances: int, history: int) -> None:
        self.rounds, self.instances, self.history = rounds, instances, history


FULL_PLAN = Plan(rounds=3, instances=5000, history=100_000)
QUICK_PLAN = Plan(rounds=1, instances=2000, history=100_000)


def past_retention(nf: nodeflow.Cluster) -> int:
    cutoff = time.time() - KEEP
    rows = wf.read(
        nf,
        "SELECT COUNT(*) FROM instances WHERE status IN ('completed', 'faulted', 'cancelled') AND updated < ?",
        (cutoff,),
    )
    return int(rows[0][0])


def pages(nf: nodeflow.Cluster) -> tuple[int, int]:
    rows = wf.read(nf, "SELECT * FROM pragma_page_count(), pragma_freelist_count()")
    return int(rows[0][0]), int(rows[0][1])


def load(nf: nodeflow.Cluster, instances: int) -> tuple[float, float]:
    """Start `instances` no-work instances up front and wait for them: (rate, begun)."""
    workflow = wf.NOWORK["id"]
    begun = time.time()
    wf.start_many(nf, workflow, instances)
    wf.wait_settled(nf, 300)
    (done, last), = wf.read(
        nf, "SELECT SUM(status = 'completed'), MAX(ended) FROM instances WHERE definition = ? AND created >= ?",
        (workflow, begun),
    )  # fmt: skip
    if done != instances:
        raise RuntimeError(f"{done} of {instances} instances completed")
    return done / (last - begun), begun


def retention_run(bench: wf.Bench, template: str, keep: str, plan: Plan) -> dict[str, Any]:
    started = time.monotonic()
    with bench.cluster(f"keep-{keep}", NODES, template, ("--keep-instances", keep)) as (nodes, nf):
        nf.define(wf.NOWORK)
        wf.start_many(nf, wf.NOWORK["id"], 2 * wf.CONCURRENCY * NODES)
        wf.wait_settled(nf, 30)
        due_before = past_retention(nf)
        rate, _ = load(nf, plan.instances)
        due_after = past_retention(nf)
        result: dict[str, Any] = {
            "keep": keep, "rate": rate, "due_at_start": due_before, "removed_during": due_before - due_after,
            "load1": os.getloadavg()[0],
        }  # fmt: skip
        if keep == "7d":
            deadline = time.monotonic() + 600
            while past_retention(nf) and time.monotonic() < deadline:
                time.sleep(0.2)
            if past_retention(nf):
                raise RuntimeError("the prune did not end within 600 s")
            result["prune_s"] = time.monotonic() - started
            result["pages_after_prune"] = pages(nf)
            load(nf, plan.instances)
            result["pages_after_second_load"] = pages(nf)
            result["size_mb"] = os.path.getsize(nodes.db) / 1e6
    return result


def run_benchmark(plan: Plan, progress: benchlib.Progress) -> tuple[list[Row], dict[str, Any]]:
    bench_dir = wf.REPO / "bench"
    folder = tempfile.mkdtemp(prefix="tmp-ret-", dir=bench_dir)
    meta: dict[str, Any] = {
        **benchlib.environment(nodeflow.filesystem_type(folder), str(bench_dir)),
        "commit": wf.commit_of_repo(),
        "plan": plan.__dict__,
    }
    bench = wf.Bench(folder)
    runs: dict[str, list[dict[str, Any]]] = {"7d": [], "365d": []}
    try:
        template = os.path.join(folder, "history.db")
        built = wf.build_history(template, plan.history)
        meta["history"] = built
        progress(f"history: {built['instances']:,} instances, {built['journal_rows']:,} journal rows, "
                 f"{built['size_mb']} MB")  # fmt: skip
        for r in range(plan.rounds):
            for keep in ("7d", "365d") if r % 2 == 0 else ("365d", "7d"):
                run = retention_run(bench, template, keep, plan)
                runs[keep].append(run)
                progress(
                    f"round {r + 1}/{plan.rounds}, keep {keep}: {run['rate']:,.0f} instances/s, removed "
                    f"{run['removed_during']:,} during the load"
                    + (f", all in {run['prune_s']:.1f} s" if "prune_s" in run else "")
                    + f" (load {run['load1']:.2f})"
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    meta["loadavg_at_end"] = benchlib.loadavg()
    meta["runs"] = runs
    rows = []
    for keep, label in (("365d", "throughput, no prune (keep 365d)"), ("7d", "throughput, prune under way (keep 7d)")):
        row = Row(f"rate_keep_{keep}", f"{label}, {NODES} nodes", "inst/s")
        row.runs = [run["rate"] for run in runs[keep]]
        row.settle()
        row.note = f"{plan.instances:,} no-work instances; load {statistics.median(r['load1'] for r in runs[keep]):.2f}"
        rows.append(row)
    ratio = Row("ratio", "  prune under way / no prune", "x")
    ratio.runs = [a["rate"] / b["rate"] for a, b in zip(runs["7d"], runs["365d"], strict=True)]
    ratio.settle()
    ratio.target = f">= {TARGET_RATIO:g}x"
    ratio.result = verdict(ratio.value is not None and ratio.value >= TARGET_RATIO)
    ratio.note = "median of paired rounds"
    rows.append(ratio)
    removed = Row("removed_during", "instances removed while the load ran", "inst")
    removed.runs = [float(run["removed_during"]) for run in runs["7d"]]
    removed.settle()
    removed.note = (
        f"of {statistics.median(run['due_at_start'] for run in runs['7d']):,.0f} still past retention at its start"
    )
    rows.append(removed)
    took = Row("prune_s", "time to remove every instance past retention", "s")
    took.runs = [run["prune_s"] for run in runs["7d"]]
    took.settle()
    took.note = "from the nodes' start, with the load running part of the time"
    rows.append(took)
    last = runs["7d"][-1]
    (after, free_after), (again, free_again) = last["pages_after_prune"], last["pages_after_second_load"]
    grow = Row("pages_growth", "database pages added by a second load after the prune", "pages")
    grow.value = float(again - after)
    grow.target = "0"
    grow.result = verdict(again <= after)
    grow.note = (f"{after:,} pages ({free_after:,} free) after the prune, {again:,} ({free_again:,} free) after "
                 f"{plan.instances:,} more instances; file {last['size_mb']:.1f} MB")  # fmt: skip
    rows.append(grow)
    return rows, meta


def render(rows: list[Row], meta: dict[str, Any], quick: bool) -> str:
    plan = meta["plan"]
    intro = [
        benchlib.headline(
            "nodeflow retention benchmark",
            meta,
            quick,
            f"{NODES} serve nodes, synchronous FULL",
            at=f" at {meta['commit']}",
        ),
        f"{plan['rounds']} round(s); a copy of {plan['history']:,} completed instances ended over 30 days for each "
        f"cluster; {plan['instances']:,} no-work instances per load",
    ]
    return benchlib.render_table(rows, intro)


def main(argv: list[str] | None = None) -> int:
    return benchlib.main(
        argv,
        description="Benchmark retention: 3 serve nodes' throughput while the node in office removes ended instances.",
        quick_help="one round with fewer instances (about 2 minutes)",
        full_plan=FULL_PLAN,
        quick_plan=QUICK_PLAN,
        run=run_benchmark,
        render=render,
    )


if __name__ == "__main__":
    sys.exit(main())
