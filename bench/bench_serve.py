"""Benchmark of nodeflow's daemon, `python3 nodeflow.py serve`: fail-over, timer lateness, idle cost, scale.

Run from the repository root:  python3 bench/bench_serve.py [--quick] [--json FILE]

Every node is a real `serve` process (this interpreter running nodeflow.py, started with
subprocess, role auto, default heartbeat 1 s and settings), its stderr log in a file; the
benchmark itself is a passing client: nodeflow.connect() without a node id. Everything runs in a
fresh temporary folder under bench/ (on the repository's filesystem), removed at the end.

Cluster A (3 nodes), in this order:

Idle: once the cluster has run 2 s, the CPU time (utime + stime, /proc/PID/stat) the three serve
processes use in 10 s (3 s with --quick) while nobody asks them anything, as a share of one core,
summed; then each node's VmRSS (/proc/PID/status).

Timer lateness: 1,000 one-shot timers (200 with --quick) added with nf.schedule(at=DUE), DUE
drawn at random over a 10 s window (4 s) that opens once they are surely all added (1 s + 2 ms per
timer after the first schedule() call); each body holds its due time. Lateness = the `created`
column of the message the timer fired (the scheduler's fire time: time.time() taken when it
builds the firing pass) minus the due time. A timer whose schedule() returned after its due time
would not count (none should). Fired, missing and duplicated timers are counted from the bodies.

Scale: with 1,000 and then 100,000 pending timers, due a year from now (so none fires), put in
the timers table by one transaction of direct INSERTs (executemany through nf.store.write, then a
WAL checkpoint and a real nf.schedule() so the scheduler looks again), after 1.5 s (the scheduler
passes at least once a second): the scheduling node's VmRSS (the largest of 3 readings, 0.2 s
apart), the time of nodeflow._next_due (SELECT MIN(due) FROM timers WHERE due IS NOT NULL,
through nf.store.read) and of one firing pass that finds nothing due (nodeflow._fire_due_work
for the current epoch, through nf.committer.submit, as the scheduler submits it), each the median
of many calls in this process; spread = p10..p90 of the calls.

Cluster B (3 nodes), fail-over: the scheduler (its pid from nf.scheduler()) is sent SIGKILL,
time.time() stamped just before os.kill; fail-over = the time stamped on the next scheduler's
"took office as the scheduling node (epoch N)" log line minus the kill (the log prints local wall
time truncated to the millisecond). "seen by a client": the first moment nf.scheduler(), polled
every 1 ms, names the new epoch; "epoch bumped": the election table's `since` (time.time() in the
new scheduler's take_office transaction, before its commit). The killed node is restarted under
its own id once a peer has reported it gone, and the next kill comes 0.3..0.6 s after it joined;
20 kills (5 with --quick). p99 of 20 is the largest.

Targets are printed as PASS or MISS, never asserted. The standard library only.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# benchlib: bench/benchlib.py, found because Python puts the script's folder first on sys.path
import benchlib  # noqa: E402
from benchlib import Row, percentile, verdict  # noqa: E402

import nodeflow  # noqa: E402

NODES = ("n1", "n2", "n3")
TIMER_QUEUE = "bench-timers"
FAR_QUEUE = "bench-far"
YEAR = 365 * 86400.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

TARGET_FAILOVER_P99_MS = 100.0
TARGET_LATENESS_P99_MS = 50.0
TARGET_IDLE_CPU_PCT = 3.0
TARGET_RSS_MB = 40.0
TARGET_SCALE_TIME_RATIO = 2.0
TARGET_SCALE_RSS_GROWTH_MB = 10.0


@dataclass(frozen=True)
class Plan:
    kills: int
    timers: int
    timer_window: float  # seconds over which the timers fall due
    idle_seconds: float
    scale_small: int
    scale_large: int
    next_due_calls: int
    fire_pass_calls: int


FULL_PLAN = Plan(
    kills=20,
    timers=1000,
    timer_window=10.0,
    idle_seconds=10.0,
    scale_small=1000,
    scale_large=100_000,
    next_due_calls=3000,
    fire_pass_calls=500,
)
QUICK_PLAN = Plan(
    kills=5,
    timers=200,
    timer_window=4.0,
    idle_seconds=3.0,
    scale_small=1000,
    scale_large=100_000,
    next_due_calls=1000,
    fire_pass_calls=200,
)


# /proc ----------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        data = stat.read()
    fields = data[data.rindex(")") + 2 :].split()  # after "pid (comm) ": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# The nodes' logs ------------------------------------------------------------------------------------

LOG_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) (\S+) +(\S+) +(.*)$")


@dataclass(frozen=True)
class Event:
    stamp: float  # Unix time, from the line's local HH:MM:SS.mmm
    node: str
    label: str
    text: str


def wall_time(hour: int, minute: int, second: int, milli: int, near: float) -> float:
    """The Unix time of a local HH:MM:SS.mmm, on the day that puts it closest to `near`."""
    base = datetime.datetime.fromtimestamp(near).replace(
        hour=hour, minute=minute, second=second, microsecond=milli * 1000
    )
    candidates = [(base + datetime.timedelta(days=d)).timestamp() for d in (-1, 0, 1)]
    return min(candidates, key=lambda t: abs(t - near))


def read_events(path: str) -> list[Event]:
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            lines = log.read().splitlines()
    except FileNotFoundError:
        return []
    now = time.time()
    events = []
    for line in lines:
        match = LOG_LINE.match(line)
        if match:
            h, m, s, ms = (int(match.group(i)) for i in range(1, 5))
            events.append(Event(wall_time(h, m, s, ms, now), match.group(5), match.group(6), match.group(7)))
    return events


# The daemons ----------------------------------------------------------------------------------------


@dataclass
class Daemon:
    node: str
    proc: subprocess.Popen[bytes]
    log: str


@dataclass
class Daemons:
    """The `serve` processes of one cluster (one database); every one still running is stopped on the way out."""

    folder: str
    name: str
    db: str = ""
    current: dict[str, Daemon] = field(default_factory=dict)
    every: list[Daemon] = field(default_factory=list)
    starts: int = 0

    def __post_init__(self) -> None:
        self.db = os.path.join(self.folder, f"{self.name}.db")
        nodeflow.connect(self.db).close()  # created once, before the nodes race for it

    def start(self, node: str, attempts: int = 20) -> Daemon:
        """Start `serve --node-id node` and wait for its "joined" line (again if the id is still held)."""
        for _ in range(attempts):
            self.starts += 1
            log = os.path.join(self.folder, f"{self.name}-{node}-{self.starts}.log")
            with open(log, "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, str(REPO / "nodeflow.py"), "--db", self.db, "serve", "--node-id", node],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    cwd=self.folder,
                )
            daemon = Daemon(node, proc, log)
            self.every.append(daemon)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if any(e.text.startswith("joined ") for e in read_events(log)):
                    self.current[node] = daemon
                    return daemon
                if proc.poll() is not None:
                    break
                time.sleep(0.005)
            else:
                raise RuntimeError(f"node {node} did not join in 30 s; see {log}")
            if "in use" not in Path(log).read_text(errors="replace"):
                raise RuntimeError(f"node {node} exited {proc.returncode}: {Path(log).read_text(errors='replace')}")
            time.sleep(0.05)  # its old liveness lock is still being cleared by a peer
        raise RuntimeError(f"node {node}: its id stayed in use")

    def by_pid(self, pid: int) -> Daemon:
        for daemon in self.current.values():
            if daemon.proc.pid == pid:
                return daemon
        raise RuntimeError(f"pid {pid} is none of this benchmark's nodes")

    def pids(self) -> dict[str, int]:
        return {node: daemon.proc.pid for node, daemon in self.current.items()}

    def kill(self, daemon: Daemon) -> float:
        """SIGKILL; returns time.time() just before the kill."""
        stamp = time.time()
        os.kill(daemon.proc.pid, signal.SIGKILL)
        return stamp

    def events(self, node: str | None = None) -> list[Event]:
        daemons = self.current.values() if node is None else [self.current[node]]
        return [event for daemon in daemons for event in read_events(daemon.log)]

    def wait_for(self, prefix: str, contains: str = "", node: str | None = None, timeout: float = 10) -> Event:
        """The first log line (of `node`, or of any running node) that starts with `prefix` and holds `contains`."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events(node):
                if event.text.startswith(prefix) and contains in event.text:
                    return event
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no log line {prefix!r}..{contains!r} in {timeout:.0f} s")
            time.sleep(0.005)

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to every running node, then wait (SIGKILL after 15 s); returns node -> exit code."""
        for daemon in self.current.values():
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for node, daemon in self.current.items():
            try:
                codes[node] = daemon.proc.wait(15)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()
                codes[node] = None
        self.current.clear()
        return codes

    def cleanup(self) -> None:
        """Whatever happened: no process of ours outlives the benchmark."""
        for daemon in self.every:
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGTERM)
        for daemon in self.every:
            try:
                daemon.proc.wait(10)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()

    def trouble(self) -> list[str]:
        """Log lines that say something went wrong, one per incident: a traceback's frames and its
        closing exception line are left out (the line before the traceback says what failed)."""
        words = ("failed", "error", "lost office", "retrying", "could not", "warning")
        found = []
        for daemon in self.every:
            previous = ""
            for line in Path(daemon.log).read_text(errors="replace").splitlines():
                quiet = line.startswith((" ", "Traceback")) or previous.startswith(" ") or "cold boot" in line
                if not quiet and any(word in line.lower() for word in words):
                    found.append(f"{os.path.basename(daemon.log)}: {line}")
                previous = line
        return found


def wait_scheduler(nf: nodeflow.Cluster, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (info := nf.scheduler()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no scheduler in office after {timeout:.0f} s")
        time.sleep(0.01)
    return info


# Measurements ---------------------------------------------------------------------------------------


def measure_idle(cluster: Daemons, seconds: float) -> dict[str, Any]:
    pids = cluster.pids()
    before = {node: cpu_seconds(pid) for node, pid in pids.items()}
    start = time.monotonic()
    time.sleep(seconds)
    after = {node: cpu_seconds(pid) for node, pid in pids.items()}
    elapsed = time.monotonic() - start
    cpu_pct = {node: (after[node] - before[node]) / elapsed * 100 for node in pids}
    return {
        "seconds": round(elapsed, 3),
        "cpu_pct": cpu_pct,
        "cpu_pct_total": sum(cpu_pct.values()),
        "rss_mb": {node: rss_kb(pid) / 1024 for node, pid in pids.items()},
    }


def measure_timers(nf: nodeflow.Cluster, plan: Plan, progress: benchlib.Progress) -> dict[str, Any]:
    rng = random.Random(20240604)
    lead = 1.0 + 0.002 * plan.timers
    opens = time.time() + lead
    dues = sorted(opens + rng.uniform(0, plan.timer_window) for _ in range(plan.timers))
    scheduled_late = set()
    added_start = time.monotonic()
    for i, due in enumerate(dues):
        nf.schedule(f"bench-{i}", TIMER_QUEUE, {"i": i, "due": due}, at=due)
        if time.time() >= due:
            scheduled_late.add(i)
    added_s = time.monotonic() - added_start
    progress(f"timers: {plan.timers} added in {added_s:.2f} s; they fall due over {plan.timer_window:g} s")

    def fired_rows() -> list[tuple[str, float]]:
        return nf.store.read(
            lambda conn: conn.execute("SELECT body, created FROM messages WHERE queue = ?", (TIMER_QUEUE,)).fetchall()
        )

    deadline = dues[-1] + 10
    while True:
        time.sleep(max(0.2, min(1.0, dues[-1] - time.time())))
        rows = fired_rows()
        if len(rows) >= plan.timers or time.time() > deadline:
            break
    seen: dict[int, float] = {}
    duplicates = 0
    for body, created in rows:
        data = json.loads(body)
        if data["i"] in seen:
            duplicates += 1
            continue
        seen[data["i"]] = (created - data["due"]) * 1000
    lateness = [ms for i, ms in seen.items() if i not in scheduled_late]
    latest = sorted(seen, key=lambda i: -seen[i])[:10]
    return {
        "latest": [{"due_s": round(dues[i] - opens, 3), "late_ms": round(seen[i], 1)} for i in latest],
        "timers": plan.timers,
        "window_s": plan.timer_window,
        "added_s": round(added_s, 3),
        "fired": len(seen),
        "missing": plan.timers - len(seen),
        "duplicates": duplicates,
        "scheduled_late": len(scheduled_late),
        "lateness_ms": lateness,
    }


def add_far_timers(nf: nodeflow.Cluster, first: int, count: int) -> None:
    """count + 1 timers due a year from now and later: count by one transaction of direct INSERTs
    (named far-<first>..), one by nf.schedule()."""
    now = time.time()
    last = first + count
    rows = [(f"far-{i:06d}", FAR_QUEUE, json.dumps({"i": i}), now + YEAR + i, now) for i in range(first, last)]
    nf.store.write(
        lambda conn: conn.executemany(
            "INSERT INTO timers (name, queue, body, cron, tz, due, created) VALUES (?, ?, ?, NULL, NULL, ?, ?)", rows
        )
    )
    with contextlib.closing(sqlite3.connect(nf.path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    nf.schedule(f"far-ring-{last}", FAR_QUEUE, {}, at=now + 2 * YEAR)  # a real ring: the scheduler looks again


def timed_calls(call: Callable[[], Any], n: int) -> list[float]:
    """Milliseconds of each of n calls, after n // 10 untimed ones."""
    for _ in range(max(1, n // 10)):
        call()
    perf = time.perf_counter
    samples = []
    for _ in range(n):
        start = perf()
        call()
        samples.append((perf() - start) * 1000)
    return samples


def measure_scale_point(nf: nodeflow.Cluster, plan: Plan) -> dict[str, Any]:
    time.sleep(1.5)  # the scheduler has passed over the new timers at least once
    info = wait_scheduler(nf)
    rss = []
    for _ in range(3):
        rss.append(rss_kb(info["pid"]) / 1024)
        time.sleep(0.2)
    count = nf.store.read(lambda conn: conn.execute("SELECT COUNT(*) FROM timers WHERE due IS NOT NULL").fetchone()[0])
    next_due = timed_calls(lambda: nf.store.read(nodeflow._next_due), plan.next_due_calls)
    epoch = info["epoch"]

    def fire_pass() -> None:
        fired, _queues, _lateness = nf.committer.submit(nodeflow._fire_due_work(epoch))
        if fired:
            raise RuntimeError(f"a firing pass fired {fired} timers; none should be due")

    fire = timed_calls(fire_pass, plan.fire_pass_calls)
    return {
        "pending": count,
        "scheduler": info["node"],
        "scheduler_rss_mb": max(rss),
        "next_due_ms": summary(next_due),
        "fire_pass_ms": summary(fire),
    }


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "median": statistics.median(samples),
        "p10": percentile(samples, 10),
        "p90": percentile(samples, 90),
        "p99": percentile(samples, 99),
        "max": max(samples),
    }


def measure_failover(cluster: Daemons, nf: nodeflow.Cluster, kills: int, progress: benchlib.Progress) -> dict[str, Any]:
    rng = random.Random(7)
    rounds = []
    for k in range(kills):
        time.sleep(rng.uniform(0.3, 0.6))  # the restarted node stands again; not in step with heartbeats
        info = wait_scheduler(nf)
        victim = cluster.by_pid(info["pid"])
        old_epoch = info["epoch"]
        killed = cluster.kill(victim)
        deadline = killed + 10
        while True:
            now_info = nf.scheduler()
            if now_info is not None and now_info["epoch"] > old_epoch and now_info["pid"] != victim.proc.pid:
                seen = time.time()
                break
            if time.time() > deadline:
                raise RuntimeError(f"fail-over: no new scheduler 10 s after killing {victim.node}")
            time.sleep(0.001)
        victim.proc.wait()
        del cluster.current[victim.node]
        epoch, new_node = now_info["epoch"], now_info["node"]
        office = cluster.wait_for("took office", f"(epoch {epoch})", node=new_node)
        since = nf.store.read(lambda conn: conn.execute("SELECT since FROM election WHERE id = 1").fetchone()[0])
        cluster.wait_for(f"node {victim.node} (pid {victim.proc.pid}) is gone")  # its liveness lock is cleared
        rounds.append(
            {
                "killed": victim.node,
                "successor": new_node,
                "epoch": epoch,
                "office_ms": (office.stamp - killed) * 1000,
                "seen_ms": (seen - killed) * 1000,
                "epoch_bumped_ms": (since - killed) * 1000 if since is not None else None,
            }
        )
        progress(
            f"fail-over {k + 1}/{kills}: killed {victim.node}, {new_node} took office after "
            f"{rounds[-1]['office_ms']:.0f} ms (log), seen after {rounds[-1]['seen_ms']:.1f} ms"
        )
        cluster.start(victim.node)
    return {"rounds": rounds}


# The run --------------------------------------------------------------------------------------------


def run_benchmark(plan: Plan, progress: benchlib.Progress) -> tuple[list[Row], dict[str, Any]]:
    bench_dir = REPO / "bench"
    folder = tempfile.mkdtemp(prefix="bench-serve-", dir=bench_dir)
    meta: dict[str, Any] = {
        **benchlib.environment(nodeflow.filesystem_type(folder), str(bench_dir)),
        "nodes": len(NODES),
        "plan": plan.__dict__,
    }
    clusters: list[Daemons] = []
    try:
        progress(f"cluster A: starting {len(NODES)} serve processes")
        a = Daemons(folder, "a")
        clusters.append(a)
        for node in NODES:
            a.start(node)
        nf = nodeflow.connect(a.db)
        meta["scheduler_a"] = wait_scheduler(nf)["node"]
        time.sleep(2.0)
        progress(f"idle: {plan.idle_seconds:g} s")
        idle = measure_idle(a, plan.idle_seconds)
        progress(f"timers: {plan.timers} one-shot timers")
        timers = measure_timers(nf, plan, progress)
        nf.store.write(lambda conn: conn.execute("DELETE FROM timers"))
        nf.store.write(lambda conn: conn.execute("DELETE FROM messages"))
        scale: dict[int, dict[str, Any]] = {}
        added = 0
        for pending in (plan.scale_small, plan.scale_large):
            progress(f"scale: {pending:,} pending timers")
            add_far_timers(nf, added, pending - added - 1)
            added = pending
            scale[pending] = measure_scale_point(nf, plan)
        nf.close()
        meta["stop_a"] = a.stop()

        progress(f"cluster B: {plan.kills} kills of the scheduler")
        b = Daemons(folder, "b")
        clusters.append(b)
        for node in NODES:
            b.start(node)
        nf = nodeflow.connect(b.db)
        wait_scheduler(nf)
        failover = measure_failover(b, nf, plan.kills, progress)
        nf.close()
        meta["stop_b"] = b.stop()
        meta["log_trouble"] = [line for cluster in clusters for line in cluster.trouble()]
    finally:
        for cluster in clusters:
            cluster.cleanup()
        shutil.rmtree(folder, ignore_errors=True)

    rows: list[Row] = []
    rounds = failover["rounds"]
    office = [r["office_ms"] for r in rounds]
    seen = [r["seen_ms"] for r in rounds]
    bumped = [r["epoch_bumped_ms"] for r in rounds if r["epoch_bumped_ms"] is not None]
    for q in (50, 99):
        row = Row(f"failover_p{q}", f"fail-over, kill -> 'took office' log, p{q}", "ms")
        row.value = percentile(office, q)
        row.spread = f"n={len(office)}, {min(office):.0f}..{max(office):.0f}"
        if q == 50 and bumped:
            row.note = f"epoch bumped (election.since) p50 {percentile(bumped, 50):.1f} ms"
        if q == 99:
            row.target = f"< {TARGET_FAILOVER_P99_MS:g} ms"
            row.result = verdict(row.value < TARGET_FAILOVER_P99_MS)
            row.note = "log stamps are whole ms" + (f"; p99 of {len(office)} is the max" if len(office) < 100 else "")
        rows.append(row)
    row = Row("failover_seen_p99", "fail-over seen by a client (1 ms poll), p99", "ms")
    row.value = percentile(seen, 99)
    row.spread = f"p50 {percentile(seen, 50):.1f}, {min(seen):.1f}..{max(seen):.1f}"
    row.note = "nf.scheduler() names the new epoch"
    rows.append(row)

    lateness = timers["lateness_ms"]
    for q in (50, 99):
        row = Row(f"timer_lateness_p{q}", f"timer lateness (created - due), p{q}", "ms")
        if lateness:
            row.value = percentile(lateness, q)
            row.spread = f"n={len(lateness)}, {min(lateness):.1f}..{max(lateness):.1f}"
        if q == 50:
            row.note = (
                f"{timers['fired']}/{timers['timers']} fired, {timers['missing']} missing, "
                f"{timers['duplicates']} duplicated over {timers['window_s']:g} s"
            )
        else:
            row.target = f"< {TARGET_LATENESS_P99_MS:g} ms"
            row.result = verdict(row.value is not None and row.value < TARGET_LATENESS_P99_MS and not timers["missing"])
        rows.append(row)

    row = Row("idle_cpu", f"idle CPU, {len(NODES)} nodes together", "%")
    row.value = idle["cpu_pct_total"]
    row.spread = " ".join(f"{node} {pct:.2f}" for node, pct in idle["cpu_pct"].items())
    row.target = f"< {TARGET_IDLE_CPU_PCT:g}% of a core"
    row.result = verdict(row.value < TARGET_IDLE_CPU_PCT)
    row.note = f"utime+stime over {idle['seconds']:.1f} s"
    rows.append(row)
    row = Row("idle_rss", "RSS of a node, the largest", "MB")
    row.value = max(idle["rss_mb"].values())
    row.spread = " ".join(f"{node} {mb:.1f}" for node, mb in idle["rss_mb"].items())
    row.target = f"< {TARGET_RSS_MB:g} MB each"
    row.result = verdict(row.value < TARGET_RSS_MB)
    row.note = "VmRSS after the idle period"
    rows.append(row)

    small, large = scale[plan.scale_small], scale[plan.scale_large]
    for pending, point in ((plan.scale_small, small), (plan.scale_large, large)):
        row = Row(f"scale_rss_{pending}", f"scheduler RSS, {pending:,} pending timers", "MB")
        row.value = point["scheduler_rss_mb"]
        row.note = f"node {point['scheduler']}; {point['pending']:,} due in the table"
        if point is large:
            growth = large["scheduler_rss_mb"] - small["scheduler_rss_mb"]
            row.target = f"<= {plan.scale_small:,} + {TARGET_SCALE_RSS_GROWTH_MB:g} MB"
            row.result = verdict(growth <= TARGET_SCALE_RSS_GROWTH_MB)
            row.note = f"{growth:+.1f} MB; " + row.note
        rows.append(row)
    for key, label in (("next_due_ms", "next due: SELECT MIN(due)"), ("fire_pass_ms", "firing pass, nothing due")):
        for pending, point in ((plan.scale_small, small), (plan.scale_large, large)):
            stats = point[key]
            row = Row(f"scale_{key[:-3]}_{pending}", f"{label}, {pending:,} timers", "ms")
            row.value = stats["median"]
            row.spread = f"p10..p90 {stats['p10']:.3f}..{stats['p90']:.3f}"
            row.note = f"median of {stats['n']} calls; p99 {stats['p99']:.3f}"
            rows.append(row)
        ratio = Row(f"scale_{key[:-3]}_ratio", f"{label}, {plan.scale_large:,} / {plan.scale_small:,}", "x")
        ratio.value = large[key]["median"] / small[key]["median"]
        ratio.target = f"< {TARGET_SCALE_TIME_RATIO:g}x"
        ratio.result = verdict(ratio.value < TARGET_SCALE_TIME_RATIO)
        rows.append(ratio)

    timers["lateness_ms"] = summary(lateness) if lateness else None
    meta.update(
        {
            "idle": idle,
            "timers": timers,
            "scale": {str(k): v for k, v in scale.items()},
            "failover": failover,
            "loadavg_at_end": benchlib.loadavg(),
        }
    )
    return rows, meta


def render(rows: list[Row], meta: dict[str, Any], quick: bool) -> str:
    plan = meta["plan"]
    trouble = meta.get("log_trouble") or []
    intro = [
        benchlib.headline(
            "nodeflow serve benchmark",
            meta,
            quick,
            f"{meta['nodes']} serve processes per cluster, heartbeat 1s, synchronous FULL",
        ),
        f"fail-over: {plan['kills']} SIGKILLs of the scheduler, the killed node restarted each time; "
        f"timers: {plan['timers']} one-shot over {plan['timer_window']:g} s; idle: {plan['idle_seconds']:g} s; "
        f"scale: {plan['scale_small']:,} and {plan['scale_large']:,} pending timers",
        f"nodes' logs: trouble in {len(trouble)} line{'' if len(trouble) == 1 else 's'}"
        + (" (first: " + trouble[0] + ")" if trouble else "")
        + f"; graceful stops exited {sorted(set(meta['stop_a'].values()) | set(meta['stop_b'].values()))}",
    ]
    return benchlib.render_table(rows, intro)


def main(argv: list[str] | None = None) -> int:
    return benchlib.main(
        argv,
        description="Benchmark nodeflow's daemon (serve): fail-over, timer lateness, idle cost, scale.",
        quick_help="fewer kills and timers, shorter idle period (a smoke test, < 40 s)",
        full_plan=FULL_PLAN,
        quick_plan=QUICK_PLAN,
        run=run_benchmark,
        render=render,
    )


if __name__ == "__main__":
    sys.exit(main())
