"""Benchmark of nodeflow's message bus and cache signals, against raw SQLite and huey.

Run from the repository root:  python3 bench/bench_bus.py [--quick] [--json FILE]

Everything runs in one go, in a fresh temporary folder under bench/ (on the repository's
filesystem), removed at the end. Throughput rows are medians of R runs (3 here; 5 for the
single-process rows; 3 and 3 with --quick), the rows interleaved run by run so that a slow
moment hits every row alike; spread = min..max of the runs. Every nodeflow handle uses the
default synchronous=FULL (durable on return) unless a row says NORMAL.

End to end (send, receive, ack): a producer process sends concurrently with the consumers. The
consumers are separate processes, each with its own connect(), already blocked in
receive(lease=30, wait=30) when the producer starts; each acks every message. The producer sends
N messages, then one stop message per consumer (or per handler) at priority -1, so a stop is
taken only once every real message is claimed. Rate = N / (last real ack in any consumer -
producer's first send), both time.monotonic() (CLOCK_MONOTONIC: one clock for all processes).

The raw SQLite row is one process, a bare loop over the sqlite3 module on a database with
nodeflow's own schema (WAL, synchronous=FULL): per message one BEGIN IMMEDIATE..COMMIT each for
the INSERT; the claim (SELECT the next ready row, UPDATE it as leased); and the DELETE: the three
transactions nodeflow commits per message, with the same JSON encode and decode of the body.

The drain rows take the producer out: 1 or 4 consumer processes, told to go at once, receive
(wait=0) + ack a queue pre-filled with N messages until it is empty.

The asyncio rows: one consumer process runs 16 coroutines, each looping on areceive(lease=30,
wait=30) + aack; its writes share transactions (group commit). Its producer process either keeps
16 asend() in flight (the asyncio way) or calls send() one at a time (as huey's producer does).

huey: huey.storage.SqliteStorage (what huey.SqliteHuey uses) with fsync=True (WAL,
synchronous=FULL); one producer process calls enqueue() per message (one transaction each), one
worker process loops on dequeue() (SELECT + DELETE in one transaction; huey has no lease or ack),
sleeping 1 ms when the queue is empty (huey's own consumer backs off from 100 ms). The pickling
of huey Task objects is left out, which favours huey.

Signals: the parent calls trigger(key) and stamps time.monotonic() just before the call (the
trigger's durable commit is included); a receiver process's token callback (on_change, run in
its listener thread) stamps time.monotonic() and reports it through a pipe. The receiver re-arms
a new token each round; the parent waits a random pause first (0..2 ms with doorbells, 0..poll
interval when polling) so rounds are not in step with the receiver's poll timer. "Polling only":
the triggering handle's doorbells.ring is replaced by a no-op, so every ring is lost and the
receiver (poll_interval 0.1 s) learns of a trigger only when its listener re-reads the log. (Removing
the receiver's socket file PATH.d/nodes/<id>.sock no longer works for this: the listener binds a
new one at its next poll.)

Single process (each run in a fresh spawned process, after 20 untimed operations): N send() in
a loop, at FULL and at NORMAL; N receive(lease=30) + ack() of a queue pre-filled with N + 20
messages. Scale: the same with 1,000,000 messages queued (100,000 with --quick), put there by one
transaction of direct INSERTs (executemany through nf.store.write, then a WAL checkpoint); the
consumer's RSS is its VmRSS (/proc/self/status) after its loop; and one receive(wait=0) that
finds nothing ready among as many messages all delayed by a day. Idle CPU: a process with a token
callback registered (so its listener thread runs: doorbell plus the 1 s poll) and nothing else,
read from /proc/PID/stat (utime + stime) over 10 s (3 s with --quick).

Targets are printed as PASS or MISS, never asserted. The standard library only; huey is compared
with when it is importable (else the issue's 2,100/s stands in for it).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# benchlib: bench/benchlib.py, found because Python puts the script's folder first on sys.path
import benchlib  # noqa: E402
from benchlib import Row, percentile, verdict  # noqa: E402

import nodeflow  # noqa: E402

QUEUE = "bench"
STOP = {"stop": True}
SIGNAL_KEY = "defs"
HUEY_REFERENCE = 2100.0  # the figure for huey's SQLite storage, used when huey is missing
ASYNC_HANDLERS = 16

TARGET_E2E_VS_RAW = 0.40
TARGET_FOUR_VS_ONE = 1.0
TARGET_FAIR_SHARE = 0.5
TARGET_ASYNC_VS_HUEY = 2.0
TARGET_SIGNAL_P99_MS = 5.0
TARGET_IDLE_CPU_PCT = 1.0
TARGET_DEEP_VS_EMPTY = 0.8


@dataclass(frozen=True)
class Plan:
    repeats: int  # multi-process end-to-end rows
    op_repeats: int  # single-process send / receive rows
    e2e: int  # messages per end-to-end run (rows 1, 2)
    async_e2e: int  # messages per run, 16 asyncio handlers and huey
    send_full: int
    send_normal: int
    recv: int
    latency_doorbell: int  # triggers
    latency_poll: int
    poll_interval: float  # the polling-only receiver's
    idle_seconds: float
    depth: int  # messages queued for the scale rows


FULL_PLAN = Plan(
    repeats=3,
    op_repeats=5,
    e2e=3000,
    async_e2e=6000,
    send_full=2000,
    send_normal=6000,
    recv=2000,
    latency_doorbell=200,
    latency_poll=200,
    poll_interval=0.1,
    idle_seconds=10.0,
    depth=1_000_000,
)
QUICK_PLAN = Plan(
    repeats=3,
    op_repeats=3,
    e2e=600,
    async_e2e=1500,
    send_full=500,
    send_normal=1500,
    recv=500,
    latency_doorbell=100,
    latency_poll=40,
    poll_interval=0.1,
    idle_seconds=3.0,
    depth=100_000,
)


def message_body(i: int) -> dict[str, Any]:
    return {"i": i, "text": "a message of about sixty bytes of JSON"}


def rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def settings(synchronous: str = "FULL", poll_interval: float = 1.0) -> nodeflow.Settings:
    return nodeflow.Settings(synchronous=synchronous, poll_interval=poll_interval)


def is_stop(body: Any) -> bool:
    return isinstance(body, dict) and body.get("stop") is True


# Child processes (spawned: a clean interpreter each, which calls connect() itself) ---------------


def e2e_producer(db: str, n: int, stops: int, mode: str, pipe: Connection) -> None:
    """Sends n messages when told to go: one send() at a time ("sync") or 16 asend() in flight."""
    nf = nodeflow.connect(db, settings=settings())
    nf.send("warm-up", 0)  # the write connection and the writer lock file exist before timing
    pipe.send("ready")
    pipe.recv()
    start = time.monotonic()
    if mode == "sync":
        send = nf.send
        for i in range(n):
            send(QUEUE, message_body(i))
    else:

        async def sender(first: int) -> None:
            for i in range(first, n, ASYNC_HANDLERS):
                await nf.asend(QUEUE, message_body(i))

        async def main() -> None:
            await asyncio.gather(*(sender(k) for k in range(ASYNC_HANDLERS)))

        asyncio.run(main())
    sent = time.monotonic()
    for _ in range(stops):
        nf.send(QUEUE, STOP, priority=-1)
    pipe.send({"start": start, "sent": sent, "batches": nf.committer.batches, "pieces": nf.committer.pieces})
    nf.close()


def e2e_consumer(db: str, pipe: Connection) -> None:
    """receive(lease=30, wait=30) + ack until a stop message."""
    nf = nodeflow.connect(db, settings=settings())
    nf.receive(QUEUE, wait=0.01)  # starts the listener: the doorbell is bound before the producer starts
    pipe.send("ready")
    count, last = 0, 0.0
    while True:
        message = nf.receive(QUEUE, lease=30, wait=30)
        if message is None:
            break
        nf.ack(message)
        if is_stop(message.body):
            break
        count += 1
        last = time.monotonic()
    pipe.send({"count": count, "last": last, "batches": nf.committer.batches, "pieces": nf.committer.pieces})
    nf.close()


def drain_consumer(db: str, pipe: Connection) -> None:
    """Told to go, receive(lease=30) + ack until the pre-filled queue is empty (no producer)."""
    nf = nodeflow.connect(db, settings=settings())
    nf.queues()  # the read connection is warm
    pipe.send("ready")
    pipe.recv()
    count, last = 0, 0.0
    receive, ack = nf.receive, nf.ack
    while (message := receive(QUEUE, lease=30)) is not None:
        ack(message)
        count += 1
        last = time.monotonic()
    pipe.send({"count": count, "last": last})
    nf.close()


def async_consumer(db: str, handlers: int, pipe: Connection) -> None:
    """One process, `handlers` coroutines each looping on areceive + aack until a stop message."""
    nf = nodeflow.connect(db, settings=settings())
    nf.receive(QUEUE, wait=0.01)
    pipe.send("ready")

    async def handler() -> tuple[int, float]:
        count, last = 0, 0.0
        while True:
            message = await nf.areceive(QUEUE, lease=30, wait=30)
            if message is None:
                break
            await nf.aack(message)
            if is_stop(message.body):
                break
            count += 1
            last = time.monotonic()
        return count, last

    async def main() -> list[tuple[int, float]]:
        return await asyncio.gather(*(handler() for _ in range(handlers)))

    results = asyncio.run(main())
    pipe.send(
        {
            "count": sum(c for c, _ in results),
            "last": max(t for _, t in results),
            "batches": nf.committer.batches,
            "pieces": nf.committer.pieces,
        }
    )
    nf.close()


def huey_storage(path: str) -> Any:
    from huey.storage import SqliteStorage

    return SqliteStorage(name="bench", filename=path, fsync=True)  # fsync=True: synchronous=FULL, WAL


def huey_producer(path: str, n: int, pipe: Connection) -> None:
    storage = huey_storage(path)
    storage.queue_size()  # opens this thread's connection
    pipe.send("ready")
    pipe.recv()
    start = time.monotonic()
    enqueue, dumps = storage.enqueue, json.dumps
    for i in range(n):
        enqueue(dumps(message_body(i)).encode())
    sent = time.monotonic()
    pipe.send({"start": start, "sent": sent})
    storage.close()


def huey_consumer(path: str, n: int, pipe: Connection) -> None:
    storage = huey_storage(path)
    storage.queue_size()
    pipe.send("ready")
    count, last, empty = 0, 0.0, 0
    dequeue, loads = storage.dequeue, json.loads
    while count < n:
        data = dequeue()
        if data is None:
            empty += 1
            time.sleep(0.001)
            continue
        loads(data)
        count += 1
        last = time.monotonic()
    pipe.send({"count": count, "last": last, "empty_polls": empty})
    storage.close()


def op_worker(db: str, kind: str, queue: str, n: int, synchronous: str, pipe: Connection) -> None:
    """Times n sends, or n receive+ack of a pre-filled queue (after 20 untimed ones), in one process."""
    nf = nodeflow.connect(db, settings=settings(synchronous))
    if kind == "send":
        for i in range(20):
            nf.send("warm-up", i)
        send = nf.send
        start = time.perf_counter()
        for i in range(n):
            send(queue, message_body(i))
        seconds = time.perf_counter() - start
    else:
        for _ in range(20):
            warm = nf.receive(queue, lease=30)
            assert warm is not None
            nf.ack(warm)
        receive, ack = nf.receive, nf.ack
        start = time.perf_counter()
        for _ in range(n):
            message = receive(queue, lease=30)
            assert message is not None, "the pre-filled queue ran dry"
            ack(message)
        seconds = time.perf_counter() - start
    pipe.send({"seconds": seconds, "rss_kb": rss_kb()})
    nf.close()


def signal_receiver(db: str, poll_interval: float, pipe: Connection) -> None:
    """Arms a token on SIGNAL_KEY each round; its callback reports when it fired."""
    nf = nodeflow.connect(db, settings=settings(poll_interval=poll_interval))
    warm_up = nf.token("warm-up")
    warm_up.on_change(lambda _token: None)  # starts the listener: doorbell bound, log read

    def fired(_token: nodeflow.ChangeToken) -> None:
        pipe.send(time.monotonic())

    pipe.send("ready")
    armed = []  # held here too: before 7c755f9 a handle kept only weak references to its tokens
    while pipe.recv() == "arm":
        token = nf.token(SIGNAL_KEY)
        token.on_change(fired)
        armed.append(token)
        pipe.send("armed")
    del warm_up, armed
    nf.close()


def idle_node(db: str, pipe: Connection) -> None:
    nf = nodeflow.connect(db, settings=settings())
    token = nf.token("x")
    token.on_change(lambda _token: None)  # listener thread: doorbell + 1 s poll
    pipe.send("ready")
    pipe.recv()  # idle until told to stop
    del token
    nf.close()


# Running groups of children -----------------------------------------------------------------------

CTX = multiprocessing.get_context("spawn")


class Group:
    """Child processes, each with a duplex pipe; terminated on the way out, whatever happened."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.pipes: list[Connection] = []

    def start(self, target: Callable[..., None], *args: Any) -> Connection:
        mine, theirs = CTX.Pipe()
        proc = CTX.Process(target=target, args=(*args, theirs), daemon=True)
        proc.start()
        theirs.close()
        self.procs.append(proc)
        self.pipes.append(mine)
        return mine

    def recv(self, pipe: Connection, what: str) -> Any:
        if not pipe.poll(self.timeout):
            raise RuntimeError(f"{what}: no answer from a child process in {self.timeout:.0f} s")
        return pipe.recv()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for pipe in self.pipes:
            pipe.close()


def run_e2e(db: str, n: int, consumers: int, mode: str) -> dict[str, Any]:
    """One end-to-end run: a producer process and `consumers` sync consumer processes."""
    with Group(timeout=60 + n / 100) as group:
        cons = [group.start(e2e_consumer, db) for _ in range(consumers)]
        prod = group.start(e2e_producer, db, n, consumers, mode)
        for pipe in [*cons, prod]:
            group.recv(pipe, "end-to-end start")
        prod.send("go")
        produced = group.recv(prod, "producer")
        reports = [group.recv(pipe, "consumer") for pipe in cons]
    counts = [r["count"] for r in reports]
    if sum(counts) != n:
        raise RuntimeError(f"end-to-end run: consumers acked {sum(counts)} messages, not {n}")
    end = max(r["last"] for r in reports)
    return {
        "rate": n / (end - produced["start"]),
        "counts": counts,
        "producer_rate": n / (produced["sent"] - produced["start"]),
        "consumer_pieces_per_batch": sum(r["pieces"] for r in reports) / max(1, sum(r["batches"] for r in reports)),
    }


def run_drain(db: str, n: int, consumers: int) -> dict[str, Any]:
    """`consumers` processes drain a queue pre-filled with n messages, all starting at once."""
    bulk_fill(db, QUEUE, n)
    with Group(timeout=60 + n / 100) as group:
        cons = [group.start(drain_consumer, db) for _ in range(consumers)]
        for pipe in cons:
            group.recv(pipe, "drain start")
        start = time.monotonic()
        for pipe in cons:
            pipe.send("go")
        reports = [group.recv(pipe, "drain consumer") for pipe in cons]
    counts = [r["count"] for r in reports]
    if sum(counts) != n:
        raise RuntimeError(f"drain run: consumers acked {sum(counts)} messages, not {n}")
    return {"rate": n / (max(r["last"] for r in reports) - start), "counts": counts}


def run_async_e2e(db: str, n: int, mode: str) -> dict[str, Any]:
    with Group(timeout=60 + n / 100) as group:
        cons = group.start(async_consumer, db, ASYNC_HANDLERS)
        prod = group.start(e2e_producer, db, n, ASYNC_HANDLERS, mode)
        for pipe in (cons, prod):
            group.recv(pipe, "async start")
        prod.send("go")
        produced = group.recv(prod, "producer")
        report = group.recv(cons, "async consumer")
    if report["count"] != n:
        raise RuntimeError(f"async run: the consumer acked {report['count']} messages, not {n}")
    return {
        "rate": n / (report["last"] - produced["start"]),
        "producer_rate": n / (produced["sent"] - produced["start"]),
        "consumer_pieces_per_batch": report["pieces"] / max(1, report["batches"]),
        "producer_pieces_per_batch": produced["pieces"] / max(1, produced["batches"]),
    }


def run_huey(path: str, n: int) -> dict[str, Any]:
    with Group(timeout=60 + n / 50) as group:
        cons = group.start(huey_consumer, path, n)
        prod = group.start(huey_producer, path, n)
        for pipe in (cons, prod):
            group.recv(pipe, "huey start")
        prod.send("go")
        produced = group.recv(prod, "huey producer")
        report = group.recv(cons, "huey consumer")
    return {
        "rate": n / (report["last"] - produced["start"]),
        "producer_rate": n / (produced["sent"] - produced["start"]),
        "empty_polls": report["empty_polls"],
    }


def run_op(db: str, kind: str, queue: str, n: int, synchronous: str = "FULL") -> dict[str, Any]:
    with Group(timeout=60 + n / 100) as group:
        pipe = group.start(op_worker, db, kind, queue, n, synchronous)
        report = group.recv(pipe, f"{kind} worker")
    return {"rate": n / report["seconds"], "rss_kb": report["rss_kb"]}


# In this process --------------------------------------------------------------------------------


def raw_sqlite(db: str, n: int) -> float:
    """send, claim, ack as three bare transactions per message, one process; returns messages/s."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    execute, dumps, loads, now = conn.execute, json.dumps, json.loads, time.time
    start = time.perf_counter()
    for i in range(n):
        execute("BEGIN IMMEDIATE")
        t = now()
        execute(
            "INSERT INTO messages (queue, body, priority, available_at, created) VALUES (?, ?, 0, ?, ?)",
            (QUEUE, dumps(message_body(i), separators=(",", ":")), t, t),
        )
        execute("COMMIT")
        execute("BEGIN IMMEDIATE")
        t = now()
        message_id, body = execute(
            "SELECT id, body FROM messages WHERE queue = ? AND available_at <= ? "
            "ORDER BY priority DESC, available_at LIMIT 1",
            (QUEUE, t),
        ).fetchone()
        execute(
            "UPDATE messages SET lease_owner = 'raw', available_at = ?, attempts = attempts + 1 WHERE id = ?",
            (t + 30, message_id),
        )
        execute("COMMIT")
        loads(body)
        execute("BEGIN IMMEDIATE")
        execute("DELETE FROM messages WHERE id = ? AND lease_owner = 'raw'", (message_id,))
        execute("COMMIT")
    seconds = time.perf_counter() - start
    conn.close()
    return n / seconds


def bulk_fill(db: str, queue: str, n: int, delay: float = 0.0) -> float:
    """Queue n messages, ready in `delay` seconds, with one transaction of direct INSERTs
    (executemany through nf.store.write), then checkpoint the WAL; returns the seconds taken."""
    start = time.perf_counter()
    nf = nodeflow.connect(db, settings=settings())
    now = time.time() + delay
    text = json.dumps(message_body(0), separators=(",", ":"))

    def fill(conn: sqlite3.Connection) -> None:
        conn.executemany(
            "INSERT INTO messages (queue, body, priority, available_at, created) VALUES (?, ?, 0, ?, ?)",
            ((queue, text, now, now) for _ in range(n)),
        )

    nf.store.write(fill)
    nf.close()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - start


def time_empty_receive(db: str, calls: int = 5) -> float:
    """Median milliseconds of receive(wait=0) returning None (nothing ready), in this process."""
    nf = nodeflow.connect(db, settings=settings())
    times = []
    for _ in range(calls + 1):
        start = time.perf_counter()
        assert nf.receive(QUEUE) is None
        times.append((time.perf_counter() - start) * 1000)
    nf.close()
    return statistics.median(times[1:])  # the first opens the read connection


def empty_queue(db: str) -> None:
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    conn.execute("DELETE FROM messages")
    conn.close()


def measure_signals(db: str, rounds: int, poll_interval: float, doorbells: bool) -> dict[str, Any]:
    nodeflow.connect(db).close()
    trigger = nodeflow.connect(db, settings=settings())
    if not doorbells:
        trigger.doorbells.ring = lambda topics: None  # type: ignore[method-assign]  # every ring lost
    jitter = 0.002 if doorbells else poll_interval
    latencies: list[float] = []
    calls: list[float] = []
    try:
        with Group(timeout=30) as group:
            pipe = group.start(signal_receiver, db, poll_interval)
            group.recv(pipe, "signal receiver")
            trigger.trigger("warm-up")
            for _ in range(rounds):
                pipe.send("arm")
                assert group.recv(pipe, "arming") == "armed"
                time.sleep(random.uniform(0, jitter))
                t0 = time.monotonic()
                trigger.trigger(SIGNAL_KEY)
                calls.append((time.monotonic() - t0) * 1000)
                fired = group.recv(pipe, "token callback")
                latencies.append((fired - t0) * 1000)
            pipe.send("stop")
    finally:
        trigger.close()
    return {
        "samples": len(latencies),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
        "min_ms": min(latencies),
        "trigger_call_p50_ms": percentile(calls, 50),
    }


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime + stime from /proc/PID/stat in seconds, on-CPU seconds summed from every thread's schedstat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    exact = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as sched:
                exact += int(sched.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK"), exact / 1e9


def measure_idle(db: str, seconds: float) -> dict[str, Any]:
    nodeflow.connect(db).close()
    with Group(timeout=30) as group:
        pipe = group.start(idle_node, db)
        group.recv(pipe, "idle node")
        pid = group.procs[0].pid
        assert pid is not None
        time.sleep(0.5)  # past the listener's start-up
        wall0, (ticks0, exact0) = time.monotonic(), cpu_seconds(pid)
        time.sleep(seconds)
        wall1, (ticks1, exact1) = time.monotonic(), cpu_seconds(pid)
        pipe.send("stop")
    wall = wall1 - wall0
    return {
        "seconds": wall,
        "cpu_pct": (ticks1 - ticks0) / wall * 100,
        "cpu_pct_schedstat": (exact1 - exact0) / wall * 100,
        "cpu_ms": (ticks1 - ticks0) * 1000,
        "cpu_ms_schedstat": (exact1 - exact0) * 1000,
    }


# The run ----------------------------------------------------------------------------------------


def ratio_row(key: str, label: str, top: Row, bottom: Row, target: float, note: str = "") -> Row:
    row = Row(key, label, "x", note=note)
    if top.value is None or bottom.value is None:
        return row
    row.value = top.value / bottom.value
    if len(top.runs) == len(bottom.runs) and len(top.runs) > 1:
        ratios = [a / b for a, b in zip(top.runs, bottom.runs, strict=True)]
        row.spread = f"{min(ratios):.2f}..{max(ratios):.2f}"
    row.target = f">= {target:.2f}x"
    row.result = verdict(row.value >= target)
    return row


def nodeflow_commit() -> str:
    """The repository's commit, "+modified" when nodeflow.py differs from it; "?" without git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        clean = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "nodeflow.py"]).returncode
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + ("" if clean == 0 else "+modified")


def run_benchmark(plan: Plan, progress: benchlib.Progress) -> tuple[list[Row], dict[str, Any]]:
    bench_dir = REPO / "bench"
    folder = tempfile.mkdtemp(prefix="tmp-bus-", dir=bench_dir)
    try:
        import huey

        huey_version: str | None = getattr(huey, "__version__", "?")
    except ImportError:
        huey_version = None
    meta: dict[str, Any] = {
        **benchlib.environment(nodeflow.filesystem_type(folder), str(bench_dir)),
        "huey": huey_version,
        "commit": nodeflow_commit(),
        "repeats": plan.repeats,
        "op_repeats": plan.op_repeats,
        "plan": plan.__dict__,
    }
    rows: dict[str, Row] = {}

    def row(key: str, label: str, unit: str, note: str = "") -> Row:
        rows[key] = Row(key, label, unit, note=note)
        return rows[key]

    raw = row("raw", "raw SQLite loop: insert, claim, delete (3 txns/msg)", "msg/s", "one process, nodeflow's schema")
    e2e = {
        k: row(f"e2e_{k}", f"e2e 1 sync producer -> {k} consumer process{'es' if k > 1 else ''}", "msg/s")
        for k in (1, 2, 4)
    }
    share = row("fair_share_4", "4 consumers: lowest consumer / fair share", "share")
    drain = {
        k: row(
            f"drain_{k}", f"drain pre-filled queue, {k} consumer process{'es' if k > 1 else ''} (no producer)", "msg/s"
        )
        for k in (1, 4)
    }
    nf_async = row(
        "async16",
        f"e2e 1 process, {ASYNC_HANDLERS} asyncio handlers (producer: {ASYNC_HANDLERS} asend in flight)",
        "msg/s",
    )
    nf_async_sync = row(
        "async16_sync_producer", f"e2e 1 process, {ASYNC_HANDLERS} asyncio handlers (producer: sync send)", "msg/s"
    )
    huey_row = row("huey", "e2e huey SqliteStorage enqueue -> dequeue worker", "msg/s")
    e2e_details: dict[str, list[dict[str, Any]]] = {}
    try:
        dbs = {}
        for name in ("raw", "e2e1", "e2e2", "e2e4", "drain1", "drain4", "async", "async_sync"):
            dbs[name] = os.path.join(folder, f"{name}.db")
            nodeflow.connect(dbs[name]).close()  # created once, before processes race to open it
        huey_db = os.path.join(folder, "huey.db")
        if huey_version is not None:
            huey_storage(huey_db).close()
        raw_sqlite(dbs["raw"], max(50, plan.e2e // 20))  # warm-up
        for repeat in range(plan.repeats):
            progress(f"end to end run {repeat + 1}/{plan.repeats}: raw SQLite, {plan.e2e} messages")
            raw.runs.append(raw_sqlite(dbs["raw"], plan.e2e))
            for k in (1, 2, 4):
                progress(f"end to end run {repeat + 1}/{plan.repeats}: {k} consumer(s), {plan.e2e} messages")
                result = run_e2e(dbs[f"e2e{k}"], plan.e2e, k, "sync")
                e2e[k].runs.append(result["rate"])
                e2e_details.setdefault(f"e2e_{k}", []).append(result)
            for k in (1, 4):
                progress(f"end to end run {repeat + 1}/{plan.repeats}: drain {plan.e2e} pre-filled, {k} consumer(s)")
                result = run_drain(dbs[f"drain{k}"], plan.e2e, k)
                drain[k].runs.append(result["rate"])
                e2e_details.setdefault(f"drain_{k}", []).append(result)
            progress(f"end to end run {repeat + 1}/{plan.repeats}: {ASYNC_HANDLERS} asyncio handlers, {plan.async_e2e}")
            result = run_async_e2e(dbs["async"], plan.async_e2e, "async")
            nf_async.runs.append(result["rate"])
            e2e_details.setdefault("async16", []).append(result)
            result = run_async_e2e(dbs["async_sync"], plan.e2e, "sync")
            nf_async_sync.runs.append(result["rate"])
            e2e_details.setdefault("async16_sync_producer", []).append(result)
            if huey_version is not None:
                progress(f"end to end run {repeat + 1}/{plan.repeats}: huey, {plan.async_e2e} messages")
                result = run_huey(huey_db, plan.async_e2e)
                huey_row.runs.append(result["rate"])
                e2e_details.setdefault("huey", []).append(result)

        # Sends and receives in one process, on an empty queue and on a deep one ------------------
        ops = {
            "send_full": row("send_full", "send only, 1 process, sync FULL", "msg/s"),
            "send_normal": row("send_normal", "send only, 1 process, sync NORMAL", "msg/s"),
            "recv_full": row("recv_full", "receive+ack only, pre-filled queue, FULL", "msg/s"),
            "deep_send": row("deep_send", f"send only, {plan.depth:,} queued, FULL", "msg/s"),
            "deep_recv": row("deep_recv", f"receive+ack only, {plan.depth:,} queued, FULL", "msg/s"),
        }
        rss_empty = row("rss_empty", "consumer RSS after receive+ack, pre-filled queue", "kB")
        rss_deep = row("rss_deep", f"consumer RSS after receive+ack, {plan.depth:,} queued", "kB")
        for name in ("send_full", "send_normal", "recv_full", "deep"):
            dbs[name] = os.path.join(folder, f"{name}.db")
            nodeflow.connect(dbs[name]).close()
        progress(f"filling a queue with {plan.depth:,} messages (one transaction of INSERTs)")
        fill_seconds = bulk_fill(dbs["deep"], QUEUE, plan.depth)
        meta["fill_seconds"] = round(fill_seconds, 2)
        meta["deep_db_bytes"] = os.path.getsize(dbs["deep"])
        progress(f"receive with nothing ready: empty queue, then {plan.depth:,} delayed messages")
        dbs["delayed"] = os.path.join(folder, "delayed.db")
        nodeflow.connect(dbs["delayed"]).close()
        idle_empty = time_empty_receive(dbs["delayed"])
        bulk_fill(dbs["delayed"], QUEUE, plan.depth, delay=86400.0)
        idle_deep = row("idle_receive_deep", f"receive(wait=0) finding none ready, {plan.depth:,} delayed", "ms")
        idle_deep.value = time_empty_receive(dbs["delayed"])
        idle_deep.note = (
            f"{idle_empty:.3f} ms on an empty queue; the next due time comes from one index seek "
            "per distinct priority, as on every wake of a waiting receive"
        )
        for repeat in range(plan.op_repeats):
            progress(f"send / receive run {repeat + 1}/{plan.op_repeats}")
            ops["send_full"].runs.append(run_op(dbs["send_full"], "send", QUEUE, plan.send_full)["rate"])
            empty_queue(dbs["send_full"])
            ops["send_normal"].runs.append(
                run_op(dbs["send_normal"], "send", QUEUE, plan.send_normal, "NORMAL")["rate"]
            )
            empty_queue(dbs["send_normal"])
            bulk_fill(dbs["recv_full"], QUEUE, plan.recv + 20)
            result = run_op(dbs["recv_full"], "receive", QUEUE, plan.recv)
            ops["recv_full"].runs.append(result["rate"])
            rss_empty.runs.append(result["rss_kb"])
            ops["deep_send"].runs.append(run_op(dbs["deep"], "send", QUEUE, plan.send_full)["rate"])
            result = run_op(dbs["deep"], "receive", QUEUE, plan.recv)
            ops["deep_recv"].runs.append(result["rate"])
            rss_deep.runs.append(result["rss_kb"])

        # Signals ----------------------------------------------------------------------------------
        progress(f"signal latency with doorbells, {plan.latency_doorbell} triggers")
        bell = measure_signals(os.path.join(folder, "bell.db"), plan.latency_doorbell, 1.0, doorbells=True)
        progress(f"signal latency polling every {plan.poll_interval:g} s, {plan.latency_poll} triggers")
        poll = measure_signals(os.path.join(folder, "poll.db"), plan.latency_poll, plan.poll_interval, doorbells=False)
        meta["signals"] = {"doorbells": bell, "polling": poll}
        progress(f"idle node CPU over {plan.idle_seconds:g} s")
        idle = measure_idle(os.path.join(folder, "idle.db"), plan.idle_seconds)
        meta["idle"] = idle
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    meta["e2e_runs"] = e2e_details

    # Verdicts and notes -----------------------------------------------------------------------
    for r in rows.values():
        r.settle()
    for k in (1, 2, 4):
        e2e[k].note = "the producer's send rate in these runs ~{:,.0f}/s".format(
            statistics.median(d["producer_rate"] for d in e2e_details[f"e2e_{k}"])
        )
    shares = []
    for d in e2e_details["e2e_4"]:
        fair = sum(d["counts"]) / len(d["counts"])
        shares.append(min(d["counts"]) / fair)
    share.runs = shares
    share.settle()
    share.target = f">= {TARGET_FAIR_SHARE:.2f}"
    share.result = verdict(share.value is not None and share.value >= TARGET_FAIR_SHARE)
    last4 = e2e_details["e2e_4"][-1]["counts"]
    share.note = "per-consumer acks, last run: " + " / ".join(str(c) for c in last4)

    a = e2e_details["async16"]
    nf_async.note = "pieces/commit: consumer {:.1f}, producer {:.1f}; producer-side rate ~{:,.0f}/s".format(
        statistics.median(d["consumer_pieces_per_batch"] for d in a),
        statistics.median(d["producer_pieces_per_batch"] for d in a),
        statistics.median(d["producer_rate"] for d in a),
    )
    s = e2e_details["async16_sync_producer"]
    nf_async_sync.note = "pieces/commit: consumer {:.1f}; producer-side rate ~{:,.0f}/s (1 commit per send)".format(
        statistics.median(d["consumer_pieces_per_batch"] for d in s),
        statistics.median(d["producer_rate"] for d in s),
    )
    if huey_version is not None:
        h = e2e_details["huey"]
        huey_row.note = (
            f"huey {huey_version}, fsync=True (FULL, WAL); 1 enqueue loop process + 1 dequeue loop process "
            "(1 ms sleep when empty, {:,.0f} empty polls/run), no ack; pickling of Tasks not included".format(
                statistics.median(d["empty_polls"] for d in h)
            )
        )
    else:
        huey_row.value = HUEY_REFERENCE
        huey_row.note = "huey is not importable: the issue's figure 2,100/s is the reference"

    out: list[Row] = [raw, e2e[1], e2e[2], e2e[4]]
    out.append(ratio_row("ratio_e2e1_raw", "ratio e2e 1 consumer / raw SQLite", e2e[1], raw, TARGET_E2E_VS_RAW))
    out.append(ratio_row("ratio_e2e4_e2e1", "ratio e2e 4 consumers / 1 consumer", e2e[4], e2e[1], TARGET_FOUR_VS_ONE))
    out.append(share)
    for k in (1, 4):
        drain[k].note = "rate = messages / (go .. last ack); per-consumer acks, last run: " + " / ".join(
            str(c) for c in e2e_details[f"drain_{k}"][-1]["counts"]
        )
        out.append(drain[k])
    out += [nf_async, nf_async_sync, huey_row]
    huey_for_ratio = huey_row if huey_version is not None else Row("", "", "", value=HUEY_REFERENCE)
    out.append(
        ratio_row(
            "ratio_async_huey",
            f"ratio {ASYNC_HANDLERS} handlers (async producer) / huey",
            nf_async,
            huey_for_ratio,
            TARGET_ASYNC_VS_HUEY,
        )
    )
    same = ratio_row(
        "ratio_async_sync_huey",
        f"ratio {ASYNC_HANDLERS} handlers (sync producer) / huey",
        nf_async_sync,
        huey_for_ratio,
        TARGET_ASYNC_VS_HUEY,
        note="same producer shape as huey's: one durable commit per send",
    )
    same.target, same.result = "-", "-"  # information: the target is on the row above
    out.append(same)
    out += [ops["send_full"], ops["send_normal"], ops["recv_full"]]

    for label, stats, limit in (("doorbells", bell, TARGET_SIGNAL_P99_MS), ("polling only", poll, None)):
        for q in ("p50", "p99"):
            r = Row(f"signal_{label.split()[0]}_{q}", f"signal trigger -> on_change, {label} {q}", "ms")
            r.value = stats[f"{q}_ms"]
            r.spread = f"n={stats['samples']}, max {stats['max_ms']:.2f}"
            if label == "doorbells":
                r.note = f"trigger() call itself p50 {stats['trigger_call_p50_ms']:.3f} ms (a FULL commit)"
                if q == "p99":
                    r.target = f"< {limit:g} ms"
                    r.result = verdict(r.value < (limit or 0))
            else:
                r.note = f"trigger's rings disabled (no-op ring); receiver poll_interval {plan.poll_interval:g} s"
            out.append(r)

    idle_row = Row("idle_cpu", f"idle node CPU (listener started), {idle['seconds']:.0f} s", "%")
    idle_row.value = idle["cpu_pct"]
    idle_row.target = f"< {TARGET_IDLE_CPU_PCT:g}% of a core"
    idle_row.result = verdict(idle_row.value < TARGET_IDLE_CPU_PCT)
    idle_row.note = (
        f"/proc/PID/stat utime+stime {idle['cpu_ms']:.0f} ms; schedstat {idle['cpu_ms_schedstat']:.1f} ms "
        f"= {idle['cpu_pct_schedstat']:.3f}%"
    )
    out.append(idle_row)

    fill_note = f"filled by one executemany INSERT transaction in {meta['fill_seconds']:.1f} s"
    ops["deep_send"].note = fill_note
    out.append(ops["deep_send"])
    out.append(ops["deep_recv"])
    out.append(
        ratio_row(
            "ratio_deep_send", f"ratio send {plan.depth:,} queued / empty", ops["deep_send"], ops["send_full"],
            TARGET_DEEP_VS_EMPTY,
        )
    )  # fmt: skip
    out.append(
        ratio_row(
            "ratio_deep_recv", f"ratio receive+ack {plan.depth:,} queued / pre-filled", ops["deep_recv"],
            ops["recv_full"], TARGET_DEEP_VS_EMPTY,
        )
    )  # fmt: skip
    out.append(rows["idle_receive_deep"])
    rss_empty.note = "VmRSS of the consumer process, from /proc/self/status"
    rss_deep.note = f"database file {meta['deep_db_bytes'] / 1e6:,.0f} MB"
    out += [rss_empty, rss_deep]
    meta["loadavg_at_end"] = benchlib.loadavg()
    return out, meta


def render(rows: list[Row], meta: dict[str, Any], quick: bool) -> str:
    plan = meta["plan"]
    intro = [
        benchlib.headline(
            "nodeflow bus benchmark", meta, quick, f"huey {meta['huey'] or 'not installed'}", at=f" at {meta['commit']}"
        ),
        f"end to end: median of {meta['repeats']} runs of {plan['e2e']:,} messages ({plan['async_e2e']:,} for huey "
        "and the asyncio row with 16 asend in flight), producer sending concurrently in its own process, consumers "
        "in their own; rate = messages / (producer's first send .. last real ack); all synchronous=FULL",
        f"single process: median of {meta['op_repeats']} runs of {plan['send_full']:,} sends "
        f"({plan['send_normal']:,} at NORMAL), {plan['recv']:,} receive+ack; spread = min..max of the runs",
    ]
    return benchlib.render_table(rows, intro)


def main(argv: list[str] | None = None) -> int:
    return benchlib.main(
        argv,
        description="Benchmark nodeflow's message bus and cache signals.",
        quick_help="fewer runs and messages (a smoke test, < 40 s)",
        full_plan=FULL_PLAN,
        quick_plan=QUICK_PLAN,
        run=run_benchmark,
        render=render,
        say_done=True,
    )


if __name__ == "__main__":
    sys.exit(main())
