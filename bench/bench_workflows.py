"""Benchmark of nodeflow's workflow runtime on real `serve` processes: throughput, latency, define
propagation, and a database with 100,000 finished instances.

Run from the repository root:  python3 bench/bench_workflows.py [--quick] [--json FILE]

Every cluster is N real `serve` processes (this interpreter running nodeflow.py, --node-id n1..nN,
--concurrency 8, no --app: no workflow here calls a function) on a fresh database of its own, in a
fresh temporary folder under bench/ (on the repository's filesystem), removed at the end. The
benchmark itself is a passing client (nodeflow.connect() without a node id). A cluster counts as
up once every node has logged "joined" and has run an instance of a warm-up workflow (one 20 ms io
step; batches of twice what the nodes run at once, until the journal names every node).

Throughput: a 3-step workflow without timers, in two variants: (a) "no work", set / if / set (no
log activity, so nodes print nothing per step); (b) "io work", three {"type": "work", "duration":
"20ms", "kind": "io"} steps. After a warm-up of twice as many instances as the nodes run at
once (each node has the blueprint cached), the client starts all the instances up front
(nf.astart, 500 at a time in flight, so they share commits) and polls until none is running;
rate = instances / (the last instance's `ended` - time.time() just before the first start).
Every run is a fresh cluster; the runs are interleaved 1, 2, 4 nodes, round after round, and the
"2 nodes / 1 node" ratio is the median of the ratios of the runs of one round (which ran a few
seconds apart). Notes: each node's share of the journal rows, and the nodes' CPU time
(/proc/PID/stat) per instance over the run.

Latency: on an idle 2-node cluster, nf.start(...) then nf.wait(id), one instance at a time,
0-5 ms apart, after 10 untimed; the note gives the node's share (ended - created of the instance).

Define to every node: on a 2-node cluster, ~20 times (0.15-0.3 s apart) nf.define() a new version
of a workflow that has a signal trigger, then nf.signal() it back to back until each node has
started an instance of the new version ("started_by" names the node); the time is the latest of
the nodes' first such instance's `created` minus time.time() just before define. A trigger's start
reads the instruction log first, so this is what a user sees. The other row reads
instruction_cursors: the latest `updated` (the node's clock, in the commit that saved it) of a node
cursor that reached the instruction the define appended (MAX(id) of instructions read right after
it); a node saves its cursor when its listener has applied the log, so this is the background
propagation by doorbell. A start after a define that got the old version is counted ("stale").

Scale: a database holding 100,000 completed instances of another workflow (3-5 journal rows each
and the lock_fences row each instance's lock leaves, INSERTed directly with sqlite3 in one
transaction, ids random, created over 30 days; built once, then copied for each run) against an
empty one, 2 nodes, variant (a): rate (the note adds what the nodes handed to write() and what
reached the disk, /proc/PID/io wchar and write_bytes, per instance), the nodes' VmRSS
(/proc/PID/status, the larger of the two, read after the run), `python3 nodeflow.py --db DB
instances --status running` wall time (the median of 5 per round; the note gives `--version`, the
interpreter + compile + import floor), and in this process nf.instances(status="running") (the
median of 50 calls) and nf.instances(limit=20) (10 calls). The empty and the large run alternate
which goes first, round by round.

Targets are printed as PASS or MISS, never asserted. The standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# benchlib: bench/benchlib.py, found because Python puts the script's folder first on sys.path
import benchlib  # noqa: E402
from benchlib import Row, percentile, verdict  # noqa: E402

import nodeflow  # noqa: E402

CONCURRENCY = 8
START_IN_FLIGHT = 500
SIGNAL = "bench-define"

TARGET_IO_SPEEDUP = 1.0  # 2 nodes / 1 node, io work: faster
TARGET_NOWORK_RATIO = 0.95  # 2 nodes / 1 node, no work: no slower
TARGET_LATENCY_P50_MS = 20.0
TARGET_DEFINE_MS = 50.0
TARGET_SCALE_RATE_RATIO = 0.80
TARGET_SCALE_RSS_MB = 10.0
TARGET_CLI_MS = 100.0

_plain_format_number = benchlib.format_number


def _format_number(value: float, unit: str) -> str:
    """benchlib's formats, and instances per second as a whole number like its other rates."""
    return f"{value:,.0f}" if unit == "inst/s" else _plain_format_number(value, unit)


benchlib.format_number = _format_number  # this process only: render_table looks it up at call time


@dataclass(frozen=True)
class Plan:
    rounds: int  # throughput runs of each (variant, nodes), interleaved
    node_counts: tuple[int, ...]
    nowork_instances: int
    io_instances_per_node: int
    latency_samples: int
    defines: int
    history: int  # completed instances in the large database
    scale_rounds: int
    cli_runs: int  # per database per round
    inprocess_calls: int


FULL_PLAN = Plan(
    rounds=5,
    node_counts=(1, 2, 4),
    nowork_instances=5000,
    io_instances_per_node=500,
    latency_samples=200,
    defines=20,
    history=100_000,
    scale_rounds=4,
    cli_runs=5,
    inprocess_calls=50,
)
QUICK_PLAN = Plan(
    rounds=1,
    node_counts=(1, 2, 4),
    nowork_instances=2000,
    io_instances_per_node=150,
    latency_samples=100,
    defines=8,
    history=100_000,
    scale_rounds=1,
    cli_runs=5,
    inprocess_calls=50,
)


# The workflows ----------------------------------------------------------------------------------

NOWORK: dict[str, Any] = {
    "id": "bench-nowork",
    "start": "a",
    "activities": {
        "a": {"type": "set", "values": {"x": 1}, "next": "b"},
        "b": {"type": "if", "condition": {"var": "x", "op": "==", "value": 1}, "next": "c"},
        "c": {"type": "set", "values": {"y": "{x}"}},
    },
}
IO: dict[str, Any] = {
    "id": "bench-io",
    "start": "a",
    "activities": {
        "a": {"type": "work", "duration": "20ms", "kind": "io", "next": "b"},
        "b": {"type": "work", "duration": "20ms", "kind": "io", "next": "c"},
        "c": {"type": "work", "duration": "20ms", "kind": "io"},
    },
}
WARMUP: dict[str, Any] = {
    "id": "bench-warmup",
    "start": "a",
    "activities": {"a": {"type": "work", "duration": "20ms", "kind": "io"}},
}
VARIANTS = {"nowork": NOWORK, "io": IO}
VARIANT_LABEL = {"nowork": "no work (set/if/set)", "io": "io work (3 x 20 ms)"}


def versioned(k: int) -> dict[str, Any]:
    """The workflow the define rows redefine: each k is a new version (its variables differ)."""
    return {
        "id": "bench-define",
        "start": "a",
        "variables": {"rev": k},
        "triggers": [{"type": "signal", "name": SIGNAL}],
        "activities": {"a": {"type": "set", "values": {"seen": "{rev}"}}},
    }


HISTORY: dict[str, Any] = {
    "id": "bench-history",
    "start": "receive",
    "activities": {
        "receive": {"type": "set", "values": {"total": "{input.total}"}, "next": "check"},
        "check": {
            "type": "if",
            "condition": {"var": "total", "op": ">", "value": 100},
            "then": "review",
            "else": "ship",
        },
        "review": {"type": "set", "values": {"reviewed": True}, "next": "ship"},
        "ship": {"type": "if", "condition": {"var": "input.notify", "op": "exists"}, "then": "note"},
        "note": {"type": "log", "message": "order {input.order} shipped"},
    },
}


# /proc ----------------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def usage(pid: int) -> dict[str, float]:
    """CPU seconds (utime + stime) and write counters (/proc/PID/io: wchar, what write() was handed;
    write_bytes, what went to the block layer) of a process."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        data = stat.read()
    fields = data[data.rindex(")") + 2 :].split()
    found = {"cpu_s": (int(fields[11]) + int(fields[12])) / CLOCK_TICKS}
    with open(f"/proc/{pid}/io", encoding="ascii") as io:
        for line in io:
            key, value = line.split(":")
            if key in ("wchar", "write_bytes"):
                found[key] = float(value)
    return found


# The nodes ------------------------------------------------------------------------------------------


@dataclass
class Nodes:
    """The `serve` processes of one cluster, with its database and logs in a folder of their own."""

    folder: str
    count: int
    template: str | None = None  # a database file to start from (copied), else a fresh one
    extra: tuple[str, ...] = ()  # more `serve` options for every node
    db: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    exits: dict[str, int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        os.makedirs(self.folder)
        self.db = os.path.join(self.folder, "cluster.db")
        if self.template is not None:
            shutil.copyfile(self.template, self.db)
        nodeflow.connect(self.db).close()  # created (or migrated) once, before the nodes race for it

    def start(self) -> None:
        """Start every node at once; return when each has logged that it joined the cluster."""
        for number in range(1, self.count + 1):
            node = f"n{number}"
            self.logs[node] = os.path.join(self.folder, f"{node}.log")
            with open(self.logs[node], "wb") as err:
                self.procs[node] = subprocess.Popen(
                    [sys.executable, str(REPO / "nodeflow.py"), "--db", self.db, "serve", "--node-id", node,
                     "--concurrency", str(CONCURRENCY), *self.extra],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    cwd=self.folder,
                )  # fmt: skip
        deadline = time.monotonic() + 60
        waiting = set(self.procs)
        while waiting:
            for node in sorted(waiting):
                if " joined " in Path(self.logs[node]).read_text(errors="replace"):
                    waiting.discard(node)
                elif self.procs[node].poll() is not None:
                    raise RuntimeError(f"node {node} exited: {Path(self.logs[node]).read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes {sorted(waiting)} not joined after 60 s; see {self.folder}")
            time.sleep(0.01)

    def rss(self) -> dict[str, float]:
        return {node: rss_mb(proc.pid) for node, proc in self.procs.items()}

    def usage(self) -> dict[str, float]:
        """usage() summed over the nodes."""
        total: dict[str, float] = {}
        for proc in self.procs.values():
            for key, value in usage(proc.pid).items():
                total[key] = total.get(key, 0.0) + value
        return total

    def stop(self) -> None:
        """SIGTERM to every node, then wait (SIGKILL after 15 s); the exit codes go to .exits."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for node, proc in self.procs.items():
            try:
                self.exits[node] = proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.exits[node] = None

    def trouble(self) -> list[str]:
        """Log lines that say something went wrong (the first cold boot of a new node is expected)."""
        words = ("failed", "error", "fault", "lost office", "retrying", "could not", "warning", "dropped", "stale")
        found = []
        for node, log in self.logs.items():
            for line in Path(log).read_text(errors="replace").splitlines():
                if "cold boot" not in line and any(word in line.lower() for word in words):
                    found.append(f"{os.path.basename(self.folder)}/{node}: {line}")
        return found


class Bench:
    """The run's folder, a counter for cluster folders, and what every cluster left behind."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.clusters = 0
        self.trouble: list[str] = []
        self.exits: set[int | None] = set()
        self.load_seen: list[float] = []

    @contextlib.contextmanager
    def cluster(
        self, name: str, count: int, template: str | None = None, extra: tuple[str, ...] = ()
    ) -> Iterator[tuple[Nodes, nodeflow.Cluster]]:
        """A started cluster and a client handle on it; stopped and its folder removed on the way out."""
        self.clusters += 1
        self.load_seen.append(os.getloadavg()[0])
        nodes = Nodes(os.path.join(self.folder, f"{self.clusters:02d}-{name}"), count, template, extra)
        nf: nodeflow.Cluster | None = None
        try:
            nodes.start()
            nf = nodeflow.connect(nodes.db)
            warm_up(nf, nodes)
            yield nodes, nf
        finally:
            if nf is not None:
                nf.close()
            nodes.stop()
            self.trouble += nodes.trouble()
            self.exits |= set(nodes.exits.values())
            shutil.rmtree(nodes.folder, ignore_errors=True)


# Helpers ----------------------------------------------------------------------------------------------


def start_many(nf: nodeflow.Cluster, workflow: str, count: int) -> list[str]:
    """Start `count` instances with up to START_IN_FLIGHT astart calls in flight (they share commits)."""

    async def go() -> list[str]:
        ids: list[str] = []
        for first in range(0, count, START_IN_FLIGHT):
            ids += await asyncio.gather(
                *(nf.astart(workflow, {"n": first + i}) for i in range(min(START_IN_FLIGHT, count - first)))
            )
        return ids

    return asyncio.run(go())


def read(nf: nodeflow.Cluster, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = nf.store.read(lambda conn: conn.execute(sql, args).fetchall())
    return rows


def wait_settled(nf: nodeflow.Cluster, timeout: float) -> None:
    """Until no instance is running or waiting (the status index makes this cheap at any size)."""
    deadline = time.monotonic() + timeout
    while True:
        left = read(nf, "SELECT COUNT(*) FROM instances WHERE status IN ('running', 'waiting')")[0][0]
        if left == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{left} instances still unfinished after {timeout:.0f} s")
        time.sleep(0.01)


def warm_up(nf: nodeflow.Cluster, nodes: Nodes, timeout: float = 60) -> None:
    """Start WARMUP instances (20 ms each), twice as many as the nodes run at once, until every
    node has run one: each node is then consuming the workflow queue. (A batch smaller than one
    node's concurrency may all go to the node that is rung first.)"""
    nf.define(WARMUP)
    deadline = time.monotonic() + timeout
    while True:
        started = start_many(nf, WARMUP["id"], 2 * CONCURRENCY * nodes.count)  # more than one node holds
        wait_settled(nf, timeout)
        marks = ", ".join("?" * len(started))
        query = f"SELECT DISTINCT node FROM journal WHERE instance IN ({marks})"
        seen = {row[0] for row in read(nf, query, (*started,))}
        missing = set(nodes.procs) - seen
        if not missing:
            return
        if time.monotonic() > deadline:
            tails = {node: Path(nodes.logs[node]).read_text(errors="replace")[-2000:] for node in sorted(missing)}
            raise RuntimeError(f"nodes {sorted(missing)} ran no instance in {timeout:.0f} s; their logs end: {tails}")
        time.sleep(0.05)


def timed_ms(call: Callable[[], Any], n: int) -> list[float]:
    """Milliseconds of each of n calls, after n // 10 untimed ones."""
    for _ in range(max(1, n // 10)):
        call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


# Throughput -------------------------------------------------------------------------------------------


def throughput_run(bench: Bench, variant: str, count: int, instances: int, template: str | None = None,
                   cli_runs: int = 0, inprocess_calls: int = 0) -> dict[str, Any]:  # fmt: skip
    """One fresh cluster of `count` nodes runs `instances` instances of the variant's workflow."""
    definition = VARIANTS[variant]
    workflow = definition["id"]
    name = f"{variant}-{count}n" + ("-large" if template else "")
    with bench.cluster(name, count, template) as (nodes, nf):
        nf.define(definition)
        start_many(nf, workflow, 2 * CONCURRENCY * count)
        wait_settled(nf, 30)
        before = nodes.usage()
        begun = time.time()
        start_many(nf, workflow, instances)
        started_s = time.time() - begun
        wait_settled(nf, 300)
        after = nodes.usage()
        (done, faulted, last, journal), = read(
            nf,
            "SELECT SUM(status = 'completed'), SUM(status = 'faulted'), MAX(ended), SUM(steps) FROM instances "
            "WHERE definition = ? AND created >= ?",
            (workflow, begun),
        )  # fmt: skip
        shares = dict(
            read(
                nf,
                "SELECT node, COUNT(*) FROM journal WHERE instance IN "
                "(SELECT id FROM instances WHERE definition = ? AND created >= ?) GROUP BY node",
                (workflow, begun),
            )
        )
        rss = nodes.rss()
        result: dict[str, Any] = {
            "nodes": count,
            "instances": instances,
            "completed": done,
            "faulted": faulted,
            "steps_per_instance": journal / instances,
            "start_s": round(started_s, 3),
            "elapsed_s": round(last - begun, 3),
            "rate": done / (last - begun),
            "step_shares": {node: steps / journal for node, steps in sorted(shares.items())},
            "rss_mb": rss,
            "cpu_ms_per_instance": (after["cpu_s"] - before["cpu_s"]) * 1000 / instances,
            "wchar_kb_per_instance": (after["wchar"] - before["wchar"]) / 1024 / instances,
            "disk_kb_per_instance": (after["write_bytes"] - before["write_bytes"]) / 1024 / instances,
            "load1": os.getloadavg()[0],
        }
        if cli_runs:
            result["cli_ms"] = cli_times(nodes.db, ["instances", "--status", "running"], cli_runs)
            result["cli_version_ms"] = cli_times(nodes.db, ["--version"], cli_runs)
            result["inprocess_ms"] = timed_ms(lambda: nf.instances(status="running"), inprocess_calls)
            result["newest_ms"] = timed_ms(lambda: nf.instances(limit=20), max(5, inprocess_calls // 5))
            result["completed_total"] = read(nf, "SELECT COUNT(*) FROM instances WHERE status = 'completed'")[0][0]
    if done != instances:
        raise RuntimeError(f"{name}: {done} of {instances} instances completed, {faulted} faulted")
    return result


def cli_times(db: str, args: list[str], runs: int) -> list[float]:
    """Wall milliseconds of `python3 nodeflow.py --db DB ARGS...`, each run; it must exit 0."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(REPO / "nodeflow.py"), "--db", db, *args], capture_output=True, check=False
        )
        times.append((time.perf_counter() - start) * 1000)
        if done.returncode != 0:
            raise RuntimeError(f"nodeflow.py {' '.join(args)} exited {done.returncode}: {done.stderr.decode()}")
    return times


def measure_throughput(bench: Bench, plan: Plan, progress: benchlib.Progress) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {f"{v}-{n}": [] for v in VARIANTS for n in plan.node_counts}
    for r in range(plan.rounds):
        for variant in VARIANTS:
            for count in plan.node_counts:
                instances = plan.nowork_instances if variant == "nowork" else plan.io_instances_per_node * count
                run = throughput_run(bench, variant, count, instances)
                runs[f"{variant}-{count}"].append(run)
                progress(
                    f"throughput round {r + 1}/{plan.rounds}, {variant}, {count} node(s): {run['rate']:,.0f} "
                    f"instances/s ({instances} in {run['elapsed_s']:.2f} s; load {run['load1']:.2f})"
                )
    return runs


# Latency ------------------------------------------------------------------------------------------------


def measure_latency(bench: Bench, plan: Plan, progress: benchlib.Progress) -> dict[str, Any]:
    rng = random.Random(11)
    with bench.cluster("latency", 2) as (_nodes, nf):
        nf.define(NOWORK)
        total, node_side = [], []
        for i in range(plan.latency_samples + 10):
            time.sleep(rng.uniform(0, 0.005))
            begun = time.perf_counter()
            instance = nf.start(NOWORK["id"])
            found = nf.wait(instance, timeout=10)
            took = (time.perf_counter() - begun) * 1000
            if found.status != "completed":
                raise RuntimeError(f"latency: instance {instance} is {found.status}")
            if i >= 10:
                total.append(took)
                assert found.ended is not None
                node_side.append((found.ended - found.created) * 1000)
    progress(f"latency: p50 {percentile(total, 50):.2f} ms, p99 {percentile(total, 99):.2f} ms")
    return {"total_ms": total, "node_ms": node_side}


# Define -> every node ---------------------------------------------------------------------------------


def measure_define(bench: Bench, plan: Plan, progress: benchlib.Progress) -> dict[str, Any]:
    rng = random.Random(5)
    nodes_ids = ("n1", "n2")
    rounds = []
    with bench.cluster("define", 2) as (_nodes, nf):
        nf.define(versioned(0))
        for k in range(1, plan.defines + 1):
            time.sleep(rng.uniform(0.15, 0.3))
            begun = time.time()
            info = nf.define(versioned(k))
            defined = time.time()
            target = read(nf, "SELECT MAX(id) FROM instructions")[0][0]
            cursors: dict[str, float] = {}
            starts: dict[str, float] = {}
            signals = 0
            deadline = time.monotonic() + 10
            while len(cursors) < len(nodes_ids) or len(starts) < len(nodes_ids):
                if len(starts) < len(nodes_ids):
                    nf.signal(SIGNAL)
                    signals += 1
                for node, position, updated in read(nf, "SELECT node, position, updated FROM instruction_cursors"):
                    if node in nodes_ids and node not in cursors and position >= target:
                        cursors[node] = updated
                for by, created in read(
                    nf,
                    "SELECT started_by, MIN(created) FROM instances WHERE definition = ? AND version = ? "
                    "GROUP BY started_by",
                    (info.id, info.version),
                ):
                    starts.setdefault(by.split()[0], created)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"define {k}: after 10 s, cursors {cursors}, starts {starts}")
                if len(starts) == len(nodes_ids):
                    time.sleep(0.001)
            stale = read(
                nf,
                "SELECT COUNT(*) FROM instances WHERE definition = ? AND version < ? AND created > ?",
                (info.id, info.version, defined),
            )[0][0]
            rounds.append(
                {
                    "version": info.version,
                    "define_ms": (defined - begun) * 1000,
                    "cursor_ms": (max(cursors.values()) - begun) * 1000,
                    "start_ms": (max(starts[n] for n in nodes_ids) - begun) * 1000,
                    "signals": signals,
                    "stale": stale,
                }
            )
        wait_settled(nf, 30)
    starts_ms = [r["start_ms"] for r in rounds]
    cursor_ms = [r["cursor_ms"] for r in rounds]
    progress(
        f"define: every node started the new version after {statistics.median(starts_ms):.1f} ms, "
        f"saved its cursor after {statistics.median(cursor_ms):.1f} ms (medians of {len(rounds)})"
    )
    return {"rounds": rounds}


# Scale ----------------------------------------------------------------------------------------------------


def build_history(path: str, count: int) -> dict[str, Any]:
    """A database holding `count` completed instances of HISTORY (3-5 journal rows each, and the
    lock_fences row its instance lock leaves), by one transaction of direct INSERTs, in the order
    they were created; returns its size and how long the build took."""
    begun = time.monotonic()
    with contextlib.closing(nodeflow.connect(path)) as nf:
        version = nf.define(HISTORY).version
    rng = random.Random(20240611)
    now = time.time()
    span = 30 * 86400.0
    instances, journal, fences = [], [], []
    for i in range(count):
        instance = f"{rng.getrandbits(64):016x}"
        total = rng.randint(1, 200)
        notify = i % 3 == 0
        data: dict[str, Any] = {"order": 100000 + i, "total": total}
        if notify:
            data["notify"] = True
        variables: dict[str, Any] = {"input": data, "total": total}
        node = f"n{1 + i % 2}"
        created = now - span + span * i / count
        steps: list[tuple[str, str, str]] = [("receive", "set", "set total")]
        if total > 100:
            steps.append(("check", "if", "true: review"))
            steps.append(("review", "set", "set reviewed"))
            variables["reviewed"] = True
        else:
            steps.append(("check", "if", "false: ship"))
        steps.append(("ship", "if", "true: note" if notify else "false: end"))
        if notify:
            steps.append(("note", "log", f"order {data['order']} shipped"))
        ended = created + 0.002 + 0.0005 * len(steps)
        fence = 1  # one burst under the instance's lock: its first fencing token
        instances.append(
            (instance, HISTORY["id"], version, json.dumps(variables, separators=(",", ":")), 1, fence, len(steps),
             node if i % 5 else f"p{1000 + i % 50}-{rng.getrandbits(24):06x}", created, ended, ended)
        )  # fmt: skip
        for step, (activity, kind, outcome) in enumerate(steps):
            at = created + 0.001 + 0.0005 * step
            journal.append((instance, step, activity, kind, node, fence, at, at + 0.0002, outcome))
        fences.append((nodeflow.INSTANCE_LOCK_PREFIX + instance, fence, created, 4000 + i % 2, node))
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO instances (id, definition, version, status, position, variables, seq, fence, steps, "
            "attempt, started_by, created, updated, ended) "
            "VALUES (?, ?, ?, 'completed', NULL, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
            instances,
        )
        conn.executemany(
            "INSERT INTO journal (instance, step, activity, type, node, fence, started, ended, outcome) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            journal,
        )
        conn.executemany("INSERT INTO lock_fences (name, fence, acquired, pid, node) VALUES (?, ?, ?, ?, ?)", fences)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return {
        "instances": count,
        "journal_rows": len(journal),
        "build_s": round(time.monotonic() - begun, 2),
        "size_mb": round(os.path.getsize(path) / 1e6, 1),
    }


def measure_scale(bench: Bench, plan: Plan, progress: benchlib.Progress) -> dict[str, Any]:
    template = os.path.join(bench.folder, "history.db")
    built = build_history(template, plan.history)
    progress(
        f"scale: {built['instances']:,} instances, {built['journal_rows']:,} journal rows inserted in "
        f"{built['build_s']:.1f} s ({built['size_mb']} MB)"
    )
    runs: dict[str, list[dict[str, Any]]] = {"empty": [], "large": []}
    for r in range(plan.scale_rounds):
        order = ("empty", "large") if r % 2 == 0 else ("large", "empty")
        for kind in order:
            run = throughput_run(
                bench, "nowork", 2, plan.nowork_instances, template if kind == "large" else None,
                plan.cli_runs, plan.inprocess_calls,
            )  # fmt: skip
            runs[kind].append(run)
            progress(
                f"scale round {r + 1}/{plan.scale_rounds}, {kind}: {run['rate']:,.0f} instances/s, RSS "
                f"{max(run['rss_mb'].values()):.1f} MB, CLI {statistics.median(run['cli_ms']):.0f} ms "
                f"(load {run['load1']:.2f})"
            )
    with contextlib.suppress(OSError):
        os.remove(template)
    return {"history": built, "runs": runs}


# The run ----------------------------------------------------------------------------------------------------


def commit_of_repo() -> str:
    """The repository's commit, "+modified" when nodeflow.py differs from it; "?" without git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        clean = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "nodeflow.py"]).returncode
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + ("" if clean == 0 else "+modified")


def spread_of(values: list[float], unit: str) -> str:
    if len(values) < 2:
        return ""
    return f"{benchlib.format_number(min(values), unit)}..{benchlib.format_number(max(values), unit)}"


def run_benchmark(plan: Plan, progress: benchlib.Progress) -> tuple[list[Row], dict[str, Any]]:
    bench_dir = REPO / "bench"
    folder = tempfile.mkdtemp(prefix="tmp-wf-", dir=bench_dir)
    meta: dict[str, Any] = {
        **benchlib.environment(nodeflow.filesystem_type(folder), str(bench_dir)),
        "commit": commit_of_repo(),
        "concurrency": CONCURRENCY,
        "plan": plan.__dict__,
    }
    progress(f"load average at start {' '.join(f'{x:.2f}' for x in meta['loadavg_at_start'])}")
    bench = Bench(folder)
    try:
        throughput = measure_throughput(bench, plan, progress)
        latency = measure_latency(bench, plan, progress)
        define = measure_define(bench, plan, progress)
        scale = measure_scale(bench, plan, progress)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    rows: list[Row] = []
    for variant in VARIANTS:
        for count in plan.node_counts:
            got = throughput[f"{variant}-{count}"]
            row = Row(f"rate_{variant}_{count}", f"throughput, {VARIANT_LABEL[variant]}, {count} node(s)", "inst/s")
            row.runs = [run["rate"] for run in got]
            row.settle()
            row.note = (
                f"{got[0]['instances']:,} instances; steps "
                + " ".join(f"{n} {s:.0%}" for n, s in got[-1]["step_shares"].items())
                + f"; CPU {statistics.median(run['cpu_ms_per_instance'] for run in got):.2f} ms/inst"
                + f"; load {statistics.median(run['load1'] for run in got):.2f}"
            )
            rows.append(row)
        base = throughput[f"{variant}-1"]
        for count in plan.node_counts[1:]:
            ratios = [
                run["rate"] / one["rate"] for run, one in zip(throughput[f"{variant}-{count}"], base, strict=True)
            ]
            row = Row(f"ratio_{variant}_{count}", f"  {count} nodes / 1 node, {VARIANT_LABEL[variant]}", "x")
            row.runs = ratios
            row.settle()
            row.note = "median of paired rounds"
            if count == 2:
                if variant == "io":
                    row.target = f"> {TARGET_IO_SPEEDUP:g}x"
                    row.result = verdict(row.value is not None and row.value > TARGET_IO_SPEEDUP)
                else:
                    row.target = f">= {TARGET_NOWORK_RATIO:g}x"
                    row.result = verdict(row.value is not None and row.value >= TARGET_NOWORK_RATIO)
            rows.append(row)

    total, node_side = latency["total_ms"], latency["node_ms"]
    for q in (50, 99):
        row = Row(f"latency_p{q}", f"start -> completed (start + wait), 2 nodes idle, p{q}", "ms")
        row.value = percentile(total, q)
        row.spread = f"n={len(total)}, {min(total):.2f}..{max(total):.2f}"
        row.note = f"of which on the node (ended - created) p{q} {percentile(node_side, q):.2f} ms"
        if q == 50:
            row.target = f"< {TARGET_LATENCY_P50_MS:g} ms"
            row.result = verdict(row.value < TARGET_LATENCY_P50_MS)
        rows.append(row)

    rounds = define["rounds"]
    stale = sum(r["stale"] for r in rounds)
    row = Row("define_started", "define -> every node started the new version", "ms")
    row.runs = [r["start_ms"] for r in rounds]
    row.settle()
    row.spread = f"n={len(rounds)}, {min(row.runs):.1f}..{max(row.runs):.1f}"
    row.target = f"< {TARGET_DEFINE_MS:g} ms"
    row.result = verdict(row.value is not None and row.value < TARGET_DEFINE_MS and stale == 0)
    row.note = (
        f"signal trigger; {statistics.median(r['signals'] for r in rounds):.0f} signals (median); "
        f"{stale} stale start(s)"
    )
    rows.append(row)
    row = Row("define_cursor", "define -> every node's saved cursor past it", "ms")
    row.runs = [r["cursor_ms"] for r in rounds]
    row.settle()
    row.spread = f"n={len(rounds)}, {min(row.runs):.1f}..{max(row.runs):.1f}"
    row.target = f"< {TARGET_DEFINE_MS:g} ms"
    row.result = verdict(row.value is not None and row.value < TARGET_DEFINE_MS)
    row.note = f"instruction_cursors.updated; define itself {statistics.median(r['define_ms'] for r in rounds):.1f} ms"
    rows.append(row)

    history = scale["history"]
    empty, large = scale["runs"]["empty"], scale["runs"]["large"]
    size = f"{history['instances']:,}"
    db_label = {"empty": "empty", "large": size}
    for kind, got in (("empty", empty), ("large", large)):
        row = Row(f"scale_rate_{kind}", f"throughput, no work, 2 nodes, {db_label[kind]} db", "inst/s")
        row.runs = [run["rate"] for run in got]
        row.settle()
        row.note = (
            f"{got[0]['completed_total']:,} completed in the db after; per instance: nodes wrote "
            f"{statistics.median(run['wchar_kb_per_instance'] for run in got):.0f} KB, "
            f"disk {statistics.median(run['disk_kb_per_instance'] for run in got):.0f} KB, "
            f"CPU {statistics.median(run['cpu_ms_per_instance'] for run in got):.2f} ms"
        )
        rows.append(row)
    row = Row("scale_rate_ratio", f"  throughput, {size} / empty", "x")
    row.runs = [b["rate"] / a["rate"] for a, b in zip(empty, large, strict=True)]
    row.settle()
    row.target = f">= {TARGET_SCALE_RATE_RATIO:g}x"
    row.result = verdict(row.value is not None and row.value >= TARGET_SCALE_RATE_RATIO)
    row.note = "median of paired rounds"
    rows.append(row)
    for kind, got in (("empty", empty), ("large", large)):
        row = Row(f"scale_rss_{kind}", f"node RSS after the run, {db_label[kind]} db", "MB")
        row.runs = [max(run["rss_mb"].values()) for run in got]
        row.settle()
        row.note = "the larger of n1, n2: " + " ".join(f"{n} {mb:.1f}" for n, mb in got[-1]["rss_mb"].items())
        if kind == "large":
            growth = statistics.median(b - a for a, b in zip(
                [max(run["rss_mb"].values()) for run in empty], row.runs, strict=True))  # fmt: skip
            row.target = f"<= empty + {TARGET_SCALE_RSS_MB:g} MB"
            row.result = verdict(growth <= TARGET_SCALE_RSS_MB)
            row.note = f"{growth:+.1f} MB; " + row.note
        rows.append(row)
    for kind, got in (("empty", empty), ("large", large)):
        cli = [ms for run in got for ms in run["cli_ms"]]
        floor = [ms for run in got for ms in run["cli_version_ms"]]
        row = Row(f"scale_cli_{kind}", f"CLI instances --status running, {db_label[kind]} db", "ms")
        row.runs = cli
        row.settle()
        row.spread = f"n={len(cli)}, {min(cli):.0f}..{max(cli):.0f}"
        row.note = (
            f"`--version` alone {statistics.median(floor):.0f} ms (interpreter, compile, imports); "
            f"the rest {statistics.median(cli) - statistics.median(floor):.0f} ms"
        )
        if kind == "large":
            row.target = f"< {TARGET_CLI_MS:g} ms"
            row.result = verdict(row.value is not None and row.value < TARGET_CLI_MS)
        rows.append(row)
    for key, call in (("inprocess_ms", 'status="running"'), ("newest_ms", "limit=20")):
        for kind, got in (("empty", empty), ("large", large)):
            calls = [ms for run in got for ms in run[key]]
            row = Row(f"scale_api_{key[:-3]}_{kind}", f"nf.instances({call}), {db_label[kind]} db", "ms")
            row.value = statistics.median(calls)
            row.spread = f"p10..p90 {percentile(calls, 10):.3f}..{percentile(calls, 90):.3f}"
            row.note = f"median of {len(calls)} calls in this process"
            rows.append(row)

    for runs in (*throughput.values(), empty, large):
        for run in runs:
            for key in ("inprocess_ms", "newest_ms"):
                if key in run:
                    run[key] = statistics.median(run[key])
    meta.update(
        {
            "throughput": throughput,
            "latency": {
                "total_ms": {q: percentile(total, q) for q in (10, 50, 90, 99, 100)},
                "node_ms": {q: percentile(node_side, q) for q in (10, 50, 90, 99, 100)},
            },
            "define": define,
            "scale": scale,
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
            "nodeflow workflow benchmark",
            meta,
            quick,
            f"serve --concurrency {meta['concurrency']}, synchronous FULL",
            at=f" at {meta['commit']}",
        ),
        f"throughput: {plan['rounds']} round(s) of fresh clusters of {', '.join(map(str, plan['node_counts']))} nodes "
        f"({plan['nowork_instances']:,} instances without work, {plan['io_instances_per_node']} per node with io "
        f"work), started up front; latency: {plan['latency_samples']} one at a time; define: {plan['defines']} "
        f"versions; scale: {plan['history']:,} completed instances vs none, {plan['scale_rounds']} round(s)",
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
        description="Benchmark nodeflow's workflows on serve processes: throughput, latency, define, scale.",
        quick_help="one round, fewer instances and defines (a smoke test, < 1 min)",
        full_plan=FULL_PLAN,
        quick_plan=QUICK_PLAN,
        run=run_benchmark,
        render=render,
    )


if __name__ == "__main__":
    sys.exit(main())
