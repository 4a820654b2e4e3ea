"""The chaos run (tests/chaos.py), short: 30 s of kills, stops and restarts under load, then the checker.

- The run itself, with a random seed (printed; NODEFLOW_TEST_SEED replays its choices): exit 0, no
  invariant violated, and the faults, instances, messages, timers and locks really happened.
- The checker can fail: each invariant is shown a doctored copy of the run's finished database (a
  step committed twice, two steps at once, a message received twice, a timer that never fired, a
  lost instance, two lock holders at once, an epoch claimed twice, ...) and must report it.

`make chaos` runs the long version (python3 tests/chaos.py --seconds 120).
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest
from collections.abc import Callable
from typing import Any

from tests import chaos
from tests.support import PYTHON, ROOT

SECONDS = 30
RUN_TIMEOUT = 240  # the run takes about 40 s; this bound is for a hang


class ChaosRun(unittest.TestCase):
    report: dict[str, Any] | None
    done: subprocess.CompletedProcess[str]

    @classmethod
    def setUpClass(cls) -> None:
        cls.seed = int(os.environ.get("NODEFLOW_TEST_SEED") or random.randrange(2**32))
        print(f"\n  chaos seed {cls.seed} [NODEFLOW_TEST_SEED={cls.seed}] (rerun: python3 tests/chaos.py "
              f"--seed {cls.seed} --seconds {SECONDS})", file=sys.stderr, flush=True)
        cls.dir = tempfile.mkdtemp(prefix="nodeflow-test-chaos-")
        cls.folder = os.path.join(cls.dir, "run")
        began = time.monotonic()
        cls.done = subprocess.run(
            [PYTHON, os.path.join(ROOT, "tests", "chaos.py"), "--seconds", str(SECONDS), "--seed", str(cls.seed),
             "--keep", cls.folder, "--json"],
            capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT,
        )
        try:
            cls.report = json.loads(cls.done.stdout)
        except ValueError:
            cls.report = None
        print(f"  chaos run: exit {cls.done.returncode} in {time.monotonic() - began:.0f} s", file=sys.stderr)
        cls.failed = False

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.failed:
            print(f"  the chaos run's folder is kept: {cls.folder}", file=sys.stderr)
        else:
            shutil.rmtree(cls.dir, ignore_errors=True)

    def run(self, result: unittest.TestResult | None = None) -> unittest.TestResult | None:
        result = super().run(result)
        # A failed subTest is listed under its _SubTest, whose test_case is this test.
        if result is not None and any(getattr(case, "test_case", case) is self
                                      for case, _ in [*result.failures, *result.errors]):
            type(self).failed = True
        return result

    def output(self) -> str:
        return f"seed {self.seed}; the run's output:\n{self.done.stderr[-20000:]}"

    # The run ------------------------------------------------------------------------------

    def test_nothing_is_lost_and_nothing_runs_twice_while_nodes_are_killed_stopped_and_restarted(self) -> None:
        self.assertIsNotNone(self.report, f"no JSON report on stdout {self.done.stdout[-2000:]!r}; {self.output()}")
        assert self.report is not None
        violated = {item["key"]: item["evidence"][:5] for item in self.report["invariants"] if item["violations"]}
        self.assertEqual(violated, {}, f"invariants violated; {self.output()}")
        self.assertEqual(self.done.returncode, 0, self.output())
        self.assertTrue(self.report["ok"])
        # The chaos really happened, and the workload really ran through it.
        summary = self.report["summary"]
        faults = summary["faults"]
        self.assertGreaterEqual(sum(faults.get(kind, 0) for kind in ("kill", "stop", "term", "restart")), 8, faults)
        self.assertGreaterEqual(faults.get("of which the scheduler", 0), 1, faults)
        self.assertTrue(summary["settled"], self.output())
        self.assertGreater(summary["instances"]["total"], 30, summary["instances"])
        self.assertGreater(summary["instances"].get("faulted on purpose", 0), 0, summary["instances"])
        self.assertGreater(summary["messages"]["received once"], 30, summary["messages"])
        self.assertGreater(summary["timers"]["one-shot fired"], 30, summary["timers"])
        self.assertGreater(summary["locks"]["holds"], 10, summary["locks"])
        self.assertGreater(summary["scheduler"]["terms"], 1, summary["scheduler"])
        self.assertGreater(len(summary["instances"]["by version"]), 3, summary["instances"])
        checked = {item["key"]: item["checked"] for item in self.report["invariants"]}
        self.assertEqual([key for key, count in checked.items() if key != "cron" and count == 0], [], checked)

    # The checker --------------------------------------------------------------------------

    def doctored(self, doctor: Callable[[sqlite3.Connection, str], list[str]]) -> dict[str, chaos.Invariant]:
        """Check a copy of the run's database after ``doctor(conn, folder)`` changed it; the doctor
        may return extra log files to check along with the nodes' own."""
        folder = tempfile.mkdtemp(dir=self.dir, prefix="doctored-")
        copy = os.path.join(folder, "chaos.db")
        source = sqlite3.connect(os.path.join(self.folder, "chaos.db"))
        target = sqlite3.connect(copy, isolation_level=None)
        try:
            source.backup(target)  # SQLite's own copy: never open() a database file by hand
            target.execute("BEGIN")
            extra = doctor(target, folder)
            target.execute("COMMIT")
        finally:
            target.close()
            source.close()
        logs = sorted(glob.glob(os.path.join(self.folder, "logs", "*.log"))) + extra
        return {item.key: item for item in chaos.check(copy, logs)[0]}

    def assert_reported(self, invariant: str, doctor: Callable[[sqlite3.Connection, str], list[str]], why: str) -> None:
        baseline = {item.key: len(item.violations) for item in self.baseline()}
        found = self.doctored(doctor)
        self.assertGreater(
            len(found[invariant].violations), baseline[invariant], f"{why}: not reported under [{invariant}]"
        )
        print(f"  [{invariant}] {why}: {found[invariant].violations[-1].splitlines()[0][:150]}", file=sys.stderr)

    def baseline(self) -> list[chaos.Invariant]:
        if not hasattr(type(self), "_baseline"):
            logs = sorted(glob.glob(os.path.join(self.folder, "logs", "*.log")))
            type(self)._baseline = chaos.check(os.path.join(self.folder, "chaos.db"), logs)[0]
        return type(self)._baseline  # type: ignore[no-any-return]

    def test_the_checker_reports_each_kind_of_doctored_evidence(self) -> None:
        if not os.path.exists(os.path.join(self.folder, "chaos.db")):
            self.skipTest(f"the run left no database; {self.output()}")
        # The run's own database checks as the run did (unless the run itself found violations).
        if self.report is not None and self.report["ok"]:
            self.assertEqual({item.key: item.violations for item in self.baseline() if item.violations}, {})
        for invariant, why, doctor in DOCTORS:
            with self.subTest(invariant=invariant, why=why):
                self.assert_reported(invariant, doctor, why)


# The doctors: each changes a copy of a finished run's database as a bug would have ---------------


def one(conn: sqlite3.Connection, sql: str, *args: Any) -> tuple[Any, ...]:
    row = conn.execute(sql, args).fetchone()
    if row is None:
        raise unittest.SkipTest(f"the run has no row for: {sql}")
    return tuple(row)


def completed_a(conn: sqlite3.Connection) -> str:
    """A completed chaos-a instance that ran both of its calls."""
    return str(one(conn, "SELECT id FROM instances WHERE definition = 'chaos-a' AND status = 'completed' "
                         "ORDER BY id LIMIT 1")[0])


def step_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """Its charge step committed twice: the journal has the row again right after it."""
    instance = completed_a(conn)
    rows = conn.execute("SELECT * FROM journal WHERE instance = ? ORDER BY step", (instance,)).fetchall()
    at = next(index for index, row in enumerate(rows) if row[2] == "charge" and row[8].startswith("called"))
    rows = [*rows[: at + 1], rows[at], *rows[at + 1 :]]
    conn.execute("DELETE FROM journal WHERE instance = ?", (instance,))
    conn.executemany("INSERT INTO journal VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     [(row[0], step, *row[2:]) for step, row in enumerate(rows)])
    conn.execute("UPDATE instances SET steps = steps + 1 WHERE id = ?", (instance,))
    return []


def steps_overlap(conn: sqlite3.Connection, folder: str) -> list[str]:
    """Its first step still running when the second began (a kill between them may have left a gap)."""
    instance = completed_a(conn)
    conn.execute("UPDATE journal SET ended = (SELECT started + 0.001 FROM journal WHERE instance = ? AND step = 1) "
                 "WHERE instance = ? AND step = 0", (instance, instance))
    return []


def fence_falls(conn: sqlite3.Connection, folder: str) -> list[str]:
    """Its last burst ran under a fence lower than the burst before."""
    instance = completed_a(conn)
    conn.execute("UPDATE journal SET fence = 0 WHERE instance = ? AND fence = (SELECT MAX(fence) FROM journal "
                 "WHERE instance = ?)", (instance, instance))
    conn.execute("UPDATE instances SET fence = 0 WHERE id = ?", (instance,))
    return []


def timer_early(conn: sqlite3.Connection, folder: str) -> list[str]:
    """Its timer ended 50 ms before it was due."""
    instance = completed_a(conn)
    wait, = one(conn, "SELECT outcome FROM journal WHERE instance = ? AND activity = 'pause' AND outcome LIKE "
                      "'waiting until %'", instance)
    due = chaos._iso_seconds(wait[len("waiting until "):])
    conn.execute("UPDATE journal SET started = ?, ended = ? WHERE instance = ? AND activity = 'pause' AND "
                 "outcome = 'timer elapsed'", (due - 0.05, due - 0.05, instance))
    return []


def instance_stuck(conn: sqlite3.Connection, folder: str) -> list[str]:
    """An instance never finished: still running."""
    conn.execute("UPDATE instances SET status = 'running', ended = NULL WHERE id = ?", (completed_a(conn),))
    return []


def instance_lost(conn: sqlite3.Connection, folder: str) -> list[str]:
    """An instance started through the API or the command line is gone from the database. (A gone
    instance that a trigger started is a trigger that started none: trigger_twice's invariant.)"""
    instance = str(one(conn, "SELECT id FROM instances WHERE status = 'completed' AND 'instance:' || id IN "
                             "(SELECT key FROM chaos_sent WHERE kind = 'instance') ORDER BY id LIMIT 1")[0])
    conn.execute("DELETE FROM journal WHERE instance = ?", (instance,))
    conn.execute("DELETE FROM instances WHERE id = ?", (instance,))
    return []


def trigger_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """One trigger signal started two instances."""
    row = one(conn, "SELECT * FROM instances WHERE json_extract(variables, '$.input.via') = 'trigger' LIMIT 1")
    conn.execute(f"INSERT INTO instances VALUES ({', '.join('?' * len(row))})", ("f" * 16, *row[1:]))
    return []


def effect_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A call's effect recorded under a second key: the call ran twice as two different calls."""
    row = one(conn, "SELECT * FROM chaos_effects LIMIT 1")
    conn.execute(f"INSERT INTO chaos_effects VALUES ({', '.join('?' * len(row))})", (row[0] + "0", *row[1:]))
    return []


def effect_missing(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A committed call step whose call never ran."""
    conn.execute("DELETE FROM chaos_effects WHERE key = (SELECT key FROM chaos_effects LIMIT 1)")
    return []


def message_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A queue message's effect recorded twice (two acks of one message)."""
    conn.execute("UPDATE chaos_received SET count = 2 WHERE key = (SELECT key FROM chaos_received "
                 "WHERE key LIKE 'job:%' LIMIT 1)")
    return []


def message_lost(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A sent message neither received nor dead-lettered."""
    conn.execute("DELETE FROM chaos_received WHERE key = (SELECT key FROM chaos_received WHERE key LIKE 'job:%' "
                 "LIMIT 1)")
    return []


def timer_unfired(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A one-shot timer added, due, and never fired."""
    now = time.time()
    conn.execute("INSERT INTO timers (name, queue, body, due, created) VALUES ('ghost', 'chaos.timers', ?, ?, ?)",
                 (json.dumps({"timer": "ghost"}), now - 60, now - 61))
    conn.execute("INSERT INTO chaos_sent (key, kind, expect, detail, at) VALUES ('timer:ghost', 'timer', 'once', "
                 "'{}', ?)", (now - 61,))
    return []


def timer_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A one-shot timer fired for a second due time, and its second message was received."""
    name, due, fired, epoch, node, message = one(
        conn, "SELECT * FROM timer_firings WHERE name IN (SELECT substr(key, 7) FROM chaos_sent "
              "WHERE kind = 'timer') LIMIT 1")
    conn.execute("INSERT INTO timer_firings VALUES (?, ?, ?, ?, ?, ?)", (name, due + 0.5, fired + 0.5, epoch, node,
                                                                         message + 100000))
    return []


def cron_slot_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A cron timer fired twice in one minute slot (each firing's message received)."""
    slot = (int(time.time()) // 60 - 10) * 60
    epoch, node, since = one(conn, "SELECT epoch, node, since FROM elections ORDER BY epoch DESC LIMIT 1")
    for index, due in enumerate((slot, slot + 30)):
        message = 900000 + index
        conn.execute("INSERT INTO timer_firings VALUES ('chaos-cron-1', ?, ?, ?, ?, ?)",
                     (due, since + 1 + index, epoch, node, message))
        conn.execute("INSERT INTO chaos_received (key, queue, message, node, at, count, again) VALUES (?, "
                     "'chaos.cron', ?, ?, ?, 1, '[]')", (f"cron:chaos-cron-1:{message}", message, node, since + 2))
    return []


def epoch_claimed_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A second node logged taking office in an epoch that was another's."""
    (epoch,) = one(conn, "SELECT epoch FROM elections ORDER BY epoch LIMIT 1")
    path = os.path.join(folder, "n9-1.log")
    with open(path, "w") as log:
        log.write(f"12:00:00.000 n9 scheduler took office as the scheduling node (epoch {epoch})\n")
    return [path]


def firing_out_of_office(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A timer fired in an epoch that was over (a deposed scheduler firing)."""
    (first,) = one(conn, "SELECT MIN(epoch) FROM elections")
    # The last firing of a later term (the last term may have fired nothing), put in the first.
    name, due = one(conn, "SELECT name, due FROM timer_firings WHERE epoch > ? ORDER BY fired DESC LIMIT 1", first)
    conn.execute("UPDATE timer_firings SET epoch = ? WHERE name = ? AND due = ?", (first, name, due))
    return []


def start_on_old_version(conn: sqlite3.Connection, folder: str) -> list[str]:
    """The last instance started through the API is of version 1, though a later define returned before."""
    key, detail = one(conn, "SELECT key, detail FROM chaos_sent WHERE kind = 'instance' ORDER BY at DESC LIMIT 1")
    workflow, = one(conn, "SELECT definition FROM instances WHERE id = ?", key.split(":", 1)[1])
    later, = one(conn, "SELECT count(*) FROM chaos_sent WHERE kind = 'define' AND key LIKE ? AND key NOT LIKE ? "
                       "AND at < ?", f"define:{workflow}:%", f"define:{workflow}:1", json.loads(detail)["began"])
    if not later:
        raise unittest.SkipTest(f"no define of {workflow} after v1 before the last start")
    conn.execute("UPDATE instances SET version = 1 WHERE id = ?", (key.split(":", 1)[1],))
    return []


def stale_node(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A node still holding version 1 of chaos-a after the later defines, and another behind the
    instruction log (the checker skips dead nodes: the doctor picks live ones)."""
    (latest,) = one(conn, "SELECT MAX(version) FROM definitions WHERE id = 'chaos-a'")
    if latest < 2:
        raise unittest.SkipTest("chaos-a was defined once only")
    live = [row[0] for row in conn.execute("SELECT id FROM nodes WHERE state != 'dead' ORDER BY id")]
    if len(live) < 2:
        raise unittest.SkipTest(f"fewer than two nodes ended alive: {live}")
    conn.execute("UPDATE nodes SET blueprints = '{\"chaos-a\": 1}' WHERE id = ?", (live[0],))
    conn.execute("UPDATE instruction_cursors SET position = 1 WHERE node = ?", (live[1],))
    return []


def locks_overlap(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A second holder of a lock while the first still held it."""
    name, fence, started, ended = one(conn, "SELECT name, fence, started, ended FROM chaos_locks ORDER BY id LIMIT 1")
    conn.execute("INSERT INTO chaos_locks (name, fence, holder, started, ended) VALUES (?, ?, 'doctored', ?, ?)",
                 (name, fence + 100000, (started + ended) / 2, ended + 0.01))
    return []


def crash_logged(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A node log with a traceback."""
    path = os.path.join(folder, "n1-99.log")
    with open(path, "w") as log:
        log.write("12:00:00.000 n1 standby   joined\nTraceback (most recent call last):\n  File \"x\", line 1\n"
                  "ZeroDivisionError: division by zero\n")
    return [path]


DOCTORS: list[tuple[str, str, Callable[[sqlite3.Connection, str], list[str]]]] = [
    ("steps", "a journal step committed twice", step_twice),
    ("overlap", "two steps of one instance at once", steps_overlap),
    ("fences", "a burst under a lower fence than the one before", fence_falls),
    ("wf-timers", "a workflow timer elapsed early", timer_early),
    ("instances", "an instance stuck running", instance_stuck),
    ("instances", "a started instance lost", instance_lost),
    ("triggers", "a trigger signal that started two instances", trigger_twice),
    ("effects", "a call effect recorded twice", effect_twice),
    ("effects", "a committed call without its effect", effect_missing),
    ("messages", "a message effect recorded twice", message_twice),
    ("messages", "a message lost", message_lost),
    ("timers", "a one-shot timer never fired", timer_unfired),
    ("timers", "a one-shot timer fired twice", timer_twice),
    ("cron", "a cron slot fired twice", cron_slot_twice),
    ("epochs", "an epoch claimed by two nodes", epoch_claimed_twice),
    ("epochs", "a timer fired by a deposed scheduler", firing_out_of_office),
    ("versions", "a start after a define on the version before", start_on_old_version),
    ("nodes", "a node on a stale version and instruction", stale_node),
    ("locks", "two lock holders at once", locks_overlap),
    ("crashes", "a traceback in a node log", crash_logged),
]


if __name__ == "__main__":
    unittest.main()
