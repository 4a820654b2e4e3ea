"""Section 9, workflows at run time: kept signals, signal timeouts, start keys and retention, end
to end on real ``serve`` processes.

Every node is a real ``python3 nodeflow.py serve`` process whose log (stderr) goes to a file
(printed when a test fails); a crash is a real SIGKILL. Signals, starts and prunes come from the
command line, the Python API (``nodeflow.connect``), other processes and HTTP. What a test asserts
is what the database holds (the ``instances``, ``journal``, ``kept_signals``, ``messages`` and
``lock_fences`` tables) and what the commands print.

Covered:

- Kept signals, one node: a signal that resumes and starts nothing is kept (``signal --json``
  prints resumed/started/kept/kept_until, an hour by default; ``nf.signal(ttl=...)`` returns
  ``.kept`` and ``.kept_until``; the text form says so; ``--ttl 0`` drops it), ``status --json``
  counts and lists them (name, sent, expires, by); the next instance to wait for the name takes
  it in the commit that begins its wait ("...and kept; resumed") and goes on with the signal's
  input as its result; a later waiter finds none; several of one name go oldest first; a timed
  wait takes one too and never times out; an expired one is not taken (the instance waits), and
  ``prune`` removes it. A bad ``--ttl`` exits 2 with one line and changes no row; status counts
  105 kept signals and lists the oldest 100.
- Kept signals, a race on three nodes: five kept signals of one name, then twelve instances that
  all wait for it at once: exactly five go on, each with a different signal's input, seven wait,
  and none is left kept; one more signal resumes the seven.
- Signal timeouts, one node: with no signal the wait goes to ``on_timeout`` ("timed out after 2s
  waiting for signal NAME: on to late"), not before its time, in a burst of its own; a signal in
  time goes to ``next`` and its (stale) timeout does nothing; a cancelled wait never times out;
  without ``on_timeout`` the instance faults ("timed out"), and retry waits (and times out)
  again; ``on_timeout`` without ``timeout`` is refused by ``define`` (exit 2, nothing stored); a
  signal after the timeout finds nothing waiting and is kept.
- Signal timeouts, a race on two nodes: forty instances wait with a 1 s timeout whose way works
  500 ms in the burst that times out, and another process sends each its signal (``ttl=0``) from
  0.3 s before to 0.9 s after that instance's timeout: each instance ends exactly one way
  (journal "signal received" and ``next``, or "timed out" and ``on_timeout``, never both, never
  neither), a signal resumed exactly the instances that ended the signal way, both ways happened,
  some signals came while their instance's timeout burst ran (that burst was refused, and the
  instance went the signal way), and no run message is left.
- Start keys, a race: eight processes (six through the Python API, two through HTTP POST
  /api/instances), released together, each start one key twenty times with different inputs:
  one instance has the key, all 160 calls got its id, at most one HTTP answer is 201 (and one
  is exactly when an HTTP call won), the instance ran once. ``start --key`` again prints the id
  and says so on stderr; ``show --json`` gives the key; the key with another definition exits 2
  naming the instance; empty, 201-character and non-printable keys exit 2 (200 characters is
  fine); nothing changed.
- Retention by ``prune``: ``--older-than 1h`` removes only expired kept signals; ``--older-than
  0`` removes completed and cancelled instances with their journals and fence counters and keeps
  running, waiting and faulted ones; ``--faulted-older-than 0`` removes the faulted ones; the
  JSON and text outputs count what went; a bad duration exits 2 and changes nothing; the key of
  a removed instance is free again.
- Retention by a node: ended instances (one with a 2,602-step journal, over the 2,000-row batch)
  stay while a node with the default retention runs; a fresh node started with
  ``--keep-instances 1s --keep-faulted 1s`` takes office and removes every ended instance (and
  an expired kept signal) by itself, logging the count, leaving the waiting ones and no orphaned
  journal row or fence counter.
- A node SIGKILLed while instances wait with timeouts, just as the first timeouts fire (caught,
  when it can be, holding timeout bursts, which work 300 ms before they commit): the other node
  fires every timeout (those the dead node held, handed back, and those due later), each
  instance times out exactly once, and nothing is left in the queue.

No speed assertions: every wait is bounded generously, and a failure prints the nodes' logs.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
import unittest
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nodeflow
from tests.support import (
    NODEFLOW,
    PYTHON,
    ClusterTestCase,
    LoggedProcess,
    PrintsLogsOnFailure,
    logs_of,
    table_rows,
    thread_states,
)

READY = re.compile(r" (running workflows|consuming \S*nodeflow\.workflows) ")
HTTP_URL = re.compile(r"dashboard and API at http://127\.0\.0\.1:(\d+)/")
ISO_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"
# Tables a refused command must leave as they were (a node's heartbeats and office are elsewhere).
WATCHED = ("definitions", "instances", "journal", "messages", "kept_signals", "signal_triggers", "lock_fences")


def waiter(workflow_id: str = "waiter") -> dict[str, Any]:
    """Waits for the signal named by its input (no timeout), then sets way=signal."""
    return {
        "id": workflow_id,
        "start": "wait",
        "activities": {
            "wait": {"type": "signal", "name": "{input.name}", "result": "got", "next": "done"},
            "done": {"type": "set", "values": {"way": "signal"}},
        },
    }


def timed(workflow_id: str, timeout: str, on_timeout: bool = True, work: str | None = None) -> dict[str, Any]:
    """Waits for the signal named by its input at most ``timeout``: then way=signal, or way=late
    (with ``on_timeout``; without it a timeout faults the instance). With ``work``, the way of the
    timeout first works that long, in the burst that times out, before it commits."""
    wait: dict[str, Any] = {"type": "signal", "name": "{input.name}", "result": "got", "timeout": timeout}
    activities: dict[str, Any] = {"wait": wait, "ok": {"type": "set", "values": {"way": "signal"}}}
    wait["next"] = "ok"
    if on_timeout:
        wait["on_timeout"] = "late"
        activities["late"] = {"type": "set", "values": {"way": "late"}}
    if work is not None:
        activities["late"] = {"type": "work", "duration": work, "next": "mark"}
        activities["mark"] = {"type": "set", "values": {"way": "late"}}
    return {"id": workflow_id, "start": "wait", "activities": activities}


# The timeout's way does 500 ms of work in the burst that times out, before it commits: a signal
# sent meanwhile must win (the burst is then refused), or the timeout must (the signal then finds
# nothing waiting); never both.
RACE = timed("race", "1s", work="500ms")
REFUSED = re.compile(r"instance ([0-9a-f]{16}): burst of fence \d+ not committed: the instance moved past seq")
QUICK = {"id": "quick", "start": "one", "activities": {"one": {"type": "set", "values": {"done": True}}}}
DOOMED = {"id": "doomed", "start": "refuse", "activities": {"refuse": {"type": "fail", "message": "no {input.n}"}}}
LOOP_TIMES = 1300  # check and inc 1,300 times, check once more, done: 2,602 journal rows, over one prune batch
LOOP = {
    "id": "loop",
    "start": "check",
    "variables": {"count": 0},
    "activities": {
        "check": {"type": "if", "condition": {"var": "count", "op": "<", "value": LOOP_TIMES}, "then": "inc",
                  "next": "done"},
        "inc": {"type": "set", "add": {"count": 1}, "next": "check"},
        "done": {"type": "log", "message": "counted {count}"},
    },
}  # fmt: skip


def timestamp(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


class Serve(LoggedProcess):
    """One ``serve`` process and the file its log (stderr) goes to."""

    def __init__(self, process: subprocess.Popen[str], node_id: str, log_path: str) -> None:
        super().__init__(process, log_path)
        self.node_id = node_id


class RuntimeTestCase(PrintsLogsOnFailure, ClusterTestCase):
    """ClusterTestCase plus ``serve`` nodes logging to files, and a handle ``nf`` on the database."""

    def setUp(self) -> None:
        super().setUp()
        self.nodes: list[Serve] = []  # every serve process started
        self.nf = nodeflow.connect(self.db)
        self.addCleanup(self.nf.close)
        self.pool = ThreadPoolExecutor(12)
        self.addCleanup(self.pool.shutdown)

    def logs(self) -> str:
        return logs_of(self.nodes, 30)

    # Nodes --------------------------------------------------------------------------------------

    def serve(self, node_id: str, *options: str, wait: bool = True) -> Serve:
        log_path = os.path.join(self.dir, f"serve-{len(self.nodes) + 1}-{node_id}.log")
        command = [PYTHON, NODEFLOW, "--db", self.db, "serve", "--node-id", node_id, *options]
        with open(log_path, "w") as log:  # the child has its own copy of the descriptor
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=self.dir, text=True)
        self.children.append(process)
        node = Serve(process, node_id, log_path)
        self.nodes.append(node)
        if wait:
            self.wait_for_log(node, READY.pattern)
        return node

    def cluster(self, *node_ids: str) -> list[Serve]:
        """Nodes started together; returns once each runs workflows."""
        started = [self.serve(node_id, wait=False) for node_id in node_ids]
        for node in started:
            self.wait_for_log(node, READY.pattern)
        return started

    def wait_for_log(self, node: Serve, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first match of ``pattern`` in the node's log, waited for; fails at once if the node exits first."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, node.text(), re.MULTILINE)
            if found:
                return found
            if node.process.poll() is not None:
                self.fail(f"node {node.node_id} (pid {node.pid}) exited ({node.process.returncode}) before "
                          f"logging {pattern!r}")  # fmt: skip
            if time.monotonic() > deadline:
                self.fail(f"node {node.node_id} (pid {node.pid}) did not log {pattern!r} within {timeout}s")
            time.sleep(0.03)

    def stop(self, node: Serve) -> None:
        """SIGTERM, and it ends cleanly."""
        node.process.send_signal(signal.SIGTERM)
        self.assertEqual(node.process.wait(timeout=30), 0, f"node {node.node_id} stopped cleanly")

    def assert_no_tracebacks(self) -> None:
        for node in self.nodes:
            self.assertNotIn("Traceback", node.text(), f"node {node.node_id} logged a traceback")

    # The database -------------------------------------------------------------------------------

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return self.nf.store.read(lambda conn: conn.execute(sql, params).fetchall())

    def count(self, sql: str, *params: Any) -> int:
        return int(self.query(sql, *params)[0][0])

    def statuses(self, ids: list[str] | None = None) -> Counter[str]:
        rows = self.query("SELECT id, status FROM instances")
        return Counter(status for instance, status in rows if ids is None or instance in ids)

    def outcomes(self, instance: str) -> list[str]:
        return [outcome for (outcome,) in self.query(
            "SELECT outcome FROM journal WHERE instance = ? ORDER BY step", instance
        )]  # fmt: skip

    def queued_runs(self) -> int:
        return self.count("SELECT COUNT(*) FROM messages WHERE queue = ?", nodeflow.WORKFLOW_QUEUE)

    def orphaned_journal_rows(self) -> int:
        return self.count("SELECT COUNT(*) FROM journal WHERE instance NOT IN (SELECT id FROM instances)")

    def settle(self, condition: Any, timeout: float, what: str) -> None:
        """Until ``condition()`` holds; on a timeout the instances' statuses go in the message."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"{what}: not true within {timeout}s; instances {dict(self.statuses())}, "
                          f"{self.queued_runs()} run message(s) queued")  # fmt: skip
            time.sleep(0.05)

    def start_all(self, workflow_id: str, inputs: list[dict[str, Any]]) -> list[str]:
        """Start one instance per input at once (threads: the starts share commits)."""
        ids = list(self.pool.map(lambda data: self.nf.start(workflow_id, data), inputs))
        self.assertEqual(len(set(ids)), len(inputs))
        return ids

    # The command line ---------------------------------------------------------------------------

    def cli_ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.cli(*args)
        self.assertEqual(result.returncode, 0, f"{args}: {result.stdout}{result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli_ok(*args, "--json").stdout)

    def assert_refused(self, *cases: tuple[tuple[str, ...], str]) -> None:
        """Each (args, says), run three at a time: exit 2, nothing on stdout, one line on stderr
        naming the problem (no traceback)."""
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda case: self.cli(*case[0]), cases))
        for (args, says), result in zip(cases, results, strict=True):
            with self.subTest(args=args):
                self.assertEqual(result.returncode, 2, f"{args}: {result.stdout}{result.stderr}")
                self.assertEqual(result.stdout, "", args)
                lines = result.stderr.splitlines()
                self.assertEqual(len(lines), 1, f"{args}: one line on stderr: {result.stderr!r}")
                self.assertTrue(lines[0].startswith("nodeflow: "), lines[0])
                self.assertIn(says, lines[0], args)


# 1. Kept signals ------------------------------------------------------------------------------


class KeptSignals(RuntimeTestCase):
    def test_a_kept_signal_resumes_the_next_waiter_once_and_an_expired_one_is_not_taken_but_pruned(self) -> None:
        # A replica never takes office: no retention pass removes expired kept signals behind the test's back.
        self.serve("n1", "--role", "replica")
        self.nf.define(waiter())
        self.nf.define(timed("timed", "2s"))

        # Kept by the command line (an hour by default) and by the API (10 minutes); dropped with --ttl 0.
        before = time.time()
        sent = self.cli_json("signal", "go-a", "--input", '{"n": 7}')
        after = time.time()
        self.assertEqual(set(sent), {"resumed", "started", "kept", "kept_until"})
        self.assertEqual((sent["resumed"], sent["started"], sent["kept"]), ([], [], True), sent)
        self.assertGreaterEqual(timestamp(sent["kept_until"]), before + 3600 - 0.002)
        self.assertLessEqual(timestamp(sent["kept_until"]), after + 3600 + 0.002)
        outcome = self.nf.signal("go-b", {"n": 8}, ttl="10m")
        self.assertEqual((outcome.resumed, outcome.started, outcome.kept), ((), (), True))
        assert outcome.kept_until is not None
        self.assertAlmostEqual(outcome.kept_until, time.time() + 600, delta=5)
        dropped = self.cli_json("signal", "go-z", "--ttl", "0")
        self.assertEqual(dropped, {"resumed": [], "started": [], "kept": False, "kept_until": None})
        self.assertEqual(self.cli_ok("signal", "go-z", "--ttl", "0").stdout,
                         "signal 'go-z': resumed 0 instance(s) (dropped: --ttl 0)\n")  # fmt: skip
        self.assertIsNone(self.nf.signal("go-z", {}, ttl=0).kept_until)

        kept = self.query("SELECT id, name, input, sent, expires, by FROM kept_signals ORDER BY id")
        self.assertEqual([(row[1], json.loads(row[2])) for row in kept], [("go-a", {"n": 7}), ("go-b", {"n": 8})])
        self.assertAlmostEqual(kept[0][4] - kept[0][3], 3600, delta=0.01)
        self.assertAlmostEqual(kept[1][4] - kept[1][3], 600, delta=0.01)
        self.assertAlmostEqual(kept[0][4], timestamp(sent["kept_until"]), delta=0.002)
        self.assertEqual(kept[1][5], self.nf.workflows.node, "by: the handle that sent it")
        self.assertRegex(kept[0][5], r"\S", "by: the command's handle")
        self.assertNotEqual(kept[0][5], kept[1][5], "two senders, two names")

        status = self.cli_json("status")["kept_signals"]
        self.assertEqual(status["count"], 2, status)
        self.assertEqual([entry["name"] for entry in status["oldest"]], ["go-a", "go-b"])
        for entry, row in zip(status["oldest"], kept, strict=True):
            self.assertEqual(set(entry), {"name", "sent", "expires", "by"})
            self.assertAlmostEqual(timestamp(entry["sent"]), row[3], delta=0.002)
            self.assertAlmostEqual(timestamp(entry["expires"]), row[4], delta=0.002)
            self.assertEqual(entry["by"], row[5])

        # The next instance to wait for go-a takes it in the commit that begins its wait, and goes on.
        first = self.nf.start("waiter", {"name": "go-a"})
        self.assertEqual(self.nf.wait(first, 30).status, "completed")
        done = self.nf.instance(first)
        self.assertEqual(done.variables["got"], {"n": 7}, "the kept signal's input is the activity's result")
        self.assertEqual(done.variables["way"], "signal")
        outcomes = [entry.outcome for entry in done.journal]
        self.assertEqual(len(outcomes), 3, outcomes)
        found = re.fullmatch(rf"waiting for signal go-a: it was sent at ({ISO_TIME}) and kept; resumed", outcomes[0])
        self.assertIsNotNone(found, outcomes)
        assert found is not None
        self.assertAlmostEqual(timestamp(found[1]), kept[0][3], delta=0.002)
        self.assertEqual(outcomes[1:], ["signal received", "set way"])
        self.assertEqual([row[1] for row in self.query("SELECT id, name FROM kept_signals")], ["go-b"], "taken once")

        # A second waiter for go-a finds nothing kept: it waits, until a signal (not kept) resumes it.
        second = self.nf.start("waiter", {"name": "go-a"})
        self.settle(lambda: self.statuses([second])["waiting"] == 1, 30, "the second go-a waiter waiting")
        self.assertEqual(self.outcomes(second), ["waiting for signal go-a"])
        resumed = self.cli_json("signal", "go-a", "--input", '{"n": 70}')
        self.assertEqual(resumed, {"resumed": [second], "started": [], "kept": False, "kept_until": None})
        self.assertEqual(self.nf.wait(second, 30).variables["got"], {"n": 70})

        # Kept signals of one name are taken oldest first, one by each instance that comes to wait.
        for n in range(3):
            self.nf.signal("fifo", {"n": n})
        for n in range(3):
            taker = self.nf.start("waiter", {"name": "fifo"})
            self.assertEqual(self.nf.wait(taker, 30).variables["got"], {"n": n})
        self.assertEqual(self.count("SELECT COUNT(*) FROM kept_signals WHERE name = 'fifo'"), 0)

        # A timed wait takes a kept signal too (its wait is never timed), and never times out.
        self.nf.signal("go-t", {"n": 9})
        quick = self.nf.start("timed", {"name": "go-t"})
        self.assertEqual(self.nf.wait(quick, 30).status, "completed")
        outcomes = self.outcomes(quick)
        self.assertRegex(
            outcomes[0], rf"^waiting for signal go-t until {ISO_TIME}: it was sent at {ISO_TIME} and kept; resumed$"
        )
        self.assertEqual(outcomes[1:], ["signal received", "set way"])

        # An expired kept signal is not taken, and prune removes it (nothing else has: no signal since).
        text = self.cli_ok("signal", "go-c", "--input", '{"n": 11}', "--ttl", "1s").stdout
        self.assertRegex(text, rf"^signal 'go-c': no instance waits for it; kept until {ISO_TIME} for the next one "
                         "that does\n$")  # fmt: skip
        (expires,) = self.query("SELECT expires FROM kept_signals WHERE name = 'go-c'")[0]
        time.sleep(max(0.0, expires + 0.2 - time.time()))
        self.assertEqual(self.cli_json("status")["kept_signals"]["count"], 1, "go-b alone is live")
        late = self.nf.start("waiter", {"name": "go-c"})
        self.settle(lambda: self.statuses([late])["waiting"] == 1, 30, "the go-c waiter waiting")
        self.assertEqual(self.outcomes(late), ["waiting for signal go-c"], "the expired signal was not taken")
        self.assertEqual(self.count("SELECT COUNT(*) FROM kept_signals WHERE name = 'go-c'"), 1)
        self.assertEqual(self.cli_json("prune"), {"instances": 0, "kept_signals": 1})
        self.assertEqual([row[0] for row in self.query("SELECT name FROM kept_signals")], ["go-b"])
        self.assertEqual(self.nf.signal("go-c", {"n": 12}, ttl=0).resumed, (late,))
        self.assertEqual(self.nf.wait(late, 30).variables["got"], {"n": 12})
        self.assert_no_tracebacks()

    def test_a_bad_ttl_exits_2_and_changes_nothing_and_status_lists_the_oldest_hundred(self) -> None:
        self.nf.define(waiter())
        self.nf.start("waiter", {"name": "x"})
        self.nf.signal("kept-one", {"n": 1})
        before = table_rows(self.db, WATCHED)
        self.assert_refused(
            (("signal", "kept-two", "--ttl", "-1"), "--ttl: '-1' is not a duration"),
            (("signal", "kept-two", "--ttl", "soon", "--json"), "--ttl: 'soon' is not a duration"),
            (("signal", "kept-two", "--ttl=1e999", "--input", '{"n": 2}'), "--ttl: "),
        )
        with self.assertRaises(nodeflow.InvalidInput):
            self.nf.signal("kept-two", {}, ttl=-1)
        with self.assertRaises(nodeflow.InvalidInput):
            self.nf.signal("kept-two", {}, ttl="soon")
        self.assertEqual(table_rows(self.db, WATCHED), before)

        # Many kept: status counts them all and lists the oldest hundred, oldest first.
        for outcome in self.pool.map(lambda n: self.nf.signal(f"many-{n}", {}), range(104)):
            self.assertTrue(outcome.kept)
        listed = self.nf.status()["kept_signals"]
        self.assertEqual(listed["count"], 105)
        self.assertEqual(len(listed["oldest"]), 100)
        self.assertEqual(listed["oldest"][0]["name"], "kept-one")
        names = [name for (name,) in self.query("SELECT name FROM kept_signals ORDER BY id LIMIT 100")]
        self.assertEqual([entry["name"] for entry in listed["oldest"]], names)

    def test_five_kept_signals_resume_exactly_five_of_twelve_instances_racing_on_three_nodes(self) -> None:
        nodes = self.cluster("n1", "n2", "n3")
        self.nf.define(waiter())
        for n in range(5):
            self.assertTrue(self.nf.signal("race", {"n": n}).kept)
        self.assertEqual(self.count("SELECT COUNT(*) FROM kept_signals WHERE name = 'race'"), 5)
        ids = self.start_all("waiter", [{"name": "race", "i": i} for i in range(12)])

        def settled() -> bool:
            counts = self.statuses(ids)
            return counts["completed"] + counts["waiting"] == 12 and self.queued_runs() == 0

        self.settle(settled, 60, "every instance completed or waiting, nothing queued")
        counts = self.statuses(ids)
        self.assertEqual((counts["completed"], counts["waiting"]), (5, 7), counts)
        self.assertEqual(self.count("SELECT COUNT(*) FROM kept_signals"), 0, "every kept signal taken")
        got, by_node = [], Counter()
        for instance in ids:
            found = self.nf.instance(instance)
            outcomes = [entry.outcome for entry in found.journal]
            if found.status == "completed":
                got.append(found.variables["got"]["n"])
                self.assertRegex(
                    outcomes[0], rf"^waiting for signal race: it was sent at {ISO_TIME} and kept; resumed$"
                )
                self.assertEqual(outcomes[1:], ["signal received", "set way"])
                by_node[found.journal[0].node] += 1
            else:
                self.assertEqual((outcomes, found.waiting_for), (["waiting for signal race"], "race"))
        self.assertEqual(sorted(got), [0, 1, 2, 3, 4], "each kept signal resumed one instance")
        print(f"\n  kept signals taken by node: {dict(sorted(by_node.items()))}", file=sys.stderr)

        # One more signal resumes the seven that wait, and is not kept.
        waiting = {instance for instance in ids if self.nf.instance(instance).status == "waiting"}
        outcome = self.nf.signal("race", {"n": 99})
        self.assertEqual((set(outcome.resumed), outcome.kept), (waiting, False))
        self.settle(lambda: self.statuses(ids)["completed"] == 12, 60, "all twelve completed")
        self.assertEqual(len(nodes), 3)
        self.assert_no_tracebacks()


# 2. Signal timeouts ---------------------------------------------------------------------------


class SignalTimeouts(RuntimeTestCase):
    def test_a_wait_times_out_to_on_timeout_or_faults_and_a_signal_in_time_wins(self) -> None:
        self.serve("n1", "--role", "replica")
        # on_timeout without timeout: refused, nothing stored.
        bad = timed("bad", "1s")
        del bad["activities"]["wait"]["timeout"]
        path = os.path.join(self.dir, "bad.json")
        with open(path, "w") as out:
            json.dump(bad, out)
        before = table_rows(self.db, WATCHED)
        refused = self.cli("define", path)
        self.assertEqual(refused.returncode, 2, refused.stderr)
        self.assertIn("activities.wait.on_timeout: goes with timeout", refused.stderr)
        self.assertIn("nothing was stored", refused.stderr)
        self.assertEqual(table_rows(self.db, WATCHED), before)

        self.nf.define(timed("late2", "2s"))
        self.nf.define(timed("strict", "1s", on_timeout=False))
        alone = self.nf.start("late2", {"name": "t-a"})
        answered = self.nf.start("late2", {"name": "t-b"})
        strict = self.nf.start("strict", {"name": "t-c"})
        dropped = self.nf.start("late2", {"name": "t-d"})
        self.settle(
            lambda: self.statuses([alone, answered, dropped])["waiting"] == 3, 30, "the late2 instances waiting"
        )
        self.assertEqual(self.nf.cancel(dropped).status, "cancelled")
        sent = self.cli_json("signal", "t-b", "--input", '{"n": 1}')
        self.assertEqual(sent["resumed"], [answered], sent)

        # No signal: on to late, not before its time.
        self.assertEqual(self.nf.wait(alone, 30).status, "completed")
        done = self.nf.instance(alone)
        self.assertEqual((done.variables.get("way"), "got" in done.variables), ("late", False))
        journal = done.journal
        self.assertEqual([(entry.step, entry.activity) for entry in journal], [(0, "wait"), (1, "wait"), (2, "late")])
        until = re.fullmatch(rf"waiting for signal t-a until ({ISO_TIME})", journal[0].outcome)
        self.assertIsNotNone(until, journal[0].outcome)
        assert until is not None
        self.assertAlmostEqual(timestamp(until[1]), journal[0].started + 2, delta=0.5)
        self.assertEqual(journal[1].outcome, "timed out after 2s waiting for signal t-a: on to late")
        self.assertGreaterEqual(journal[1].started, journal[0].started + 2, "not timed out early")
        self.assertGreater(journal[1].fence, journal[0].fence, "the timeout ran in a burst of its own")
        self.assertEqual(journal[2].outcome, "set way")
        # A signal now finds nothing waiting.
        late = self.nf.signal("t-a", {"n": 2})
        self.assertEqual((late.resumed, late.kept), ((), True), "late: kept for a next waiter")

        # Cancelled while it waited: its timeout never comes.
        self.assertEqual(self.nf.signal("t-d", {}, ttl=0).resumed, ())
        outcomes = self.outcomes(dropped)
        self.assertEqual(len(outcomes), 2, outcomes)
        self.assertRegex(outcomes[0], rf"^waiting for signal t-d until {ISO_TIME}$")
        self.assertEqual(outcomes[1], "cancelled (was waiting)")
        self.assertEqual(self.nf.instance(dropped).status, "cancelled")

        # Signalled in time: on to next; its timeout came (stale) and did nothing.
        self.assertEqual(self.nf.wait(answered, 30).status, "completed")
        self.settle(lambda: self.queued_runs() == 0, 30, "the stale timeout message acked")
        found = self.nf.instance(answered)
        self.assertEqual((found.variables["way"], found.variables["got"]), ("signal", {"n": 1}))
        outcomes = [entry.outcome for entry in found.journal]
        self.assertRegex(outcomes[0], rf"^waiting for signal t-b until {ISO_TIME}$")
        self.assertEqual(outcomes[1:], ["signal received", "set way"])

        # A long timeout ended by a signal: its queued timeout goes with the signal's commit, rather
        # than sitting in the queue (and its depth) for an hour to be acked as stale.
        self.nf.define(timed("hour", "1h"))
        patient = self.nf.start("hour", {"name": "t-e"})
        self.settle(lambda: self.statuses([patient])["waiting"] == 1, 30, "the hour instance waiting")
        runs_of = (
            "SELECT COUNT(*) FROM messages WHERE queue = ? AND json_extract(body, '$.run') = ? AND available_at > ?"
        )
        self.assertEqual(self.count(runs_of, nodeflow.WORKFLOW_QUEUE, patient, time.time() + 600), 1, "its timeout")
        self.assertEqual(self.nf.signal("t-e", {"n": 3}).resumed, (patient,))
        self.assertEqual(self.count(runs_of, nodeflow.WORKFLOW_QUEUE, patient, time.time() + 600), 0, "dropped")
        self.assertEqual(self.nf.wait(patient, 30).status, "completed")

        # No on_timeout: it faults, saying so; retry waits again (and times out again).
        self.assertEqual(self.nf.wait(strict, 30).status, "faulted")
        faulted = self.nf.instance(strict)
        self.assertIn("timed out after 1s waiting for signal t-c", faulted.error or "")
        self.assertEqual(faulted.position, "wait")
        self.assertTrue(faulted.journal[-1].outcome.startswith("faulted: timed out"), faulted.journal)
        self.nf.retry(strict)
        self.settle(lambda: len(self.outcomes(strict)) >= 4, 30, "the retried instance timed out again")
        self.assertEqual(self.nf.wait(strict, 30).status, "faulted")
        again = self.nf.instance(strict)
        outcomes = [entry.outcome for entry in again.journal]
        self.assertRegex(outcomes[2], rf"^waiting for signal t-c until {ISO_TIME}$")
        self.assertTrue(outcomes[3].startswith("faulted: timed out after 1s"), outcomes)
        self.assert_no_tracebacks()

    def test_signals_racing_their_timeouts_resolve_each_instance_one_way_only(self) -> None:
        nodes = [self.serve(node_id, "--concurrency", "24", wait=False) for node_id in ("n1", "n2")]
        for node in nodes:
            self.wait_for_log(node, READY.pattern)
        self.nf.define(RACE)
        count = 40
        ids = self.start_all("race", [{"name": f"tick-{n}"} for n in range(count)])
        names = {instance: f"tick-{n}" for n, instance in enumerate(ids)}
        # Each instance's signal goes from 0.3 s before its timeout to 0.9 s after, 30 ms apart.
        plan = {instance: [names[instance], -0.3 + index * 0.03] for index, instance in enumerate(ids)}
        sender = self.spawn_python(SENDER, json.dumps(plan))
        code, out, err = self.finish(sender, timeout=90)
        self.assertEqual(code, 0, err)
        sent = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(sorted(entry["instance"] for entry in sent), sorted(ids), "one signal per instance")

        self.settle(lambda: self.statuses(ids)["completed"] == count, 60, "every instance completed")
        self.settle(lambda: self.queued_runs() == 0, 30, "no run message left (stale timeouts acked)")
        resumed: set[str] = set()
        for entry in sent:
            self.assertIn(entry["resumed"], ([], [entry["instance"]]), entry)
            self.assertFalse(entry["kept"], entry)
            resumed.update(entry["resumed"])
        ways: dict[str, set[str]] = {"signal": set(), "late": set()}
        for instance in ids:
            found = self.nf.instance(instance)
            name = names[instance]
            outcomes = [entry.outcome for entry in found.journal]
            where = f"instance {instance}: {outcomes}"
            self.assertEqual([entry.step for entry in found.journal], list(range(len(outcomes))), where)
            self.assertRegex(outcomes[0], rf"^waiting for signal {name} until {ISO_TIME}$", where)
            received = outcomes.count("signal received")
            timed_out = sum(outcome.startswith("timed out") for outcome in outcomes)
            self.assertEqual(received + timed_out, 1, f"one way only; {where}")
            if received:
                self.assertEqual(outcomes[1:], ["signal received", "set way"], where)
                self.assertEqual(found.variables["got"], {"instance": instance}, where)
            else:
                self.assertEqual(
                    outcomes[1:],
                    [f"timed out after 1s waiting for signal {name}: on to late", "worked 500ms (io)", "set way"],
                    where,
                )
                self.assertNotIn("got", found.variables, where)
                self.assertGreaterEqual(found.journal[1].started, found.journal[0].started + 1, where)
            ways[found.variables["way"]].add(instance)
            self.assertEqual(found.variables["way"], "signal" if received else "late", where)
            self.assertEqual((found.waiting_for, found.wake_at), (None, None), where)
        self.assertEqual(resumed, ways["signal"], "a signal resumed exactly the instances that ended its way")
        # The races the signal won while the timeout's burst ran: that burst was refused at its commit.
        overtaken = {found for node in nodes for found in REFUSED.findall(node.text())}
        print(f"\n  {len(ways['signal'])} resumed by their signal ({len(overtaken)} while their timeout's burst ran), "
              f"{len(ways['late'])} timed out", file=sys.stderr)  # fmt: skip
        self.assertLessEqual(overtaken, ways["signal"], "a refused timeout burst: its instance went the signal way")
        self.assertTrue(ways["signal"] and ways["late"], "both ways happened (signals from 0.3 s early to 0.9 s late)")
        self.assertTrue(overtaken, "some signal came while its instance's timeout burst ran (the race was run)")
        self.assert_no_tracebacks()


# Sends each instance its signal (ttl 0) at its timeout plus an offset, as soon as it is seen
# waiting (an instance that ended before it was seen gets its signal at once); prints one JSON
# line per signal sent.
SENDER = """
import json, os, sys, time
import nodeflow

plan = json.loads(sys.argv[1])  # instance id -> [signal name, seconds from its timeout]
nf = nodeflow.connect(os.environ["NODEFLOW_DB"])
due, sent = {}, set()
give_up = time.time() + 60
while len(sent) < len(plan):
    if time.time() > give_up:
        sys.exit(f"gave up: sent {len(sent)} of {len(plan)}")
    if len(due) < len(plan):
        rows = nf.store.read(lambda conn: conn.execute("SELECT id, status, wake_at FROM instances").fetchall())
        for instance, status, wake_at in rows:
            if instance in plan and instance not in due:
                if wake_at is not None:
                    due[instance] = wake_at + plan[instance][1]
                elif status != "running":
                    due[instance] = time.time()
    for instance, at in sorted(due.items(), key=lambda item: item[1]):
        if instance not in sent and at <= time.time():
            outcome = nf.signal(plan[instance][0], {"instance": instance}, ttl=0)
            print(json.dumps({"instance": instance, "resumed": list(outcome.resumed), "kept": outcome.kept,
                              "late": round(time.time() - at, 3)}), flush=True)
            sent.add(instance)
    pending = [at for instance, at in due.items() if instance not in sent]
    time.sleep(min([0.01] + [max(0.0, at - time.time()) for at in pending]))
nf.close()
"""


# 3. Start keys --------------------------------------------------------------------------------

# Prints "ready", waits for a line on stdin, then starts the keyed workflow twenty times with one
# key (each a different input), through the API or HTTP; one JSON line per call.
STARTER = """
import http.client, json, os, sys
import nodeflow

index, mode, key, port = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
nf = nodeflow.connect(os.environ["NODEFLOW_DB"]) if mode == "api" else None
print("ready", flush=True)
sys.stdin.readline()
for i in range(20):
    data = {"name": "keyed-go", "p": index, "i": i}
    if nf is not None:
        print(json.dumps({"id": nf.start("keyed", data, key=key), "input": data}), flush=True)
        continue
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"definition": "keyed", "input": data, "key": key})
    connection.request("POST", "/api/instances", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    print(json.dumps({"id": answer.get("id"), "input": data, "status": response.status, "new": answer.get("new"),
                      "key": answer.get("key")}), flush=True)
"""


class StartKeys(RuntimeTestCase):
    KEY = "order-42/payment"

    def test_eight_processes_starting_one_key_get_one_instance(self) -> None:
        node = self.serve("n1", "--http", "127.0.0.1:0")
        port = int(self.wait_for_log(node, HTTP_URL.pattern)[1])
        self.nf.define(waiter("keyed"))
        modes = ["api"] * 6 + ["http"] * 2
        starters = [
            self.spawn_python(STARTER, str(index), mode, self.KEY, str(port), stdin=subprocess.PIPE)
            for index, mode in enumerate(modes)
        ]
        for child in starters:
            self.read_line(child, "ready", timeout=30)
        for child in starters:  # released together
            child.stdin.write("go\n")
            child.stdin.flush()
        calls: list[dict[str, Any]] = []
        for child, mode in zip(starters, modes, strict=True):
            code, out, err = self.finish(child, timeout=90)
            self.assertEqual(code, 0, err)
            lines = [json.loads(line) for line in out.splitlines()]
            self.assertEqual(len(lines), 20, out)
            calls.extend({**line, "mode": mode} for line in lines)

        rows = self.query("SELECT id, definition, start_key, variables FROM instances")
        self.assertEqual(len(rows), 1, f"one instance started in all: {rows}")
        instance, definition, key, variables = rows[0]
        self.assertEqual((definition, key), ("keyed", self.KEY))
        self.assertEqual(Counter(call["id"] for call in calls), Counter({instance: 160}), "every call got its id")
        winner = json.loads(variables)["input"]
        self.assertIn(winner, [call["input"] for call in calls])
        answers = [call for call in calls if call["mode"] == "http"]
        for answer in answers:
            self.assertIn(answer["status"], (200, 201), answer)
            self.assertEqual((answer["new"], answer["key"]), (answer["status"] == 201, self.KEY), answer)
        created = [answer for answer in answers if answer["status"] == 201]
        self.assertEqual(len(created), 1 if modes[winner["p"]] == "http" else 0, f"winner {winner}: {created}")
        if created:
            self.assertEqual(created[0]["input"], winner)
        # It ran once: one wait begun, by one burst.
        self.settle(lambda: self.statuses()["waiting"] == 1, 30, "the keyed instance waiting")
        self.assertEqual(self.outcomes(instance), ["waiting for signal keyed-go"])
        self.assertEqual(self.queued_runs(), 0)

        # The command line: the same key prints the same id and says so; show lists the key.
        again = self.cli_ok("start", "keyed", "--key", self.KEY, "--input", '{"name": "other"}')
        self.assertEqual(again.stdout, f"{instance}\n")
        self.assertEqual(again.stderr, f"nodeflow: key '{self.KEY}' started {instance} already; no new one\n")
        self.assertEqual(self.cli_json("show", instance)["key"], self.KEY)
        fresh = self.cli_json("start", "keyed", "--key", "another", "--input", '{"name": "k2"}')["id"]
        self.assertNotEqual(fresh, instance)
        self.assertEqual(self.nf.start("keyed", {"name": "k3"}, key="another"), fresh)
        self.assertEqual(self.count("SELECT COUNT(*) FROM instances"), 2)
        self.assert_no_tracebacks()

    def test_a_key_of_another_definition_or_a_bad_key_exits_2_and_changes_nothing(self) -> None:
        self.nf.define(waiter("keyed"))
        self.nf.define(QUICK)
        instance = self.nf.start("keyed", {"name": "x"}, key=self.KEY)
        before = table_rows(self.db, WATCHED)
        result = self.cli("start", "quick", "--key", self.KEY)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn(f"started instance {instance} of workflow 'keyed' already", result.stderr)
        bad_keys = ("", "k" * 201, "tab\there", "bell\x07", "line\nbreak")
        says = "a start key is printable text of 1 to 200 characters"
        self.assert_refused(*[(("start", "keyed", "--key", key, "--input", '{"name": "y"}'), says) for key in bad_keys])
        for key in (*bad_keys, 7):
            with self.subTest(key=key), self.assertRaises(nodeflow.InvalidInput):
                self.nf.start("keyed", {"name": "y"}, key=key)  # type: ignore[arg-type]
        with self.assertRaises(nodeflow.InvalidInput) as caught:
            self.nf.start("quick", {}, key=self.KEY)
        self.assertIn(instance, str(caught.exception))
        self.assertEqual(table_rows(self.db, WATCHED), before)
        longest = self.cli_ok("start", "keyed", "--key", "k" * 200).stdout.strip()
        self.assertEqual(self.nf.instance(longest).key, "k" * 200)


# 4. Retention ---------------------------------------------------------------------------------


class Retention(RuntimeTestCase):
    def fence_rows(self, ids: set[str]) -> int:
        names = {nodeflow.INSTANCE_LOCK_PREFIX + instance for instance in ids}
        return sum(name in names for (name,) in self.query("SELECT name FROM lock_fences"))

    def journal_rows(self, ids: set[str]) -> list[tuple[Any, ...]]:
        return [row for row in self.query("SELECT * FROM journal ORDER BY instance, step") if row[0] in ids]

    def test_prune_removes_ended_instances_and_their_journals_and_keeps_the_rest(self) -> None:
        self.nf.signal("live", {}, ttl="1h")
        self.nf.signal("expiring", {}, ttl="1s")
        node = self.serve("n1", "--role", "replica")
        for definition in (QUICK, DOOMED, waiter()):
            self.nf.define(definition)
        completed = set(self.start_all("quick", [{"n": n} for n in range(4)]))
        completed.add(self.nf.start("quick", {"n": 4}, key="k-done"))
        faulted = set(self.start_all("doomed", [{"n": n} for n in range(3)]))
        waiting = set(self.start_all("waiter", [{"name": f"w-{n}"} for n in range(4)]))
        self.settle(lambda: self.statuses() == Counter(completed=5, faulted=3, waiting=4), 30, "all settled")
        cancelled = set(sorted(waiting)[:2])
        waiting -= cancelled
        for instance in cancelled:
            self.assertEqual(self.nf.cancel(instance).status, "cancelled")
        self.stop(node)
        running = set(self.start_all("quick", [{"n": n} for n in range(5, 7)]))  # no node: they stay running
        self.assertEqual(self.statuses(), Counter(completed=5, faulted=3, waiting=2, cancelled=2, running=2))
        (expires,) = self.query("SELECT expires FROM kept_signals WHERE name = 'expiring'")[0]
        time.sleep(max(0.0, expires + 0.1 - time.time()))
        self.assertGreater(self.fence_rows(faulted | cancelled | waiting), 0, "instances ran: fence counters")

        # Bad durations: exit 2, nothing changed.
        before = table_rows(self.db, WATCHED)
        self.assert_refused(
            (("prune", "--older-than", "soon"), "--older-than: 'soon' is not a duration"),
            (("prune", "--older-than", "0", "--faulted-older-than", "-1", "--json"), "--faulted-older-than: "),
        )
        self.assertEqual(table_rows(self.db, WATCHED), before)

        # Ended a moment ago: an hour's retention keeps them; the expired kept signal goes.
        self.assertEqual(self.cli_json("prune", "--older-than", "1h"), {"instances": 0, "kept_signals": 1})
        self.assertEqual([name for (name,) in self.query("SELECT name FROM kept_signals")], ["live"])
        self.assertEqual(len(self.query("SELECT id FROM instances")), 14)

        # --older-than 0: completed and cancelled go, with their journals and fence counters.
        kept_journals = self.journal_rows(faulted | waiting)
        self.assertEqual(self.cli_json("prune", "--older-than", "0"), {"instances": 7, "kept_signals": 0})
        left = {instance for (instance,) in self.query("SELECT id FROM instances")}
        self.assertEqual(left, faulted | waiting | running)
        self.assertEqual(self.journal_rows(completed | cancelled), [])
        self.assertEqual(self.fence_rows(completed | cancelled), 0)
        self.assertEqual(self.journal_rows(faulted | waiting), kept_journals, "the others' journals untouched")
        self.assertEqual(self.orphaned_journal_rows(), 0)
        self.assertEqual(
            self.cli_ok("prune", "--older-than", "0").stdout,
            "removed 0 ended instance(s) and their journals, 0 expired kept signal(s)\n",
        )

        # --faulted-older-than 0: the faulted ones go too.
        self.assertEqual(
            self.cli_json("prune", "--older-than", "0", "--faulted-older-than", "0"),
            {"instances": 3, "kept_signals": 0},
        )
        self.assertEqual({instance for (instance,) in self.query("SELECT id FROM instances")}, waiting | running)
        self.assertEqual(self.statuses(), Counter(waiting=2, running=2))
        self.assertEqual(self.fence_rows(faulted), 0)
        self.assertEqual(self.orphaned_journal_rows(), 0)
        self.assertEqual([name for (name,) in self.query("SELECT name FROM kept_signals")], ["live"])
        self.assertEqual(self.queued_runs(), 2, "the running ones' run messages stay")
        # Its instance removed, a key is free again.
        again = self.nf.start("quick", {"n": 5}, key="k-done")
        self.assertNotIn(again, completed)
        self.assertEqual(self.query("SELECT id FROM instances WHERE start_key = 'k-done'"), [(again,)])

    def test_a_node_taking_office_removes_ended_instances_past_its_retention_in_batches(self) -> None:
        first = self.serve("n1")  # default retention (7 days): removes nothing here
        for definition in (QUICK, DOOMED, LOOP, waiter()):
            self.nf.define(definition)
        looped = self.nf.start("loop")
        ended = {looped, *self.start_all("quick", [{"n": n} for n in range(20)])}
        faulted = set(self.start_all("doomed", [{"n": n} for n in range(3)]))
        waiting = set(self.start_all("waiter", [{"name": f"w-{n}"} for n in range(2)]))
        self.settle(lambda: self.statuses() == Counter(completed=21, faulted=3, waiting=2), 60, "all settled")
        self.assertEqual(len(self.outcomes(looped)), 2 * LOOP_TIMES + 2)
        self.assertGreater(len(self.outcomes(looped)), nodeflow.PRUNE_BATCH_ROWS, "its journal outlasts one batch")
        self.assertEqual(self.outcomes(looped)[-1], f"counted {LOOP_TIMES}")
        self.nf.signal("expiring", {}, ttl="1s")
        waiting_journals = self.journal_rows(waiting)
        self.stop(first)
        self.assertEqual(len(self.query("SELECT id FROM instances")), 26, "n1 removed nothing")
        # Ended over a second ago (else the first pass, when the node takes office, would leave them
        # to the next, a minute later), the kept signal expired.
        (latest,) = self.query("SELECT MAX(updated) FROM instances WHERE status != 'waiting'")[0]
        (expires,) = self.query("SELECT expires FROM kept_signals")[0]
        time.sleep(max(0.0, max(latest + 1.3, expires + 0.1) - time.time()))

        second = self.serve("n2", "--keep-instances", "1s", "--keep-faulted", "1s")
        self.wait_for_log(second, r"took office")
        removed = self.wait_for_log(second, r"removed (\d+) instance\(s\) ended more than 1s ago", timeout=60)
        self.assertEqual(int(removed[1]), len(ended | faulted), removed[0])
        self.assertEqual({instance for (instance,) in self.query("SELECT id FROM instances")}, waiting)
        self.assertEqual(self.orphaned_journal_rows(), 0, "no journal row left of a removed instance")
        self.assertEqual(self.fence_rows(ended | faulted), 0, "no fence counter left of a removed instance")
        self.assertEqual(self.count("SELECT COUNT(*) FROM kept_signals"), 0, "the expired kept signal removed")
        self.assertEqual(self.journal_rows(waiting), waiting_journals)
        self.assert_no_tracebacks()


# 5. A node killed while instances wait with timeouts ------------------------------------------


class KilledNodeTimeouts(RuntimeTestCase):
    def test_the_other_node_fires_every_timeout_when_one_is_killed_as_they_fire(self) -> None:
        nodes = self.cluster("n1", "n2")
        # The timeouts' bursts work 300 ms before they commit: n1 dies holding some.
        self.nf.define(timed("soon", "2s", work="300ms"))
        self.nf.define(timed("later", "4s", work="300ms"))
        # "soon" times out while n1 is killed; "later" after (waiting meanwhile, its timeouts queued).
        soon = self.start_all("soon", [{"name": f"never-{n}"} for n in range(15)])
        later = self.start_all("later", [{"name": f"never-{n}"} for n in range(15, 30)])
        ids = soon + later
        self.settle(
            lambda: self.count("SELECT COUNT(DISTINCT instance) FROM journal WHERE step = 0") == 30,
            30,
            "all thirty waiting (or timed out already)",
        )
        # As the first "soon" timeouts come due, n1 is stopped (between looks, let go again) until it
        # is caught holding some of their run messages, or they have all fired; then it is killed.
        (first_due,) = self.query("SELECT MIN(wake_at) FROM instances WHERE definition = 'soon'")[0]
        time.sleep(max(0.0, (first_due or 0) - 0.01 - time.time()))
        victim, deadline = nodes[0], time.monotonic() + 10
        while True:
            os.kill(victim.pid, signal.SIGSTOP)
            self.wait_until(lambda: thread_states(victim.pid) == {"T"}, 10, "every thread of n1 stopped")
            in_flight = {
                instance
                for (instance,) in self.query(
                    "SELECT json_extract(body, '$.run') FROM messages WHERE queue = ? AND lease_owner = 'n1'",
                    nodeflow.WORKFLOW_QUEUE,
                )
            }
            held = len(in_flight)
            waiting = self.count("SELECT COUNT(*) FROM instances WHERE definition = 'soon' AND status = 'waiting'")
            if held or not waiting or time.monotonic() > deadline:
                break
            os.kill(victim.pid, signal.SIGCONT)
            time.sleep(0.003)
        timed_out = self.count("SELECT COUNT(*) FROM journal WHERE outcome LIKE 'timed out%'")
        os.kill(victim.pid, signal.SIGKILL)
        victim.process.wait(timeout=10)
        killed_at = time.time()

        self.settle(lambda: self.statuses(ids)["completed"] == 30, 60, "every instance completed")
        self.settle(lambda: self.queued_runs() == 0, 30, "nothing left in the queue")
        due_after = 0
        for instance in ids:
            found = self.nf.instance(instance)
            name, seconds = found.variables["input"]["name"], 2 if instance in soon else 4
            outcomes = [entry.outcome for entry in found.journal]
            where = f"instance {instance}: {outcomes}"
            self.assertEqual([entry.step for entry in found.journal], [0, 1, 2, 3], where)
            self.assertEqual(outcomes[1:], [f"timed out after {seconds}s waiting for signal {name}: on to late",
                                            "worked 300ms (io)", "set way"], where)  # fmt: skip
            self.assertGreaterEqual(found.journal[1].started, found.journal[0].started + seconds, where)
            self.assertEqual(found.variables["way"], "late", where)
            due = timestamp(re.fullmatch(rf"waiting for signal {name} until ({ISO_TIME})", outcomes[0])[1])
            if due > killed_at or instance in in_flight:  # due after the kill, or its burst died with n1
                self.assertEqual(found.journal[1].node, "n2", where)
                self.assertGreater(found.journal[1].started, killed_at - 0.5, where)
            due_after += due > killed_at
        print(f"\n  n1 killed holding {held} run message(s), {timed_out} of 30 timed out; {due_after} came due after",
              file=sys.stderr)  # fmt: skip
        self.assertGreater(due_after, 0, "some timeouts came due after the kill")
        if held:  # what n1 held was handed back by n2, which saw it gone
            gone = self.wait_for_log(
                nodes[1], rf"node n1 \(pid {victim.pid}\) is gone: its liveness lock is free; handed back (\d+) leases"
            )
            self.assertEqual(int(gone[1]), held, gone[0])
        self.assertEqual(nodes[1].process.poll(), None, "n2 runs on")
        self.assertNotIn("Traceback", nodes[1].text())


if __name__ == "__main__":
    unittest.main()
