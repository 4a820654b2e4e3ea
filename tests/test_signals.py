"""Instruction log, change tokens, memory cache and doorbells, checked across real processes.

A trigger, an append or a prune that must come from "another node" is made by a real child from
``spawn_python``; a blocked or dead listener is a real ``SIGSTOP``/``SIGKILL``; a deleted or full
doorbell is a real socket file removed or filled. What a test asserts is what the children print,
what the database holds and what ``PATH.d/nodes`` contains afterwards.

No timing assertions: every wait is bounded generously. Where a test must show that a doorbell
(not the poll) delivered, the listener's poll interval is 30 s and the wait is well under that.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import threading
import time
import unittest
from collections.abc import Callable

import nodeflow
from tests.support import ClusterTestCase, process_state

# A listener child: tokens for the given keys, each printing "fired KEY" from the listener thread.
# argv: poll interval, comma-separated keys, [node id]. It runs until its stdin closes.
TOKENS_CHILD = """
    import os, sys, nodeflow
    poll, keys = sys.argv[1], sys.argv[2].split(",")
    node = sys.argv[3] if len(sys.argv) > 3 else None
    nf = nodeflow.connect(node=node, settings=nodeflow.Settings(poll_interval=poll))
    tokens = [nf.token(key) for key in keys]  # kept referenced: a handle holds its tokens weakly
    for token in tokens:
        token.on_change(lambda tok: print("fired", tok.key, flush=True))
    print("ready", os.getpid(), nf.id, flush=True)
    sys.stdin.readline()
    nf.close()
"""

# Triggers each key of argv once, from a handle that never listens, and exits.
TRIGGER_CHILD = """
    import sys, nodeflow
    nf = nodeflow.connect()
    for key in sys.argv[1:]:
        nf.trigger(key)
    nf.close()
"""

# Appends COUNT instructions "PREFIX-n" of TOPIC, after GO exists if given. argv: topic prefix count [go]
APPEND_CHILD = """
    import os, sys, time, nodeflow
    topic, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    go = sys.argv[4] if len(sys.argv) > 4 else None
    nf = nodeflow.connect()
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while go and not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit("no start signal within 30 s")
        time.sleep(0.002)
    for n in range(count):
        nf.signals.append(topic, f"{prefix}-{n}")
    nf.close()
"""

# A named node that records every "work" payload it applies. Its main thread calls catch_up() in a
# loop while its listener thread applies the log too: both readers race, on purpose.
# argv: node expected. Prints "seq COLD_BOOTS JSON" once it has seen EXPECTED payloads.
RECORDER_CHILD = """
    import json, sys, time, nodeflow
    node, expected = sys.argv[1], int(sys.argv[2])
    nf = nodeflow.connect(node=node, settings=nodeflow.Settings(poll_interval=0.2))
    seen = []
    nf.signals.on_instruction("work", lambda topic, payload: seen.append(payload))
    keep = nf.token("unused")
    keep.wait(0)  # starts the listener thread
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while len(seen) < expected and time.monotonic() < deadline:
        nf.signals.catch_up()
        time.sleep(0.005)
    nf.signals.catch_up()  # one more: a duplicate or an extra would show now
    print("seq", nf.signals.cold_boots, json.dumps(seen), flush=True)
    sys.stdin.readline()
"""

# Waits for one token, by `await token` (argv[1] == "await") or token.wait() in a thread ("thread").
WAITER_CHILD = """
    import asyncio, os, sys, threading, nodeflow
    nf = nodeflow.connect(settings=nodeflow.Settings(poll_interval=30))
    token = nf.token("k")
    print("before", token.wait(0), flush=True)  # False; also starts the listener before "ready"
    if sys.argv[1] == "await":
        async def until_changed():
            return await token
        async def main():
            print("ready", flush=True)
            return await asyncio.wait_for(until_changed(), 20)
        print("awaited", asyncio.run(main()), token.changed, flush=True)
    else:
        result = []
        waiter = threading.Thread(target=lambda: result.append(token.wait(20)))
        waiter.start()
        print("ready", flush=True)
        waiter.join()
        print("waited", result[0], flush=True)
"""

# A token callback that makes the next token for the same key: a common way to keep watching.
REARM_CHILD = """
    import sys, nodeflow
    nf = nodeflow.connect(settings=nodeflow.Settings(poll_interval=0.5))
    held = []
    def changed(token):
        print("fired", len(held), flush=True)
        again = nf.token(token.key)  # from the listener thread, inside its catch-up
        held.append(again)
        again.on_change(changed)
        print("re-armed", len(held), flush=True)
    first = nf.token("k")
    held.append(first)
    first.on_change(changed)
    print("ready", flush=True)
    sys.stdin.readline()
"""

# A named node announces how many cold boots opening and reading the log took, logging to stderr.
COLD_START_CHILD = """
    import logging, sys, nodeflow
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    nf = nodeflow.connect(node=sys.argv[1])
    token = nf.token("k")  # reads the log: this is where a cold boot happens
    print("boots", nf.signals.cold_boots, token.changed, flush=True)
    nf.close()
"""

# A long-running named node with one cached entry and one token nobody triggers; it reports once
# that token fires (only a cold boot can fire it), then rebuilds the entry.
COLD_LIVE_CHILD = """
    import logging, sys, threading, nodeflow
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    nf = nodeflow.connect(node=sys.argv[1])
    calls = []
    def build():
        calls.append(1)
        return len(calls)
    nf.cache.get_or_create("entry", build, tokens=("defs",))
    fired = threading.Event()
    untouched = nf.token("untouched")
    untouched.on_change(lambda token: fired.set())
    print("ready", nf.signals.cold_boots, len(nf.cache), flush=True)
    if not fired.wait(30):
        sys.exit("the untouched token did not fire within 30 s")
    print("after", nf.signals.cold_boots, len(nf.cache), "entry" in nf.cache, flush=True)
    nf.cache.get_or_create("entry", build, tokens=("defs",))
    print("calls", len(calls), flush=True)
    sys.stdin.readline()
    nf.close()
"""

# A listener started under umask 0, so that only nodeflow's own chmod keeps its files private.
UMASK_CHILD = """
    import os, sys, nodeflow
    os.umask(0)
    nf = nodeflow.connect(node="private")
    token = nf.token("k")
    token.wait(0)
    print("ready", flush=True)
    sys.stdin.readline()
"""


class SignalTestCase(ClusterTestCase):
    """ClusterTestCase plus helpers for listener children, the nodes folder and the database."""

    def setUp(self) -> None:
        super().setUp()
        self.nodes = os.path.join(self.db + ".d", "nodes")
        self.handles: list[nodeflow.Cluster] = []

    def tearDown(self) -> None:
        # Close before the base class removes the folder: a listener is woken through its own
        # doorbell file, and without it close() would wait out a whole poll interval.
        try:
            for nf in self.handles:
                nf.close()
        finally:
            super().tearDown()

    def connect(self, **options: object) -> nodeflow.Cluster:
        nf = nodeflow.connect(self.db, **options)
        self.handles.append(nf)
        return nf

    def start_listener(self, poll: float, keys: str, node: str | None = None) -> tuple[subprocess.Popen, int, str]:
        """A TOKENS_CHILD that is listening: (child, pid, node id)."""
        child = self.spawn_python(TOKENS_CHILD, str(poll), keys, *([node] if node else []), stdin=subprocess.PIPE)
        _, pid, node_id = self.read_line(child, "ready ").split()
        return child, int(pid), node_id

    def trigger_elsewhere(self, *keys: str) -> None:
        """Trigger the keys from another process, and return once it has exited."""
        rc, _, err = self.finish(self.spawn_python(TRIGGER_CHILD, *keys))
        self.assertEqual(rc, 0, err)

    def append_elsewhere(self, topic: str, prefix: str, count: int) -> None:
        rc, _, err = self.finish(self.spawn_python(APPEND_CHILD, topic, prefix, str(count)))
        self.assertEqual(rc, 0, err)

    def query(self, sql: str, *params: object) -> list[tuple]:
        """Rows straight from the database file, through a connection nodeflow does not own."""
        with contextlib.closing(sqlite3.connect(self.db, timeout=30)) as conn:
            return conn.execute(sql, params).fetchall()

    def horizon(self) -> int:
        rows = self.query("SELECT value FROM meta WHERE key = 'instructions_pruned_through'")
        return int(rows[0][0]) if rows else 0

    def node_files(self) -> list[str]:
        try:
            return sorted(os.listdir(self.nodes))
        except FileNotFoundError:
            return []

    def stop(self, pid: int) -> None:
        """SIGSTOP, and wait until the kernel shows the process stopped."""
        os.kill(pid, signal.SIGSTOP)
        self.wait_until(lambda: process_state(pid) == "T", 10, f"process {pid} stopped")
        self.addCleanup(self._resume_if_stopped, pid)

    @staticmethod
    def _resume_if_stopped(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def kill(self, child: subprocess.Popen) -> None:
        child.kill()
        child.wait(timeout=10)


# 1. Fan-out ----------------------------------------------------------------------------------


class TokenFanOut(SignalTestCase):
    def test_trigger_fires_tokens_in_three_other_processes_by_doorbell(self) -> None:
        # A 30 s poll interval: only a doorbell explains delivery within the 10 s waits below.
        children = [self.start_listener(30, "k,other,done")[0] for _ in range(3)]
        nf = self.connect()
        own = nf.token("k")
        nf.trigger("k")
        self.assertTrue(own.changed, "the triggering handle's own token fires at once")
        for child in children:
            self.assertEqual(self.read_line(child, "fired ", timeout=10), "fired k")
        # The next token to fire in each child is "done": "other" was never triggered.
        nf.trigger("done")
        for child in children:
            self.assertEqual(self.read_line(child, "fired ", timeout=10), "fired done")

    def test_await_token_in_asyncio_child(self) -> None:
        child = self.spawn_python(WAITER_CHILD, "await")
        self.assertEqual(self.read_line(child, "before "), "before False")
        self.read_line(child, "ready")
        self.trigger_elsewhere("other")  # not the awaited key: the await must go on
        self.trigger_elsewhere("k")
        self.assertEqual(self.read_line(child, "awaited ", timeout=10), "awaited True True")

    def test_wait_in_a_thread(self) -> None:
        child = self.spawn_python(WAITER_CHILD, "thread")
        self.assertEqual(self.read_line(child, "before "), "before False")
        self.read_line(child, "ready")
        self.trigger_elsewhere("k")
        self.assertEqual(self.read_line(child, "waited ", timeout=10), "waited True")

    def test_callback_may_make_a_new_token(self) -> None:
        # Re-arming from the callback (nf.token in the listener thread) must not hang the listener.
        child = self.spawn_python(REARM_CHILD, stdin=subprocess.PIPE)
        self.read_line(child, "ready")
        self.trigger_elsewhere("k")
        self.assertEqual(self.read_line(child, "fired ", timeout=10), "fired 1")
        self.assertEqual(self.read_line(child, "re-armed ", timeout=5), "re-armed 2")
        self.trigger_elsewhere("k")
        self.assertEqual(self.read_line(child, "fired ", timeout=10), "fired 2")


# 2. Exact .changed ---------------------------------------------------------------------------


class ExactChanged(SignalTestCase):
    def test_changed_reads_the_log_without_a_listener(self) -> None:
        nf = self.connect()
        token = nf.token("k")
        unrelated = nf.token("j")
        self.assertFalse(token.changed)
        self.trigger_elsewhere("k")
        # No wait: the child has exited, its trigger is committed, .changed reads the log.
        self.assertTrue(token.changed)
        self.assertFalse(unrelated.changed)
        self.assertEqual(self.node_files(), [], "nobody listened, so no doorbell was made")

    def test_token_made_after_a_trigger_is_not_fired_by_it(self) -> None:
        nf = self.connect()
        before = nf.token("k")
        self.trigger_elsewhere("k")
        after = nf.token("k")
        self.assertTrue(before.changed)
        self.assertFalse(after.changed)
        self.trigger_elsewhere("k")
        self.assertTrue(after.changed)


# 3. Skip own, order, once, resume ------------------------------------------------------------


class InstructionLog(SignalTestCase):
    def test_own_instructions_are_not_applied_again(self) -> None:
        nf = self.connect()
        seen: list[object] = []
        nf.signals.on_instruction("t", lambda topic, payload: seen.append(payload))
        fired: list[str] = []
        own = nf.token("own")
        own.on_change(lambda token: fired.append(token.key))
        nf.signals.append("t", "mine")
        nf.trigger("own")
        self.append_elsewhere("t", "theirs", 1)
        nf.signals.catch_up()
        self.assertEqual(seen, ["theirs-0"])
        self.assertEqual(fired, ["own"], "an own trigger fires once, at once, never again from the log")

    def test_concurrent_appends_applied_in_order_once_and_resumed_after_restart(self) -> None:
        recorder = self.spawn_python(RECORDER_CHILD, "rec", "200", stdin=subprocess.PIPE)
        self.read_line(recorder, "ready")
        go = os.path.join(self.dir, "go")
        appenders = [self.spawn_python(APPEND_CHILD, "work", prefix, "100", go) for prefix in ("a", "b")]
        for appender in appenders:
            self.read_line(appender, "ready")
        with open(go, "w"):
            pass
        for appender in appenders:
            rc, _, err = self.finish(appender)
            self.assertEqual(rc, 0, err)

        logged = [json.loads(p) for (p,) in self.query("SELECT payload FROM instructions ORDER BY id")]
        self.assertEqual(sorted(logged), sorted([f"a-{n}" for n in range(100)] + [f"b-{n}" for n in range(100)]))
        _, boots, seq = self.read_line(recorder, "seq ", timeout=30).split(" ", 2)
        self.assertEqual(json.loads(seq), logged, "every instruction, in id order, once")
        self.assertEqual(boots, "1", "a named node's first start is a cold boot (never synced)")

        # SIGKILL once its cursor is in the database: nothing is closed or flushed on the way out.
        last = self.query("SELECT MAX(id) FROM instructions")[0][0]
        self.wait_until(
            lambda: self.query("SELECT position FROM instruction_cursors WHERE node = 'rec'") == [(last,)],
            20,
            "recorder's cursor persisted",
        )
        self.kill(recorder)
        self.append_elsewhere("work", "c", 20)

        again = self.spawn_python(RECORDER_CHILD, "rec", "20", stdin=subprocess.PIPE)
        _, boots, seq = self.read_line(again, "seq ", timeout=30).split(" ", 2)
        self.assertEqual(json.loads(seq), [f"c-{n}" for n in range(20)], "only what it missed, in order")
        self.assertEqual(boots, "0", "a node that synced resumes from its cursor, without a cold boot")


# 4. Pruning ----------------------------------------------------------------------------------


class Pruning(SignalTestCase):
    def ids(self) -> list[int]:
        return [row[0] for row in self.query("SELECT id FROM instructions ORDER BY id")]

    def test_the_appender_prunes_by_count(self) -> None:
        nf = self.connect(settings=nodeflow.Settings(instruction_max_count=50))
        for n in range(300):
            nf.signals.append("t", n)
        first_horizon = self.horizon()
        for n in range(300):
            last = nf.signals.append("t", n)
        ids = self.ids()
        self.assertGreater(first_horizon, 0)
        self.assertGreater(self.horizon(), first_horizon, "the horizon rises with each prune")
        self.assertLessEqual(len(ids), 50 + nodeflow.PRUNE_EVERY)
        self.assertGreaterEqual(len(ids), 50)
        self.assertEqual(ids, list(range(self.horizon() + 1, last + 1)), "only a prefix is deleted")

    def test_prune_by_count(self) -> None:
        nf = self.connect()
        self.append_elsewhere("t", "x", 40)
        newest = self.ids()[-1]
        self.assertEqual(nf.prune_instructions(max_count=10), 30)
        self.assertEqual(self.ids(), list(range(newest - 9, newest + 1)))
        self.assertEqual(self.horizon(), newest - 10)
        self.assertEqual(nf.prune_instructions(max_count=10), 0, "nothing more to prune")

    def test_prune_by_age(self) -> None:
        nf = self.connect()
        self.append_elsewhere("t", "x", 5)
        self.assertEqual(nf.prune_instructions(max_age=3600), 0, "nothing is an hour old")
        self.assertEqual(len(self.ids()), 5)
        self.assertEqual(nf.prune_instructions(max_age=0), 5)
        self.assertEqual(self.ids(), [])
        self.assertEqual(self.horizon(), 5)
        number = nf.signals.append("t", "later")
        self.assertGreater(number, 5, "ids go on above the horizon after the log was emptied")
        self.assertEqual(nf.prune_instructions(max_age="0s"), 1)
        self.assertEqual(self.horizon(), number)


# 5. Cold boot --------------------------------------------------------------------------------


class ColdBoot(SignalTestCase):
    def cold_start(self) -> tuple[str, str]:
        rc, out, err = self.finish(self.spawn_python(COLD_START_CHILD, "n1"))
        self.assertEqual(rc, 0, err)
        return out.strip(), err

    def test_named_node_cold_boots_when_never_synced_or_behind_the_horizon(self) -> None:
        out, err = self.cold_start()
        self.assertEqual(out, "boots 1 False")
        self.assertIn("nodeflow WARNING node n1: cold boot (it has never synced)", err)

        out, err = self.cold_start()
        self.assertEqual(out, "boots 0 False", "its cursor was saved: no second cold boot")
        self.assertNotIn("cold boot", err)

        nf = self.connect()
        self.append_elsewhere("t", "x", 3)
        self.assertEqual(nf.prune_instructions(max_age=0), 3)
        out, err = self.cold_start()
        self.assertEqual(out, "boots 1 False")
        self.assertIn("nodeflow WARNING node n1: cold boot (its cursor 0 is behind the pruned horizon 3)", err)

    def test_live_node_behind_the_horizon_drops_its_cache_and_fires_its_tokens(self) -> None:
        child = self.spawn_python(COLD_LIVE_CHILD, "n1", stdin=subprocess.PIPE)
        self.assertEqual(self.read_line(child, "ready "), "ready 1 1")
        # While it cannot read, the log moves on and is pruned past its cursor.
        self.stop(child.pid)
        nf = self.connect()
        self.append_elsewhere("t", "x", 3)
        self.assertEqual(nf.prune_instructions(max_age=0), 3)
        os.kill(child.pid, signal.SIGCONT)
        self.assertEqual(self.read_line(child, "after ", timeout=15), "after 2 0 False")
        self.assertEqual(self.read_line(child, "calls "), "calls 2", "the entry is built again")
        rc, _, err = self.finish(child)  # closes its stdin: it closes its handle and exits
        self.assertEqual(rc, 0, err)
        self.assertIn("node n1: cold boot (its cursor 0 is behind the pruned horizon 3)", err)


# 6. MemoryCache ------------------------------------------------------------------------------


class MemoryCacheTests(SignalTestCase):
    def counting_factory(self) -> tuple[list[int], Callable[[], int]]:
        calls: list[int] = []

        def build() -> int:
            calls.append(1)
            return len(calls)

        return calls, build

    def test_get_or_create_caches(self) -> None:
        nf = self.connect()
        calls, build = self.counting_factory()
        self.assertEqual(nf.cache.get_or_create("k", build, tokens=("defs",)), 1)
        self.assertEqual(nf.cache.get_or_create("k", build, tokens=("defs",)), 1)
        self.assertEqual(len(calls), 1)
        self.assertIn("k", nf.cache)
        self.assertEqual(len(nf.cache), 1)

    def test_entry_evicted_when_its_token_is_triggered_elsewhere(self) -> None:
        nf = self.connect()
        calls, build = self.counting_factory()
        nf.cache.get_or_create("k", build, tokens=("defs",))
        self.trigger_elsewhere("unrelated")
        self.wait_until(lambda: nf.signals.applied >= 1, 15, "the listener applied the unrelated trigger")
        self.assertEqual(nf.cache.get_or_create("k", build, tokens=("defs",)), 1, "another key evicts nothing")
        self.trigger_elsewhere("defs")
        # The listener evicts on its own: nobody here reads the log or the entry meanwhile.
        self.wait_until(lambda: len(nf.cache) == 0, 15, "entry evicted by the listener")
        self.assertEqual(nf.cache.get_or_create("k", build, tokens=("defs",)), 2)
        self.assertEqual(len(calls), 2)

    def test_ttl_expiry(self) -> None:
        nf = self.connect()
        calls, build = self.counting_factory()
        nf.cache.get_or_create("long", build, ttl=3600)
        self.assertEqual(nf.cache.get_or_create("long", build, ttl=3600), 1)
        short_calls, short = self.counting_factory()
        nf.cache.get_or_create("short", short, ttl="200ms")
        self.wait_until(lambda: "short" not in nf.cache, 10, "short entry expired")
        self.assertEqual(nf.cache.get_or_create("short", short, ttl="200ms"), 2)
        self.assertEqual((len(calls), len(short_calls)), (1, 2))

    def test_change_while_the_factory_runs_is_not_cached(self) -> None:
        nf = self.connect()
        calls: list[int] = []

        def build() -> str:
            calls.append(1)
            if len(calls) == 1:
                self.trigger_elsewhere("defs")
                nf.signals.catch_up()  # applied now, in order, while this factory is still running
            return f"v{len(calls)}"

        self.assertEqual(nf.cache.get_or_create("k", build, tokens=("defs",)), "v1")
        self.assertEqual(len(nf.cache), 0, "not even stored")  # before `in`, which would evict a stale entry
        self.assertNotIn("k", nf.cache)
        self.assertEqual(nf.cache.get_or_create("k", build, tokens=("defs",)), "v2")
        self.assertEqual(nf.cache.get_or_create("k", build, tokens=("defs",)), "v2", "unchanged: cached now")
        self.assertEqual(len(calls), 2)


# 7. Doorbells --------------------------------------------------------------------------------


class Doorbells(SignalTestCase):
    def test_deleted_doorbells_fall_back_to_the_poll(self) -> None:
        children = [self.start_listener(0.5, "k")[0] for _ in range(2)]
        sockets = [name for name in self.node_files() if name.endswith(".sock")]
        self.assertEqual(len(sockets), 2)
        for name in sockets:
            os.unlink(os.path.join(self.nodes, name))
        nf = self.connect()
        nf.trigger("k")
        self.assertEqual(nf.doorbells.rings_sent, 0, "no doorbell left to ring")
        for child in children:
            self.assertEqual(self.read_line(child, "fired ", timeout=5), "fired k")

    def test_a_stopped_target_blocks_neither_the_ringer_nor_the_others(self) -> None:
        stopped, stopped_pid, _ = self.start_listener(30, "k,late")
        awake, _, _ = self.start_listener(30, "k,late")
        self.stop(stopped_pid)
        nf = self.connect()
        finished = threading.Event()

        def ring_a_lot() -> None:
            for _ in range(100):  # far more rings than a datagram queue holds (net.unix.max_dgram_qlen)
                nf.trigger("k")
            nf.trigger("late")
            finished.set()

        ringer = threading.Thread(target=ring_a_lot, daemon=True)
        ringer.start()
        ringer.join(60)
        self.assertTrue(finished.is_set(), "triggers hung on a stopped listener's doorbell")
        # 30 s poll: a doorbell still reaches the awake listener once the stopped one's queue is full.
        self.assertEqual(self.read_line(awake, "fired ", timeout=10), "fired k")
        self.assertEqual(self.read_line(awake, "fired ", timeout=10), "fired late")
        os.kill(stopped_pid, signal.SIGCONT)
        fired = {self.read_line(stopped, "fired ", timeout=10) for _ in range(2)}
        self.assertEqual(fired, {"fired k", "fired late"})

    def test_a_lost_ring_is_made_up_by_the_poll_while_queue_rings_keep_coming(self) -> None:
        child, pid, node_id = self.start_listener(0.5, "k")
        nf = self.connect()
        self.stop(pid)
        # What a burst of queue rings leaves behind while a node is stopped: a full datagram queue.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as ringer:
            for _ in range(10_000):
                try:
                    ringer.sendto(b"q:jobs", os.path.join(self.nodes, f"{node_id}.sock"))
                except BlockingIOError:
                    break
            else:
                self.fail("the doorbell's queue never filled")
        nf.trigger("k")
        self.assertEqual(nf.doorbells.rings_sent, 0, "the instruction ring was lost: the queue is full")
        os.kill(pid, signal.SIGCONT)
        # A busy queue keeps ringing, faster than the 0.5 s poll interval; the token must still fire.
        done = threading.Event()

        def keep_sending() -> None:
            deadline = time.monotonic() + 8
            while not done.is_set() and time.monotonic() < deadline:
                nf.send("jobs", "work")
                time.sleep(0.1)

        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        try:
            self.assertEqual(self.read_line(child, "fired ", timeout=6), "fired k")
        finally:
            done.set()
            sender.join(15)

    def test_a_ring_removes_a_killed_listeners_files(self) -> None:
        child, _, node_id = self.start_listener(30, "k")
        self.kill(child)
        leftovers = [f"{node_id}.lock", f"{node_id}.sock"]
        self.assertEqual(self.node_files(), leftovers, "SIGKILL leaves the doorbell behind")
        nf = self.connect()
        nf.trigger("k")
        self.assertEqual(self.node_files(), [])

    def test_a_new_listener_removes_dead_doorbells_but_not_stopped_ones(self) -> None:
        dead, _, dead_id = self.start_listener(30, "k")
        stopped, stopped_pid, stopped_id = self.start_listener(30, "k")
        self.kill(dead)
        self.stop(stopped_pid)
        nf = self.connect()
        nf.token("k").wait(0)  # starts this handle's listener
        files = self.node_files()
        self.assertNotIn(f"{dead_id}.sock", files)
        self.assertNotIn(f"{dead_id}.lock", files)
        self.assertIn(f"{stopped_id}.sock", files, "a stopped node is alive: its doorbell stays")
        self.assertIn(f"{nf.id}.sock", files)
        nf.trigger("k")  # a ring to a stopped node is not refused either
        self.assertIn(f"{stopped_id}.sock", self.node_files())
        os.kill(stopped_pid, signal.SIGCONT)
        self.assertEqual(self.read_line(stopped, "fired ", timeout=10), "fired k")

    def test_a_live_node_id_is_refused_then_free_once_its_holder_is_killed(self) -> None:
        child, pid, _ = self.start_listener(30, "k", node="n1")
        nf = self.connect(node="n1")
        token = nf.token("k")
        with self.assertRaises(nodeflow.NodeflowError) as caught:
            token.wait(0)
        self.assertIn(f"pid {pid}", str(caught.exception))
        self.kill(child)
        self.assertFalse(token.wait(0))  # at once: the kernel freed the liveness lock with the process
        with open(os.path.join(self.nodes, "n1.lock")) as lock:
            self.assertEqual(lock.read().strip(), str(os.getpid()))
        self.assertIn("n1.sock", self.node_files())


# 8. Idle -------------------------------------------------------------------------------------


class IdleListener(SignalTestCase):
    @staticmethod
    def cpu_ticks(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))

    def test_an_idle_listener_uses_little_cpu(self) -> None:
        child, pid, _ = self.start_listener(1, "k")
        time.sleep(0.5)  # past start-up
        before = self.cpu_ticks(pid)
        time.sleep(3)
        used = (self.cpu_ticks(pid) - before) / os.sysconf("SC_CLK_TCK")
        self.assertLess(used, 0.05 * 3, f"an idle listener used {used:.2f} s of CPU in 3 s")
        self.assertIsNone(child.poll())


# 9. Files ------------------------------------------------------------------------------------


class NodeFiles(SignalTestCase):
    def test_doorbell_files_are_private_even_under_umask_0(self) -> None:
        child = self.spawn_python(UMASK_CHILD, stdin=subprocess.PIPE)
        self.read_line(child, "ready")
        self.assertEqual(stat.S_IMODE(os.stat(self.nodes).st_mode), 0o700)
        self.assertEqual(self.node_files(), ["private.lock", "private.sock"], "no temporary socket left")
        sock = os.stat(os.path.join(self.nodes, "private.sock"))
        lock = os.stat(os.path.join(self.nodes, "private.lock"))
        self.assertTrue(stat.S_ISSOCK(sock.st_mode))
        self.assertEqual(sock.st_mode & 0o077, 0, oct(sock.st_mode))
        self.assertEqual(lock.st_mode & 0o077, 0, oct(lock.st_mode))

    def test_a_handle_that_never_listens_makes_no_node_files(self) -> None:
        nf = self.connect()
        token = nf.token("k")
        nf.trigger("k")
        nf.signals.append("t", 1)
        nf.send("jobs", 1)
        self.assertIsNotNone(nf.receive("jobs"))
        self.assertTrue(token.changed)
        nf.prune_instructions(max_age=0)
        self.assertFalse(os.path.exists(self.nodes), self.node_files())
        # With a listener elsewhere the folder exists, and holds only that listener's two files.
        _, _, node_id = self.start_listener(30, "k")
        nf.trigger("k")
        self.assertEqual(self.node_files(), [f"{node_id}.lock", f"{node_id}.sock"])


if __name__ == "__main__":
    unittest.main()
