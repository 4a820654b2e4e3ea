"""Section 10, the daemon (``serve``): membership, liveness, election and timers, with real processes.

Every node here is a real ``python3 nodeflow.py serve`` process whose log (stderr) goes to a file
the test reads; a crash is a real SIGKILL, a hang a real SIGSTOP, a stop a real SIGTERM or SIGINT.
What a test asserts is what the logs say, what ``status --json`` says, what the database holds
(the ``messages``, ``timers``, ``nodes``, ``election`` and ``instruction_cursors`` tables) and
what ``PATH.d/nodes`` contains. The kernel's lock table (/proc/locks) is read to wait for a
precondition (a watcher really waiting on a peer's liveness lock) instead of sleeping blindly.

Covered:

- 2,000 one-shot timers fired while the scheduling node is SIGKILLed every 2-4 s and restarted:
  every timer's message exactly once, none early, and the replica never in office.
- A SIGSTOPped scheduler loses office within its stall limit: a standby takes it, fires what falls due, and
  the woken node steps down and fires nothing.
- SIGTERM hands office over (a higher epoch); SIGINT once stops cleanly, twice exits 130 at once.
- Node ids: a live duplicate refused (exit 1, naming the pid), defaults n1, n2, n3, and a restarted
  node taking its old id and instruction cursor back.
- Liveness: a SIGKILLed node is dead in ``status`` at once, its leases and files handed back by a
  peer; a SIGSTOPped node is stalled, and running again after SIGCONT.
- No eligible node (a replica alone): no scheduler, timers wait, and fire once an auto node starts.
- ``schedule add/list/remove`` through the CLI, and bad input refused with nothing written.
- ``serve`` bad input refused with exit 2 and nothing created.

- Two regressions (bugs these tests found): a timer due past year 9999 was written and then broke
  ``schedule list`` and ``status``; during a hand-over ``status`` named the dead predecessor.
- Queue handlers (``serve --app``): shared by nodes, failures retried then dead-lettered, work in
  flight finished within the grace period on SIGTERM, or handed back when the grace runs out.

No speed assertions: every wait is bounded generously (seconds where milliseconds are expected).
Random choices print their seed; set NODEFLOW_TEST_SEED to replay one.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import unittest
from collections import Counter
from collections.abc import Iterator
from typing import Any

import nodeflow
from tests.support import (
    CHAOS,
    NODEFLOW,
    PYTHON,
    ClusterTestCase,
    LoggedProcess,
    process_state,
    thread_states,
    tree_snapshot,
)

TOOK_OFFICE = re.compile(r"took office as the scheduling node \(epoch (\d+)\)")
GONE = re.compile(r"node (\S+) \(pid (\d+)\) is gone: its liveness lock is free; handed back (\d+) leases")

# Adds COUNT one-shot timers "tNNNNN" due evenly from START over SPAN seconds, each sending
# {"timer": name} to queue "fired". Sixteen threads: concurrent adds share transactions (group
# commit), so the 2,000 adds take well under a second and the timers are all in before the first
# is due. argv: count start span
ADD_TIMERS = """
    import sys, nodeflow
    from concurrent.futures import ThreadPoolExecutor
    count, start, span = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    nf = nodeflow.connect()
    def add(i):
        name = f"t{i:05d}"
        nf.schedule(name, "fired", {"timer": name}, at=start + span * i / count)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(add, range(count)))
    nf.close()
    print("added", count, flush=True)
"""


def seed_for_test() -> int:
    return int(os.environ.get("NODEFLOW_TEST_SEED") or random.randrange(2**32))


def flock_pids(path: str) -> tuple[set[int], set[int]]:
    """(holders, waiters): pids holding and pids blocked waiting for a flock on ``path``, from /proc/locks."""
    info = os.stat(path)
    key = (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)
    holders: set[int] = set()
    waiters: set[int] = set()
    with open("/proc/locks") as table:
        for line in table:
            fields = line.split()
            waiting = len(fields) > 1 and fields[1] == "->"
            if waiting:  # "N: -> FLOCK ...": drop the arrow so the columns line up with a granted row
                fields = [fields[0], *fields[2:]]
            if len(fields) < 6 or fields[1] != "FLOCK":
                continue
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == key:
                (waiters if waiting else holders).add(int(fields[4]))
    return holders, waiters


class Daemon(LoggedProcess):
    """One ``serve`` process and the file its log (stderr) goes to."""

    def events(self) -> list[tuple[str, str]]:
        """(node id, event) per log line: "HH:MM:SS.mmm ID LABEL EVENT" with LABEL padded."""
        found = []
        for line in self.text().splitlines():
            fields = line.split(None, 3)
            if len(fields) == 4:
                found.append((fields[1], fields[3]))
        return found

    @property
    def node_id(self) -> str:
        for node, event in self.events():
            if event.startswith("joined "):
                return node
        raise AssertionError(f"no 'joined' line in {self.log_path}: {self.text()!r}")

    def epochs(self) -> list[int]:
        """Every epoch this process logged taking office in."""
        return [int(match.group(1)) for match in TOOK_OFFICE.finditer(self.text())]


# Holds a flock on ARGV[1]; for each JSON string read from stdin, writes it as the file's whole
# content (a liveness lock file holds its node's pid) and says "written".
LOCK_HOLDER = """
import fcntl, json, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
for line in sys.stdin:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.loads(line).encode(), 0)
    print("written", flush=True)
"""


class ServeTestCase(ClusterTestCase):
    """ClusterTestCase plus ``serve`` daemons logging to files, and an optional handle on the cluster."""

    def setUp(self) -> None:
        super().setUp()
        self._started = 0
        self._handle: nodeflow.Cluster | None = None
        self.daemons: list[Daemon] = []  # every serve process started, restarts included

    def tearDown(self) -> None:
        if self._handle is not None:
            self._handle.close()
        super().tearDown()  # SIGKILLs every child still running (a SIGSTOPped one too)

    @property
    def nf(self) -> nodeflow.Cluster:
        """A passing (non-node) handle, opened on first use: CLI-only tests never create the database."""
        if self._handle is None:
            self._handle = nodeflow.connect(self.db)
        return self._handle

    def serve(self, *options: str, node_id: str | None = None, role: str | None = None, wait: bool = True) -> Daemon:
        """Start ``serve``; by default wait until it logs that it joined."""
        self._started += 1
        log_path = os.path.join(self.dir, f"serve-{self._started}-{node_id or 'auto-id'}.log")
        command = [PYTHON, NODEFLOW, "--db", self.db, "serve", *options]
        if node_id is not None:
            command += ["--node-id", node_id]
        if role is not None:
            command += ["--role", role]
        with open(log_path, "w") as log:  # the child has its own copy of the descriptor
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=self.dir, text=True)
        self.children.append(process)
        daemon = Daemon(process, log_path)
        self.daemons.append(daemon)
        if wait:
            self.wait_for_log(daemon, " joined ")
        return daemon

    def wait_for_log(self, daemon: Daemon, text: str, timeout: float = 20) -> None:
        """Wait until ``text`` is in the daemon's log; fail at once, with the log, if it exits first."""
        deadline = time.monotonic() + timeout
        while text not in daemon.text():
            if daemon.process.poll() is not None and text not in daemon.text():
                self.fail(f"node pid {daemon.pid} exited ({daemon.process.returncode}) before logging {text!r}:\n"
                          f"{daemon.text()}")  # fmt: skip
            if time.monotonic() > deadline:
                self.fail(f"node pid {daemon.pid} did not log {text!r} within {timeout}s:\n{daemon.text()}")
            time.sleep(0.02)

    def kill(self, daemon: Daemon) -> None:
        daemon.process.kill()
        daemon.process.wait(timeout=10)  # reaped: the kernel has released its locks

    def status(self, *options: str) -> dict[str, Any]:
        done = self.cli("status", "--json", *options)
        self.assertEqual(done.returncode, 0, done.stderr)
        report: dict[str, Any] = json.loads(done.stdout)
        return report

    def node_states(self, *options: str) -> dict[str, str]:
        return {node["id"]: node["state"] for node in self.status(*options)["nodes"]}

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return self.nf.store.read(lambda conn: conn.execute(sql, params).fetchall())

    def fired_bodies(self, queue: str = "fired") -> list[Any]:
        return [json.loads(body) for (body,) in self.query("SELECT body FROM messages WHERE queue = ?", queue)]

    def fired_count(self, queue: str = "fired") -> int:
        return int(self.query("SELECT count(*) FROM messages WHERE queue = ?", queue)[0][0])

    def nodes_dir(self) -> str:
        return self.db + ".d/nodes"

    @contextlib.contextmanager
    def writer_lock_held(self) -> Iterator[None]:
        """Hold PATH.d/writer.lock, which every nodeflow write takes first: every node's writes wait."""
        fd = os.open(self.db + ".d/writer.lock", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def sigstop(self, daemon: Daemon) -> None:
        """SIGSTOP a node at a moment it holds no write slot, so the rest of the cluster can still write.

        A process stopped inside a transaction would hold PATH.d/writer.lock until SIGCONT, and every
        write (the test's own timer adds included) would wait for it; the tests here study a stopped
        node's standing in the cluster, not a stalled writer, so they stop it between transactions.
        """
        writer = self.db + ".d/writer.lock"
        for _ in range(200):
            os.kill(daemon.pid, signal.SIGSTOP)
            # Every thread, not just the main one: a group stop reaches each thread in turn, and a
            # thread still running could take the writer lock after the check below.
            self.wait_until(lambda: thread_states(daemon.pid) == {"T"}, 10, "every thread of the node stopped")
            if daemon.pid not in flock_pids(writer)[0]:
                return
            os.kill(daemon.pid, signal.SIGCONT)
            time.sleep(0.005)
        self.fail("the node held the writer lock every time it was stopped")

    def run_all(self, commands: list[list[str]], env: dict[str, str] | None = None) -> list[tuple[int, str, str]]:
        """Run several CLI commands at once (they are independent), each to completion."""
        processes = [
            subprocess.Popen(
                [PYTHON, NODEFLOW, "--db", self.db, *command],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=self.dir,
                env=dict(os.environ, **(env or {})),
            )
            for command in commands
        ]
        self.children.extend(processes)
        results = []
        for process in processes:
            out, err = process.communicate(timeout=60)
            results.append((process.returncode, out, err))
        return results


# 1. Exactly-once timers under scheduler churn ---------------------------------------------------


class SchedulerChurn(ServeTestCase):
    TIMERS = 2000 if CHAOS else 800
    SPAN = 15.0 if CHAOS else 7.0  # the timers fall due evenly over this many seconds
    KILL_EVERY = (2.0, 4.0) if CHAOS else (1.2, 2.2)  # seconds between kills of the node in office
    LEAD = 3.0  # the first is due this long after the adder starts: all are in before any fires

    def test_timers_fire_exactly_once_while_the_scheduler_is_killed_again_and_again(self) -> None:
        seed = seed_for_test()
        rng = random.Random(seed)
        tag = f"[NODEFLOW_TEST_SEED={seed}]"
        print(f"\n{self.id()} {tag}", file=sys.stderr, flush=True)
        auto = {node: self.serve(node_id=node) for node in ("n1", "n2", "n3")}
        replica = self.serve(node_id="r1", role="replica")
        self.wait_until(lambda: self.nf.scheduler() is not None, 20, "a node in office")

        # Sample who is in office, from the lock (pid) and the election table (node, epoch), all
        # along: the replica must never appear, and the epoch must never go back.
        samples: list[tuple[int, str | None, int | None]] = []
        sampling_failed: list[BaseException] = []
        stop_sampling = threading.Event()

        def sample() -> None:
            try:
                with nodeflow.connect(self.db) as watcher:
                    while not stop_sampling.is_set():
                        epoch, node = watcher.store.read(
                            lambda conn: conn.execute("SELECT epoch, node FROM election WHERE id = 1").fetchone()
                        )
                        office = watcher.scheduler()
                        samples.append((epoch, node, None if office is None else office["pid"]))
                        stop_sampling.wait(0.02)
            except BaseException as error:
                sampling_failed.append(error)

        sampler = threading.Thread(target=sample, name="office-sampler", daemon=True)
        sampler.start()
        self.addCleanup(sampler.join, 10)
        self.addCleanup(stop_sampling.set)

        start = time.time() + self.LEAD
        adder = self.spawn_python(ADD_TIMERS, str(self.TIMERS), repr(start), str(self.SPAN))
        code, out, err = self.finish(adder, timeout=60)
        self.assertEqual((code, out.strip()), (0, f"added {self.TIMERS}"), err)

        # Kill whichever node is in office every KILL_EVERY seconds until a second after the last timer is due,
        # and restart it under the same id at once.
        kills: list[tuple[float, str, int]] = []  # (when, node id, pid)
        while time.time() < start + self.SPAN + 1.0:
            time.sleep(rng.uniform(*self.KILL_EVERY))
            office = self.nf.scheduler()
            if office is None:
                continue  # between terms (a node is taking office): try again next round
            victims = [node for node, daemon in auto.items() if daemon.pid == office["pid"]]
            pids = {node: daemon.pid for node, daemon in auto.items()}
            self.assertEqual(len(victims), 1, f"{tag} the scheduler is pid {office['pid']}, not one of {pids}")
            victim = victims[0]
            self.kill(auto[victim])
            kills.append((time.time(), victim, office["pid"]))
            auto[victim] = self.serve(node_id=victim)

        left = lambda: self.query("SELECT count(*) FROM timers WHERE due IS NOT NULL")[0][0]  # noqa: E731
        self.wait_until(lambda: left() == 0, 60, f"{tag} every timer fired")
        stop_sampling.set()
        sampler.join(10)
        self.assertEqual(sampling_failed, [], tag)

        # Exactly once: one message per timer, none missing, none twice, none unknown.
        names = {f"t{i:05d}" for i in range(self.TIMERS)}
        counts = Counter(body["timer"] for body in self.fired_bodies())
        self.assertEqual(sorted(names - set(counts)), [], f"{tag} timers that never fired")
        self.assertEqual({n: c for n, c in counts.items() if c != 1}, {}, f"{tag} timers fired more than once")
        self.assertEqual(set(counts), names, tag)
        # The timers table agrees, and no timer fired before it was due.
        rows = self.query("SELECT name, fired, due, last_fired FROM timers")
        self.assertEqual(len(rows), self.TIMERS)
        early = []
        for name, fired, due, last_fired in rows:
            self.assertEqual((fired, due), (1, None), f"{tag} timer {name}")
            if last_fired < start + self.SPAN * int(name[1:]) / self.TIMERS:
                early.append(name)
        self.assertEqual(early, [], f"{tag} timers fired before they were due")

        # The churn really happened, and while timers were falling due.
        self.assertGreaterEqual(len(kills), 3, f"{tag} kills: {kills}")
        during = [kill for kill in kills if start <= kill[0] <= start + self.SPAN]
        self.assertGreaterEqual(len(during), 2, f"{tag} kills while timers fell due: {kills}")

        # The replica never held office: not in its log, not in the election table, not the lock.
        self.assertNotIn("took office", replica.text())
        self.assertEqual([s for s in samples if s[1] == "r1" or s[2] == replica.pid], [], tag)
        self.assertIsNone(replica.process.poll(), f"{tag} the replica died:\n{replica.text()}")
        self.assertGreater(len(samples), 100, tag)
        epochs = [epoch for epoch, _, _ in samples]
        self.assertEqual(epochs, sorted(epochs), f"{tag} the election epoch went back")

        # No two terms share an epoch, and none is past the table's (the table has the last word).
        logs = self.daemons  # every incarnation of every node
        terms = [epoch for daemon in logs for epoch in daemon.epochs()]
        self.assertEqual(len(terms), len(set(terms)), f"{tag} an epoch taken twice: {sorted(terms)}")
        final = self.query("SELECT epoch FROM election WHERE id = 1")[0][0]
        self.assertLessEqual(max(terms), final, tag)
        self.assertGreaterEqual(len(terms), len(kills), f"{tag} fewer terms than kills: {sorted(terms)}")

        # Only killed processes were declared gone: a live node never had its leases handed back.
        killed = {pid for _, _, pid in kills}
        for daemon in logs:
            for match in GONE.finditer(daemon.text()):
                self.assertIn(int(match.group(2)), killed, f"{tag} a live node declared gone: {match.group(0)}")


# 2. A stopped scheduler ----------------------------------------------------------------------


class StoppedScheduler(ServeTestCase):
    STALL_AFTER = 2.0

    def test_a_sigstopped_scheduler_loses_office_within_its_stall_limit_and_fires_nothing_after_it_wakes(self) -> None:
        stall = ("--stall-after", f"{self.STALL_AFTER}s")
        n1 = self.serve(*stall, node_id="n1")
        self.wait_for_log(n1, "took office")
        [epoch] = n1.epochs()
        standbys = [self.serve(*stall, node_id="n2"), self.serve(*stall, node_id="n3")]
        due = time.time() + 1.5
        names = [f"before-{i}" for i in range(5)]
        for i, name in enumerate(names):  # due while n1 is stopped
            self.nf.schedule(name, "fired", {"timer": name}, at=due + 0.1 * i)
        self.sigstop(n1)
        stopped_at = time.monotonic()
        # One more added during the stop, through the CLI (a write the stopped node must not block).
        added = self.cli(
            "schedule", "add", "during", "--after", "0.5s", "--queue", "fired", "--body", '{"timer": "during"}'
        )
        self.assertEqual(added.returncode, 0, added.stderr)
        names.append("during")

        # A standby takes office within the stall limit plus 2 s, with a higher epoch, and fires them.
        def new_office() -> dict | None:
            office = self.nf.scheduler()
            return office if office is not None and office["node"] != "n1" else None

        self.wait_until(lambda: new_office() is not None, self.STALL_AFTER + 2 + 1, "a standby in office")
        took = time.monotonic() - stopped_at
        office = new_office()
        assert office is not None
        self.assertGreater(office["epoch"], epoch)
        self.assertLessEqual(took, self.STALL_AFTER + 2 + 1, "office taken within the stall limit plus 2 s")
        self.wait_until(lambda: self.fired_count() == len(names), 15, "the timers fired by the new scheduler")
        self.assertEqual(process_state(n1.pid), "T", "n1 was running again: the checks above prove nothing")
        self.assertNotIn("stepped down", n1.text())
        taker = next(standby for standby in standbys if standby.node_id == office["node"])
        self.assertRegex(taker.text(), r"took office as the scheduling node \(epoch \d+\): n1 has had no heartbeat")
        self.assertEqual(self.status()["scheduler"], {"node": office["node"], "epoch": office["epoch"]})

        # Woken, n1 finds the file replaced and the epoch moved on: it steps down and fires nothing.
        os.kill(n1.pid, signal.SIGCONT)
        self.wait_for_log(n1, "lost office (epoch")
        self.wait_for_log(n1, "this node was stalled")
        time.sleep(1.5)  # a second firing would show by now: the scheduler looks at least every second
        self.assertEqual(Counter(body["timer"] for body in self.fired_bodies()), dict.fromkeys(names, 1))
        self.assertEqual(self.query("SELECT count(*) FROM timers WHERE fired != 1 OR due IS NOT NULL")[0][0], 0)
        fired_by = {row[0] for row in self.query("SELECT DISTINCT epoch FROM timer_firings")}
        self.assertNotIn(epoch, fired_by, "the stopped scheduler's epoch fired nothing")
        self.assertEqual(self.status()["scheduler"], {"node": office["node"], "epoch": office["epoch"]})
        self.assertEqual(n1.process.poll(), None, "n1 lives on as a standby")


# 3. Graceful stop ------------------------------------------------------------------------------


class GracefulStop(ServeTestCase):
    def test_sigterm_steps_down_and_the_standby_takes_office_with_a_higher_epoch(self) -> None:
        n1 = self.serve(node_id="n1")
        self.wait_for_log(n1, "took office")
        [first] = n1.epochs()
        n2 = self.serve(node_id="n2")
        # n2 is blocked on scheduler.lock in the kernel: the handover is a wake-up, not a poll.
        lock = self.db + ".d/scheduler.lock"
        self.wait_until(lambda: n2.pid in flock_pids(lock)[1], 10, "n2 waiting for the scheduler lock")

        os.kill(n1.pid, signal.SIGTERM)
        self.assertEqual(n1.process.wait(timeout=30), 0, n1.text())
        self.wait_for_log(n2, "took office")
        [second] = n2.epochs()
        self.assertGreater(second, first)
        events = [event for _, event in n1.events()]
        stopping = [i for i, event in enumerate(events) if event.startswith("stopping (SIGTERM)")]
        self.assertEqual(len(stopping), 1, events)
        stepped = events.index(f"stepped down (epoch {first})")
        self.assertEqual(events[-1], "stopped", events)
        self.assertLess(stopping[0], stepped)
        self.assertLess(stepped, len(events) - 1)

        report = self.status()
        states = {node["id"]: node["state"] for node in report["nodes"]}
        self.assertEqual(states, {"n1": "stopped", "n2": "running"})
        self.assertEqual(report["scheduler"], {"node": "n2", "epoch": second})
        left = set(os.listdir(self.nodes_dir()))
        self.assertFalse({"n1.sock", "n1.lock"} & left, left)

    def test_sigint_once_stops_cleanly_and_twice_exits_at_once_with_130(self) -> None:
        once = self.serve(node_id="n1", role="replica")
        os.kill(once.pid, signal.SIGINT)
        self.assertEqual(once.process.wait(timeout=30), 0, once.text())
        events = [event for _, event in once.events()]
        self.assertTrue(events[-2].startswith("stopping (SIGINT)"), events)
        self.assertEqual(events[-1], "stopped", events)

        twice = self.serve(node_id="n2")
        self.wait_for_log(twice, "took office")
        # Holding the writer lock keeps the graceful stop from finishing (its step-down write waits
        # for it), so an exit can only be the second SIGINT's doing.
        with self.writer_lock_held():
            os.kill(twice.pid, signal.SIGINT)
            self.wait_for_log(twice, "stopping (SIGINT)")
            time.sleep(0.2)
            self.assertIsNone(twice.process.poll(), f"the stop finished without the writer lock:\n{twice.text()}")
            os.kill(twice.pid, signal.SIGINT)
            code = twice.process.wait(timeout=10)
        self.assertEqual(code, 130, twice.text())
        self.assertIn("second interrupt: exiting at once", twice.text())
        self.assertNotIn("stepped down", twice.text())


# 4. Node ids -------------------------------------------------------------------------------------


class NodeIds(ServeTestCase):
    def test_default_ids_a_live_duplicate_refused_and_a_restart_takes_its_id_and_cursor_back(self) -> None:
        first, second, third = (self.serve() for _ in range(3))  # one after another: each joined first
        self.assertEqual([first.node_id, second.node_id, third.node_id], ["n1", "n2", "n3"])

        duplicate = self.cli("serve", "--node-id", "n2", timeout=30)
        self.assertEqual(duplicate.returncode, 1, duplicate.stderr)
        lines = duplicate.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, duplicate.stderr)
        self.assertTrue(lines[0].startswith("nodeflow: node id n2 is in use by a live process"), lines[0])
        self.assertIn(f"(pid {second.pid})", lines[0])
        # The refused process left the live n2 alone: its files, its process, its state.
        self.assertTrue({"n2.sock", "n2.lock"} <= set(os.listdir(self.nodes_dir())))
        self.assertIsNone(second.process.poll())
        nodes = {node["id"]: node for node in self.status()["nodes"]}
        self.assertEqual((nodes["n2"]["state"], nodes["n2"]["pid"]), ("running", second.pid))

        # n1's first life had no cursor (a cold boot); the cursor it saved outlives a SIGKILL.
        self.assertIn("cold boot (it has never synced)", first.text())
        cursor = lambda: self.query("SELECT position FROM instruction_cursors WHERE node = 'n1'")  # noqa: E731
        self.wait_until(lambda: bool(cursor()), 10, "n1's cursor saved")
        self.kill(first)
        for key in ("a", "b", "c"):  # appended while n1 is down: it must catch up on them
            self.nf.trigger(f"while-down-{key}")
        newest = self.query("SELECT max(id) FROM instructions")[0][0]
        [(kept,)] = cursor()
        self.assertLess(kept, newest)

        again = self.serve()
        self.assertEqual(again.node_id, "n1", "the first free id is the dead node's")
        self.wait_until(lambda: cursor() == [(newest,)], 10, "n1 caught up from its kept cursor")
        self.assertNotIn("cold boot", again.text())
        nodes = {node["id"]: node for node in self.status()["nodes"]}
        self.assertEqual((nodes["n1"]["state"], nodes["n1"]["pid"]), ("running", again.pid))


# 5. Liveness -------------------------------------------------------------------------------------


class Liveness(ServeTestCase):
    # Was a flake (test_cluster, 1 make test in 7): a peer clearing a killed node's files holds its
    # liveness lock for a moment, and live_nodes() gave the dead node the peer's pid, so status
    # showed it running. The pid the node wrote in its file tells the two apart.
    def test_a_lock_held_by_another_process_than_the_one_written_in_it_is_no_live_node(self) -> None:
        self.assertEqual(self.nf.nodes(), [])  # the database and its private lock folder made
        os.makedirs(self.nodes_dir(), mode=0o700, exist_ok=True)
        holder = subprocess.Popen(
            [PYTHON, "-c", LOCK_HOLDER, os.path.join(self.nodes_dir(), "n5.lock")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.children.append(holder)
        assert holder.stdin is not None and holder.stdout is not None
        for written, seen in (("", holder.pid), (f"{holder.pid}\n", holder.pid), ("999999999\n", None),
                              ("not a pid\n", holder.pid)):  # fmt: skip
            with self.subTest(written=written):
                holder.stdin.write(json.dumps(written) + "\n")
                holder.stdin.flush()
                self.assertEqual(holder.stdout.readline().strip(), "written")
                self.assertEqual(flock_pids(os.path.join(self.nodes_dir(), "n5.lock"))[0], {holder.pid})
                self.assertEqual(nodeflow.live_nodes(self.db + ".d").get("n5"), seen)

    def test_a_killed_node_is_dead_at_once_and_a_peer_hands_back_its_leases_and_files(self) -> None:
        n1, n2, n3 = (self.serve(node_id=node) for node in ("n1", "n2", "n3"))
        # serve consumes nothing yet: make n2 a lease holder by hand, an hour-long lease.
        message = self.nf.send("jobs", {"job": 1})
        self.nf.store.write(
            lambda conn: conn.execute(
                "UPDATE messages SET lease_owner = 'n2', available_at = ?, attempts = 1 WHERE id = ?",
                (time.time() + 3600, message),
            )
        )
        lock = os.path.join(self.nodes_dir(), "n2.lock")
        sock = os.path.join(self.nodes_dir(), "n2.sock")
        self.assertTrue(os.path.exists(sock))
        # Both peers wait on n2's liveness lock in the kernel (n1 finds n2 on its next heartbeat).
        self.wait_until(lambda: {n1.pid, n3.pid} <= flock_pids(lock)[1], 15, "n1 and n3 watching n2")

        self.kill(n2)
        states = self.node_states()  # at once: no heartbeat has had time to go stale (5 s)
        self.assertEqual(states["n2"], "dead")
        self.assertEqual((states["n1"], states["n3"]), ("running", "running"))

        lease = lambda: self.query("SELECT lease_owner, available_at, last_error FROM messages WHERE id = ?", message)  # noqa: E731
        self.wait_until(lambda: lease()[0][0] is None, 10, "n2's lease handed back")
        [(_, available_at, error)] = lease()
        self.assertLessEqual(available_at, time.time())
        self.assertEqual(error, "node n2 died")
        self.wait_until(lambda: not os.path.exists(lock) and not os.path.exists(sock), 10, "n2's files removed")
        self.assertEqual(self.query("SELECT state FROM nodes WHERE id = 'n2'"), [("dead",)])
        # Both peers woke; exactly one of them marked n2 dead and handed its lease back (the other
        # found it marked already). The line is written just after the commit: wait for it.
        gone = lambda: [m.groups() for daemon in (n1, n3) for m in GONE.finditer(daemon.text())]  # noqa: E731
        self.wait_until(lambda: bool(gone()), 10, "a peer logged n2's death")
        self.assertEqual(gone(), [("n2", str(n2.pid), "1")])
        taken = self.nf.receive("jobs", lease=30)
        self.assertIsNotNone(taken)
        assert taken is not None
        self.assertEqual((taken.id, taken.body), (message, {"job": 1}))

    def test_a_stopped_node_is_stalled_not_dead_and_running_again_after_sigcont(self) -> None:
        n1 = self.serve(node_id="n1")
        n2 = self.serve(node_id="n2")
        self.sigstop(n2)
        self.wait_until(lambda: self.node_states("--stall-after", "1s")["n2"] == "stalled", 15, "n2 shown stalled")
        self.assertEqual(process_state(n2.pid), "T")
        text = self.cli("status", "--stall-after", "1s")
        self.assertEqual(text.returncode, 0, text.stderr)
        self.assertIn("node n2: stalled, role auto", text.stdout)
        # Stopped is not dead: its liveness lock is held, so nobody reaps it.
        self.assertEqual(self.query("SELECT state FROM nodes WHERE id = 'n2'"), [("running",)])
        self.assertNotIn("is gone", n1.text())

        os.kill(n2.pid, signal.SIGCONT)
        self.wait_until(lambda: self.node_states("--stall-after", "1s")["n2"] == "running", 15, "n2 running again")
        self.assertNotIn("is gone", n1.text())


# 6. No eligible node ------------------------------------------------------------------------------


class NoEligibleNode(ServeTestCase):
    def test_with_only_a_replica_a_due_timer_waits_until_an_auto_node_starts(self) -> None:
        replica = self.serve(node_id="r1", role="replica")
        self.assertIsNone(self.status()["scheduler"])
        text = self.cli("status")
        self.assertIn("scheduler: none", text.stdout)
        added = self.cli(
            "schedule", "add", "waiting", "--after", "0.2s", "--queue", "fired", "--body", '{"timer": "waiting"}'
        )
        self.assertEqual(added.returncode, 0, added.stderr)
        [(due,)] = self.query("SELECT due FROM timers WHERE name = 'waiting'")
        while time.time() < due + 2.5:  # well past due: nobody may fire it
            self.assertEqual(self.fired_count(), 0, "a timer fired with no scheduler")
            time.sleep(0.1)
        report = self.status()
        self.assertIsNone(report["scheduler"])
        self.assertEqual([timer["name"] for timer in report["timers"]], ["waiting"])

        auto = self.serve(node_id="n1")
        self.wait_for_log(auto, "took office")
        self.wait_until(lambda: self.fired_count() == 1, 10, "the waiting timer fired")
        time.sleep(1.5)  # a second firing would show by now
        self.assertEqual(self.fired_bodies(), [{"timer": "waiting"}])
        [(fired, left, last_fired)] = self.query("SELECT fired, due, last_fired FROM timers WHERE name = 'waiting'")
        self.assertEqual((fired, left), (1, None))
        self.assertGreaterEqual(last_fired, due)
        self.assertNotIn("took office", replica.text())
        self.assertEqual(self.status()["scheduler"], {"node": "n1", "epoch": auto.epochs()[0]})


# 7. Timers through the CLI ------------------------------------------------------------------------

# A POSIX zone string needs no tz database: local time is UTC+05:30 for the CLI, whatever the host's.
ZONE_ENV = {"TZ": "XYZ-05:30"}
ZONE = datetime.timezone(datetime.timedelta(hours=5, minutes=30))

# (arguments, exit status) refused whether or not the database exists: nothing may be written.
BAD_SCHEDULE = [
    (["schedule", "add", "t", "--after", "1s", "--body", "1"], 2),  # no --queue
    (["schedule", "add", "t", "--after", "1s", "--queue", "q"], 2),  # no --body
    (["schedule", "add", "t", "--queue", "q", "--body", "1"], 2),  # none of --cron/--at/--after
    (["schedule", "add", "t", "--after", "1s", "--at", "2031-01-01T00:00", "--queue", "q", "--body", "1"], 2),
    (["schedule", "add", "t", "--cron", "0 3 * * *", "--after", "1s", "--queue", "q", "--body", "1"], 2),
    (["schedule", "add", "t", "--cron", "0 3 * * *", "--at", "2031-01-01T00:00", "--queue", "q", "--body", "1"], 2),
    (["schedule", "add", "t", "--tz", "UTC", "--after", "1s", "--queue", "q", "--body", "1"], 2),
    (["schedule", "add", "t", "--at", "tomorrow", "--queue", "q", "--body", "1"], 2),
    (["schedule", "add", "t", "--at", "2031-13-01T00:00", "--queue", "q", "--body", "1"], 2),
    (["schedule", "add", "t", "--after", "5x", "--queue", "q", "--body", "1"], 2),
    (["schedule", "add", "t", "--after", "30s1m", "--queue", "q", "--body", "1"], 2),
    (["schedule", "add", "t", "--after", "1s", "--queue", "q", "--body", "{bad"], 2),
    (["schedule", "add", "t", "--after", "1s", "--queue", "", "--body", "1"], 2),
    (["schedule", "add", "", "--after", "1s", "--queue", "q", "--body", "1"], 2),
    (["schedule", "add", "a\tb", "--after", "1s", "--queue", "q", "--body", "1"], 2),
    (["schedule", "add", "bell\x07", "--after", "1s", "--queue", "q", "--body", "1"], 2),
    (["schedule", "add", "--after", "1s", "--queue", "q", "--body", "1"], 2),  # no name
    (["schedule", "remove", ""], 2),
    (["schedule", "remove", "a\nb"], 2),
    (["schedule", "list", "extra"], 2),
    (["schedule", "bogus"], 2),
]


class TimersCli(ServeTestCase):
    def assert_refused(self, results: list[tuple[int, str, str]], cases: list[tuple[list[str], int]]) -> None:
        for (code, out, err), (command, expected) in zip(results, cases, strict=True):
            with self.subTest(command=command):
                self.assertEqual(code, expected, err)
                self.assertEqual(out, "")
                lines = err.strip().splitlines()
                self.assertEqual(len(lines), 1, err)
                self.assertTrue(lines[0].startswith("nodeflow: "), lines[0])

    def test_add_after_and_at_list_and_remove(self) -> None:
        before = time.time()
        for command in (
            ["add", "soon", "--after", "1h30m", "--queue", "q", "--body", '{"n": 1}'],
            ["add", "local", "--at", "2031-01-02T03:04:05", "--queue", "q", "--body", '{"n": 2}'],
            ["add", "offset", "--at", "2031-03-04T05:06:07.250+01:00", "--queue", "r", "--body", '{"n": 3}'],
        ):
            done = self.cli("schedule", *command, env=ZONE_ENV)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertTrue(done.stdout.startswith(f"timer '{command[1]}': next "), done.stdout)
        after = time.time()

        listed = self.cli("schedule", "list", "--json", env=ZONE_ENV)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        schedules = json.loads(listed.stdout)["schedules"]
        expected = [("soon", "q", None, None), ("local", "q", None, None), ("offset", "r", None, None)]
        self.assertEqual([(s["name"], s["queue"], s["cron"], s["tz"]) for s in schedules], expected)
        moments = {}
        for entry in schedules:
            moment = datetime.datetime.fromisoformat(entry["next"])
            self.assertEqual(moment.utcoffset(), datetime.timedelta(hours=5, minutes=30), entry["next"])
            moments[entry["name"]] = moment.timestamp()
        # "next" is rounded to the millisecond.
        self.assertGreaterEqual(moments["soon"], before + 5400 - 0.001)
        self.assertLessEqual(moments["soon"], after + 5400 + 0.001)
        self.assertEqual(moments["local"], datetime.datetime(2031, 1, 2, 3, 4, 5, tzinfo=ZONE).timestamp())
        one = datetime.timezone(datetime.timedelta(hours=1))
        self.assertEqual(moments["offset"], datetime.datetime(2031, 3, 4, 5, 6, 7, 250000, tzinfo=one).timestamp())
        self.assertEqual([timer["name"] for timer in self.status()["timers"]], ["soon", "local", "offset"])

        removed = self.cli("schedule", "remove", "local")
        self.assertEqual((removed.returncode, removed.stdout), (0, "removed timer 'local'\n"), removed.stderr)
        listed = self.cli("schedule", "list", "--json")
        self.assertEqual([s["name"] for s in json.loads(listed.stdout)["schedules"]], ["soon", "offset"])
        again = self.cli("schedule", "remove", "local")
        self.assertEqual((again.returncode, again.stderr), (1, "nodeflow: no timer named 'local'\n"))

    def test_bad_input_without_a_database_is_refused_and_creates_nothing(self) -> None:
        cases = [*BAD_SCHEDULE, (["schedule", "remove", "nosuch"], 1), (["schedule", "list"], 1)]
        self.assert_refused(self.run_all([command for command, _ in cases]), cases)
        self.assertEqual(os.listdir(self.dir), [])

    def test_bad_input_with_a_database_is_refused_and_writes_nothing(self) -> None:
        done = self.cli("schedule", "add", "keep", "--after", "1h", "--queue", "q", "--body", "1")
        self.assertEqual(done.returncode, 0, done.stderr)
        listed = self.cli("schedule", "list", "--json").stdout
        snapshot = tree_snapshot(self.db)
        cases = [
            *BAD_SCHEDULE,
            (["schedule", "add", "keep", "--after", "2h", "--queue", "q", "--body", "2"], 1),  # exists already
            (["schedule", "remove", "nosuch"], 1),
        ]
        self.assert_refused(self.run_all([command for command, _ in cases]), cases)
        self.assertEqual(tree_snapshot(self.db), snapshot)
        self.assertEqual(self.cli("schedule", "list", "--json").stdout, listed)

    def test_a_time_too_far_to_show_is_refused_and_writes_nothing(self) -> None:
        # Was a bug: such a timer was committed, then printing its "next" raised (year 10000, or a
        # time_t overflow): add ended in a traceback, and every later `schedule list` and `status` too.
        done = self.cli("schedule", "add", "keep", "--after", "1h", "--queue", "q", "--body", "1")
        self.assertEqual(done.returncode, 0, done.stderr)
        snapshot = tree_snapshot(self.db)
        cases = [
            (["schedule", "add", "far1", "--after", "999999999999d", "--queue", "q", "--body", "1"], 2),
            (["schedule", "add", "far2", "--at", "9999-12-31T23:59:59-05:00", "--queue", "q", "--body", "1"], 2),
        ]
        self.assert_refused(self.run_all([command for command, _ in cases]), cases)
        self.assertEqual(tree_snapshot(self.db), snapshot)
        for command in (["schedule", "list", "--json"], ["status", "--json"]):
            shown = self.cli(*command)
            self.assertEqual(shown.returncode, 0, shown.stderr)

    def test_a_timer_added_while_the_scheduler_idles_fires_on_time_and_shows_null_next(self) -> None:
        n1 = self.serve(node_id="n1")
        self.wait_for_log(n1, "took office")
        time.sleep(2.0)  # nothing is due: the scheduler is asleep
        added = self.cli("schedule", "add", "ring", "--after", "1s", "--queue", "fired", "--body", '{"timer": "ring"}')
        self.assertEqual(added.returncode, 0, added.stderr)
        [(due,)] = self.query("SELECT due FROM timers WHERE name = 'ring'")
        self.wait_until(lambda: self.fired_count() == 1, 10, "the timer fired")
        [(fired, left, last_fired)] = self.query("SELECT fired, due, last_fired FROM timers WHERE name = 'ring'")
        self.assertEqual((fired, left), (1, None))
        self.assertGreaterEqual(last_fired, due, "fired before it was due")
        self.assertEqual(self.fired_bodies(), [{"timer": "ring"}])
        listed = json.loads(self.cli("schedule", "list", "--json").stdout)["schedules"]
        self.assertEqual(listed, [{"name": "ring", "queue": "fired", "cron": None, "tz": None, "next": None}])
        self.assertEqual(self.status()["timers"], [], "status lists pending timers only")


# 8. serve bad input -------------------------------------------------------------------------------


class ServeBadInput(ServeTestCase):
    def test_bad_options_exit_2_and_create_nothing(self) -> None:
        cases = [
            (["serve", "--role", "bad"], 2),
            (["serve", "--concurrency", "0"], 2),
            (["serve", "--concurrency", "abc"], 2),
            (["serve", "--concurrency", "1025"], 2),
            (["serve", "--grace", "abc"], 2),
            (["serve", "--heartbeat", "0"], 2),
            (["serve", "--node-id", "a/b"], 2),
            (["serve", "--node-id", ".."], 2),
            (["serve", "--node-id", "../x"], 2),
            (["serve", "--node-id", ""], 2),
        ]
        results = self.run_all([command for command, _ in cases])
        for (code, out, err), (command, expected) in zip(results, cases, strict=True):
            with self.subTest(command=command):
                self.assertEqual((code, out), (expected, ""), err)
                lines = err.strip().splitlines()
                self.assertEqual(len(lines), 1, err)
                self.assertTrue(lines[0].startswith("nodeflow: "), lines[0])
        self.assertEqual(os.listdir(self.dir), [])


# 9. Who is in office, during a handover -----------------------------------------------------------


class Handover(ServeTestCase):
    def test_status_never_names_a_dead_node_as_the_scheduler(self) -> None:
        # Was a bug: between a standby getting scheduler.lock and committing its epoch, scheduler()
        # paired the lock holder's pid with the election row's old node: status named the dead node.
        n1 = self.serve(node_id="n1")
        self.wait_for_log(n1, "took office")
        n2 = self.serve(node_id="n2")
        lock = self.db + ".d/scheduler.lock"
        self.wait_until(lambda: n2.pid in flock_pids(lock)[1], 10, "n2 waiting for the scheduler lock")
        with self.writer_lock_held():  # n2 can get the lock but not yet commit its epoch
            self.kill(n1)
            self.wait_until(lambda: n2.pid in flock_pids(lock)[0], 10, "n2 holding the scheduler lock")
            office = self.nf.scheduler()
            shown = self.status()["scheduler"]  # status only reads: it works while writes wait
        self.assertTrue(office is None or (office["node"], office["pid"]) == ("n2", n2.pid), office)
        self.assertTrue(shown is None or shown["node"] == "n2", shown)
        self.wait_for_log(n2, "took office")
        self.assertEqual(self.status()["scheduler"], {"node": "n2", "epoch": n2.epochs()[0]})


if __name__ == "__main__":
    unittest.main()


# Handlers for `serve --app`: "work" sleeps body["seconds"], then records the message id in table
# done (a UNIQUE id: a second run of one message would fail the insert and show as a failure);
# "poison" always raises.
APP = """
import os, time, nodeflow

@nodeflow.handler("work")
def work(message):
    time.sleep(message.body.get("seconds", 0))
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"])
    try:
        nf.store.write(lambda c: c.execute("INSERT INTO done VALUES (?, ?)", (message.id, os.getpid())))
    finally:
        nf.close()

@nodeflow.handler("poison")
async def poison(message):
    raise ValueError("cannot digest " + str(message.body))
"""


class Handlers(ServeTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.app = os.path.join(self.dir, "app.py")
        with open(self.app, "w") as f:
            f.write(APP)
        self.nf.store.write(lambda c: c.execute("CREATE TABLE done (id INTEGER PRIMARY KEY, pid INTEGER)"))
        self.env = {"NODEFLOW_DB": self.db}

    def serve_app(self, *options: str) -> Daemon:
        os.environ["NODEFLOW_DB"] = self.db  # the handlers' own connections (inherited by the node)
        self.addCleanup(os.environ.pop, "NODEFLOW_DB", None)
        daemon = self.serve("--app", self.app, *options)
        self.wait_for_log(daemon, "consuming poison, work")
        return daemon

    def test_nodes_share_the_work_each_message_once_and_a_failing_handler_is_retried_with_back_off(self) -> None:
        nodes = [self.serve_app("--concurrency", "2"), self.serve_app("--concurrency", "2")]
        ids = [self.nf.send("work", {"n": n, "seconds": 0.05}) for n in range(40)]
        poison = self.nf.send("poison", {"n": "x"})
        self.wait_until(lambda: len(self.query("SELECT id FROM done")) == len(ids), 60, "all work done")
        done = self.query("SELECT id, pid FROM done")
        self.assertEqual(sorted(i for i, _ in done), sorted(ids), "each message handled exactly once")
        self.assertEqual({pid for _, pid in done}, {d.pid for d in nodes}, "both nodes took a share")
        # A handler records its work before it returns, and the node acks after: wait for the acks.
        self.wait_until(lambda: "work" not in self.nf.queues(), 20, "every message acked")
        # Back-off 1 s after the first failure, 2 s after the second (dead letters after the fifth
        # are covered by the queue tests); the error is kept with the message.
        self.wait_until(lambda: "failed (delivery 2)" in "".join(d.text() for d in nodes), 30, "a second delivery")
        logs = "".join(d.text() for d in nodes)
        self.assertIn(f"message {poison} of poison failed (delivery 1): ValueError: cannot digest", logs)
        self.assertIn("retry in 1000ms", logs.replace("retry in 1s", "retry in 1000ms"))
        (last_error,) = self.query("SELECT last_error FROM messages WHERE id = ?", poison)[0]
        self.assertIn("ValueError: cannot digest", last_error)

    def test_sigterm_finishes_work_in_flight_within_the_grace_period(self) -> None:
        node = self.serve_app("--grace", "20s")
        message = self.nf.send("work", {"seconds": 1.5})
        self.wait_until(lambda: self.nf.queues().get("work", {}).get("leased") == 1, 20, "the message taken")
        node.process.send_signal(signal.SIGTERM)
        self.assertEqual(node.process.wait(timeout=30), 0, node.text())
        self.assertEqual(self.query("SELECT id FROM done"), [(message,)], "the work in flight was finished")
        self.assertNotIn("work", self.nf.queues(), "and acked")
        self.assertIn("waiting for 1 message(s) in flight", node.text())

    def test_work_still_running_when_the_grace_ends_is_handed_back_not_lost(self) -> None:
        node = self.serve_app("--grace", "0.3s")
        message = self.nf.send("work", {"seconds": 4})
        self.wait_until(lambda: self.nf.queues().get("work", {}).get("leased") == 1, 20, "the message taken")
        node.process.send_signal(signal.SIGTERM)
        self.assertEqual(node.process.wait(timeout=30), 0, node.text())
        self.assertIn("handed back 1 message(s) still in flight", node.text())
        depth = self.nf.queues()["work"]
        self.assertEqual((depth["ready"], depth["leased"]), (1, 0), "ready again at once, not leased for 30 s")
        taken = self.nf.receive("work")
        self.assertIsNotNone(taken)
        self.assertEqual(taken.id, message)
        self.assertIn("interrupted", taken.last_error or "")

    def test_a_handler_slower_than_its_lease_keeps_the_message_and_runs_once(self) -> None:
        # A lease of 1 s and a handler of 2.5 s: without renewal the message would be delivered
        # again while the first run is still going, and its ack would be refused.
        node = self.serve_app("--lease", "1s")
        message = self.nf.send("work", {"seconds": 2.5})
        self.wait_until(lambda: self.query("SELECT id FROM done") == [(message,)], 30, "the work done")
        self.wait_until(lambda: "work" not in self.nf.queues(), 10, "the message acked")
        (attempts,) = self.query("SELECT count(*) FROM done")[0]
        self.assertEqual(attempts, 1)
        self.assertNotIn("not acked", node.text())

    def test_an_app_that_cannot_be_imported_is_refused(self) -> None:
        for app in ("no_such_module_xyz", os.path.join(self.dir, "missing.py")):
            with self.subTest(app=app):
                done = self.cli("serve", "--app", app)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
                self.assertTrue(done.stderr.startswith("nodeflow: --app "), done.stderr)


class CronTimers(ServeTestCase):
    def test_slots_missed_while_no_scheduler_ran_fire_once_on_take_over(self) -> None:
        while 60 - time.time() % 60 < 5:  # a real slot falling due during the test would fire too
            time.sleep(0.2)
        self.nf.schedule("every-minute", "ticks", {"tick": True}, cron="* * * * *", tz="UTC")
        # As if the cluster had been down for ten minutes: ten slots were missed.
        missed_since = time.time() - 600
        self.nf.store.write(lambda c: c.execute("UPDATE timers SET due = ?", (missed_since,)))
        node = self.serve()
        self.wait_for_log(node, "took office")
        self.wait_until(lambda: self.fired_count("ticks") >= 1, 20, "the missed slots fired")
        time.sleep(1.5)  # room for a wrong second or tenth firing to show up
        self.assertEqual(self.fired_count("ticks"), 1, "ten missed slots fire once, not ten times")
        ((due, fired),) = self.query("SELECT due, fired FROM timers WHERE name = 'every-minute'")
        self.assertEqual(fired, 1)
        self.assertGreater(due, time.time(), "the next slot is in the future")
        self.assertEqual(due % 60, 0, "on a minute boundary")
        self.assertLessEqual(due - time.time(), 60)
