"""Benchmark of branches: one instance's `parallel` fan-out, and a `for_each` whose items run child
instances that spread over the nodes.

Run from the repository root:  python3 bench/bench_fanout.py [--quick] [--json FILE]

Clusters are those of bench_workflows: real `serve` processes (--concurrency 8, no --app) on a fresh
database in a fresh folder under bench/, removed at the end, warmed up until every node has run an
instance. The benchmark itself is a passing client (nodeflow.connect() without a node id).

(a) parallel: one instance whose `parallel` names 100 branches (the most one names), each a
`work` activity of 20 ms io, then a set; one node. Time = the instance's `ended` minus
time.time() just before nf.start(); the runs go one after the other on one cluster, after one
untimed. Done one branch after the other this would take 100 x 20 ms = 2 s; a burst runs the
ready branches side by side, so the target is well under that: < 0.5 s. The note gives the
bursts (distinct fences in its journal; a burst runs at most 100 steps) and its steps.

(b) for_each over children: one instance whose `for_each` (parallel) goes through 100 items, each
item's branch a `run` of a child definition doing 20 ms of io work; 1, 2 and 4 nodes, each run a
fresh cluster, interleaved 1, 2, 4 round after round; per cluster one untimed instance (10 items),
then the timed ones (the cluster's value: their median). Time = the parent's `ended` minus
time.time() just before nf.start(). The children are instances like any other, so more nodes
run more of them at once: targets 2 nodes faster than 1 and 4 faster than 2 (the ratio of the
times of one round's clusters, median over the rounds, > 1). Notes: the nodes' shares of the
children's steps, the parent's bursts, and how many of its bursts were refused at their commit
(a child's end moved the parent on while its burst ran; it runs again).

Targets are printed as PASS or MISS, never asserted. The standard library only.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_workflows as wf  # bench/ is first on sys.path: the script's own folder
import benchlib
from benchlib import Row, verdict

import nodeflow

REPO = wf.REPO
BRANCHES = 100  # nodeflow.PARALLEL_MAX_BRANCHES: the most one parallel names
WORK = "20ms"
WORK_S = 0.020
TARGET_PARALLEL_S = 0.5  # against 100 x 20 ms = 2 s one after the other
TARGET_SPEEDUP = 1.0  # 2 nodes against 1, 4 against 2: faster
REFUSED = re.compile(r"instance ([0-9a-f]{16}): burst of fence \d+ not committed: the instance moved past seq")


@dataclass(frozen=True)
class Plan:
    parallel_runs: int  # timed instances of (a), one after the other on one cluster
    rounds: int  # rounds of (b): a fresh cluster of each node count per round
    node_counts: tuple[int, ...]
    items: int  # for_each items of (b), a child each
    per_cluster: int  # timed instances of (b) per cluster


FULL_PLAN = Plan(parallel_runs=10, rounds=5, node_counts=(1, 2, 4), items=100, per_cluster=3)
QUICK_PLAN = Plan(parallel_runs=5, rounds=3, node_counts=(1, 2, 4), items=100, per_cluster=1)


# The workflows ----------------------------------------------------------------------------------

WIDE: dict[str, Any] = {
    "id": "bench-wide",
    "start": "fan",
    "activities": {
        "fan": {"type": "parallel", "branches": [f"w{i:03d}" for i in range(BRANCHES)], "next": "done"},
        **{f"w{i:03d}": {"type": "work", "duration": WORK, "kind": "io"} for i in range(BRANCHES)},
        "done": {"type": "set", "values": {"done": True}},
    },
}
CHILD: dict[str, Any] = {
    "id": "bench-child",
    "start": "work",
    "activities": {"work": {"type": "work", "duration": WORK, "kind": "io"}},
}
ITEMS: dict[str, Any] = {
    "id": "bench-items",
    "start": "each",
    "activities": {
        "each": {"type": "for_each", "items": "{input.items}", "as": "item", "body": "child", "parallel": True,
                 "next": "done"},
        "child": {"type": "run", "definition": "bench-child", "input": {"item": "{item}"}},
        "done": {"type": "set", "values": {"done": True}},
    },
}  # fmt: skip


# Runs -----------------------------------------------------------------------------------------------


def run_one(nf: nodeflow.Cluster, workflow: str, data: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """Start one instance and wait for it: its time from start to end, its bursts and steps."""
    begun = time.time()
    instance = nf.start(workflow, data)
    found = nf.wait(instance, timeout=timeout)
    if found.status != "completed" or found.ended is None:
        raise RuntimeError(f"{workflow} instance {instance} is {found.status}: {found.error}")
    (bursts, steps), = wf.read(
        nf, "SELECT COUNT(DISTINCT fence), COUNT(*) FROM journal WHERE instance = ?", (instance,)
    )  # fmt: skip
    return {"instance": instance, "elapsed_s": found.ended - begun, "bursts": bursts, "steps": steps}


def refused_bursts(nodes: wf.Nodes, instance: str) -> int:
    return sum(
        found == instance
        for log in nodes.logs.values()
        for found in REFUSED.findall(Path(log).read_text(errors="replace"))
    )


def measure_parallel(bench: wf.Bench, plan: Plan, progress: benchlib.Progress) -> list[dict[str, Any]]:
    runs = []
    with bench.cluster("parallel-1n", 1) as (nodes, nf):
        nf.define(WIDE)
        run_one(nf, WIDE["id"], {})  # untimed: the blueprint cached, the paths warm
        for _ in range(plan.parallel_runs):
            run = run_one(nf, WIDE["id"], {})
            run["refused"] = refused_bursts(nodes, run["instance"])
            run["load1"] = os.getloadavg()[0]
            runs.append(run)
    times = [run["elapsed_s"] * 1000 for run in runs]
    progress(
        f"parallel, {BRANCHES} branches of {WORK} io, 1 node: median {statistics.median(times):.0f} ms "
        f"({min(times):.0f}..{max(times):.0f}), {runs[-1]['bursts']} bursts, {runs[-1]['steps']} steps"
    )
    return runs


def children_run(bench: wf.Bench, plan: Plan, count: int) -> dict[str, Any]:
    """One fresh cluster of ``count`` nodes: an untimed instance, then the timed ones."""
    with bench.cluster(f"items-{count}n", count) as (nodes, nf):
        nf.define(CHILD)
        nf.define(ITEMS)
        run_one(nf, ITEMS["id"], {"items": list(range(10))})
        runs = []
        for _ in range(plan.per_cluster):
            run = run_one(nf, ITEMS["id"], {"items": list(range(plan.items))})
            shares = dict(
                wf.read(
                    nf,
                    "SELECT node, COUNT(*) FROM journal WHERE instance IN "
                    "(SELECT id FROM instances WHERE parent = ?) GROUP BY node",
                    (run["instance"],),
                )
            )
            children = wf.read(
                nf,
                "SELECT COUNT(*), SUM(status = 'completed') FROM instances WHERE parent = ?",
                (run["instance"],),
            )[0]
            if tuple(children) != (plan.items, plan.items):
                raise RuntimeError(f"{count} node(s): children (all, completed) {tuple(children)}, not {plan.items}")
            total = sum(shares.values())
            run["child_shares"] = {node: steps / total for node, steps in sorted(shares.items())}
            run["refused"] = refused_bursts(nodes, run["instance"])
            runs.append(run)
    return {
        "nodes": count,
        "elapsed_s": statistics.median(run["elapsed_s"] for run in runs),
        "runs": runs,
        "load1": os.getloadavg()[0],
    }


def measure_children(bench: wf.Bench, plan: Plan, progress: benchlib.Progress) -> dict[int, list[dict[str, Any]]]:
    found: dict[int, list[dict[str, Any]]] = {count: [] for count in plan.node_counts}
    for r in range(plan.rounds):
        for count in plan.node_counts:
            run = children_run(bench, plan, count)
            found[count].append(run)
            last = run["runs"][-1]
            progress(
                f"for_each of {plan.items} children, round {r + 1}/{plan.rounds}, {count} node(s): "
                f"{run['elapsed_s'] * 1000:.0f} ms; parent {last['bursts']} bursts, {last['refused']} refused; "
                "children's steps " + " ".join(f"{n} {s:.0%}" for n, s in last["child_shares"].items())
                + f" (load {run['load1']:.2f})"
            )  # fmt: skip
    return found


# The run ----------------------------------------------------------------------------------------------


def run_benchmark(plan: Plan, progress: benchlib.Progress) -> tuple[list[Row], dict[str, Any]]:
    bench_dir = REPO / "bench"
    folder = tempfile.mkdtemp(prefix="tmp-fan-", dir=bench_dir)
    meta: dict[str, Any] = {
        **benchlib.environment(nodeflow.filesystem_type(folder), str(bench_dir)),
        "commit": wf.commit_of_repo(),
        "concurrency": wf.CONCURRENCY,
        "plan": plan.__dict__,
    }
    progress(f"load average at start {' '.join(f'{x:.2f}' for x in meta['loadavg_at_start'])}")
    bench = wf.Bench(folder)
    try:
        parallel = measure_parallel(bench, plan, progress)
        children = measure_children(bench, plan, progress)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    rows: list[Row] = []
    row = Row("parallel_100", f"parallel, {BRANCHES} branches x {WORK} io, 1 node: start -> completed", "ms")
    row.runs = [run["elapsed_s"] * 1000 for run in parallel]
    row.settle()
    row.target = f"< {TARGET_PARALLEL_S * 1000:g} ms"
    row.result = verdict(row.value is not None and row.value < TARGET_PARALLEL_S * 1000)
    bursts = statistics.median(run["bursts"] for run in parallel)
    row.note = (
        f"one after the other: {BRANCHES * WORK_S * 1000:,.0f} ms; {bursts:.0f} bursts, {parallel[-1]['steps']} "
        f"steps, {sum(run['refused'] for run in parallel)} refused; n={len(parallel)}"
    )
    rows.append(row)

    for count in plan.node_counts:
        got = children[count]
        label = f"for_each, {plan.items} items each running a child ({WORK} io), {count} node(s)"
        row = Row(f"children_{count}", label, "ms")
        row.runs = [run["elapsed_s"] * 1000 for run in got]
        row.settle()
        every = [one for run in got for one in run["runs"]]
        shares = got[-1]["runs"][-1]["child_shares"]
        row.note = (
            f"parent bursts {statistics.median(one['bursts'] for one in every):.0f}, refused "
            f"{statistics.median(one['refused'] for one in every):.0f} (medians); children's steps "
            + " ".join(f"{node} {share:.0%}" for node, share in shares.items())
            + f"; load {statistics.median(run['load1'] for run in got):.2f}"
        )
        rows.append(row)
    for fewer, more in zip(plan.node_counts, plan.node_counts[1:], strict=False):
        row = Row(f"speedup_{more}_{fewer}", f"  {more} nodes against {fewer}: time({fewer}) / time({more})", "x")
        row.runs = [a["elapsed_s"] / b["elapsed_s"] for a, b in zip(children[fewer], children[more], strict=True)]
        row.settle()
        row.target = f"> {TARGET_SPEEDUP:g}x"
        row.result = verdict(row.value is not None and row.value > TARGET_SPEEDUP)
        row.note = "median of the rounds' ratios"
        rows.append(row)

    meta.update(
        {
            "parallel": parallel,
            "children": {str(count): runs for count, runs in children.items()},
            "clusters": bench.clusters,
            "log_trouble": bench.trouble,
            "stop_exits": sorted(bench.exits, key=lambda code: -1 if code is None else code),
            "loadavg_1m_max_at_cluster_starts": round(max(bench.load_seen), 2),
            "loadavg_at_end": benchlib.loadavg(),
        }
    )
    return rows, meta


def render(rows: list[Row], meta: dict[str, Any], quick: bool) -> str:
    plan = meta["plan"]
    trouble = meta["log_trouble"]
    busy = meta["loadavg_1m_max_at_cluster_starts"]
    cpus = meta["cpus"] or 1
    intro = [
        benchlib.headline(
            "nodeflow fan-out benchmark",
            meta,
            quick,
            f"serve --concurrency {meta['concurrency']}",
            at=f" at {meta['commit']}",
        ),
        f"parallel: {plan['parallel_runs']} instances of {BRANCHES} branches on 1 node; for_each: {plan['rounds']} "
        f"round(s) of fresh clusters of {', '.join(map(str, plan['node_counts']))} nodes, {plan['per_cluster']} "
        f"instance(s) of {plan['items']} children each",
        f"1-minute load at cluster starts: up to {busy:.2f} on {cpus} CPUs"
        + (" (BUSY: the numbers are noisy)" if busy > 0.5 * cpus else "")
        + f"; {meta['clusters']} clusters; nodes' logs: trouble in {len(trouble)} line(s)"
        + (" (first: " + trouble[0] + ")" if trouble else "")
        + f"; graceful stops exited {meta['stop_exits']}",
    ]
    return benchlib.render_table(rows, intro)


def main(argv: list[str] | None = None) -> int:
    return benchlib.main(
        argv,
        description="Benchmark nodeflow's branches: a 100-branch parallel, a for_each of children on 1, 2, 4 nodes.",
        quick_help="fewer runs and rounds (a smoke test, < 2 min)",
        full_plan=FULL_PLAN,
        quick_plan=QUICK_PLAN,
        run=run_benchmark,
        render=render,
    )


if __name__ == "__main__":
    sys.exit(main())
