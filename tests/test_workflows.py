"""Section 9, workflows: definitions refused or stored, versions, templates, conditions, and
instances run by a real ``serve`` node, through the command line and the Python API.

Covered:

- A corpus of bad definitions (BAD_DEFINITIONS, data below): each refused by ``define FILE`` with
  exit 2, its own place and message on stderr, a summary line, and not one row changed in the
  tables a define writes (definitions, signal_triggers, timers, instructions) nor any other, nor a
  byte of the database files; the same corpus through ``Cluster.define`` raises InvalidDefinition
  listing the same problem. One definition with nine problems reports all nine.
- The Python API: InvalidDefinition.problems, a valid definition compiles, Template (placeholders,
  literal braces, a lone placeholder keeping its type) and evaluate_condition (every operator,
  all/any/not, a variable on the right, type mismatches faulting).
- Versions: the same definition again is the same version ("nothing changed"), a change is
  version 2, ``definitions --json``, an instance keeps the version it started with (also on a live
  node, across a define made while it waits), triggers rewritten with each version.
- A real ``serve --app`` node shared by one test class: ``start --wait`` prints the variables;
  set/add, call (sync, async, "module:name"), timer, work, if branches; a failing call journaled as
  tries then faulted, ``show --json``, ``retry`` after the cause is mended; signal waits and
  ``signal --input``; a signal trigger; fail; start_at; runtime faults; a loop longer than a burst.
- Bad input on the command line (unknown workflow, --input not an object, bad instance ids)
  exits 2 and writes nothing; ``show`` takes a unique prefix or suffix.
- Journal invariants for every completed instance: steps 0..n-1, one fence per burst (fences never
  go down, a wait or a retry starts a burst with a higher fence), started <= ended.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
import unittest
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nodeflow
from tests.support import NODEFLOW, PYTHON, ClusterTestCase, table_rows, tree_snapshot

# Tables whose rows a refused define (or any refused command) must leave exactly as they were.
WATCHED_TABLES = ("definitions", "signal_triggers", "timers", "instructions", "instances", "messages", "journal")


def one(activity: dict[str, Any], activity_id: str = "a", **top: Any) -> dict[str, Any]:
    """A definition with one activity (and any top-level fields)."""
    return {"id": "bad", "start": activity_id, "activities": {activity_id: activity}, **top}


LOG = {"type": "log", "message": "hello"}
EXISTS = {"var": "input.x", "op": "exists"}


def too_many_activities() -> dict[str, Any]:
    chain = {f"s{i}": {"type": "log", "message": "x", "next": f"s{i + 1}"} for i in range(1000)}
    chain["s1000"] = {"type": "log", "message": "last"}
    return {"id": "huge-chain", "start": "s0", "activities": chain}


# (name, definition as JSON text, bytes or data, place, message): each is refused with a problem
# line "PLACE: ...MESSAGE..." (message a substring), no other definition's message appearing.
# fmt: off
BAD_DEFINITIONS: list[tuple[str, Any, str, str]] = [
    ("unknown activity type", one({"type": "email", "to": "x"}, "notify"),
     "activities.notify.type", 'unknown activity type "email"'),
    ("dangling next",
     {"id": "bad", "start": "charge", "activities": {"charge": {"type": "log", "message": "x", "next": "chrge"}}},
     "activities.charge.next", 'no activity named "chrge"'),
    ("if then names nothing",
     {"id": "bad", "start": "route", "activities": {
         "route": {"type": "if", "condition": EXISTS, "then": "ship-fast", "else": "slow"}, "slow": LOG}},
     "activities.route.then", 'no activity named "ship-fast"'),
    ("if else names nothing",
     {"id": "bad", "start": "route", "activities": {
         "route": {"type": "if", "condition": EXISTS, "then": "fast", "else": "ship-slow"}, "fast": LOG}},
     "activities.route.else", 'no activity named "ship-slow"'),
    ("unreachable activity",
     {"id": "bad", "start": "begin", "activities": {"begin": LOG, "orphan": LOG}},
     "activities.orphan", 'is unreachable: no path from start "begin"'),
    ("two activities with one id",
     '{"id": "bad", "start": "twice", "activities": {\n'
     '  "twice": {"type": "log", "message": "one"},\n'
     '  "twice": {"type": "log", "message": "two"}}}',
     "activities.twice", "two activities have this id"),
    ("id given twice",
     '{"id": "bad", "id": "worse", "start": "a", "activities": {"a": {"type": "log", "message": "x"}}}',
     "id", "given more than once"),
    ("missing id", {"start": "a", "activities": {"a": LOG}}, "id", "is missing: give the workflow an id"),
    ("bad id characters", {"id": "order #1", "start": "a", "activities": {"a": LOG}},
     "id", "not 'order #1'"),
    ("missing start", {"id": "bad", "activities": {"a": LOG}}, "start", "is missing: name the first activity"),
    ("start names nothing", {"id": "bad", "start": "kickoff", "activities": {"a": LOG}},
     "start", 'no activity named "kickoff"'),
    ("bad duration", one({"type": "timer", "duration": "5 parsecs"}, "pause"),
     "activities.pause.duration", "'5 parsecs' is not a duration"),
    ("bad cron expression", one(LOG, triggers=[{"type": "cron", "cron": "61 * * * *"}]),
     "triggers[0].cron", "minute 61 is out of range"),
    ("bad time zone", one(LOG, triggers=[{"type": "cron", "cron": "0 3 * * *", "tz": "Mars/Olympus_Mons"}]),
     "triggers[0].tz", 'unknown time zone "Mars/Olympus_Mons"'),
    ("bad ISO time for start_at", one({"type": "start_at", "at": "next tuesday"}, "launch"),
     "activities.launch.at", "'next tuesday' is not an ISO 8601 time"),
    ("unbalanced template brace", one({"type": "log", "message": "order {input.order"}, "greet"),
     "activities.greet.message", "unmatched '{' at character 7"),
    ("unbalanced closing brace in a signal name", one({"type": "signal", "name": "go-}"}, "hold"),
     "activities.hold.name", "unmatched '}' at character 4"),
    ("bad template path", one({"type": "log", "message": "order {input..order}"}, "greet"),
     "activities.greet.message", "{input..order} is not a variable path"),
    ("message of the wrong type", one({"type": "log", "message": 42}, "shout"),
     "activities.shout.message", "must be text, not a number"),
    ("unknown field in an activity", one({"type": "log", "message": "x", "colour": "red"}),
     "activities.a.colour", "unknown field for a log activity"),
    ("activity without a type", one({"message": "x"}, "typeless"),
     "activities.typeless.type", "is missing; give one of log, set, if"),
    ("fail with next",
     {"id": "bad", "start": "refuse",
      "activities": {"refuse": {"type": "fail", "message": "no", "next": "b"}, "b": LOG}},
     "activities.refuse.next", "a fail activity ends its instance; remove next"),
    ("set with neither values nor add", one({"type": "set"}, "tally"),
     "activities.tally", 'a set activity needs "values" or "add"'),
    ("add of a non-number", one({"type": "set", "add": {"tries": "one"}}, "bump"),
     "activities.bump.add.tries", "must be a number, not text"),
    ("bad condition op", one({"type": "if", "condition": {"var": "input.x", "op": "=~", "value": 1}, "next": "a"}),
     "activities.a.condition.op", 'not "=~"'),
    ("condition missing value", one({"type": "if", "condition": {"var": "input.x", "op": ">="}, "then": "a"}),
     "activities.a.condition", '">=" needs a value'),
    ("exists with a value", one({"type": "if", "condition": {"var": "input.x", "op": "exists", "value": 1},
                                 "next": "a"}, "probe"),
     "activities.probe.condition", '"exists" takes no value'),
    ("bad variable path in a nested condition",
     one({"type": "if", "condition": {"any": [EXISTS, {"not": {"var": "a b", "op": "exists"}}]}, "next": "a"}),
     "activities.a.condition.any[1].not.var", 'not "a b"'),
    ("empty all", one({"type": "if", "condition": {"all": []}, "next": "a"}, "gate"),
     "activities.gate.condition.all", "must be a non-empty list of conditions"),
    ("in with a number", one({"type": "if", "condition": {"var": "input.x", "op": "in", "value": 3}, "next": "a"},
                             "member"),
     "activities.member.condition.value", '"in" needs a list (or text), not a number'),
    ("if without a way out", one({"type": "if", "condition": EXISTS}, "stuck"),
     "activities.stuck", 'an if activity needs "then", "else" or "next"'),
    ("retry attempts 0", one({"type": "call", "function": "charge", "retry": {"attempts": 0}}, "charge"),
     "activities.charge.retry.attempts", "must be a whole number from 1 to 100, not 0"),
    ("retry with an unknown field", one({"type": "call", "function": "charge", "retry": {"tries": 3}}, "pay"),
     "activities.pay.retry", 'must be an object such as {"attempts": 5'),
    ("bad function name", one({"type": "call", "function": "9lives"}, "invoke"),
     "activities.invoke.function", 'not "9lives"'),
    ("work over an hour", one({"type": "work", "duration": "2h"}, "crunch"),
     "activities.crunch.duration", "the most is"),
    ("work of an unknown kind", one({"type": "work", "duration": "1s", "kind": "gpu"}, "crunch"),
     "activities.crunch.kind", 'not "gpu"'),
    ("bad activity id", {"id": "bad", "start": "a b", "activities": {"a b": LOG}},
     "activities.a b", "an activity id is 1 to 100 letters"),
    ("triggers not a list", one(LOG, triggers={"type": "signal", "name": "go"}),
     "triggers", "must be a list, not an object"),
    ("trigger of an unknown type", one(LOG, triggers=[{"type": "webhook", "url": "http://x"}]),
     "triggers[0].type", 'must be "cron" or "signal", not "webhook"'),
    ("bad signal trigger name", one(LOG, triggers=[{"type": "signal", "name": "ok"},
                                                    {"type": "signal", "name": "tab\there"}]),
     "triggers[1].name", "not 'tab\\there'"),
    ("trigger input not an object", one(LOG, triggers=[{"type": "signal", "name": "go", "input": "text"}]),
     "triggers[0].input", "must be a JSON object, not text"),
    ("variables not an object", one(LOG, variables=[1, 2]), "variables", "must be a JSON object, not a list"),
    ("too many activities", too_many_activities(), "activities", "1001 activities; the most is 1000"),
    ("definition over 256 KiB", one({"type": "log", "message": "x", "description": "y" * 270_000}),
     "definition", "bytes of JSON; the most is 262144"),
    ("not JSON at all", '{"id": "bad",\n  "start": "a"\n  "activities": {}}',
     "", "not JSON: Expecting ',' delimiter at line 3 column 3"),
    ("not UTF-8", b'{"id": "caf\xe9"}', "", "not UTF-8 text (byte 11)"),
    ("a JSON list", "[1, 2, 3]", "definition", "must be a JSON object, not a list"),
    ("top-level version field", one(LOG, version=3), "version", "unknown field; versions are numbered by define"),
]
# fmt: on

# One definition with nine problems: all nine are reported, each with its place.
SEVERAL_PROBLEMS = {
    "id": "several problems",
    "version": 2,
    "start": "a",
    "activities": {
        "a": {"type": "log", "message": 42, "next": "zz"},
        "b": {"type": "timer", "duration": "5 parsecs"},
        "c": {"type": "wat"},
    },
    "triggers": [{"type": "cron", "cron": "* * *"}],
}
SEVERAL_PROBLEMS_PLACES = [
    "version",
    "id",
    "activities.a.message",
    "activities.b.duration",
    "activities.c.type",
    "activities.a.next",
    "activities.b",
    "activities.c",
    "triggers[0].cron",
]

# A valid definition that gives every watched table rows, so "nothing changed" means something.
SEED = {
    "id": "seed",
    "start": "hold",
    "activities": {
        "hold": {"type": "signal", "name": "seed-go", "next": "done"},
        "done": {"type": "log", "message": "."},
    },
    "triggers": [{"type": "cron", "cron": "0 3 * * *", "tz": "Europe/Paris"}, {"type": "signal", "name": "seed-kick"}],
}


def definition_bytes(definition: Any) -> bytes:
    if isinstance(definition, bytes):
        return definition
    return (definition if isinstance(definition, str) else json.dumps(definition)).encode()


class BadDefinitionTests(ClusterTestCase):
    """Every bad definition is refused, with its own place and message, and writes nothing."""

    def setUp(self) -> None:
        super().setUp()
        with nodeflow.connect(self.db) as nf:
            nf.define(SEED)
            nf.start("seed", {"order": 1})
            nf.trigger("something")

    def test_corpus_is_large_and_names_distinct(self) -> None:
        self.assertGreaterEqual(len(BAD_DEFINITIONS), 25)
        self.assertEqual(len({name for name, *_ in BAD_DEFINITIONS}), len(BAD_DEFINITIONS))
        self.assertEqual(len({(place, message) for _, _, place, message in BAD_DEFINITIONS}), len(BAD_DEFINITIONS))

    def test_define_file_refuses_each_with_its_own_message_and_writes_nothing(self) -> None:
        files = []
        for index, (_, definition, _, _) in enumerate(BAD_DEFINITIONS):
            name = f"bad{index:02d}.json"
            with open(os.path.join(self.dir, name), "wb") as out:
                out.write(definition_bytes(definition))
            files.append(name)
        rows_before = table_rows(self.db, WATCHED_TABLES)
        files_before = tree_snapshot(self.db)
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda name: self.cli("define", name), files))
        files_after = tree_snapshot(self.db)
        rows_after = table_rows(self.db, WATCHED_TABLES)
        for (case, _, place, message), name, result in zip(BAD_DEFINITIONS, files, results, strict=True):
            with self.subTest(case):
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertEqual(result.stdout, "")
                lines = result.stderr.splitlines()
                prefix = f"nodeflow: define {name}: "
                for line in lines:
                    self.assertTrue(line.startswith(prefix), line)
                problems = [line[len(prefix) :] for line in lines[:-1]]
                noun = "problem" if len(problems) == 1 else "problems"
                self.assertEqual(lines[-1], f"{prefix}{len(problems)} {noun}; nothing was stored")
                wanted = f"{place}: " if place else f"{name}: "  # a parse error's place is the file
                self.assertTrue(
                    any(problem.startswith(wanted) and message in problem for problem in problems),
                    f"no problem {wanted}...{message} in:\n{result.stderr}",
                )
                for other, _, other_place, other_message in BAD_DEFINITIONS:
                    if other != case:
                        self.assertFalse(
                            any(
                                problem.startswith(f"{other_place}: ") and other_message in problem
                                for problem in problems
                            ),
                            f"{case!r} also reported the problem of {other!r}:\n{result.stderr}",
                        )
        self.assertEqual(rows_after, rows_before, "a refused define changed the database")
        self.assertEqual(files_after, files_before, "a refused define changed the database files")

    def test_api_define_raises_the_same_problems_and_writes_nothing(self) -> None:
        with nodeflow.connect(self.db) as nf:
            for case, definition, place, message in BAD_DEFINITIONS:
                with self.subTest(case):
                    before = table_rows(self.db, WATCHED_TABLES)
                    with self.assertRaises(nodeflow.InvalidDefinition) as caught:
                        nf.define(definition)
                    problems = caught.exception.problems
                    self.assertIsInstance(caught.exception, nodeflow.InvalidInput)
                    wanted = f"{place}: " if place else "definition: "
                    self.assertTrue(
                        any(problem.startswith(wanted) and message in problem for problem in problems), problems
                    )
                    self.assertEqual(str(caught.exception), "\n".join(problems))
                    self.assertEqual(table_rows(self.db, WATCHED_TABLES), before)
            self.assertEqual([info.id for info in nf.definitions()], ["seed"])

    def test_several_problems_are_all_reported(self) -> None:
        path = os.path.join(self.dir, "several.json")
        with open(path, "w") as out:
            json.dump(SEVERAL_PROBLEMS, out)
        before = table_rows(self.db, WATCHED_TABLES)
        result = self.cli("define", "several.json")
        self.assertEqual(result.returncode, 2)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), len(SEVERAL_PROBLEMS_PLACES) + 1, result.stderr)
        self.assertEqual(lines[-1], "nodeflow: define several.json: 9 problems; nothing was stored")
        places = [line.removeprefix("nodeflow: define several.json: ").split(": ", 1)[0] for line in lines[:-1]]
        self.assertEqual(sorted(places), sorted(SEVERAL_PROBLEMS_PLACES))
        self.assertEqual(table_rows(self.db, WATCHED_TABLES), before)
        # The API lists the very same problems.
        with self.assertRaises(nodeflow.InvalidDefinition) as caught:
            nodeflow.compile_definition(SEVERAL_PROBLEMS)
        self.assertEqual(
            [f"nodeflow: define several.json: {problem}" for problem in caught.exception.problems], lines[:-1]
        )

    def test_unreadable_file_and_stdin(self) -> None:
        before = table_rows(self.db, WATCHED_TABLES)
        missing = self.cli("define", "no-such-file.json")
        self.assertEqual(missing.returncode, 2)
        self.assertIn("cannot read no-such-file.json", missing.stderr)
        piped = self.cli("define", "-", input='{"id": "bad", "start": "nowhere", "activities": {"a": {"type": "log"}}}')
        self.assertEqual(piped.returncode, 2)
        self.assertIn('nodeflow: define stdin: start: no activity named "nowhere"', piped.stderr)
        self.assertIn("nodeflow: define stdin: activities.a.message: is missing", piped.stderr)
        self.assertIn("nodeflow: define stdin: 2 problems; nothing was stored", piped.stderr)
        self.assertEqual(table_rows(self.db, WATCHED_TABLES), before)

    def test_refused_define_creates_no_database(self) -> None:
        fresh = os.path.join(self.dir, "fresh.db")
        with open(os.path.join(self.dir, "bad.json"), "w") as out:
            json.dump(one({"type": "timer", "duration": "5 parsecs"}), out)
        result = subprocess.run(
            [PYTHON, NODEFLOW, "--db", fresh, "define", "bad.json"], capture_output=True, text=True, cwd=self.dir
        )
        self.assertEqual(result.returncode, 2)
        self.assertEqual(tree_snapshot(fresh), {"": None, "-wal": None, "-shm": None})
        self.assertFalse(os.path.exists(fresh + ".d"))

    def test_too_many_activities_is_one_problem(self) -> None:
        """More than 1000 activities is one problem, not also a false 'start: no activity named "s0"'."""
        with self.assertRaises(nodeflow.InvalidDefinition) as caught:
            nodeflow.compile_definition(too_many_activities())
        self.assertEqual(caught.exception.problems, ["activities: 1001 activities; the most is 1000"])

    def test_work_limit_is_said_in_plain_numbers(self) -> None:
        """Long durations read '7200s', never '7.2e+03s' (also in a call's "next in ..." outcome)."""
        with self.assertRaises(nodeflow.InvalidDefinition) as caught:
            nodeflow.compile_definition(one({"type": "work", "duration": "2h"}, "crunch"))
        (problem,) = caught.exception.problems
        self.assertTrue(problem.startswith("activities.crunch.duration: is "), problem)
        self.assertNotIn("e+", problem)
        self.assertRegex(problem, r"the most is (3600s|1h|60m)")


def compiled_condition(condition: dict[str, Any]) -> nodeflow.Condition:
    blueprint = nodeflow.compile_definition(
        {"id": "c", "start": "x", "activities": {"x": {"type": "if", "condition": condition, "next": "y"}, "y": LOG}}
    )
    return blueprint.activities["x"].spec["condition"]


VARIABLES = {
    "n": 5,
    "m": 5,
    "f": 2.5,
    "s": "abc",
    "items": [1, "two", 3],
    "d": {"k": 1},
    "t": True,
    "z": None,
    "input": {"order": 42, "items": [1, 2], "who": {"name": "ann"}},
}


class ValidationApiTests(unittest.TestCase):
    """compile_definition, parse_definition, Template and evaluate_condition, in process."""

    def test_valid_definition_compiles(self) -> None:
        definition = {
            "id": "order.v2_ok-1",
            "name": "Order processing",
            "description": "all activity types",
            "start": "received",
            "variables": {"total": 0},
            "activities": {
                "received": {"type": "log", "message": "order {input.order} received", "next": "tally"},
                "tally": {"type": "set", "values": {"total": "{input.total}"}, "add": {"tries": 1}, "next": "cool"},
                "cool": {"type": "timer", "duration": "1m30s", "next": "at"},
                "at": {"type": "start_at", "at": "{input.when}", "next": "charge"},
                "charge": {
                    "type": "call",
                    "function": "shop:charge",
                    "result": "receipt",
                    "next": "big",
                    "retry": {"attempts": 5, "delay": "2s"},
                },
                "big": {
                    "type": "if",
                    "condition": {
                        "all": [
                            {"var": "total", "op": ">", "value": 100},
                            {"not": {"var": "input.vip", "op": "exists"}},
                        ]
                    },
                    "then": "approval",
                    "else": "work",
                },
                "approval": {"type": "signal", "name": "approve-{input.order}", "next": "work"},
                "work": {"type": "work", "duration": "250ms", "kind": "cpu", "next": "nope"},
                "nope": {"type": "fail", "message": "refused {{really}}", "description": "the end"},
            },
            "triggers": [
                {"type": "cron", "cron": "*/5 * * * *", "tz": "UTC", "input": {"order": "nightly"}},
                {"type": "signal", "name": "kick", "input": {"n": 1}},
            ],
        }
        blueprint = nodeflow.compile_definition(definition)
        self.assertEqual(
            (blueprint.id, blueprint.name, blueprint.start), ("order.v2_ok-1", "Order processing", "received")
        )
        self.assertEqual(set(blueprint.activities), set(definition["activities"]))
        self.assertEqual(blueprint.activities["charge"].spec["retry"], (5, 2.0))
        self.assertEqual(blueprint.activities["cool"].spec["duration"], 90.0)
        self.assertEqual(blueprint.activities["nope"].next, None)
        self.assertEqual([t["type"] for t in blueprint.triggers], ["cron", "signal"])
        self.assertEqual(blueprint.triggers[1], {"type": "signal", "name": "kick", "input": {"n": 1}})
        self.assertEqual(json.loads(blueprint.body), definition)
        # A call without retry gets the defaults; name defaults to the id.
        plain = nodeflow.compile_definition(one({"type": "call", "function": "f"}))
        self.assertEqual(plain.activities["a"].spec["retry"], (nodeflow.CALL_ATTEMPTS, nodeflow.CALL_RETRY_DELAY))
        self.assertEqual(plain.name, "bad")

    def test_problems_list_every_problem_with_its_place(self) -> None:
        with self.assertRaises(nodeflow.InvalidDefinition) as caught:
            nodeflow.compile_definition(SEVERAL_PROBLEMS)
        problems = caught.exception.problems
        self.assertEqual([problem.split(": ", 1)[0] for problem in problems], SEVERAL_PROBLEMS_PLACES)
        self.assertIn('activities.c.type: unknown activity type "wat"', problems[4])
        self.assertEqual(problems[5], 'activities.a.next: no activity named "zz"')

    def test_parse_definition(self) -> None:
        self.assertEqual(nodeflow.parse_definition('{"a": [1, {"b": null}]}'), {"a": [1, {"b": None}]})
        with self.assertRaises(nodeflow.InvalidDefinition) as caught:
            nodeflow.parse_definition('{\n\n   "id": }', "mine.json")
        self.assertEqual(caught.exception.problems, ["mine.json: not JSON: Expecting value at line 3 column 10"])
        with self.assertRaises(nodeflow.InvalidDefinition) as caught:
            nodeflow.parse_definition("[" * 100_000)
        self.assertEqual(caught.exception.problems, ["definition: nested too deeply"])
        with self.assertRaises(nodeflow.InvalidDefinition) as caught:
            nodeflow.parse_definition(" " * (nodeflow.DEFINITION_MAX_BYTES * 4 + 1))
        self.assertIn("larger than", caught.exception.problems[0])

    def test_template_rendering(self) -> None:
        template = nodeflow.Template("order {input.order} for { input.who.name } ({items.1})")
        self.assertEqual(template.render(VARIABLES), "order 42 for ann (two)")
        self.assertFalse(template.is_constant)
        self.assertEqual(nodeflow.Template("{{literal}} and }}").render({}), "{literal} and }")
        self.assertEqual(nodeflow.Template("{{{input.order}}}").render(VARIABLES), "{42}")
        self.assertTrue(nodeflow.Template("{{input.order}}").is_constant)
        self.assertEqual(nodeflow.Template("{{input.order}}").render(VARIABLES), "{input.order}")
        # Values that are not text are rendered as compact JSON.
        self.assertEqual(
            nodeflow.Template("{input.items}|{d}|{t}|{z}|{f}").render(VARIABLES), '[1,2]|{"k":1}|true|null|2.5'
        )
        self.assertEqual(nodeflow.Template("x {input.order}").value(VARIABLES), "x 42")
        self.assertEqual(nodeflow.Template("no placeholders").value(VARIABLES), "no placeholders")

    def test_template_faults_on_a_missing_variable(self) -> None:
        for text, missing in (
            ("{input.nope}", "input.nope"),
            ("{items.7}", "items.7"),
            ("{s.x}", "s.x"),
            ("a {n.0.x} b", "n.0"),
        ):
            with self.subTest(text), self.assertRaises(nodeflow._Fault) as caught:
                nodeflow.Template(text).render(VARIABLES)
            self.assertEqual(str(caught.exception), f"no variable {missing}")

    def test_template_syntax_errors(self) -> None:
        for text, message in (
            ("a {b", "unmatched '{' at character 3"),
            ("a } b", "unmatched '}' at character 3"),
            ("{}", "{} is not a variable path"),
            ("{a b}", "{a b} is not a variable path"),
            ("{a..b}", "{a..b} is not a variable path"),
            ("x" * 4097, "at most 4096 characters"),
        ):
            with self.subTest(text[:10]), self.assertRaises(ValueError) as caught:
                nodeflow.Template(text)
            self.assertIn(message, str(caught.exception))

    def test_whole_placeholder_keeps_its_type(self) -> None:
        """A template that is one placeholder alone gives the variable itself, of any JSON type."""
        self.assertEqual(nodeflow.Template("{input.items}").value(VARIABLES), [1, 2])
        self.assertEqual(nodeflow.Template("{input.order}").value(VARIABLES), 42)
        self.assertEqual(nodeflow.Template("{ input.who }").value(VARIABLES), {"name": "ann"})
        self.assertIs(nodeflow.Template("{t}").value(VARIABLES), True)

    def test_every_operator(self) -> None:
        cases = [
            ({"var": "n", "op": "==", "value": 5}, True),
            ({"var": "n", "op": "==", "value": 5.0}, True),
            ({"var": "n", "op": "==", "value": "5"}, False),
            ({"var": "t", "op": "==", "value": 1}, False),  # true is not the number 1
            ({"var": "z", "op": "==", "value": None}, True),
            ({"var": "n", "op": "!=", "value": "5"}, True),
            ({"var": "n", "op": "!=", "value": 5}, False),
            ({"var": "n", "op": ">", "value": 4}, True),
            ({"var": "n", "op": ">", "value": 5}, False),
            ({"var": "s", "op": ">", "value": "abb"}, True),
            ({"var": "n", "op": ">=", "value": 5}, True),
            ({"var": "f", "op": "<", "value": 3}, True),
            ({"var": "n", "op": "<=", "value": 4}, False),
            ({"var": "n", "op": "in", "value": [1, 5]}, True),
            ({"var": "n", "op": "in", "value": ["5"]}, False),
            ({"var": "t", "op": "in", "value": [1]}, False),
            ({"var": "s", "op": "in", "value": "xxabcxx"}, True),
            ({"var": "n", "op": "not in", "value": [1, 2]}, True),
            ({"var": "s", "op": "not in", "value": ["abc"]}, False),
            ({"var": "items", "op": "contains", "value": "two"}, True),
            ({"var": "items", "op": "contains", "value": 2}, False),
            ({"var": "s", "op": "contains", "value": "bc"}, True),
            ({"var": "d", "op": "contains", "value": "k"}, True),
            ({"var": "d.k", "op": "exists"}, True),
            ({"var": "d.q", "op": "exists"}, False),
            ({"var": "items.2", "op": "exists"}, True),
            ({"var": "items.3", "op": "exists"}, False),
            ({"var": "z", "op": "exists"}, True),  # null is a value
            ({"var": "n", "op": "==", "value": {"var": "m"}}, True),
            ({"var": "n", "op": ">", "value": {"var": "f"}}, True),
            ({"var": "input.order", "op": "in", "value": {"var": "input.items"}}, False),
            ({"all": [{"var": "n", "op": ">", "value": 1}, {"var": "s", "op": "==", "value": "abc"}]}, True),
            ({"all": [{"var": "n", "op": ">", "value": 1}, {"var": "s", "op": "==", "value": "x"}]}, False),
            ({"any": [{"var": "n", "op": ">", "value": 9}, {"var": "s", "op": "==", "value": "abc"}]}, True),
            ({"any": [{"var": "n", "op": ">", "value": 9}, {"var": "s", "op": "==", "value": "x"}]}, False),
            ({"not": {"var": "n", "op": ">", "value": 1}}, False),
            (
                {"not": {"any": [{"var": "d.q", "op": "exists"}, {"not": {"var": "t", "op": "==", "value": True}}]}},
                True,
            ),
            # Short cuts: what is never evaluated cannot fault.
            ({"any": [{"var": "n", "op": "==", "value": 5}, {"var": "s", "op": ">", "value": 1}]}, True),
            ({"all": [{"var": "n", "op": "==", "value": 6}, {"var": "nope", "op": "==", "value": 1}]}, False),
        ]
        for condition, expected in cases:
            with self.subTest(json.dumps(condition)):
                self.assertIs(nodeflow.evaluate_condition(compiled_condition(condition), VARIABLES), expected)

    def test_type_mismatches_fault_at_run_time(self) -> None:
        cases = [
            ({"var": "s", "op": ">", "value": 1}, "cannot compare str abc > number 1"),
            ({"var": "t", "op": "<", "value": 1}, "cannot compare"),
            ({"var": "n", "op": ">=", "value": {"var": "s"}}, "cannot compare"),
            ({"var": "n", "op": "in", "value": {"var": "d"}}, "'in' needs a list (or text) on its right"),
            ({"var": "n", "op": "contains", "value": 5}, "'contains' needs a list, text or object on its left"),
            ({"var": "nope", "op": "==", "value": 1}, "no variable nope"),
            ({"var": "n", "op": "==", "value": {"var": "input.missing"}}, "no variable input.missing"),
        ]
        for condition, message in cases:
            with self.subTest(json.dumps(condition)), self.assertRaises(nodeflow._Fault) as caught:
                nodeflow.evaluate_condition(compiled_condition(condition), VARIABLES)
            self.assertIn(message, str(caught.exception))

    def test_contains_fault_names_its_operator(self) -> None:
        """Text "contains" a number faults naming 'contains', the operator actually used."""
        with self.assertRaises(nodeflow._Fault) as caught:
            nodeflow.evaluate_condition(compiled_condition({"var": "s", "op": "contains", "value": 5}), VARIABLES)
        self.assertIn("contains", str(caught.exception))
        self.assertNotIn("not str", str(caught.exception))


def write_json(path: str, data: Any) -> str:
    with open(path, "w") as out:
        json.dump(data, out)
    return path


VERSIONED_V1 = {
    "id": "ver",
    "name": "Versioned",
    "start": "hello",
    "activities": {"hello": {"type": "log", "message": "v1 {input.n}", "next": "bye"}, "bye": LOG},
    "triggers": [{"type": "cron", "cron": "0 3 * * *", "tz": "Europe/Paris"}, {"type": "signal", "name": "ver-kick"}],
}
VERSIONED_V2 = {
    **VERSIONED_V1,
    "activities": {"hello": {"type": "log", "message": "v2 {input.n}"}},
    "triggers": [{"type": "signal", "name": "ver-poke", "input": {"from": "poke"}}],
}


class VersionAndCommandLineTests(ClusterTestCase):
    """define/definitions/start/instances/show/retry through the CLI; no node runs here."""

    def json_of(self, *args: str) -> Any:
        result = self.cli(*args)
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout)

    def test_versions(self) -> None:
        v1 = write_json(os.path.join(self.dir, "v1.json"), VERSIONED_V1)
        first = self.cli("define", v1)
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertEqual(first.stdout, "defined ver version 1 (2 activities, 2 triggers)\n")
        again = self.cli("define", v1)
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertEqual(again.stdout, "ver version 1 is already this definition; nothing changed\n")
        # The same definition written otherwise (key order, spacing) is the same version too.
        reordered = json.dumps(dict(reversed(list(VERSIONED_V1.items()))), indent=4)
        piped = self.cli("define", "-", "--json", input=reordered)
        self.assertEqual(piped.returncode, 0, piped.stderr)
        self.assertEqual(json.loads(piped.stdout)["changed"], False)
        self.assertEqual(json.loads(piped.stdout)["version"], 1)
        rows = table_rows(self.db, WATCHED_TABLES)
        self.assertEqual([(row[0], row[1]) for row in rows["definitions"]], [("ver", 1)])
        timers = {row[0]: row for row in rows["timers"]}
        self.assertEqual(set(timers), {"workflow:ver#0"})
        self.assertEqual((timers["workflow:ver#0"][3], timers["workflow:ver#0"][4]), ("0 3 * * *", "Europe/Paris"))
        self.assertEqual([row[:3] for row in rows["signal_triggers"]], [("ver-kick", "ver", 1)])

        old = self.cli("start", "ver", "--input", '{"n": 1}').stdout.strip()
        self.assertRegex(old, r"^[0-9a-f]{16}$")

        v2 = write_json(os.path.join(self.dir, "v2.json"), VERSIONED_V2)
        second = self.cli("define", v2, "--json")
        self.assertEqual(second.returncode, 0, second.stderr)
        info = json.loads(second.stdout)
        self.assertEqual((info["id"], info["version"], info["changed"], info["activities"]), ("ver", 2, True, 1))
        self.assertEqual(self.cli("define", v2).stdout, "ver version 2 is already this definition; nothing changed\n")
        # v1 again is a new version (3), not a return to version 1.
        self.assertEqual(self.cli("define", v1).stdout, "defined ver version 3 (2 activities, 2 triggers)\n")
        self.assertEqual(self.cli("define", v2).stdout, "defined ver version 4 (1 activities, 1 triggers)\n")

        rows = table_rows(self.db, WATCHED_TABLES)
        self.assertEqual(rows["timers"], [], "the cron trigger of the old version is gone")
        self.assertEqual([row[:3] for row in rows["signal_triggers"]], [("ver-poke", "ver", 0)])

        listed = self.json_of("definitions", "--json")["definitions"]
        self.assertEqual(len(listed), 1)
        entry = listed[0]
        self.assertLessEqual({"id", "name", "version", "created", "activities", "triggers"}, set(entry))
        self.assertEqual(
            (entry["id"], entry["name"], entry["version"], entry["activities"]), ("ver", "Versioned", 4, 1)
        )
        self.assertEqual(entry["triggers"], VERSIONED_V2["triggers"])
        datetime.datetime.fromisoformat(entry["created"])
        text = self.cli("definitions")
        self.assertIn("ver\tv4\t1 activities", text.stdout)
        self.assertIn("triggers: signal ver-poke", text.stdout)

        new = self.cli("start", "ver", "--json").stdout
        new_id = json.loads(new)["id"]
        instances = {i["id"]: i for i in self.json_of("instances", "--json")["instances"]}
        self.assertEqual(instances[old]["version"], 1, "an instance keeps the version it started with")
        self.assertEqual(instances[new_id]["version"], 4)
        self.assertLessEqual({"id", "definition", "version", "status"}, set(instances[old]))
        self.assertEqual({i["status"] for i in instances.values()}, {"running"})
        with nodeflow.connect(self.db) as nf:
            self.assertEqual(nf.definition("ver", 1), VERSIONED_V1)
            self.assertEqual(nf.definition("ver"), VERSIONED_V2)
            self.assertEqual([(i.id, i.version) for i in nf.instances(definition="ver")], [(old, 1), (new_id, 4)])
            with self.assertRaises(nodeflow.InvalidInput):
                nf.definition("ver", 9)

    def test_bad_command_line_input_exits_2_and_writes_nothing(self) -> None:
        with nodeflow.connect(self.db) as nf:
            nf.define(VERSIONED_V1)
            running = nf.start("ver", {"n": 1})
        before = table_rows(self.db, WATCHED_TABLES)
        cases = [
            (("start", "no-such-flow"), "no workflow definition 'no-such-flow'"),
            (("start", "no-such-flow", "--wait", "--timeout", "1s"), "no workflow definition"),
            (("start", "bad id!"), "the workflow id is 1 to 100"),
            (("start", "ver", "--input", "[1, 2]"), "--input must be a JSON object"),
            (("start", "ver", "--input", '"text"'), "--input must be a JSON object"),
            (("start", "ver", "--input", "{not json"), "--input is not valid JSON"),
            (("start", "ver", "--timeout", "soon", "--wait"), "not a duration"),
            (("signal", "ver-kick", "--input", "42"), "must be a JSON object"),
            (("signal", ""), "a signal name is printable text"),
            (("show", "zzzz"), "no instance 'zzzz'"),
            (("show", running[:3]), f"no instance '{running[:3]}'"),  # a prefix needs four characters
            (("show", "0123456789abcdef"), "no instance"),
            (("retry", "ffffffffffffffff"), "no instance"),
            (("retry", running), f"instance {running} is running"),  # its run message is queued
            (("instances", "--status", "sleeping"), "invalid choice: 'sleeping'"),
            (("instances", "--limit", "0"), "must be a whole number of at least 1"),
        ]
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda case: self.cli(*case[0]), cases))
        for (args, message), result in zip(cases, results, strict=True):
            with self.subTest(" ".join(args)):
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertIn(message, result.stderr)
                self.assertTrue(result.stderr.startswith("nodeflow: "), result.stderr)
        self.assertEqual(table_rows(self.db, WATCHED_TABLES), before)
        # start on a database that does not exist: refused, and no database is created for it
        fresh = os.path.join(self.dir, "none.db")
        result = subprocess.run(
            [PYTHON, NODEFLOW, "--db", fresh, "start", "ver"], capture_output=True, text=True, cwd=self.dir
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("no nodeflow database", result.stderr)
        self.assertFalse(os.path.exists(fresh))

    def test_show_by_unique_prefix_or_suffix(self) -> None:
        with nodeflow.connect(self.db) as nf:
            nf.define(VERSIONED_V1)
            ids = [nf.start("ver", {"n": n}) for n in range(6)]
        target = ids[3]
        length = next(size for size in range(4, 17) if sum(other.startswith(target[:size]) for other in ids) == 1)
        shown = self.json_of("show", target[:length], "--json")
        self.assertEqual(shown["id"], target)
        self.assertEqual(shown["variables"], {"input": {"n": 3}})
        self.assertEqual(shown["journal"], [])
        self.assertLessEqual({"id", "definition", "version", "status", "variables", "journal"}, set(shown))
        text = self.cli("show", target[:length])
        self.assertEqual(text.returncode, 0, text.stderr)
        self.assertIn(f"instance {target}: ver v1, running", text.stdout)
        self.assertIn("journal: no steps yet", text.stdout)
        by_end = self.json_of("show", target[-6:], "--json")  # ids start with their time: the end is quicker
        self.assertEqual(by_end["id"], target)
        listed = self.json_of("instances", "--definition", "ver", "--limit", "2", "--json")["instances"]
        self.assertEqual([i["id"] for i in listed], ids[-2:])


# The module the node runs (--app): the functions call activities use.
APP = """
import asyncio
import os

import nodeflow


@nodeflow.activity("receipt")
def receipt(variables):
    return {"receipt": "r-" + str(variables["input"]["order"])}


@nodeflow.activity("twice")
async def twice(variables):
    await asyncio.sleep(0)
    return variables["input"]["order"] * 2


@nodeflow.activity("whoami")
def whoami(variables):
    call = nodeflow.current_call()
    return {"instance": call.instance, "activity": call.activity, "step": call.step, "fence": call.fence,
            "node": call.node, "key": call.key}


@nodeflow.activity("keyed")
def keyed(variables):
    call = nodeflow.current_call()
    with open(variables["input"]["keys"], "a") as keys:
        keys.write(f"{call.key} {call.step}\\n")
    with open(variables["input"]["keys"]) as keys:
        tries = len(keys.read().splitlines())
    if tries < 3:
        raise RuntimeError(f"try {tries} fails")
    return tries


@nodeflow.activity("flaky")
def flaky(variables):
    with open(variables["input"]["calls"], "a") as calls:
        calls.write("call\\n")
    if not os.path.exists(variables["input"]["flag"]):
        raise RuntimeError("card declined")
    return {"charged": True}
"""

# fmt: off
NODE_DEFINITIONS: list[dict[str, Any]] = [
    {
        "id": "hello",
        "start": "greet",
        "variables": {"count": 1, "label": "default", "input": {"order": -1, "ignored": True}},
        "activities": {
            "greet": {"type": "log", "message": "order {input.order} received", "next": "tally"},
            "tally": {
                "type": "set",
                "values": {"label": "order-{input.order}", "literal": "{{input.order}}", "flag": True,
                           "nested": {"a": [1, 2], "b": "{not a template}"}},
                "add": {"count": 2, "fresh": 0.5},
                "next": "pay",
            },
            "pay": {"type": "call", "function": "wfapp:receipt", "next": "double"},
            "double": {"type": "call", "function": "twice", "result": "doubled", "next": "pause"},
            "pause": {"type": "timer", "duration": "100ms", "next": "size"},
            "size": {"type": "if", "condition": {"var": "input.order", "op": ">", "value": 10},
                     "then": "large", "else": "small"},
            "large": {"type": "set", "values": {"size": "large"}, "next": "rest"},
            "small": {"type": "set", "values": {"size": "small"}, "next": "rest"},
            "rest": {"type": "work", "duration": "100ms", "next": "crunch"},
            "crunch": {"type": "work", "duration": "50ms", "kind": "cpu"},
        },
    },
    {
        "id": "flaky",
        "start": "charge",
        "activities": {
            "charge": {"type": "call", "function": "flaky", "result": "paid",
                       "retry": {"attempts": 2, "delay": "100ms"}, "next": "after"},
            "after": {"type": "log", "message": "paid {paid.charged}"},
        },
    },
    {
        "id": "approve",
        "start": "ask",
        "activities": {
            "ask": {"type": "signal", "name": "approve-{input.order}", "result": "approval", "next": "decide"},
            "decide": {"type": "if", "condition": {"var": "approval.ok", "op": "==", "value": True},
                       "then": "done", "else": "refuse"},
            "done": {"type": "set", "values": {"outcome": "approved by {approval.by}"}},
            "refuse": {"type": "fail", "message": "order {input.order} refused by {approval.by}"},
        },
    },
    {
        "id": "hold",
        "start": "wait",
        "activities": {"wait": {"type": "signal", "name": "hold-{input.k}"}},
    },
    {
        "id": "kicked",
        "start": "note",
        "triggers": [{"type": "signal", "name": "kick-wf", "input": {"source": "trigger", "n": 0}}],
        "activities": {"note": {"type": "set", "values": {"seen": "n={input.n}"}}},
    },
    {
        "id": "doomed",
        "start": "refuse",
        "activities": {"refuse": {"type": "fail", "message": "order {input.order} refused"}},
    },
    {
        "id": "branches",
        "start": "check",
        "activities": {
            "check": {"type": "if", "condition": {"any": [
                          {"all": [{"var": "input.vip", "op": "exists"},
                                   {"var": "input.vip", "op": "==", "value": True}]},
                          {"all": [{"var": "input.total", "op": "exists"},
                                   {"var": "input.total", "op": ">=", "value": 100}]},
                      ]}, "then": "gold", "next": "plain"},
            "gold": {"type": "set", "values": {"tier": "gold"}, "next": "plain"},
            "plain": {"type": "set", "add": {"visits": 1}, "next": "last"},
            "last": {"type": "if", "condition": {"not": {"var": "tier", "op": "exists"}}, "then": "basic"},
            "basic": {"type": "set", "values": {"tier": "basic"}},
        },
    },
    {
        "id": "mismatch",
        "start": "check",
        "activities": {
            "check": {"type": "if", "condition": {"var": "input.word", "op": ">", "value": 3}, "then": "a"},
            "a": LOG,
        },
    },
    {
        "id": "loop",
        "start": "check",
        "variables": {"count": 0},
        "activities": {
            "check": {"type": "if", "condition": {"var": "count", "op": "<", "value": 150},
                      "then": "inc", "next": "done"},
            "inc": {"type": "set", "add": {"count": 1}, "next": "check"},
            "done": {"type": "log", "message": "counted {count}"},
        },
    },
    {
        "id": "at",
        "start": "when",
        "activities": {"when": {"type": "start_at", "at": "{input.when}", "next": "done"}, "done": LOG},
    },
    {
        "id": "nowhere",
        "start": "ring",
        "activities": {"ring": {"type": "call", "function": "nowhere", "retry": {"attempts": 1}}},
    },
    {
        "id": "whoami",
        "start": "first",
        "activities": {
            "first": {"type": "call", "function": "whoami", "next": "pause"},
            "pause": {"type": "timer", "duration": "50ms", "next": "second"},
            "second": {"type": "call", "function": "whoami"},
        },
    },
    {
        "id": "keyed",
        "start": "charge",
        "activities": {
            "charge": {"type": "call", "function": "keyed", "retry": {"attempts": 3, "delay": "50ms"}},
        },
    },
    {
        "id": "types",
        "start": "copy",
        "activities": {"copy": {"type": "set", "values": {"items": "{input.items}", "order": "{input.order}"}}},
    },
]
# fmt: on


# The line a node logs once its workers take messages: "consuming nodeflow.workflows (...)" in
# cfb5ab9, "running workflows (...)" in the tree these tests were written against.
READY = re.compile(r" (consuming \S*nodeflow\.workflows|running workflows) ")


class NodeWorkflowTests(ClusterTestCase):
    """Instances run by one real ``serve --app`` node, shared by the whole class.

    The node logs to stderr, which goes to a file (read_line reads stdout, where a node prints
    nothing); it is ready once it logs that it consumes the workflow queue. Each test uses
    definitions of its own.
    """

    node: subprocess.Popen[bytes]
    shared: str
    shared_db: str
    log_path: str
    nf: nodeflow.Cluster

    @classmethod
    def setUpClass(cls) -> None:
        cls.shared = tempfile.mkdtemp(prefix="nodeflow-wf-node-")
        cls.shared_db = os.path.join(cls.shared, "cluster.db")
        with open(os.path.join(cls.shared, "wfapp.py"), "w") as out:
            out.write(textwrap.dedent(APP))
        cls.nf = nodeflow.connect(cls.shared_db)
        for definition in NODE_DEFINITIONS:
            cls.nf.define(definition)
        cls.log_path = os.path.join(cls.shared, "n1.log")
        with open(cls.log_path, "w") as log:
            cls.node = subprocess.Popen(
                [PYTHON, NODEFLOW, "--db", cls.shared_db, "serve", "--node-id", "n1", "--app", "wfapp.py"],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=cls.shared,
            )
        deadline = time.monotonic() + 20
        while not READY.search(cls.log()):
            if cls.node.poll() is not None or time.monotonic() > deadline:
                text = cls.log()
                cls.tearDownClass()
                raise AssertionError(f"the node did not start taking workflow messages:\n{text}")
            time.sleep(0.02)

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.node.poll() is None:
            cls.node.send_signal(signal.SIGTERM)
            try:
                cls.node.wait(timeout=15)
            except subprocess.TimeoutExpired:
                cls.node.kill()
                cls.node.wait(timeout=10)
        cls.nf.close()
        shutil.rmtree(cls.shared, ignore_errors=True)

    @classmethod
    def log(cls) -> str:
        with open(cls.log_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    def setUp(self) -> None:
        super().setUp()
        self.db = self.shared_db  # self.dir stays the test's own folder (flag files, definitions)
        self.assertIsNone(self.node.poll(), f"the node is gone:\n{self.log()}")

    # Helpers ----------------------------------------------------------------------------------

    def start(self, definition: str, data: dict[str, Any] | None = None) -> str:
        result = self.cli("start", definition, *(["--input", json.dumps(data)] if data is not None else []))
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip()

    def start_and_wait(self, definition: str, data: dict[str, Any], code: int) -> tuple[str, list[str]]:
        """``start --wait``: the instance id and the lines printed after it."""
        result = self.cli("start", definition, "--input", json.dumps(data), "--wait", "--timeout", "20s")
        self.assertEqual(result.returncode, code, f"{result.stdout}{result.stderr}\nnode log:\n{self.log()}")
        lines = result.stdout.splitlines()
        self.assertRegex(lines[0], r"^[0-9a-f]{16}$")
        return lines[0], lines[1:]

    def wait_status(self, instance: str, *statuses: str, timeout: float = 20) -> nodeflow.Instance:
        deadline = time.monotonic() + timeout
        while True:
            found = self.nf.instance(instance)
            if found.status in statuses:
                return found
            if time.monotonic() > deadline:
                self.fail(
                    f"instance {instance} still {found.status}, not {statuses}:\n{found}\nnode log:\n{self.log()}"
                )
            time.sleep(0.02)

    def show(self, instance: str) -> dict[str, Any]:
        result = self.cli("show", instance, "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout)

    def assert_journal_sound(self, instance: nodeflow.Instance) -> None:
        """Steps 0..n-1 by one node; one fence per burst; a new burst has a higher fence; times in order."""
        journal = instance.journal
        self.assertTrue(journal, instance)
        self.assertEqual([entry.step for entry in journal], list(range(len(journal))))
        fences = [entry.fence for entry in journal]
        bursts = [fence for fence, _ in itertools.groupby(fences)]
        self.assertEqual(bursts, sorted(set(bursts)), f"fences go down or come back: {fences}")
        self.assertTrue(all(fence >= 1 for fence in fences))
        ends_burst = ("waiting ", "error (try ", "faulted", "failed: ")
        for before, after in itertools.pairwise(journal):
            if before.outcome.startswith(ends_burst):
                self.assertGreater(after.fence, before.fence, f"{before} then {after}")
            if after.fence == before.fence:  # one burst runs its steps one after the other
                self.assertGreaterEqual(after.started, before.ended - 0.001, f"{before} then {after}")
        for entry in journal:
            self.assertLessEqual(entry.started, entry.ended, entry)
            self.assertEqual(entry.node, "n1")
            self.assertGreaterEqual(entry.started, instance.created - 0.001)
        if instance.status == "completed":
            self.assertIsNotNone(instance.ended)
            self.assertGreaterEqual(instance.ended, journal[-1].ended - 0.001)

    # Tests -------------------------------------------------------------------------------------

    def test_start_wait_runs_every_step_and_prints_the_variables(self) -> None:
        for order, size in ((42, "large"), (7, "small")):
            with self.subTest(order=order):
                instance, lines = self.start_and_wait("hello", {"order": order}, 0)
                self.assertEqual(lines[0], f"{instance} completed")
                variables = json.loads(lines[1])
                self.assertEqual(
                    variables,
                    {
                        "input": {"order": order},  # the instance's input wins over the definition's
                        "count": 3,
                        "fresh": 0.5,
                        "label": f"order-{order}",
                        "literal": "{input.order}",
                        "flag": True,
                        "nested": {"a": [1, 2], "b": "{not a template}"},
                        "pay": {"receipt": f"r-{order}"},
                        "doubled": order * 2,
                        "size": size,
                    },
                )
                found = self.nf.instance(instance)
                self.assertEqual(
                    (found.status, found.version, found.position, found.error), ("completed", 1, None, None)
                )
                self.assert_journal_sound(found)
                steps = [(entry.activity, entry.outcome) for entry in found.journal]
                self.assertEqual(
                    [activity for activity, _ in steps],
                    ["greet", "tally", "pay", "double", "pause", "pause", "size", size, "rest", "crunch"],
                )
                self.assertEqual(steps[0][1], f"order {order} received")
                # The node reads the stored (canonical, sorted) definition: values in key order, then adds.
                self.assertEqual(steps[1][1], "set flag, label, literal, nested, count, fresh")
                self.assertEqual(steps[2][1], "called wfapp:receipt")
                self.assertTrue(steps[4][1].startswith("waiting until "), steps[4])
                self.assertEqual(steps[5][1], "timer elapsed")
                self.assertEqual(steps[6][1], f"{'true' if order > 10 else 'false'}: {size}")
                self.assertEqual(steps[8][1], "worked 100ms (io)")
                self.assertEqual(steps[9][1], "worked 50ms (cpu)")
                journal = found.journal
                self.assertGreater(journal[5].fence, journal[4].fence)
                self.assertGreaterEqual(journal[5].started - journal[4].ended, 0.09, "the timer waited 100 ms")
                self.assertGreaterEqual(journal[8].ended - journal[8].started, 0.09)
                self.assertGreaterEqual(journal[9].ended - journal[9].started, 0.045)
        self.assertIn("order 42 received", self.log())

    def test_failing_call_is_retried_then_faulted_and_retry_completes_it(self) -> None:
        flag = os.path.join(self.dir, "flag")
        calls = os.path.join(self.dir, "calls")
        instance, lines = self.start_and_wait("flaky", {"flag": flag, "calls": calls}, 1)
        self.assertEqual(lines, [f"{instance} faulted at charge: RuntimeError: card declined"])
        with open(calls) as made:
            self.assertEqual(made.read().count("call"), 2, "retry attempts 2: two calls")
        shown = self.show(instance)
        self.assertEqual((shown["status"], shown["activity"]), ("faulted", "charge"))
        self.assertEqual(shown["error"], "RuntimeError: card declined")  # the activity is in "activity"
        outcomes = [entry["outcome"] for entry in shown["journal"]]
        self.assertEqual(
            outcomes,
            [
                "error (try 1 of 2; next in 100ms): RuntimeError: card declined",
                "faulted after 2 tries: RuntimeError: card declined",
            ],
        )
        self.assertEqual([entry["step"] for entry in shown["journal"]], [0, 1])
        self.assertLess(shown["journal"][0]["fence"], shown["journal"][1]["fence"])
        self.assertEqual({entry["node"] for entry in shown["journal"]}, {"n1"})
        self.assertEqual([entry["activity"] for entry in shown["journal"]], ["charge", "charge"])
        faulted = self.nf.instance(instance)
        self.assertGreaterEqual(faulted.journal[1].started - faulted.journal[0].ended, 0.09, "the retry delay")
        self.assertIn(f"instance {instance} faulted at charge", self.log())
        listed = json.loads(self.cli("instances", "--status", "faulted", "--json").stdout)["instances"]
        self.assertIn(instance, [i["id"] for i in listed])

        open(flag, "w").close()  # mend the cause
        retried = self.cli("retry", instance[-8:])  # the end of an id is its random part
        self.assertEqual(retried.returncode, 0, retried.stderr)
        self.assertEqual(retried.stdout, f"instance {instance} resumed at charge\n")
        done = self.wait_status(instance, "completed", "faulted")
        self.assertEqual(done.status, "completed", done)
        self.assertEqual(done.variables["paid"], {"charged": True})
        self.assertEqual((done.error, done.attempt), (None, 0))
        self.assertEqual([entry.outcome for entry in done.journal][2:], ["called flaky", "paid true"])
        self.assert_journal_sound(done)
        with open(calls) as made:
            self.assertEqual(made.read().count("call"), 3)
        again = self.cli("retry", instance)
        self.assertEqual(again.returncode, 2)
        self.assertIn("is completed", again.stderr)

    def test_call_of_an_unknown_function_faults(self) -> None:
        instance, _ = self.start_and_wait("nowhere", {}, 1)
        found = self.nf.instance(instance)
        self.assertEqual(found.status, "faulted")
        self.assertIn("no function 'nowhere' on node n1", found.error)
        self.assertEqual(len(found.journal), 1)
        self.assertTrue(found.journal[0].outcome.startswith("faulted after 1 tries"), found.journal[0])

    def test_signal_activity_waits_and_signal_input_lands_in_variables(self) -> None:
        yes = self.start("approve", {"order": 5})
        no = self.start("approve", {"order": 6})
        for instance in (yes, no):
            waiting = self.wait_status(instance, "waiting")
            self.assertEqual(waiting.waiting_for, f"approve-{waiting.variables['input']['order']}")
        listed = json.loads(self.cli("instances", "--status", "waiting", "--json").stdout)["instances"]
        by_id = {entry["id"]: entry for entry in listed}
        self.assertEqual(by_id[yes]["waiting_for"], "approve-5")
        self.assertEqual(by_id[no]["waiting_for"], "approve-6")
        self.assertEqual(by_id[yes]["activity"], "ask")

        nobody = json.loads(self.cli("signal", "approve-999", "--ttl", "0", "--json").stdout)
        self.assertEqual(nobody, {"resumed": [], "started": [], "kept": False, "kept_until": None})
        sent = self.cli("signal", "approve-5", "--input", '{"ok": true, "by": "ann"}', "--json")
        self.assertEqual(sent.returncode, 0, sent.stderr)
        self.assertEqual(json.loads(sent.stdout), {"resumed": [yes], "started": [], "kept": False, "kept_until": None})
        done = self.wait_status(yes, "completed", "faulted")
        self.assertEqual(done.status, "completed", done)
        self.assertEqual(done.variables["approval"], {"ok": True, "by": "ann"})
        self.assertEqual(done.variables["outcome"], "approved by ann")
        self.assertEqual(
            [entry.outcome for entry in done.journal],
            ["waiting for signal approve-5", "signal received", "true: done", "set outcome"],
        )
        self.assert_journal_sound(done)
        self.assertEqual(self.nf.instance(no).status, "waiting", "a signal resumes only its own waiters")

        text = self.cli("signal", "approve-6", "--input", '{"ok": false, "by": "bob"}')
        self.assertEqual(text.stdout, "signal 'approve-6': resumed 1 instance(s)\n")
        refused = self.wait_status(no, "faulted")
        self.assertEqual((refused.position, refused.error), ("refuse", "order 6 refused by bob"))
        again = json.loads(self.cli("signal", "approve-5", "--json").stdout)
        self.assertEqual(again["resumed"], [], "a completed instance waits for nothing")

    def test_signal_without_input_and_default_result(self) -> None:
        instance = self.start("hold", {"k": "x1"})
        self.wait_status(instance, "waiting")
        outcome = self.nf.signal("hold-x1")
        self.assertEqual(outcome.resumed, (instance,))
        done = self.wait_status(instance, "completed")
        self.assertEqual(done.variables, {"input": {"k": "x1"}, "wait": {}})  # result defaults to the activity id
        self.assert_journal_sound(done)

    def test_signal_trigger_starts_an_instance(self) -> None:
        sent = self.cli("signal", "kick-wf", "--input", '{"n": 3}', "--json")
        self.assertEqual(sent.returncode, 0, sent.stderr)
        self.assertEqual(
            json.loads(sent.stdout), {"resumed": [], "started": ["kicked"], "kept": False, "kept_until": None}
        )
        deadline = time.monotonic() + 20
        while not (found := self.nf.instances(definition="kicked", status="completed")):
            if time.monotonic() > deadline:
                self.fail(f"no kicked instance completed: {self.nf.instances(definition='kicked')}\n{self.log()}")
            time.sleep(0.02)
        self.assertEqual(len(self.nf.instances(definition="kicked")), 1)
        instance = self.nf.instance(found[0].id)
        self.assertEqual(instance.variables, {"input": {"source": "trigger", "n": 3}, "seen": "n=3"})
        self.assertIn("signal kick-wf", instance.started_by)
        self.assertEqual(instance.version, 1)
        self.assert_journal_sound(instance)

    def test_if_branches(self) -> None:
        cases = [({"vip": True}, "gold"), ({"total": 120}, "gold"), ({"total": 99}, "basic"), ({}, "basic")]
        for data, tier in cases:
            with self.subTest(data):
                instance, lines = self.start_and_wait("branches", data, 0)
                variables = json.loads(lines[1])
                self.assertEqual((variables["tier"], variables["visits"]), (tier, 1))
                found = self.nf.instance(instance)
                path = [entry.activity for entry in found.journal]
                expected = ["check", "gold", "plain", "last"] if tier == "gold" else ["check", "plain", "last", "basic"]
                self.assertEqual(path, expected)
                self.assert_journal_sound(found)

    def test_fail_faults_with_its_message(self) -> None:
        instance, lines = self.start_and_wait("doomed", {"order": 9}, 1)
        self.assertEqual(lines, [f"{instance} faulted at refuse: order 9 refused"])
        shown = self.show(instance)
        self.assertEqual((shown["status"], shown["error"], shown["activity"]), ("faulted", "order 9 refused", "refuse"))
        self.assertEqual([entry["outcome"] for entry in shown["journal"]], ["failed: order 9 refused"])
        retried = self.cli("retry", instance)  # a fail activity fails again
        self.assertEqual(retried.returncode, 0, retried.stderr)
        again = self.wait_status(instance, "faulted")
        deadline = time.monotonic() + 20
        while len(again.journal) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
            again = self.nf.instance(instance)
        self.assertEqual([entry.outcome for entry in again.journal], ["failed: order 9 refused"] * 2)
        self.assertLess(again.journal[0].fence, again.journal[1].fence)

    def test_runtime_faults(self) -> None:
        cases = [
            ("mismatch", {"word": "five"}, "check", "cannot compare str five > number 3"),
            ("mismatch", {}, "check", "no variable input.word"),
            ("at", {"when": "soon"}, "when", "'soon' is not an ISO 8601 time"),
            ("approve", {}, "ask", "no variable input.order"),
        ]
        for definition, data, place, message in cases:
            with self.subTest(definition=definition, data=data):
                instance, lines = self.start_and_wait(definition, data, 1)
                found = self.nf.instance(instance)
                self.assertEqual(found.status, "faulted")
                self.assertEqual(found.position, place)
                self.assertIn(message, found.error)
                self.assertEqual(lines, [f"{instance} faulted at {place}: {found.error}"])
                self.assertTrue(found.journal[-1].outcome.startswith("faulted: "), found.journal[-1])

    def test_start_at(self) -> None:
        past, _ = self.start_and_wait("at", {"when": "2001-02-03T04:05:06+00:00"}, 0)
        found = self.nf.instance(past)
        self.assertEqual([entry.outcome for entry in found.journal], ["due already", "hello"])
        soon = datetime.datetime.now().astimezone() + datetime.timedelta(milliseconds=300)
        began = time.time()
        future = self.nf.start("at", {"when": soon.isoformat()})  # in process: no CLI start-up to eat the 300 ms
        self.assertEqual(self.nf.wait(future, 20).status, "completed")
        found = self.nf.instance(future)
        outcomes = [entry.outcome for entry in found.journal]
        self.assertTrue(outcomes[0].startswith("waiting until "), outcomes)
        self.assertEqual(outcomes[1:], ["timer elapsed", "hello"])
        self.assertGreaterEqual(found.journal[1].started, soon.timestamp() - 0.01)
        self.assertGreater(found.journal[1].started, began)
        self.assert_journal_sound(found)

    def test_a_long_loop_runs_in_bursts(self) -> None:
        instance, lines = self.start_and_wait("loop", {}, 0)
        self.assertEqual(json.loads(lines[1])["count"], 150)
        found = self.nf.instance(instance)
        self.assertEqual(len(found.journal), 302)
        self.assert_journal_sound(found)
        size = nodeflow.BURST_MAX_STEPS
        for start in range(0, 302, size):
            fences = {entry.fence for entry in found.journal[start : start + size]}
            self.assertEqual(len(fences), 1, f"steps {start}.. are one burst")
        self.assertEqual(len({entry.fence for entry in found.journal}), 4)

    def test_an_instance_keeps_its_version_when_a_new_one_is_defined(self) -> None:
        first = {
            "id": "live-ver",
            "start": "wait",
            "activities": {
                "wait": {"type": "signal", "name": "live-ver-{input.k}", "next": "mark"},
                "mark": {"type": "set", "values": {"ran": "v1"}},
            },
        }
        second = {**first, "activities": {**first["activities"], "mark": {"type": "set", "values": {"ran": "v2"}}}}
        path = write_json(os.path.join(self.dir, "live.json"), first)
        self.assertEqual(self.cli("define", path).stdout, "defined live-ver version 1 (2 activities, 0 triggers)\n")
        old = self.start("live-ver", {"k": "a"})
        self.wait_status(old, "waiting")
        write_json(path, second)
        self.assertEqual(self.cli("define", path).stdout, "defined live-ver version 2 (2 activities, 0 triggers)\n")
        new = self.start("live-ver", {"k": "b"})
        self.wait_status(new, "waiting")
        self.nf.signal("live-ver-a")
        self.nf.signal("live-ver-b")
        old_done = self.wait_status(old, "completed")
        new_done = self.wait_status(new, "completed")
        self.assertEqual((old_done.version, old_done.variables["ran"]), (1, "v1"))
        self.assertEqual((new_done.version, new_done.variables["ran"]), (2, "v2"))
        listed = {
            i["id"]: i["version"]
            for i in json.loads(self.cli("instances", "--definition", "live-ver", "--json").stdout)["instances"]
        }
        self.assertEqual(listed, {old: 1, new: 2})

    def test_a_call_knows_its_instance_step_fence_and_idempotency_key(self) -> None:
        instance_id, _ = self.start_and_wait("whoami", {}, 0)
        instance = self.nf.instance(instance_id)
        rows = {entry.activity: entry for entry in instance.journal if entry.outcome.startswith("called ")}
        for name in ("first", "second"):
            seen, row = instance.variables[name], rows[name]
            self.assertEqual(
                seen,
                {"instance": instance_id, "activity": name, "step": row.step, "fence": row.fence, "node": "n1",
                 "key": f"{instance_id}:{row.step}"},
            )  # fmt: skip
        self.assertGreater(instance.variables["second"]["fence"], instance.variables["first"]["fence"])
        with self.assertRaisesRegex(nodeflow.NodeflowError, "only known inside a function that a call activity runs"):
            nodeflow.current_call()

    def test_every_try_of_a_call_has_the_same_idempotency_key(self) -> None:
        keys = os.path.join(self.dir, "keys")
        instance_id, _ = self.start_and_wait("keyed", {"keys": keys}, 0)
        with open(keys) as seen:
            tries = [line.split() for line in seen.read().splitlines()]
        steps = [entry.step for entry in self.nf.instance(instance_id).journal]
        self.assertEqual([step for _, step in tries], [str(step) for step in steps])  # each try its own row
        self.assertEqual({key for key, _ in tries}, {f"{instance_id}:{steps[0]}"}, tries)

    def test_set_keeps_the_type_of_a_lone_placeholder(self) -> None:
        """A set of "{input.items}" stores the list itself, not the text "[1,2]"."""
        _, lines = self.start_and_wait("types", {"items": [1, 2], "order": 7}, 0)
        variables = json.loads(lines[1])
        self.assertEqual(variables["items"], [1, 2])
        self.assertEqual(variables["order"], 7)

    def test_zz_every_completed_instance_has_a_sound_journal(self) -> None:
        """Runs last (by name): the invariants over every instance the class completed."""
        completed = self.nf.instances(status="completed")
        if not completed:
            self.skipTest("no completed instances: run it with the rest of its class")
        for listed in completed:
            with self.subTest(listed.definition, id=listed.id):
                self.assert_journal_sound(self.nf.instance(listed.id))
        self.assertNotIn("Traceback", self.log())


if __name__ == "__main__":
    unittest.main()


class RunMessageDeliveries(ClusterTestCase):
    """A workflow's run message is never a dead letter (an instance would be stranded, running for
    ever with nothing to run it); one that no node has got through in many deliveries faults its
    instance instead, which retry resumes. The delivery counts are set in the database, as a
    history of nodes dying mid-burst would leave them."""

    def test_a_run_message_past_max_deliveries_still_runs_and_one_far_past_faults_its_instance(self) -> None:
        with nodeflow.connect(self.db) as nf:
            nf.define({"id": "plain", "start": "a", "activities": {"a": {"type": "set", "values": {"x": 1}}}})
            survivor, stuck = nf.start("plain"), nf.start("plain")
            limit = nf.store.settings.max_deliveries * nodeflow.BURST_DELIVERY_FACTOR
            nf.store.write(
                lambda conn: conn.executemany(
                    "UPDATE messages SET attempts = ? WHERE body LIKE ?",
                    [(nf.store.settings.max_deliveries + 2, f'%"{survivor}"%'), (limit, f'%"{stuck}"%')],
                )
            )
            log_path = os.path.join(self.dir, "n1.log")
            with open(log_path, "w") as log:
                node = subprocess.Popen(
                    [PYTHON, NODEFLOW, "--db", self.db, "serve", "--node-id", "n1"], stderr=log, cwd=self.dir
                )
            self.children.append(node)
            self.assertEqual(nf.wait(survivor, 20).status, "completed")
            faulted = nf.wait(stuck, 20)
            self.assertEqual(faulted.status, "faulted", faulted)
            self.assertIn(f"no node finished a burst of it in {limit} deliveries", faulted.error or "")
            self.assertEqual(nf.dead_letters(nodeflow.WORKFLOW_QUEUE), [])
            nf.retry(stuck)
            self.assertEqual(nf.wait(stuck, 20).status, "completed")
            node.send_signal(signal.SIGTERM)
            self.assertEqual(node.wait(20), 0)


class BlueprintCacheTests(ClusterTestCase):
    """A node compiles each (workflow, version) once and then runs it from its memory cache, until
    a define fires the "definitions" token: then it loads the new version, and only that."""

    def test_a_node_reads_a_definition_once_until_the_next_define(self) -> None:
        steps = {"a": {"type": "set", "values": {"x": 1}, "next": "b"}, "b": {"type": "set", "add": {"x": 1}}}
        with nodeflow.connect(self.db) as nf:
            nf.define({"id": "cached", "start": "a", "activities": steps})

            async def scenario() -> tuple[int, int, list[int]]:
                node = nodeflow.Node(self.db, node_id="n1", out=io.StringIO(), activities={})
                running = asyncio.create_task(node.run())
                try:
                    first = [nf.start("cached", {"n": n}) for n in range(20)]
                    for instance_id in first:
                        done = await asyncio.to_thread(nf.wait, instance_id, 20)
                        self.assertEqual(done.status, "completed", done)
                    assert node.nf is not None
                    after_v1 = node.nf.workflows.blueprints_loaded
                    nf.define({"id": "cached", "start": "a", "activities": {**steps, "b": {**steps["b"], "next": "c"},
                               "c": {"type": "set", "values": {"v": 2}}}})  # fmt: skip
                    second = [nf.start("cached", {"n": n}) for n in range(20)]
                    versions = []
                    for instance_id in second:
                        done = await asyncio.to_thread(nf.wait, instance_id, 20)
                        self.assertEqual(done.status, "completed", done)
                        versions.append(done.version)
                    return after_v1, node.nf.workflows.blueprints_loaded, versions
                finally:
                    node.request_stop()
                    await asyncio.wait_for(running, 30)

            after_v1, after_v2, versions = asyncio.run(scenario())
        self.assertEqual(after_v1, 1, "20 instances of v1: one read of the definition")
        self.assertEqual(versions, [2] * 20)
        self.assertEqual(after_v2, 2, "the define evicted the cache; 20 instances of v2: one more read")
