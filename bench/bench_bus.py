"""Benchmark of nodeflow's durable queue beside huey's SQLite storage and a raw SQLite loop, and of
its cache signals.

Run from the repository root:  python3 bench/bench_bus.py [--quick] [--json FILE]

Everything runs in one go, in a fresh temporary folder under bench/ (on the repository's
filesystem), removed at the end. Every measurement runs in child processes started by a fork
server (multiprocessing's "forkserver", with nodeflow and huey.storage preloaded: a clean
interpreter that has imported them and opened nothing, forked in about 10 ms where a spawn takes
0.3 s); each child opens its own handle (nodeflow.connect(), huey's SqliteStorage or
sqlite3.connect) and uses the sync API.

The queue table: nodeflow beside huey and raw SQLite
----------------------------------------------------
R rounds (3, also with --quick) of N messages (10,000; 1,500 with --quick), interleaved: round 1
of every row, then round 2, and so on, so that a slow moment of the shared disk hits every row
alike. Each round runs on fresh database files (a folder of its own, removed after it). A row's
figure is the median of its rounds, spread = min..max. A ratio is computed in each round in which
both of its sides ran; the ratio shown is the median of those per-round ratios, its spread their
min..max. Bodies are {"i": i, "text": "a short body text"}: 34 to 38 bytes of compact JSON, 37 for
most (what the issue measured: 10,000 messages of ~37 bytes); huey and the raw loop are given the
same bytes (json.dumps with compact separators), and huey's consumers json.loads what they dequeue,
as nodeflow decodes what it receives. Every handle is at synchronous=FULL: nodeflow's default
Settings() (sends durable on return; its claims and plain acks commit without waiting for the
disk, by design), huey's SqliteStorage(name="bench", filename=..., fsync=True) (WAL,
synchronous=FULL, `begin exclusive` per write), the raw loop's PRAGMAs. huey's storage has no lease
and no ack: dequeue() selects and deletes the row in one transaction; the pickling of huey's Task
objects is left out, which favours huey. Each handle first makes 20 untimed operations of the
kind timed (a consumer of the end-to-end and drain rows: 20 send + receive + ack, or enqueue +
dequeue, on a queue of its own). A single-process rate is N / (perf_counter over the timed loop).
A pre-filled queue holds N + 20 messages (N for the drain rows), put there by one executemany
INSERT transaction and a WAL checkpoint (huey's task table the same way) before the process starts.

- send, 1 process: a loop of nf.send(QUEUE, body) against a loop of storage.enqueue(data).
  Target: nodeflow / huey >= 1.0.
- send vs the disk's ceiling: the same nodeflow send rate against a raw sqlite3 loop in one
  process of one-row commits, BEGIN IMMEDIATE; INSERT INTO t(body) VALUES (?); COMMIT, on a table
  t(id INTEGER PRIMARY KEY, body TEXT), WAL, synchronous=FULL. Target: nodeflow / raw >= 0.7.
- receive + ack, 1 process, pre-filled queue: m = nf.receive(QUEUE, lease=30); nf.ack(m) against
  storage.dequeue(). Target: nodeflow / huey >= 1.5.
- receive with the previous ack carried: m = nf.receive(QUEUE, lease=30, ack=m), which acks the
  previous message in the transaction of the next claim; the last one is acked by nf.ack(m),
  inside the timing. Against the same rounds' huey dequeue(); information.
- batches: nf.send_many(QUEUE, bodies) with 100 bodies a call, against huey's enqueue() (one a
  message: it has no batch call); ms = nf.receive(QUEUE, lease=30, batch=100); nf.ack_many(ms) on
  a pre-filled queue, against huey's dequeue(). Rates in messages/s; information.
- end to end, 1 producer process and 1 consumer process at once. The nodeflow consumer is already
  blocked in nf.receive(QUEUE, lease=30, wait=30) when the producer starts (it has started its
  listener, and the producer is told to go 50 ms after both said they were ready), then nf.ack(m),
  until a stop message. The producer sends N messages, one nf.send() each, then one stop message
  per consumer at priority -1, taken only once every real message is claimed. huey: the producer
  calls enqueue() per message, the consumer loops on dequeue(), sleeping 1 ms when it finds the
  queue empty (huey's own consumer backs off from 100 ms). Rate = N / (the last real ack, or
  dequeue, in any consumer - the producer's first send), both time.monotonic() (CLOCK_MONOTONIC:
  one clock for all processes). Target: nodeflow / huey >= 1.2.
- drain with 2 consumer processes of a pre-filled queue, no producer: told to go at once, each
  loops on nf.receive(QUEUE, lease=30) (wait=0) + nf.ack(m), or on dequeue(), until it finds the
  queue empty. Rate = N / (the parent's go .. the last ack). The note gives each consumer's count,
  round by round; information.
- end to end with 4 consumer processes against 1 (nodeflow both; the 1-consumer runs are those of
  the end-to-end row), the producer running at once as above. Target: 4 / 1 >= 1.0. And the lowest
  of the 4 consumers' counts as a share of a fair share (N / 4), the median of the rounds. Target
  >= 0.5.

The other rows
--------------
Deep queue: in each round, after the table's rows, N nf.send() in one process, then N
nf.receive(lease=30) + nf.ack() in another, as in the table's rows, on one database holding
1,000,000 queued messages (100,000 with --quick), put there once before the rounds by one
transaction of direct INSERTs (executemany through nf.store.write, then a WAL checkpoint). Their
ratios are per round against the table's nodeflow send and receive + ack of the same round. The
consumer's RSS is its VmRSS (/proc/self/status) after its loop (the table's receive + ack process,
and the deep one). And one receive(wait=0) that finds nothing ready among as many messages all
delayed by a day, against an empty queue, in this process.

Signals: the parent calls trigger(key) and stamps time.monotonic() just before the call (the
trigger's durable commit is included); a receiver process's token callback (on_change, run in
its listener thread) stamps time.monotonic() and reports it through a pipe. The receiver re-arms
a new token each round; the parent waits a random pause first (0..2 ms with doorbells, 0..poll
interval when polling) so rounds are not in step with the receiver's poll timer. "Polling only":
the triggering handle's doorbells.ring is replaced by a no-op, so every ring is lost and the
receiver (poll_interval 0.1 s) learns of a trigger only when its listener re-reads the log. (Removing
the receiver's socket file PATH.d/nodes/<id>.sock no longer works for this: the listener binds a
new one at its next poll.)

Idle CPU: a process with a token callback registered (so its listener thread runs: doorbell plus
the 1 s poll) and nothing else, read from /proc/PID/stat (utime + stime) over 10 s (3 s with
--quick).

Targets are printed as PASS or MISS, never asserted. A measurement that fails in a round is left
out of that round (its error goes to the progress lines, the row's note and the JSON's meta). The
standard library only; huey's rows need huey (pyproject.toml's dev extra pins it): without it they
say so and their ratios are n/a.
"""

from __future__ import annotations

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
from benchlib import Pair, Row, percentile, ratios_by_round, verdict  # noqa: E402

import nodeflow  # noqa: E402

QUEUE = "bench"  # also huey's storage name, so its rows carry the same queue name
STOP = {"stop": True}
SIGNAL_KEY = "defs"
WARM_UP = 20  # untimed operations each handle makes first
BATCH = 100  # messages a send_many or a batch receive takes

TARGET_SEND_VS_HUEY = 1.0
TARGET_SEND_VS_RAW = 0.7
TARGET_RECEIVE_VS_HUEY = 1.5
TARGET_E2E_VS_HUEY = 1.2
TARGET_FOUR_VS_ONE = 1.0
TARGET_FAIR_SHARE = 0.5
TARGET_SIGNAL_P99_MS = 5.0
TARGET_IDLE_CPU_PCT = 1.0
TARGET_DEEP_VS_EMPTY = 0.8


@dataclass(frozen=True)
class Plan:
    rounds: int  # of every queue row, interleaved
    messages: int  # per round and row (a multiple of BATCH)
    latency_doorbell: int  # triggers
    latency_poll: int
    poll_interval: float  # the polling-only receiver's
    idle_seconds: float
    depth: int  # messages queued for the deep-queue rows


FULL_PLAN = Plan(
    rounds=3,
    messages=10_000,
    latency_doorbell=200,
    latency_poll=200,
    poll_interval=0.1,
    idle_seconds=10.0,
    depth=1_000_000,
)
QUICK_PLAN = Plan(
    rounds=3,
    messages=1_500,
    latency_doorbell=100,
    latency_poll=40,
    poll_interval=0.1,
    idle_seconds=3.0,
    depth=100_000,
)


def message_body(i: int) -> dict[str, Any]:
    """37 bytes of compact JSON for i of 4 digits (34 to 38 for 0..10,019)."""
    return {"i": i, "text": "a short body text"}


def encoded(body: Any) -> str:
    """A body as the same compact JSON text nodeflow stores (for huey, .encode() it)."""
    return json.dumps(body, separators=(",", ":"))


def rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def settings(poll_interval: float = 1.0) -> nodeflow.Settings:
    """nodeflow's default Settings() (synchronous=FULL), with the poll interval a row asks for."""
    return nodeflow.Settings(poll_interval=poll_interval)


def is_stop(body: Any) -> bool:
    return isinstance(body, dict) and body.get("stop") is True


def huey_storage(path: str) -> Any:
    from huey.storage import SqliteStorage

    return SqliteStorage(name=QUEUE, filename=path, fsync=True)  # fsync=True: synchronous=FULL, WAL


# Single-process rows: each function runs in its own child, makes WARM_UP untimed operations of the
# kind it times, then times n, and returns (seconds, the handle's close). -----------------------


def op_nf_send(path: str, n: int) -> tuple[float, Callable[[], Any]]:
    nf = nodeflow.connect(path, settings=settings())
    send = nf.send
    start = 0.0
    for i in range(WARM_UP + n):
        if i == WARM_UP:
            start = time.perf_counter()
        send(QUEUE, message_body(i))
    return time.perf_counter() - start, nf.close


def op_nf_send_many(path: str, n: int) -> tuple[float, Callable[[], Any]]:
    nf = nodeflow.connect(path, settings=settings())
    send_many = nf.send_many
    for _ in range(WARM_UP):
        send_many(QUEUE, [message_body(i) for i in range(BATCH)])
    start = time.perf_counter()
    for first in range(0, n, BATCH):
        send_many(QUEUE, [message_body(i) for i in range(first, min(n, first + BATCH))])
    return time.perf_counter() - start, nf.close


def op_nf_receive(path: str, n: int) -> tuple[float, Callable[[], Any]]:
    nf = nodeflow.connect(path, settings=settings())
    receive, ack = nf.receive, nf.ack
    start = 0.0
    for i in range(WARM_UP + n):
        if i == WARM_UP:
            start = time.perf_counter()
        message = receive(QUEUE, lease=30)
        if message is None:
            raise RuntimeError("the pre-filled queue ran dry")
        ack(message)
    return time.perf_counter() - start, nf.close


def op_nf_receive_carried(path: str, n: int) -> tuple[float, Callable[[], Any]]:
    nf = nodeflow.connect(path, settings=settings())
    receive = nf.receive
    message: nodeflow.Message | None = None
    start = 0.0
    for i in range(WARM_UP + n):
        if i == WARM_UP:
            start = time.perf_counter()
        message = receive(QUEUE, lease=30, ack=message)  # acks the one before in this claim's commit
        if message is None:
            raise RuntimeError("the pre-filled queue ran dry")
    assert message is not None
    nf.ack(message)
    return time.perf_counter() - start, nf.close


def op_nf_receive_batch(path: str, n: int) -> tuple[float, Callable[[], Any]]:
    nf = nodeflow.connect(path, settings=settings())
    receive, ack_many = nf.receive, nf.ack_many
    for _ in range(WARM_UP):
        nf.ack_many(receive(QUEUE, lease=30, batch=1))
    start = time.perf_counter()
    got = 0
    while got < n:
        messages = receive(QUEUE, lease=30, batch=min(BATCH, n - got))
        if not messages:
            raise RuntimeError("the pre-filled queue ran dry")
        if ack_many(messages):
            raise RuntimeError("ack_many found leases lost")
        got += len(messages)
    return time.perf_counter() - start, nf.close


def op_huey_send(path: str, n: int) -> tuple[float, Callable[[], Any]]:
    storage = huey_storage(path)
    enqueue = storage.enqueue
    start = 0.0
    for i in range(WARM_UP + n):
        if i == WARM_UP:
            start = time.perf_counter()
        enqueue(encoded(message_body(i)).encode())
    return time.perf_counter() - start, storage.close


def op_huey_receive(path: str, n: int) -> tuple[float, Callable[[], Any]]:
    storage = huey_storage(path)
    dequeue, loads = storage.dequeue, json.loads
    start = 0.0
    for i in range(WARM_UP + n):
        if i == WARM_UP:
            start = time.perf_counter()
        data = dequeue()
        if data is None:
            raise RuntimeError("the pre-filled queue ran dry")
        loads(data)
    return time.perf_counter() - start, storage.close


def op_raw_send(path: str, n: int) -> tuple[float, Callable[[], Any]]:
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body TEXT)")
    execute = conn.execute
    start = 0.0
    for i in range(WARM_UP + n):
        if i == WARM_UP:
            start = time.perf_counter()
        execute("BEGIN IMMEDIATE")
        execute("INSERT INTO t(body) VALUES (?)", (encoded(message_body(i)),))
        execute("COMMIT")
    return time.perf_counter() - start, conn.close


OPS: dict[str, Callable[[str, int], tuple[float, Callable[[], Any]]]] = {
    "nf_send": op_nf_send,
    "nf_send_many": op_nf_send_many,
    "nf_receive": op_nf_receive,
    "nf_receive_carried": op_nf_receive_carried,
    "nf_receive_batch": op_nf_receive_batch,
    "huey_send": op_huey_send,
    "huey_receive": op_huey_receive,
    "raw_send": op_raw_send,
}


def op_worker(kind: str, path: str, n: int, pipe: Connection) -> None:
    seconds, close = OPS[kind](path, n)
    pipe.send({"seconds": seconds, "rss_kb": rss_kb()})
    close()


# Multi-process rows: producers and consumers ---------------------------------------------------


def warm_up_consumer(nf: nodeflow.Cluster) -> None:
    """WARM_UP send + receive + ack on a queue of this process's own."""
    own = f"warm-up-{os.getpid()}"
    for i in range(WARM_UP):
        nf.send(own, message_body(i))
        message = nf.receive(own, lease=30)
        assert message is not None
        nf.ack(message)


def warm_up_huey(storage: Any, consume: bool) -> None:
    """WARM_UP enqueue (+ dequeue) on a queue of this process's own, through the same connection."""
    name, storage.name = storage.name, f"warm-up-{os.getpid()}"
    try:
        for i in range(WARM_UP):
            storage.enqueue(encoded(message_body(i)).encode())
            if consume:
                assert storage.dequeue() is not None
    finally:
        storage.name = name


def e2e_producer(db: str, n: int, stops: int, pipe: Connection) -> None:
    """Sends n messages, one send() at a time, when told to go; then a stop message per consumer."""
    nf = nodeflow.connect(db, settings=settings())
    for i in range(WARM_UP):
        nf.send(f"warm-up-{os.getpid()}", message_body(i))
    pipe.send("ready")
    pipe.recv()
    start = time.monotonic()
    send = nf.send
    for i in range(n):
        send(QUEUE, message_body(i))
    sent = time.monotonic()
    for _ in range(stops):
        nf.send(QUEUE, STOP, priority=-1)
    pipe.send({"start": start, "sent": sent})
    nf.close()


def e2e_consumer(db: str, pipe: Connection) -> None:
    """receive(lease=30, wait=30) + ack until a stop message."""
    nf = nodeflow.connect(db, settings=settings())
    warm_up_consumer(nf)
    assert nf.receive(QUEUE, wait=0.01) is None  # starts the listener: the doorbell is bound before the producer starts
    pipe.send("ready")
    count, last = 0, 0.0
    receive, ack = nf.receive, nf.ack
    while True:
        message = receive(QUEUE, lease=30, wait=30)
        if message is None:
            break
        ack(message)
        if is_stop(message.body):
            break
        count += 1
        last = time.monotonic()
    pipe.send({"count": count, "last": last})
    nf.close()


def drain_consumer(db: str, pipe: Connection) -> None:
    """Told to go, receive(lease=30) (wait=0) + ack until the pre-filled queue is empty."""
    nf = nodeflow.connect(db, settings=settings())
    warm_up_consumer(nf)
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


def huey_producer(path: str, n: int, pipe: Connection) -> None:
    storage = huey_storage(path)
    warm_up_huey(storage, consume=False)
    pipe.send("ready")
    pipe.recv()
    start = time.monotonic()
    enqueue = storage.enqueue
    for i in range(n):
        enqueue(encoded(message_body(i)).encode())
    sent = time.monotonic()
    pipe.send({"start": start, "sent": sent})
    storage.close()


def huey_consumer(path: str, n: int, pipe: Connection) -> None:
    """dequeue() until n messages came, sleeping 1 ms whenever the queue is empty."""
    storage = huey_storage(path)
    warm_up_huey(storage, consume=True)
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


def huey_drain_consumer(path: str, pipe: Connection) -> None:
    """Told to go, dequeue() until the pre-filled queue is empty."""
    storage = huey_storage(path)
    warm_up_huey(storage, consume=True)
    pipe.send("ready")
    pipe.recv()
    count, last = 0, 0.0
    dequeue, loads = storage.dequeue, json.loads
    while (data := dequeue()) is not None:
        loads(data)
        count += 1
        last = time.monotonic()
    pipe.send({"count": count, "last": last})
    storage.close()


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

# A fork server: each child is forked from a clean interpreter that has imported these (and nothing
# else, and opened no database), so starting one costs milliseconds, not an interpreter's start-up.
CTX = multiprocessing.get_context("forkserver")
PRELOAD = ["nodeflow", "benchlib", "huey.storage"]  # a module that is missing is skipped


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
        try:
            return pipe.recv()
        except EOFError:
            raise RuntimeError(f"{what}: the child process ended without an answer (see its traceback)") from None

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


def run_op(kind: str, path: str, n: int) -> dict[str, Any]:
    """One single-process row's run in a child of its own: messages/s, and the child's VmRSS."""
    with Group(timeout=60 + n / 50) as group:
        pipe = group.start(op_worker, kind, path, n)
        report = group.recv(pipe, f"{kind} worker")
    return {"rate": n / report["seconds"], "seconds": report["seconds"], "rss_kb": report["rss_kb"]}


def start_together(group: Group, pipes: list[Connection], what: str) -> None:
    """Wait for every child's "ready", then a moment, so that waiting consumers are blocked."""
    for pipe in pipes:
        if group.recv(pipe, what) != "ready":
            raise RuntimeError(f"{what}: a child process did not say it was ready")
    time.sleep(0.05)


def run_e2e(db: str, n: int, consumers: int) -> dict[str, Any]:
    """One end-to-end run: a producer process and `consumers` consumer processes, nodeflow."""
    with Group(timeout=60 + n / 50) as group:
        cons = [group.start(e2e_consumer, db) for _ in range(consumers)]
        prod = group.start(e2e_producer, db, n, consumers)
        start_together(group, [*cons, prod], "end-to-end start")
        prod.send("go")
        produced = group.recv(prod, "producer")
        reports = [group.recv(pipe, "consumer") for pipe in cons]
    counts = [r["count"] for r in reports]
    if sum(counts) != n:
        raise RuntimeError(f"end-to-end run: consumers acked {sum(counts)} messages, not {n}")
    return {
        "rate": n / (max(r["last"] for r in reports) - produced["start"]),
        "counts": counts,
        "producer_rate": n / (produced["sent"] - produced["start"]),
    }


def run_huey_e2e(path: str, n: int) -> dict[str, Any]:
    """One end-to-end run: a huey enqueue process and a dequeue process."""
    with Group(timeout=60 + n / 50) as group:
        cons = group.start(huey_consumer, path, n)
        prod = group.start(huey_producer, path, n)
        start_together(group, [cons, prod], "huey start")
        prod.send("go")
        produced = group.recv(prod, "huey producer")
        report = group.recv(cons, "huey consumer")
    return {
        "rate": n / (report["last"] - produced["start"]),
        "producer_rate": n / (produced["sent"] - produced["start"]),
        "empty_polls": report["empty_polls"],
    }


def run_drain(target: Callable[..., None], path: str, n: int, consumers: int) -> dict[str, Any]:
    """`consumers` processes (drain_consumer or huey_drain_consumer) drain a queue pre-filled with
    n messages, all told to go at once."""
    with Group(timeout=60 + n / 50) as group:
        cons = [group.start(target, path) for _ in range(consumers)]
        start_together(group, cons, "drain start")
        start = time.monotonic()
        for pipe in cons:
            pipe.send("go")
        reports = [group.recv(pipe, "drain consumer") for pipe in cons]
    counts = [r["count"] for r in reports]
    if sum(counts) != n:
        raise RuntimeError(f"drain run: consumers took {sum(counts)} messages, not {n}")
    return {"rate": n / (max(r["last"] for r in reports) - start), "counts": counts}


# In this process --------------------------------------------------------------------------------


def new_db(folder: str, name: str) -> str:
    """A fresh nodeflow database, created before processes race to open it."""
    path = os.path.join(folder, f"{name}.db")
    nodeflow.connect(path).close()
    return path


def new_huey_db(folder: str, name: str) -> str:
    path = os.path.join(folder, f"{name}.db")
    huey_storage(path).close()  # creates huey's tables
    return path


def checkpoint(path: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def bulk_fill(db: str, queue: str, n: int, delay: float = 0.0) -> float:
    """Queue n messages, ready in `delay` seconds, with one transaction of direct INSERTs
    (executemany through nf.store.write), then checkpoint the WAL; returns the seconds taken."""
    start = time.perf_counter()
    nf = nodeflow.connect(db, settings=settings())
    now = time.time() + delay
    text = encoded(message_body(1234))

    def fill(conn: sqlite3.Connection) -> None:
        conn.executemany(
            "INSERT INTO messages (queue, body, priority, available_at, created) VALUES (?, ?, 0, ?, ?)",
            ((queue, text, now, now) for _ in range(n)),
        )

    nf.store.write(fill)
    nf.close()
    checkpoint(db)
    return time.perf_counter() - start


def huey_fill(path: str, n: int) -> None:
    """Queue n tasks in huey's table (as enqueue() writes them), one transaction, then checkpoint."""
    data = encoded(message_body(1234)).encode()
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO task (queue, data, priority) VALUES (?, ?, 0)", ((QUEUE, data) for _ in range(n)))
    conn.execute("COMMIT")
    conn.close()
    checkpoint(path)


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


StepRun = Callable[[str, int, str], dict[str, Any]]  # (the round's folder, n, the deep database) -> result


@dataclass(frozen=True)
class Step:
    """One measurement of a round."""

    key: str
    what: str  # for the progress line
    run: StepRun
    huey: bool = False  # needs huey


def raw_db(folder: str, name: str) -> str:
    return os.path.join(folder, f"{name}.db")  # the raw loop creates its table itself


def fill_nodeflow(path: str, n: int) -> None:
    bulk_fill(path, QUEUE, n)


def single(kind: str, new: Callable[[str, str], str], fill: Callable[[str, int], None] | None = None) -> StepRun:
    """A single-process row's step: a fresh database, pre-filled with n + WARM_UP messages when
    `fill` is given, then run_op in a child of its own."""

    def run(folder: str, n: int, _deep: str) -> dict[str, Any]:
        path = new(folder, kind)
        if fill is not None:
            fill(path, n + WARM_UP)
        return run_op(kind, path, n)

    return run


STEPS = [
    Step("send_nf", "nodeflow send", single("nf_send", new_db)),
    Step("send_huey", "huey enqueue", single("huey_send", new_huey_db), huey=True),
    Step("send_raw", "raw SQLite one-row commits", single("raw_send", raw_db)),
    Step("receive_nf", "nodeflow receive + ack", single("nf_receive", new_db, fill_nodeflow)),
    Step("receive_huey", "huey dequeue", single("huey_receive", new_huey_db, huey_fill), huey=True),
    Step("receive_carried_nf", "nodeflow receive(ack=previous)", single("nf_receive_carried", new_db, fill_nodeflow)),
    Step("send_many_nf", "nodeflow send_many", single("nf_send_many", new_db)),
    Step("receive_batch_nf", "nodeflow receive(batch) + ack_many", single("nf_receive_batch", new_db, fill_nodeflow)),
    Step("e2e1_nf", "nodeflow end to end, 1 consumer", lambda f, n, _deep: run_e2e(new_db(f, "e2e1_nf"), n, 1)),
    Step("e2e1_huey", "huey end to end", lambda f, n, _deep: run_huey_e2e(new_huey_db(f, "e2e1_huey"), n), True),
    Step("drain2_nf", "nodeflow drain, 2 consumers", lambda f, n, _deep: drain_nodeflow(f, n, 2)),
    Step("drain2_huey", "huey drain, 2 consumers", lambda f, n, _deep: drain_huey(f, n, 2), huey=True),
    Step("e2e4_nf", "nodeflow end to end, 4 consumers", lambda f, n, _deep: run_e2e(new_db(f, "e2e4_nf"), n, 4)),
    Step("deep_send", "nodeflow send, deep queue", lambda _f, n, deep: run_op("nf_send", deep, n)),
    Step("deep_receive", "nodeflow receive + ack, deep queue", lambda _f, n, deep: run_op("nf_receive", deep, n)),
]


def drain_nodeflow(folder: str, n: int, consumers: int) -> dict[str, Any]:
    path = new_db(folder, f"drain{consumers}_nf")
    bulk_fill(path, QUEUE, n)
    return run_drain(drain_consumer, path, n, consumers)


def drain_huey(folder: str, n: int, consumers: int) -> dict[str, Any]:
    path = new_huey_db(folder, f"drain{consumers}_huey")
    huey_fill(path, n)
    return run_drain(huey_drain_consumer, path, n, consumers)


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


def run_rounds(
    plan: Plan, folder: str, deep: str, has_huey: bool, progress: benchlib.Progress
) -> tuple[dict[str, list[dict[str, Any] | None]], dict[str, list[str]], list[float]]:
    """Every step once a round, round after round, each round in a fresh folder; a step's result
    is None in a round where it failed (its error kept) or could not run (no huey)."""
    results: dict[str, list[dict[str, Any] | None]] = {step.key: [] for step in STEPS}
    errors: dict[str, list[str]] = {}
    loads: list[float] = []
    for r in range(1, plan.rounds + 1):
        here = os.path.join(folder, f"round-{r}")
        os.mkdir(here)
        for step in STEPS:
            if step.huey and not has_huey:
                results[step.key].append(None)
                continue
            progress(f"round {r}/{plan.rounds}: {step.what}, {plan.messages:,} messages")
            try:
                results[step.key].append(step.run(here, plan.messages, deep))
            except Exception as error:
                results[step.key].append(None)
                errors.setdefault(step.key, []).append(f"round {r}: {type(error).__name__}: {error}")
                progress(f"round {r}/{plan.rounds}: {step.what} FAILED: {type(error).__name__}: {error}")
        shutil.rmtree(here, ignore_errors=True)
        loads.append(benchlib.loadavg()[0])
    return results, errors, loads


def run_benchmark(plan: Plan, progress: benchlib.Progress) -> tuple[list[Row], dict[str, Any]]:
    if plan.messages % BATCH:
        raise ValueError(f"messages per round must be a multiple of {BATCH}")
    CTX.set_forkserver_preload(PRELOAD)
    bench_dir = REPO / "bench"
    folder = tempfile.mkdtemp(prefix="tmp-bus-", dir=bench_dir)
    try:
        import huey

        huey_version: str | None = getattr(huey, "__version__", "?")
    except ImportError:
        huey_version = None
    n = plan.messages
    meta: dict[str, Any] = {
        **benchlib.environment(nodeflow.filesystem_type(folder), str(bench_dir)),
        "huey": huey_version,
        "commit": nodeflow_commit(),
        "plan": plan.__dict__,
        "body_bytes": [len(encoded(message_body(i))) for i in (0, 12, 1234, n + WARM_UP - 1)],
    }
    try:
        # The deep queue, filled once; a receive that finds nothing ready among as many delayed -------
        deep = new_db(folder, "deep")
        progress(f"filling a queue with {plan.depth:,} messages (one transaction of INSERTs)")
        meta["fill_seconds"] = round(bulk_fill(deep, QUEUE, plan.depth), 2)
        meta["deep_db_bytes"] = os.path.getsize(deep)
        progress(f"receive with nothing ready: empty queue, then {plan.depth:,} delayed messages")
        delayed = new_db(folder, "delayed")
        idle_empty = time_empty_receive(delayed)
        bulk_fill(delayed, QUEUE, plan.depth, delay=86400.0)
        idle_deep = time_empty_receive(delayed)
        os.remove(delayed)

        # The queue table's rounds, and the deep queue's ----------------------------------------------
        results, errors, loads = run_rounds(plan, folder, deep, huey_version is not None, progress)

        # Signals and an idle node ------------------------------------------------------------------
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
    meta["rounds"] = results
    meta["errors"] = errors
    meta["loadavg_1min_after_each_round"] = loads

    rows, pairs, other = queue_rows(plan, results, errors, huey_version)
    meta["side_by_side"] = pairs
    other_rows = signal_and_scale_rows(plan, meta, results, errors, bell, poll, idle, idle_empty, idle_deep)
    meta["other_rows"] = [row.key for row in other_rows]
    meta["loadavg_at_end"] = benchlib.loadavg()
    return [*rows, *other, *other_rows], meta


def rates(results: dict[str, list[dict[str, Any] | None]], key: str) -> list[float | None]:
    """A step's rate in each round, None where it has none."""
    return [None if result is None else result["rate"] for result in results[key]]


def failures(errors: dict[str, list[str]], *keys: str) -> str:
    """What failed, for a note: "; FAILED send_nf round 2: RuntimeError: ..." or ""."""
    failed = [f"{key} {message}" for key in keys for message in errors.get(key, [])]
    return "".join(f"; FAILED {text}" for text in failed)


def judge(row: Row, target: float | None) -> None:
    """A ratio row's target and result: "information" when it has none, n/a without a figure."""
    if target is None:
        row.target = "information"
        return
    row.target = f">= {target:.2f}x" if row.unit == "x" else f">= {target:.2f}"
    row.result = "n/a" if row.value is None else verdict(row.value >= target)


def queue_rows(
    plan: Plan,
    results: dict[str, list[dict[str, Any] | None]],
    errors: dict[str, list[str]],
    huey_version: str | None,
) -> tuple[list[Row], list[dict[str, str | None]], list[Row]]:
    """The queue table: every figure as a Row (for the JSON), and the table's lines as keys of them."""
    rows: dict[str, Row] = {}

    def rate_row(key: str, label: str) -> Row:
        row = Row(key, label, "msg/s", runs=[x for x in rates(results, key) if x is not None])
        row.settle()
        if huey_version is None and key.endswith("_huey"):
            row.note = "huey is not importable: no figure"
        rows[key] = row
        return row

    def ratio(key: str, top: str, bottom: str, target: float | None, note: str = "") -> Row:
        row = Row(key, f"ratio {top} / {bottom}, median of the per-round ratios", "x")
        row.runs = ratios_by_round(rates(results, top), rates(results, bottom))
        row.settle()
        judge(row, target)
        if huey_version is None and bottom.endswith("_huey"):
            note = "huey is not importable (pip install -e '.[dev]'): no huey figure, no ratio"
        row.note = note + failures(errors, top, bottom)
        rows[key] = row
        return row

    rate_row("send_nf", "nodeflow send(), 1 process")
    rate_row("send_huey", "huey SqliteStorage.enqueue(), 1 process")
    rate_row("send_raw", "raw sqlite3 one-row commits (BEGIN IMMEDIATE; INSERT; COMMIT), 1 process")
    rate_row("receive_nf", "nodeflow receive() + ack(), 1 process, pre-filled queue")
    rate_row("receive_huey", "huey SqliteStorage.dequeue(), 1 process, pre-filled queue")
    rate_row("receive_carried_nf", "nodeflow receive(ack=previous), 1 process, pre-filled queue")
    rate_row("send_many_nf", f"nodeflow send_many() of {BATCH}, 1 process")
    rate_row("receive_batch_nf", f"nodeflow receive(batch={BATCH}) + ack_many(), 1 process, pre-filled queue")
    rate_row("e2e1_nf", "nodeflow end to end, 1 producer + 1 consumer process")
    rate_row("e2e1_huey", "huey end to end, 1 enqueue process + 1 dequeue process")
    rate_row("drain2_nf", "nodeflow drain of a pre-filled queue, 2 consumer processes")
    rate_row("drain2_huey", "huey drain of a pre-filled queue, 2 dequeue processes")
    rate_row("e2e4_nf", "nodeflow end to end, 1 producer + 4 consumer processes")

    def done(key: str) -> list[dict[str, Any]]:
        return [result for result in results[key] if result is not None]

    def median_of(key: str, field: str) -> str:
        values = [result[field] for result in done(key)]
        return f"{statistics.median(values):,.0f}" if values else "n/a"

    def splits(key: str) -> str:
        return ", ".join("/".join(f"{c:,}" for c in result["counts"]) for result in done(key)) or "n/a"

    def share_range(shares: list[float]) -> str:
        """ "27% (median; 12%..54%)", or "n/a"."""
        if not shares:
            return "n/a"
        spread = f"; {min(shares):.0%}..{max(shares):.0%}" if len(shares) > 1 else ""
        return f"{statistics.median(shares):.0%} (median{spread})"

    def lowest_share(result: dict[str, Any]) -> float:
        counts = result["counts"]
        return min(counts) / (sum(counts) / len(counts))

    ratio("ratio_send_huey", "send_nf", "send_huey", TARGET_SEND_VS_HUEY, "one durable commit a message on both sides")
    ratio(
        "ratio_send_raw",
        "send_nf",
        "send_raw",
        TARGET_SEND_VS_RAW,
        "raw: table t(id INTEGER PRIMARY KEY, body TEXT), WAL, synchronous=FULL",
    )
    ratio(
        "ratio_receive_huey",
        "receive_nf",
        "receive_huey",
        TARGET_RECEIVE_VS_HUEY,
        "nodeflow: 2 commits a message (the claim, the ack); huey: 1 (SELECT + DELETE), no lease",
    )
    ratio(
        "ratio_receive_carried_huey",
        "receive_carried_nf",
        "receive_huey",
        None,
        "nodeflow: 1 commit a message, each claim acking the message before",
    )
    ratio(
        "ratio_send_many_huey",
        "send_many_nf",
        "send_huey",
        None,
        f"nodeflow: 1 commit per {BATCH} messages; huey: 1 per message",
    )
    ratio(
        "ratio_receive_batch_huey",
        "receive_batch_nf",
        "receive_huey",
        None,
        f"nodeflow: 2 commits per {BATCH} messages; huey: 1 per message",
    )
    huey_e2e = done("e2e1_huey")
    ratio(
        "ratio_e2e1_huey",
        "e2e1_nf",
        "e2e1_huey",
        TARGET_E2E_VS_HUEY,
        f"producer's own send rate ~{median_of('e2e1_nf', 'producer_rate')}/s (huey "
        f"~{median_of('e2e1_huey', 'producer_rate')}/s); huey's consumer found the queue empty "
        + (f"{statistics.median(r['empty_polls'] for r in huey_e2e):,.0f}" if huey_e2e else "n/a")
        + " times a round (1 ms sleep each)",
    )
    drain_note = f"per consumer, round by round: nodeflow {splits('drain2_nf')}; huey {splits('drain2_huey')}"
    huey_shares = [lowest_share(result) for result in done("drain2_huey")]
    if huey_shares:
        nf_shares = [lowest_share(result) for result in done("drain2_nf")]
        verdict_word = (
            "very unfair" if statistics.median(huey_shares) < TARGET_FAIR_SHARE
            else "uneven" if min(huey_shares) < TARGET_FAIR_SHARE
            else "even enough"
        )  # fmt: skip
        drain_note += (
            f"; huey's split is {verdict_word}: its lowest consumer took {share_range(huey_shares)} of a fair "
            f"share, nodeflow's {share_range(nf_shares)}"
        )
    ratio("ratio_drain2_huey", "drain2_nf", "drain2_huey", None, drain_note)
    ratio(
        "ratio_e2e4_e2e1",
        "e2e4_nf",
        "e2e1_nf",
        TARGET_FOUR_VS_ONE,
        f"producer's own send rate ~{median_of('e2e4_nf', 'producer_rate')}/s with 4 consumers, "
        f"~{median_of('e2e1_nf', 'producer_rate')}/s with 1",
    )
    share = Row("fair_share_4", "4 consumers: lowest consumer's count / fair share (N / 4)", "share")
    share.runs = [lowest_share(result) for result in done("e2e4_nf")]
    share.settle()
    judge(share, TARGET_FAIR_SHARE)
    share.note = "per-consumer acks, round by round: " + splits("e2e4_nf") + failures(errors, "e2e4_nf")
    rows[share.key] = share

    pairs: list[dict[str, str | None]] = [
        {"label": "send, 1 process: send() vs huey enqueue()", "nodeflow": "send_nf", "other": "send_huey",
         "ratio": "ratio_send_huey"},
        {"label": "send vs the disk's ceiling: send() vs raw sqlite3 one-row commits", "nodeflow": "send_nf",
         "other": "send_raw", "ratio": "ratio_send_raw"},
        {"label": "receive + ack, 1 process, pre-filled: receive() + ack() vs huey dequeue()",
         "nodeflow": "receive_nf", "other": "receive_huey", "ratio": "ratio_receive_huey"},
        {"label": "receive with the previous ack carried: receive(ack=m) vs huey dequeue()",
         "nodeflow": "receive_carried_nf", "other": "receive_huey", "ratio": "ratio_receive_carried_huey"},
        {"label": f"batches: send_many() of {BATCH} vs huey enqueue()", "nodeflow": "send_many_nf",
         "other": "send_huey", "ratio": "ratio_send_many_huey"},
        {"label": f"batches: receive(batch={BATCH}) + ack_many() vs huey dequeue()", "nodeflow": "receive_batch_nf",
         "other": "receive_huey", "ratio": "ratio_receive_batch_huey"},
        {"label": "end to end, 1 producer + 1 consumer process at once", "nodeflow": "e2e1_nf", "other": "e2e1_huey",
         "ratio": "ratio_e2e1_huey"},
        {"label": "drain a pre-filled queue, 2 consumer processes", "nodeflow": "drain2_nf", "other": "drain2_huey",
         "ratio": "ratio_drain2_huey"},
        {"label": "end to end, 4 consumer processes / 1 (nodeflow both)", "nodeflow": "e2e4_nf", "other": "e2e1_nf",
         "ratio": "ratio_e2e4_e2e1"},
        {"label": "4 consumers: lowest consumer's share of a fair share", "nodeflow": "fair_share_4", "other": None,
         "ratio": None},
    ]  # fmt: skip
    order = [key for pair in pairs for key in (pair["nodeflow"], pair["other"], pair["ratio"]) if key]
    table = [rows[key] for key in dict.fromkeys(order)]
    return table, pairs, [row for key, row in rows.items() if key not in order]


def signal_and_scale_rows(
    plan: Plan,
    meta: dict[str, Any],
    results: dict[str, list[dict[str, Any] | None]],
    errors: dict[str, list[str]],
    bell: dict[str, Any],
    poll: dict[str, Any],
    idle: dict[str, Any],
    idle_empty: float,
    idle_deep: float,
) -> list[Row]:
    out: list[Row] = []
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

    deep = f"{plan.depth:,} queued"
    for key, label, note in (
        ("deep_send", f"send, 1 process, {deep}", f"filled by one executemany INSERT transaction in "
         f"{meta['fill_seconds']:.1f} s"),
        ("deep_receive", f"receive + ack, 1 process, {deep}", ""),
    ):  # fmt: skip
        r = Row(key, label, "msg/s", runs=[x for x in rates(results, key) if x is not None])
        r.settle()
        r.note = note + failures(errors, key)
        out.append(r)
    for key, top, bottom, label in (
        ("ratio_deep_send", "deep_send", "send_nf", f"ratio send {deep} / send (the table's, empty queue)"),
        ("ratio_deep_receive", "deep_receive", "receive_nf", f"ratio receive + ack {deep} / pre-filled (table's)"),
    ):
        r = Row(key, label, "x", runs=ratios_by_round(rates(results, top), rates(results, bottom)))
        r.settle()
        judge(r, TARGET_DEEP_VS_EMPTY)
        r.note = "median of the per-round ratios"
        out.append(r)
    r = Row("idle_receive_deep", f"receive(wait=0) finding none ready, {plan.depth:,} delayed", "ms")
    r.value = idle_deep
    r.note = (
        f"{idle_empty:.3f} ms on an empty queue; the next due time comes from one index seek "
        "per distinct priority, as on every wake of a waiting receive"
    )
    out.append(r)
    for key, source, label, note in (
        ("rss_empty", "receive_nf", "consumer RSS after receive + ack, pre-filled queue",
         "VmRSS (/proc/self/status) of the table's receive + ack process, a child of the fork server"),
        ("rss_deep", "deep_receive", f"consumer RSS after receive + ack, {deep}",
         f"database file {meta['deep_db_bytes'] / 1e6:,.0f} MB"),
    ):  # fmt: skip
        r = Row(key, label, "kB", runs=[result["rss_kb"] for result in results[source] if result is not None])
        r.settle()
        r.note = note
        out.append(r)
    return out


def render(rows: list[Row], meta: dict[str, Any], quick: bool) -> str:
    plan = meta["plan"]
    by_key = {row.key: row for row in rows}
    pairs = [
        Pair(
            pair["label"],
            by_key[pair["nodeflow"]],
            by_key[pair["other"]] if pair["other"] else None,
            by_key[pair["ratio"]] if pair["ratio"] else None,
        )
        for pair in meta["side_by_side"]
    ]
    sizes = meta["body_bytes"]
    intro = [
        benchlib.headline(
            "nodeflow bus benchmark", meta, quick, f"huey {meta['huey'] or 'not installed'}", at=f" at {meta['commit']}"
        ),
        f"queue table: each figure the median of {plan['rounds']} rounds of {plan['messages']:,} messages "
        f"({min(sizes)}-{max(sizes)} bytes of JSON each), rounds interleaved (round 1 of every row, then round 2, "
        "...), every round on fresh database files; rates in messages/s as median (min..max); a ratio is computed "
        "per round where both sides ran, and the one shown is the median of those per-round ratios (spread: "
        "their min..max); every handle synchronous=FULL (nodeflow's default Settings(): sends durable, claims and "
        "plain acks not waiting for the disk; huey SqliteStorage fsync=True; raw PRAGMA), one handle a process, "
        "the sync API",
        "1-minute load average after each round: "
        + ", ".join(f"{x:.2f}" for x in meta["loadavg_1min_after_each_round"]),
    ]
    if meta["errors"]:
        intro.append("FAILED: " + "; ".join(f"{key} {m}" for key, messages in meta["errors"].items() for m in messages))
    others = [by_key[key] for key in meta["other_rows"]]
    other_intro = [
        f"other rows: signals, an idle node, and a deep queue ({plan['depth']:,} messages; a send and a receive "
        "+ ack run in each of the rounds above, after the table's rows, their ratios per round against the "
        "table's nodeflow send and receive + ack)"
    ]
    return benchlib.render_side_by_side(pairs, intro) + "\n\n" + benchlib.render_table(others, other_intro)


def main(argv: list[str] | None = None) -> int:
    return benchlib.main(
        argv,
        description="Benchmark nodeflow's durable queue beside huey and raw SQLite, and its cache signals.",
        quick_help=f"{QUICK_PLAN.messages:,} messages a round and fewer triggers (a smoke test, < 60 s)",
        full_plan=FULL_PLAN,
        quick_plan=QUICK_PLAN,
        run=run_benchmark,
        render=render,
        say_done=True,
    )


if __name__ == "__main__":
    sys.exit(main())
