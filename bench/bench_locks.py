"""Benchmark of nodeflow's named locks against raw flock and the filelock package.

Run from the repository root:  python3 bench/bench_locks.py [--quick] [--json FILE]

Every throughput row is the median of R runs (5, or 3 with --quick) of a fixed number of
acquire+release iterations, uncontended, one process, the rows interleaved run by run. The
hand-off rows ping-pong one lock between two processes: the holder keeps it about 2 ms so the
other is surely waiting, then records perf_counter() just before its release; the waiter records
perf_counter() just after its acquire returns (CLOCK_MONOTONIC, comparable across processes on
Linux). A pipe makes the two strictly alternate. Everything runs in a fresh temporary folder
under bench/, on the repository's filesystem, removed at the end.

The standard library only; filelock is compared with when it is importable.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# benchlib: bench/benchlib.py, found because Python puts the script's folder first on sys.path
import benchlib  # noqa: E402
from benchlib import Row, percentile, verdict  # noqa: E402

import nodeflow  # noqa: E402

filelock: ModuleType | None
try:
    import filelock
except ImportError:  # its rows are skipped with a note
    filelock = None

LOCK_NAME = "bench"
TARGET_HANDOFF_P50_MS = 1.0
TARGET_HANDOFF_P99_MS = 5.0
TARGET_NOFENCE_VS_FILELOCK = 3.0
TARGET_FENCED_OPS = 2000.0


@dataclass(frozen=True)
class Plan:
    repeats: int
    raw: int  # flock on an open descriptor
    open_close: int  # os.open + flock + close
    nofence: int  # nodeflow fence=False
    fence_full: int
    fence_normal: int
    filelock: int
    handoffs: int
    hold: float = 0.002  # seconds the holder keeps the lock each turn


FULL_PLAN = Plan(
    repeats=5,
    raw=20000,
    open_close=10000,
    nofence=5000,
    fence_full=1000,
    fence_normal=2000,
    filelock=5000,
    handoffs=300,
)
QUICK_PLAN = Plan(
    repeats=3, raw=5000, open_close=2000, nofence=1000, fence_full=200, fence_normal=400, filelock=1000, handoffs=60
)


# Throughput: each factory does its setup and returns (run(n) -> seconds, close()) ----------------


Timed = tuple[Callable[[int], float], Callable[[], None]]


def raw_flock(folder: str) -> Timed:
    fd = os.open(os.path.join(folder, "raw.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def run(n: int) -> float:
        flock, ex, un = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN
        start = time.perf_counter()
        for _ in range(n):
            flock(fd, ex)
            flock(fd, un)
        return time.perf_counter() - start

    return run, lambda: os.close(fd)


def open_flock_close(folder: str) -> Timed:
    path = os.path.join(folder, "open.lock")
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC

    def run(n: int) -> float:
        flock, ex, opn, close = fcntl.flock, fcntl.LOCK_EX, os.open, os.close
        start = time.perf_counter()
        for _ in range(n):
            fd = opn(path, flags, 0o600)
            flock(fd, ex)
            close(fd)
        return time.perf_counter() - start

    return run, lambda: None


def nodeflow_lock(folder: str, fence: bool, synchronous: str) -> Timed:
    db = os.path.join(folder, f"tp-{'fence' if fence else 'nofence'}-{synchronous}.db")
    nf = nodeflow.connect(db, settings=nodeflow.Settings(synchronous=synchronous))

    def run(n: int) -> float:
        lock = nf.lock
        start = time.perf_counter()
        for _ in range(n):
            lock(LOCK_NAME, fence=fence).release()
        return time.perf_counter() - start

    return run, nf.close


def sqlite_commit(folder: str) -> Timed:
    """The ceiling of a fenced lock: the same one-row upsert, committed with synchronous=FULL, no lock."""
    conn = sqlite3.connect(os.path.join(folder, "commit.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE fences (name TEXT PRIMARY KEY, fence INTEGER NOT NULL) WITHOUT ROWID")

    def run(n: int) -> float:
        execute = conn.execute
        start = time.perf_counter()
        for _ in range(n):
            execute("BEGIN IMMEDIATE")
            execute(
                "INSERT INTO fences (name, fence) VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET fence = fence + 1",
                (LOCK_NAME,),
            )
            execute("SELECT fence FROM fences WHERE name = ?", (LOCK_NAME,)).fetchone()
            execute("COMMIT")
        return time.perf_counter() - start

    return run, conn.close


def filelock_lock(folder: str) -> Timed:
    assert filelock is not None
    lk = filelock.FileLock(os.path.join(folder, "filelock.lock"))

    def run(n: int) -> float:
        acquire, release = lk.acquire, lk.release
        start = time.perf_counter()
        for _ in range(n):
            acquire()
            release()
        return time.perf_counter() - start

    return run, lambda: None


# Hand-off between two processes ---------------------------------------------------------------


class _Locker:
    def __init__(self, kind: str, db: str, path: str) -> None:
        self.kind = kind
        self._held: Any = None
        if kind == "filelock":
            assert filelock is not None
            self._filelock = filelock.FileLock(path)  # default poll interval
        else:
            self._nf = nodeflow.connect(db, settings=nodeflow.Settings(synchronous="FULL"))
            self._fence = kind == "nodeflow-fence"

    def acquire(self) -> None:
        if self.kind == "filelock":
            self._filelock.acquire()
        else:
            self._held = self._nf.lock(LOCK_NAME, fence=self._fence)

    def release(self) -> None:
        if self.kind == "filelock":
            self._filelock.release()
        else:
            self._held.release()
            self._held = None

    def close(self) -> None:
        if self.kind != "filelock":
            self._nf.close()


def handoff_worker(
    kind: str, db: str, path: str, first: bool, turns: int, hold: float, peer: Connection, report: Connection
) -> None:
    """One side of the ping-pong; sends {"release": {k: t}, "acquire": {k: t}, "call": {k: t}} on report."""
    locker = _Locker(kind, db, path)
    released: dict[int, float] = {}
    acquired: dict[int, float] = {}
    called: dict[int, float] = {}
    perf = time.perf_counter
    holding = False
    k = 0  # the next hand-off
    if first:
        peer.recv()  # the other side is ready: it will not be late for the first hand-off
        locker.acquire()
        holding = True
        peer.send("held")
    else:
        peer.send("ready")
    while k < turns:
        if holding:
            time.sleep(hold)  # the other side is blocked in acquire by now
            t = perf()
            locker.release()
            released[k] = t
            holding = False
        else:
            peer.recv()  # the other side holds the lock now
            called[k] = perf()
            locker.acquire()  # blocks until the other side releases
            acquired[k] = perf()
            holding = True
            peer.send("held")
        k += 1
    if holding:
        locker.release()
    locker.close()
    report.send({"release": released, "acquire": acquired, "call": called})
    report.close()


def measure_handoff(kind: str, folder: str, turns: int, hold: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")  # clean children: no inherited handles or threads
    db = os.path.join(folder, f"handoff-{kind}.db")
    path = os.path.join(folder, f"handoff-{kind}.lock")
    if kind != "filelock":
        nodeflow.connect(db).close()  # create the database once, before the two sides race for it
    a_end, b_end = ctx.Pipe()
    reports = []
    procs = []
    for first, end in ((True, a_end), (False, b_end)):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=handoff_worker, args=(kind, db, path, first, turns, hold, end, send), daemon=True)
        proc.start()
        send.close()
        procs.append(proc)
        reports.append(receive)
    timeout = 60 + turns * (hold + 0.2)
    results = []
    try:
        for receive in reports:
            if not receive.poll(timeout):
                raise RuntimeError(f"hand-off benchmark {kind}: a worker did not finish in {timeout:.0f} s")
            results.append(receive.recv())
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    released = {**results[0]["release"], **results[1]["release"]}
    acquired = {**results[0]["acquire"], **results[1]["acquire"]}
    called = {**results[0]["call"], **results[1]["call"]}
    latencies = []
    late = 0  # the waiter called acquire only after the release: not a hand-off to a blocked waiter
    for k in range(turns):
        if called[k] >= released[k]:
            late += 1
            continue
        latencies.append((acquired[k] - released[k]) * 1000)
    if not latencies:
        raise RuntimeError(f"hand-off benchmark {kind}: no waiter was blocked in time")
    return {
        "kind": kind,
        "turns": turns,
        "hold_ms": hold * 1000,
        "samples": len(latencies),
        "waiter_not_blocked": late,
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
        "min_ms": min(latencies),
    }


# The run --------------------------------------------------------------------------------------


def run_benchmark(plan: Plan, progress: benchlib.Progress) -> tuple[list[Row], dict[str, Any]]:
    bench_dir = REPO / "bench"
    folder = tempfile.mkdtemp(prefix="bench-locks-", dir=bench_dir)
    meta: dict[str, Any] = {
        **benchlib.environment(nodeflow.filesystem_type(folder), str(bench_dir)),
        "filelock": getattr(filelock, "__version__", None) if filelock is not None else None,
        "repeats": plan.repeats,
        "iterations": {
            "raw_flock": plan.raw,
            "open_flock_close": plan.open_close,
            "nodeflow_nofence": plan.nofence,
            "nodeflow_fence_full": plan.fence_full,
            "nodeflow_fence_normal": plan.fence_normal,
            "sqlite_commit_full": plan.fence_full,
            "filelock": plan.filelock,
        },
        "handoff_turns": plan.handoffs,
        "handoff_hold_ms": plan.hold * 1000,
    }
    cases: list[tuple[Row, int, Callable[[str], Timed] | None]] = [
        (Row("raw_flock", "raw flock LOCK_EX+LOCK_UN, open fd", "ops/s"), plan.raw, raw_flock),
        (Row("open_flock_close", "os.open + flock + close", "ops/s"), plan.open_close, open_flock_close),
        (
            Row("nodeflow_nofence", "nodeflow lock fence=False", "ops/s"),
            plan.nofence,
            lambda d: nodeflow_lock(d, False, "FULL"),
        ),
        (
            Row("nodeflow_fence_full", "nodeflow lock fence=True, sync FULL", "ops/s"),
            plan.fence_full,
            lambda d: nodeflow_lock(d, True, "FULL"),
        ),
        (
            Row("nodeflow_fence_normal", "nodeflow lock fence=True, sync NORMAL", "ops/s"),
            plan.fence_normal,
            lambda d: nodeflow_lock(d, True, "NORMAL"),
        ),
        (
            Row("sqlite_commit_full", "reference: SQLite upsert commit, FULL", "ops/s"),
            plan.fence_full,
            sqlite_commit,
        ),
        (
            Row("filelock", "filelock.FileLock acquire+release", "ops/s"),
            plan.filelock,
            filelock_lock if filelock is not None else None,
        ),
    ]
    handoff: dict[str, dict[str, Any] | None] = {}
    try:
        timers: list[tuple[Row, int, Timed]] = []
        for row, n, factory in cases:
            if factory is None:
                row.note = "skipped: filelock is not installed"
                continue
            timed = factory(folder)
            timed[0](max(10, n // 10))  # warm-up: files created, caches and the database page warm
            timers.append((row, n, timed))
        for repeat in range(plan.repeats):
            progress(f"throughput run {repeat + 1}/{plan.repeats}")
            for row, n, (run, _) in timers:  # interleaved, so a slow moment hits every row alike
                row.runs.append(n / run(n))
        for row, _, (_, close) in timers:
            close()
            row.settle()
        kinds = ["nodeflow-nofence", "nodeflow-fence"] + (["filelock"] if filelock is not None else [])
        for kind in kinds:
            progress(f"hand-off {kind}, {plan.handoffs} turns")
            handoff[kind] = measure_handoff(kind, folder, plan.handoffs, plan.hold)
        if filelock is None:
            handoff["filelock"] = None
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    rows = [row for row, _, _ in cases]
    by_key = {row.key: row for row in rows}
    full = by_key["nodeflow_fence_full"]
    if full.value is not None:
        full.target = f">= {benchlib.format_number(TARGET_FENCED_OPS, full.unit)}/s"
        full.result = verdict(full.value >= TARGET_FENCED_OPS)

    nofence, fl = by_key["nodeflow_nofence"], by_key["filelock"]
    ratio = Row("ratio_nofence_filelock", "ratio nodeflow fence=False / filelock", "x")
    if nofence.value is not None and fl.value is not None:
        ratio.value = nofence.value / fl.value
        ratios = [a / b for a, b in zip(nofence.runs, fl.runs, strict=True)]
        ratio.spread = f"{min(ratios):.2f}..{max(ratios):.2f}"
        ratio.target = f">= {TARGET_NOFENCE_VS_FILELOCK:.0f}x"
        ratio.result = verdict(ratio.value >= TARGET_NOFENCE_VS_FILELOCK)
    else:
        ratio.note = "skipped: filelock is not installed"
    rows.append(ratio)

    target_row = Row("ratio_fence_full_target", "ratio fenced FULL / 2,000/s target", "x")
    if full.value is not None:
        target_row.value = full.value / TARGET_FENCED_OPS
        target_row.spread = f"{min(full.runs) / TARGET_FENCED_OPS:.2f}..{max(full.runs) / TARGET_FENCED_OPS:.2f}"
        target_row.target = ">= 1.00x"
        target_row.result = verdict(target_row.value >= 1.0)
    rows.append(target_row)

    labels = {
        "nodeflow-nofence": "hand-off nodeflow fence=False",
        "nodeflow-fence": "hand-off nodeflow fence=True FULL",
        "filelock": "hand-off filelock (poll 50 ms)",
    }
    for kind in ("nodeflow-nofence", "nodeflow-fence", "filelock"):
        stats = handoff.get(kind)
        for q, limit in (("p50", TARGET_HANDOFF_P50_MS), ("p99", TARGET_HANDOFF_P99_MS)):
            row = Row(f"handoff_{kind.replace('-', '_')}_{q}", f"{labels[kind]} {q}", "ms")
            if stats is None:
                row.note = "skipped: filelock is not installed"
            else:
                row.value = stats[f"{q}_ms"]
                row.spread = f"n={stats['samples']}, max {stats['max_ms']:.2f}"
                notes = []
                if stats["waiter_not_blocked"]:
                    notes.append(f"{stats['waiter_not_blocked']} dropped: waiter not yet blocked")
                if kind == "filelock":
                    notes.append("retries 50 ms after a failed try: ~50 ms - hold")
                row.note = "; ".join(notes)
                if kind != "filelock":
                    row.target = f"< {limit:g} ms"
                    row.result = verdict(row.value < limit)
            rows.append(row)
    meta["handoff"] = handoff
    meta["loadavg_at_end"] = benchlib.loadavg()
    return rows, meta


def render(rows: list[Row], meta: dict[str, Any], quick: bool) -> str:
    intro = [
        benchlib.headline("nodeflow lock benchmark", meta, quick, f"filelock {meta['filelock'] or 'not installed'}"),
        f"throughput: median of {meta['repeats']} runs, spread = min..max of the runs, iterations per run "
        + ", ".join(f"{k} {v}" for k, v in meta["iterations"].items()),
        f"hand-off: two processes, {meta['handoff_turns']} turns, holder keeps the lock "
        f"{meta['handoff_hold_ms']:g} ms; latency = waiter's acquire return - holder's release call",
    ]
    return benchlib.render_table(rows, intro)


def main(argv: list[str] | None = None) -> int:
    return benchlib.main(
        argv,
        description="Benchmark nodeflow's named locks.",
        quick_help="fewer runs and iterations (a smoke test, < 15 s)",
        full_plan=FULL_PLAN,
        quick_plan=QUICK_PLAN,
        run=run_benchmark,
        render=render,
    )


if __name__ == "__main__":
    sys.exit(main())
