"""Named locks through the Python API, checked with real processes, real files and real signals.

Every holder, waiter and probe that must be "another process" is a real child started with
``spawn_python``; kills are real ``SIGKILL``/``SIGSTOP``/``SIGCONT``; what a test asserts is what
the kernel, the lock folder and the database say afterwards. No timing assertions: every wait is
bounded generously, and "at once" is checked with try-locks (``timeout=0``) after a point where the
lock must already be free (a reaped holder, a release that has returned).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import subprocess
import threading
import time
import unittest
import unittest.mock

import nodeflow
from tests.support import ClusterTestCase, alive, blocked_flock_waiters, process_state

# A child that takes a lock, says so, and keeps it until a line (or EOF) arrives on its stdin.
HOLDER = """
    import os, sys, nodeflow
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"], **({"node": sys.argv[2]} if len(sys.argv) > 2 else {}))
    held = nf.lock(sys.argv[1], timeout=20)
    print("held", held.fence, os.getpid(), flush=True)
    sys.stdin.readline()
    held.release()
    print("released", flush=True)
    sys.stdin.readline()
"""

# A child that tries a lock once (or waits up to argv[2] seconds): exit 0 "got FENCE", exit 3 "busy PID".
PROBE = """
    import os, sys, nodeflow
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"])
    try:
        held = nf.lock(sys.argv[1], timeout=float(sys.argv[2]))
    except nodeflow.LockTimeout as error:
        print("busy", error.holder.pid if error.holder else "?", flush=True)
        sys.exit(3)
    print("got", held.fence, flush=True)
    held.release()
"""

# A child that waits up to 20 s for a lock, announcing first that it is about to wait.
WAITER = """
    import os, sys, nodeflow
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"])
    print("waiting", flush=True)
    held = nf.lock(sys.argv[1], timeout=20)
    print("got", held.fence, flush=True)
    held.release()
"""

# One of the counter workers: read-modify-write of a plain file, locked or not, after a common start.
COUNTER_WORKER = """
    import os, sys, time, nodeflow
    counter, log, go, rounds, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"])
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit("no start signal within 30 s")
        time.sleep(0.002)

    def increment():
        with open(counter) as f:
            text = f.read()
        value = int(text) if mode == "locked" else int(text or 0)  # a torn read is a failure when locked
        time.sleep(0)  # yield: without the lock another process now reads the same value
        with open(counter, "w") as f:
            f.write(str(value + 1))

    fences = []
    for _ in range(rounds):
        if mode == "locked":
            with nf.lock("counter", timeout=60) as held:
                increment()
                with open(log, "a") as f:  # appended while holding: the log order is the acquisition order
                    f.write(f"{held.fence} {os.getpid()}\\n")
                fences.append(held.fence)
        else:
            increment()
    print("fences", *fences, flush=True)
"""

LOCK_FILE = re.compile(r"[0-9a-f]{16,}\.lock")


class LockTestCase(ClusterTestCase):
    """ClusterTestCase plus an open handle on the cluster and helpers that start lock children."""

    def setUp(self) -> None:
        super().setUp()
        self.nf = nodeflow.connect(self.db)
        self.addCleanup(self.nf.close)
        self.lock_dir = os.path.join(self.db + ".d", "locks")

    def tell(self, child: subprocess.Popen, line: str = "go") -> None:
        child.stdin.write(line + "\n")
        child.stdin.flush()

    # Children ----------------------------------------------------------------------------------

    def start_holder(self, name: str, node: str | None = None) -> tuple[subprocess.Popen, int]:
        child = self.spawn_python(HOLDER, name, *([node] if node else []), stdin=subprocess.PIPE)
        fence = int(self.read_line(child, "held ").split()[1])
        return child, fence

    def probe(self, name: str, timeout: float = 0) -> tuple[str, int]:
        """Try the lock from a fresh process: ("got", fence) or ("busy", holder pid)."""
        rc, out, err = self.finish(self.spawn_python(PROBE, name, str(timeout)), timeout=timeout + 30)
        self.assertIn(rc, (0, 3), f"probe failed: {err}")
        word, value = out.split()[:2]
        return word, int(value) if value.isdigit() else -1

    def lock_files(self) -> list[str]:
        return sorted(os.listdir(self.lock_dir))

    def assert_lock_files_removed(self, what: str = "lock files removed once idle") -> None:
        # A released lock's file is parked for IDLE_LOCK_LINGER seconds, then removed.
        self.wait_until(lambda: self.lock_files() == [], nodeflow.IDLE_LOCK_LINGER + 10, what)

    def join_new_threads(self, before: set[threading.Thread], timeout: float = 15) -> None:
        """Wait until every thread started since ``before`` has ended (abandoned lock waiters)."""
        deadline = time.monotonic() + timeout
        for thread in set(threading.enumerate()) - before:
            if thread.name == "nodeflow-lock-sweep":  # removes parked lock files; ends when none are left
                continue
            if thread.name == "nodeflow-commit":  # the handle's group committer: lives as long as the handle
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
            self.assertFalse(thread.is_alive(), f"thread {thread.name} still running after {timeout}s")


class MutualExclusion(LockTestCase):
    """Eight processes, one counter file, thousands of read-modify-write rounds."""

    def run_counter(self, processes: int, rounds: int, mode: str) -> tuple[int, list[str], list[list[int]]]:
        counter = os.path.join(self.dir, "counter")
        log = os.path.join(self.dir, "fences.log")
        go = os.path.join(self.dir, "go")
        with open(counter, "w") as f:
            f.write("0")
        workers = [self.spawn_python(COUNTER_WORKER, counter, log, go, str(rounds), mode) for _ in range(processes)]
        for worker in workers:
            self.read_line(worker, "ready")
        open(go, "w").close()  # every worker starts together, so they contend from the first round
        per_process = []
        for worker in workers:
            rc, out, err = self.finish(worker, timeout=120)
            self.assertEqual(rc, 0, f"worker failed: {err}")
            fences_line = next(line for line in out.splitlines() if line.startswith("fences"))
            per_process.append([int(word) for word in fences_line.split()[1:]])
        with open(counter) as f:
            final = int(f.read())
        lines = []
        if os.path.exists(log):
            with open(log) as f:
                lines = f.read().splitlines()
        return final, lines, per_process

    def test_eight_processes_lose_no_update_and_fences_follow_acquisition_order(self) -> None:
        processes, rounds = 8, 300
        total = processes * rounds
        final, lines, per_process = self.run_counter(processes, rounds, "locked")
        self.assertEqual(final, total, "an increment was lost: two processes held the lock at once")
        self.assertEqual(len(lines), total)
        log_fences = [int(line.split()[0]) for line in lines]
        self.assertEqual(len(set(log_fences)), total, "a fencing token was handed out twice")
        for earlier, later in itertools.pairwise(log_fences):
            self.assertLess(earlier, later, "fences in acquisition order must strictly increase")
        reported = sorted(fence for fences in per_process for fence in fences)
        self.assertEqual(reported, sorted(log_fences), "the fences the holders saw are the fences logged")
        for fences in per_process:
            self.assertEqual(len(fences), rounds)
            self.assertEqual(fences, sorted(set(fences)), "each process's own fences strictly increase")
        self.assert_lock_files_removed("the lock file must be removed after the last release")
        self.assertIsNone(self.nf.holder("counter"))

    def test_control_without_the_lock_updates_are_lost(self) -> None:
        # Shows the counter test above can fail: the same workers, unlocked, lose increments.
        processes, rounds = 8, 100
        final, _, _ = self.run_counter(processes, rounds, "unlocked")
        self.assertLess(final, processes * rounds)


class DeadAndStoppedHolders(LockTestCase):
    def test_sigkill_of_holder_frees_the_lock_at_once(self) -> None:
        holder, fence = self.start_holder("job")
        with self.assertRaises(nodeflow.LockTimeout):
            self.nf.lock("job", timeout=0)
        holder.kill()
        holder.wait(timeout=10)
        # The kernel drops the flock as the process exits, before its parent can reap it: so a
        # try-lock right after wait() must succeed, with no time-out involved.
        with self.nf.lock("job", timeout=0) as held:
            self.assertGreater(held.fence, fence)
            self.assertEqual(self.nf.holder("job").pid, os.getpid())
        self.assert_lock_files_removed()

    def test_sigkill_of_holder_wakes_a_blocked_waiter_in_another_process(self) -> None:
        holder, fence = self.start_holder("job")
        waiter = self.spawn_python(WAITER, "job")
        self.read_line(waiter, "waiting")
        self.wait_until(lambda: waiter.pid in blocked_flock_waiters(), 20, "waiter blocked in flock()")
        holder.kill()
        got = self.read_line(waiter, "got", timeout=20)
        self.assertGreater(int(got.split()[1]), fence)
        rc, _, err = self.finish(waiter)
        self.assertEqual(rc, 0, err)

    def test_lock_file_left_by_a_killed_holder_blocks_nobody(self) -> None:
        holder, fence = self.start_holder("left-behind")
        holder.kill()
        holder.wait(timeout=10)
        self.assertEqual(len(self.lock_files()), 1, "a SIGKILLed holder cannot remove its lock file")
        with self.nf.lock("left-behind", timeout=0) as held:
            self.assertGreater(held.fence, fence)
        self.assert_lock_files_removed("the new holder removes the leftover file on release")
        word, _ = self.probe("left-behind")
        self.assertEqual(word, "got")

    def test_holder_note_is_right_after_a_killed_holder_left_a_longer_one(self) -> None:
        # The dead holder's note (pid, node, fence, since) is longer than the next holder's: what
        # holder()/held() report must be the new holder's note, not a mix of both.
        holder, _ = self.start_holder("noted", node="node-with-a-rather-long-identifier-" + "x" * 40)
        holder.kill()
        holder.wait(timeout=10)
        with self.nf.lock("noted", timeout=0) as held:
            info = self.nf.holder("noted")
            self.assertIsNotNone(info)
            self.assertEqual(info.pid, os.getpid())
            self.assertEqual(info.fence, held.fence, f"holder() misreads the note: {info}")
            self.assertIsNone(info.node)
            listed = self.nf.held()
            self.assertEqual([(i.name, i.fence) for i in listed], [("noted", held.fence)], f"held(): {listed}")

    def test_sigstopped_holder_keeps_the_lock(self) -> None:
        holder, fence = self.start_holder("frozen")
        os.kill(holder.pid, signal.SIGSTOP)
        try:
            self.wait_until(lambda: process_state(holder.pid) == "T", 10, "holder stopped")
            before = set(threading.enumerate())
            with self.assertRaises(nodeflow.LockTimeout) as caught:
                self.nf.lock("frozen", timeout=0.5)
            self.assertIn(str(holder.pid), str(caught.exception), "the message must name the holder's pid")
            self.assertEqual(caught.exception.holder.pid, holder.pid)
            self.assertEqual(caught.exception.holder.fence, fence)
            word, pid = self.probe("frozen", timeout=0.3)
            self.assertEqual((word, pid), ("busy", holder.pid), "a stopped holder must keep its lock")
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        self.tell(holder, "release")
        self.read_line(holder, "released")
        self.join_new_threads(before)  # the abandoned waiter got the lock and gave it back
        with self.nf.lock("frozen", timeout=10) as held:
            self.assertGreater(held.fence, fence)
        self.assert_lock_files_removed()


class FencingTokens(LockTestCase):
    def test_fences_increase_across_processes_and_restarts(self) -> None:
        seen = []
        with self.nf.lock("gen") as held:
            seen.append(held.fence)
        self.nf.close()
        for _ in range(2):  # a new process each time, each with its own handle
            rc, out, err = self.finish(self.spawn_python(PROBE, "gen", "10"))
            self.assertEqual(rc, 0, err)
            seen.append(int(out.split()[1]))
        again = nodeflow.connect(self.db)  # a new handle in this process, after the first was closed
        try:
            with again.lock("gen") as held:
                seen.append(held.fence)
        finally:
            again.close()
        rc, out, err = self.finish(self.spawn_python(PROBE, "gen", "10"))
        self.assertEqual(rc, 0, err)
        seen.append(int(out.split()[1]))
        self.assertTrue(all(isinstance(fence, int) for fence in seen), seen)
        self.assertEqual(seen, sorted(set(seen)), f"fences must strictly increase: {seen}")

    def test_fence_false_gives_no_token(self) -> None:
        with self.nf.lock("plain", fence=False) as held:
            self.assertIsNone(held.fence)
            word, _ = self.probe("plain")
            self.assertEqual(word, "busy", "fence=False is still a lock")
        self.assert_lock_files_removed()


class TimeoutsAndCancellation(LockTestCase):
    """A waiter that gave up must never end up holding the lock, even when its thread gets it later."""

    # How the holder lets go: "release" removes the lock file, so a waiter blocked on the old file
    # must retry; "kill" leaves the file in place, so the waiter's thread really gets the lock and
    # must hand it straight back.
    ENDINGS = ("release", "kill")

    def end_holder(self, holder: subprocess.Popen, ending: str) -> None:
        if ending == "release":
            self.tell(holder, "release")
            self.read_line(holder, "released")
        else:
            holder.kill()
            holder.wait(timeout=10)

    def assert_given_back(self, before: set[threading.Thread], name: str) -> None:
        self.join_new_threads(before)
        word, _ = self.probe(name, timeout=0)
        self.assertEqual(word, "got", "an abandoned waiter in this process kept the lock")
        self.assertIsNone(self.nf.holder(name))
        self.assert_lock_files_removed()

    def test_sync_waiter_that_timed_out_never_holds_the_lock(self) -> None:
        for ending in self.ENDINGS:
            with self.subTest(holder=ending):
                name = f"sync-{ending}"
                holder, _ = self.start_holder(name)
                before = set(threading.enumerate())
                with self.assertRaises(nodeflow.LockTimeout) as caught:
                    self.nf.lock(name, timeout=0.3)
                self.assertIsInstance(caught.exception, TimeoutError)
                self.assertIsInstance(caught.exception, nodeflow.NodeflowError)
                self.assertEqual(caught.exception.holder.pid, holder.pid)
                self.end_holder(holder, ending)
                self.assert_given_back(before, name)

    def test_async_waiter_cancelled_never_holds_the_lock(self) -> None:
        for ending in self.ENDINGS:
            with self.subTest(holder=ending):
                name = f"cancel-{ending}"
                holder, _ = self.start_holder(name)
                before = set(threading.enumerate())

                async def scenario(name: str = name) -> None:
                    async def take() -> nodeflow.HeldLock:
                        return await self.nf.alock(name)

                    task = asyncio.get_running_loop().create_task(take())
                    await asyncio.sleep(0.3)
                    self.assertFalse(task.done(), "the lock is held elsewhere; the waiter cannot have it")
                    task.cancel()
                    with self.assertRaises(asyncio.CancelledError):
                        await asyncio.wait_for(task, 10)

                asyncio.run(scenario())  # the loop is gone when the lock frees
                self.end_holder(holder, ending)
                self.assert_given_back(before, name)

    def test_async_waiter_cancelled_while_the_loop_still_runs_when_the_lock_frees(self) -> None:
        for ending in self.ENDINGS:
            with self.subTest(holder=ending):
                name = f"cancel-live-{ending}"
                holder, _ = self.start_holder(name)
                before = set(threading.enumerate())

                async def scenario(
                    name: str = name,
                    holder: subprocess.Popen = holder,
                    ending: str = ending,
                    before: set[threading.Thread] = before,
                ) -> None:
                    task = asyncio.ensure_future(self.nf.alock(name))
                    await asyncio.sleep(0.2)
                    waiters = set(threading.enumerate()) - before  # the thread blocked in flock() for the task
                    task.cancel()
                    with self.assertRaises(asyncio.CancelledError):
                        await asyncio.wait_for(task, 10)
                    # The lock frees while this loop is alive: the waiter's thread gets it, must give it back.
                    await asyncio.to_thread(self.end_holder, holder, ending)
                    for thread in waiters:
                        await asyncio.to_thread(thread.join, 15)
                        self.assertFalse(thread.is_alive())
                    async with self.nf.alock(name, timeout=0) as held:
                        self.assertIsInstance(held.fence, int)

                asyncio.run(scenario())
                self.assert_given_back(before, name)

    def test_async_timeout_never_holds_the_lock(self) -> None:
        for ending in self.ENDINGS:
            with self.subTest(holder=ending):
                name = f"async-timeout-{ending}"
                holder, _ = self.start_holder(name)
                before = set(threading.enumerate())

                async def scenario(name: str = name, holder: subprocess.Popen = holder) -> None:
                    with self.assertRaises(nodeflow.LockTimeout) as caught:
                        await asyncio.wait_for(self.nf.alock(name, timeout=0.3), 20)
                    self.assertEqual(caught.exception.holder.pid, holder.pid)
                    with self.assertRaises(TimeoutError) as outer:  # asyncio's own time-out cancels the waiter
                        await asyncio.wait_for(self.nf.alock(name), 0.3)
                    self.assertNotIsInstance(outer.exception, nodeflow.LockTimeout)

                asyncio.run(scenario())
                self.end_holder(holder, ending)
                self.assert_given_back(before, name)

    def test_timeout_zero_is_a_try_lock(self) -> None:
        holder, _ = self.start_holder("try")
        with self.assertRaises(nodeflow.LockTimeout) as caught:
            self.nf.lock("try", timeout=0)
        self.assertEqual(caught.exception.waited, 0)
        self.assertIn(str(holder.pid), str(caught.exception))

        async def scenario() -> None:
            for fence in (True, False):
                with self.subTest(fence=fence), self.assertRaises(nodeflow.LockTimeout) as caught:
                    await asyncio.wait_for(self.nf.alock("try", timeout=0, fence=fence), 20)  # must not hang
                self.assertEqual(caught.exception.waited, 0)
                self.assertIn(str(holder.pid), str(caught.exception))

        asyncio.run(scenario())
        self.tell(holder, "release")
        self.read_line(holder, "released")
        with self.nf.lock("try", timeout=0) as held:
            self.assertIsInstance(held.fence, int)

        async def free() -> None:
            async with self.nf.alock("try", timeout=0) as held:
                self.assertIsInstance(held.fence, int)

        asyncio.run(free())
        self.assert_lock_files_removed()

    def test_lock_timeout_is_a_timeout_error_and_a_nodeflow_error(self) -> None:
        self.assertTrue(issubclass(nodeflow.LockTimeout, TimeoutError))
        self.assertTrue(issubclass(nodeflow.LockTimeout, nodeflow.NodeflowError))
        self.assertTrue(issubclass(nodeflow.InvalidInput, nodeflow.NodeflowError))

    def test_many_short_timeouts_racing_a_busy_holder_never_leak_the_lock(self) -> None:
        # A holder process takes and drops the lock in a tight loop while this process keeps giving
        # up on it (sync time-outs, async time-outs, cancellations): the hand-over races the give-up.
        churn = self.spawn_python(
            """
            import os, sys, time, nodeflow
            nf = nodeflow.connect(os.environ["NODEFLOW_DB"])
            print("started", flush=True)
            sys.stdin.readline()
            for _ in range(150):
                with nf.lock("race", timeout=15):
                    time.sleep(0.003)
                time.sleep(0.001)
            print("done", flush=True)
        """,
            stdin=subprocess.PIPE,
        )
        self.read_line(churn, "started")
        before = set(threading.enumerate())
        attempts, gave_up = 0, [0]

        async def async_attempts() -> None:
            for index in range(20):
                try:
                    if index % 2:
                        held = await self.nf.alock("race", timeout=0.004)
                    else:
                        held = await asyncio.wait_for(self.nf.alock("race"), 0.004)
                except TimeoutError:
                    gave_up[0] += 1
                    continue
                held.release()

        self.tell(churn)
        while churn.poll() is None and attempts < 60:
            attempts += 1
            try:
                self.nf.lock("race", timeout=0.002 + 0.001 * (attempts % 5)).release()
            except nodeflow.LockTimeout:
                gave_up[0] += 1
            if attempts % 20 == 0:
                asyncio.run(async_attempts())
        self.assertGreater(gave_up[0], 0, "no attempt gave up: the race this test is about never happened")
        rc, out, err = self.finish(churn, timeout=60)
        self.assertEqual(rc, 0, f"the churning holder could not get the lock back: {err}")
        self.assertIn("done", out)
        self.join_new_threads(before)
        word, _ = self.probe("race", timeout=0)
        self.assertEqual(word, "got", "a waiter that gave up kept the lock")
        self.assert_lock_files_removed()


class LockNames(LockTestCase):
    VALID = ("a/b", "../../etc/passwd", "..", ".", "ключ-🔒", "x" * 4096, "é" * 2048, " ", "a\nb")
    INVALID = ("", "a\0b", None, 42, b"bytes", "x" * 4097, "é" * 2048 + "a", "\ud800")

    def all_files(self) -> list[str]:
        found = []
        for folder, _, files in os.walk(self.dir):
            found += [os.path.relpath(os.path.join(folder, name), self.dir) for name in files]
        return sorted(found)

    def assert_only_lock_files_in_the_lock_folder(self, count: int) -> None:
        names = self.lock_files()
        self.assertEqual(len(names), count, names)
        for name in names:
            self.assertRegex(name, LOCK_FILE)
            path = os.path.join(self.lock_dir, name)
            self.assertTrue(os.path.isfile(path) and not os.path.islink(path))
        database = {"cluster.db", "cluster.db-wal", "cluster.db-shm"}
        outside = [
            path
            for path in self.all_files()
            if path not in database and os.path.dirname(path) != os.path.join("cluster.db.d", "locks")
        ]
        self.assertEqual(outside, [], "a lock name created a file outside PATH.d/locks/")

    def test_odd_names_stay_inside_the_lock_folder(self) -> None:
        for name in self.VALID:
            with self.subTest(name=name[:20]):
                with self.nf.lock(name, timeout=5) as held:
                    self.assertIsInstance(held.fence, int)
                    self.assert_only_lock_files_in_the_lock_folder(1)
                    info = self.nf.holder(name)
                    self.assertEqual((info.name, info.pid), (name, os.getpid()))
                    self.assertEqual([i.name for i in self.nf.held()], [name])
                    word, pid = self.probe(name)
                    self.assertEqual((word, pid), ("busy", os.getpid()))
                self.assert_lock_files_removed("the lock file must be removed on release")
                self.assertIsNone(self.nf.holder(name))

    def test_odd_names_are_distinct_locks(self) -> None:
        held = [self.nf.lock(name, timeout=5) for name in self.VALID]
        try:
            self.assert_only_lock_files_in_the_lock_folder(len(self.VALID))
            self.assertEqual(sorted(i.name for i in self.nf.held()), sorted(self.VALID))
        finally:
            for lock in held:
                lock.release()
        self.assert_lock_files_removed()

    def test_a_4096_byte_name_works_from_another_process(self) -> None:
        name = "é" * 2047 + "xy"
        self.assertEqual(len(name.encode()), 4096)
        holder, fence = self.start_holder(name)
        info = self.nf.holder(name)
        self.assertEqual((info.name, info.pid, info.fence), (name, holder.pid, fence))
        with self.assertRaises(nodeflow.LockTimeout):
            self.nf.lock(name, timeout=0)
        self.tell(holder, "release")
        self.read_line(holder, "released")
        self.assert_lock_files_removed()

    def test_invalid_names_are_refused_and_create_nothing(self) -> None:
        for name in self.INVALID:
            with self.subTest(name=repr(name)[:30]):
                with self.assertRaises(nodeflow.InvalidInput) as caught:
                    self.nf.lock(name, timeout=0)
                self.assertIsInstance(caught.exception, ValueError)
                self.assertIsInstance(caught.exception, nodeflow.NodeflowError)
                with self.assertRaises(nodeflow.InvalidInput):
                    self.nf.holder(name)
                with self.assertRaises(nodeflow.InvalidInput):
                    asyncio.run(asyncio.wait_for(self.nf.alock(name, timeout=0), 20))
                self.assertEqual(self.lock_files(), [], "an invalid name must create no file")
        self.assertEqual(self.nf.held(), [])


# A child that takes and releases a lock, then keeps running (its parked file outlives the
# release) until told to exit, normally or by os._exit (which skips atexit).
PARKER = """
    import os, sys, nodeflow
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"])
    with nf.lock(sys.argv[1], timeout=20) as held:
        pass
    print("released", held.fence, flush=True)
    how = sys.stdin.readline().strip()
    if how == "crash":
        os._exit(0)
"""


class ParkedLockFiles(LockTestCase):
    """A released lock keeps its file open, unlocked, for a short while: cheaper re-acquisition."""

    def inode_of(self, name: str) -> int:
        return os.stat(os.path.join(self.lock_dir, nodeflow.lock_file_name(name))).st_ino

    def test_a_quick_reacquisition_reuses_the_file_and_the_file_goes_after_the_linger(self) -> None:
        with self.nf.lock("again"):
            first = self.inode_of("again")
        with self.nf.lock("again"):
            self.assertEqual(self.inode_of("again"), first, "the parked file was not reused")
        self.assertEqual(len(self.lock_files()), 1, "a just-released lock's file is parked, not removed")
        self.assertIsNone(self.nf.holder("again"), "a parked file is not a held lock")
        self.assertEqual(self.nf.held(), [])
        self.assertEqual(self.probe("again")[0], "got", "another process can take a parked lock")
        self.assert_lock_files_removed("a parked lock file must be removed after the linger")

    def test_parked_files_are_bounded_and_removed_on_close(self) -> None:
        count = nodeflow.IDLE_LOCK_FILES + 20
        for number in range(count):
            with self.nf.lock(f"many-{number}", fence=False):
                pass
        self.assertLessEqual(len(self.lock_files()), nodeflow.IDLE_LOCK_FILES)
        self.nf.close()
        self.assertEqual(self.lock_files(), [], "closing the handle removes its parked files at once")

    def test_a_process_that_exits_removes_its_parked_files_and_a_crashed_one_blocks_nobody(self) -> None:
        for how, files_left in (("exit", 0), ("crash", 1)):
            with self.subTest(how):
                child = self.spawn_python(PARKER, f"parked-{how}", stdin=subprocess.PIPE)
                fence = int(self.read_line(child, "released").split()[1])
                self.tell(child, how)
                rc, _, err = self.finish(child)
                self.assertEqual(rc, 0, err)
                self.assertEqual(len(self.lock_files()), files_left)
                with self.nf.lock(f"parked-{how}", timeout=0) as held:
                    self.assertGreater(held.fence, fence)
                self.nf.close()
                self.nf = nodeflow.connect(self.db)
                self.assertEqual(self.lock_files(), [])

    def test_a_file_removed_by_another_process_while_we_keep_it_parked_still_excludes(self) -> None:
        # Parked for longer than the holder takes to start under load: once the sweeper has closed
        # our descriptor, the holder's new file may reuse the freed inode number (seen in CI).
        linger = unittest.mock.patch.object(nodeflow, "IDLE_LOCK_LINGER", 60.0)
        linger.start()
        self.addCleanup(linger.stop)
        with self.nf.lock("swapped"):
            pass
        parked_inode = self.inode_of("swapped")
        # Another process removes the file (as its own sweeper would) and takes the lock on a
        # new file: our parked descriptor now points at a removed inode.
        os.unlink(os.path.join(self.lock_dir, nodeflow.lock_file_name("swapped")))
        holder, fence = self.start_holder("swapped")
        self.assertNotEqual(self.inode_of("swapped"), parked_inode)
        with self.assertRaises(nodeflow.LockTimeout):
            self.nf.lock("swapped", timeout=0)
        with self.assertRaises(nodeflow.LockTimeout):
            self.nf.lock("swapped", timeout=0.3)
        self.tell(holder, "release")
        self.read_line(holder, "released")
        with self.nf.lock("swapped", timeout=0) as held:
            self.assertGreater(held.fence, fence)
            self.assertEqual(self.nf.holder("swapped").pid, os.getpid())

    def test_a_waiter_in_another_process_gets_the_same_file_on_release(self) -> None:
        held = self.nf.lock("handoff")
        inode = self.inode_of("handoff")
        waiter = self.spawn_python(HOLDER, "handoff", stdin=subprocess.PIPE)
        self.wait_until(lambda: waiter.pid in blocked_flock_waiters(), 20, "waiter blocked in flock()")
        held.release()
        got = int(self.read_line(waiter, "held", timeout=20).split()[1])
        self.assertGreater(got, held.fence)
        self.assertEqual(self.inode_of("handoff"), inode, "the hand-off must not need a new file")
        self.assertEqual(self.nf.holder("handoff").pid, waiter.pid)
        self.tell(waiter, "release")
        self.read_line(waiter, "released")
        self.tell(waiter, "exit")
        rc, _, err = self.finish(waiter)
        self.assertEqual(rc, 0, err)
        self.assert_lock_files_removed()


FORKER = """
    import os, sys, time, nodeflow
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"])
    mode, name = sys.argv[1], sys.argv[2]
    held = nf.lock(name)
    pid = os.fork()
    if pid == 0:  # the child: no exec
        if mode == "sleep":
            time.sleep(60)
            os._exit(0)
        if mode == "exit":
            sys.exit(0)  # an ordinary exit: the interpreter finalizes its objects, the HeldLock too
        try:
            with held:  # "with": the child leaves the parent's `with nf.lock(...)` block
                pass
        finally:
            os._exit(0)
    print("forked", pid, held.fence, flush=True)
    if mode != "sleep":
        os.waitpid(pid, 0)
        print("child-gone", flush=True)
    sys.stdin.readline()
    held.release()
    print("released", flush=True)
    sys.stdin.readline()
"""


class ForkedChildren(LockTestCase):
    def test_forked_child_does_not_keep_the_lock_after_the_parent_releases(self) -> None:
        parent = self.spawn_python(FORKER, "sleep", "forked", stdin=subprocess.PIPE)
        forked = int(self.read_line(parent, "forked").split()[1])
        self.extra_pids.append(forked)
        self.assertEqual(self.probe("forked"), ("busy", parent.pid))
        # A waiter already blocked on the file: the parent's release removes the file, so only a
        # lock on that very file (kept alive by the child's inherited descriptor) could hold it back.
        waiter = self.spawn_python(WAITER, "forked")
        self.read_line(waiter, "waiting")
        self.wait_until(lambda: waiter.pid in blocked_flock_waiters(), 20, "waiter blocked in flock()")
        self.tell(parent, "release")
        self.read_line(parent, "released")
        self.read_line(waiter, "got", timeout=15)
        self.assertTrue(alive(forked), "the forked child should still be sleeping")
        rc, _, err = self.finish(waiter)  # it has released the lock again
        self.assertEqual(rc, 0, err)
        word, _ = self.probe("forked", timeout=0)
        self.assertEqual(word, "got", "the forked child kept its parent's lock alive")
        self.assertTrue(alive(forked))

    def test_forked_child_does_not_keep_the_lock_after_the_parent_is_killed(self) -> None:
        parent = self.spawn_python(FORKER, "sleep", "forked", stdin=subprocess.PIPE)
        forked = int(self.read_line(parent, "forked").split()[1])
        self.extra_pids.append(forked)
        parent.kill()  # the lock file stays: only the child's inherited descriptor could still lock it
        parent.wait(timeout=10)
        self.assertTrue(alive(forked), "the forked child should still be sleeping")
        word, _ = self.probe("forked", timeout=0)
        self.assertEqual(word, "got", "the forked child kept its dead parent's lock alive")

    def test_forked_child_ending_does_not_free_the_parents_lock(self) -> None:
        for mode in ("exit", "with"):
            with self.subTest(mode=mode):
                name = f"forked-{mode}"
                parent = self.spawn_python(FORKER, mode, name, stdin=subprocess.PIPE)
                self.read_line(parent, "forked")
                self.read_line(parent, "child-gone")
                self.assertEqual(
                    self.probe(name),
                    ("busy", parent.pid),
                    "another process got the lock while the parent still held it",
                )
                self.assertEqual(self.nf.holder(name).pid, parent.pid)
                self.tell(parent, "release")
                self.read_line(parent, "released")
                self.assertEqual(self.probe(name)[0], "got")
                self.tell(parent)
                self.finish(parent)


class Holders(LockTestCase):
    def test_holder_and_held_show_another_process(self) -> None:
        self.assertIsNone(self.nf.holder("shown"))
        self.assertEqual(self.nf.held(), [])
        holder, fence = self.start_holder("shown")
        info = self.nf.holder("shown")
        self.assertEqual((info.name, info.pid, info.fence), ("shown", holder.pid, fence))
        self.assertEqual([(i.name, i.pid, i.fence) for i in self.nf.held()], [("shown", holder.pid, fence)])
        self.assertIsNone(self.nf.holder("other"))
        self.tell(holder, "release")
        self.read_line(holder, "released")
        self.assertIsNone(self.nf.holder("shown"))
        self.assertEqual(self.nf.held(), [])

    def test_reentrant_acquisition_raises_instead_of_deadlocking(self) -> None:
        child = self.spawn_python("""
            import os, nodeflow
            nf = nodeflow.connect(os.environ["NODEFLOW_DB"])
            with nf.lock("again") as held:
                try:
                    nf.lock("again")  # no time-out: a deadlock would hang here
                except nodeflow.LockTimeout:
                    print("timeout")
                except nodeflow.NodeflowError as error:
                    print("refused", held.held, error)
            with nf.lock("again", timeout=0) as held:  # free again afterwards
                print("again", held.fence)
        """)
        rc, out, err = self.finish(child, timeout=30)
        self.assertEqual(rc, 0, err)
        self.assertIn("refused True", out)
        self.assertIn("again ", out)

    def test_another_thread_of_the_same_process_is_excluded(self) -> None:
        outcome: list[object] = []
        with self.nf.lock("threads"):

            def other() -> None:
                try:
                    self.nf.lock("threads", timeout=0.2).release()
                    outcome.append("got")
                except nodeflow.LockTimeout as error:
                    outcome.append(error)

            thread = threading.Thread(target=other)
            thread.start()
            thread.join(20)
        self.assertEqual(len(outcome), 1)
        self.assertIsInstance(outcome[0], nodeflow.LockTimeout)


if __name__ == "__main__":
    unittest.main()
