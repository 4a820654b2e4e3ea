"""Section 9, child instances: ``run`` activities end to end on real ``serve`` processes.

Every node is a real ``python3 nodeflow.py serve`` process whose log (stderr) goes to a file
(printed when a test fails); a crash is a real SIGKILL. Instances are started, shown, cancelled
and retried from the command line and the Python API. What a test asserts is what the database
holds (the ``instances`` table with its ``parent`` and ``child`` columns, ``journal`` and
``messages``) and what the commands print.

Covered:

- Results: a parent runs a child that works 200 ms and sets variables; the parent goes on with
  the child's variables in its ``result`` variable (or under the activity id when none is
  given); the parent's journal says "started invoice v1: instance CHILD", then "instance CHILD
  completed", then its next step; the child's ``started_by`` names the parent and the activity;
  ``show`` (text and ``--json``) lists the child in the parent and the parent in the child; no
  run message is left. A timed run whose child ends in time goes on with its variables, and its
  queued timeout goes in the same commit.
- Listing: ``instances`` gives a parent waiting at a run the state ``show`` gives it ("waiting
  for instance CHILD"). FAILS on nodeflow as it stands: ``instances`` says "waiting until None"
  (no timeout) or "waiting until TIME-OF-THE-TIMEOUT" (see ManyChildren for the cause).
- Faults: a child that faults faults its parent at the run activity (the error names the child,
  its definition and its status, then the child's error); ``retry`` of the parent starts a new
  child (of the definition's newest version, here one that completes), the faulted one stays as
  it was. A run of a definition that does not exist faults the parent at once ("cannot run
  workflow ghost"), starting nothing; ``retry`` once it is defined runs it.
- Cancel down the tree: a parent whose first child completed and whose second runs a grandchild
  that waits for a signal, and a second tree whose grandchild is in the middle of a burst (it
  works 2 s): ``cancel TOP`` cancels every instance of the tree that has not ended (each gets
  one ``cancel`` journal row; a child's says its parent was cancelled), leaves the completed
  child alone, drops every queued run message of them at once, and the grandchild's burst under
  way commits nothing (its node says so). A parent cancelled in the middle of the burst that
  reaches its run (it works 2 s first) commits nothing and so starts no child. A signal then
  finds nothing waiting; a second cancel exits 2.
- Cancelling the child alone (``cancel CHILD``) faults the parent waiting for it at its run
  activity ("... it ran was cancelled: REASON"), while ``show`` said "waiting for instance
  CHILD"; a parent waiting with a timeout loses its queued timeout in that same commit.
- Timeouts: a run whose child waits for ever times out after 1 s (not before) in a burst of its
  own: "timed out after 1s waiting for instance CHILD, now cancelled: on to late", the child is
  cancelled ("its parent ... stopped waiting for it"); without ``on_timeout`` the parent faults
  and its child is cancelled as well, and that child's own child with it.
- Timeouts racing the child's end, on two nodes: thirty parents with a 1 s timeout (whose way
  works 300 ms in the burst that times out) run children working 0.9 s to 1.6 s: each parent
  ends one way only (the child's variables and "instance CHILD completed", or "timed out" with
  the child cancelled having committed no step of its own, never both), both ways happen, a
  refused timeout burst belongs to a parent that went the child's way, a refused child burst to
  a child that was cancelled.
- Depth: a definition whose only activity runs itself makes 33 instances, 0 to 32 deep; the
  deepest faults ("instances run by run activities nest 32 deep here; the most is 32"), each
  level above faults in turn naming the one below; no 34th appears; ``cancel`` of the top one
  cancels all 33 (none had ended), each level's row naming its parent.
- Fan-out: forty parents on three nodes, each running a child that works 300 ms (io): all
  complete with their own child's variables, and the children ran on more than one node.
- A node SIGKILLed while it holds children's bursts (stopped first, so what it holds cannot
  change between the look and the kill): every parent completes with one child (a lost burst
  starts none), every journal is steps 0..n-1 with the exact outcomes (no step committed
  twice), the killed bursts were run again by the other node after the kill, every parent ended
  after its child, the other node handed back what the dead one held, nothing is left queued.
- A parent that has run 1,000 children, waiting for its 1,001st: ``show`` names that child in
  its state line and lists it (text, ``--json``, ``nf.instance``). FAILS on nodeflow as it
  stands: an instance's children are read oldest first, at most 1,000, and the state line takes
  the child it waits for from the last of them: ``show`` says "waiting until None" and lists no
  waiting child.
- ``define`` refuses a run without ``definition``, with a bad workflow id, with a zero timeout,
  with ``on_timeout`` but no ``timeout`` (and a few more): exit 2, the place named, nothing
  stored.

No speed assertions: every wait is bounded generously, and a failure prints the nodes' logs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import unittest
from collections import Counter
from typing import Any

import nodeflow
from tests.support import table_rows, thread_states
from tests.test_workflow_runtime import ISO_TIME, READY, REFUSED, WATCHED, RuntimeTestCase

DEPTH = 32  # run activities nest at most this deep (README: "Nesting stops at 32 levels")


def invoice(workflow_id: str = "invoice", work: str = "0.2s") -> dict[str, Any]:
    """A child: works a little, then sets an invoice number and total from its input."""
    return {
        "id": workflow_id,
        "start": "compute",
        "activities": {
            "compute": {"type": "work", "duration": work, "next": "total"},
            "total": {"type": "set", "values": {"number": "INV-{input.order}", "total": "{input.order}"}},
        },
    }


def leaf(workflow_id: str = "leaf") -> dict[str, Any]:
    """A child that waits for the signal never-ORDER (sent only when a test says so)."""
    return {
        "id": workflow_id,
        "start": "wait",
        "activities": {
            "wait": {"type": "signal", "name": "never-{input.order}", "result": "got", "next": "ok"},
            "ok": {"type": "set", "values": {"way": "signal"}},
        },
    }


def runs(workflow_id: str, child: str, done: dict[str, Any] | None = None, **run: Any) -> dict[str, Any]:
    """A parent: ``bill`` runs ``child`` with input {order}, then ``done`` sets ``done`` (way=child by
    default); with an ``on_timeout`` given, ``late`` sets way=late."""
    bill: dict[str, Any] = {"type": "run", "definition": child, "input": {"order": "{input.order}"}, **run}
    bill["next"] = "done"
    activities: dict[str, Any] = {"bill": bill, "done": {"type": "set", "values": done or {"way": "child"}}}
    if run.get("on_timeout") == "late":
        activities["late"] = {"type": "set", "values": {"way": "late"}}
    return {"id": workflow_id, "start": "bill", "activities": activities}


class ChildrenTestCase(RuntimeTestCase):
    """RuntimeTestCase plus looks at the parent/child columns and the journals."""

    def children_of(self, instance: str) -> list[str]:
        return [child for (child,) in self.query(
            "SELECT id FROM instances WHERE parent = ? ORDER BY created, id", instance
        )]  # fmt: skip

    def only_child(self, instance: str) -> str:
        children = self.children_of(instance)
        self.assertEqual(len(children), 1, f"instance {instance}: one child: {children}")
        return children[0]

    def row(self, instance: str) -> dict[str, Any]:
        """The instance's row: status, position, parent, child, bookmark, error, updated, ended, seq."""
        columns = ("status", "position", "parent", "child", "bookmark", "error", "updated", "ended", "seq", "wake_at")
        (found,) = self.query(f"SELECT {', '.join(columns)} FROM instances WHERE id = ?", instance)
        return dict(zip(columns, found, strict=True))

    def journal(self, instance: str) -> list[tuple[Any, ...]]:
        """(step, activity, type, node, fence, started, ended, outcome) rows, in step order."""
        return self.query(
            "SELECT step, activity, type, node, fence, started, ended, outcome FROM journal WHERE instance = ? "
            "ORDER BY step",
            instance,
        )

    def runs_queued_for(self, ids: list[str] | set[str], unleased_only: bool = False) -> int:
        rows = self.query(
            f"SELECT json_extract(body, '$.run') FROM messages WHERE queue = ?"
            f"{' AND lease_owner IS NULL' if unleased_only else ''}",
            nodeflow.WORKFLOW_QUEUE,
        )
        return sum(run in ids for (run,) in rows)

    def started_text(self, definition: str, child: str, version: int = 1, timed: bool = False) -> str:
        return rf"started {definition} v{version}{f', waiting until {ISO_TIME}' if timed else ''}: instance {child}"


# 1. Results ------------------------------------------------------------------------------------


class Results(ChildrenTestCase):
    def test_a_child_s_variables_land_in_the_parent_s_result_and_show_lists_both_ways(self) -> None:
        self.serve("n1")
        self.nf.define(invoice())
        self.nf.define(runs("order", "invoice", result="invoice", done={"paid": "{invoice.total}"}))
        self.nf.define(runs("plain", "invoice", done={"paid": "{bill.total}"}))  # no result: the activity id
        self.nf.define(runs("timed", "invoice", timeout="1h", on_timeout="late", done={"paid": "{bill.total}"}))
        parent = self.cli_ok("start", "order", "--input", '{"order": 7}').stdout.strip()
        plain = self.nf.start("plain", {"order": 8})
        timed = self.nf.start("timed", {"order": 9})
        ids = [parent, plain, timed]
        self.settle(lambda: self.statuses(ids)["completed"] == 3, 30, "the three parents completed")
        self.settle(lambda: self.queued_runs() == 0, 30, "nothing left in the queue")

        for instance, order, result in ((parent, 7, "invoice"), (plain, 8, "bill"), (timed, 9, "bill")):
            child = self.only_child(instance)
            found, done = self.nf.instance(instance), self.nf.instance(child)
            where = f"parent {instance}, child {child}"
            self.assertEqual((done.definition, done.status, done.parent), ("invoice", "completed", instance), where)
            expected = {"input": {"order": order}, "number": f"INV-{order}", "total": order}
            self.assertEqual(done.variables, expected, where)
            self.assertEqual(found.variables, {"input": {"order": order}, result: expected, "paid": order}, where)
            self.assertEqual(done.started_by, f"n1 (run by {instance} at bill)", where)
            journal = self.journal(instance)
            self.assertEqual([(row[0], row[1], row[2]) for row in journal],
                             [(0, "bill", "run"), (1, "bill", "run"), (2, "done", "set")], where)  # fmt: skip
            self.assertRegex(journal[0][7], f"^{self.started_text('invoice', child, timed=instance == timed)}$")
            self.assertEqual([row[7] for row in journal[1:]], [f"instance {child} completed", "set paid"], where)
            child_journal = self.journal(child)
            self.assertEqual([row[7] for row in child_journal], ["worked 200ms (io)", "set number, total"], where)
            # The child was made by the commit that began the wait, and ended before the parent went on.
            self.assertGreaterEqual(done.created, journal[0][5], where)
            self.assertGreaterEqual(journal[1][5], child_journal[-1][6], where)
            self.assertGreater(journal[1][4], journal[0][4], f"{where}: resumed in a burst of its own")
            self.assertGreaterEqual(found.ended, done.ended, where)
            row = self.row(instance)
            self.assertEqual((row["parent"], row["child"], row["bookmark"], row["wake_at"]), (None, None, None, None))
            self.assertEqual(found.children, ((child, "invoice", "completed"),), where)
        # The timed run's timeout went with the child's end, not left to be acked an hour later.
        self.assertEqual(self.runs_queued_for([timed]), 0)

        # show, text: the parent lists its child, the child names its parent.
        child = self.only_child(parent)
        text = self.cli_ok("show", parent).stdout.splitlines()
        self.assertEqual(text[0], f"instance {parent}: order v1, completed")
        self.assertIn(f"child {child} invoice completed", text)
        self.assertFalse([line for line in text if line.startswith("parent ")], text)
        text = self.cli_ok("show", child[-6:]).stdout.splitlines()  # by the end of its id
        self.assertEqual(text[0], f"instance {child}: invoice v1, completed")
        self.assertIn(f"parent {parent} (its run activity started this one)", text)
        self.assertFalse([line for line in text if line.startswith("child ")], text)
        self.assertIn(f"by n1 (run by {parent} at bill);", text[1])
        # show --json: the same, both ways.
        shown = self.cli_json("show", parent)
        self.assertEqual(shown["parent"], None)
        self.assertEqual(shown["children"], [{"id": child, "definition": "invoice", "status": "completed"}])
        self.assertEqual(shown["variables"]["invoice"], {"input": {"order": 7}, "number": "INV-7", "total": 7})
        shown = self.cli_json("show", child)
        self.assertEqual((shown["parent"], shown["children"]), (parent, []))
        self.assertEqual(shown["started_by"], f"n1 (run by {parent} at bill)")
        self.assertEqual(len(self.query("SELECT id FROM instances")), 6, "three parents, three children")
        self.assert_no_tracebacks()

    def test_instances_lists_a_parent_waiting_at_a_run_as_show_does(self) -> None:
        self.serve("n1")
        self.nf.define(leaf())
        self.nf.define(runs("top", "leaf"))
        self.nf.define(runs("timed", "leaf", timeout="1h", on_timeout="late"))
        parents = [self.nf.start("top", {"order": 1}), self.nf.start("timed", {"order": 2})]
        self.settle(lambda: self.statuses()["waiting"] == 4, 30, "two parents and two children waiting")
        children = [self.only_child(parent) for parent in parents]
        # The state each command gives every instance, while they wait.
        listed = {}
        for line in self.cli_ok("instances", "--status", "waiting").stdout.splitlines():
            instance, _, state, _ = line.split("\t")
            listed[instance] = state
        shown = {instance: self.cli_ok("show", instance).stdout.splitlines()[0].split(", ", 1)[1]
                 for instance in parents + children}  # fmt: skip

        for order, child in enumerate(children, 1):
            self.assertEqual(self.nf.signal(f"never-{order}", {"n": order}).resumed, (child,))
        self.settle(lambda: self.statuses(parents)["completed"] == 2, 30, "both parents completed")
        for order, parent in enumerate(parents, 1):
            self.assertEqual(self.nf.instance(parent).variables["bill"]["got"], {"n": order})
        self.settle(lambda: self.queued_runs() == 0, 30, "nothing left in the queue")
        self.assert_no_tracebacks()

        for parent, child in zip(parents, children, strict=True):
            self.assertEqual(shown[parent], f"waiting for instance {child}", "show")
        self.assertEqual(shown[children[0]], "waiting for signal never-1")
        self.assertEqual(set(listed), set(parents + children))
        self.assertEqual(listed, shown, "instances gives each instance the state show gives it")


# 2. Faults --------------------------------------------------------------------------------------


class Faults(ChildrenTestCase):
    def test_a_faulted_child_faults_its_parent_and_retry_starts_a_new_child(self) -> None:
        self.serve("n1")
        doomed = {"id": "stock", "start": "check",
                  "activities": {"check": {"type": "fail", "message": "no stock for order {input.order}"}}}  # fmt: skip
        self.nf.define(doomed)
        self.nf.define(runs("order", "stock", result="invoice", done={"paid": "{invoice.total}"}))
        parent = self.nf.start("order", {"order": 7})
        self.settle(lambda: self.statuses([parent])["faulted"] == 1, 30, "the parent faulted")
        first = self.only_child(parent)
        error = f"instance {first} (stock) it ran was faulted: no stock for order 7"
        row = self.row(parent)
        self.assertEqual((row["position"], row["error"], row["child"]), ("bill", error, None))
        self.assertEqual((self.row(first)["status"], self.row(first)["error"]), ("faulted", "no stock for order 7"))
        outcomes = self.outcomes(parent)
        self.assertEqual(len(outcomes), 2, outcomes)
        self.assertRegex(outcomes[0], f"^{self.started_text('stock', first)}$")
        self.assertEqual(outcomes[1], f"faulted: {error}")
        self.assertEqual(self.outcomes(first), ["failed: no stock for order 7"])
        self.assertEqual(self.cli_ok("show", parent).stdout.splitlines()[0],
                         f"instance {parent}: order v1, faulted at bill: {error}")  # fmt: skip
        first_journal = self.journal(first)

        # The child's definition mended (version 2); retry of the parent runs a new child of it.
        self.nf.define(invoice("stock"))
        self.cli_ok("retry", parent)
        self.settle(lambda: self.statuses([parent])["completed"] == 1, 30, "the retried parent completed")
        children = self.children_of(parent)
        self.assertEqual(len(children), 2, children)
        self.assertEqual(children[0], first)
        second = children[1]
        self.assertEqual(self.nf.instance(second).version, 2)
        self.assertEqual(self.row(second)["status"], "completed")
        outcomes = self.outcomes(parent)
        self.assertEqual(len(outcomes), 5, outcomes)
        self.assertRegex(outcomes[2], f"^{self.started_text('stock', second, version=2)}$")
        self.assertEqual(outcomes[3:], [f"instance {second} completed", "set paid"])
        self.assertEqual(self.nf.instance(parent).variables["invoice"], self.nf.instance(second).variables)
        self.assertEqual(self.journal(first), first_journal, "the first child untouched")
        self.assertEqual(self.row(first)["status"], "faulted")
        self.assertEqual(
            self.cli_json("show", parent)["children"],
            [{"id": first, "definition": "stock", "status": "faulted"},
             {"id": second, "definition": "stock", "status": "completed"}],
        )  # fmt: skip

        # A run of a definition that does not exist faults the parent at once, starting nothing.
        self.nf.define(runs("ghostly", "ghost", done={"paid": "{bill.total}"}))
        ghostly = self.nf.start("ghostly", {"order": 3})
        self.settle(lambda: self.statuses([ghostly])["faulted"] == 1, 30, "the ghostly parent faulted")
        said = "cannot run workflow ghost: no workflow definition 'ghost'; add it first with: define FILE"
        self.assertEqual((self.row(ghostly)["position"], self.row(ghostly)["error"]), ("bill", said))
        self.assertEqual(self.outcomes(ghostly), [f"faulted: {said}"])
        self.assertEqual(self.children_of(ghostly), [])
        self.nf.define(invoice("ghost"))
        self.cli_ok("retry", ghostly)
        self.settle(lambda: self.statuses([ghostly])["completed"] == 1, 30, "the ghostly parent completed")
        self.assertEqual(self.nf.instance(ghostly).variables["paid"], 3)
        self.assertEqual(len(self.children_of(ghostly)), 1)
        self.settle(lambda: self.queued_runs() == 0, 30, "nothing left in the queue")
        self.assert_no_tracebacks()


# 3. Cancel down the tree -----------------------------------------------------------------------


class CancelTree(ChildrenTestCase):
    def test_cancelling_a_parent_cancels_every_child_not_ended_nested_and_leaves_nothing_queued(self) -> None:
        node = self.serve("n1")
        self.nf.define(invoice("quick"))
        self.nf.define(leaf())
        self.nf.define(runs("mid", "leaf"))
        # top: first runs quick (which completes), then mid, which runs leaf (which waits).
        top = runs("top", "mid", result="second")
        top["start"] = "first"
        top["activities"]["first"] = {"type": "run", "definition": "quick", "input": {"order": "{input.order}"},
                                      "next": "bill"}  # fmt: skip
        self.nf.define(top)
        # A second tree whose grandchild is in the middle of a 2 s burst when the top is cancelled.
        self.nf.define(invoice("busy", work="2s"))
        self.nf.define(runs("mid-b", "busy"))
        self.nf.define(runs("top-b", "mid-b"))
        # A parent that works 2 s, then runs leaf, in one burst: cancelled while it works, that burst
        # (which got as far as its run) commits nothing, and so starts no child.
        slow = runs("slow", "leaf")
        slow["start"] = "prep"
        slow["activities"]["prep"] = {"type": "work", "duration": "2s", "next": "bill"}
        self.nf.define(slow)

        root = self.nf.start("top", {"order": 1})
        self.settle(lambda: self.statuses()["waiting"] == 3, 30, "top, mid and leaf waiting")
        (quick,) = [c for c in self.children_of(root) if self.nf.instance(c).definition == "quick"]
        mid = self.children_of(root)[1]
        grandchild = self.only_child(mid)
        self.assertEqual(self.row(grandchild)["status"], "waiting")
        self.assertEqual((self.row(root)["child"], self.row(mid)["child"]), (mid, grandchild))
        quick_before = (self.row(quick), self.journal(quick))

        root_b = self.nf.start("top-b", {"order": 2})
        slow = self.nf.start("slow", {"order": 3})

        def under_way(instance: str) -> bool:  # its message in n1's hands, no step of it committed
            held = self.count(
                "SELECT COUNT(*) FROM messages WHERE queue = ? AND lease_owner = 'n1' AND json_extract(body, '$.run') "
                "= ?",
                nodeflow.WORKFLOW_QUEUE,
                instance,
            )
            return bool(held) and not self.journal(instance)

        def busy_under_way() -> bool:
            found = self.query("SELECT id FROM instances WHERE definition = 'busy'")
            return bool(found) and under_way(found[0][0]) and under_way(slow)

        self.settle(busy_under_way, 30, "the busy grandchild's and the slow parent's bursts under way")
        mid_b = self.only_child(root_b)
        busy = self.only_child(mid_b)

        # Cancel the tops: the second tree's and the slow one through the API first, while their bursts
        # work (a command's start would take a while on a busy machine), then the first from the command line.
        self.assertEqual(self.nf.cancel(root_b).status, "cancelled")
        cancelled = self.nf.cancel(slow)
        self.assertEqual((cancelled.status, cancelled.position), ("cancelled", None))
        self.assertEqual([len(self.journal(instance)) for instance in (busy, slow)], [1, 1], "cancelled mid-burst")
        answer = self.cli_ok("cancel", root, "--reason", "customer left")
        self.assertEqual(answer.stdout, f"instance {root} cancelled at bill\n")
        tree_a, tree_b = [root, mid, grandchild], [root_b, mid_b, busy, slow]
        self.assertEqual(self.statuses(tree_a + tree_b), Counter(cancelled=7))
        self.assertEqual(self.runs_queued_for(tree_a + tree_b, unleased_only=True), 0, "queued runs dropped at once")
        expected = {
            root: "cancelled: customer left (was waiting)",
            mid: f"cancelled: its parent {root} was cancelled (was waiting)",
            grandchild: f"cancelled: its parent {mid} was cancelled (was waiting)",
            root_b: "cancelled (was waiting)",
            mid_b: f"cancelled: its parent {root_b} was cancelled (was waiting)",
            busy: f"cancelled: its parent {mid_b} was cancelled (was running)",
            slow: "cancelled (was running)",
        }
        for instance, outcome in expected.items():
            journal = self.journal(instance)
            where = f"instance {instance}: {journal}"
            cancels = [row for row in journal if row[2] == "cancel"]
            self.assertEqual(len(cancels), 1, where)
            self.assertEqual((journal[-1][2], journal[-1][7]), ("cancel", outcome), where)
            self.assertEqual([row[0] for row in journal], list(range(len(journal))), where)
            row = self.row(instance)
            self.assertEqual((row["child"], row["bookmark"]), (None, None), where)
            self.assertIsNotNone(row["ended"], where)
        self.assertEqual(self.journal(busy)[0][1], "(start)", "cancelled before its first step committed")
        # The completed child is left as it was.
        self.assertEqual((self.row(quick), self.journal(quick)), quick_before)
        self.assertEqual(
            self.cli_json("show", root)["children"],
            [{"id": quick, "definition": "quick", "status": "completed"},
             {"id": mid, "definition": "mid", "status": "cancelled"}],
        )  # fmt: skip

        # The bursts under way commit nothing (the slow one's run starts no child); their messages are acked.
        for instance in (busy, slow):
            self.wait_for_log(node, rf"instance {instance}: burst of fence \d+ not committed: the instance moved past")
        self.settle(lambda: self.runs_queued_for(tree_a + tree_b) == 0, 30, "no run message of the trees left")
        self.assertEqual(len(self.journal(busy)), 1, "no step of the busy grandchild committed")
        self.assertEqual(len(self.journal(slow)), 1, "no step of the slow parent committed")
        self.assertEqual(self.children_of(slow), [], "its lost burst started no child")
        self.assertEqual(self.statuses(tree_a + tree_b), Counter(cancelled=7))
        self.assertEqual(self.count("SELECT COUNT(*) FROM instances"), 8, "the trees, quick and slow; nothing more")
        # Nothing waits any more; a second cancel is refused.
        self.assertEqual(self.nf.signal("never-1", {}, ttl=0).resumed, ())
        again = self.cli("cancel", mid)
        self.assertEqual(again.returncode, 2, again.stderr)
        self.assertIn(f"instance {mid} is cancelled already", again.stderr)
        self.assertEqual(self.queued_runs(), 0)
        self.assert_no_tracebacks()

    def test_cancelling_the_child_alone_faults_the_parent_waiting_for_it(self) -> None:
        self.serve("n1")
        self.nf.define(leaf())
        self.nf.define(runs("top", "leaf"))
        self.nf.define(runs("patient", "leaf", timeout="1h", on_timeout="late"))
        parent = self.nf.start("top", {"order": 1})
        patient = self.nf.start("patient", {"order": 2})
        self.settle(lambda: self.statuses()["waiting"] == 4, 30, "two parents and two children waiting")
        child, other = self.only_child(parent), self.only_child(patient)
        row = self.row(parent)
        self.assertEqual((row["status"], row["position"], row["bookmark"], row["child"]),
                         ("waiting", "bill", "child", child))  # fmt: skip
        text = self.cli_ok("show", parent).stdout.splitlines()
        self.assertEqual(text[0], f"instance {parent}: top v1, waiting for instance {child}")
        self.assertIn(f"child {child} leaf waiting", text)
        self.assertEqual(self.cli_json("show", parent)["children"],
                         [{"id": child, "definition": "leaf", "status": "waiting"}])  # fmt: skip
        timeouts = (
            "SELECT COUNT(*) FROM messages WHERE queue = ? AND json_extract(body, '$.run') = ? AND available_at > ?"
        )
        self.assertEqual(self.count(timeouts, nodeflow.WORKFLOW_QUEUE, patient, time.time() + 600), 1, "its timeout")

        answer = self.cli_ok("cancel", child, "--reason", "operator said so")
        self.assertEqual(answer.stdout, f"instance {child} cancelled at wait\n")
        self.cli_ok("cancel", other)
        self.assertEqual(self.count(timeouts, nodeflow.WORKFLOW_QUEUE, patient, time.time() + 600), 0, "dropped")
        self.settle(lambda: self.statuses([parent, patient])["faulted"] == 2, 30, "both parents faulted")
        for instance, ran, why in ((parent, child, ": operator said so"), (patient, other, "")):
            error = f"instance {ran} (leaf) it ran was cancelled{why}"
            row = self.row(instance)
            self.assertEqual((row["position"], row["error"], row["child"]), ("bill", error, None), instance)
            outcomes = self.outcomes(instance)
            self.assertEqual(len(outcomes), 2, outcomes)
            self.assertRegex(outcomes[0], f"^{self.started_text('leaf', ran, timed=instance == patient)}$")
            self.assertEqual(outcomes[1], f"faulted: {error}")
            self.assertEqual(self.outcomes(ran)[1:], [f"cancelled{why or ''} (was waiting)"])
        self.assertEqual(self.row(child)["status"], "cancelled")
        self.settle(lambda: self.queued_runs() == 0, 30, "nothing left in the queue")
        self.assert_no_tracebacks()


# 4. Timeouts -----------------------------------------------------------------------------------


class Timeouts(ChildrenTestCase):
    def test_a_run_that_times_out_cancels_its_child_and_goes_to_on_timeout_or_faults(self) -> None:
        self.serve("n1")
        self.nf.define(leaf())
        self.nf.define(runs("late", "leaf", timeout="1s", on_timeout="late"))
        self.nf.define(runs("mid", "leaf"))
        self.nf.define(runs("strict", "mid", timeout="1s"))  # its child runs a grandchild: both cancelled
        late = self.nf.start("late", {"order": 1})
        strict = self.nf.start("strict", {"order": 2})
        self.settle(lambda: self.statuses([late])["completed"] == 1, 30, "the late parent completed")
        self.settle(lambda: self.statuses([strict])["faulted"] == 1, 30, "the strict parent faulted")

        child = self.only_child(late)
        found = self.nf.instance(late)
        self.assertEqual(found.variables, {"input": {"order": 1}, "way": "late"})
        journal = self.journal(late)
        self.assertEqual([(row[0], row[1]) for row in journal], [(0, "bill"), (1, "bill"), (2, "late")])
        self.assertRegex(journal[0][7], f"^{self.started_text('leaf', child, timed=True)}$")
        self.assertEqual(
            [row[7] for row in journal[1:]],
            [f"timed out after 1s waiting for instance {child}, now cancelled: on to late", "set way"],
        )
        self.assertGreaterEqual(journal[1][5], journal[0][5] + 1, "not timed out early")
        self.assertGreater(journal[1][4], journal[0][4], "the timeout ran in a burst of its own")
        self.assertEqual(self.row(child)["status"], "cancelled")
        self.assertEqual(
            self.outcomes(child),
            ["waiting for signal never-1", f"cancelled: its parent {late} stopped waiting for it (was waiting)"],
        )

        other = self.only_child(strict)
        error = (
            f"timed out after 1s waiting for instance {other}, now cancelled; give the activity on_timeout to go on "
            "instead"
        )
        self.assertEqual((self.row(strict)["position"], self.row(strict)["error"]), ("bill", error))
        self.assertEqual(self.outcomes(strict)[1:], [f"faulted: {error}"])
        grandchild = self.only_child(other)
        self.assertEqual(self.statuses([other, grandchild]), Counter(cancelled=2))
        stopped = f"cancelled: its parent {strict} stopped waiting for it (was waiting)"
        self.assertEqual(self.outcomes(other)[1:], [stopped])
        self.assertEqual(
            self.outcomes(grandchild),
            ["waiting for signal never-2", f"cancelled: its parent {other} was cancelled (was waiting)"],
        )

        # Nothing waits for the signals now; nothing is queued.
        for order in (1, 2):
            self.assertEqual(self.nf.signal(f"never-{order}", {}, ttl=0).resumed, ())
        self.settle(lambda: self.queued_runs() == 0, 30, "nothing left in the queue")
        self.assert_no_tracebacks()

    def test_a_child_ending_as_its_run_times_out_resolves_each_parent_one_way_only(self) -> None:
        nodes = [self.serve(node_id, "--concurrency", "24", wait=False) for node_id in ("n1", "n2")]
        for node in nodes:
            self.wait_for_log(node, READY.pattern)
        # Parent k runs child wk, which works 900 ms + 24 ms * k (to 1,596 ms), and times out after 1 s,
        # its way working 300 ms before it commits: a child that ends before 1 s wins outright, one that
        # ends in the timeout's burst wins too (that burst is refused), one that ends after it is cut
        # short (cancelled, its own burst refused); the grid runs across both moments.
        works = [900 + 24 * k for k in range(30)]
        for k, milliseconds in enumerate(works):
            self.nf.define(invoice(f"w{k}", work=f"{milliseconds}ms"))
            parent = runs(f"r{k}", f"w{k}", result="got", timeout="1s", on_timeout="late")
            parent["activities"]["late"] = {"type": "work", "duration": "300ms", "next": "mark"}
            parent["activities"]["mark"] = {"type": "set", "values": {"way": "late"}}
            self.nf.define(parent)
        ids = list(self.pool.map(lambda k: self.nf.start(f"r{k}", {"order": k}), range(len(works))))
        self.assertEqual(len(set(ids)), len(works))

        def children_ended() -> bool:
            rows = self.query("SELECT status FROM instances WHERE parent IS NOT NULL")
            return len(rows) == len(ids) and all(status in ("completed", "cancelled") for (status,) in rows)

        self.settle(lambda: self.statuses(ids)["completed"] == len(ids), 60, "every parent completed")
        self.settle(children_ended, 30, "every child ended")
        self.settle(lambda: self.queued_runs() == 0, 30, "no run message left")
        ways: dict[str, set[str]] = {"child": set(), "late": set()}
        cancelled: set[str] = set()
        for instance in ids:
            child = self.only_child(instance)
            found, done = self.nf.instance(instance), self.nf.instance(child)
            outcomes = [entry.outcome for entry in found.journal]
            where = f"parent {instance}: {outcomes}; child {child} {done.status}: {[e.outcome for e in done.journal]}"
            self.assertEqual([entry.step for entry in found.journal], list(range(len(outcomes))), where)
            self.assertRegex(outcomes[0], f"^{self.started_text(done.definition, child, timed=True)}$", where)
            completed = outcomes.count(f"instance {child} completed")
            timed_out = sum(outcome.startswith("timed out") for outcome in outcomes)
            self.assertEqual(completed + timed_out, 1, f"one way only; {where}")
            if completed:
                self.assertEqual(outcomes[1:], [f"instance {child} completed", "set way"], where)
                self.assertEqual(found.variables["way"], "child", where)
                self.assertEqual(done.status, "completed", where)
                self.assertEqual(found.variables["got"], done.variables, where)
                self.assertLessEqual(done.journal[-1].ended, found.journal[1].started, where)
            else:
                self.assertEqual(outcomes[1:], [
                    f"timed out after 1s waiting for instance {child}, now cancelled: on to late",
                    "worked 300ms (io)", "set way",
                ], where)  # fmt: skip
                self.assertEqual(found.variables["way"], "late", where)
                self.assertNotIn("got", found.variables, where)
                self.assertGreaterEqual(found.journal[1].started, found.journal[0].started + 1, where)
                # Cancelled by the commit that timed out, before any step of its own committed.
                self.assertEqual(done.status, "cancelled", where)
                self.assertEqual(
                    [(e.step, e.type, e.outcome) for e in done.journal],
                    [(0, "cancel", f"cancelled: its parent {instance} stopped waiting for it (was running)")],
                    where,
                )
                cancelled.add(child)
            ways[found.variables["way"]].add(instance)
        refused = {found for node in nodes for found in REFUSED.findall(node.text())}
        overtaken, cut_short = refused & set(ids), refused - set(ids)
        won = [works[k] for k, instance in enumerate(ids) if instance in ways["child"]]
        lost = [works[k] for k, instance in enumerate(ids) if instance in ways["late"]]
        print(f"\n  {len(won)} took their child's variables (work to {max(won, default=0)}ms; {len(overtaken)} while "
              f"their timeout's burst ran), {len(lost)} timed out (work from {min(lost, default=0)}ms; "
              f"{len(cut_short)} children's bursts refused)", file=sys.stderr)  # fmt: skip
        self.assertLessEqual(overtaken, ways["child"], "a refused timeout burst: its parent went the child's way")
        self.assertLessEqual(cut_short, cancelled, "a refused child burst: that child was cancelled")
        self.assertTrue(ways["child"] and ways["late"], "both ways happened (children of 0.9 s to 1.6 s)")
        self.assert_no_tracebacks()


# 5. Depth ---------------------------------------------------------------------------------------


class Depth(ChildrenTestCase):
    def test_a_definition_that_runs_itself_stops_at_depth_32_and_cancel_reaches_every_level(self) -> None:
        self.serve("n1")
        self.nf.define({"id": "loop", "start": "again", "activities": {"again": {"type": "run", "definition": "loop"}}})
        top = self.cli_ok("start", "loop").stdout.strip()

        def settled() -> bool:
            counts = self.statuses()
            return counts["faulted"] == DEPTH + 1 and self.queued_runs() == 0

        self.settle(settled, 60, f"{DEPTH + 1} levels faulted, nothing queued")
        time.sleep(0.3)  # nothing more comes
        self.assertEqual(self.count("SELECT COUNT(*) FROM instances"), DEPTH + 1)
        self.assertEqual(self.count("SELECT COUNT(*) FROM instances WHERE definition = 'loop'"), DEPTH + 1)
        chain = [top]
        while True:
            children = self.children_of(chain[-1])
            self.assertLessEqual(len(children), 1, children)
            if not children:
                break
            chain.append(children[0])
        self.assertEqual(len(chain), DEPTH + 1, "levels 0 to 32")
        self.assertIsNone(self.row(top)["parent"])
        deepest = chain[-1]
        said = f"instances run by run activities nest {DEPTH} deep here; the most is {DEPTH}"
        self.assertEqual((self.row(deepest)["position"], self.row(deepest)["error"]), ("again", said))
        self.assertEqual(self.outcomes(deepest), [f"faulted: {said}"])
        below = said
        for level in range(DEPTH - 1, -1, -1):  # each level faulted in turn, naming the one below
            instance, child = chain[level], chain[level + 1]
            error = f"instance {child} (loop) it ran was faulted: {below}"
            row = self.row(instance)
            where = f"level {level}: {instance}"
            self.assertEqual((row["status"], row["position"], row["error"], row["child"]),
                             ("faulted", "again", error, None), where)  # fmt: skip
            self.assertEqual(self.row(child)["parent"], instance, where)
            outcomes = self.outcomes(instance)
            self.assertEqual(len(outcomes), 2, where)
            self.assertRegex(outcomes[0], f"^{self.started_text('loop', child)}$", where)
            self.assertEqual(outcomes[1], f"faulted: {error}"[:2000], where)
            below = error

        shown = self.cli_json("cancel", top)
        self.assertEqual(shown["status"], "cancelled")
        self.assertEqual(self.statuses(), Counter(cancelled=DEPTH + 1))
        for level, instance in enumerate(chain):
            why = ": its parent " + chain[level - 1] + " was cancelled" if level else ""
            self.assertEqual(self.outcomes(instance)[-1], f"cancelled{why} (was faulted)", f"level {level}")
            self.assertEqual(self.count("SELECT COUNT(*) FROM journal WHERE instance = ? AND type = 'cancel'",
                                        instance), 1)  # fmt: skip
        self.assertEqual(self.queued_runs(), 0)
        self.assertEqual(self.count("SELECT COUNT(*) FROM instances"), DEPTH + 1)
        self.assert_no_tracebacks()


# 6. Many children over many nodes ---------------------------------------------------------------


class FanOut(ChildrenTestCase):
    def test_forty_parents_children_run_on_more_than_one_of_three_nodes(self) -> None:
        self.cluster("n1", "n2", "n3")
        task = {"id": "task", "start": "work", "activities": {
            "work": {"type": "work", "duration": "300ms", "kind": "io", "next": "note"},
            "note": {"type": "set", "values": {"n": "{input.order}"}},
        }}  # fmt: skip
        self.nf.define(task)
        self.nf.define(runs("fan", "task", result="task", done={"got": "{task.n}"}))
        ids = self.start_all("fan", [{"order": n} for n in range(40)])
        self.settle(lambda: self.statuses(ids)["completed"] == 40, 60, "every parent completed")
        self.settle(lambda: self.statuses()["completed"] == 80, 30, "every child completed")
        by_node: Counter[str] = Counter()
        children: set[str] = set()
        for n, instance in enumerate(ids):
            child = self.only_child(instance)
            children.add(child)
            found, done = self.nf.instance(instance), self.nf.instance(child)
            where = f"parent {instance} (n={n}), child {child}"
            self.assertEqual(found.variables, {"input": {"order": n}, "task": {"input": {"order": n}, "n": n},
                                               "got": n}, where)  # fmt: skip
            self.assertEqual([e.outcome for e in done.journal], ["worked 300ms (io)", "set n"], where)
            self.assertEqual([e.outcome for e in found.journal][1:], [f"instance {child} completed", "set got"])
            by_node[done.journal[0].node] += 1
        self.assertEqual(len(children), 40)
        print(f"\n  children's work by node: {dict(sorted(by_node.items()))}", file=sys.stderr)
        self.assertGreater(len(by_node), 1, f"the children ran on more than one node: {dict(by_node)}")
        self.settle(lambda: self.queued_runs() == 0, 30, "nothing left in the queue")
        self.assert_no_tracebacks()


# 7. A node killed while it runs children ---------------------------------------------------------


class KilledNodeChildren(ChildrenTestCase):
    def test_a_node_killed_holding_children_s_bursts_loses_no_step_and_commits_none_twice(self) -> None:
        nodes = self.cluster("n1", "n2")
        chore = {"id": "chore", "start": "work", "activities": {
            "work": {"type": "work", "duration": "500ms", "next": "note"},
            "note": {"type": "set", "values": {"n": "{input.order}"}},
        }}  # fmt: skip
        self.nf.define(chore)
        job = runs("job", "chore", result="chore", done={"got": "{chore.n}"})
        job["start"] = "prep"  # works before its run: a burst lost there must start no child
        job["activities"]["prep"] = {"type": "work", "duration": "200ms", "next": "bill"}
        self.nf.define(job)
        ids = self.start_all("job", [{"order": n} for n in range(30)])

        # n1 is stopped (between looks, let go again) until it is caught holding the burst of a child.
        victim, deadline = nodes[0], time.monotonic() + 20
        while True:
            os.kill(victim.pid, signal.SIGSTOP)
            self.wait_until(lambda: thread_states(victim.pid) == {"T"}, 10, "every thread of n1 stopped")
            stopped_at = time.time()
            held = self.query(
                "SELECT json_extract(m.body, '$.run'), json_extract(m.body, '$.seq'), i.seq, i.parent "
                "FROM messages m LEFT JOIN instances i ON i.id = json_extract(m.body, '$.run') "
                "WHERE m.queue = ? AND m.lease_owner = 'n1'",
                nodeflow.WORKFLOW_QUEUE,
            )
            in_flight = {run for run, seq, current, _ in held if seq == current}
            children = {run for run, seq, current, parent in held if seq == current and parent is not None}
            if children:
                break
            os.kill(victim.pid, signal.SIGCONT)
            if time.monotonic() > deadline:
                self.fail("n1 was never caught holding a child's burst")
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)
        victim.process.wait(timeout=10)

        self.settle(lambda: self.statuses(ids)["completed"] == 30, 60, "every parent completed")
        self.settle(lambda: self.queued_runs() == 0, 30, "nothing left in the queue")
        self.assertEqual(self.count("SELECT COUNT(*) FROM instances"), 60, "thirty parents, thirty children")
        for n, instance in enumerate(ids):
            child = self.only_child(instance)  # a lost burst started none
            found, done = self.nf.instance(instance), self.nf.instance(child)
            where = f"parent {instance}: {[e.outcome for e in found.journal]}; child {child}: " \
                    f"{[e.outcome for e in done.journal]}"  # fmt: skip
            self.assertEqual([e.step for e in found.journal], [0, 1, 2, 3], where)
            self.assertEqual([e.step for e in done.journal], [0, 1], where)
            outcomes = [e.outcome for e in found.journal]
            self.assertEqual(outcomes[0], "worked 200ms (io)", where)
            self.assertRegex(outcomes[1], f"^{self.started_text('chore', child)}$", where)
            self.assertEqual(outcomes[2:], [f"instance {child} completed", "set got"], where)
            self.assertEqual([e.outcome for e in done.journal], ["worked 500ms (io)", "set n"], where)
            self.assertEqual(done.status, "completed", where)
            self.assertEqual(found.variables["got"], n, where)
            self.assertEqual(found.variables["chore"], done.variables, where)
            # The parent ended after its child.
            assert found.ended is not None and done.ended is not None
            self.assertGreaterEqual(found.ended, done.ended, where)
            self.assertGreaterEqual(found.updated, done.updated, where)
            self.assertGreaterEqual(found.journal[2].started, done.journal[-1].ended, where)
            for current in (found, done):
                late = [e.node for e in current.journal if e.started > stopped_at]
                self.assertNotIn("n1", late, f"{where}: no step of n1 after it was stopped")
                if current.id in in_flight:  # its burst died with n1: n2 ran it again
                    self.assertTrue(late, f"{where}: {current.id} run again after n1 stopped")
        for child in children:
            journal = self.journal(child)
            self.assertEqual({row[3] for row in journal}, {"n2"}, f"child {child}: its burst ran again on n2")
            self.assertGreater(journal[0][5], stopped_at, f"child {child}: after n1 stopped for good")
        print(f"\n  n1 killed holding {len(held)} run message(s): bursts of {len(children)} children and "
              f"{len(in_flight - children)} parents", file=sys.stderr)  # fmt: skip
        gone = self.wait_for_log(
            nodes[1], rf"node n1 \(pid {victim.pid}\) is gone: its liveness lock is free; handed back (\d+) leases"
        )
        self.assertEqual(int(gone[1]), len(held), gone[0])
        self.assertEqual(nodes[1].process.poll(), None, "n2 runs on")
        self.assertNotIn("Traceback", nodes[1].text())


# 8. A parent with more than a thousand children ----------------------------------------------------


class ManyChildren(ChildrenTestCase):
    RUNS = 1000  # quick children run one after another, then the one it waits for: the 1,001st

    def test_show_names_the_child_a_parent_waits_for_after_a_thousand_children(self) -> None:
        self.serve("n1")
        self.nf.define({"id": "quick", "start": "s", "activities": {"s": {"type": "set", "values": {"ok": True}}}})
        self.nf.define(leaf("hold"))
        self.nf.define({"id": "many", "start": "check", "variables": {"count": 0}, "activities": {
            "check": {"type": "if", "condition": {"var": "count", "op": "<", "value": self.RUNS}, "then": "again",
                      "next": "last"},
            "again": {"type": "run", "definition": "quick", "next": "inc"},
            "inc": {"type": "set", "add": {"count": 1}, "next": "check"},
            "last": {"type": "run", "definition": "hold", "input": {"order": 1}},
        }})  # fmt: skip
        parent = self.nf.start("many")

        def waiting_for_hold() -> bool:  # the parent at its last run, and the child it made at its wait
            row = self.row(parent)
            if not (row["status"] == "waiting" and row["position"] == "last" and row["child"] is not None):
                return False
            return bool(self.row(row["child"])["status"] == "waiting")

        self.settle(waiting_for_hold, 120, f"the parent waiting at its last run, after {self.RUNS} children")
        held = self.row(parent)["child"]
        self.assertEqual(self.row(held)["status"] if held else None, "waiting")
        children = self.children_of(parent)
        self.assertEqual(len(children), self.RUNS + 1)
        self.assertEqual(children[-1], held, "the newest child is the one it waits for")
        self.assertEqual(self.statuses(children), Counter(completed=self.RUNS, waiting=1))
        # What show says while it waits (asserted at the end, once the rest is checked).
        text = self.cli_ok("show", parent).stdout.splitlines()
        shown = self.cli_json("show", parent)
        found = self.nf.instance(parent)

        self.assertEqual(self.nf.signal("never-1", {}).resumed, (held,))
        self.settle(lambda: self.statuses([parent])["completed"] == 1, 30, "the parent completed")
        self.assertEqual(self.nf.instance(parent).variables["last"]["way"], "signal")
        self.assertEqual(self.nf.instance(parent).variables["count"], self.RUNS)
        self.settle(lambda: self.queued_runs() == 0, 30, "nothing left in the queue")
        self.assert_no_tracebacks()

        self.assertEqual(text[0], f"instance {parent}: many v1, waiting for instance {held}", "show's state line")
        self.assertIn(f"child {held} hold waiting", text, "show lists the child it waits for")
        self.assertIn({"id": held, "definition": "hold", "status": "waiting"}, shown["children"], "show --json")
        self.assertIn((held, "hold", "waiting"), found.children, "nf.instance(...).children")


# 9. define refuses bad run activities -----------------------------------------------------------


class BadRuns(ChildrenTestCase):
    def test_define_refuses_a_bad_run_and_stores_nothing(self) -> None:
        self.nf.define(invoice())
        self.nf.define(runs("order", "invoice"))
        self.nf.start("order", {"order": 1})  # no node: it stays queued
        cases = {
            "no definition": ({"type": "run"}, "activities.bill.definition: is missing"),
            "a bad id": ({"type": "run", "definition": "a b"}, "activities.bill.definition: a workflow id is 1 to 100"),
            "an id of 101": ({"type": "run", "definition": "w" * 101}, "activities.bill.definition: "),
            "a zero timeout": ({"type": "run", "definition": "invoice", "timeout": "0s", "on_timeout": "done"},
                               "activities.bill.timeout: must be more than zero"),
            "a timeout of 0": ({"type": "run", "definition": "invoice", "timeout": 0},
                               "activities.bill.timeout: must be more than zero"),
            "on_timeout alone": ({"type": "run", "definition": "invoice", "on_timeout": "done"},
                                 "activities.bill.on_timeout: goes with timeout"),
            "on_timeout nowhere": ({"type": "run", "definition": "invoice", "timeout": "1m", "on_timeout": "zz"},
                                   'activities.bill.on_timeout: no activity named "zz"'),
            "input a list": ({"type": "run", "definition": "invoice", "input": [1]},
                             "activities.bill.input: must be an object of variables"),
        }  # fmt: skip
        before = table_rows(self.db, WATCHED)
        for name, (bill, says) in cases.items():
            with self.subTest(name):
                activities = {"bill": {**bill, "next": "done"}, "done": {"type": "log", "message": "x"}}
                definition = {"id": "bad", "start": "bill", "activities": activities}
                path = os.path.join(self.dir, "bad.json")
                with open(path, "w") as out:
                    json.dump(definition, out)
                result = self.cli("define", path)
                self.assertEqual(result.returncode, 2, f"{result.stdout}{result.stderr}")
                self.assertEqual(result.stdout, "")
                self.assertNotIn("Traceback", result.stderr)
                lines = result.stderr.splitlines()
                self.assertTrue(all(line.startswith(f"nodeflow: define {path}: ") for line in lines), lines)
                self.assertTrue(any(says in line for line in lines), lines)
                self.assertTrue(lines[-1].endswith("nothing was stored"), lines)
                with self.assertRaises(nodeflow.InvalidDefinition):
                    self.nf.define(definition)
        self.assertEqual(table_rows(self.db, WATCHED), before, "nothing stored")


if __name__ == "__main__":
    unittest.main()
