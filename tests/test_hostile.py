"""Hostile input, misbehaving user code and frozen nodes: one test per finding, on real processes.

Each test plays the hostile party against real ``python3 nodeflow.py serve`` processes (logs to files),
real files and links, real signals (SIGKILL, SIGSTOP, SIGCONT, SIGTERM), real HTTP on loopback and a
real second user (uid 65534 through ``setpriv``, when the tests run as root). Every test names the
finding it covers; each of findings 1-12 failed on nodeflow before its defences, and the last ones
cover what a review of those defences found.

1. One database through two paths (a symbolic link, ``..``, a hard link).
2. A message nested too deep: refused by ``send``; one stored by an older version is a dead letter.
3. Another local user over HTTP gets 403 and changes nothing.
4. A template that repeats a variable, chained over steps: faults, memory stays bounded.
5. A loop with no wait faults after 10,000 steps; ``cancel`` ends a looping instance.
6. Handlers that block for ever do not stall their node.
7. A poison message (or ``call``) that exits the process: only it ends a dead letter (or faulted).
8. Variables outgrowing 1 MiB fault at the step that grew them, and a retry resumes there.
9. ``--grace`` is kept with cpu ``work`` and a handler that sleeps for ever.
10. A timer of 99999999999 days is refused by ``define``.
11. A frozen node (SIGSTOP) loses its office, its messages and its workflow burst to its peers.
12. Smaller ones: a dangling ``--db`` link, a double ack, a cron zone that skipped a day.
13. Found in review: a request sent and closed at once is still another user's; a suspect runs alone
    beside a stream of poisons; a consumer with a suspect in hand waits instead of spinning; a node
    with a slow heartbeat is judged by its own stall limit; a runaway loop's journal keeps its steps;
    cancel and retry ignore a run message that is not JSON.
"""

from __future__ import annotations

import datetime
import http.client
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import unittest
import zoneinfo
from collections import Counter
from typing import Any

import nodeflow
from tests.support import NODEFLOW, PYTHON, PrintsLogsOnFailure, logs_of, process_state, table_rows, tree_snapshot
from tests.test_serve import Daemon, ServeTestCase

STALL_AFTER = 2.0  # every node here runs with --stall-after 2s
SLACK = 1.5  # added to a bound the promise names: this 2-core machine is shared with other test runs
READY = "running workflows"  # a node's last line of starting up
URL_LINE = re.compile(r"dashboard and API at http://127\.0\.0\.1:(\d+)/")
TOOK_OFFICE = re.compile(r"took office as the scheduling node \(epoch (\d+)\)")
STALL_OPTIONS = ("--stall-after", f"{STALL_AFTER:g}s")

# The --app module of these tests; {db} is the cluster's path. Receipts are written in the same
# transaction as the ack (ack(message, also=...)), so a receipt exists exactly when a message was
# acked, and a second ack of one message counts up.
APP = """
import os
import sys
import threading
import time

import nodeflow

DB = {db!r}
_handle = None
_mutex = threading.Lock()


def cluster():
    global _handle
    with _mutex:
        if _handle is None:
            _handle = nodeflow.connect(DB)
        return _handle


def receipt(message):
    def record(conn):
        conn.execute(
            "INSERT INTO receipts (id, queue, node, count, charged) VALUES (?, ?, ?, 1, ?) "
            "ON CONFLICT (id) DO UPDATE SET count = count + 1",
            (message.id, message.queue, message.owner, message.attempts - getattr(message, "refunds", 0)),
        )

    try:
        cluster().ack(message, also=record)
    except nodeflow.LeaseLost as error:  # the message went to another node, whose ack counts
        print(f"ack refused: {{error}}", file=sys.stderr, flush=True)
    return nodeflow.SETTLED


@nodeflow.handler("jobs")
def jobs(message):  # sleeps body["seconds"] (body["first"] on a first delivery); a poison exits the process
    if message.body.get("poison"):
        os._exit(3)
    seconds = message.body.get("seconds", 0)
    time.sleep(message.body.get("first", seconds) if message.attempts == 1 else seconds)
    return receipt(message)


@nodeflow.handler("ok")
def ok(message):
    return receipt(message)


@nodeflow.handler("stuck")
def stuck(message):
    threading.Event().wait()  # for ever


_tries = {{}}


@nodeflow.activity("flaky")
def flaky(variables):  # fails the first try of each instance (on this node)
    instance = nodeflow.current_call().instance
    _tries[instance] = _tries.get(instance, 0) + 1
    if _tries[instance] == 1:
        raise RuntimeError("the first try fails")
    return 1


@nodeflow.activity("crash")
def crash(variables):
    if variables["input"].get("poison"):
        os._exit(3)
    time.sleep(variables["input"].get("seconds", 0))
    return {{"pid": os.getpid()}}
"""

# Takes nodeflow.lock("shared") COUNT times through the database path PATH, from START (a wall
# clock time, so that the processes run together); prints one JSON list of [fence, taken, let go]
# (monotonic seconds, one clock for every process of the host). argv: path count start
TAKE_SHARED_LOCK = """
    import json, sys, time
    import nodeflow
    path, count, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    held = []
    with nodeflow.connect(path) as nf:
        time.sleep(max(0.0, start - time.time()))
        for _ in range(count):
            with nf.lock("shared", timeout=60) as lock:
                taken = time.monotonic()
                time.sleep(0.0005)
                held.append((lock.fence, taken, time.monotonic()))
    print(json.dumps(held), flush=True)
"""

# Run as uid 65534: one request per line of argv[2] (METHOD PATH [JSON body]) to 127.0.0.1:argv[1];
# prints {"uid": its uid, "answers": {"METHOD PATH": status}}.
AS_ANOTHER_USER = """
import http.client, json, os, sys
answers = {}
for line in sys.argv[2].splitlines():
    method, path, *body = line.split(" ", 2)
    connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
    headers = {"Content-Type": "application/json"} if body else {}
    connection.request(method, path, body=body[0].encode() if body else None, headers=headers)
    answer = connection.getresponse()
    answer.read()
    answers[f"{method} {path}"] = answer.status
    connection.close()
print(json.dumps({"uid": os.getuid(), "answers": answers}))
"""


def nested(depth: int) -> Any:
    """A list in a list ... ``depth`` deep."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def peak_memory_mb(pid: int) -> float:
    """The peak resident memory of a running process (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_get(port: int, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if method == "POST" else {}
        connection.request(method, path, body=data, headers=headers)
        answer = connection.getresponse()
        payload = answer.read()
        kind = answer.getheader("Content-Type") or ""
        return answer.status, json.loads(payload) if kind.startswith("application/json") else payload
    finally:
        connection.close()


class HostileTestCase(PrintsLogsOnFailure, ServeTestCase):
    """ServeTestCase with nodes that run the APP module, stall after 2 s, and print their logs on a failure."""

    def setUp(self) -> None:
        super().setUp()
        self.app = os.path.join(self.dir, "hostile_app.py")
        with open(self.app, "w") as module:
            module.write(APP.format(db=self.db))

    def logs(self) -> str:
        return logs_of(list(self.daemons))

    def node(
        self,
        *options: str,
        node_id: str | None = None,
        db: str | None = None,
        app: bool = True,
        ready: str | None = READY,
    ) -> Daemon:
        """Start ``serve`` (with the app module unless told not to) and wait for ``ready`` in its log."""
        self._started += 1
        log_path = os.path.join(self.dir, f"serve-{self._started}-{node_id or 'auto-id'}.log")
        command = [PYTHON, NODEFLOW, "--db", db or self.db, "serve", *STALL_OPTIONS, *options]
        command += ["--app", self.app] if app else []
        command += ["--node-id", node_id] if node_id else []
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=self.dir, text=True
            )
        self.children.append(process)
        daemon = Daemon(process, log_path)
        self.daemons.append(daemon)
        if ready is not None:
            self.wait_for_log(daemon, ready)
        return daemon

    def receipts_table(self) -> None:
        self.nf.store.write(
            lambda conn: conn.execute(
                "CREATE TABLE receipts (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, node TEXT, "
                "count INTEGER NOT NULL, charged INTEGER NOT NULL)"
            )
        )

    def receipts(self, queue: str) -> dict[int, int]:
        return dict(self.query("SELECT id, count FROM receipts WHERE queue = ?", queue))

    def send_and_wait_handled(self, queue: str) -> None:
        """Send a message to ``queue`` and wait until a node acked it."""
        sent = self.nf.send(queue, {"n": 1})
        self.wait_until(lambda: self.receipts(queue) == {sent: 1}, 10, f"a message of {queue} handled")

    def http_port(self, daemon: Daemon) -> int:
        found = URL_LINE.search(daemon.text())
        self.assertIsNotNone(found, daemon.text())
        assert found is not None
        return int(found[1])

    def definition(self, workflow_id: str, activities: dict[str, Any], start: str, **more: Any) -> None:
        self.nf.define({"id": workflow_id, "start": start, "activities": activities, **more})

    def journal(self, instance: str) -> list[tuple[int, str, str, str]]:
        """(step, activity, type, outcome) of every journal row of an instance, in step order."""
        return [
            (step, activity, kind, outcome)
            for step, activity, kind, outcome in self.query(
                "SELECT step, activity, type, outcome FROM journal WHERE instance = ? ORDER BY step", instance
            )
        ]

    def steps(self, instance: str) -> int:
        return int(self.query("SELECT steps FROM instances WHERE id = ?", instance)[0][0])

    def stop_within(self, seconds: float, *daemons: Daemon) -> None:
        """SIGTERM nodes at once; each must end within ``seconds`` (plus slack)."""
        sent = time.monotonic()
        for daemon in daemons:
            daemon.process.send_signal(signal.SIGTERM)
        for daemon in daemons:
            try:
                daemon.process.wait(timeout=max(0.1, sent + seconds + SLACK + 10 - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.fail(f"pid {daemon.pid} still ran {seconds + SLACK + 10:g} s after SIGTERM")
            took = time.monotonic() - sent
            self.assertLessEqual(took, seconds + SLACK, f"pid {daemon.pid} took {took:.1f} s to stop")


# 1. One database through two paths ---------------------------------------------------------------


class OneDatabaseOnePath(HostileTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.real = os.path.join(self.dir, "real.db")
        self.sym = os.path.join(self.dir, "sym.db")
        os.symlink("real.db", self.sym)
        os.mkdir(os.path.join(self.dir, "sub"))
        self.dotdot = os.path.join(self.dir, "sub", "..", "real.db")
        nodeflow.connect(self.real).close()

    def lock_folders(self) -> list[str]:
        return sorted(name for name in os.listdir(self.dir) if name.endswith(".d"))

    def test_a_symbolic_link_and_dotdot_share_the_lock_folder_so_lock_holders_never_overlap(self) -> None:
        # Finding 1 (a): real.db, sym.db -> real.db and sub/../real.db are one database, one lock folder.
        count, start = 200, time.time() + 1.5
        takers = [self.spawn_python(TAKE_SHARED_LOCK, path, str(count), repr(start)) for path in
                  (self.real, self.sym, self.dotdot)]  # fmt: skip
        held: list[tuple[int, float, float, int]] = []  # (fence, taken, let go, process)
        for index, taker in enumerate(takers):
            code, out, err = self.finish(taker, timeout=60)
            self.assertEqual(code, 0, err)
            rows = json.loads(out)
            self.assertEqual(len(rows), count)
            fences = [fence for fence, _, _ in rows]
            self.assertEqual(fences, sorted(set(fences)), f"process {index}: its fences rise")
            held.extend((fence, taken, let_go, index) for fence, taken, let_go in rows)
        fences = [fence for fence, _, _, _ in held]
        self.assertEqual(len(fences), len(set(fences)), "every fence is given once")
        by_time = sorted(held, key=lambda row: row[1])
        overlaps = [(a, b) for a, b in itertools.pairwise(by_time) if b[1] < a[2]]
        self.assertEqual(overlaps[:5], [], f"{len(overlaps)} holds began before the one before them ended")
        self.assertEqual([row[0] for row in by_time], sorted(fences), "fences rise in the order of the holds")
        self.assertEqual(self.lock_folders(), ["real.db.d"])

    def test_a_database_with_a_second_hard_link_is_refused_and_left_unchanged(self) -> None:
        # Finding 1 (b): `ln real.db hard.db`: neither name opens it; the CLI exits 1; not a byte changes.
        hard = os.path.join(self.dir, "hard.db")
        os.link(self.real, hard)
        before = tree_snapshot(self.real)
        for path in (self.real, hard):
            with self.subTest(path=os.path.basename(path)):
                with self.assertRaises(nodeflow.StoreError) as caught:
                    nodeflow.connect(path).close()
                self.assertIn("has 2 hard links", str(caught.exception))
        done = subprocess.run(
            [PYTHON, NODEFLOW, "--db", hard, "status"], capture_output=True, text=True, timeout=60, cwd=self.dir
        )
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn("hard links", done.stderr)
        self.assertEqual(tree_snapshot(self.real), before)
        self.assertEqual(self.lock_folders(), ["real.db.d"])

    def test_nodes_through_a_link_and_the_file_join_one_cluster_with_one_scheduler(self) -> None:
        # Finding 1 (c): serve on real.db and on sym.db: ids n1 and n2, and one scheduler that keeps office.
        first = self.node(db=self.real, app=False)
        self.wait_for_log(first, "took office")
        second = self.node(db=self.sym, app=False)
        self.assertEqual(sorted([first.node_id, second.node_id]), ["n1", "n2"])
        with nodeflow.connect(self.real) as nf:
            office = nf.scheduler()
            self.assertIsNotNone(office)
            assert office is not None
            until = time.monotonic() + 3
            while time.monotonic() < until:
                self.assertEqual(nf.scheduler(), office, "office changed hands")
                time.sleep(0.1)
        terms = [match for daemon in (first, second) for match in TOOK_OFFICE.findall(daemon.text())]
        self.assertEqual(terms, [str(office["epoch"])], "one term of office in all")
        self.assertNotIn("lost office", first.text() + second.text())
        self.assertEqual(self.lock_folders(), ["real.db.d"])


# 2. A deeply nested message ----------------------------------------------------------------------

DEEP = "[" * 990 + "]" * 990  # valid JSON that json.loads cannot decode within Python's recursion limit


class DeepMessages(HostileTestCase):
    def insert_raw(self, queue: str, body: str) -> int:
        """Store a message as an older nodeflow could have: straight into the table."""
        now = time.time()
        self.nf.store.write(
            lambda conn: conn.execute(
                "INSERT INTO messages (queue, body, priority, available_at, created) VALUES (?, ?, 0, ?, ?)",
                (queue, body, now, now),
            )
        )
        return int(self.query("SELECT max(id) FROM messages")[0][0])

    def test_send_refuses_a_body_nested_more_than_64_deep_and_writes_nothing(self) -> None:
        # Finding 2: `send` refuses a body nested 65 deep (64 is taken), and nothing is written.
        self.nf.send("edge", nested(64))
        before = table_rows(self.db, ("messages", "dead_letters"))
        for value in (nested(65), {"a": nested(64)}, nested(500)):
            with self.assertRaises(nodeflow.InvalidInput) as caught:
                self.nf.send("jobs", value)
            self.assertIn("nests lists and objects more than 64 deep", str(caught.exception))
        self.assertEqual(table_rows(self.db, ("messages", "dead_letters")), before)

    def test_a_stored_message_that_cannot_be_decoded_is_a_dead_letter_and_consumers_go_on(self) -> None:
        # Finding 2: a message that cannot be decoded, first in its queue: `receive` and a node's
        # consumers (a handler's queue and the workflow runner's) bury it and handle the rest.
        self.receipts_table()
        buried = [self.insert_raw("jobs", DEEP)]
        self.nf.send("jobs", {"n": 0})
        done = self.cli("receive", "jobs", "--wait", "5s")
        self.assertNotIn("Traceback", done.stderr)
        self.assertEqual((done.returncode, json.loads(done.stdout or "null")), (0, {"n": 0}), done.stderr)

        self.definition("simple", {"hello": {"type": "log", "message": "hello {input.n}"}}, "hello")
        before = [self.nf.send("jobs", {"n": n}) for n in range(1, 4)]
        buried.append(self.insert_raw("jobs", DEEP))
        buried_run = self.insert_raw(nodeflow.WORKFLOW_QUEUE, DEEP)
        after = [self.nf.send("jobs", {"n": n}) for n in range(4, 7)]
        node = self.node()
        instance = self.nf.start("simple", {"n": 7})
        self.wait_until(lambda: self.receipts("jobs") == dict.fromkeys(before + after, 1), 20, "every message handled")
        self.assertEqual(self.nf.wait(instance, timeout=20).status, "completed")
        for queue, ids in (("jobs", buried), (nodeflow.WORKFLOW_QUEUE, [buried_run])):
            letters = self.nf.dead_letters(queue)
            self.assertEqual(sorted(letter.id for letter in letters), ids, queue)
            for letter in letters:
                self.assertIn("cannot be decoded", letter.last_error or "")
        self.assertEqual(self.nf.queues().get("jobs", {}).get("ready", 0), 0)
        self.assertIsNone(node.process.poll(), "the node lives on")
        self.assertNotIn("Traceback", node.text())


# 3. Another local user over HTTP -------------------------------------------------------------------


@unittest.skipUnless(os.geteuid() == 0, "needs root to run a client as uid 65534 (setpriv)")
class AnotherLocalUser(HostileTestCase):
    def test_another_local_user_gets_403_on_every_route_and_changes_nothing(self) -> None:
        # Finding 3: the owner (root) gets 200; uid 65534 gets 403 on /, /api/status and both POSTs.
        self.definition("hello", {"hi": {"type": "log", "message": "hi"}}, "hi")
        node = self.node("--http", "127.0.0.1:0", app=False)
        port = self.http_port(node)
        self.assertEqual(http_get(port, "/")[0], 200)
        self.assertEqual(http_get(port, "/api/status")[0], 200)
        tables = ("definitions", "instances", "messages")
        before = table_rows(self.db, tables)
        definition = {"id": "planted", "start": "a", "activities": {"a": {"type": "log", "message": "x"}}}
        requests = [
            "GET /",
            "GET /api/status",
            f"POST /api/definitions {json.dumps(definition)}",
            'POST /api/instances {"definition": "hello", "input": {}}',
        ]
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PYTHON, "-c", AS_ANOTHER_USER,
             str(port), "\n".join(requests)],
            capture_output=True, text=True, timeout=30, cwd="/", env={"PATH": os.environ.get("PATH", "/usr/bin")},
        )  # fmt: skip
        self.assertEqual(done.returncode, 0, done.stderr)
        seen = json.loads(done.stdout)
        self.assertEqual(seen["uid"], 65534)
        self.assertEqual(seen["answers"], {request.split(" {")[0]: 403 for request in requests})
        self.assertEqual(table_rows(self.db, tables), before, "another user's requests changed the database")
        self.assertEqual(http_get(port, "/api/status")[0], 200, "the owner is still answered")


# 4. A template that grows at every step ------------------------------------------------------------


class GrowingTemplates(HostileTestCase):
    def test_a_template_repeating_a_variable_over_steps_faults_and_memory_stays_bounded(self) -> None:
        # Finding 4: "{s}" * 1000 over three set steps would make a 10**9-character text: the
        # instance faults ("grew past") at the second or third step, the node's peak memory stays
        # under 400 MB, and the node goes on to complete another instance.
        grow = {"type": "set", "values": {"s": "{s}" * 1000}}
        self.definition("grow", {"a": {**grow, "next": "b"}, "b": {**grow, "next": "c"}, "c": grow}, "a",
                        variables={"s": "x"})  # fmt: skip
        self.definition("hello", {"hi": {"type": "log", "message": "hi"}}, "hi")
        node = self.node(app=False)
        instance = self.nf.start("grow", {})
        self.assertEqual(self.nf.wait(instance, timeout=60).status, "faulted")
        peak = peak_memory_mb(node.pid)
        self.assertLess(peak, 400, f"the node's memory peaked at {peak:.0f} MB")
        ended = self.nf.instance(instance)
        self.assertIn("grew past", ended.error or "")
        last = ended.journal[-1]
        self.assertIn(last.activity, ("b", "c"))
        self.assertTrue(last.outcome.startswith("faulted"), last.outcome)
        self.assertEqual(self.nf.wait(self.nf.start("hello", {}), timeout=20).status, "completed")
        self.assertIsNone(node.process.poll())


# 5. A loop with no wait ----------------------------------------------------------------------------


class BusyLoops(HostileTestCase):
    LOOP = {
        "add": {"type": "set", "add": {"n": 1}, "next": "again"},
        "again": {"type": "if", "condition": {"var": "n", "op": ">", "value": -1}, "then": "add"},
    }

    def test_a_loop_without_a_wait_faults_after_10000_steps_and_cancel_ends_one(self) -> None:
        # Finding 5: a loop with no wait faults "without a wait" after 10,000 steps, with at most
        # 10,000 journal rows; another instance completes meanwhile; `cancel` (CLI, nf.cancel and
        # POST /api/instances/ID/cancel) ends a looping one for good, with a last journal row "cancel".
        self.definition("spin", self.LOOP, "add", variables={"n": 0})
        self.definition("hello", {"hi": {"type": "log", "message": "hi"}}, "hi")
        node = self.node("--http", "127.0.0.1:0", app=False)
        port = self.http_port(node)
        runaway = self.nf.start("spin", {})
        self.wait_until(lambda: self.steps(runaway) > 200, 20, "the loop running")
        self.assertEqual(self.nf.wait(self.nf.start("hello", {}), timeout=20).status, "completed")

        cancelled = {how: self.nf.start("spin", {}) for how in ("cli", "api", "http")}
        self.wait_until(lambda: all(self.steps(i) > 50 for i in cancelled.values()), 20, "the loops to cancel running")
        done = self.cli("cancel", cancelled["cli"], "--reason", "from the command line")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(self.nf.cancel(cancelled["api"], "from Python").status, "cancelled")
        status, answer = http_get(port, f"/api/instances/{cancelled['http']}/cancel", "POST", {"reason": "over HTTP"})
        self.assertEqual(status, 200, answer)
        counts = {how: self.steps(instance) for how, instance in cancelled.items()}
        for how, instance in cancelled.items():
            found = self.nf.instance(instance)
            self.assertEqual(found.status, "cancelled", how)
            self.assertEqual(found.journal[-1].type, "cancel", f"{how}: {found.journal[-1]}")
        time.sleep(1.0)  # a burst under way when it was cancelled would commit in this time, if it could
        self.assertEqual({how: self.steps(instance) for how, instance in cancelled.items()}, counts)
        for how, instance in cancelled.items():
            self.assertEqual(self.journal(instance)[-1][2], "cancel", how)

        ended = self.nf.wait(runaway, timeout=60)
        self.assertEqual(ended.status, "faulted", ended.error)
        self.assertIn("without a wait", ended.error or "")
        self.assertIn(self.steps(runaway), (10_000, 10_001), "10,000 steps, and the row saying why it faulted")
        rows = self.query("SELECT count(*), min(step), max(step) FROM journal WHERE instance = ?", runaway)[0]
        self.assertLessEqual(rows[0], 10_000, f"journal rows (count, first step, last step): {rows}")
        self.assertIsNone(node.process.poll())


# 6. Handlers that block for ever -----------------------------------------------------------------


class BlockingHandlers(HostileTestCase):
    def test_handlers_blocked_for_ever_leave_their_node_healthy_in_office_and_stoppable(self) -> None:
        # Finding 6: six sync handlers that never return, on a node of --concurrency 6: it stays
        # running (not stalled) for 3x its stall limit, answers HTTP within 1 s, keeps office, handles
        # another queue; SIGTERM with --grace 2s ends it within 2 + 5 s and the stuck messages are queued.
        self.receipts_table()
        busy = self.node("--concurrency", "6", "--grace", "2s", "--lease", "2s", "--http", "127.0.0.1:0", node_id="n1")
        self.wait_for_log(busy, "took office")
        port = self.http_port(busy)
        standby = self.node(node_id="n2", app=False)
        office = self.nf.scheduler()
        self.assertIsNotNone(office)
        assert office is not None
        self.assertEqual(office["node"], "n1")
        stuck = [self.nf.send("stuck", {"n": n}) for n in range(6)]
        self.wait_until(lambda: self.nf.queues().get("stuck", {}).get("leased") == 6, 20, "all six handlers blocked")

        watched = time.monotonic()
        slowest_answer, handled = 0.0, False
        while time.monotonic() - watched < 3 * STALL_AFTER + 1:
            states = {node["id"]: node["state"] for node in self.nf.status(STALL_AFTER)["nodes"]}
            self.assertEqual(states["n1"], "running", f"{time.monotonic() - watched:.1f} s into the watch")
            self.assertEqual(self.nf.scheduler(), office, "office changed hands")
            asked = time.monotonic()
            self.assertEqual(http_get(port, "/api/status")[0], 200)
            slowest_answer = max(slowest_answer, time.monotonic() - asked)
            if not handled and time.monotonic() - watched > STALL_AFTER:  # once the blocked handlers are old
                self.send_and_wait_handled("ok")
                handled = True
            time.sleep(0.2)
        self.assertLessEqual(slowest_answer, 1.0, "HTTP answered within 1 s")
        done = self.cli("status", "--json", "--stall-after", f"{STALL_AFTER:g}s")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual({node["id"]: node["state"] for node in json.loads(done.stdout)["nodes"]},
                         {"n1": "running", "n2": "running"})  # fmt: skip
        self.assertNotIn("took office", standby.text())

        self.stop_within(2 + 5, busy)
        depth = self.nf.queues()["stuck"]
        self.assertEqual((depth["ready"], depth["leased"]), (6, 0), "the stuck messages are back in the queue")
        self.assertEqual(self.nf.dead_letters("stuck"), [])
        self.assertEqual(sorted(id for (id,) in self.query("SELECT id FROM messages WHERE queue = 'stuck'")), stuck)


# 7. A poison message that exits the process -----------------------------------------------------


class PoisonThatExits(HostileTestCase):
    OPTIONS = ("--concurrency", "8", "--lease", "2s")

    def keep_three_nodes_up(self, done: Any, timeout: float, what: str) -> int:
        """Run nodes n1-n3, starting each again whenever it dies, until ``done()``; how many restarts."""
        nodes = {node_id: self.node(*self.OPTIONS, node_id=node_id, ready=None) for node_id in ("n1", "n2", "n3")}
        restarts, deadline = 0, time.monotonic() + timeout
        while not done():
            for node_id, daemon in nodes.items():
                if daemon.process.poll() is not None:
                    self.assertEqual(daemon.process.returncode, 3, daemon.text())  # the poison's exit, nothing else
                    nodes[node_id] = self.node(*self.OPTIONS, node_id=node_id, ready=None)
                    restarts += 1
            if time.monotonic() > deadline:
                left = self.query("SELECT id, queue, attempts, refunds, suspect, lease_owner FROM messages")
                dead = self.query("SELECT id, queue, attempts, last_error FROM dead_letters")
                receipts = self.query("SELECT id, count FROM receipts")
                self.fail(
                    f"{what}: not true within {timeout} s ({restarts} restarts); messages left: {left}; "
                    f"dead letters: {dead}; receipts: {receipts}"
                )
            time.sleep(0.05)
        return restarts

    def test_a_message_whose_handler_exits_the_process_is_the_only_dead_letter(self) -> None:
        # Finding 7: 59 innocent messages and one whose handler calls os._exit(3), on three nodes
        # restarted whenever they die: each innocent one is acked exactly once and none is a dead
        # letter; the poison one ends a dead letter.
        self.receipts_table()
        innocent = [self.nf.send("jobs", {"n": n, "seconds": 0.3}) for n in range(20)]
        poison = self.nf.send("jobs", {"poison": True})
        innocent += [self.nf.send("jobs", {"n": n, "seconds": 0.3}) for n in range(20, 59)]

        def settled() -> bool:
            left = self.query("SELECT count(*) FROM messages WHERE queue = 'jobs'")[0][0]
            return left == 0 and len(self.receipts("jobs")) + len(self.nf.dead_letters("jobs")) == 60

        restarts = self.keep_three_nodes_up(settled, 90, "every message acked or a dead letter")
        self.assertGreaterEqual(restarts, 5, "the poison killed a node at each of its deliveries")
        dead = self.nf.dead_letters("jobs")
        self.assertEqual([letter.id for letter in dead], [poison], [(d.id, d.last_error) for d in dead])
        self.assertEqual(self.receipts("jobs"), dict.fromkeys(innocent, 1), "every innocent message acked once")

    def test_a_call_that_exits_the_process_faults_only_its_own_instance(self) -> None:
        # Finding 7: a `call` that os._exit(3)s for one of 30 instances: the other 29 complete and
        # the poison instance ends faulted.
        self.definition("crashy", {
            "c": {"type": "call", "function": "crash", "next": "done"},
            "done": {"type": "log", "message": "done"}}, "c")  # fmt: skip
        instances = [self.nf.start("crashy", {"n": n, "seconds": 0.3, "poison": n == 10}) for n in range(30)]
        poison = instances[10]

        def ended() -> bool:
            statuses = [row[0] for row in self.query("SELECT status FROM instances")]
            return all(status in ("completed", "faulted") for status in statuses)

        restarts = self.keep_three_nodes_up(ended, 120, "every instance ended")
        statuses = dict(self.query("SELECT id, status FROM instances"))
        self.assertEqual(statuses.pop(poison), "faulted", self.nf.instance(poison).error)
        self.assertEqual(Counter(statuses.values()), {"completed": 29})
        self.assertGreaterEqual(restarts, 5)


# 8. Variables outgrowing the limit ----------------------------------------------------------------


class OutgrownVariables(HostileTestCase):
    def test_variables_past_1_mib_fault_at_the_step_that_grew_them_and_a_retry_resumes_there(self) -> None:
        # Finding 8: step a copies 400 KB of input into x (800 KB in all), step b copies x into y
        # (1.2 MB, past the 1 MiB limit): the instance faults at b ("variables:"), x is stored and y
        # is not, a ran once; a retry resumes at b (a never runs again) and faults there again.
        # (Not 600 KB of input as first planned: x beside it would pass 1 MiB already at step a.)
        self.definition("grow", {
            "a": {"type": "set", "values": {"x": "{input.text}"}, "next": "b"},
            "b": {"type": "set", "values": {"y": "{x}"}, "next": "c"},
            "c": {"type": "log", "message": "done"}}, "a")  # fmt: skip
        self.node(app=False)
        text = "x" * 400_000
        instance = self.nf.start("grow", {"text": text})
        for attempt in (1, 2):
            self.assertEqual(self.nf.wait(instance, timeout=30).status, "faulted", f"attempt {attempt}")
            found = self.nf.instance(instance)
            self.assertEqual(found.position, "b", f"attempt {attempt}")
            self.assertIn("variables:", found.error or "")
            self.assertEqual(found.variables.get("x"), text, f"attempt {attempt}: x was stored")
            self.assertNotIn("y", found.variables, f"attempt {attempt}: y was not")
            rows = [(activity, outcome.startswith("faulted")) for _, activity, _, outcome in self.journal(instance)]
            self.assertEqual(rows, [("a", False), *[("b", True)] * attempt], f"attempt {attempt}")
            if attempt == 1:
                self.nf.retry(instance)  # committed when it returns: the wait above sees the new run end


# 9. --grace is kept ------------------------------------------------------------------------------------


class GraceKept(HostileTestCase):
    def test_sigterm_ends_a_node_within_its_grace_despite_cpu_work_or_a_handler_that_never_returns(self) -> None:
        # Finding 9: with --grace 2s, a node running a 60 s cpu `work` step, and a node whose sync
        # handler sleeps for ever, are both gone within 2 + 5 s of SIGTERM.
        self.definition("spin", {"w": {"type": "work", "duration": "60s", "kind": "cpu"}}, "w")
        working = self.node("--grace", "2s", node_id="n1", app=False)
        instance = self.nf.start("spin", {})
        self.wait_until(lambda: self.nf.queues().get(nodeflow.WORKFLOW_QUEUE, {}).get("leased") == 1, 20,
                        "the instance taken")  # fmt: skip
        spun = cpu_seconds(working.pid)
        self.wait_until(lambda: cpu_seconds(working.pid) > spun + 0.5, 20, "the cpu work under way")
        sleeping = self.node("--grace", "2s", node_id="n2")
        self.nf.send("stuck", {"n": 1})
        self.wait_until(lambda: self.nf.queues().get("stuck", {}).get("leased") == 1, 20, "the handler blocked")
        self.assertEqual(self.nf.instance(instance).status, "running")
        self.stop_within(2 + 5, working, sleeping)
        self.assertEqual((working.process.returncode, sleeping.process.returncode), (0, 0))


# 10. A timer of 99999999999 days ---------------------------------------------------------------


class CenturyBound(HostileTestCase):
    def test_a_timer_longer_than_100_years_is_refused_by_define_and_nothing_is_stored(self) -> None:
        # Finding 10: `define` with a timer of 99999999999d exits 2, says why, and stores nothing.
        self.nf.close()
        path = os.path.join(self.dir, "forever.json")
        with open(path, "w") as file:
            json.dump({"id": "forever", "start": "wait", "activities": {
                "wait": {"type": "timer", "duration": "99999999999d"}}}, file)  # fmt: skip
        nodeflow.connect(self.db).close()
        before = tree_snapshot(self.db)
        done = self.cli("define", path)
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("longer than 100 years", done.stderr)
        self.assertEqual(tree_snapshot(self.db), before, "the database changed")
        self.assertEqual(table_rows(self.db, ("definitions",)), {"definitions": []})


# 11. A frozen node ----------------------------------------------------------------------------------


class FrozenNode(HostileTestCase):
    OPTIONS = ("--lease", "30s")  # far longer than the stall limit: a lease running out frees nothing here

    def test_a_frozen_node_loses_office_messages_and_burst_to_its_peers_and_steps_down_when_it_wakes(self) -> None:
        # Finding 11: n1 is the scheduler, holds two messages (a sync handler that sleeps 5 s on a
        # first delivery, 1 s after) and runs a workflow burst (a `work` step of 6 s, io) when it is
        # SIGSTOPped. Within the stall limit plus 2 s a standby takes office, and the timer due
        # during the stop fires once, never in n1's epoch; within the stall limit plus 3 s the
        # messages are handled elsewhere (the lease is 30 s); a peer takes the instance lock and
        # the instance completes while n1 is still stopped. After SIGCONT n1 loses office, says it
        # was stalled, commits nothing (no ack, no step twice) and stays up as a standby.
        self.receipts_table()
        self.definition("slow", {
            "w": {"type": "work", "duration": "6s", "kind": "io", "next": "done"},
            "done": {"type": "log", "message": "done"}}, "w")  # fmt: skip
        n1 = self.node(*self.OPTIONS, node_id="n1")
        self.wait_for_log(n1, "took office")
        [epoch] = n1.epochs()
        held = [self.nf.send("jobs", {"first": 5, "seconds": 1, "n": n}) for n in range(2)]
        instance = self.nf.start("slow", {})
        lock = nodeflow.INSTANCE_LOCK_PREFIX + instance

        def n1_holds_everything() -> bool:
            leased = {row[0] for row in self.query("SELECT id FROM messages WHERE lease_owner = 'n1'")}
            holder = self.nf.holder(lock)
            return set(held) <= leased and holder is not None and holder.node == "n1"

        self.wait_until(n1_holds_everything, 20, "n1 holding both messages and the instance lock")
        standbys = [self.node(*self.OPTIONS, node_id=node_id, ready=None) for node_id in ("n2", "n3")]
        for standby in standbys:
            self.wait_for_log(standby, READY)
        due = time.time() + 1.0
        self.nf.schedule("during", "fired", {"timer": "during"}, at=due)
        self.sigstop(n1)
        stopped = time.monotonic()
        self.assertLess(time.time(), due, "n1 was stopped before the timer fell due")

        def new_office() -> dict[str, Any] | None:
            office = self.nf.scheduler()
            return office if office is not None and office["node"] != "n1" else None

        self.wait_until(lambda: new_office() is not None, 20, "a standby in office")
        took_office = time.monotonic() - stopped
        office = new_office()
        assert office is not None
        self.assertGreater(office["epoch"], epoch)
        self.assertLessEqual(took_office, STALL_AFTER + 2 + SLACK, "office taken within the stall limit plus 2 s")
        taker = next(standby for standby in standbys if standby.node_id == office["node"])
        self.wait_for_log(
            taker, f"took office as the scheduling node (epoch {office['epoch']}): n1 has had no heartbeat"
        )

        self.wait_until(lambda: set(self.receipts("jobs")) == set(held), 20, "n1's messages handled by its peers")
        handled = time.monotonic() - stopped
        self.assertLessEqual(handled, STALL_AFTER + 3 + SLACK, "messages handled within the stall limit plus 3 s")

        self.assertEqual(self.nf.wait(instance, timeout=40).status, "completed")
        self.assertEqual(process_state(n1.pid), "T", "n1 was running again: the checks above prove nothing")
        self.assertTrue(any("took its lock from node n1" in standby.text() for standby in standbys))
        self.wait_until(lambda: self.fired_count() == 1, 10, "the timer fired")

        os.kill(n1.pid, signal.SIGCONT)
        for text in ("lost office (epoch", "this node was stalled", "not committed"):
            self.wait_for_log(n1, text)
        self.wait_until(lambda: n1.text().count("ack refused") == len(held), 10, "n1's late acks refused")
        self.assertEqual(self.receipts("jobs"), dict.fromkeys(held, 1), "each message acked once")
        self.assertEqual(self.fired_count(), 1, "the timer fired once")
        firings = self.query("SELECT epoch FROM timer_firings WHERE name = 'during'")
        self.assertEqual(len(firings), 1)
        self.assertNotEqual(firings[0][0], epoch, "fired in the frozen scheduler's epoch")
        steps = self.journal(instance)
        self.assertEqual([(step, activity) for step, activity, _, _ in steps], [(0, "w"), (1, "done")], steps)
        self.assertIsNone(n1.process.poll(), "n1 lives on")
        self.assertEqual(self.nf.scheduler(), office, "n1 stays a standby")

        def n1_state() -> str:
            return str(next(node["state"] for node in self.nf.status(STALL_AFTER)["nodes"] if node["id"] == "n1"))

        self.wait_until(lambda: n1_state() == "running", 10, "n1 running (not stalled) again")


# 12. Smaller ones ------------------------------------------------------------------------------------


class SmallerOnes(HostileTestCase):
    def test_a_dangling_symbolic_link_as_the_database_is_refused_and_creates_nothing(self) -> None:
        # Finding 12 (a): --db LINK where LINK points at nothing: exit 2, naming the link; no file at its target.
        link, target = os.path.join(self.dir, "link.db"), os.path.join(self.dir, "nowhere.db")
        os.symlink(target, link)
        for verb in (["send", "jobs", "{}"], ["status"], ["lock", "x", "--", "true"]):
            with self.subTest(verb=verb[0]):
                done = subprocess.run(
                    [PYTHON, NODEFLOW, "--db", link, *verb], capture_output=True, text=True, timeout=60, cwd=self.dir
                )
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn(link, done.stderr)
                self.assertEqual(sorted(os.listdir(self.dir)), ["hostile_app.py", "link.db"])

    def test_a_second_ack_of_one_message_says_it_was_acked_already(self) -> None:
        # Finding 12 (b): acking twice through the API: LeaseLost that says "acked already", not "lease ran out".
        self.nf.send("jobs", {"n": 1})
        message = self.nf.receive("jobs", lease=30)
        assert message is not None
        self.nf.ack(message)
        with self.assertRaises(nodeflow.LeaseLost) as caught:
            self.nf.ack(message)
        self.assertIn("acked already", str(caught.exception))
        self.assertNotIn("lease ran out", str(caught.exception))

    def test_a_day_a_cron_zone_skipped_is_not_made_up_the_next_day(self) -> None:
        # Finding 12 (c): Pacific/Apia skipped 2011-12-30: "0 12 * * *" fires 28th, 29th, then 31st at noon.
        zone = zoneinfo.ZoneInfo("Pacific/Apia")
        schedule = nodeflow.CronSchedule.parse("0 12 * * *", "Pacific/Apia")
        moment = datetime.datetime(2011, 12, 28, tzinfo=zone).timestamp()
        firings = []
        for _ in range(3):
            moment = schedule.next_after(moment)
            firings.append(datetime.datetime.fromtimestamp(moment, zone).replace(tzinfo=None))
        self.assertEqual(firings, [datetime.datetime(2011, 12, day, 12) for day in (28, 29, 31)])


# 13. Found in review ------------------------------------------------------------------------------------

# Run as uid 65534: COUNT requests to 127.0.0.1:PORT that each send a POST and close the socket at
# once (its row in /proc/net/tcp then belongs to the kernel, uid 0). argv: port count body
SEND_AND_CLOSE = """
import socket, sys
port, count, body = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
head = b"POST /api/instances HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nContent-Type: application/json\\r\\n"
for _ in range(count):
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(head + b"Content-Length: %d\\r\\n\\r\\n" % len(body) + body)
    client.close()
print("sent", count)
"""


class FoundInReview(HostileTestCase):
    @unittest.skipUnless(os.geteuid() == 0, "needs root to run a client as uid 65534 (setpriv)")
    def test_a_request_sent_and_closed_at_once_is_still_another_users(self) -> None:
        # Review 1: a client that closes right after sending leaves a row the kernel owns (uid 0);
        # a node running as root must not take it for its own. And its owner, through a dual-stack
        # socket, is known.
        self.definition("hello", {"hi": {"type": "signal", "name": "never"}}, "hi")
        node = self.node("--http", "127.0.0.1:0", app=False)
        port = self.http_port(node)
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PYTHON, "-c", SEND_AND_CLOSE,
             str(port), "60", json.dumps({"definition": "hello"})],
            capture_output=True, text=True, timeout=60, cwd="/", env={"PATH": os.environ.get("PATH", "/usr/bin")},
        )  # fmt: skip
        self.assertEqual(done.returncode, 0, done.stderr)
        time.sleep(1.0)  # the node has read and answered (or refused) them all by now
        self.assertEqual(self.query("SELECT count(*) FROM instances")[0][0], 0, "another user started instances")
        dual = socket.socket(socket.AF_INET6)
        dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual.settimeout(10)
        try:
            dual.connect(("::ffff:127.0.0.1", port))
            dual.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            self.assertTrue(dual.recv(64).startswith(b"HTTP/1.1 200 "), "the owner, through a dual-stack socket")
        finally:
            dual.close()

    def test_an_innocent_message_beside_a_stream_of_poisons_is_never_a_dead_letter(self) -> None:
        # Review 3: an innocent message whose handler takes 3 s, and poison messages falling due one
        # after another while it runs, on one node restarted whenever it dies: the innocent one is
        # acked once, every poison one ends a dead letter.
        self.receipts_table()
        innocent = self.nf.send("jobs", {"seconds": 3}, priority=5)
        poisons = [self.nf.send("jobs", {"poison": True}, delay=0.5 + n) for n in range(3)]
        node = self.node("--concurrency", "2", node_id="n1", ready=None)
        restarts, deadline = 0, time.monotonic() + 90
        while len(self.nf.dead_letters("jobs")) < len(poisons) or not self.receipts("jobs"):
            if node.process.poll() is not None:
                self.assertEqual(node.process.returncode, 3, node.text())
                node = self.node("--concurrency", "2", node_id="n1", ready=None)
                restarts += 1
            if time.monotonic() > deadline:
                rows = self.query("SELECT id, attempts, refunds, suspect, last_error FROM messages")
                self.fail(f"not settled in 90 s ({restarts} restarts): {rows}")
            time.sleep(0.05)
        self.assertEqual(self.receipts("jobs"), {innocent: 1})
        self.assertEqual(sorted(letter.id for letter in self.nf.dead_letters("jobs")), poisons)
        # Of its deliveries, only the one that was acked counted: the poisons' deaths were not its.
        self.assertEqual(self.query("SELECT charged FROM receipts WHERE id = ?", innocent), [(1,)])

    def test_a_consumer_with_a_suspect_in_hand_waits_for_news_instead_of_spinning(self) -> None:
        # Review 2: two suspects waiting; a consumer holding one claims nothing more, and receive
        # with wait=0 returns at once (it looped for ever); a node holding one burns no CPU meanwhile.
        ids = [self.nf.send("jobs", {"seconds": 3, "n": n}) for n in range(2)]
        self.nf.store.write(lambda conn: conn.execute("UPDATE messages SET suspect = 1, refunds = 2"))
        first = self.nf.receive("jobs", lease=30)
        assert first is not None
        second: list[Any] = []
        asking = threading.Thread(target=lambda: second.append(self.nf.receive("jobs", wait=0)), daemon=True)
        asking.start()
        asking.join(5)  # it looped for ever: a thread, so that the test fails rather than hangs
        self.assertFalse(asking.is_alive(), "receive(wait=0) did not return while a suspect was in hand")
        self.assertEqual(second, [None])
        self.nf.nack(first, error="given back")
        self.receipts_table()
        node = self.node("--concurrency", "4", node_id="n1")
        self.wait_until(lambda: self.nf.queues().get("jobs", {}).get("leased") == 1, 10, "one suspect taken")
        spent = cpu_seconds(node.pid)
        time.sleep(2.0)
        self.assertEqual(self.nf.queues()["jobs"]["leased"], 1, "the other suspect waits for empty hands")
        self.assertLess(cpu_seconds(node.pid) - spent, 0.5, "the node spun while it held a suspect")
        self.wait_until(lambda: set(self.receipts("jobs")) == set(ids), 20, "both suspects handled, one at a time")

    def test_a_node_with_a_slow_heartbeat_is_judged_by_its_own_stall_limit(self) -> None:
        # Review 4: n1 beats every 3 s (its stall limit: 9 s) and handles a message for 5 s; n2, with
        # the default limit, must not take n1 for stalled between its beats.
        self.receipts_table()
        slow = self.node("--heartbeat", "3s", "--stall-after", "9s", node_id="n1")
        self.wait_for_log(slow, "took office")
        watcher = self.node(node_id="n2", app=False)
        sent = self.nf.send("jobs", {"seconds": 5})
        self.wait_until(lambda: self.receipts("jobs") == {sent: 1}, 20, "the message handled once, by n1")
        time.sleep(2.0)
        self.assertNotIn("stalled", watcher.text())
        self.assertNotIn("took office", watcher.text())

    def test_a_runaway_loop_keeps_every_step_it_committed_in_its_journal(self) -> None:
        # Review 5: a loop behind a call that fails once (so its bursts end off the 100-step beat):
        # when it faults as a runaway, every increment it committed has its journal row.
        self.definition("loop", {
            "c": {"type": "call", "function": "flaky", "retry": {"attempts": 3, "delay": "10ms"}, "next": "inc"},
            "inc": {"type": "set", "add": {"n": 1}, "next": "again"},
            "again": {"type": "if", "condition": {"var": "n", "op": "<", "value": 10**6}, "then": "inc"},
        }, "c")  # fmt: skip
        self.node(node_id="n1")
        instance = self.nf.start("loop", {})
        ended = self.nf.wait(instance, timeout=60)
        self.assertEqual(ended.status, "faulted", ended.error)
        self.assertIn("without a wait", ended.error or "")
        rows = self.query(
            "SELECT count(*) FROM journal WHERE instance = ? AND activity = 'inc' AND outcome NOT LIKE 'faulted%'",
            instance,
        )[0][0]
        first = self.query("SELECT min(step) FROM journal WHERE instance = ?", instance)[0][0]
        self.assertLessEqual(first, 1, "only the call's first rows were pruned (10,000 rows kept)")
        self.assertEqual(ended.variables["n"], rows, "an increment committed without its journal row")

    def test_cancel_and_retry_pass_over_a_run_message_that_is_not_json(self) -> None:
        # Review 7: a message of the workflow queue whose body is not JSON (stored by hand) made
        # cancel and retry call the database damaged.
        self.definition("wait", {"w": {"type": "signal", "name": "never"}}, "w")
        instance = self.nf.start("wait", {})
        now = time.time()
        self.nf.store.write(
            lambda conn: conn.execute(
                "INSERT INTO messages (queue, body, priority, available_at, created) VALUES (?, '{', 0, ?, ?)",
                (nodeflow.WORKFLOW_QUEUE, now + 3600, now),
            )
        )
        done = self.cli("retry", instance)
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn("only a faulted instance", done.stderr)
        done = self.cli("cancel", instance, "--reason", "by hand")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(self.nf.instance(instance).status, "cancelled")
