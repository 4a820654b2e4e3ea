#!/usr/bin/env python3
"""The chaos run: a real cluster under a steady workload while its nodes are killed, stopped and
restarted at random; then a checker proves from the database that nothing was lost and nothing ran twice.

    python3 tests/chaos.py [--nodes 4] [--replicas 1] [--seconds 120] [--seed S] [--keep DIR] [--json]
                           [--rate 1] [--faults 1] [--settle 60]

Exit status 0 when no invariant is violated, 1 otherwise (the evidence is printed), 2 on bad usage.

1. A fresh folder and database, with the run's own tables in it (``chaos_*``; nodeflow ignores them).
2. N ``serve`` nodes (``--replicas`` of them ``--role replica``) with ``--app tests/chaos_app.py``
   and a short lease, each life logging to its own file in ``logs/``.
3. A workload driver, in threads of this process, through the Python API and the command line:
   workflow instances (log, set, timer, call, if, signal, a fail branch taken on purpose, a call that
   fails once on purpose and is retried), starts by a signal trigger, new definition versions every few
   seconds, queue messages (some failing on purpose, some until they are dead letters), one-shot and
   cron timers, and ``lock`` commands whose holders record their fence and times. Everything it does
   is recorded in ``chaos_sent``; every effect the nodes have is recorded by chaos_app.py.
4. A fault injector, seeded, every 1-3 s: SIGKILL (restart after 0.5-2 s), SIGSTOP (SIGCONT after
   0.5-4 s), SIGTERM (restart after 0.5-2 s) or a restart (SIGTERM, then at once), never leaving fewer
   than one eligible (non-replica) node running; the victim is often the node in office, or a node
   with messages in hand.
5. The end: SIGCONT and restart everything, stop the workload, answer the signals still awaited,
   wait (bounded) until the cluster has settled, stop the nodes gracefully.
6. The checker, which reads only the database and the node logs (see ``check``), prints one row per
   invariant with the count checked and the violations, then each violation's evidence.
7. A summary of the figures (also as JSON with ``--json``: then stdout is the JSON object alone).

``make chaos`` runs the long version (120 s); tests/test_chaos.py runs a 30-second one with a random
seed. A run's choices replay with its seed; its timing (and so its interleavings) do not. The nodes
and commands run a copy of nodeflow.py taken when the run begins.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import nodeflow  # noqa: E402

NODEFLOW = str(ROOT / "nodeflow.py")
APP = str(ROOT / "tests" / "chaos_app.py")
PYTHON = sys.executable

LEASE = "3s"  # a node's lease on a message: a node stopped longer than this loses its messages to another
GRACE = "2s"  # how long a SIGTERMed node lets its work in flight finish
TERM_BOUND = 20.0  # a node still running this long after SIGTERM has hung
READY = "running workflows"  # what a node logs once its workers take messages
TOOK_OFFICE = re.compile(r"^\S+ (\S+)\s+\S+\s+took office as the scheduling node \(epoch (\d+)\)", re.MULTILINE)
TRACEBACK = "Traceback (most recent call last)"
LOCK_NAMES = ("chaos-lock-0", "chaos-lock-1", "chaos-lock-2")
# What the node logs tell of the chaos (figures, not violations): line counts per pattern.
LOG_FIGURES = {
    "lives joined": " joined ",
    "bursts refused (stale fence or seq, lease lost)": " not committed",
    "dead peers reaped": "is gone: its liveness lock is free",
    "graceful stops": " stopping (SIG",
    "leases handed back": "handed back",
    "warnings": " warning: ",
    "failures (but those on purpose)": " failed",
}
EVIDENCE_SHOWN = 12  # violations printed per invariant (all of them are in --json, up to 200)

# The run's own tables, in the cluster's database. chaos_app.py writes chaos_received (a receipt
# per message, in the ack's transaction), chaos_effects (a row per call key) and chaos_flaky; lock
# holders write chaos_locks; the driver writes chaos_sent (what it did).
SCHEMA = (
    "CREATE TABLE chaos_sent (key TEXT PRIMARY KEY, kind TEXT NOT NULL, expect TEXT NOT NULL, detail TEXT, "
    "at REAL NOT NULL)",
    "CREATE TABLE chaos_received (key TEXT PRIMARY KEY, queue TEXT NOT NULL, message INTEGER, node TEXT, "
    "at REAL NOT NULL, count INTEGER NOT NULL, again TEXT NOT NULL)",
    "CREATE TABLE chaos_effects (key TEXT PRIMARY KEY, instance TEXT NOT NULL, activity TEXT NOT NULL, "
    "step INTEGER NOT NULL, fence INTEGER, node TEXT, first_at REAL NOT NULL, runs INTEGER NOT NULL, "
    "again TEXT NOT NULL)",
    "CREATE TABLE chaos_flaky (key TEXT PRIMARY KEY, at REAL NOT NULL)",
    "CREATE TABLE chaos_locks (id INTEGER PRIMARY KEY, name TEXT NOT NULL, fence INTEGER NOT NULL, "
    "holder TEXT NOT NULL, started REAL NOT NULL, ended REAL NOT NULL)",
)

# A `lock` command's child: holds the lock for argv[1] seconds, then records its fence and times
# (while still holding it). argv[1]: seconds.
LOCK_HOLDER = """
import os, sqlite3, sys, time
started = time.time()
time.sleep(float(sys.argv[1]))
ended = time.time()
conn = sqlite3.connect(os.environ["NODEFLOW_DB"], timeout=60, isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO chaos_locks (name, fence, holder, started, ended) VALUES (?, ?, ?, ?, ?)",
             (os.environ["NODEFLOW_LOCK"], int(os.environ["NODEFLOW_FENCE"]), f"cli pid {os.getpid()}", started, ended))
conn.execute("COMMIT")
conn.close()
"""


# ══════════════════════════════════════════════════════════════════════════════════════════
# The workflows
# ══════════════════════════════════════════════════════════════════════════════════════════

TIMERS_A = ("400ms", "1s", "1500ms", "200ms", "700ms")  # chaos-a's timer, by revision


def definition_a(rev: int) -> dict[str, Any]:
    """log, set, timer, call (flaky: fails its first try), if -> fail (doom) | signal, call, log.

    Also started by the signal trigger chaos-new-a (never doomed, then).
    """
    return {
        "id": "chaos-a",
        "name": f"Chaos A (rev {rev})",
        "start": "hello",
        "triggers": [{"type": "signal", "name": "chaos-new-a", "input": {"via": "trigger", "doom": False}}],
        "activities": {
            "hello": {"type": "log", "message": f"hello {{input.n}} (rev {rev})", "next": "prep"},
            "prep": {"type": "set", "values": {"who": "n{input.n}"}, "add": {"count": 1}, "next": "pause"},
            "pause": {"type": "timer", "duration": TIMERS_A[rev % len(TIMERS_A)], "next": "charge"},
            "charge": {"type": "call", "function": "effect", "retry": {"attempts": 3, "delay": "500ms"},
                       "next": "check"},
            "check": {"type": "if", "condition": {"var": "input.doom", "op": "==", "value": True},
                      "then": "doomed", "else": "go"},
            "doomed": {"type": "fail", "message": "doomed {input.n} on purpose"},
            "go": {"type": "signal", "name": "go-{input.n}", "next": "settle"},
            "settle": {"type": "call", "function": "effect", "next": "bye"},
            "bye": {"type": "log", "message": f"bye {{input.n}} after {{go.by}} (rev {rev})"},
        },
    }


def definition_b(rev: int) -> dict[str, Any]:
    """Also started by the signal trigger chaos-new: log, call, timer, signal, log."""
    return {
        "id": "chaos-b",
        "name": f"Chaos B (rev {rev})",
        "start": "hello",
        "triggers": [{"type": "signal", "name": "chaos-new", "input": {"via": "trigger"}}],
        "activities": {
            "hello": {"type": "log", "message": f"b {{input.n}} (rev {rev})", "next": "charge"},
            "charge": {"type": "call", "function": "effect", "next": "nap"},
            "nap": {"type": "timer", "duration": "300ms", "next": "wait"},
            "wait": {"type": "signal", "name": "go-b-{input.n}", "next": "bye"},
            "bye": {"type": "log", "message": f"b bye {{input.n}} (rev {rev})"},
        },
    }


DEFINITIONS: dict[str, Callable[[int], dict[str, Any]]] = {"chaos-a": definition_a, "chaos-b": definition_b}


def doom_message(n: Any) -> str:
    return f"doomed {n} on purpose"


# ══════════════════════════════════════════════════════════════════════════════════════════
# The checker: reads the database (and the node logs), proves each invariant or shows the evidence
# ══════════════════════════════════════════════════════════════════════════════════════════

INVARIANTS = (
    ("instances", "every instance completed, or faulted on purpose"),
    ("triggers", "every signal trigger started one instance"),
    ("versions", "every start used the latest version defined before it"),
    ("steps", "no step committed twice (journal 0..n-1 on the definition's path)"),
    ("overlap", "no two steps of an instance overlap in time"),
    ("fences", "fences rise between bursts, steady within one"),
    ("wf-timers", "every workflow timer elapsed once, not early"),
    ("effects", "every committed call has its effect, once"),
    ("messages", "every queue message acked once or dead-lettered"),
    ("timers", "every one-shot timer fired once, not early"),
    ("cron", "every cron slot fired at most once"),
    ("epochs", "one scheduler per epoch, epochs rising, firings in office"),
    ("nodes", "every node on the latest definitions and instruction"),
    ("locks", "lock fences rise, holders never overlap"),
    ("crashes", "no node crashed, hung or logged a traceback"),
)


@dataclasses.dataclass
class Invariant:
    key: str
    title: str
    checked: int = 0
    violations: list[str] = dataclasses.field(default_factory=list)

    def fail(self, text: str) -> None:
        self.violations.append(text)


def _open_read_only(db: str) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.Error:
        return sqlite3.connect(db, isolation_level=None)  # no -shm to read through: a plain reader


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _iso_seconds(text: str) -> float | None:
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _rows_text(rows: Iterable[tuple[Any, ...]]) -> str:
    return "\n".join(f"        {row!r}" for row in rows)


def _loads(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def check(
    db: str, logs: Iterable[str] = (), observations: Iterable[str] = ()
) -> tuple[list[Invariant], dict[str, Any]]:
    """Check every invariant against the database at ``db`` (and the node logs at the paths ``logs``).

    ``observations`` are what the runner saw of its processes (a node that exited by itself, one
    that did not stop on SIGTERM): each is a violation of "crashes". Returns the invariants, each
    with its count checked and its violations, and the figures of the run.
    """
    found = {key: Invariant(key, title) for key, title in INVARIANTS}
    conn = _open_read_only(db)
    try:
        conn.execute("BEGIN")  # one snapshot for everything
        figures = _check_all(conn, found, list(logs))
        conn.execute("COMMIT")
    finally:
        conn.close()
    for text in observations:
        found["crashes"].fail(text)
    return list(found.values()), figures


def _check_all(conn: sqlite3.Connection, found: dict[str, Invariant], logs: list[str]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    sent: dict[str, list[tuple[str, str, Any]]] = defaultdict(list)  # kind -> (key, expect, detail)
    at_of: dict[str, float] = {}
    for key, kind, expect, detail, at in conn.execute("SELECT key, kind, expect, detail, at FROM chaos_sent"):
        sent[kind].append((key, expect, _loads(detail)))
        at_of[key] = at
    received = {
        row[0]: row
        for row in conn.execute("SELECT key, queue, message, node, at, count, again FROM chaos_received")
    }
    dead: dict[str, list[tuple[Any, ...]]] = defaultdict(list)  # queue -> dead letters
    for row in conn.execute("SELECT id, queue, body, attempts, died, last_error FROM dead_letters"):
        dead[row[1]].append(row)
    left = conn.execute(
        "SELECT queue, count(*) FROM messages GROUP BY queue HAVING queue LIKE 'chaos.%' OR queue = ?",
        (nodeflow.WORKFLOW_QUEUE,),
    ).fetchall()

    _check_workflows(conn, found, figures, sent, at_of, dead)
    _check_messages(found, figures, sent, received, dead, left)
    _check_timers(conn, found, figures, sent, received, dead)
    _check_epochs(conn, found, figures, logs)
    _check_nodes(conn, found, figures)
    _check_locks(conn, found, figures)
    said: Counter[str] = Counter()
    for path in logs:
        try:
            text = Path(path).read_text(errors="replace")
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            for what, pattern in LOG_FIGURES.items():
                said[what] += pattern in line and "on purpose" not in line
        found["crashes"].checked += 1
        if TRACEBACK in text:
            at = text.index(TRACEBACK)
            found["crashes"].fail(f"{os.path.basename(path)} logged a traceback:\n{text[max(0, at - 300):at + 1500]}")
    figures["node logs"] = dict(said)
    return figures


# Workflows ------------------------------------------------------------------------------------


def _check_workflows(
    conn: sqlite3.Connection,
    found: dict[str, Invariant],
    figures: dict[str, Any],
    sent: dict[str, list[tuple[str, str, Any]]],
    at_of: dict[str, float],
    dead: dict[str, list[tuple[Any, ...]]],
) -> None:
    definitions = {
        (workflow, version): json.loads(body)
        for workflow, version, body in conn.execute("SELECT id, version, body FROM definitions")
    }
    instances = {
        row[0]: row
        for row in conn.execute(
            "SELECT id, definition, version, status, error, variables, steps, fence, started_by FROM instances"
        )
    }
    journals: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for instance, *row in conn.execute(
        "SELECT instance, step, activity, type, node, fence, started, ended, outcome FROM journal "
        "ORDER BY instance, step"
    ):
        journals[instance].append(tuple(row))
    effects = {
        row[0]: row
        for row in conn.execute("SELECT key, instance, activity, step, fence, node, runs, again FROM chaos_effects")
    }

    statuses: Counter[str] = Counter()
    by_version: Counter[str] = Counter()
    committed_calls: set[str] = set()
    for instance, (_, workflow, version, status, error, variables, steps, fence, _by) in instances.items():
        rows = journals.get(instance, [])
        data = _loads(variables) or {}
        given = data.get("input") if isinstance(data.get("input"), dict) else {}
        where = f"instance {instance} ({workflow} v{version}, input {json.dumps(given)}, {status}"
        where += f", error {error!r})" if error else ")"
        evidence = f"{where}; journal:\n{_rows_text(rows)}"
        by_version[f"{workflow} v{version}"] += 1

        # Completed, or faulted on purpose (the fail branch) -- nothing else.
        found["instances"].checked += 1
        doomed = given.get("doom") is True
        if doomed and status == "faulted" and error == doom_message(given.get("n")) and rows and rows[-1][2] == "fail":
            statuses["faulted on purpose"] += 1
        elif not doomed and status == "completed":
            statuses["completed"] += 1
        else:
            statuses[f"{status} (not meant)"] += 1
            meant = "faulted at its fail step" if doomed else "completed"
            found["instances"].fail(f"meant to end {meant}: {evidence}")

        body = definitions.get((workflow, version))
        if body is None:
            found["steps"].fail(f"no definition {workflow} v{version}: {evidence}")
            continue
        _check_journal(found, instance, status, steps, fence, body, rows, evidence)
        for index, (step, activity, kind, _node, _fence, _started, _ended, outcome) in enumerate(rows):
            if kind == "call" and outcome.startswith("called "):
                # The key is the step of the call's first try: the tries that failed before it
                # (journaled "error (try N ...") share it.
                first = index
                while first > 0 and rows[first - 1][1] == activity and rows[first - 1][7].startswith("error (try "):
                    first -= 1
                key = f"{instance}:{rows[first][0]}"
                committed_calls.add(key)
                found["effects"].checked += 1
                effect = effects.get(key)
                if effect is None:
                    found["effects"].fail(
                        f"step {step} ({activity}) committed, its call's effect never recorded: {evidence}"
                    )
                elif (effect[1], effect[2], effect[3]) != (instance, activity, step):
                    found["effects"].fail(
                        f"step {step} ({activity})'s effect was recorded for {effect[1:4]}: {evidence}"
                    )

    for key, (_, instance, activity, _step, fence, node, runs, again) in effects.items():
        if key not in committed_calls:
            found["effects"].fail(
                f"effect {key} ({activity}, first by {node} fence {fence}, {runs} run(s), again {again}) belongs to "
                f"no committed call step; instance {instance} journal:\n{_rows_text(journals.get(instance, []))}"
            )
    reruns = [row for row in effects.values() if row[6] > 1]

    # Starts: every instance the driver started is there; every signal trigger started one.
    for key, _expect, detail in sent["instance"]:
        instance = key.split(":", 1)[1]
        if instance not in instances:
            found["instances"].checked += 1
            found["instances"].fail(f"instance {instance} was started ({detail}) and is not in the database: lost")
    triggered: dict[Any, list[str]] = defaultdict(list)
    for instance, row in instances.items():
        given = (_loads(row[5]) or {}).get("input") or {}
        if isinstance(given, dict) and given.get("via") == "trigger":
            triggered[given.get("n")].append(f"{instance} ({row[1]} v{row[2]}, started by {row[8]})")
    expected = {detail["n"]: detail for _, _, detail in sent["trigger"]}
    for n, detail in sorted(expected.items(), key=lambda item: str(item[0])):
        found["triggers"].checked += 1
        started = triggered.get(n, [])
        if len(started) != 1 or f" ({detail.get('definition')} v" not in started[0]:
            found["triggers"].fail(f"the trigger signal for {detail} started {len(started)} instances: {started}")
    for n, started in triggered.items():
        if n not in expected:
            found["triggers"].fail(f"instances started by a trigger nobody sent (n={n}): {started}")
    # A start that follows a define (one that returned before the start began) gets that version or a later one.
    defined: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for key, _expect, _detail in sent["define"]:
        _, workflow, version = key.split(":")
        defined[workflow].append((float(at_of[key]), int(version)))
    by_trigger = {n: started[0].split()[0] for n, started in triggered.items() if len(started) == 1}
    for kind, rows in (("instance", sent["instance"]), ("trigger", sent["trigger"])):
        for key, _expect, detail in rows:
            instance = key.split(":", 1)[1] if kind == "instance" else by_trigger.get(detail.get("n"))
            row = instances.get(instance or "")
            if row is None or "began" not in detail:
                continue
            found["versions"].checked += 1
            workflow, version = row[1], row[2]
            before = [number for at, number in defined.get(workflow, []) if at < detail["began"]]
            if before and version < max(before):
                found["versions"].fail(
                    f"instance {instance} ({kind} {detail}) is of {workflow} v{version}; v{max(before)} was "
                    f"defined before the start began (started by {row[8]})"
                )
    for row in dead.get(nodeflow.WORKFLOW_QUEUE, []):
        found["instances"].fail(f"a workflow message became a dead letter (its instance is stuck): {row}")

    journal_rows = sum(len(rows) for rows in journals.values())
    figures["instances"] = {
        "total": len(instances),
        **dict(statuses),
        "started": {kind: len(sent[kind]) for kind in ("instance", "trigger")},
        "by version": dict(sorted(by_version.items())),
    }
    figures["steps"] = {
        "journal rows": journal_rows,
        "bursts": len({(instance, row[4]) for instance, rows in journals.items() for row in rows}),
        "by node": dict(sorted(Counter(row[3] for rows in journals.values() for row in rows).items())),
    }
    figures["calls"] = {
        "committed": len(committed_calls),
        "effects": len(effects),
        "re-run (at least once, after a lost burst)": len(reruns),
        "extra runs": sum(row[6] - 1 for row in reruns),
    }
    figures["definitions"] = {
        workflow: max(version for (other, version) in definitions if other == workflow)
        for workflow in sorted({workflow for workflow, _ in definitions})
    }


def _check_journal(
    found: dict[str, Invariant],
    instance: str,
    status: str,
    steps: int,
    fence: int,
    body: dict[str, Any],
    rows: list[tuple[Any, ...]],
    evidence: str,
) -> None:
    activities: dict[str, Any] = body["activities"]

    # Steps 0..n-1, as many as the instance counts, along the definition's path: each activity once,
    # but a wait (a "waiting" row, then one that resumed) and a call's failed tries.
    found["steps"].checked += len(rows)
    if [row[0] for row in rows] != list(range(len(rows))):
        found["steps"].fail(f"steps are not 0..{len(rows) - 1}: {evidence}")
    if steps != len(rows):
        found["steps"].fail(f"the instance counts {steps} steps, its journal has {len(rows)}: {evidence}")
    position: str | None = body["start"]
    index = 0
    while index < len(rows):
        step, activity, kind, _node, _fence, _started, _ended, outcome = rows[index]
        spec = activities.get(activity)
        if activity != position or spec is None or spec["type"] != kind:
            found["steps"].fail(f"step {step} is {activity} ({kind}) where the path goes to {position}: {evidence}")
            break
        if kind in ("timer", "signal") and outcome.startswith("waiting"):
            resumed = rows[index + 1] if index + 1 < len(rows) else None
            if resumed is None or resumed[1] != activity or resumed[7] not in ("timer elapsed", "signal received"):
                found["steps"].fail(f"step {step} waits at {activity}; the next step is not its end: {evidence}")
                break
            index += 2
            position = spec.get("next")
            continue
        if kind == "call" and outcome.startswith("error (try"):
            index += 1  # tried again: the same activity comes next
            continue
        if kind == "if":
            branch = outcome.split(": ", 1)[-1]
            position = None if branch == "end" else branch
        elif kind == "fail":
            position = "(faulted)"
        else:
            position = spec.get("next")
        index += 1
    else:
        if status == "completed" and position is not None:
            found["steps"].fail(f"completed, but the journal ends before the path does (at {position}): {evidence}")
        if status == "faulted" and position != "(faulted)":
            found["steps"].fail(f"faulted, but not at a fail step: {evidence}")

    # Steps one after the other, never at once.
    for index, row in enumerate(rows):
        found["overlap"].checked += 1
        if row[5] > row[6]:
            found["overlap"].fail(f"step {row[0]} ends before it starts: {evidence}")
        if index and rows[index - 1][6] > row[5]:
            gap = rows[index - 1][6] - row[5]
            found["overlap"].fail(
                f"step {row[0]} starts {gap * 1000:.1f} ms before step {row[0] - 1} ended: {evidence}"
            )

    # Bursts: a run of rows with one fence; the fences of successive bursts strictly rise.
    bursts: list[int] = []
    for row in rows:
        if not bursts or bursts[-1] != row[4]:
            bursts.append(row[4])
    found["fences"].checked += len(bursts)
    if any(later <= earlier for earlier, later in itertools.pairwise(bursts)):
        found["fences"].fail(f"burst fences {bursts} do not strictly rise: {evidence}")
    if bursts and fence != bursts[-1]:
        found["fences"].fail(f"the instance's fence is {fence}, its last burst's {bursts[-1]}: {evidence}")

    # Timers: one wait and one end per timer activity reached; the end no earlier than the due time.
    for activity, spec in activities.items():
        if spec["type"] != "timer":
            continue
        waits = [row for row in rows if row[1] == activity and row[7].startswith("waiting until ")]
        ends = [row for row in rows if row[1] == activity and row[7] == "timer elapsed"]
        if not waits and not ends:
            continue
        found["wf-timers"].checked += 1
        if len(waits) != 1 or len(ends) != (1 if status in ("completed", "faulted") else len(ends)) or len(ends) > 1:
            found["wf-timers"].fail(f"timer {activity}: {len(waits)} waits, {len(ends)} ends: {evidence}")
            continue
        due = _iso_seconds(waits[0][7][len("waiting until ") :])
        seconds = nodeflow.parse_duration(spec["duration"])
        if due is None:
            found["wf-timers"].fail(f"timer {activity}: no due time in {waits[0][7]!r}: {evidence}")
        elif not waits[0][5] + seconds - 0.002 <= due <= waits[0][6] + seconds + 0.002:
            found["wf-timers"].fail(f"timer {activity}: due {due:.3f} is not {seconds} s after its wait: {evidence}")
        elif ends and ends[0][5] < due:
            found["wf-timers"].fail(
                f"timer {activity} elapsed {(due - ends[0][5]) * 1000:.1f} ms early (due {due:.3f}): {evidence}"
            )


# Queue messages -------------------------------------------------------------------------------


def _dead_key(row: tuple[Any, ...]) -> str | None:
    body = _loads(row[2])
    if not isinstance(body, dict):
        return None
    if row[1] == "chaos.jobs":
        return f"job:{body.get('id')}"
    if row[1] == "chaos.timers":
        return f"timer:{body.get('timer')}"
    return f"cron:{body.get('cron')}:{row[0]}"


def _check_messages(
    found: dict[str, Invariant],
    figures: dict[str, Any],
    sent: dict[str, list[tuple[str, str, Any]]],
    received: dict[str, tuple[Any, ...]],
    dead: dict[str, list[tuple[Any, ...]]],
    left: list[tuple[str, int]],
) -> None:
    check = found["messages"]
    dead_jobs = {_dead_key(row): row for row in dead.get("chaos.jobs", [])}
    counts: Counter[str] = Counter()
    keys = set()
    for key, expect, detail in sent["job"]:
        keys.add(key)
        check.checked += 1
        got, died = received.get(key), dead_jobs.get(key)
        if got is not None and got[5] != 1:
            check.fail(f"{key} ({detail}) received {got[5]} times: first {got[:5]}, again {got[6]}")
        if got is not None and died is not None:
            check.fail(f"{key} ({detail}) both received {got[:5]} and dead-lettered {died}")
        elif got is not None and expect == "dead":
            check.fail(f"{key} ({detail}) fails on every delivery, yet was received: {got[:5]}")
        elif got is None and died is None:
            check.fail(f"{key} ({detail}) neither received nor dead-lettered: lost")
        counts["received" if got is not None else "dead-lettered" if died is not None else "lost"] += 1
    for key, row in received.items():
        if key.startswith("job:") and key not in keys:
            check.fail(f"{key} received but never sent: {row}")
    for key, row in dead_jobs.items():
        if key not in keys:
            check.fail(f"{key} dead-lettered but never sent: {row}")
    for queue, count in left:
        check.fail(f"{count} message(s) still in queue {queue} after the cluster settled")
    figures["messages"] = {
        "sent": len(sent["job"]),
        "received once": counts["received"],
        "dead-lettered": counts["dead-lettered"],
        "of which on purpose": sum(1 for key, expect, _ in sent["job"] if expect == "dead" and key in dead_jobs),
        "failing on purpose first": sum(1 for _, _, detail in sent["job"] if 0 < (detail or {}).get("fail", 0) < 5),
    }


# Timers ---------------------------------------------------------------------------------------


def _check_timers(
    conn: sqlite3.Connection,
    found: dict[str, Invariant],
    figures: dict[str, Any],
    sent: dict[str, list[tuple[str, str, Any]]],
    received: dict[str, tuple[Any, ...]],
    dead: dict[str, list[tuple[Any, ...]]],
) -> None:
    timers = {row[0]: row for row in conn.execute("SELECT name, cron, due, fired, last_fired, created FROM timers")}
    firings: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in conn.execute("SELECT name, due, fired, epoch, node, message FROM timer_firings ORDER BY name, due"):
        firings[row[0]].append(row)
    dead_timers = {_dead_key(row): row for queue in ("chaos.timers", "chaos.cron") for row in dead.get(queue, [])}

    # One-shot timers: fired once (one firing, one message, one receipt), not before they were due.
    check = found["timers"]
    names = set()
    for key, _expect, detail in sent["timer"]:
        name = key.split(":", 1)[1]
        names.add(name)
        check.checked += 1
        row, fired, got = timers.get(name), firings.get(name, []), received.get(key)
        where = f"timer {name} ({detail}): timers row {row}, firings {fired}, receipt {got}"
        if row is None or row[2] is not None or row[3] != 1:
            check.fail(f"not fired exactly once by the timers table: {where}")
        if len(fired) != 1:
            check.fail(f"{len(fired)} firings: {where}")
        elif fired[0][2] < fired[0][1]:
            check.fail(f"fired {(fired[0][1] - fired[0][2]) * 1000:.1f} ms before it was due: {where}")
        if got is None:
            check.fail(f"never received{' (a dead letter: ' + repr(dead_timers.get(key)) + ')' if key in dead_timers else ''}: {where}")  # noqa: E501
        elif got[5] != 1:
            check.fail(f"received {got[5]} times: {where}")
        elif fired and got[2] != fired[0][5]:
            check.fail(f"the receipt is of message {got[2]}, the firing sent message {fired[0][5]}: {where}")
    for key, row in received.items():
        if key.startswith("timer:") and key.split(":", 1)[1] not in names:
            check.fail(f"{key} received but never added: {row}")

    # Cron: each firing its own minute slot, not before it; each firing's message received once.
    check = found["cron"]
    slots = 0
    for name, _expect, detail in sent["cron"]:
        fired = firings.get(name, [])
        check.checked += max(1, len(fired))
        slots += len(fired)
        minutes = [math.floor(row[1] / 60) for row in fired]
        if len(set(minutes)) != len(minutes):
            check.fail(f"cron timer {name} ({detail}) fired twice in one minute slot: {fired}")
        for row in fired:
            if row[2] < row[1]:
                check.fail(f"cron timer {name} fired {(row[1] - row[2]) * 1000:.1f} ms before its slot: {row}")
            got = received.get(f"cron:{name}:{row[5]}")
            if got is None:
                died = dead_timers.get(f"cron:{name}:{row[5]}")
                check.fail(f"cron timer {name}'s firing {row} never received{f' (dead letter {died})' if died else ''}")
            elif got[5] != 1:
                check.fail(f"cron timer {name}'s firing {row} received {got[5]} times: {got}")
        messages = {row[5] for row in fired}
        for key, got in received.items():
            if key.startswith(f"cron:{name}:") and got[2] not in messages:
                check.fail(f"cron timer {name}: receipt {got} of a message no firing sent")
    figures["timers"] = {
        "one-shot added": len(sent["timer"]),
        "one-shot fired": sum(1 for key, _, _ in sent["timer"] if len(firings.get(key.split(":", 1)[1], [])) == 1),
        "cron timers": len(sent["cron"]),
        "cron slots fired": slots,
    }


# Election -------------------------------------------------------------------------------------


def _check_epochs(
    conn: sqlite3.Connection, found: dict[str, Invariant], figures: dict[str, Any], logs: list[str]
) -> None:
    check = found["epochs"]
    terms = conn.execute("SELECT epoch, node, pid, since FROM elections ORDER BY epoch").fetchall()
    current = conn.execute("SELECT epoch, node FROM election WHERE id = 1").fetchone()
    replicas = {row[0] for row in conn.execute("SELECT id FROM nodes WHERE role = 'replica'")}
    by_epoch = {row[0]: row for row in terms}
    check.checked += len(terms)
    if [row[0] for row in terms] != list(range(1, len(terms) + 1)):
        check.fail(f"the terms' epochs are not 1..{len(terms)}: {[row[0] for row in terms]}")
    for earlier, later in itertools.pairwise(terms):
        if later[3] <= earlier[3]:
            check.fail(f"epoch {later[0]} began ({later[3]:.6f}) no later than epoch {earlier[0]} ({earlier[3]:.6f})")
    if terms and current is not None and current[0] != terms[-1][0]:
        check.fail(f"the election row says epoch {current}, the last term is {terms[-1]}")
    for row in terms:
        if row[1] in replicas:
            check.fail(f"replica {row[1]} took office: {row}")

    claims: dict[int, list[str]] = defaultdict(list)
    for path in logs:
        try:
            text = Path(path).read_text(errors="replace")
        except FileNotFoundError:
            continue
        for match in TOOK_OFFICE.finditer(text):
            claims[int(match.group(2))].append(f"{match.group(1)} in {os.path.basename(path)}")
    for epoch, who in sorted(claims.items()):
        check.checked += 1
        term = by_epoch.get(epoch)
        if len(who) > 1:
            check.fail(f"epoch {epoch} claimed by {len(who)} node lives: {who}")
        if term is None:
            check.fail(f"{who} logged taking office in epoch {epoch}, which no term in the database has")
        elif any(not claim.startswith(f"{term[1]} in ") for claim in who):
            check.fail(f"epoch {epoch} is {term[1]}'s term, yet {who} logged taking office in it")

    firings = conn.execute("SELECT name, due, fired, epoch, node, message FROM timer_firings ORDER BY fired").fetchall()
    for row in firings:
        check.checked += 1
        term, following = by_epoch.get(row[3]), by_epoch.get(row[3] + 1)
        if term is None:
            check.fail(f"firing {row} in epoch {row[3]}, which no term has")
            continue
        if row[4] != term[1]:
            check.fail(f"firing {row} by {row[4]} in epoch {row[3]}, {term[1]}'s term {term}")
        if row[2] < term[3] or (following is not None and row[2] >= following[3]):
            check.fail(f"firing {row} outside its epoch's term: {term} .. {following}")
    figures["scheduler"] = {
        "terms": len(terms),
        "by node": dict(sorted(Counter(row[1] for row in terms).items())),
        "firings": len(firings),
    }


# Nodes ----------------------------------------------------------------------------------------


def _check_nodes(conn: sqlite3.Connection, found: dict[str, Invariant], figures: dict[str, Any]) -> None:
    check = found["nodes"]
    latest = dict(conn.execute("SELECT id, MAX(version) FROM definitions GROUP BY id").fetchall())
    last_instruction = conn.execute("SELECT MAX(id) FROM instructions").fetchone()[0] or 0
    columns = _columns(conn, "nodes")
    cursor = "cursor" if "cursor" in columns else "NULL"
    blueprints = "blueprints" if "blueprints" in columns else "NULL"
    cursors = dict(conn.execute("SELECT node, position FROM instruction_cursors").fetchall())
    rows = conn.execute(f"SELECT id, pid, role, state, {cursor}, {blueprints} FROM nodes ORDER BY id").fetchall()
    shown = {}
    for node, pid, role, state, position, cached in rows:
        if state == "dead":
            continue  # a dead node applies nothing: the crash checks speak for it
        check.checked += 1
        position = position if position is not None else cursors.get(node)
        shown[node] = {"cursor": position, "blueprints": _loads(cached)}
        if position is None or position < last_instruction:
            check.fail(f"node {node} (pid {pid}, {role}, {state}) applied instructions through {position}, "
                       f"the log goes to {last_instruction}")
        for workflow, version in (_loads(cached) or {}).items():
            check.checked += 1
            if version != latest.get(workflow):
                check.fail(f"node {node} (pid {pid}, {state}) would start {workflow} v{version}, the latest is "
                           f"v{latest.get(workflow)}")
    figures["nodes"] = {"last instruction": last_instruction, "final": shown}


# Locks ----------------------------------------------------------------------------------------


def _check_locks(conn: sqlite3.Connection, found: dict[str, Invariant], figures: dict[str, Any]) -> None:
    check = found["locks"]
    holds: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in conn.execute("SELECT name, fence, holder, started, ended FROM chaos_locks ORDER BY name, started"):
        holds[row[0]].append(row)
    for name, rows in holds.items():
        check.checked += len(rows)
        for earlier, later in itertools.pairwise(rows):
            if later[1] <= earlier[1]:
                check.fail(f"lock {name}: fence {later[1]} held after fence {earlier[1]}: {earlier} then {later}")
            if later[3] < earlier[4]:
                check.fail(f"lock {name}: two holders at once for {(earlier[4] - later[3]) * 1000:.1f} ms: "
                           f"{earlier} and {later}")
    figures["locks"] = {
        "holds": sum(len(rows) for rows in holds.values()),
        "by holder": dict(Counter(row[2].split()[0] for rows in holds.values() for row in rows)),
    }


# The report -----------------------------------------------------------------------------------


def table(invariants: list[Invariant]) -> str:
    width = max(len(item.title) for item in invariants)
    lines = [f"{'invariant':<{width}}  {'checked':>8}  {'violations':>10}", f"{'-' * width}  {'-' * 8}  {'-' * 10}"]
    for item in invariants:
        lines.append(f"{item.title:<{width}}  {item.checked:>8}  {len(item.violations):>10}")
    for item in invariants:
        for text in item.violations[:EVIDENCE_SHOWN]:
            lines.append(f"\nVIOLATION [{item.key}] {text}")
        if len(item.violations) > EVIDENCE_SHOWN:
            lines.append(f"\n... and {len(item.violations) - EVIDENCE_SHOWN} more violations of [{item.key}]")
    return "\n".join(lines)


# ══════════════════════════════════════════════════════════════════════════════════════════
# The run: nodes, workload, faults, settling
# ══════════════════════════════════════════════════════════════════════════════════════════

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a node between fork and exec: SIGKILL it if the runner dies (no orphaned nodes)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Member:
    """One node id of the cluster, across its lives (each life a `serve` process with its own log)."""

    def __init__(self, run: Run, node_id: str, replica: bool) -> None:
        self.run, self.node_id, self.replica = run, node_id, replica
        self.process: subprocess.Popen[bytes] | None = None
        self.state = "down"  # up, stopped (SIGSTOP), terminating (SIGTERM sent), down
        self.lives = 0
        self.logs: list[str] = []
        self.wake_at: float | None = None  # when to SIGCONT (stopped) or restart (down)
        self.term_at = 0.0
        self.then_restart = 0.0  # after a SIGTERM: seconds to stay down once it exited
        self._ready = False

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def start(self) -> None:
        """Start a life; only ever from the main thread (a child's death signal follows its thread)."""
        self.lives += 1
        path = os.path.join(self.run.log_dir, f"{self.node_id}-{self.lives}.log")
        command = [PYTHON, self.run.nodeflow, "--db", self.run.db, "serve", "--node-id", self.node_id, "--app", APP,
                   "--lease", LEASE, "--grace", GRACE]
        if self.replica:
            command += ["--role", "replica"]
        env = dict(os.environ, CHAOS_DB=self.run.db, PYTHONPATH=str(ROOT))
        with open(path, "w") as log:
            self.process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=log, cwd=self.run.folder, env=env,
                preexec_fn=_die_with_parent,
            )
        self.logs.append(path)
        self.state, self.wake_at, self._ready = "up", None, False

    @property
    def ready(self) -> bool:
        """Whether this life runs workflows: it has installed its signal handlers (a SIGTERM before
        that ends a process the way it ends any program, which would prove nothing)."""
        if self.state == "up" and not self._ready:
            self._ready = READY in self.log_text()
        return self.state == "up" and self._ready

    def log_text(self) -> str:
        try:
            return Path(self.logs[-1]).read_text(errors="replace") if self.logs else ""
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(f"        | {line}" for line in self.log_text().splitlines()[-lines:])


class Run:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.seed: int = options.seed
        self.rng = random.Random(self.seed)
        if options.keep:
            self.folder = os.path.abspath(options.keep)
            os.makedirs(self.folder, exist_ok=True)
            if os.listdir(self.folder):
                raise SystemExit(f"chaos: --keep {options.keep}: the folder is not empty")
        else:
            self.folder = tempfile.mkdtemp(prefix="nodeflow-chaos-")
        self.db = os.path.join(self.folder, "chaos.db")
        # The nodes and commands run a copy of nodeflow.py taken now: an edit of the file during the
        # run (a half-written file, a new version) cannot reach a node restarted later.
        self.nodeflow = os.path.join(self.folder, "nodeflow.py")
        shutil.copyfile(NODEFLOW, self.nodeflow)
        self.log_dir = os.path.join(self.folder, "logs")
        os.makedirs(self.log_dir)
        self.out = sys.stderr if options.json else sys.stdout
        self.began = time.monotonic()
        self.members: list[Member] = []
        self.faults: Counter[str] = Counter()
        self.observations: list[str] = []
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.mutex = threading.Lock()
        self.numbers = itertools.count(1)
        self.revisions = {workflow: 1 for workflow in DEFINITIONS}
        self.nf: nodeflow.Cluster | None = None
        self.stop_workload = threading.Event()
        self.stop_signals = threading.Event()
        self.settling = False
        self.threads: list[threading.Thread] = []
        self.phase = "starting"
        self.waits: dict[tuple[str, str], list[float]] = {}  # (instance, signal) -> [first seen, delay, last sent]

    # Output -------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.began:6.1f}s] {text}", file=self.out, flush=True)

    def observe(self, text: str) -> None:
        self.say(f"OBSERVED: {text.splitlines()[0]}")
        self.observations.append(text)

    # Commands -----------------------------------------------------------------------------

    def cli(self, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        self.counts["cli commands"] += 1
        return subprocess.run(
            [PYTHON, self.nodeflow, "--db", self.db, *args], capture_output=True, text=True, input=input,
            timeout=timeout, cwd=self.folder,
        )

    def cli_ok(self, *args: str, input: str | None = None) -> str:
        done = self.cli(*args, input=input)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} exited {done.returncode}: {done.stderr.strip()[-1500:]}")
        return done.stdout

    def record(self, key: str, kind: str, expect: str, detail: Any = None) -> None:
        assert self.nf is not None
        text = json.dumps(detail)
        self.nf.committer.submit(
            lambda conn: conn.execute(
                "INSERT INTO chaos_sent (key, kind, expect, detail, at) VALUES (?, ?, ?, ?, ?)",
                (key, kind, expect, text, time.time()),
            )
        )

    def driver_error(self, name: str, error: BaseException) -> None:
        with self.mutex:
            self.errors[name] += 1
            if len(self.error_samples) < 20:
                self.error_samples.append(f"{name}: {type(error).__name__}: {error}")
        self.say(f"driver {name}: {type(error).__name__}: {str(error)[-1500:]}")

    # Setting up -----------------------------------------------------------------------------

    def setup(self) -> None:
        nf = self.nf = nodeflow.connect(self.db)

        def create(conn: sqlite3.Connection) -> None:
            for statement in SCHEMA:
                conn.execute(statement)

        nf.committer.submit(create)
        for workflow, make in DEFINITIONS.items():
            info = nf.define(make(1))
            self.record(f"define:{workflow}:{info.version}", "define", "used", {"rev": 1})
        # Cron timers: one from the command line, one from the API (a slot a minute each).
        self.cli_ok("schedule", "add", "chaos-cron-1", "--cron", "* * * * *", "--queue", "chaos.cron",
                    "--body", json.dumps({"cron": "chaos-cron-1"}))
        nf.schedule("chaos-cron-2", "chaos.cron", {"cron": "chaos-cron-2"}, cron="* * * * *")
        for name in ("chaos-cron-1", "chaos-cron-2"):
            self.record(name, "cron", "each slot once", {"cron": "* * * * *"})
        replicas = self.options.replicas
        for number in range(1, self.options.nodes + 1):
            replica = number > self.options.nodes - replicas
            self.members.append(Member(self, f"r{number}" if replica else f"n{number}", replica))
        for member in self.members:
            member.start()
        deadline = time.monotonic() + 60
        for member in self.members:
            while READY not in member.log_text():
                if member.process is not None and member.process.poll() is not None:
                    raise RuntimeError(f"node {member.node_id} exited while starting:\n{member.tail(40)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {member.node_id} not ready within 60 s:\n{member.tail(40)}")
                time.sleep(0.05)
        self.say(f"{len(self.members)} nodes running ({', '.join(m.node_id for m in self.members)}) in {self.folder}")

    # The workload ---------------------------------------------------------------------------

    def worker(self, name: str, period: float, action: Callable[[random.Random], None], stop: threading.Event) -> None:
        def loop() -> None:
            rng = random.Random(f"{self.seed}:{name}")
            while not stop.is_set():
                try:
                    action(rng)
                except Exception as error:
                    self.driver_error(name, error)
                stop.wait(rng.uniform(period * 0.5, period * 1.5))

        thread = threading.Thread(target=loop, name=f"chaos-{name}", daemon=True)
        thread.start()
        self.threads.append(thread)

    def start_workload(self) -> None:
        """About 3 instances, 4 messages, 3 timers, 2 locks a second, and a new definition version
        every 4 s (times --rate); with the faults, about half a core on top of the nodes' own work."""
        w, rate = self.stop_workload, self.options.rate
        self.worker("instances", 0.3 / rate, self.start_instance, w)
        self.worker("jobs", 0.25 / rate, self.send_job, w)
        self.worker("timers", 0.3 / rate, self.add_timer, w)
        self.worker("defines", 4.0 / rate, self.redefine, w)
        self.worker("locks-cli", 1.5 / rate, self.lock_cli, w)
        self.worker("locks-api", 0.6 / rate, self.lock_api, w)
        self.worker("signals", 0.2, self.answer_signals, self.stop_signals)

    def number(self) -> int:
        with self.mutex:
            return next(self.numbers)

    def start_instance(self, rng: random.Random) -> None:
        assert self.nf is not None
        n, roll, began = self.number(), rng.random(), time.time()  # began: any define before it counts
        if roll < 0.8:
            given = {"n": n, "doom": rng.random() < 0.12, "flaky": rng.random() < 0.15}
            if roll < 0.72:
                instance, via = self.nf.start("chaos-a", given), "api"
            else:
                instance, via = self.cli_ok("start", "chaos-a", "--input", json.dumps(given)).strip(), "cli"
            expect = "faulted" if given["doom"] else "completed"
            self.record(f"instance:{instance}", "instance", expect, {**given, "via": via, "began": began})
        elif roll < 0.9:
            instance = self.nf.start("chaos-b", {"n": n})
            self.record(f"instance:{instance}", "instance", "completed", {"n": n, "via": "api", "began": began})
        else:  # the nodes start it: a signal trigger
            self.trigger(n, rng.random() < 0.5, cli=roll > 0.97)
        self.counts["instances started"] += 1

    TRIGGERS = {"chaos-a": "chaos-new-a", "chaos-b": "chaos-new"}

    def trigger(self, n: int, a: bool, cli: bool = False) -> None:
        """Signal a trigger: whichever node takes the start message starts the instance, with the
        version of the definition its cache holds (which must be the latest)."""
        assert self.nf is not None
        workflow = "chaos-a" if a else "chaos-b"
        name, began = self.TRIGGERS[workflow], time.time()
        if cli:
            self.cli_ok("signal", name, "--input", json.dumps({"n": n}))
        else:
            outcome = self.nf.signal(name, {"n": n})
            if outcome.started != (workflow,):
                raise RuntimeError(f"signal {name} started {outcome.started}")
        detail = {"n": n, "definition": workflow, "via": "cli" if cli else "api", "began": began}
        self.record(f"trigger:{n}", "trigger", "one instance", detail)

    def send_job(self, rng: random.Random) -> None:
        assert self.nf is not None
        n, roll = self.number(), rng.random()
        early = time.monotonic() - self.began < self.options.seconds * 0.5
        fail = 1 if roll < 0.08 else 2 if roll < 0.12 else 99 if roll < 0.15 and early else 0
        body = {"id": f"j{n}", "fail": fail}
        if rng.random() < 0.1:
            message = int(self.cli_ok("send", "chaos.jobs", json.dumps(body)).strip())
        else:
            message = self.nf.send("chaos.jobs", body)
        self.record(f"job:j{n}", "job", "dead" if fail >= 5 else "once", {**body, "message": message})
        self.counts["jobs sent"] += 1

    def add_timer(self, rng: random.Random) -> None:
        assert self.nf is not None
        name, after = f"t{self.number()}", round(rng.uniform(0.3, 2.5), 3)
        if rng.random() < 0.08:
            self.cli_ok("schedule", "add", name, "--after", f"{after}s", "--queue", "chaos.timers",
                        "--body", json.dumps({"timer": name}))
            via = "cli"
        else:
            self.nf.schedule(name, "chaos.timers", {"timer": name}, after=after)
            via = "api"
        self.record(f"timer:{name}", "timer", "once", {"after": after, "via": via})
        self.counts["timers added"] += 1

    def redefine(self, rng: random.Random) -> None:
        assert self.nf is not None
        workflow = rng.choice(sorted(DEFINITIONS))
        with self.mutex:
            self.revisions[workflow] += 1
            rev = self.revisions[workflow]
        data = DEFINITIONS[workflow](rev)
        if rng.random() < 0.3:
            out = self.cli_ok("define", "-", input=json.dumps(data))
            match = re.search(r"version (\d+)", out)
            version, via = int(match.group(1)) if match else -1, "cli"
        else:
            version, via = self.nf.define(data).version, "api"
        self.record(f"define:{workflow}:{version}", "define", "used", {"rev": rev, "via": via})
        self.say(f"defined {workflow} v{version} ({via})")
        self.counts["definitions"] += 1

    def lock_cli(self, rng: random.Random) -> None:
        name, hold = rng.choice(LOCK_NAMES), round(rng.uniform(0.02, 0.2), 3)
        done = self.cli("lock", name, "--timeout", "5", "--", PYTHON, "-c", LOCK_HOLDER, str(hold))
        if done.returncode == 0:
            self.counts["locks (cli)"] += 1
        elif " is busy: " in done.stderr:
            self.counts["lock timeouts"] += 1
        else:
            raise RuntimeError(f"lock {name} exited {done.returncode}: {done.stderr.strip()[-500:]}")

    def lock_api(self, rng: random.Random) -> None:
        assert self.nf is not None
        name, hold = rng.choice(LOCK_NAMES), rng.uniform(0.02, 0.2)
        try:
            held = self.nf.lock(name, timeout=5)
        except nodeflow.LockTimeout:
            self.counts["lock timeouts"] += 1
            return
        try:
            started = time.time()
            time.sleep(hold)
            ended = time.time()
            fence, holder = held.fence, f"api thread {threading.get_ident()}"
            self.nf.committer.submit(
                lambda conn: conn.execute(
                    "INSERT INTO chaos_locks (name, fence, holder, started, ended) VALUES (?, ?, ?, ?, ?)",
                    (name, fence, holder, started, ended),
                )
            )
        finally:
            held.release()
        self.counts["locks (api)"] += 1

    def answer_signals(self, rng: random.Random) -> None:
        """Send each instance waiting for a signal its signal, a little after it began to wait.

        A signal sent before an instance waits for it is dropped by design: only instances seen
        waiting get one; one still waiting three seconds after its signal gets it again.
        """
        assert self.nf is not None
        waiting = self.nf.store.read(
            lambda conn: conn.execute(
                "SELECT id, waiting_for FROM instances WHERE status = 'waiting' AND waiting_for IS NOT NULL"
            ).fetchall()
        )
        now = time.monotonic()
        seen = self.waits
        for instance, name in waiting:
            wait = seen.setdefault((instance, name), [now, rng.uniform(0.1, 1.0), 0.0])
            if (now - wait[0] < wait[1] and not self.settling) or now - wait[2] < 3.0:
                continue
            if wait[2]:
                self.counts["signals sent again"] += 1
            wait[2] = now
            if rng.random() < 0.05 and not self.settling:
                self.cli_ok("signal", name, "--input", json.dumps({"by": "cli"}))
            else:
                self.nf.signal(name, {"by": "api"})
            self.counts["signals sent"] += 1

    # Faults ---------------------------------------------------------------------------------

    def inject(self) -> None:
        """One fault. SIGKILL and SIGSTOP may hit a node still starting; SIGTERM only one that has
        installed its handlers. An eligible node is only hit while another eligible one runs. Often
        the victim is picked for what it holds: messages in hand (a kill or stop), or office."""
        assert self.nf is not None
        kind = self.rng.choices(("kill", "stop", "term", "restart"), (3, 3, 2, 2))[0]
        eligible = [m for m in self.members if m.ready and not m.replica]
        choices = [
            m
            for m in self.members
            if (m.ready or (m.state == "up" and kind in ("kill", "stop")))
            and (m.replica or any(other is not m for other in eligible))
        ]
        if not choices:
            self.faults["skipped (too few nodes up)"] += 1
            return
        victim = self.rng.choice(choices)
        held: dict[str, int] = dict(
            self.nf.store.read(
                lambda conn: conn.execute(
                    "SELECT lease_owner, count(*) FROM messages WHERE lease_owner IS NOT NULL AND available_at > ? "
                    "GROUP BY lease_owner",
                    (time.time(),),
                ).fetchall()
            )
        )
        if kind in ("kill", "stop") and self.rng.random() < 0.6:
            busy = [m for m in choices if m.node_id in held]
            victim = self.rng.choice(busy) if busy else victim
        elif kind != "stop" and (self.rng.random() < 0.4 or not self.faults["of which the scheduler"]):
            office = self.nf.scheduler()  # a new term, a new epoch (at least once a run)
            victim = next((m for m in choices if office is not None and m.pid == office["pid"]), victim)
        office = self.nf.scheduler()
        self.faults[kind] += 1
        if kind != "stop" and office is not None and victim.pid == office["pid"]:
            self.faults["of which the scheduler"] += 1
        pid, process = victim.pid, victim.process
        assert process is not None
        what = f"{victim.node_id} (pid {pid}, holding {held.get(victim.node_id, 0)} message(s))"
        if kind == "kill":
            process.kill()
            process.wait(10)  # reaped: the kernel has freed its locks
            victim.state, victim.wake_at = "down", time.monotonic() + self.rng.uniform(0.5, 2.0)
            self.say(f"SIGKILL {what}; back in {victim.wake_at - time.monotonic():.1f}s")
        elif kind == "stop":
            os.kill(pid, signal.SIGSTOP)
            victim.state, victim.wake_at = "stopped", time.monotonic() + self.rng.uniform(0.5, 4.0)
            self.say(f"SIGSTOP {what}; SIGCONT in {victim.wake_at - time.monotonic():.1f}s")
        else:
            os.kill(pid, signal.SIGTERM)
            victim.state, victim.term_at = "terminating", time.monotonic()
            victim.then_restart = 0.0 if kind == "restart" else self.rng.uniform(0.5, 2.0)
            self.say(f"SIGTERM {what}{'; restart at once' if kind == 'restart' else ''}")

    def tend(self, final: bool = False) -> None:
        """Carry out what is due (SIGCONT, restarts), and notice nodes that ended by themselves."""
        now = time.monotonic()
        for member in self.members:
            process = member.process
            if process is None:
                continue
            code = process.poll()
            if member.state in ("up", "stopped") and code is not None:
                self.observe(f"node {member.node_id} (pid {member.pid}, life {member.lives}) exited by itself with "
                             f"code {code} during {self.phase}:\n{member.tail()}")
                member.state, member.wake_at = "down", now
            elif member.state == "terminating" and code is not None:
                if code != 0:
                    self.observe(f"node {member.node_id} (pid {member.pid}) exited {code} after SIGTERM:\n"
                                 f"{member.tail()}")
                member.state, member.wake_at = "down", now + member.then_restart
            elif member.state == "terminating" and now - member.term_at > TERM_BOUND:
                self.observe(f"node {member.node_id} (pid {member.pid}) still running {TERM_BOUND:.0f} s after "
                             f"SIGTERM; killed:\n{member.tail()}")
                process.kill()
                process.wait(10)
                member.state, member.wake_at = "down", now
            if member.state == "stopped" and (final or (member.wake_at is not None and now >= member.wake_at)):
                os.kill(member.pid, signal.SIGCONT)
                member.state, member.wake_at = "up", None
            if member.state == "down" and (final or (member.wake_at is not None and now >= member.wake_at)):
                member.start()
                self.say(f"started {member.node_id} again (pid {member.pid}, life {member.lives})")

    # The phases -------------------------------------------------------------------------------

    def chaos(self) -> None:
        self.phase = "the chaos"
        end = time.monotonic() + self.options.seconds
        every = (1.0 / self.options.faults, 3.0 / self.options.faults)  # seconds between faults
        next_fault = time.monotonic() + self.rng.uniform(*every)
        while time.monotonic() < end:
            self.tend()
            if time.monotonic() >= next_fault:
                self.inject()
                next_fault = time.monotonic() + self.rng.uniform(*every)
            time.sleep(0.05)

    def settle(self) -> bool:
        """Everything back up, the workload stopped, and the cluster quiet (or the bound reached)."""
        assert self.nf is not None
        self.phase = "settling"
        self.say("chaos over: SIGCONT and restart every node, stop the workload, let the cluster settle")
        while any(m.state != "up" for m in self.members):
            self.tend(final=True)
            time.sleep(0.05)
        self.stop_workload.set()
        for thread in self.threads:
            if thread.name != "chaos-signals":
                thread.join(30)
        self.settling = True
        for name in ("chaos-cron-1", "chaos-cron-2"):
            self.nf.unschedule(name)  # no slot after the chaos: the run ends when it ends
        # A round of trigger starts after the last define: each node that takes one loads the latest
        # blueprint, and says which version it holds with its next beat (checked: the latest).
        for index in range(2 * len(self.members)):
            self.trigger(self.number(), a=index % 2 == 0)
            time.sleep(0.05)
        began = time.monotonic()
        deadline = began + self.options.settle
        settled = False
        while time.monotonic() < deadline:
            self.tend()
            busy = self.nf.store.read(
                lambda conn: (
                    conn.execute("SELECT count(*) FROM instances WHERE status IN ('running', 'waiting')").fetchone()[0],
                    conn.execute(
                        "SELECT count(*) FROM messages WHERE queue LIKE 'chaos.%' OR queue = ?",
                        (nodeflow.WORKFLOW_QUEUE,),
                    ).fetchone()[0],
                    conn.execute("SELECT count(*) FROM timers WHERE due IS NOT NULL").fetchone()[0],
                )
            )
            if busy == (0, 0, 0):
                settled = True
                break
            time.sleep(0.2)
        self.stop_signals.set()
        for thread in self.threads:
            thread.join(30)
        if settled:
            self.say(f"settled in {time.monotonic() - began:.1f}s")
        else:
            self.say(f"NOT settled within {self.options.settle:.0f}s (instances running or waiting, messages "
                     f"queued, timers due): {busy}")
        # Two heartbeats: each node records the blueprints it holds and the instruction it applied.
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            self.tend()
            time.sleep(0.05)
        return settled

    def stop_nodes(self) -> None:
        self.phase = "the final stop"
        for member in self.members:
            if member.process is not None and member.process.poll() is None:
                os.kill(member.pid, signal.SIGCONT)
                os.kill(member.pid, signal.SIGTERM)
                member.state, member.term_at, member.then_restart = "terminating", time.monotonic(), math.inf
        deadline = time.monotonic() + TERM_BOUND + 5
        while any(m.state == "terminating" for m in self.members) and time.monotonic() < deadline:
            self.tend()
            time.sleep(0.05)

    def kill_all(self) -> None:
        for member in self.members:
            process = member.process
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)
                    process.kill()
                process.wait(10)

    def figures(self, figures: dict[str, Any], settled: bool) -> dict[str, Any]:
        return {
            "faults": dict(self.faults),
            **figures,
            "driver": dict(sorted(self.counts.items())),
            "driver errors": dict(self.errors),
            "node lives": {m.node_id: m.lives for m in self.members},
            "settled": settled,
        }


def run(options: argparse.Namespace) -> int:
    chaos = Run(options)
    out = chaos.out
    rerun = f"python3 tests/chaos.py --seed {chaos.seed} --nodes {options.nodes} --replicas {options.replicas} " \
            f"--seconds {options.seconds:g}" + (f" --rate {options.rate:g}" if options.rate != 1 else "") \
            + (f" --faults {options.faults:g}" if options.faults != 1 else "")
    print(f"chaos seed {chaos.seed} (rerun: {rerun})", file=out, flush=True)
    settled = False
    try:
        chaos.setup()
        chaos.start_workload()
        chaos.chaos()
        settled = chaos.settle()
        chaos.stop_nodes()
    except BaseException:
        chaos.stop_workload.set()
        chaos.stop_signals.set()
        chaos.kill_all()
        raise
    finally:
        chaos.kill_all()
        if chaos.nf is not None:
            chaos.nf.close()
    logs = [path for member in chaos.members for path in member.logs]
    invariants, figures = check(chaos.db, logs, chaos.observations)
    if not settled:
        invariants[0].fail(f"the cluster did not settle within {options.settle:.0f} s (see the other violations)")
    summary = chaos.figures(figures, settled)
    violations = sum(len(item.violations) for item in invariants)
    summary["violations"] = violations
    elapsed = time.monotonic() - chaos.began
    print("", file=out)
    print(table(invariants), file=out)
    print(f"\nsummary (seed {chaos.seed}, {options.seconds:g} s of chaos, {elapsed:.0f} s in all):", file=out)
    for key, value in summary.items():
        print(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}", file=out)
    verdict = "OK: no invariant violated" if not violations else f"FAILED: {violations} violation(s)"
    print(f"\n{verdict} (seed {chaos.seed}; rerun: {rerun})", file=out, flush=True)
    if options.json:
        document = {
            "seed": chaos.seed,
            "rerun": rerun,
            "seconds": options.seconds,
            "elapsed": round(elapsed, 1),
            "ok": not violations,
            "folder": chaos.folder if (options.keep or violations) else None,
            "invariants": [
                {"key": item.key, "invariant": item.title, "checked": item.checked,
                 "violations": len(item.violations), "evidence": item.violations[:200]}
                for item in invariants
            ],
            "summary": summary,
        }
        print(json.dumps(document, indent=1))
    if violations and not options.keep:
        print(f"the run's folder is kept for a look: {chaos.folder}", file=out)
    elif not options.keep:
        shutil.rmtree(chaos.folder, ignore_errors=True)
    return 1 if violations else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tests/chaos.py",
        description="Kill, stop and restart nodes under load; prove that nothing was lost or done twice.",
    )
    parser.add_argument("--nodes", type=int, default=4, help="serve processes (default 4)")
    parser.add_argument("--replicas", type=int, default=1, help="of which --role replica (default 1)")
    parser.add_argument("--seconds", type=float, default=120.0, help="seconds of chaos (default 120)")
    parser.add_argument("--rate", type=float, default=1.0, help="workload multiplier (default 1)")
    parser.add_argument("--faults", type=float, default=1.0, help="fault rate multiplier (default 1: every 1-3 s)")
    parser.add_argument("--settle", type=float, default=60.0, help="bound on settling afterwards (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random choices (default: random)")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR (new or empty) and keep it")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    options = parser.parse_args(argv)
    if options.nodes < 2 or not 0 <= options.replicas < options.nodes:
        parser.error("give at least 2 nodes, of which at least one not a replica")
    if not 0 < options.rate <= 20 or not 0 < options.faults <= 20 or options.seconds <= 0 or options.settle <= 0:
        parser.error("--rate, --faults, --seconds and --settle must be more than zero (--rate and --faults at most 20)")
    if options.seed is None:
        options.seed = random.randrange(2**32)
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):  # the nodes go too (finally: kill_all)
        signal.signal(signum, lambda number, _frame: sys.exit(128 + number))
    return run(options)


if __name__ == "__main__":
    sys.exit(main())
