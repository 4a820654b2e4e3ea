"""The chaos run (tests/chaos.py), short: 30 s of kills, stops and restarts under load, with the
hostile mix (poison jobs, calls that end their process, handlers that block their thread or the
event loop, undecodable messages, a frozen scheduler) and the workflow features (kept signals,
start keys, child instances, timed waits) and the branches (parallel, join all and any; for_each
in parallel and in turn, nested in a branch), then the checker.

- The run itself, with a random seed (printed; NODEFLOW_TEST_SEED replays its choices): exit 0, no
  invariant violated, and the faults, instances, messages, timers, locks, the hostile mix and the
  workflow features really happened.
- The checker can fail: each invariant is shown a doctored copy of the run's finished database (a
  step committed twice, two steps at once, a message received twice, a timer that never fired, a
  lost instance, two lock holders at once, an epoch claimed twice, an innocent dead letter, a poison
  job that killed too many nodes, a stall nothing explains, a frozen scheduler replaced late, a
  start key with two instances, a kept signal's token in two instances, a child that ended after
  its parent went on, a timed wait both received and timed out, a branch step twice, two bursts
  at once, a join before a branch's last step, a for_each item that never ran, ...) and must
  report it.

`make chaos` runs the long version (python3 tests/chaos.py --seconds 120).
"""

from __future__ import annotations

import datetime
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
        print(
            f"\n  chaos seed {cls.seed} [NODEFLOW_TEST_SEED={cls.seed}] (rerun: python3 tests/chaos.py "
            f"--seed {cls.seed} --seconds {SECONDS})",
            file=sys.stderr,
            flush=True,
        )
        cls.dir = tempfile.mkdtemp(prefix="nodeflow-test-chaos-")
        cls.folder = os.path.join(cls.dir, "run")
        began = time.monotonic()
        cls.done = subprocess.run(
            [
                PYTHON,
                os.path.join(ROOT, "tests", "chaos.py"),
                "--seconds",
                str(SECONDS),
                "--seed",
                str(cls.seed),
                "--keep",
                cls.folder,
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            cwd=ROOT,
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
        if result is not None and any(
            getattr(case, "test_case", case) is self for case, _ in [*result.failures, *result.errors]
        ):
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
        # At least 6: a run that needs three freezes before a standby replaces one (each holds the other
        # faults off for the stall limit + 3.5 s) has about 10 s of its 30 left for the others.
        self.assertGreaterEqual(
            sum(faults.get(kind, 0) for kind in ("kill", "stop", "term", "restart", "freeze")), 6, faults
        )
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
        self.assertEqual(
            [key for key, count in checked.items() if key not in ("cron", "takeover") and count == 0], [], checked
        )
        # The hostile mix really happened, and ended as it should.
        hostile, blocking = summary["hostile"], summary["blocking"]
        self.assertGreaterEqual(hostile["poison jobs"], 1, hostile)
        self.assertGreaterEqual(hostile["nodes they ended"], 1, hostile)
        self.assertGreaterEqual(hostile["undecodable"], 2, hostile)
        self.assertGreaterEqual(
            summary["instances"].get("faulted on purpose (its call exits)", 0), 1, summary["instances"]
        )
        self.assertGreaterEqual(summary["instances"].get("cancelled on purpose", 0), 1, summary["instances"])
        self.assertGreaterEqual(blocking["thread runs"], 1, blocking)
        self.assertGreaterEqual(blocking["loop runs"], 1, blocking)
        self.assertGreaterEqual(faults.get("freeze", 0), 1, faults)
        self.assertGreaterEqual(faults.get("planned exits (restarted)", 0), 1, faults)
        # The workflow features really ran: kept signals taken, keys started from several places at once,
        # child instances, timed waits.
        kept, keys, children = summary["kept signals"], summary["start keys"], summary["children"]
        self.assertGreaterEqual(kept.get("taken by a waiter", 0), 1, kept)
        self.assertGreaterEqual(keys["keys"], 2, keys)
        self.assertGreater(keys["starts"], 2 * keys["keys"], keys)
        self.assertGreaterEqual(children.get("children", 0), 3, children)
        self.assertEqual(set(children["parents by mode"]), {"ok", "timed", "doom", "cancel"}, children)
        self.assertGreaterEqual(checked["timed-waits"], 3, checked)
        # The branches really ran: each definition completed, a join any removed branches (its
        # sleeper cancelled), for_each items ran in parallel and in turn.
        branches = summary["branches"]
        for workflow in ("chaos-fan", "chaos-race", "chaos-each", "chaos-turn"):
            self.assertGreaterEqual(branches.get(f"completed {workflow}", 0), 1, branches)
        self.assertGreaterEqual(branches.get("joins (any)", 0), 1, branches)
        self.assertGreaterEqual(branches.get("joins (parallel)", 0), 1, branches)
        self.assertGreaterEqual(branches.get("joins (turn)", 0), 2, branches)
        self.assertGreaterEqual(children.get("cancelled: a join any removed its branch", 0), 1, children)

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

# The journal's columns by name: it has more (a step's branch), which the doctors leave alone.
JOURNAL_COLUMNS = "instance, step, activity, type, node, fence, started, ended, outcome"


def one(conn: sqlite3.Connection, sql: str, *args: Any) -> tuple[Any, ...]:
    row = conn.execute(sql, args).fetchone()
    if row is None:
        raise unittest.SkipTest(f"the run has no row for: {sql}")
    return tuple(row)


def completed_a(conn: sqlite3.Connection) -> str:
    """A completed chaos-a instance that ran both of its calls."""
    return str(
        one(conn, "SELECT id FROM instances WHERE definition = 'chaos-a' AND status = 'completed' ORDER BY id LIMIT 1")[
            0
        ]
    )


def step_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """Its charge step committed twice: the journal has the row again right after it."""
    instance = completed_a(conn)
    rows = conn.execute(
        f"SELECT {JOURNAL_COLUMNS} FROM journal WHERE instance = ? ORDER BY step", (instance,)
    ).fetchall()
    at = next(index for index, row in enumerate(rows) if row[2] == "charge" and row[8].startswith("called"))
    rows = [*rows[: at + 1], rows[at], *rows[at + 1 :]]
    conn.execute("DELETE FROM journal WHERE instance = ?", (instance,))
    conn.executemany(
        f"INSERT INTO journal ({JOURNAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(row[0], step, *row[2:]) for step, row in enumerate(rows)],
    )
    conn.execute("UPDATE instances SET steps = steps + 1 WHERE id = ?", (instance,))
    return []


def steps_overlap(conn: sqlite3.Connection, folder: str) -> list[str]:
    """Its first step still running when the second began (a kill between them may have left a gap)."""
    instance = completed_a(conn)
    conn.execute(
        "UPDATE journal SET ended = (SELECT started + 0.001 FROM journal WHERE instance = ? AND step = 1) "
        "WHERE instance = ? AND step = 0",
        (instance, instance),
    )
    return []


def fence_falls(conn: sqlite3.Connection, folder: str) -> list[str]:
    """Its last burst ran under a fence lower than the burst before."""
    instance = completed_a(conn)
    conn.execute(
        "UPDATE journal SET fence = 0 WHERE instance = ? AND fence = (SELECT MAX(fence) FROM journal "
        "WHERE instance = ?)",
        (instance, instance),
    )
    conn.execute("UPDATE instances SET fence = 0 WHERE id = ?", (instance,))
    return []


def timer_early(conn: sqlite3.Connection, folder: str) -> list[str]:
    """Its timer ended 50 ms before it was due."""
    instance = completed_a(conn)
    (wait,) = one(
        conn,
        "SELECT outcome FROM journal WHERE instance = ? AND activity = 'pause' AND outcome LIKE 'waiting until %'",
        instance,
    )
    due = chaos._iso_seconds(wait[len("waiting until ") :])
    conn.execute(
        "UPDATE journal SET started = ?, ended = ? WHERE instance = ? AND activity = 'pause' AND "
        "outcome = 'timer elapsed'",
        (due - 0.05, due - 0.05, instance),
    )
    return []


def instance_stuck(conn: sqlite3.Connection, folder: str) -> list[str]:
    """An instance never finished: still running."""
    conn.execute("UPDATE instances SET status = 'running', ended = NULL WHERE id = ?", (completed_a(conn),))
    return []


def instance_lost(conn: sqlite3.Connection, folder: str) -> list[str]:
    """An instance started through the API or the command line is gone from the database. (A gone
    instance that a trigger started is a trigger that started none: trigger_twice's invariant.)"""
    instance = str(
        one(
            conn,
            "SELECT id FROM instances WHERE status = 'completed' AND 'instance:' || id IN "
            "(SELECT key FROM chaos_sent WHERE kind = 'instance') ORDER BY id LIMIT 1",
        )[0]
    )
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
    conn.execute(
        "UPDATE chaos_received SET count = 2 WHERE key = (SELECT key FROM chaos_received "
        "WHERE key LIKE 'job:%' LIMIT 1)"
    )
    return []


def message_lost(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A sent message neither received nor dead-lettered."""
    conn.execute(
        "DELETE FROM chaos_received WHERE key = (SELECT key FROM chaos_received WHERE key LIKE 'job:%' LIMIT 1)"
    )
    return []


def timer_unfired(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A one-shot timer added, due, and never fired."""
    now = time.time()
    conn.execute(
        "INSERT INTO timers (name, queue, body, due, created) VALUES ('ghost', 'chaos.timers', ?, ?, ?)",
        (json.dumps({"timer": "ghost"}), now - 60, now - 61),
    )
    conn.execute(
        "INSERT INTO chaos_sent (key, kind, expect, detail, at) VALUES ('timer:ghost', 'timer', 'once', '{}', ?)",
        (now - 61,),
    )
    return []


def timer_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A one-shot timer fired for a second due time, and its second message was received."""
    name, due, fired, epoch, node, message = one(
        conn,
        "SELECT * FROM timer_firings WHERE name IN (SELECT substr(key, 7) FROM chaos_sent "
        "WHERE kind = 'timer') LIMIT 1",
    )
    conn.execute(
        "INSERT INTO timer_firings VALUES (?, ?, ?, ?, ?, ?)",
        (name, due + 0.5, fired + 0.5, epoch, node, message + 100000),
    )
    return []


def cron_slot_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A cron timer fired twice in one minute slot (each firing's message received)."""
    slot = (int(time.time()) // 60 - 10) * 60
    epoch, node, since = one(conn, "SELECT epoch, node, since FROM elections ORDER BY epoch DESC LIMIT 1")
    for index, due in enumerate((slot, slot + 30)):
        message = 900000 + index
        conn.execute(
            "INSERT INTO timer_firings VALUES ('chaos-cron-1', ?, ?, ?, ?, ?)",
            (due, since + 1 + index, epoch, node, message),
        )
        conn.execute(
            "INSERT INTO chaos_received (key, queue, message, node, at, count, again) VALUES (?, "
            "'chaos.cron', ?, ?, ?, 1, '[]')",
            (f"cron:chaos-cron-1:{message}", message, node, since + 2),
        )
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
    """The last instance of chaos-a or chaos-b started through the API is of version 1, though a later define
    returned before (the definitions of the workflow features are defined once)."""
    key, detail = one(
        conn,
        "SELECT key, detail FROM chaos_sent WHERE kind = 'instance' AND substr(key, 10) IN "
        "(SELECT id FROM instances WHERE definition IN ('chaos-a', 'chaos-b')) ORDER BY at DESC LIMIT 1",
    )
    (workflow,) = one(conn, "SELECT definition FROM instances WHERE id = ?", key.split(":", 1)[1])
    (later,) = one(
        conn,
        "SELECT count(*) FROM chaos_sent WHERE kind = 'define' AND key LIKE ? AND key NOT LIKE ? AND at < ?",
        f"define:{workflow}:%",
        f"define:{workflow}:1",
        json.loads(detail)["began"],
    )
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
    conn.execute(
        "INSERT INTO chaos_locks (name, fence, holder, started, ended) VALUES (?, ?, 'doctored', ?, ?)",
        (name, fence + 100000, (started + ended) / 2, ended + 0.01),
    )
    return []


def crash_logged(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A node log with a traceback."""
    path = os.path.join(folder, "n1-99.log")
    with open(path, "w") as log:
        log.write(
            '12:00:00.000 n1 standby   joined\nTraceback (most recent call last):\n  File "x", line 1\n'
            "ZeroDivisionError: division by zero\n"
        )
    return [path]


def sent_rows(conn: sqlite3.Connection, kind: str, where: str = "1") -> list[tuple[str, dict[str, Any]]]:
    return [(key, json.loads(detail)) for key, detail in conn.execute(
        f"SELECT key, detail FROM chaos_sent WHERE kind = ? AND {where} ORDER BY at", (kind,))]  # fmt: skip


def innocent_dead(conn: sqlite3.Connection, folder: str) -> list[str]:
    """An innocent job (acked once, failing on purpose at most twice) a dead letter instead."""
    for key, detail in sent_rows(conn, "job", "expect = 'once'"):
        if detail.get("block") or not conn.execute("SELECT 1 FROM chaos_received WHERE key = ?", (key,)).fetchone():
            continue
        conn.execute("DELETE FROM chaos_received WHERE key = ?", (key,))
        conn.execute(
            "INSERT INTO dead_letters (id, queue, body, priority, attempts, created, died, last_error) "
            "VALUES (?, 'chaos.jobs', ?, 0, 5, ?, ?, 'node n1 died')",
            (
                detail["message"],
                json.dumps({"id": detail["id"], "fail": detail.get("fail", 0)}),
                time.time() - 60,
                time.time() - 30,
            ),
        )
        return []
    raise unittest.SkipTest("no job was acked")


def hostile_rows(conn: sqlite3.Connection, kind: str) -> list[tuple[Any, ...]]:
    rows = conn.execute("SELECT * FROM chaos_hostile WHERE kind = ? ORDER BY id", (kind,)).fetchall()
    if not rows:
        raise unittest.SkipTest(f"the run has no hostile run of kind {kind}")
    return rows


def poison_too_deadly(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A poison job that ended its node once more than its limit (5) and its refunded deaths allow."""
    row = hostile_rows(conn, "poison")[0]
    (have,) = one(conn, "SELECT count(*) FROM chaos_hostile WHERE kind = 'poison' AND key = ?", row[2])
    refunded = json.loads(one(conn, "SELECT value FROM chaos_meta WHERE key = 'isolate_after_deaths'")[0])
    for _ in range(5 + refunded + 1 - have):
        conn.execute(
            "INSERT INTO chaos_hostile (kind, key, message, attempt, refunds, node, pid, started, ended, "
            "outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            row[1:],
        )
    return []


def poison_alive(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A poison job that is no dead letter (it was purged, say, or never came to its limit)."""
    _key, detail = next(iter(sent_rows(conn, "job", "detail LIKE '%poison%'")), (None, None))
    if detail is None:
        raise unittest.SkipTest("no poison job was sent")
    conn.execute("DELETE FROM dead_letters WHERE id = ?", (detail["message"],))
    return []


def undecodable_wrong_reason(conn: sqlite3.Connection, folder: str) -> list[str]:
    """An undecodable message dead-lettered as if its consumer had died five times."""
    rows = sent_rows(conn, "undecodable")
    if not rows:
        raise unittest.SkipTest("no undecodable message was written")
    conn.execute("UPDATE dead_letters SET last_error = 'node n1 died' WHERE id = ?", (rows[0][1]["message"],))
    return []


def exit_call_too_deadly(conn: sqlite3.Connection, folder: str) -> list[str]:
    """An instance whose call ended its node 30 times more: 4x the limit (20) and its refunded deaths allow 22."""
    row = hostile_rows(conn, "exit-call")[0]
    for _ in range(30):
        conn.execute(
            "INSERT INTO chaos_hostile (kind, key, message, attempt, refunds, node, pid, started, ended, "
            "outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            row[1:],
        )
    return []


def exit_call_completed(conn: sqlite3.Connection, folder: str) -> list[str]:
    """An instance whose call ends its process, completed all the same."""
    (instance,) = one(conn, "SELECT id FROM instances WHERE json_extract(variables, '$.input.hostile') = 'exit'")
    conn.execute("UPDATE instances SET status = 'completed', error = NULL WHERE id = ?", (instance,))
    return []


def cancel_missed(conn: sqlite3.Connection, folder: str) -> list[str]:
    """An instance meant to be cancelled, still waiting."""
    (instance,) = one(conn, "SELECT id FROM instances WHERE status = 'cancelled'")
    conn.execute("UPDATE instances SET status = 'waiting', ended = NULL WHERE id = ?", (instance,))
    conn.execute("DELETE FROM journal WHERE instance = ? AND type = 'cancel'", (instance,))
    conn.execute("UPDATE instances SET steps = steps - 1 WHERE id = ?", (instance,))
    return []


def quiet_time(conn: sqlite3.Connection) -> float:
    """A moment after every fault of the run: nothing the run did explains what happens then."""
    (last,) = one(conn, "SELECT MAX(MAX(at, COALESCE(until, at))) FROM chaos_faults")
    return float(last) + 10


def thread_blocker_lost_lease(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A handler that blocked its thread lost its lease though nothing befell its node (a life no fault hit)."""
    row = hostile_rows(conn, "block-thread")[0]
    started = quiet_time(conn)
    conn.execute(
        "INSERT INTO chaos_hostile (kind, key, message, attempt, refunds, node, pid, started, ended, "
        "outcome) VALUES ('block-thread', ?, ?, 9, 0, ?, 999999, ?, ?, 'lease lost')",
        (row[2], row[3], row[6], started, started + 5),
    )
    return []


def loop_blocker_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A message whose handler blocks the event loop, acked by two of its runs."""
    row = hostile_rows(conn, "block-loop")[0]
    for _ in range(2):
        conn.execute(
            "INSERT INTO chaos_hostile (kind, key, message, attempt, refunds, node, pid, started, ended, "
            "outcome) VALUES ('block-loop', ?, ?, 9, 0, ?, ?, ?, ?, 'acked')",
            (row[2], row[3], row[6], row[7], row[8], row[8] + 5),
        )
    return []


def _clock(at: float) -> str:
    return datetime.datetime.fromtimestamp(at).strftime("%H:%M:%S.%f")[:-3]


def stalled_by_thread(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A node taken for stalled while only a handler blocked its own thread there (a life no fault hit)."""
    row = hostile_rows(conn, "block-thread")[0]
    node, started = row[6], quiet_time(conn)
    conn.execute(
        "INSERT INTO chaos_hostile (kind, key, message, attempt, refunds, node, pid, started, ended, "
        "outcome) VALUES ('block-thread', ?, ?, 9, 0, ?, 999999, ?, ?, 'acked')",
        (row[2], row[3], node, started, started + 6),
    )
    path = os.path.join(folder, "n9-1.log")
    with open(path, "w") as log:
        log.write(
            f"{_clock(started + 4.5)} n9 standby   node {node} (pid 999999) stalled: no heartbeat for 3.2s; "
            "handed back 1 leases\n"
        )
    return [path]


def replaced_freeze(conn: sqlite3.Connection) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """A freeze of the node in office, and the term that replaced it before it woke."""
    for fault in conn.execute("SELECT id, node, pid, at, until, epoch FROM chaos_faults WHERE kind = 'freeze'"):
        term = conn.execute(
            "SELECT epoch, node, pid, since FROM elections WHERE epoch > ? ORDER BY epoch LIMIT 1", (fault[5],)
        ).fetchone()
        if term is not None and fault[3] < term[3] < fault[4]:
            return tuple(fault), tuple(term)
    raise unittest.SkipTest("no freeze of the scheduler was replaced before it woke")


def freeze_replaced_late(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A standby took office from the frozen scheduler 2 s past the bound (stall limit + 3 s), though
    another standby (a life of a node n8 that nothing hindered) stood by all along."""
    fault, term = replaced_freeze(conn)
    (stall,) = one(conn, "SELECT value FROM chaos_meta WHERE key = 'stall_after'")
    conn.execute("UPDATE chaos_faults SET until = ? WHERE id = ?", (fault[3] + json.loads(stall) + 30, fault[0]))
    conn.execute("UPDATE elections SET since = ? WHERE epoch = ?", (fault[3] + json.loads(stall) + 5, term[0]))
    conn.execute(
        "INSERT INTO chaos_lives (node, life, pid, replica, started, ready, ended, how) "
        "VALUES ('n8', 1, 999997, 0, ?, ?, NULL, NULL)",
        (fault[3] - 20, fault[3] - 19),
    )
    return []


def freeze_never_stepped_down(conn: sqlite3.Connection, folder: str) -> list[str]:
    """The frozen scheduler (a life whose log says nothing of losing office) lived on after it woke."""
    fault, _term = replaced_freeze(conn)
    conn.execute("UPDATE chaos_faults SET pid = 999998 WHERE id = ?", (fault[0],))
    conn.execute(
        "INSERT INTO chaos_lives (node, life, pid, replica, started, ready, ended, how) "
        "VALUES (?, 99, 999998, 0, ?, ?, NULL, NULL)",
        (fault[1], fault[3] - 10, fault[3] - 9),
    )
    return []


def frozen_epoch_fired(conn: sqlite3.Connection, folder: str) -> list[str]:
    """The frozen scheduler fired a timer in its old epoch after a standby took office."""
    fault, term = replaced_freeze(conn)
    conn.execute(
        "INSERT INTO timer_firings (name, due, fired, epoch, node, message) VALUES ('ghost', ?, ?, ?, ?, ?)",
        (term[3], term[3] + 0.5, fault[5], fault[1], 999999),
    )
    return []


# The workflow features: kept signals, start keys, child instances, timed waits ---------------------


def variables_of(conn: sqlite3.Connection, instance: str) -> dict[str, Any]:
    return dict(json.loads(one(conn, "SELECT variables FROM instances WHERE id = ?", instance)[0]))


def set_variables(conn: sqlite3.Connection, instance: str, variables: dict[str, Any]) -> None:
    conn.execute("UPDATE instances SET variables = ? WHERE id = ?", (json.dumps(variables), instance))


def insert_journal_row(conn: sqlite3.Connection, instance: str, after: int, row: tuple[Any, ...]) -> None:
    """Put ``row`` (activity, type, node, fence, started, ended, outcome) in the journal right after
    step ``after``, the later steps one on."""
    rows = conn.execute(
        f"SELECT {JOURNAL_COLUMNS} FROM journal WHERE instance = ? ORDER BY step", (instance,)
    ).fetchall()
    rows = [*rows[: after + 1], (instance, 0, *row), *rows[after + 1 :]]
    conn.execute("DELETE FROM journal WHERE instance = ?", (instance,))
    conn.executemany(f"INSERT INTO journal ({JOURNAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     [(entry[0], step, *entry[2:]) for step, entry in enumerate(rows)])  # fmt: skip
    conn.execute("UPDATE instances SET steps = steps + 1 WHERE id = ?", (instance,))


def key_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A second instance row with a start key that started one already (the unique index dropped first)."""
    row = one(conn, "SELECT * FROM instances WHERE start_key IS NOT NULL LIMIT 1")
    conn.execute("DROP INDEX IF EXISTS instances_start_key")
    conn.execute(f"INSERT INTO instances VALUES ({', '.join('?' * len(row))})", ("e" * 16, *row[1:]))
    return []


def key_other_id(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A start with a used key that was handed another id than the key's instance."""
    key, detail = one(conn, "SELECT key, detail FROM chaos_sent WHERE kind = 'keyed' AND "
                            "json_extract(detail, '$.definition') = 'chaos-keyed' AND "
                            "json_extract(detail, '$.instance') IS NOT NULL LIMIT 1")  # fmt: skip
    changed = {**json.loads(detail), "instance": "d" * 16}
    conn.execute("UPDATE chaos_sent SET detail = ? WHERE key = ?", (json.dumps(changed), key))
    return []


def kept_holder(conn: sqlite3.Connection) -> tuple[str, dict[str, Any]]:
    """A chaos-kept instance whose wait took a kept signal, and that signal's input."""
    instance, got = one(conn, "SELECT id, json_extract(variables, '$.got') FROM instances WHERE definition = "
                              "'chaos-kept' AND json_extract(variables, '$.got.token') IS NOT NULL "
                              "LIMIT 1")  # fmt: skip
    return str(instance), json.loads(got)


def kept_token_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A kept signal's token in a second waiter of its name (one answered later, or a copy of the first)."""
    holder, got = kept_holder(conn)
    name = variables_of(conn, holder)["input"]["name"]
    other = conn.execute("SELECT id FROM instances WHERE definition = 'chaos-kept' AND id != ? AND "
                         "json_extract(variables, '$.input.name') = ? LIMIT 1", (holder, name)).fetchone()  # fmt: skip
    if other is None:
        row = one(conn, "SELECT * FROM instances WHERE id = ?", holder)
        conn.execute(f"INSERT INTO instances VALUES ({', '.join('?' * len(row))})", ("c" * 16, *row[1:]))
        conn.execute(
            f"INSERT INTO journal ({JOURNAL_COLUMNS}) "
            "SELECT ?, step, activity, type, node, fence, started, ended, outcome FROM journal WHERE instance = ?",
            ("c" * 16, holder),
        )
        return []
    variables = variables_of(conn, other[0])
    set_variables(conn, other[0], {**variables, "got": got})
    return []


def kept_taken_and_left(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A kept signal that resumed a waiter, still in kept_signals (it could resume another)."""
    holder, got = kept_holder(conn)
    name = variables_of(conn, holder)["input"]["name"]
    now = time.time()
    conn.execute(
        "INSERT INTO kept_signals (name, input, sent, expires, by) VALUES (?, ?, ?, ?, 'doctored')",
        (name, json.dumps(got), now - 60, now + 3600),
    )
    return []


def kept_not_taken(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A waiter whose journal says its wait took no kept signal, though it holds a kept signal's token
    (the signal resumed an instance it never reached at its wait)."""
    holder, _got = kept_holder(conn)
    conn.execute(
        "UPDATE journal SET outcome = substr(outcome, 1, instr(outcome, ': it was sent at') - 1) "
        "WHERE instance = ? AND activity = 'wait' AND outcome LIKE '%and kept; resumed'",
        (holder,),
    )
    return []


def completed_child(conn: sqlite3.Connection) -> tuple[str, str]:
    """A completed child of a completed parent: (child, parent)."""
    child, parent = one(conn, "SELECT c.id, c.parent FROM instances c JOIN instances p ON p.id = c.parent "
                              "WHERE c.status = 'completed' AND p.status = 'completed' AND json_extract(p.variables, "
                              "'$.child') IS NOT NULL ORDER BY c.id LIMIT 1")  # fmt: skip
    return str(child), str(parent)


def child_ended_late(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A child whose last step ended a second after its parent went on with its result."""
    child, parent = completed_child(conn)
    (went_on,) = one(
        conn, "SELECT started FROM journal WHERE instance = ? AND outcome = ?", parent, f"instance {child} completed"
    )
    conn.execute(
        "UPDATE journal SET started = ?, ended = ? WHERE instance = ? AND step = (SELECT MAX(step) FROM "
        "journal WHERE instance = ?)",
        (went_on + 1, went_on + 1.001, child, child),
    )
    conn.execute("UPDATE instances SET ended = ?, updated = ? WHERE id = ?", (went_on + 1.001, went_on + 1.001, child))
    return []


def parent_result_wrong(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A parent whose result is not its child's final variables."""
    _child, parent = completed_child(conn)
    variables = variables_of(conn, parent)
    set_variables(conn, parent, {**variables, "child": {**variables["child"], "done": "something else"}})
    return []


def cancelled_parent_child_waits(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A cancelled parent whose child is still waiting (its cancel row gone)."""
    (child,) = one(conn, "SELECT c.id FROM instances c JOIN instances p ON p.id = c.parent WHERE "
                         "p.status = 'cancelled' AND c.status = 'cancelled' LIMIT 1")  # fmt: skip
    conn.execute("DELETE FROM journal WHERE instance = ? AND type = 'cancel'", (child,))
    conn.execute("UPDATE instances SET status = 'waiting', ended = NULL, steps = steps - 1 WHERE id = ?", (child,))
    return []


def timed_received(conn: sqlite3.Connection) -> tuple[str, int, str]:
    """A chaos-timed instance whose wait received its answer: (id, step of "signal received", signal name)."""
    instance, step, name = one(conn, "SELECT i.id, j.step, json_extract(i.variables, '$.input.name') FROM instances i "
                                     "JOIN journal j ON j.instance = i.id WHERE i.definition = 'chaos-timed' AND "
                                     "j.outcome = 'signal received' LIMIT 1")  # fmt: skip
    return str(instance), int(step), str(name)


def timed_both_ways(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A timed wait whose journal says it received the signal, and then that it timed out."""
    instance, step, name = timed_received(conn)
    node, fence, ended = one(
        conn, "SELECT node, fence, ended FROM journal WHERE instance = ? AND step = ?", instance, step
    )
    insert_journal_row(
        conn,
        instance,
        step,
        ("ask", "signal", node, fence, ended, ended, f"timed out after 1.5s waiting for signal {name}: on to late"),
    )
    return []


def timed_out_though_answered(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A timed wait that timed out (journal) though the driver's answer resumed it, by the answer's record."""
    instance, key, detail = one(conn, "SELECT i.id, s.key, s.detail FROM instances i JOIN chaos_sent s ON s.key = "
                                      "'answer:' || i.id WHERE i.definition = 'chaos-timed' AND EXISTS (SELECT 1 FROM "
                                      "journal j WHERE j.instance = i.id AND j.outcome LIKE 'timed out after %') "
                                      "LIMIT 1")  # fmt: skip
    changed = {**json.loads(detail), "resumed": [instance], "kept_until": None}
    conn.execute("UPDATE chaos_sent SET detail = ? WHERE key = ?", (json.dumps(changed), key))
    return []


def timed_out_early(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A timed wait that timed out 200 ms before its due time."""
    instance, outcome = one(conn, "SELECT instance, outcome FROM journal WHERE type = 'signal' AND "
                                  "outcome LIKE 'waiting for signal % until %' AND EXISTS (SELECT 1 FROM journal "
                                  "o WHERE o.instance = journal.instance AND o.outcome LIKE 'timed out after %') "
                                  "LIMIT 1")  # fmt: skip
    match = chaos.WAITING_FOR.match(outcome)
    assert match is not None and match.group(2), outcome
    due = chaos._iso_seconds(match.group(2))
    assert due is not None
    conn.execute(
        "UPDATE journal SET started = ?, ended = ? WHERE instance = ? AND outcome LIKE 'timed out after %'",
        (due - 0.2, due - 0.2, instance),
    )
    return []


# Branches: parallel (join all, join any) and for_each (in parallel, in turn) --------------------------


def journal_of(conn: sqlite3.Connection, instance: str) -> list[tuple[Any, ...]]:
    """The instance's journal rows, their branch last (``JOURNAL_COLUMNS, branch``)."""
    return [
        tuple(row)
        for row in conn.execute(
            f"SELECT {JOURNAL_COLUMNS}, branch FROM journal WHERE instance = ? ORDER BY step", (instance,)
        )
    ]


def rewrite_journal(conn: sqlite3.Connection, instance: str, rows: list[tuple[Any, ...]]) -> None:
    """Make ``rows`` (as journal_of gives them) the instance's journal, numbered 0..n-1, and its step count."""
    conn.execute("DELETE FROM journal WHERE instance = ?", (instance,))
    conn.executemany(
        f"INSERT INTO journal ({JOURNAL_COLUMNS}, branch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(instance, step, *row[2:]) for step, row in enumerate(rows)],
    )
    conn.execute("UPDATE instances SET steps = ? WHERE id = ?", (len(rows), instance))


def completed_of(conn: sqlite3.Connection, workflow: str) -> str:
    return str(
        one(
            conn,
            "SELECT id FROM instances WHERE definition = ? AND status = 'completed' ORDER BY id LIMIT 1",
            workflow,
        )[0]
    )


def branch_step_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """An item's set step (chaos-each, branch each/0) committed twice: its row again right after it."""
    instance = completed_of(conn, "chaos-each")
    rows = journal_of(conn, instance)
    at = next(index for index, row in enumerate(rows) if row[9] == "each/0" and row[2] == "e-set")
    rewrite_journal(conn, instance, [*rows[: at + 1], rows[at], *rows[at + 1 :]])
    return []


def bursts_overlap(conn: sqlite3.Connection, folder: str) -> list[str]:
    """Two bursts of one instance with branches at once: a step of its first burst (chaos-fan) ended
    50 ms after its next burst began."""
    instance = completed_of(conn, "chaos-fan")
    rows = journal_of(conn, instance)
    fences = sorted({row[5] for row in rows})
    if len(fences) < 2:
        raise unittest.SkipTest(f"chaos-fan {instance} ran in one burst")
    first = max((row for row in rows if row[5] == fences[0]), key=lambda row: row[7])
    begun = min(row[6] for row in rows if row[5] == fences[1])
    conn.execute("UPDATE journal SET ended = ? WHERE instance = ? AND step = ?", (begun + 0.05, instance, first[1]))
    return []


def branch_steps_overlap(conn: sqlite3.Connection, folder: str) -> list[str]:
    """Two steps of one branch at once in one burst: an item's call (chaos-each) still running when
    its set began."""
    for (instance,) in conn.execute(
        "SELECT id FROM instances WHERE definition = 'chaos-each' AND status = 'completed' ORDER BY id"
    ).fetchall():
        rows = journal_of(conn, instance)
        for call in rows:
            after = [row for row in rows if row[9] == call[9] and row[2] == "e-set" and row[5] == call[5]]
            if call[2] == "e-call" and after:
                conn.execute(
                    "UPDATE journal SET ended = ? WHERE instance = ? AND step = ?",
                    (after[0][6] + 0.01, instance, call[1]),
                )
                return []
    raise unittest.SkipTest("no item of chaos-each called and set in one burst")


def join_before_branch(conn: sqlite3.Connection, folder: str) -> list[str]:
    """chaos-each's join row committed before an item's last step: the two rows change places."""
    instance = completed_of(conn, "chaos-each")
    rows = journal_of(conn, instance)
    join = next(index for index, row in enumerate(rows) if row[2] == "each" and row[8].startswith("joined: "))
    last = max(index for index, row in enumerate(rows[:join]) if row[9] is not None)
    rows[join], rows[last] = rows[last], rows[join]
    rewrite_journal(conn, instance, rows)
    return []


def item_missing(conn: sqlite3.Connection, folder: str) -> list[str]:
    """An item of chaos-each (its first, each/0) never ran, yet the join says all ended."""
    instance = completed_of(conn, "chaos-each")
    rewrite_journal(conn, instance, [row for row in journal_of(conn, instance) if row[9] != "each/0"])
    return []


def removed_branch_stepped(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A branch that chaos-race's join any removed took a step after the join (its last step again)."""
    instance = completed_of(conn, "chaos-race")
    rows = journal_of(conn, instance)
    join = next(index for index, row in enumerate(rows) if row[2] == "race" and row[8].startswith("joined: "))
    winner = rows[join][8].split()[2]
    loser = next(row for row in rows[:join] if row[9] is not None and row[9] != winner)
    moved = (*loser[:6], rows[join][7] + 0.01, rows[join][7] + 0.02, *loser[8:])
    rewrite_journal(conn, instance, [*rows[: join + 1], moved, *rows[join + 1 :]])
    return []


def item_counted_twice(conn: sqlite3.Connection, folder: str) -> list[str]:
    """chaos-each's count one more than its items (an item's set applied twice)."""
    instance = completed_of(conn, "chaos-each")
    variables = variables_of(conn, instance)
    set_variables(conn, instance, {**variables, "count": variables.get("count", 0) + 1})
    return []


def race_winner_wrong(conn: sqlite3.Connection, folder: str) -> list[str]:
    """chaos-race's winner is not the branch its join row says ended first."""
    instance = completed_of(conn, "chaos-race")
    variables = variables_of(conn, instance)
    other = "slow" if variables.get("winner") == "quick" else "quick"
    set_variables(conn, instance, {**variables, "winner": other})
    return []


def item_effect_missing(conn: sqlite3.Connection, folder: str) -> list[str]:
    """A committed item call (chaos-each, each/0) whose effect was never recorded under its branch's key."""
    instance = completed_of(conn, "chaos-each")
    conn.execute("DELETE FROM chaos_effects WHERE key = ?", (f"{instance}:each/0:0",))
    return []


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
    ("hostile", "an innocent job a dead letter", innocent_dead),
    ("hostile", "a poison job that ended its node more often than its limit allows", poison_too_deadly),
    ("hostile", "a poison job that is no dead letter", poison_alive),
    ("hostile", "an undecodable message dead-lettered for another reason", undecodable_wrong_reason),
    ("hostile", "a call that ended its node more often than 4x the limit allows", exit_call_too_deadly),
    ("instances", "an instance whose call exits, completed", exit_call_completed),
    ("instances", "an instance meant to be cancelled, still waiting", cancel_missed),
    ("blocking", "a thread-blocking handler lost its lease with nothing done to its node", thread_blocker_lost_lease),
    ("blocking", "a loop-blocking message acked twice", loop_blocker_twice),
    ("stalls", "a node taken for stalled while only a handler blocked its thread", stalled_by_thread),
    ("takeover", "a frozen scheduler replaced past its bound", freeze_replaced_late),
    ("takeover", "a frozen scheduler that never stepped down", freeze_never_stepped_down),
    ("takeover", "the frozen epoch fired after the takeover", frozen_epoch_fired),
    ("keys", "a second instance row with a used start key", key_twice),
    ("keys", "a start with a used key handed another id", key_other_id),
    ("kept", "a kept signal's token in two instances", kept_token_twice),
    ("kept", "a kept signal that resumed a waiter, still kept", kept_taken_and_left),
    ("kept", "a kept signal's token in a waiter whose wait took none", kept_not_taken),
    ("children", "a child that ended after its parent went on", child_ended_late),
    ("children", "a parent whose result is not its child's variables", parent_result_wrong),
    ("children", "a cancelled parent whose child still waits", cancelled_parent_child_waits),
    ("timed-waits", "a timed wait both received and timed out", timed_both_ways),
    ("timed-waits", "a timed wait timed out though the answer resumed it", timed_out_though_answered),
    ("timed-waits", "a timed wait timed out before its due time", timed_out_early),
    ("branch-once", "a branch step committed twice", branch_step_twice),
    ("overlap", "two bursts of an instance with branches at once", bursts_overlap),
    ("overlap", "two steps of one branch at once", branch_steps_overlap),
    ("steps", "a join all before a branch's last step", join_before_branch),
    ("steps", "a for_each item that never ran, joined", item_missing),
    ("steps", "a branch removed by a join any stepped after it", removed_branch_stepped),
    ("branch-vars", "an item's counter added twice", item_counted_twice),
    ("branch-vars", "a race's winner not the branch its join names", race_winner_wrong),
    ("effects", "an item's committed call without its effect", item_effect_missing),
]


if __name__ == "__main__":
    unittest.main()
