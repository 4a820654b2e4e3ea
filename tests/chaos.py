#!/usr/bin/env python3
"""The chaos run: a real cluster under a steady workload while its nodes are killed, stopped and
restarted at random; then a checker proves from the database that nothing was lost and nothing ran twice.

    python3 tests/chaos.py [--nodes 4] [--replicas 1] [--seconds 120] [--seed S] [--keep DIR] [--json]
                           [--rate 1] [--faults 1] [--hostile 1] [--stall-after 3s] [--settle 60]

Exit status 0 when no invariant is violated, 1 otherwise (the evidence is printed), 2 on bad usage.

1. A fresh folder and database, with the run's own tables in it (``chaos_*``; nodeflow ignores them).
2. N ``serve`` nodes (``--replicas`` of them ``--role replica``) with ``--app tests/chaos_app.py``,
   a short lease and a short ``--stall-after``, each life logging to its own file in ``logs/``.
3. A workload driver, in threads of this process, through the Python API and the command line:
   workflow instances (log, set, timer, call, if, signal, a fail branch taken on purpose, a call that
   fails once on purpose and is retried), starts by a signal trigger, new definition versions every few
   seconds, queue messages (some failing on purpose, some until they are dead letters), one-shot and
   cron timers, and ``lock`` commands whose holders record their fence and times. Everything it does
   is recorded in ``chaos_sent``; every effect the nodes have is recorded by chaos_app.py.
   The hostile mix (``--hostile``, on by default; 0 turns it off), seeded too, in the first half of
   the chaos: poison jobs whose handler ends its process (``os._exit``), instances whose ``call``
   does the same, jobs whose handler blocks its thread for 4-8 s, messages whose async handler
   blocks the node's event loop past the stall limit, undecodable messages written straight into
   ``messages`` (a consumed queue, and once ``nodeflow.workflows``), and instances cancelled while
   they wait. chaos_app.py records each hostile run in ``chaos_hostile`` before it misbehaves.
4. A fault injector, seeded, every 1-3 s: SIGKILL (restart after 0.5-2 s), SIGSTOP (SIGCONT after
   0.5-4 s), SIGTERM (restart after 0.5-2 s) or a restart (SIGTERM, then at once), never leaving fewer
   than one eligible (non-replica) node running; the victim is often the node in office, or a node
   with messages in hand. With the hostile mix, also a freeze: SIGSTOP of the node in office (never
   while it holds the writers' turn) for the stall limit + 3-4 s, with no other fault until a
   standby should have taken office. A node that ends itself on purpose (its log says so, exit 3)
   is restarted like a killed one. Every fault, and every life of every node, is written to the
   database at the end (``chaos_faults``, ``chaos_lives``) for the checker.
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
STALL_AFTER = "3s"  # serve --stall-after: a peer silent this long loses its leases, instance locks and office
PLANNED_EXIT_CODE = 3  # chaos_app.py's planned exits: this status, after a line with the mark in the log
PLANNED_EXIT_MARK = "CHAOS PLANNED EXIT"
SLACK = 0.5  # seconds of leeway when the checker matches log times (ms, two processes' clocks) with events
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
    "planned exits": PLANNED_EXIT_MARK,
    "event loop blocked (warned)": "the event loop has been blocked for",
    "office taken from a stalled scheduler": "has had no heartbeat for",
    "instance locks taken from stalled nodes": ": took its lock from node",
    "stepped down after a stall": "lost office (epoch",
    "undecodable messages buried": "cannot be decoded",
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
    # Each run of hostile code (chaos_app.py), committed before it misbehaves: kind poison, exit-call,
    # block-thread or block-loop; key (job:ID, loop:ID, or the instance); the delivery; ended and
    # outcome (acked, lease lost) once a blocking handler finished.
    "CREATE TABLE chaos_hostile (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, key TEXT NOT NULL, message INTEGER, "
    "attempt INTEGER, refunds INTEGER, node TEXT, pid INTEGER NOT NULL, started REAL NOT NULL, ended REAL, "
    "outcome TEXT)",
    # The runner's, written at the end: each fault (kill, stop, term, restart, freeze, planned exit,
    # crash) with its victim's pid, when it began and (stop, freeze) when it ended, the epoch a freeze
    # hit and whether the victim held the writers' turn; each life of each node.
    "CREATE TABLE chaos_faults (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, node TEXT NOT NULL, pid INTEGER NOT NULL, "
    "at REAL NOT NULL, until REAL, epoch INTEGER, writer INTEGER NOT NULL DEFAULT 0, detail TEXT)",
    "CREATE TABLE chaos_lives (node TEXT NOT NULL, life INTEGER NOT NULL, pid INTEGER NOT NULL, "
    "replica INTEGER NOT NULL, started REAL NOT NULL, ready REAL, ended REAL, how TEXT, PRIMARY KEY (node, life))",
    "CREATE TABLE chaos_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",  # JSON values: stall_after, began, ...
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


BURST_FAULT = "no node finished a burst of it in"  # how an instance faults whose bursts keep killing nodes


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
    ("hostile", "poison and undecodable messages cost only themselves"),
    ("blocking", "blocking handlers acked once at most; a blocked thread keeps its lease"),
    ("stalls", "a node taken for stalled was frozen or had its loop blocked"),
    ("takeover", "a frozen scheduler was replaced within its stall limit + 2 s"),
    ("crashes", "no node crashed (planned exits aside), hung or logged a traceback"),
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
    except (ValueError, RecursionError):  # the hostile mix's undecodable bodies
        return None


def _table(conn: sqlite3.Connection, sql: str) -> list[tuple[Any, ...]]:
    """The rows of ``sql``, or none when its table is missing (a database of an older chaos run)."""
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return []
        raise


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
        sent[kind].append((key, expect, _loads(detail) or {}))
        at_of[key] = at
    meta = {key: _loads(value) for key, value in _table(conn, "SELECT key, value FROM chaos_meta")}
    began = meta.get("began") or min(at_of.values(), default=time.time())
    texts: dict[str, str] = {}
    for path in logs:
        try:
            texts[path] = Path(path).read_text(errors="replace")
        except FileNotFoundError:
            continue
    story = Story(conn, meta, texts, began)
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

    undecodable = {int(detail["message"]): key for key, _, detail in sent["undecodable"] if "message" in detail}
    _check_workflows(conn, found, figures, sent, at_of, dead, undecodable)
    _check_messages(found, figures, sent, received, dead, left, undecodable)
    _check_timers(conn, found, figures, sent, received, dead)
    _check_epochs(conn, found, figures, texts)
    _check_nodes(conn, found, figures)
    _check_locks(conn, found, figures)
    _check_hostile(found, figures, sent, received, dead, story, at_of)
    _check_blocking(found, figures, sent, received, dead, story)
    _check_stalls(found, figures, story)
    _check_takeovers(conn, found, figures, story)
    said: Counter[str] = Counter()
    for path, text in texts.items():
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
    undecodable: dict[int, str],
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

        # Completed, or faulted on purpose (the fail branch; a call that ends its process every time,
        # until the run message has had its deliveries), or cancelled on purpose -- nothing else.
        found["instances"].checked += 1
        doomed, exits, cancels = given.get("doom") is True, given.get("hostile") == "exit", given.get("cancel") is True
        last = rows[-1] if rows else None
        if doomed and status == "faulted" and error == doom_message(given.get("n")) and last and last[2] == "fail":
            statuses["faulted on purpose"] += 1
        elif (exits and status == "faulted" and (error or "").startswith(BURST_FAULT) and last
              and last[7].startswith(f"faulted: {BURST_FAULT}")):
            statuses["faulted on purpose (its call exits)"] += 1
        elif cancels and status == "cancelled" and last and last[2] == "cancel":
            statuses["cancelled on purpose"] += 1
        elif not (doomed or exits or cancels) and status == "completed":
            statuses["completed"] += 1
        else:
            statuses[f"{status} (not meant)"] += 1
            meant = (
                "faulted at its fail step" if doomed else
                "faulted with no burst finished (its call exits)" if exits else
                "cancelled" if cancels else "completed"
            )  # fmt: skip
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
        if row[0] not in undecodable:  # written undecodable on purpose: checked under "hostile"
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
    # A cancel row (type "cancel", at the activity where it stood) or a row that faulted the instance
    # ("faulted: ...", at any activity) ends the path, and must be the last row.
    position: str | None = body["start"]
    index = 0
    while index < len(rows):
        step, activity, kind, _node, _fence, _started, _ended, outcome = rows[index]
        if position in ("(faulted)", "(cancelled)"):
            found["steps"].fail(f"step {step} follows the end of the instance ({position}): {evidence}")
            break
        if kind == "cancel":
            if activity != (position or "(start)"):
                found["steps"].fail(f"step {step} cancels at {activity} where the path stood at {position}: {evidence}")
                break
            position = "(cancelled)"
            index += 1
            continue
        spec = activities.get(activity)
        if activity != position or spec is None or spec["type"] != kind:
            found["steps"].fail(f"step {step} is {activity} ({kind}) where the path goes to {position}: {evidence}")
            break
        if outcome.startswith("faulted: "):
            position = "(faulted)"
            index += 1
            continue
        if kind in ("timer", "signal") and outcome.startswith("waiting"):
            resumed = rows[index + 1] if index + 1 < len(rows) else None
            if resumed is not None and (resumed[2] == "cancel" or resumed[7].startswith("faulted: ")):
                index += 1  # it ended while waiting: the next row says how
                continue
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
        if (status == "cancelled") != (position == "(cancelled)"):
            found["steps"].fail(f"{status}, and the journal {'ends' if position == '(cancelled)' else 'does not end'} "
                                f"with a cancel: {evidence}")

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
        # An instance that ended past the timer has its end; one that ended at it (faulted while it
        # waited, cancelled) has none.
        ended_here = bool(rows) and rows[-1][1] == activity and (
            rows[-1][2] == "cancel" or rows[-1][7].startswith("faulted: ")
        )
        ended = status in ("completed", "faulted", "cancelled")
        if len(waits) != 1 or len(ends) > 1 or (ended and len(ends) != (0 if ended_here else 1)):
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
    """The key of a dead letter's message (as its receipt would have); None when it cannot be told."""
    body = _loads(row[2])
    if not isinstance(body, dict):
        return None
    if row[1] == "chaos.jobs":
        return f"job:{body.get('id')}"
    if row[1] == "chaos.loop":
        return f"loop:{body.get('id')}"
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
    undecodable: dict[int, str],
) -> None:
    """Jobs (those of the hostile mix too) and the loop-blocking messages: each acked once, or a dead
    letter, never both, never lost; a job meant to die (failing every time, poison) never acked.
    Whether a dead letter was one to expect is the "hostile" row's question."""
    check = found["messages"]
    dead_by_key = {
        _dead_key(row): row for queue in ("chaos.jobs", "chaos.loop") for row in dead.get(queue, [])
        if row[0] not in undecodable
    }  # fmt: skip
    counts: Counter[str] = Counter()
    keys = set()
    for key, expect, detail in [*sent["job"], *sent["loop"]]:
        keys.add(key)
        check.checked += 1
        got, died = received.get(key), dead_by_key.get(key)
        if got is not None and got[5] != 1:
            check.fail(f"{key} ({detail}) received {got[5]} times: first {got[:5]}, again {got[6]}")
        if got is not None and died is not None:
            check.fail(f"{key} ({detail}) both received {got[:5]} and dead-lettered {died}")
        elif got is not None and expect == "dead":
            why = "ends its process on every delivery" if detail.get("poison") else "fails on every delivery"
            check.fail(f"{key} ({detail}) {why}, yet was received: {got[:5]}")
        elif got is None and died is None:
            check.fail(f"{key} ({detail}) neither received nor dead-lettered: lost")
        counts["received" if got is not None else "dead-lettered" if died is not None else "lost"] += 1
    for key, row in received.items():
        if key.startswith(("job:", "loop:")) and key not in keys:
            check.fail(f"{key} received but never sent: {row}")
    for key, row in dead_by_key.items():
        if key not in keys:
            check.fail(f"{key} dead-lettered but never sent: {row}")
    for queue, count in left:
        check.fail(f"{count} message(s) still in queue {queue} after the cluster settled")
    jobs = [*sent["job"], *sent["loop"]]
    figures["messages"] = {
        "sent": len(jobs),
        "received once": counts["received"],
        "dead-lettered": counts["dead-lettered"],
        "of which on purpose": sum(1 for key, expect, _ in jobs if expect != "once" and key in dead_by_key),
        "failing on purpose first": sum(1 for _, _, detail in sent["job"] if 0 < detail.get("fail", 0) < 5),
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
    conn: sqlite3.Connection, found: dict[str, Invariant], figures: dict[str, Any], texts: dict[str, str]
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
    for path, text in texts.items():
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


# The hostile mix: lives, faults, hostile runs and the log lines that tell of stalls -------------

SECONDS_TEXT = r"([\d.]+)(ms|s)"
STAMPED = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) (\S+) +(?:\S+ +)?(.*)$")
STALLED_SELF = re.compile(r"this node was stalled: no heartbeat for " + SECONDS_TEXT)
STALLED_PEER = re.compile(r"node (\S+) \(pid (\d+)\) stalled: no heartbeat for " + SECONDS_TEXT + r"; handed back")
LOCK_TAKEN = re.compile(r"instance (\S+): took its lock from node (\S+) \(pid (\d+)\), which is stalled")
OFFICE_TAKEN = re.compile(
    r"took office as the scheduling node \(epoch (\d+)\): (\S+) has had no heartbeat for " + SECONDS_TEXT
)
LOST_OFFICE = re.compile(r"lost office \(epoch (\d+)\)")
LOOP_BLOCKED = re.compile(r"the event loop has been blocked for " + SECONDS_TEXT + r"(?: \(at ([^)]*)\))?")
LOG_NAME = re.compile(r"^(.+)-(\d+)\.log$")
TELLING = ("stalled", "took office", "lost office", "event loop has been blocked", PLANNED_EXIT_MARK)


def _seconds(number: str, unit: str) -> float:
    return float(number) / (1000 if unit == "ms" else 1)


def _overlap(lo: float, hi: float, start: float, end: float) -> bool:
    return start <= hi and lo <= end


@dataclasses.dataclass
class LogLine:
    at: float  # wall-clock seconds (the log says the local time of day, in ms)
    path: str
    node: str | None  # the life whose log it is (from the file name)
    life: int | None
    pid: int | None
    text: str

    def __str__(self) -> str:
        return f"{os.path.basename(self.path)}: {self.text.strip()!r}"


@dataclasses.dataclass
class Stall:
    """A log line that says a node did not beat: the node itself after it woke, or a peer that took
    its leases, an instance lock or office from it; or the node's event loop blocked (a warning)."""

    what: str
    node: str
    pid: int | None
    lo: float  # the span it did not beat (or its loop was blocked), by the line's own account
    hi: float
    line: LogLine


class Story:
    """What the run's records tell of its nodes over time, for the checks of the hostile mix: each
    life of each node (chaos_lives), each fault (chaos_faults), each run of hostile code
    (chaos_hostile), and the log lines about stalls, office and planned exits with their times."""

    def __init__(self, conn: sqlite3.Connection, meta: dict[str, Any], texts: dict[str, str], began: float) -> None:
        self.stall_after = float(meta.get("stall_after") or 5.0)
        self.max_deliveries = int(meta.get("max_deliveries") or 5)
        # Deaths refunded to a message before it is tried alone (and charged for each death after).
        self.refunded_deaths = int(meta.get("isolate_after_deaths") or getattr(nodeflow, "ISOLATE_AFTER_DEATHS", 1))
        self.burst_factor = int(meta.get("burst_delivery_factor") or 4)
        self.began = began
        names = ("node", "life", "pid", "replica", "started", "ready", "ended", "how")
        self.lives = [dict(zip(names, row, strict=True)) for row in _table(
            conn, f"SELECT {', '.join(names)} FROM chaos_lives ORDER BY started")]  # fmt: skip
        names = ("id", "kind", "node", "pid", "at", "until", "epoch", "writer", "detail")
        self.faults = [dict(zip(names, row, strict=True)) for row in _table(
            conn, f"SELECT {', '.join(names)} FROM chaos_faults ORDER BY at")]  # fmt: skip
        names = ("id", "kind", "key", "message", "attempt", "refunds", "node", "pid", "started", "ended", "outcome")
        self.hostile = [dict(zip(names, row, strict=True)) for row in _table(
            conn, f"SELECT {', '.join(names)} FROM chaos_hostile ORDER BY started")]  # fmt: skip
        self.end = max(
            [float(meta.get("ended") or 0), *(life["ended"] or 0 for life in self.lives),
             *(fault["until"] or fault["at"] for fault in self.faults)], default=time.time(),
        )  # fmt: skip
        pids = {(life["node"], life["life"]): life["pid"] for life in self.lives}
        self.lines: list[LogLine] = []
        for path, text in texts.items():
            named = LOG_NAME.match(os.path.basename(path))
            node, life = (named.group(1), int(named.group(2))) if named else (None, None)
            for line in text.splitlines():
                if not any(word in line for word in TELLING):
                    continue
                stamped = STAMPED.match(line)
                if stamped is None:
                    continue
                at = self._wall(stamped.group(1))
                self.lines.append(LogLine(at, path, node, life, pids.get((node, life)), line))
        self.lines.sort(key=lambda line: line.at)
        self.stalls = self._stalls()

    def _wall(self, clock: str) -> float:
        """The wall-clock time of a log line's time of day: the one nearest the run's middle."""
        when = datetime.time.fromisoformat(clock)
        day = datetime.date.fromtimestamp(self.began)
        middle = self.began + 600
        moments = [
            datetime.datetime.combine(day + datetime.timedelta(days=offset), when).timestamp() for offset in (-1, 0, 1)
        ]
        return min(moments, key=lambda moment: abs(moment - middle))

    def life_of(self, node: str, at: float) -> dict[str, Any] | None:
        for life in self.lives:
            if life["node"] == node and life["started"] - SLACK <= at <= (life["ended"] or math.inf) + SLACK:
                return life
        return None

    def _stalls(self) -> list[Stall]:
        found = []
        for line in self.lines:
            if (match := STALLED_SELF.search(line.text)) and line.node is not None:
                silent = _seconds(match.group(1), match.group(2))
                found.append(Stall("said it was stalled", line.node, line.pid, line.at - silent, line.at, line))
            elif match := STALLED_PEER.search(line.text):
                silent = _seconds(match.group(3), match.group(4))
                stall = Stall("had its leases handed back", match.group(1), int(match.group(2)), line.at - silent,
                              line.at, line)  # fmt: skip
                found.append(stall)
            elif match := LOCK_TAKEN.search(line.text):
                stall = Stall("had an instance lock taken", match.group(2), int(match.group(3)),
                              line.at - self.stall_after, line.at, line)  # fmt: skip
                found.append(stall)
            elif match := OFFICE_TAKEN.search(line.text):
                silent = _seconds(match.group(3), match.group(4))
                life = self.life_of(match.group(2), line.at)
                pid = life["pid"] if life else None
                found.append(Stall("had office taken", match.group(2), pid, line.at - silent, line.at, line))
            elif (match := LOOP_BLOCKED.search(line.text)) and line.node is not None:
                blocked = _seconds(match.group(1), match.group(2))
                found.append(Stall("had its event loop blocked", line.node, line.pid, line.at - blocked, line.at, line))
        return found

    # Intervals ------------------------------------------------------------------------------

    def pids_of(self, node: str, pid: int | None) -> set[int]:
        return {pid} if pid is not None else {life["pid"] for life in self.lives if life["node"] == node}

    def frozen(self, pids: set[int], lo: float, hi: float) -> dict[str, Any] | None:
        """A SIGSTOP (a stop or a freeze) of one of ``pids`` at some time in [lo, hi]."""
        for fault in self.faults:
            if fault["kind"] in ("stop", "freeze") and fault["pid"] in pids and _overlap(
                lo, hi, fault["at"], fault["until"] or self.end
            ):
                return fault
        return None

    def loop_blocks(self, pids: set[int], lo: float, hi: float) -> list[dict[str, Any]]:
        """The runs of a loop-blocking handler on one of ``pids`` at some time in [lo, hi]."""
        return [run for run in self.runs("block-loop", pids) if _overlap(lo, hi, run["started"], self.run_end(run))]

    def writer_frozen(self, lo: float, hi: float, but: set[int] | None = None) -> dict[str, Any] | None:
        """A SIGSTOP in [lo, hi] of a node that held the writers' turn then: every commit waited for it."""
        for fault in self.faults:
            if fault["writer"] and fault["pid"] not in (but or set()) and _overlap(
                lo, hi, fault["at"], fault["until"] or self.end
            ):
                return fault
        return None

    def runs(self, kind: str, pids: set[int] | None = None) -> list[dict[str, Any]]:
        return [run for run in self.hostile if run["kind"] == kind and (pids is None or run["pid"] in pids)]

    def run_end(self, run: dict[str, Any]) -> float:
        """When a hostile run ended: it said so, or its life ended (killed meanwhile), or 30 s on."""
        if run["ended"] is not None:
            return float(run["ended"])
        for life in self.lives:
            if life["pid"] == run["pid"] and life["ended"] is not None:
                return float(life["ended"])
        return float(run["started"]) + 30

    def healthy(self, life: dict[str, Any], lo: float, hi: float) -> bool:
        """Whether a life was up, ready and unhindered (not frozen, its loop not blocked, no frozen
        holder of the writers' turn) over all of [lo, hi]: able to take office."""
        if life["ready"] is None or life["ready"] > lo or (life["ended"] is not None and life["ended"] < hi):
            return False
        pids = {life["pid"]}
        return self.frozen(pids, lo, hi) is None and not self.loop_blocks(pids, lo, hi) and (
            self.writer_frozen(lo, hi) is None
        )

    def explain(self, stall: Stall) -> str | None:
        """Why a node did not beat, from what the run did to it; None when nothing explains it."""
        pids = self.pids_of(stall.node, stall.pid)
        lo, hi = stall.lo - SLACK, stall.hi + SLACK
        loop = stall.what == "had its event loop blocked"  # a handler first: a stop is no blocked loop
        if loop and self.loop_blocks(pids, lo, hi):
            return "its event loop blocked by a handler"
        fault = self.frozen(pids, lo, hi)
        if fault is not None:
            return f"frozen ({fault['kind']})"
        if self.loop_blocks(pids, lo, hi):
            return "its event loop blocked by a handler"
        if not loop and self.writer_frozen(lo, hi, pids) is not None:
            return "a frozen node held the writers' turn"
        if not loop and self.waited_for_the_database(pids, lo, hi):
            return "its heartbeat waited for the database (a loaded machine)"
        return None

    def waited_for_the_database(self, pids: set[int], lo: float, hi: float) -> bool:
        """Whether the node itself said, for a stall in [lo, hi], that its heartbeat's commit waited for the
        database: no fault of the run, nor a blocked thread, but a disk or a machine too busy to keep up."""
        return any(
            other.what == "said it was stalled" and other.pid in pids and "for the database" in other.line.text
            and _overlap(lo, hi, other.lo, other.hi)
            for other in self.stalls
        )  # fmt: skip

    def disturbed(self, pids: set[int], lo: float, hi: float) -> str | None:
        """Whatever befell a node life in [lo, hi] that may cost a message in its hands its lease:
        a fault, its death (a planned exit too), its loop blocked, a frozen holder of the writers' turn."""
        for fault in self.faults:
            if fault["pid"] in pids and _overlap(lo, hi, fault["at"], fault["until"] or fault["at"]):
                return f"{fault['kind']} at {fault['at']:.3f}"
        for life in self.lives:
            if life["pid"] in pids and life["ended"] is not None and lo <= life["ended"] <= hi:
                return f"its life ended ({life['how']}) at {life['ended']:.3f}"
        if self.loop_blocks(pids, lo, hi):
            return "its event loop blocked by a handler"
        fault = self.writer_frozen(lo, hi, pids)
        if fault is not None:
            return f"node {fault['node']} frozen holding the writers' turn at {fault['at']:.3f}"
        return None

    def around(self, pids: set[int], lo: float, hi: float) -> str:
        """The faults of ``pids`` near [lo, hi], for evidence."""
        near = [fault for fault in self.faults if fault["pid"] in pids and lo - 10 <= fault["at"] <= hi + 10]
        return "; ".join(f"{fault['kind']} {fault['at']:.3f}..{fault['until'] or fault['at']:.3f}" for fault in near) \
            or "no fault near"


def _dead_reason_ok(error: str | None) -> bool:
    """A dead letter whose last delivery ended with its holder: killed, ended itself, stalled, restarted,
    its lease ran out, or its node stopped gracefully around it (a delivery a graceful stop interrupts
    counts: "interrupted" by the grace period, or handed back as its holder "went away")."""
    words = ("died", "stalled", "restarted", "expired", "went away", "interrupted")
    return any(word in (error or "") for word in words)


def _check_hostile(
    found: dict[str, Invariant],
    figures: dict[str, Any],
    sent: dict[str, list[tuple[str, str, Any]]],
    received: dict[str, tuple[Any, ...]],
    dead: dict[str, list[tuple[Any, ...]]],
    story: Story,
    at_of: dict[str, float],
) -> None:
    """Poison jobs end dead letters after at most their limit of deaths (and the deaths refunded
    before a message is tried alone); undecodable messages end dead letters saying so; an instance
    whose call ends its process faults after at most 4x the limit of deaths (and those refunded);
    and no other message is a dead letter (those of the thread-blocking jobs whose every delivery a
    fault cut short aside)."""
    check = found["hostile"]
    limit, refunded = story.max_deliveries, story.refunded_deaths
    bound, burst_bound = limit + refunded, story.burst_factor * limit + refunded
    dead_by_id = {row[0]: row for rows in dead.values() for row in rows}
    dead_by_key = {_dead_key(row): row for queue in ("chaos.jobs", "chaos.loop") for row in dead.get(queue, [])}
    exits: Counter[str] = Counter(run["key"] for run in story.hostile if run["kind"] in ("poison", "exit-call"))

    for key, _expect, detail in sent["job"]:
        if not detail.get("poison"):
            continue
        check.checked += 1
        died = dead_by_key.get(key)
        if died is None:
            check.fail(f"poison {key} ({detail}) is no dead letter; it ended its node {exits[key]} time(s)")
        elif not _dead_reason_ok(died[5]):
            check.fail(f"poison {key} is a dead letter with no death in its last error: {died}")
        if exits[key] > bound:
            check.fail(f"poison {key} ended its node {exits[key]} times; at most {bound} (its {limit} deliveries, "
                       f"and {refunded} deaths refunded before it is tried alone): "
                       f"{[run for run in story.hostile if run['key'] == key]}")

    jobs_sent = sorted((at_of.get(key, 0.0), key) for key, _, _ in sent["job"])
    for key, _expect, detail in sent["undecodable"]:
        check.checked += 1
        died = dead_by_id.get(detail.get("message"))
        where = f"undecodable message {detail.get('message')} ({detail.get('variant')}) in {detail.get('queue')}"
        if died is None:
            check.fail(f"{where} is no dead letter")
        elif "cannot be decoded" not in (died[5] or ""):
            check.fail(f"{where} is a dead letter without saying its body cannot be decoded: {died[:2]} {died[3:]}")
        if detail.get("queue") == "chaos.jobs":  # the queue's consumers went on after it
            later = [job for at, job in jobs_sent if at > at_of.get(key, math.inf) + 2]
            if later and not any(job in received or job in dead_by_key for job in later):
                check.fail(f"{where}: none of the {len(later)} jobs sent after it was handled")

    for key, _expect, detail in sent["instance"]:
        if detail.get("hostile") != "exit":
            continue
        check.checked += 1
        instance = key.split(":", 1)[1]
        if exits[instance] > burst_bound:
            check.fail(f"instance {instance}'s call ended its node {exits[instance]} times; at most {burst_bound} "
                       f"({story.burst_factor}x its run message's limit, and {refunded} deaths refunded before it "
                       f"is tried alone): {[run for run in story.hostile if run['key'] == instance][-3:]}")

    # Every dead letter: one meant to be (a job failing every time, poison, a loop-blocker, an
    # undecodable message), or a thread-blocking job whose every delivery was cut short (checked under
    # "blocking"); no innocent message, and none of a timer or a cron slot.
    expected = {key for key, expect, _ in [*sent["job"], *sent["loop"]] if expect != "once"}
    blockers = {key for key, _, detail in sent["job"] if detail.get("block")}
    undecodable = {detail.get("message") for _, _, detail in sent["undecodable"]}
    innocent = 0
    for queue, rows in dead.items():
        if not (queue.startswith("chaos.") or queue == nodeflow.WORKFLOW_QUEUE):
            continue
        for row in rows:
            check.checked += 1
            key = _dead_key(row) if queue != nodeflow.WORKFLOW_QUEUE else None
            if row[0] in undecodable or key in expected or key in blockers:
                continue
            innocent += 1
            check.fail(f"an innocent message is a dead letter ({key or 'no key'}): {row[:2]} {str(row[2])[:200]} "
                       f"{row[3:]}")
    figures["hostile"] = {
        "poison jobs": sum(1 for _, _, detail in sent["job"] if detail.get("poison")),
        "nodes they ended": sum(exits[key] for key, _, detail in sent["job"] if detail.get("poison")),
        "undecodable": len(sent["undecodable"]),
        "instances whose call exits": sum(1 for _, _, detail in sent["instance"] if detail.get("hostile") == "exit"),
        "nodes their calls ended": sum(count for key, count in exits.items() if not key.startswith("job:")),
        "cancelled on purpose": sum(1 for _, _, detail in sent["instance"] if detail.get("cancel")),
        "innocent dead letters": innocent,
    }


def _check_blocking(
    found: dict[str, Invariant],
    figures: dict[str, Any],
    sent: dict[str, list[tuple[str, str, Any]]],
    received: dict[str, tuple[Any, ...]],
    dead: dict[str, list[tuple[Any, ...]]],
    story: Story,
) -> None:
    """A handler that blocks its thread keeps its message's lease (the node renews it), so it acks
    once; every run of one that did not ack met a fault. One that blocks the event loop stalls its
    node, and ends a dead letter (or acked once, if it ever finished in time)."""
    check = found["blocking"]
    dead_by_key = {_dead_key(row): row for queue in ("chaos.jobs", "chaos.loop") for row in dead.get(queue, [])}
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in story.hostile:
        runs[run["key"]].append(run)
    outcomes: Counter[str] = Counter()
    for key, _expect, detail in sent["job"]:
        if not detail.get("block"):
            continue
        check.checked += 1
        got, died = received.get(key), dead_by_key.get(key)
        outcomes["thread: acked" if got else "thread: a dead letter (all cut short)" if died else "thread: lost"] += 1
        acked = [run for run in runs[key] if run["outcome"] == "acked"]
        if len(acked) > 1 or (got is not None) != bool(acked):
            check.fail(f"{key} ({detail}): {len(acked)} run(s) acked, receipt {got}: {runs[key]}")
        for run in runs[key]:
            if run["outcome"] == "acked":
                continue
            lo, hi = run["started"] - SLACK, (run["ended"] or run["started"] + float(detail["block"]) + 2) + SLACK
            why = story.disturbed({run["pid"]}, lo, hi)
            if why is None:
                check.fail(
                    f"{key} ({detail}): its handler blocked its thread on {run['node']} (pid {run['pid']}) and "
                    f"{'lost its lease' if run['ended'] else 'never finished'} with nothing done to that node: {run}; "
                    f"dead letter {died}; faults near: {story.around({run['pid']}, lo, hi)}"
                )
        if died is not None and not runs[key]:
            check.fail(f"{key} ({detail}) blocks its thread, and is a dead letter that never ran: {died}")
    for key, _expect, detail in sent["loop"]:
        check.checked += 1
        got, died = received.get(key), dead_by_key.get(key)
        acked = [run for run in runs[key] if run["outcome"] == "acked"]
        outcomes["loop: acked" if got else "loop: a dead letter" if died else "loop: lost"] += 1
        if len(acked) > 1 or (got is not None) != bool(acked):
            check.fail(f"{key} ({detail}): {len(acked)} run(s) acked, receipt {got}: {runs[key]}")
        if died is not None and not _dead_reason_ok(died[5]):
            check.fail(f"{key} ({detail}) is a dead letter with no stall or death in its last error: {died}")
    figures["blocking"] = {
        **dict(sorted(outcomes.items())),
        "thread runs": len(story.runs("block-thread")),
        "loop runs": len(story.runs("block-loop")),
    }


def _check_stalls(found: dict[str, Invariant], figures: dict[str, Any], story: Story) -> None:
    """Every node taken for stalled (by itself or a peer), every event loop said to be blocked, was
    frozen, had its loop blocked by a handler, or waited for a frozen holder of the writers' turn:
    a handler blocking its own thread never makes its node stall."""
    check = found["stalls"]
    causes: Counter[str] = Counter()
    for stall in story.stalls:
        check.checked += 1
        cause = story.explain(stall)
        if cause is not None:
            causes[f"{stall.what}: {cause}"] += 1
            continue
        pids = story.pids_of(stall.node, stall.pid)
        threads = [run for run in story.runs("block-thread", pids) if _overlap(
            stall.lo - SLACK, stall.hi + SLACK, run["started"], story.run_end(run))]  # fmt: skip
        blame = (
            f"; a handler blocked its own thread there meanwhile: {threads}" if threads else
            "; nothing the run did explains it (no SIGSTOP of it, no loop-blocking handler on it, no frozen "
            "holder of the writers' turn)"
        )  # fmt: skip
        check.fail(
            f"node {stall.node} (pid {stall.pid}) {stall.what}, {stall.hi - stall.lo:.2f} s to "
            f"{stall.hi:.3f}: {stall.line}{blame}; faults near: {story.around(pids, stall.lo, stall.hi)}"
        )
    figures["stalls"] = {"reported": len(story.stalls), **dict(sorted(causes.items()))}


def _check_takeovers(
    conn: sqlite3.Connection, found: dict[str, Invariant], figures: dict[str, Any], story: Story
) -> None:
    """Each freeze of the node in office: a standby took office within the stall limit + 2 s (a
    violation only past + 3 s: log and commit times, a beat's period), unless no standby was up,
    ready and unfrozen throughout; the frozen epoch fired nothing after that; the frozen node said
    it lost office once it woke (unless it died first)."""
    check = found["takeover"]
    stall = story.stall_after
    terms = conn.execute("SELECT epoch, node, pid, since FROM elections ORDER BY epoch").fetchall()
    firings = conn.execute("SELECT name, due, fired, epoch, node, message FROM timer_firings").fetchall()
    taken = {int(m.group(1)): (m.group(2), line) for line in story.lines if (m := OFFICE_TAKEN.search(line.text))}
    lost: dict[int, list[LogLine]] = defaultdict(list)
    for line in story.lines:
        if match := LOST_OFFICE.search(line.text):
            lost[int(match.group(1))].append(line)
    delays: list[float] = []
    outcomes: Counter[str] = Counter()
    for fault in (fault for fault in story.faults if fault["kind"] == "freeze"):
        at, until, epoch = fault["at"], fault["until"] or story.end, fault["epoch"]
        node, pid = fault["node"], fault["pid"]
        where = f"freeze of {node} (pid {pid}, epoch {epoch}) at {at:.3f} until {until:.3f}"
        term = next((row for row in terms if row[0] == epoch), None)
        later = [row for row in terms if row[0] > (epoch or 0)]
        if term is None or term[1] != node or (later and later[0][3] < at):
            outcomes["missed (not in office when frozen)"] += 1
            continue
        check.checked += 1
        takeover = later[0] if later else None
        window = (at, at + stall + 2)
        standbys = [life for life in story.lives if not life["replica"] and life["node"] != node]
        healthy = [life for life in standbys if story.healthy(life, *window)]
        excuse = (
            "woken before the bound" if until < at + stall + 3 else
            "no standby up, ready and unfrozen throughout" if not healthy else None
        )  # fmt: skip
        if takeover is None or takeover[3] > at + stall + 3:
            text = f"no standby took office (terms after: {later[:2]})" if takeover is None or takeover[3] > until \
                else f"{takeover[1]} took office {takeover[3] - at:.2f} s after the freeze (epoch {takeover[0]})"
            if excuse:
                outcomes[f"no bound: {excuse}"] += 1
            else:
                check.fail(f"{where}: {text}; bound {stall + 2:g} s (a violation past {stall + 3:g} s); standbys up "
                           f"throughout: {[(life['node'], life['pid']) for life in healthy]}")
        if takeover is None or takeover[3] > until:
            outcomes["not replaced while frozen"] += takeover is not None and not excuse
            continue
        delays.append(takeover[3] - at)
        outcomes["replaced"] += 1
        claim = taken.get(takeover[0])
        if claim is None or claim[0] != node:
            check.fail(f"{where}: epoch {takeover[0]} ({takeover[1]}) began {takeover[3] - at:.2f} s after the freeze, "
                       f"yet no log says it was taken from {node} for its silence: {claim}")
        for row in firings:
            if row[3] == epoch and row[2] >= takeover[3]:
                check.fail(f"{where}: the frozen epoch fired {row} after epoch {takeover[0]} began at "
                           f"{takeover[3]:.3f}")
        life = next((life for life in story.lives if life["pid"] == pid), None)
        stepped = [line for line in lost.get(epoch, []) if line.pid == pid]
        died_soon = life is not None and life["ended"] is not None and life["ended"] <= until + 5
        if not stepped and not died_soon:
            check.fail(f"{where}: it never said it lost office after it woke (its life: {life})")
        elif stepped and stepped[0].at > until + 5:
            check.fail(f"{where}: it said it lost office only {stepped[0].at - until:.2f} s after it woke: "
                       f"{stepped[0]}")
    figures["takeovers"] = {
        "freezes": sum(1 for fault in story.faults if fault["kind"] == "freeze"),
        **dict(sorted(outcomes.items())),
        "delay after the freeze (s)": [round(delay, 2) for delay in sorted(delays)],
        "offices taken from a stalled scheduler": len(taken),
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
        self.life: dict[str, Any] = {}  # this life's row of chaos_lives
        self.frozen_by: dict[str, Any] | None = None  # the stop or freeze fault it is in, until SIGCONT
        self.fault_row: dict[str, Any] | None = None  # the term or restart fault it is in, until it exits

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def start(self) -> None:
        """Start a life; only ever from the main thread (a child's death signal follows its thread)."""
        self.lives += 1
        path = os.path.join(self.run.log_dir, f"{self.node_id}-{self.lives}.log")
        command = [PYTHON, self.run.nodeflow, "--db", self.run.db, "serve", "--node-id", self.node_id,
                   "--app", self.run.app, "--lease", LEASE, "--grace", GRACE,
                   "--stall-after", self.run.options.stall_after]
        if self.replica:
            command += ["--role", "replica"]
        env = dict(os.environ, CHAOS_DB=self.run.db, PYTHONPATH=str(ROOT))
        with open(path, "w") as log:
            self.process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=log, cwd=self.run.folder, env=env,
                preexec_fn=_die_with_parent,
            )
        self.logs.append(path)
        self.state, self.wake_at, self._ready, self.frozen_by = "up", None, False, None
        self.life = {"node": self.node_id, "life": self.lives, "pid": self.pid, "replica": int(self.replica),
                     "started": time.time(), "ready": None, "ended": None, "how": None}
        self.run.lives.append(self.life)

    def ended(self, how: str) -> None:
        """This life is over (its process reaped): say how, for chaos_lives."""
        if self.life and self.life["ended"] is None:
            self.life["ended"], self.life["how"] = time.time(), how

    def planned_exit(self, code: int | None) -> bool:
        """Whether this life ended itself on purpose: exit 3 after chaos_app.py's line saying so."""
        return code == PLANNED_EXIT_CODE and f"{PLANNED_EXIT_MARK} (pid {self.pid})" in self.log_text()

    @property
    def ready(self) -> bool:
        """Whether this life runs workflows: it has installed its signal handlers (a SIGTERM before
        that ends a process the way it ends any program, which would prove nothing)."""
        if self.state == "up" and not self._ready:
            self._ready = READY in self.log_text()
            if self._ready:
                self.life["ready"] = time.time()
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
        self.app = os.path.join(self.folder, "chaos_app.py")  # the same for the app module
        shutil.copyfile(APP, self.app)
        self.log_dir = os.path.join(self.folder, "logs")
        os.makedirs(self.log_dir)
        self.out = sys.stderr if options.json else sys.stdout
        self.began = time.monotonic()
        self.members: list[Member] = []
        self.faults: Counter[str] = Counter()
        self.fault_rows: list[dict[str, Any]] = []  # chaos_faults, written at the end
        self.lives: list[dict[str, Any]] = []  # chaos_lives, written at the end
        self.stall_after = nodeflow.parse_duration(options.stall_after, "--stall-after")
        self.no_faults_until = 0.0  # after a freeze: no other fault until a standby should have taken office
        self.chaos_end = math.inf
        self.exit_rng = random.Random(f"{self.seed}:exits")  # restart delays after planned exits (timing, not choices)
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

    def meta(self, **values: Any) -> None:
        assert self.nf is not None
        rows = [(key, json.dumps(value)) for key, value in values.items()]
        self.nf.committer.submit(
            lambda conn: conn.executemany("INSERT OR REPLACE INTO chaos_meta (key, value) VALUES (?, ?)", rows)
        )

    def fault(self, kind: str, member: Member, **extra: Any) -> dict[str, Any]:
        """Note a fault for chaos_faults (written at the end); the row, to add its end to."""
        row = {"kind": kind, "node": member.node_id, "pid": member.pid, "at": time.time(), "until": None,
               "epoch": None, "writer": 0, "detail": None, **extra}
        self.fault_rows.append(row)
        return row

    def save_records(self) -> None:
        """The faults and lives of the run, and when it ended, for the checker (all nodes are gone now)."""
        assert self.nf is not None
        faults = [(row["kind"], row["node"], row["pid"], row["at"], row["until"], row["epoch"], int(row["writer"]),
                   json.dumps(row["detail"]) if row["detail"] is not None else None) for row in self.fault_rows]
        lives = [(row["node"], row["life"], row["pid"], row["replica"], row["started"], row["ready"], row["ended"],
                  row["how"]) for row in self.lives]

        def save(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT INTO chaos_faults (kind, node, pid, at, until, epoch, writer, detail) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", faults)
            conn.executemany("INSERT INTO chaos_lives (node, life, pid, replica, started, ready, ended, how) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", lives)

        self.nf.committer.submit(save)
        self.meta(ended=time.time())

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
        self.meta(began=time.time(), seed=self.seed, stall_after=self.stall_after, lease=LEASE,
                  max_deliveries=nodeflow.Settings().max_deliveries, hostile=self.options.hostile,
                  isolate_after_deaths=getattr(nodeflow, "ISOLATE_AFTER_DEATHS", 1),
                  burst_delivery_factor=getattr(nodeflow, "BURST_DELIVERY_FACTOR", 4))
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
        if self.options.hostile > 0:
            thread = threading.Thread(target=self.hostile, name="chaos-hostile", daemon=True)
            thread.start()
            self.threads.append(thread)

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

    # The hostile mix ------------------------------------------------------------------------

    # Seconds of chaos per hostile event of each kind (--rate and --hostile multiply the count; at
    # least one of each kind, and one undecodable message in nodeflow.workflows, in every run).
    HOSTILE_EVERY = {"poison": 40, "exit": 60, "loop": 60, "block": 8, "undecodable": 30, "cancel": 40}

    def hostile_plan(self) -> list[tuple[float, str]]:
        """When (seconds into the chaos) to do what: seeded, in the first half of the chaos, so that
        the slow endings (a loop-blocking message is handed on for half a minute) fit in the run."""
        rng = random.Random(f"{self.seed}:hostile")
        scale, seconds = self.options.hostile * self.options.rate, self.options.seconds
        kinds = [kind for kind, every in self.HOSTILE_EVERY.items()
                 for _ in range(max(1, round(seconds * scale / every)))]
        kinds.append("undecodable-workflow")
        return sorted((round(rng.uniform(0.1 * seconds, 0.5 * seconds), 2), kind) for kind in kinds)

    def hostile(self) -> None:
        rng = random.Random(f"{self.seed}:hostile-do")
        start = time.monotonic()
        for offset, kind in self.hostile_plan():
            if self.stop_workload.wait(max(0.0, start + offset - time.monotonic())):
                return
            try:
                getattr(self, "hostile_" + kind.replace("-", "_"))(rng)
                self.counts[f"hostile {kind}"] += 1
            except Exception as error:
                self.driver_error(f"hostile {kind}", error)

    def hostile_poison(self, rng: random.Random) -> None:
        """A job whose handler ends its node's process, on every delivery: a dead letter after its limit."""
        assert self.nf is not None
        n = self.number()
        body = {"id": f"p{n}", "poison": True}
        message = self.nf.send("chaos.jobs", body)
        self.record(f"job:p{n}", "job", "dead", {**body, "message": message})
        self.say(f"hostile: poison job p{n} (message {message})")

    def hostile_block(self, rng: random.Random) -> None:
        """A job whose handler blocks its own thread for 4-8 s, then acks."""
        assert self.nf is not None
        n = self.number()
        body = {"id": f"b{n}", "block": round(rng.uniform(4.0, 8.0), 2)}
        message = self.nf.send("chaos.jobs", body)
        self.record(f"job:b{n}", "job", "once", {**body, "message": message})

    def hostile_loop(self, rng: random.Random) -> None:
        """A message whose async handler blocks the event loop past the stall limit, then acks."""
        assert self.nf is not None
        n = self.number()
        body = {"id": f"l{n}", "sleep": round(self.stall_after + rng.uniform(1.5, 2.5), 2)}
        message = self.nf.send("chaos.loop", body)
        self.record(f"loop:l{n}", "loop", "dead or once", {**body, "message": message})
        self.say(f"hostile: loop-blocking message l{n} (message {message}, {body['sleep']} s)")

    UNDECODABLE = {
        "nested 990 deep": "[" * 990 + "]" * 990,  # as an older nodeflow could have stored it
        "nested 5000 deep": "[" * 5000 + "]" * 5000,
        "cut short": '{"id": "u", "fail": 0',
    }

    def hostile_undecodable(self, rng: random.Random, queue: str = "chaos.jobs", variant: str | None = None) -> None:
        """A message written straight into the messages table (as an older version might have) whose
        body cannot be decoded: the claim makes it a dead letter, and the consumer goes on."""
        assert self.nf is not None
        variant = variant or rng.choice(sorted(self.UNDECODABLE))
        body, now = self.UNDECODABLE[variant], time.time()
        message = self.nf.committer.submit(
            lambda conn: conn.execute(
                "INSERT INTO messages (queue, body, priority, available_at, created) VALUES (?, ?, 0, ?, ?)",
                (queue, body, now, now),
            ).lastrowid
        )
        self.record(f"undecodable:{message}", "undecodable", "dead", {"queue": queue, "variant": variant,
                                                                       "message": message})
        self.say(f"hostile: undecodable message {message} ({variant}) in {queue}")

    def hostile_undecodable_workflow(self, rng: random.Random) -> None:
        self.hostile_undecodable(rng, nodeflow.WORKFLOW_QUEUE, "nested 990 deep")

    def hostile_exit(self, rng: random.Random) -> None:
        """An instance whose charge call ends its node's process every time: it faults once its run
        message has had 4x the dead-letter limit of deliveries."""
        assert self.nf is not None
        given, began = {"n": self.number(), "doom": False, "flaky": False, "hostile": "exit"}, time.time()
        instance = self.nf.start("chaos-a", given)
        self.record(f"instance:{instance}", "instance", "faulted", {**given, "via": "api", "began": began})
        self.say(f"hostile: instance {instance} whose call exits")

    def hostile_cancel(self, rng: random.Random) -> None:
        """An instance of chaos-b cancelled while it waits for its signal (answer_signals cancels it)."""
        assert self.nf is not None
        given, began = {"n": self.number(), "cancel": True}, time.time()
        instance = self.nf.start("chaos-b", given)
        self.record(f"instance:{instance}", "instance", "cancelled", {**given, "via": "api", "began": began})

    def answer_signals(self, rng: random.Random) -> None:
        """Send each instance waiting for a signal its signal, a little after it began to wait.

        A signal sent before an instance waits for it is dropped by design: only instances seen
        waiting get one; one still waiting three seconds after its signal gets it again.
        """
        assert self.nf is not None
        waiting = self.nf.store.read(
            lambda conn: conn.execute(
                "SELECT id, waiting_for, json_extract(variables, '$.input.cancel') FROM instances "
                "WHERE status = 'waiting' AND waiting_for IS NOT NULL"
            ).fetchall()
        )
        now = time.monotonic()
        seen = self.waits
        for instance, name, cancel in waiting:
            wait = seen.setdefault((instance, name), [now, rng.uniform(0.1, 1.0), 0.0])
            if (now - wait[0] < wait[1] and not self.settling) or now - wait[2] < 3.0:
                continue
            if wait[2]:
                self.counts["signals sent again"] += 1
            wait[2] = now
            if cancel:  # the hostile mix's: cancelled, never signalled
                with contextlib.suppress(nodeflow.InvalidInput):  # cancelled already (a second look)
                    self.nf.cancel(instance, "chaos: cancelled on purpose")
                    self.counts["instances cancelled"] += 1
                continue
            if rng.random() < 0.05 and not self.settling:
                self.cli_ok("signal", name, "--input", json.dumps({"by": "cli"}))
            else:
                self.nf.signal(name, {"by": "api"})
            self.counts["signals sent"] += 1

    # Faults ---------------------------------------------------------------------------------

    def inject(self) -> bool:
        """One fault. SIGKILL and SIGSTOP may hit a node still starting; SIGTERM only one that has
        installed its handlers. An eligible node is only hit while another eligible one runs. Often
        the victim is picked for what it holds: messages in hand (a kill or stop), or office. With
        the hostile mix, now and then a freeze of the node in office (see freeze); none in the last
        seconds of the chaos, at least one a run. After a freeze, the next fault waits until a
        standby should have taken office: its bound is checked. False when no node could be hit now
        (planned exits may have taken them all): then it is tried again a moment later."""
        assert self.nf is not None
        hostile = self.options.hostile > 0
        kinds, weights = ("kill", "stop", "term", "restart", "freeze"), (3, 3, 2, 2, 1 if hostile else 0)
        kind = self.rng.choices(kinds, weights)[0]
        left = self.chaos_end - time.monotonic()
        if hostile and not self.faults["freezes replaced"] and self.faults["freeze"] < 3 and (
            left < 0.85 * self.options.seconds
        ):
            kind = "freeze"  # every run has one that a standby replaced (a few tries)
        if kind == "freeze":
            if left > self.stall_after + 8 and self.freeze():
                return True
            kind = self.rng.choices(kinds[:4], weights[:4])[0]  # none to freeze now: another fault
        eligible = [m for m in self.members if m.ready and not m.replica]
        choices = [
            m
            for m in self.members
            if (m.ready or (m.state == "up" and kind in ("kill", "stop")))
            and (m.replica or any(other is not m for other in eligible))
        ]
        if not choices:
            self.faults["put off (too few nodes up)"] += 1
            return False
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
            row = self.fault("kill", victim)
            process.kill()
            process.wait(10)  # reaped: the kernel has freed its locks
            row["until"] = time.time()
            victim.ended("killed")
            victim.state, victim.wake_at = "down", time.monotonic() + self.rng.uniform(0.5, 2.0)
            self.say(f"SIGKILL {what}; back in {victim.wake_at - time.monotonic():.1f}s")
        elif kind == "stop":
            row = self.fault("stop", victim)
            os.kill(pid, signal.SIGSTOP)
            row["writer"] = int(self.stopped(pid) and self.writer_holder() == pid)
            victim.state, victim.wake_at = "stopped", time.monotonic() + self.rng.uniform(0.5, 4.0)
            victim.frozen_by = row
            self.say(f"SIGSTOP {what}; SIGCONT in {victim.wake_at - time.monotonic():.1f}s"
                     + (" (it holds the writers' turn)" if row["writer"] else ""))
        else:
            victim.fault_row = self.fault(kind, victim)
            os.kill(pid, signal.SIGTERM)
            victim.state, victim.term_at = "terminating", time.monotonic()
            victim.then_restart = 0.0 if kind == "restart" else self.rng.uniform(0.5, 2.0)
            self.say(f"SIGTERM {what}{'; restart at once' if kind == 'restart' else ''}")
        return True

    def freeze(self) -> bool:
        """SIGSTOP the node in office for the stall limit + 3-4 s (a standby must take office from it
        within the stall limit + 2 s, and is held to + 3 s),
        while no node is stopped and another eligible one runs. Never while it holds the writers' turn:
        then every commit waits for it, and no standby can take office (nodeflow promises nothing
        there); so it is woken at once and stopped again a moment later, a few times."""
        assert self.nf is not None
        office = self.nf.scheduler()
        victim = next((m for m in self.members if office is not None and m.pid == office["pid"] and m.ready), None)
        standbys = [m for m in self.members if m.ready and not m.replica and m is not victim]
        writer = any(m.frozen_by is not None and m.frozen_by["writer"] for m in self.members)
        if office is None or victim is None or not standbys or writer:
            self.faults["freeze put off (no scheduler or standby ready)"] += 1
            return False
        pid = victim.pid
        for attempt in range(1, 6):  # noqa: B007 - the tries it took are reported
            at = time.time()
            os.kill(pid, signal.SIGSTOP)
            if self.stopped(pid) and self.writer_holder() != pid:
                break
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.02)
        else:
            self.faults["freeze put off (it held the writers' turn)"] += 1
            return False
        seconds = self.stall_after + self.rng.uniform(3.0, 4.0)  # past the bound checked: a standby must be in office
        row = self.fault("freeze", victim, at=at, epoch=office["epoch"], detail={"seconds": round(seconds, 2),
                                                                               "tries": attempt})
        self.faults["freeze"] += 1
        self.faults["of which the scheduler"] += 1
        victim.state, victim.wake_at, victim.frozen_by = "stopped", time.monotonic() + seconds, row
        self.no_faults_until = time.monotonic() + self.stall_after + 3.5
        self.say(f"FREEZE the scheduler {victim.node_id} (pid {pid}, epoch {office['epoch']}) for {seconds:.1f}s: "
                 f"a standby must take office within {self.stall_after + 2:g}s")
        return True

    @staticmethod
    def stopped(pid: int) -> bool:
        """Wait (a little) until every thread of ``pid`` has stopped after a SIGSTOP."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    state = stat.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return False
            if state in ("T", "t"):
                return True
            if state in ("Z", "X"):  # it ended (a planned exit not noticed yet)
                return False
            time.sleep(0.001)
        return False

    def writer_holder(self) -> int | None:
        """The pid holding the writers' turn (writer.lock) now, from /proc/locks; None if nobody."""
        assert self.nf is not None
        try:
            info = os.stat(os.path.join(self.nf.store.lock_dir, "writer.lock"))
        except OSError:
            return None
        key = (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)
        for _ in range(2):  # /proc/locks is no snapshot: a lock missing once is looked for again
            holder = (nodeflow._kernel_flock_owners() or {}).get(key)
            if holder is not None:
                return holder
        return None

    def tend(self, final: bool = False) -> None:
        """Carry out what is due (SIGCONT, restarts), and notice nodes that ended by themselves
        (a planned exit of the hostile mix is restarted as a killed node is, and is no crash)."""
        now = time.monotonic()
        for member in self.members:
            process = member.process
            if process is None:
                continue
            code = process.poll()
            if member.state in ("up", "stopped", "terminating") and code is not None and member.planned_exit(code):
                member.ended(f"planned exit {code}")
                self.fault("exit", member)
                self.faults["planned exits (restarted)"] += 1
                for row in (member.frozen_by, member.fault_row):
                    if row is not None:
                        row["until"] = time.time()
                member.fault_row = None
                back = member.then_restart if member.state == "terminating" else self.exit_rng.uniform(0.3, 1.0)
                member.state, member.wake_at, member.frozen_by = "down", now + back, None
                self.say(f"{member.node_id} (pid {member.pid}) ended itself on purpose; back in {back:.1f}s")
            elif member.state in ("up", "stopped") and code is not None:
                member.ended(f"exit {code}")
                self.fault("crash", member)
                self.observe(f"node {member.node_id} (pid {member.pid}, life {member.lives}) exited by itself with "
                             f"code {code} during {self.phase}:\n{member.tail()}")
                member.state, member.wake_at = "down", now
            elif member.state == "terminating" and code is not None:
                member.ended(f"exit {code} after SIGTERM")
                if member.fault_row is not None:
                    member.fault_row["until"] = time.time()
                    member.fault_row = None
                if code != 0:
                    self.observe(f"node {member.node_id} (pid {member.pid}) exited {code} after SIGTERM:\n"
                                 f"{member.tail()}")
                member.state, member.wake_at = "down", now + member.then_restart
            elif member.state == "terminating" and now - member.term_at > TERM_BOUND:
                self.observe(f"node {member.node_id} (pid {member.pid}) still running {TERM_BOUND:.0f} s after "
                             f"SIGTERM; killed:\n{member.tail()}")
                process.kill()
                process.wait(10)
                member.ended("killed: hung after SIGTERM")
                member.state, member.wake_at = "down", now
            if member.state == "stopped" and (final or (member.wake_at is not None and now >= member.wake_at)):
                os.kill(member.pid, signal.SIGCONT)
                if member.frozen_by is not None:
                    member.frozen_by["until"] = time.time()
                    if member.frozen_by["kind"] == "freeze" and self.nf is not None:
                        epoch = self.nf.store.read(
                            lambda conn: conn.execute("SELECT epoch FROM election WHERE id = 1").fetchone()[0]
                        )
                        self.faults["freezes replaced"] += epoch > member.frozen_by["epoch"]
                member.state, member.wake_at, member.frozen_by = "up", None, None
            if member.state == "down" and (final or (member.wake_at is not None and now >= member.wake_at)):
                member.start()
                self.say(f"started {member.node_id} again (pid {member.pid}, life {member.lives})")
            if member.state == "up":
                _ = member.ready  # notes when the life became ready (chaos_lives)

    # The phases -------------------------------------------------------------------------------

    def chaos(self) -> None:
        self.phase = "the chaos"
        end = self.chaos_end = time.monotonic() + self.options.seconds
        every = (1.0 / self.options.faults, 3.0 / self.options.faults)  # seconds between faults
        next_fault = time.monotonic() + self.rng.uniform(*every)
        while time.monotonic() < end:
            self.tend()
            if time.monotonic() >= max(next_fault, self.no_faults_until):  # none while a freeze is judged
                done = self.inject()
                next_fault = time.monotonic() + (self.rng.uniform(*every) if done else 0.5)
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
                member.ended("killed at the end")

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
            + (f" --faults {options.faults:g}" if options.faults != 1 else "") \
            + (f" --hostile {options.hostile:g}" if options.hostile != 1 else "") \
            + (f" --stall-after {options.stall_after}" if options.stall_after != STALL_AFTER else "")
    print(f"chaos seed {chaos.seed} (rerun: {rerun})", file=out, flush=True)
    settled = False
    try:
        chaos.setup()
        chaos.start_workload()
        chaos.chaos()
        settled = chaos.settle()
        chaos.stop_nodes()
        chaos.kill_all()
        chaos.save_records()
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
    parser.add_argument("--hostile", type=float, default=1.0,
                        help="the hostile mix (poison, exiting calls, blocking handlers, undecodable messages, "
                             "scheduler freezes): a multiplier; 0 turns it off (default 1)")
    parser.add_argument("--stall-after", default=STALL_AFTER,
                        help=f"the nodes' --stall-after (default {STALL_AFTER})")
    parser.add_argument("--settle", type=float, default=60.0, help="bound on settling afterwards (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random choices (default: random)")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR (new or empty) and keep it")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    options = parser.parse_args(argv)
    if options.nodes < 2 or not 0 <= options.replicas < options.nodes:
        parser.error("give at least 2 nodes, of which at least one not a replica")
    if not 0 < options.rate <= 20 or not 0 < options.faults <= 20 or options.seconds <= 0 or options.settle <= 0:
        parser.error("--rate, --faults, --seconds and --settle must be more than zero (--rate and --faults at most 20)")
    if not 0 <= options.hostile <= 20:
        parser.error("--hostile must be from 0 (off) to 20")
    try:
        if nodeflow.parse_duration(options.stall_after) < 2:
            parser.error("--stall-after must be at least 2s (twice the nodes' heartbeat)")
    except nodeflow.InvalidInput as error:
        parser.error(f"--stall-after: {error}")
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
