"""Workflows with branches: ``parallel`` (join all or any) and ``for_each`` (in turn or in
parallel), end to end on real ``serve`` processes.

Every node is a real ``python3 nodeflow.py serve`` process whose log (stderr) goes to a file
(printed when a test fails); a crash is a real SIGKILL. What a test asserts is what the database
holds (the ``instances``, ``branches``, ``journal`` with its ``branch`` column, ``messages`` and
``kept_signals`` tables) and what the commands print (``show``, ``show --json``, ``signal --json``,
``define``).

Covered:

- Join all: a branch of 300 ms io work and a branch waiting for a signal: the instance waits at the
  parallel with one branch left (one ``branches`` row, listed by ``show`` and ``show --json``),
  and completes after the signal; each step journaled once, steps contiguous, each row's branch
  right (``both/0``, ``both/1``, none for the fork and the join), the join row ("joined: all 2
  branch(es) ended") after both branches' last steps.
- Join any: a 1.5 s timer branch, a branch waiting for a signal for ever and a branch running a
  child that waits for ever: the instance goes on after the timer ("joined: branch race/0 ended
  first; 2 cancelled"), not before; the other rows are gone, so a later signal resumes nothing (it
  is kept), and the child is cancelled. Two branches doing io work (100 ms and 500 ms) with join
  any: the instance goes on to ``next`` once, and the activity there runs. A nested branch of a
  removed branch that ends in the same burst: the instance completes (no failed burst).
- for_each in turn over ["a", "b", "c"] (log, set last, add n): n == 3, last == "c", the item
  variable stays the branch's own, the items' steps in order (each/0 before each/1 before each/2);
  for_each in parallel over 20 items of 200 ms io work on one node: the works overlap in time.
- Signals to branches: four branches wait for four signals; one was sent (and kept) before the
  instance started, and its branch takes it when it reaches its wait after a timer; the other
  three come in a random order from another process, each resuming exactly its branch (the rows
  left after each are the others).
- A call that fails its first try (an --app function, retry 3 x 200 ms) in two branches and two
  for_each items while another branch works: the instance completes; each call's
  ``current_call().key`` is the same for both its tries (instance:branch:the branch's own step count at
  its first try) and
  differs between the four calls. A call whose burst a signal to the other branch overtook (refused
  at its commit) runs again under the same key.
- Faults: a branch's ``fail`` faults the instance (the error names the branch) and ``retry`` faults
  it again at the same branch, the other branch still waiting; ``cancel`` removes every branch row
  (nested ones too), cancels both children and drops the queued 1 h timer. A sibling's call that
  ended after another branch faulted: ``retry`` (the fault mended) does not run it again.
- A node SIGKILLed holding an instance mid-burst (20 branches of 1.5 s io work): the other node
  runs it again; every step journaled exactly once, contiguous, every branch ended, completed.
- Limits: for_each over 1,001 items faults the instance ("1000 at most"), over 1,000 (in parallel)
  completes; ``define`` refuses bad parallel and for_each activities (exit 2, nothing stored).
- A loop through a parallel 50 times (a 10 ms timer in one branch): completes, every round
  forked and joined, no branch row left.

No speed assertions: every wait is bounded generously, and a failure prints the nodes' logs. A
failed burst (an error in the runtime, logged "failed (delivery N)") fails the test at once.

Four tests were written for bugs found while writing these, each named for what should hold: a
branch removed by join any while its step ran joined again when its chain ended (the activity
after the parallel was skipped); a nested branch of such a removed branch broke the burst; a
sibling's step that ended after another branch faulted was journaled but its branch did not move
on, so retry ran it again (a call twice, under two keys); a call re-run after its burst was refused
got a new key when another branch's step came first in the re-run (keys now count a path's own
steps).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import sys
import textwrap
import time
import unittest
from collections import Counter
from typing import Any

import nodeflow
from tests.support import table_rows
from tests.test_workflow_runtime import RuntimeTestCase, Serve

WATCHED = ("definitions", "instances", "journal", "messages", "branches", "kept_signals", "instructions")

# The module the nodes run (--app): keyed calls that fail their first try, a gate, a slow charge.
APP = """
import os
import time

import nodeflow


def record(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\\n").encode())  # one write: lines of calls in other threads do not mix
    finally:
        os.close(fd)


def lines(path):
    try:
        with open(path) as found:
            return found.read().splitlines()
    except FileNotFoundError:
        return []


@nodeflow.activity("flaky")
def flaky(variables):
    # Fails the first try of each call (told apart by its key), then returns the key.
    call = nodeflow.current_call()
    path = variables["input"]["keys"]
    record(path, f"{call.key} {call.step} {call.activity} {variables.get('item', '-')}")
    tries = sum(line.split()[0] == call.key for line in lines(path))
    if tries == 1:
        raise RuntimeError(f"first try of {call.key} fails")
    return {"key": call.key, "tries": tries}


@nodeflow.activity("gate")
def gate(variables):
    if not os.path.exists(variables["input"]["flag"]):
        raise RuntimeError("the gate is closed")
    return "open"


@nodeflow.activity("slowkey")
def slowkey(variables):
    call = nodeflow.current_call()
    record(variables["input"]["keys"], f"{call.key} {call.step} {call.fence}")  # as it starts
    time.sleep(1.0)
    return call.key


@nodeflow.activity("charge")
def charge(variables):
    call = nodeflow.current_call()
    time.sleep(0.5)
    record(variables["input"]["keys"], f"{call.key} {call.step}")
    return call.key
"""


def path_key(instance: str, steps: list[Any], first: int) -> str:
    """The idempotency key of a call whose first try is journal step ``first``: on a branch, the
    branch and how many steps of its own came before (on the main path, the journal step)."""
    row = next(s for s in steps if s.step == first)
    if row.branch is None:
        return f"{instance}:{first}"
    before = sum(1 for s in steps if s.branch == row.branch and s.step < first)
    return f"{instance}:{row.branch}:{before}"


Step = nodeflow.JournalEntry  # a journal row as nodeflow reads it: step, activity, ..., outcome, branch


def forever(workflow_id: str = "forever") -> dict[str, Any]:
    """A child that waits for the signal its input names (no timeout)."""
    return {
        "id": workflow_id,
        "start": "wait",
        "activities": {"wait": {"type": "signal", "name": "{input.name}", "result": "got"}},
    }


def write_json(folder: str, name: str, data: Any) -> str:
    path = os.path.join(folder, name)
    with open(path, "w") as out:
        json.dump(data, out)
    return path


class BranchTestCase(RuntimeTestCase):
    """RuntimeTestCase (serve nodes logging to files, ``nf``, ``settle``, ``cli_json``...) plus the
    journal and branch rows of an instance."""

    def steps(self, instance: str) -> list[Step]:
        return [Step(*row) for row in self.query(
            "SELECT step, activity, type, node, fence, started, ended, outcome, branch FROM journal WHERE instance = ? "
            "ORDER BY step", instance,
        )]  # fmt: skip

    def branch_rows(self, instance: str) -> list[tuple[Any, ...]]:
        """(name, fork, position, bookmark, waiting_for, child) of each branch of the instance."""
        return self.query(
            "SELECT name, fork, position, bookmark, waiting_for, child FROM branches WHERE instance = ? ORDER BY name",
            instance,
        )

    def status(self, instance: str) -> str:
        return str(self.query("SELECT status FROM instances WHERE id = ?", instance)[0][0])

    def variables(self, instance: str) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.query("SELECT variables FROM instances WHERE id = ?", instance)[0][0])
        return found

    def runs_queued(self, instance: str) -> int:
        return self.count(
            "SELECT COUNT(*) FROM messages WHERE queue = ? AND json_extract(body, '$.run') = ?",
            nodeflow.WORKFLOW_QUEUE,
            instance,
        )

    def assert_sound(self, steps: list[Step], where: str = "") -> None:
        """Steps 0..n-1, each once (the table's key makes a duplicate impossible; a gap is not)."""
        self.assertEqual([s.step for s in steps], list(range(len(steps))), f"contiguous steps {where}")

    def wait_ended(self, instance: str, node: Serve, timeout: float = 30) -> str:
        """Until the instance completes, faults or is cancelled; fails at once when the node logs a
        failed burst (an error in the runtime: its message goes back for another try)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(instance)
            if status in ("completed", "faulted", "cancelled"):
                return status
            failed = [
                line
                for line in node.text().splitlines()
                if " failed (delivery " in line and "StoreError" not in line and "database is" not in line
            ]  # a busy database is retried; anything else is a bug
            if failed:
                self.fail(f"instance {instance} is {status}; a burst failed: {failed[0]}")
            if time.monotonic() > deadline:
                self.fail(f"instance {instance} is still {status} after {timeout}s: {self.steps(instance)}")
            time.sleep(0.05)

    def write_app(self) -> None:
        with open(os.path.join(self.dir, "brapp.py"), "w") as out:
            out.write(textwrap.dedent(APP))


# 1. Join all --------------------------------------------------------------------------------------

PAIR: dict[str, Any] = {
    "id": "pair",
    "start": "both",
    "activities": {
        "both": {"type": "parallel", "branches": ["pack", "hold"], "join": "all", "next": "ship"},
        "pack": {"type": "work", "duration": "300ms", "kind": "io", "next": "packed"},
        "packed": {"type": "set", "values": {"packed": True}},
        "hold": {"type": "signal", "name": "{input.name}", "result": "approval", "next": "noted"},
        "noted": {"type": "set", "values": {"approved_by": "{approval.by}"}},
        "ship": {"type": "set", "values": {"shipped": True}},
    },
}


class JoinAll(BranchTestCase):
    def test_the_instance_waits_for_its_last_branch_and_journals_each_step_once_with_its_branch(self) -> None:
        node = self.serve("n1")
        self.nf.define(PAIR)
        instance = self.nf.start("pair", {"name": "approve-1"})
        self.settle(lambda: self.status(instance) == "waiting", 30, "the instance waiting for its signal branch")

        # One branch left: its row, and what show says.
        self.assertEqual(self.branch_rows(instance), [("both/1", "", "hold", "signal", "approve-1", None)])
        position, bookmark, waiting_for = self.query(
            "SELECT position, bookmark, waiting_for FROM instances WHERE id = ?", instance
        )[0]
        self.assertEqual((position, bookmark, waiting_for), ("both", "fork", None), "the main path waits at the fork")
        text = self.cli_ok("show", instance).stdout
        self.assertIn(f"instance {instance}: pair v1, waiting at both for 1 branch(es)\n", text)
        self.assertIn("\nbranch both/1 at hold: waiting for signal approve-1\n", text)
        self.assertRegex(text, r"\n +\d+ \S+ n1 fence \d+ \[both/0\] pack \(work, \d+ms\): worked 300ms \(io\)\n")
        shown = self.cli_json("show", instance)
        self.assertEqual(
            shown["branches"], [{"branch": "both/1", "activity": "hold", "waiting_for": "approve-1", "wake_at": None}]
        )
        so_far = {(row["activity"], row["branch"], row["outcome"]) for row in shown["journal"]}
        self.assertEqual(so_far, {
            ("both", None, "forked 2 branch(es): pack, hold (join all)"),
            ("pack", "both/0", "worked 300ms (io)"),
            ("packed", "both/0", "set packed"),
            ("hold", "both/1", "waiting for signal approve-1"),
        })  # fmt: skip

        sent = self.cli_json("signal", "approve-1", "--input", '{"by": "ops"}')
        self.assertEqual((sent["resumed"], sent["kept"]), ([instance], False), sent)
        self.assertEqual(self.wait_ended(instance, node), "completed")

        steps = self.steps(instance)
        self.assert_sound(steps)
        rows = [(s.activity, s.branch, s.outcome) for s in steps]
        self.assertEqual(Counter(rows), Counter([
            ("both", None, "forked 2 branch(es): pack, hold (join all)"),
            ("pack", "both/0", "worked 300ms (io)"),
            ("packed", "both/0", "set packed"),
            ("hold", "both/1", "waiting for signal approve-1"),
            ("hold", "both/1", "signal received"),
            ("noted", "both/1", "set approved_by"),
            ("both", None, "joined: all 2 branch(es) ended"),
            ("ship", None, "set shipped"),
        ]), rows)  # fmt: skip
        at = {row: s for row, s in zip(rows, steps, strict=True)}
        fork = at[("both", None, "forked 2 branch(es): pack, hold (join all)")]
        join = at[("both", None, "joined: all 2 branch(es) ended")]
        self.assertEqual(fork.step, 0)
        for branch in ("both/0", "both/1"):  # each branch's chain in order, all of it before the join
            mine = [s for s in steps if s.branch == branch]
            self.assertEqual([s.step for s in mine], sorted(s.step for s in mine))
            self.assertLess(max(s.step for s in mine), join.step, f"{branch} ended before the join")
            self.assertLessEqual(max(s.ended for s in mine), join.started + 0.001, branch)
        self.assertEqual([s.type for s in (fork, join)], ["parallel", "parallel"])
        self.assertEqual(steps[-1].activity, "ship")
        self.assertEqual([s.activity for s in steps if s.branch == "both/1"], ["hold", "hold", "noted"])
        self.assertGreaterEqual(at[("hold", "both/1", "signal received")].started, at[("pack", "both/0",
                                "worked 300ms (io)")].ended, "the signal came after the io branch ended")  # fmt: skip
        variables = self.variables(instance)
        self.assertEqual(
            {name: variables.get(name) for name in ("packed", "approval", "approved_by", "shipped")},
            {"packed": True, "approval": {"by": "ops"}, "approved_by": "ops", "shipped": True},
        )
        self.assertEqual(self.branch_rows(instance), [])
        self.assertEqual(self.runs_queued(instance), 0)
        shown = self.cli_json("show", instance)
        self.assertEqual(shown["branches"], [])
        self.assertEqual([row["branch"] for row in shown["journal"]], [s.branch for s in steps])
        self.assert_no_tracebacks()


# 2. Join any --------------------------------------------------------------------------------------

FIRST: dict[str, Any] = {
    "id": "first",
    "start": "race",
    "activities": {
        "race": {"type": "parallel", "branches": ["nap", "hold", "delegate"], "join": "any", "next": "after"},
        "nap": {"type": "timer", "duration": "1500ms", "next": "woke"},
        "woke": {"type": "set", "values": {"winner": "nap"}},
        "hold": {"type": "signal", "name": "{input.name}", "next": "held"},
        "held": {"type": "set", "values": {"winner": "hold"}},
        "delegate": {"type": "run", "definition": "forever", "input": {"name": "{input.name}-child"},
                     "result": "child", "next": "delegated"},
        "delegated": {"type": "set", "values": {"winner": "delegate"}},
        "after": {"type": "set", "values": {"done": True}},
    },
}  # fmt: skip

# Two io branches, join any: the slow one is removed while its work runs, in the same burst.
FIRST_IO: dict[str, Any] = {
    "id": "first-io",
    "start": "race",
    "activities": {
        "race": {"type": "parallel", "branches": ["quick", "slow"], "join": "any", "next": "ship"},
        "quick": {"type": "work", "duration": "100ms", "kind": "io"},
        "slow": {"type": "work", "duration": "500ms", "kind": "io"},
        "ship": {"type": "set", "values": {"shipped": True}, "next": "done"},
        "done": {"type": "set", "values": {"done": True}},
    },
}

# Join any whose loser has a nested branch, resumed (with the winner) by one signal: the nested
# branch's work ends after the winner removed it and its parent branch.
FIRST_NESTED: dict[str, Any] = {
    "id": "first-nested",
    "start": "outer",
    "activities": {
        "outer": {"type": "parallel", "branches": ["inner", "s-wait"], "join": "any", "next": "after"},
        "inner": {"type": "parallel", "branches": ["n-wait"]},
        "n-wait": {"type": "signal", "name": "{input.name}", "next": "n-work"},
        "n-work": {"type": "work", "duration": "400ms", "kind": "io"},
        "s-wait": {"type": "signal", "name": "{input.name}", "next": "s-work"},
        "s-work": {"type": "work", "duration": "50ms", "kind": "io"},
        "after": {"type": "set", "values": {"shipped": True}},
    },
}


class JoinAny(BranchTestCase):
    def test_the_first_branch_to_end_removes_the_others_their_waits_and_their_child(self) -> None:
        node = self.serve("n1")
        self.nf.define(forever())
        self.nf.define(FIRST)
        instance = self.nf.start("first", {"name": "hold-1"})
        self.settle(lambda: len(self.branch_rows(instance)) == 3, 30, "three branches waiting")
        rows = self.branch_rows(instance)
        self.assertEqual([row[:5] for row in rows], [
            ("race/0", "", "nap", "timer", None),
            ("race/1", "", "hold", "signal", "hold-1"),
            ("race/2", "", "delegate", "child", None),
        ])  # fmt: skip
        child = rows[2][5]
        self.assertIsNotNone(child, "the run branch waits for its child")
        self.assertEqual(
            self.query("SELECT definition, parent FROM instances WHERE id = ?", child), [("forever", instance)]
        )
        self.assertEqual(self.wait_ended(instance, node), "completed")

        variables = self.variables(instance)
        self.assertEqual((variables.get("winner"), variables.get("done")), ("nap", True))
        steps = self.steps(instance)
        self.assert_sound(steps)
        rows = [(s.activity, s.branch, s.outcome) for s in steps]
        started = f"started forever v1: instance {child}"
        short = [(a, b, "waiting until" if o.startswith("waiting until") else o) for a, b, o in rows]
        self.assertEqual(Counter(short), Counter([
            ("race", None, "forked 3 branch(es): nap, hold, delegate (join any)"),
            ("nap", "race/0", "waiting until"),
            ("hold", "race/1", "waiting for signal hold-1"),
            ("delegate", "race/2", started),
            ("nap", "race/0", "timer elapsed"),
            ("woke", "race/0", "set winner"),
            ("race", None, "joined: branch race/0 ended first; 2 cancelled"),
            ("after", None, "set done"),
        ]), rows)  # fmt: skip
        join = next(s for s in steps if s.outcome.startswith("joined"))
        self.assertGreaterEqual(join.started, steps[0].started + 1.5, "not before the timer")
        self.assertEqual(join.step, max(s.step for s in steps if s.branch) + 1, "the join right after the winner")
        self.assertEqual(self.branch_rows(instance), [], "the losers' rows (and their waits) are gone")
        self.assertEqual(self.count("SELECT COUNT(*) FROM branches"), 0)

        # The child was cancelled by the join's commit.
        self.assertEqual(self.status(child), "cancelled")
        last = self.steps(child)[-1]
        self.assertRegex(
            last.outcome, rf"^cancelled: its parent {instance} stopped waiting for it \(was (waiting|running)\)$"
        )
        # Nothing waits for the signals now: each is kept.
        for name in ("hold-1", "hold-1-child"):
            sent = self.cli_json("signal", name)
            self.assertEqual((sent["resumed"], sent["kept"]), ([], True), f"{name}: {sent}")
        self.assertEqual(self.count("SELECT COUNT(*) FROM kept_signals"), 2)
        self.assertEqual((self.runs_queued(instance), self.runs_queued(child)), (0, 0))
        self.assertEqual(self.status(instance), "completed")
        self.assert_no_tracebacks()

    def test_a_branch_removed_while_its_work_runs_does_not_join_again(self) -> None:
        node = self.serve("n1")
        self.nf.define(FIRST_IO)
        instance = self.nf.start("first-io")
        self.assertEqual(self.wait_ended(instance, node), "completed")
        steps = self.steps(instance)
        self.assert_sound(steps)
        rows = [(s.activity, s.branch, s.outcome) for s in steps]
        shown = "\n".join(map(str, rows))
        joins = [row for row in rows if row[2].startswith("joined")]
        self.assertEqual(joins, [("race", None, "joined: branch race/0 ended first; 1 cancelled")], shown)
        self.assertIn(("ship", None, "set shipped"), rows, f"the activity after the join ran:\n{shown}")
        self.assertEqual(self.variables(instance).get("shipped"), True, shown)
        self.assertEqual(self.branch_rows(instance), [])

    def test_a_nested_branch_of_a_removed_branch_ending_in_that_burst_does_not_break_it(self) -> None:
        node = self.serve("n1")
        self.nf.define(FIRST_NESTED)
        instance = self.nf.start("first-nested", {"name": "go-1"})
        self.settle(lambda: len(self.branch_rows(instance)) == 3, 30, "three branches (one nested) waiting")
        self.assertEqual([row[:5] for row in self.branch_rows(instance)], [
            ("outer/0", "", "inner", "fork", None),
            ("outer/0/inner/0", "outer/0", "n-wait", "signal", "go-1"),
            ("outer/1", "", "s-wait", "signal", "go-1"),
        ])  # fmt: skip
        self.assertEqual(self.nf.signal("go-1", {}).resumed, (instance,))  # both waits in one commit
        self.assertEqual(self.wait_ended(instance, node, 20), "completed")
        steps = self.steps(instance)
        self.assert_sound(steps)
        rows = [(s.activity, s.branch, s.outcome) for s in steps]
        self.assertIn(("outer", None, "joined: branch outer/1 ended first; 1 cancelled"), rows)
        self.assertEqual(self.variables(instance).get("shipped"), True, rows)
        self.assertEqual(self.branch_rows(instance), [])
        self.assert_no_tracebacks()


# 3. for_each ---------------------------------------------------------------------------------------

IN_TURN: dict[str, Any] = {
    "id": "lines",
    "start": "each",
    "variables": {"n": 0},
    "activities": {
        "each": {"type": "for_each", "items": "{input.lines}", "as": "line", "body": "say", "next": "done"},
        "say": {"type": "log", "message": "line {line}", "next": "keep"},
        "keep": {"type": "set", "values": {"last": "{line}"}, "next": "count"},
        "count": {"type": "set", "add": {"n": 1}},
        "done": {"type": "log", "message": "counted {n}, last {last}"},
    },
}
FANOUT: dict[str, Any] = {
    "id": "fanout",
    "start": "each",
    "activities": {
        "each": {"type": "for_each", "items": "{input.items}", "as": "item", "body": "work", "parallel": True,
                 "next": "done"},
        "work": {"type": "work", "duration": "200ms", "kind": "io"},
        "done": {"type": "set", "values": {"finished": True}},
    },
}  # fmt: skip


class ForEach(BranchTestCase):
    def test_in_turn_the_items_go_one_after_the_other_and_in_parallel_they_overlap(self) -> None:
        node = self.serve("n1")
        self.nf.define(IN_TURN)
        self.nf.define(FANOUT)
        turn = self.nf.start("lines", {"lines": ["a", "b", "c"]})
        fan = self.nf.start("fanout", {"items": list(range(20))})
        self.assertEqual(self.wait_ended(turn, node), "completed")
        self.assertEqual(self.wait_ended(fan, node), "completed")

        # In turn.
        variables = self.variables(turn)
        self.assertEqual((variables["n"], variables["last"]), (3, "c"))
        self.assertNotIn("line", variables, "the item is a variable of its branch only")
        steps = self.steps(turn)
        self.assert_sound(steps)
        self.assertEqual((steps[0].activity, steps[0].branch, steps[0].outcome), ("each", None, "3 item(s), in turn"))
        self.assertEqual(
            [(s.activity, s.branch, s.outcome) for s in steps[-2:]],
            [("each", None, "joined: all 3 branch(es) ended"), ("done", None, "counted 3, last c")],
        )
        body = steps[1:-2]
        expected = [
            (activity, f"each/{index}", outcome)
            for index, item in enumerate("abc")
            for activity, outcome in (("say", f"line {item}"), ("keep", "set last"), ("count", "set n"))
        ]
        self.assertEqual([(s.activity, s.branch, s.outcome) for s in body], expected, "the items in order")
        for earlier, later in itertools.pairwise(body):
            self.assertGreaterEqual(later.started, earlier.ended - 0.001, "one step after the other")
        self.assertIn(f"lines {turn} say (each/2): line c", node.text())

        # In parallel: twenty works at once, on the one node.
        steps = self.steps(fan)
        self.assert_sound(steps)
        self.assertEqual((steps[0].outcome, steps[0].branch), ("20 item(s), in parallel", None))
        works = [s for s in steps if s.activity == "work"]
        self.assertEqual(sorted(s.branch for s in works), sorted(f"each/{i}" for i in range(20)))
        self.assertEqual({s.outcome for s in works}, {"worked 200ms (io)"})
        self.assertEqual({s.node for s in steps}, {"n1"})
        join = next(s for s in steps if s.outcome.startswith("joined"))
        self.assertEqual(join.outcome, "joined: all 20 branch(es) ended")
        self.assertGreater(join.step, max(s.step for s in works))
        overlapping = sum(
            a.started < b.ended and b.started < a.ended for i, a in enumerate(works) for b in works[i + 1 :]
        )
        print(f"\n  for_each in parallel: {overlapping} of 190 pairs of works overlap", file=sys.stderr)
        self.assertGreaterEqual(overlapping, 2, "the works overlap in time")
        self.assertTrue(self.variables(fan)["finished"])
        self.assertEqual(self.count("SELECT COUNT(*) FROM branches"), 0)
        self.assert_no_tracebacks()


# 4. Signals to branches ---------------------------------------------------------------------------

QUARTET: dict[str, Any] = {
    "id": "quartet",
    "start": "all",
    "activities": {
        "all": {"type": "parallel", "branches": ["wa", "wb", "wc", "late"], "next": "done"},
        "wa": {"type": "signal", "name": "{input.tag}-a", "result": "got_a"},
        "wb": {"type": "signal", "name": "{input.tag}-b", "result": "got_b"},
        "wc": {"type": "signal", "name": "{input.tag}-c", "result": "got_c"},
        "late": {"type": "timer", "duration": "300ms", "next": "wd"},
        "wd": {"type": "signal", "name": "{input.tag}-d", "result": "got_d"},
        "done": {"type": "set", "values": {"finished": True}},
    },
}

# Sends the signals in the order given, from this other process (ttl 0: a signal that resumes
# nothing is dropped, not kept), each after a random pause; after each, waits until the branch
# that took it is gone, and prints what it resumed and which waits are left.
SENDER = """
import json, os, random, sys, time
import nodeflow

instance, names, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
nf = nodeflow.connect(os.environ["NODEFLOW_DB"])
rows = lambda: nf.store.read(lambda conn: conn.execute(
    "SELECT name, waiting_for FROM branches WHERE instance = ? ORDER BY name", (instance,)).fetchall())
for name in names:
    time.sleep(rng.uniform(0, 0.2))
    before = rows()
    at = time.time()
    outcome = nf.signal(name, {"to": name}, ttl=0)
    deadline = time.time() + 30
    while len(rows()) >= len(before) and time.time() < deadline:
        time.sleep(0.01)
    print(json.dumps({"name": name, "at": at, "resumed": list(outcome.resumed), "kept": outcome.kept,
                      "before": before, "after": rows()}), flush=True)
nf.close()
"""


class BranchSignals(BranchTestCase):
    def test_each_signal_resumes_exactly_its_branch_and_a_kept_one_is_taken_when_its_branch_waits(self) -> None:
        node = self.serve("n1")
        self.nf.define(QUARTET)
        kept = self.cli_json("signal", "t1-d", "--input", '{"to": "t1-d"}')
        self.assertTrue(kept["kept"], kept)
        instance = self.nf.start("quartet", {"tag": "t1"})
        # a, b and c wait; late took the kept d when it reached its wait, and ended.
        waits = {f"t1-{x}" for x in "abc"}

        def three_left() -> bool:
            rows = self.branch_rows(instance)
            return {row[4] for row in rows} == waits and len(rows) == 3

        self.settle(three_left, 30, "a, b and c waiting, late ended")
        self.assertEqual(self.count("SELECT COUNT(*) FROM kept_signals"), 0, "the kept signal was taken")
        self.assertEqual([row[0] for row in self.branch_rows(instance)], ["all/0", "all/1", "all/2"])
        late = [s for s in self.steps(instance) if s.branch == "all/3"]
        self.assertEqual([s.activity for s in late], ["late", "late", "wd", "wd"], late)
        self.assertRegex(late[2].outcome, r"^waiting for signal t1-d: it was sent at \S+ and kept; resumed$")
        self.assertEqual(late[3].outcome, "signal received")
        self.assertGreaterEqual(late[2].started, late[0].started + 0.3, "it waited after its timer")

        seed = random.randrange(1 << 30)
        order = random.Random(seed).sample(sorted(waits), 3)
        sender = self.spawn_python(SENDER, instance, json.dumps(order), str(seed))
        code, out, err = self.finish(sender, timeout=90)
        self.assertEqual(code, 0, err)
        sent = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([entry["name"] for entry in sent], order, f"seed {seed}")
        left = set(waits)
        for entry in sent:
            where = f"seed {seed}, order {order}: {entry}"
            self.assertEqual((entry["resumed"], entry["kept"]), ([instance], False), where)
            self.assertEqual({wait for _, wait in entry["before"]}, left, where)
            left.discard(entry["name"])
            self.assertEqual({wait for _, wait in entry["after"]}, left, f"exactly its branch went; {where}")
        self.assertEqual(self.wait_ended(instance, node), "completed")

        variables = self.variables(instance)
        for x in "abcd":
            self.assertEqual(variables[f"got_{x}"], {"to": f"t1-{x}"}, f"branch {x} got its own signal")
        steps = self.steps(instance)
        self.assert_sound(steps)
        at = {entry["name"]: entry["at"] for entry in sent}
        for index, x in enumerate("abc"):
            mine = [(s.activity, s.outcome) for s in steps if s.branch == f"all/{index}"]
            self.assertEqual(mine, [(f"w{x}", f"waiting for signal t1-{x}"), (f"w{x}", "signal received")])
            received = next(s for s in steps if s.branch == f"all/{index}" and s.outcome == "signal received")
            self.assertGreaterEqual(received.started, at[f"t1-{x}"] - 0.01, f"t1-{x} received after it was sent")
        self.assertEqual(steps[-2].outcome, "joined: all 4 branch(es) ended")
        self.assertEqual(self.branch_rows(instance), [])
        print(f"\n  signals sent in the order {order} (seed {seed})", file=sys.stderr)
        self.assert_no_tracebacks()


# 5. Calls in branches: retried, keyed ------------------------------------------------------------

RETRY = {"attempts": 3, "delay": "0.2s"}
CALLS: dict[str, Any] = {
    "id": "calls",
    "start": "pay",
    "activities": {
        "pay": {"type": "parallel", "branches": ["charge-a", "charge-b", "slow"], "next": "each"},
        "charge-a": {"type": "call", "function": "flaky", "result": "a", "retry": RETRY},
        "charge-b": {"type": "call", "function": "brapp:flaky", "result": "b", "retry": RETRY},
        "slow": {"type": "work", "duration": "1s", "kind": "io"},
        "each": {"type": "for_each", "items": "{input.items}", "as": "item", "body": "charge-item",
                 "parallel": True, "next": "done"},
        "charge-item": {"type": "call", "function": "flaky", "result": "last_item", "retry": RETRY},
        "done": {"type": "set", "values": {"finished": True}},
    },
}  # fmt: skip

# A branch's call runs in a burst that a signal to the other branch overtakes (it is refused at
# its commit), then runs again.
OVERTAKEN: dict[str, Any] = {
    "id": "overtaken",
    "start": "both",
    "activities": {
        "both": {"type": "parallel", "branches": ["hold", "nap"], "next": "done"},
        "hold": {"type": "signal", "name": "{input.name}"},
        "nap": {"type": "timer", "duration": "100ms", "next": "pay"},
        "pay": {"type": "call", "function": "slowkey"},
        "done": {"type": "set", "values": {"finished": True}},
    },
}


class BranchCalls(BranchTestCase):
    def test_a_retried_call_keeps_its_key_and_calls_of_other_branches_have_other_keys(self) -> None:
        self.write_app()
        node = self.serve("n1", "--app", "brapp.py")
        self.nf.define(CALLS)
        keys_path = os.path.join(self.dir, "keys.txt")
        instance = self.nf.start("calls", {"keys": keys_path, "items": ["x", "y"]})
        self.assertEqual(self.wait_ended(instance, node), "completed")
        self.assertTrue(self.variables(instance)["finished"])

        with open(keys_path) as found:
            tries = [line.split() for line in found.read().splitlines()]  # key, step, activity, item
        by_key: dict[str, list[list[str]]] = {}
        for line in tries:
            by_key.setdefault(line[0], []).append(line)
        self.assertEqual(len(by_key), 4, f"four calls, four keys: {tries}")
        steps = self.steps(instance)
        self.assert_sound(steps)
        calls = [s for s in steps if s.type == "call"]
        self.assertEqual(len(calls), 8, calls)
        for key, mine in by_key.items():
            self.assertEqual(len(mine), 2, f"two tries of the call keyed {key}: {mine}")
            (activity,), (_item,) = {line[2] for line in mine}, {line[3] for line in mine}
            first, second = (int(line[1]) for line in mine)
            self.assertLess(first, second)
            self.assertEqual(key, path_key(instance, steps, first), "the key: the branch and its path's step")
            journaled = {s.step: s for s in calls}
            self.assertEqual(journaled[first].activity, activity)
            self.assertEqual(journaled[second].activity, activity)
            self.assertEqual(journaled[first].branch, journaled[second].branch, "both tries on one branch")
            self.assertRegex(journaled[first].outcome, r"^error \(try 1 of 3; next in 200ms\): RuntimeError: first try")
            function = "brapp:flaky" if activity == "charge-b" else "flaky"
            self.assertEqual(journaled[second].outcome, f"called {function}")
            self.assertGreaterEqual(journaled[second].started, journaled[first].ended + 0.2 - 0.01, "after the delay")
        branches = {s.branch for s in calls}
        self.assertEqual(branches, {"pay/0", "pay/1", "each/0", "each/1"})
        self.assertEqual({line[3] for line in tries if line[2] == "charge-item"}, {"x", "y"})
        variables = self.variables(instance)
        self.assertEqual(variables["a"]["tries"], 2)
        self.assertEqual(variables["b"]["tries"], 2)
        self.assertEqual(self.branch_rows(instance), [])
        self.assert_no_tracebacks()

    def test_a_call_run_again_after_its_burst_was_refused_keeps_its_key(self) -> None:
        self.write_app()
        node = self.serve("n1", "--app", "brapp.py")
        self.nf.define(OVERTAKEN)
        keys_path = os.path.join(self.dir, "keys.txt")
        instance = self.nf.start("overtaken", {"name": "go-1", "keys": keys_path})
        self.settle(lambda: os.path.exists(keys_path) and os.path.getsize(keys_path) > 0, 30, "the call begun")
        time.sleep(0.2)  # the call takes 1 s: the signal comes while it runs
        self.assertEqual(self.nf.signal("go-1", {}, ttl=0).resumed, (instance,))
        self.assertEqual(self.wait_ended(instance, node), "completed")
        refused = re.findall(r"burst of fence (\d+) not committed: the instance moved past seq", node.text())
        with open(keys_path) as found:
            tries = [line.split() for line in found.read().splitlines()]  # key, step, fence
        self.assertEqual(len(refused), 1, f"the signal overtook the call's burst: {tries}")
        self.assertEqual([fence for _, _, fence in tries][:1], refused, "the call ran in the refused burst")
        self.assertEqual(len(tries), 2, f"run again after the refusal: {tries}")
        steps = self.steps(instance)
        self.assert_sound(steps)
        (paid,) = [s for s in steps if s.activity == "pay"]
        self.assertEqual(self.variables(instance)["pay"], path_key(instance, steps, paid.step))
        self.assertEqual(
            {key for key, _, _ in tries}, {path_key(instance, steps, paid.step)},
            f"one key for the call run twice (its first burst was lost); tries (key, step, fence): {tries}; "
            f"journal: {[(s.step, s.branch, s.activity, s.outcome) for s in steps]}",
        )  # fmt: skip


# 6. Faults, retry and cancel -----------------------------------------------------------------------

REFUSE: dict[str, Any] = {
    "id": "refuse",
    "start": "both",
    "activities": {
        "both": {"type": "parallel", "branches": ["hold", "check"], "next": "ship"},
        "hold": {"type": "signal", "name": "{input.name}"},
        "check": {"type": "work", "duration": "50ms", "kind": "io", "next": "refuse"},
        "refuse": {"type": "fail", "message": "no stock for {input.sku}"},
        "ship": {"type": "set", "values": {"shipped": True}},
    },
}
HOLD_ALL: dict[str, Any] = {
    "id": "holdall",
    "start": "fan",
    "activities": {
        "fan": {"type": "parallel", "branches": ["hold", "delegate", "inner"], "next": "after"},
        "hold": {"type": "signal", "name": "{input.name}"},
        "delegate": {"type": "run", "definition": "forever", "input": {"name": "{input.name}-child"}},
        "inner": {"type": "parallel", "branches": ["nap", "deep"]},
        "nap": {"type": "timer", "duration": "1h"},
        "deep": {"type": "run", "definition": "forever", "input": {"name": "{input.name}-deep"}},
        "after": {"type": "set", "values": {"done": True}},
    },
}
# One branch's call faults at once (one try) while the other's call takes 500 ms.
GATED: dict[str, Any] = {
    "id": "gated",
    "start": "both",
    "variables": {"n": 0},
    "activities": {
        "both": {"type": "parallel", "branches": ["open", "pay"], "next": "ship"},
        "open": {"type": "call", "function": "gate", "retry": {"attempts": 1}},
        "pay": {"type": "call", "function": "charge", "next": "mark"},
        "mark": {"type": "set", "add": {"n": 1}},
        "ship": {"type": "set", "values": {"shipped": True}},
    },
}


class BranchFaults(BranchTestCase):
    def test_a_failing_branch_faults_the_instance_and_retry_faults_it_there_again(self) -> None:
        node = self.serve("n1")
        self.nf.define(REFUSE)
        instance = self.nf.start("refuse", {"name": "never-1", "sku": "sku-7"})
        self.assertEqual(self.wait_ended(instance, node), "faulted")
        error = "branch both/1 at refuse: no stock for sku-7"
        self.assertEqual(self.query("SELECT position, error FROM instances WHERE id = ?", instance), [("both", error)])
        steps = self.steps(instance)
        self.assert_sound(steps)
        self.assertEqual((steps[-1].activity, steps[-1].branch, steps[-1].outcome),
                         ("refuse", "both/1", "failed: no stock for sku-7"))  # fmt: skip
        self.assertEqual([row[:5] for row in self.branch_rows(instance)], [
            ("both/0", "", "hold", "signal", "never-1"), ("both/1", "", "refuse", None, None),
        ])  # fmt: skip
        self.assertIn(f"faulted at both: {error}", self.cli_ok("show", instance).stdout)
        self.assertIn(f"instance {instance} faulted at both: {error}", node.text())

        self.assertEqual(self.cli_ok("retry", instance).stdout, f"instance {instance} resumed at both\n")
        self.settle(lambda: len(self.steps(instance)) > len(steps), 30, "the retried branch ran")
        self.assertEqual(self.wait_ended(instance, node), "faulted")
        again = self.steps(instance)
        self.assert_sound(again)
        self.assertEqual(again[: len(steps)], steps, "the journal so far untouched")
        self.assertEqual([(s.activity, s.branch, s.outcome) for s in again[len(steps) :]],
                         [("refuse", "both/1", "failed: no stock for sku-7")])  # fmt: skip
        self.assertGreater(again[-1].fence, steps[-1].fence)
        self.assertEqual(self.query("SELECT error FROM instances WHERE id = ?", instance), [(error,)])
        self.assertEqual([row[:5] for row in self.branch_rows(instance)], [
            ("both/0", "", "hold", "signal", "never-1"), ("both/1", "", "refuse", None, None),
        ])  # fmt: skip

        # Cancel: its rows go.
        cancelled = self.cli_json("cancel", instance)
        self.assertEqual(cancelled["status"], "cancelled")
        self.assertEqual(self.branch_rows(instance), [])
        self.assertEqual(self.nf.signal("never-1", {}, ttl=0).resumed, ())
        self.assert_no_tracebacks()

    def test_cancel_removes_every_branch_row_nested_too_and_cancels_the_children(self) -> None:
        self.serve("n1")
        self.nf.define(forever())
        self.nf.define(HOLD_ALL)
        instance = self.nf.start("holdall", {"name": "h1"})

        def settled() -> bool:
            children = self.query("SELECT status FROM instances WHERE parent = ?", instance)
            return len(self.branch_rows(instance)) == 5 and [s for (s,) in children] == ["waiting", "waiting"]

        self.settle(settled, 30, "five branches (two nested) waiting, two children waiting")
        rows = self.branch_rows(instance)
        self.assertEqual([row[:5] for row in rows], [
            ("fan/0", "", "hold", "signal", "h1"),
            ("fan/1", "", "delegate", "child", None),
            ("fan/2", "", "inner", "fork", None),
            ("fan/2/inner/0", "fan/2", "nap", "timer", None),
            ("fan/2/inner/1", "fan/2", "deep", "child", None),
        ])  # fmt: skip
        children = {rows[1][5], rows[4][5]}
        self.assertEqual(self.runs_queued(instance), 1, "the 1 h timer's run message")
        text = self.cli_ok("show", instance).stdout
        self.assertIn("waiting at fan for 5 branch(es)", text)
        self.assertRegex(text, r"\nbranch fan/2/inner/0 at nap: due \S+\n")

        self.assertEqual(self.cli_json("cancel", instance, "--reason", "test")["status"], "cancelled")
        self.assertEqual(self.branch_rows(instance), [])
        self.assertEqual(self.count("SELECT COUNT(*) FROM branches"), 0)
        self.assertEqual(self.runs_queued(instance), 0, "the timer's run message went")
        self.assertEqual(self.steps(instance)[-1].outcome, "cancelled: test (was waiting)")
        for child in children:
            self.assertEqual(self.status(child), "cancelled")
            self.assertEqual(self.steps(child)[-1].outcome, f"cancelled: its parent {instance} was cancelled "
                             "(was waiting)")  # fmt: skip
            self.assertEqual(self.runs_queued(child), 0)
        for name in ("h1", "h1-child", "h1-deep"):
            self.assertEqual(self.nf.signal(name, {}, ttl=0).resumed, (), name)
        self.assert_no_tracebacks()

    def test_retry_does_not_run_again_a_step_another_branch_ended_after_the_fault(self) -> None:
        self.write_app()
        node = self.serve("n1", "--app", "brapp.py")
        self.nf.define(GATED)
        keys_path, flag = os.path.join(self.dir, "charged.txt"), os.path.join(self.dir, "open")
        instance = self.nf.start("gated", {"keys": keys_path, "flag": flag})
        self.assertEqual(self.wait_ended(instance, node), "faulted")
        steps = self.steps(instance)
        rows = [(s.activity, s.branch, s.outcome) for s in steps]
        self.assertIn(("open", "both/0", "faulted after 1 tries: RuntimeError: the gate is closed"), rows)
        self.assertIn(("pay", "both/1", "called charge"), rows, "the charge ended (after the fault) and was journaled")
        paid = steps[rows.index(("pay", "both/1", "called charge"))]
        self.assertEqual(self.variables(instance)["pay"], path_key(instance, steps, paid.step), "its result stored")
        where = f"branch rows after the fault: {self.branch_rows(instance)}"

        with open(flag, "w"):
            pass  # the cause mended
        self.cli_ok("retry", instance)
        self.assertEqual(self.wait_ended(instance, node), "completed")
        with open(keys_path) as found:
            charged = found.read().splitlines()
        after = self.steps(instance)
        self.assert_sound(after)
        rows = [(s.activity, s.branch, s.outcome) for s in after]
        shown = "\n".join(map(str, rows))
        self.assertEqual(rows.count(("pay", "both/1", "called charge")), 1, f"the charge journaled once; {where}:\n"
                         f"{shown}")  # fmt: skip
        self.assertEqual(len(charged), 1, f"charged once, not again under another key: {charged}; {where}")
        self.assertEqual(self.variables(instance)["n"], 1)


# 7. A node killed mid-burst ------------------------------------------------------------------------

WIDE = 20
KILLED: dict[str, Any] = {
    "id": "wide",
    "start": "prep",
    "variables": {"done": 0},
    "activities": {
        "prep": {"type": "set", "values": {"ready": True}, "next": "nap"},
        "nap": {"type": "timer", "duration": "50ms", "next": "fan"},
        "fan": {"type": "parallel", "branches": [f"b{i:02d}" for i in range(WIDE)], "next": "after"},
        **{f"b{i:02d}": {"type": "work", "duration": "1500ms", "kind": "io", "next": "mark"} for i in range(WIDE)},
        "mark": {"type": "set", "add": {"done": 1}},
        "after": {"type": "log", "message": "done {done}"},
    },
}


class KilledMidBurst(BranchTestCase):
    def test_another_node_runs_the_branches_again_and_journals_each_step_once(self) -> None:
        nodes = {node.node_id: node for node in self.cluster("n1", "n2")}
        self.nf.define(KILLED)
        instance = self.nf.start("wide")

        def holder() -> str | None:
            rows = self.query(
                "SELECT lease_owner FROM messages WHERE queue = ? AND json_extract(body, '$.run') = ? "
                "AND lease_owner IS NOT NULL",
                nodeflow.WORKFLOW_QUEUE,
                instance,
            )
            return rows[0][0] if rows else None

        # The burst of the fan: begun after the nap's burst committed (two steps), not yet committed.
        self.settle(lambda: len(self.steps(instance)) == 2 and holder() is not None, 30, "the fan's burst begun")
        time.sleep(0.4)  # well into the works (1.5 s each)
        victim_id = holder()
        self.assertIsNotNone(victim_id)
        assert victim_id is not None
        self.assertEqual(len(self.steps(instance)), 2, "the fan's burst has not committed: the kill is mid-burst")
        victim = nodes[victim_id]
        os.kill(victim.pid, signal.SIGKILL)
        victim.process.wait(timeout=10)
        killed_at = time.time()
        survivor = next(node for node in nodes.values() if node is not victim)

        self.assertEqual(self.wait_ended(instance, survivor, 60), "completed")
        steps = self.steps(instance)
        self.assert_sound(steps)
        rows = [(s.activity, s.branch, s.outcome) for s in steps]
        self.assertEqual(len(rows), len(set(rows)), f"no step twice: {rows}")
        self.assertEqual([r[0] for r in rows[:4]], ["prep", "nap", "nap", "fan"])
        self.assertEqual(rows[2], ("nap", None, "timer elapsed"))
        for index in range(WIDE):
            branch = f"fan/{index}"
            self.assertEqual([(a, o) for a, b, o in rows if b == branch],
                             [(f"b{index:02d}", "worked 1.5s (io)"), ("mark", "set done")], branch)  # fmt: skip
        self.assertEqual(rows[-2:], [("fan", None, f"joined: all {WIDE} branch(es) ended"), ("after", None,
                                     f"done {WIDE}")])  # fmt: skip
        self.assertEqual(len(rows), 4 + 2 * WIDE + 2)
        rerun = steps[2:]
        self.assertEqual({s.node for s in rerun}, {survivor.node_id}, "the survivor ran the burst again, and on")
        self.assertGreater(min(s.started for s in rerun), killed_at - 0.5, "run again after the kill")
        self.assertGreater(min(s.fence for s in rerun), steps[1].fence)
        self.assertEqual(self.variables(instance)["done"], WIDE)
        self.assertEqual(self.branch_rows(instance), [])
        self.assertEqual(self.runs_queued(instance), 0)
        self.assertNotIn("Traceback", survivor.text())


# 8. Limits -----------------------------------------------------------------------------------------

MANY: dict[str, Any] = {
    "id": "many",
    "start": "each",
    "variables": {"n": 0},
    "activities": {
        "each": {"type": "for_each", "items": "{input.items}", "as": "item", "body": "count", "parallel": True,
                 "next": "done"},
        "count": {"type": "set", "add": {"n": 1}},
        "done": {"type": "set", "values": {"finished": True}},
    },
}  # fmt: skip


def broken(activity: dict[str, Any]) -> dict[str, Any]:
    """A definition whose first activity is ``activity`` (a parallel or for_each), with a body and a next."""
    return {
        "id": "broken",
        "start": "fork",
        "activities": {
            "fork": {**activity, "next": "after"},
            "pack": {"type": "set", "values": {"packed": True}},
            "bill": {"type": "set", "values": {"billed": True}},
            "after": {"type": "set", "values": {"done": True}},
        },
    }


class Limits(BranchTestCase):
    def test_a_for_each_over_1001_items_faults_and_define_refuses_bad_branching_activities(self) -> None:
        # define first, with no node running: a refusal must change nothing in the database.
        items = "{input.items}"
        # (activity, what the refusal says, whether the command line is tried too: the API always is)
        cases: list[tuple[dict[str, Any], str, bool]] = [
            ({"type": "parallel", "branches": []}, "activities.fork.branches: must be a list of 1 to 100 activity ids",
             True),
            ({"type": "parallel", "branches": "pack"}, "activities.fork.branches: must be a list of 1 to 100", True),
            ({"type": "parallel", "branches": ["pack", "bill"], "join": "first"},
             'activities.fork.join: must be "all" (every branch ends) or "any" (the first one), not "first"', True),
            ({"type": "for_each", "items": items, "body": "pack"}, "activities.fork.as: is missing", True),
            ({"type": "for_each", "items": items, "as": "item"}, "activities.fork.body: is missing", True),
            ({"type": "for_each", "as": "item", "body": "pack"}, "activities.fork.items: is missing", True),
            ({"type": "for_each", "items": items, "as": "item", "body": "pack", "parallel": "yes"},
             'activities.fork.parallel: must be true or false, not "yes"', True),
            ({"type": "parallel", "branches": ["pack"] + [f"x{i}" for i in range(100)]},
             "activities.fork.branches: must be a list of 1 to 100", False),
            ({"type": "parallel", "branches": ["pack", "pack"]},
             "activities.fork.branches: must name each branch's first activity once", False),
            ({"type": "parallel", "branches": ["pack", "nowhere"]},
             'activities.fork.branches[1]: no activity named "nowhere"', False),
            ({"type": "parallel", "branches": ["pack", "bill"], "join": None}, "activities.fork.join: must be", False),
            ({"type": "for_each", "items": items, "as": "item", "body": "pack", "parallel": 1},
             "activities.fork.parallel: must be true or false, not 1", False),
            ({"type": "for_each", "items": items, "as": "an item", "body": "pack"}, "activities.fork.as: must be a",
             False),
            ({"type": "for_each", "items": items, "as": "item", "body": "nowhere"},
             'activities.fork.body: no activity named "nowhere"', False),
        ]  # fmt: skip
        self.nf.define(forever())  # the database exists, with something in it
        before = table_rows(self.db, WATCHED)
        paths = [write_json(self.dir, f"broken-{index}.json", broken(case[0])) for index, case in enumerate(cases)]
        tried = [(path, case) for path, case in zip(paths, cases, strict=True) if case[2]]
        results = list(self.pool.map(lambda item: self.cli("define", item[0]), tried))
        for (_, (activity, says, _)), result in zip(tried, results, strict=True):
            with self.subTest(activity=activity):
                self.assertEqual(result.returncode, 2, f"{activity}: {result.stdout}{result.stderr}")
                self.assertEqual(result.stdout, "")
                self.assertIn(says, result.stderr)
                self.assertIn("nothing was stored", result.stderr)
                self.assertNotIn("Traceback", result.stderr)
        for activity, says, _ in cases:
            with self.subTest(activity=activity):
                with self.assertRaises(nodeflow.InvalidDefinition) as refused:
                    self.nf.define(broken(activity))
                problems = refused.exception.problems
                self.assertTrue(any(says in problem for problem in problems), problems)
        self.assertEqual(table_rows(self.db, WATCHED), before, "nothing stored")

        node = self.serve("n1")
        self.nf.define(MANY)
        over = self.nf.start("many", {"items": list(range(1001))})
        most = self.nf.start("many", {"items": list(range(1000))})
        self.assertEqual(self.wait_ended(over, node), "faulted")
        error = "1001 items; a for_each goes through 1000 at most"
        self.assertEqual(self.query("SELECT position, error FROM instances WHERE id = ?", over), [("each", error)])
        self.assertEqual([(s.activity, s.outcome) for s in self.steps(over)], [("each", f"faulted: {error}")])
        self.assertEqual(self.branch_rows(over), [])

        self.assertEqual(self.wait_ended(most, node, 60), "completed")
        variables = self.variables(most)
        self.assertEqual((variables["n"], variables["finished"]), (1000, True))
        steps = self.steps(most)
        self.assert_sound(steps)
        self.assertEqual(len(steps), 1 + 1000 + 2)
        self.assertEqual(len({s.branch for s in steps if s.branch}), 1000)
        self.assertEqual(self.branch_rows(most), [])
        self.assert_no_tracebacks()

    def test_nested_for_each_over_one_large_list_faults_rather_than_copy_it_into_every_branch(self) -> None:
        # 100 branches, each going through the same 300 KB list: 30 MB of items were the branches
        # to copy it. They are held, together, to the variables' limit (1 MiB), as the variables are.
        node = self.serve("n1")
        self.nf.define({
            "id": "copies", "start": "fan",
            "activities": {
                "fan": {"type": "for_each", "items": "{input.outer}", "as": "o", "body": "inner", "parallel": True},
                "inner": {"type": "for_each", "items": "{input.big}", "as": "b", "body": "rest", "parallel": True},
                "rest": {"type": "timer", "duration": "1h"},
            },
        })  # fmt: skip
        big = ["x" * 3000 for _ in range(100)]  # about 300 KB
        copies = self.nf.start("copies", {"outer": list(range(100)), "big": big})
        self.assertEqual(self.wait_ended(copies, node), "faulted")
        error = self.query("SELECT error FROM instances WHERE id = ?", copies)[0][0]
        self.assertIn("bytes of for_each items; the most is 1048576", error)
        held = self.query("SELECT COALESCE(SUM(length(locals)), 0) FROM branches WHERE instance = ?", copies)[0][0]
        self.assertLessEqual(held, 1 << 20, "the branch rows hold no more than the limit")
        self.nf.cancel(copies)
        self.assertEqual(self.branch_rows(copies), [])
        self.assert_no_tracebacks()


# 9. A loop through a parallel ----------------------------------------------------------------------

ROUNDS = 50
LOOP: dict[str, Any] = {
    "id": "rounds",
    "start": "both",
    "variables": {"round": 0, "ticks": 0, "tallies": 0},
    "activities": {
        "both": {"type": "parallel", "branches": ["tick", "tally"], "next": "again"},
        "tick": {"type": "timer", "duration": "10ms", "next": "ticked"},
        "ticked": {"type": "set", "add": {"ticks": 1}},
        "tally": {"type": "set", "add": {"tallies": 1}},
        "again": {"type": "set", "add": {"round": 1}, "next": "check"},
        "check": {"type": "if", "condition": {"var": "round", "op": "<", "value": ROUNDS}, "then": "both",
                  "next": "done"},
        "done": {"type": "log", "message": "{round} rounds"},
    },
}  # fmt: skip


class LoopedParallel(BranchTestCase):
    def test_a_parallel_run_fifty_times_in_a_loop_completes_and_leaves_no_branch_row(self) -> None:
        node = self.serve("n1")
        self.nf.define(LOOP)
        instance = self.nf.start("rounds")
        self.assertEqual(self.wait_ended(instance, node, 60), "completed")
        variables = self.variables(instance)
        self.assertEqual((variables["round"], variables["ticks"], variables["tallies"]), (ROUNDS, ROUNDS, ROUNDS))
        steps = self.steps(instance)
        self.assert_sound(steps)
        outcomes = Counter((s.activity, s.branch, s.outcome.split(" until ")[0]) for s in steps)
        self.assertEqual(outcomes, Counter({
            ("both", None, "forked 2 branch(es): tick, tally (join all)"): ROUNDS,
            ("tick", "both/0", "waiting"): ROUNDS,
            ("tick", "both/0", "timer elapsed"): ROUNDS,
            ("ticked", "both/0", "set ticks"): ROUNDS,
            ("tally", "both/1", "set tallies"): ROUNDS,
            ("both", None, "joined: all 2 branch(es) ended"): ROUNDS,
            ("again", None, "set round"): ROUNDS,
            ("check", None, "true: both"): ROUNDS - 1,
            ("check", None, "false: done"): 1,
            ("done", None, f"{ROUNDS} rounds"): 1,
        }))  # fmt: skip
        # Round by round: fork, its branches' steps, then its join.
        forks = [s.step for s in steps if s.outcome.startswith("forked")]
        joins = [s.step for s in steps if s.outcome.startswith("joined")]
        for fork, join, following in zip(forks, joins, [*forks[1:], len(steps)], strict=True):
            self.assertLess(fork, join)
            inside = [s for s in steps if fork < s.step < join]
            self.assertTrue(inside and all(s.branch for s in inside), f"round at step {fork}: only branch steps")
            self.assertEqual(len(inside), 4)
            self.assertLess(join, following)
        self.assertEqual(self.count("SELECT COUNT(*) FROM branches"), 0)
        self.assertEqual(self.runs_queued(instance), 0)
        self.assert_no_tracebacks()


if __name__ == "__main__":
    unittest.main()
