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
   The workflow features, seeded too (about 1.5 instances a second more): *kept signals* (signals
   with a token in their input, sent before any instance waits for their name, then 1-5 chaos-kept
   instances at once that wait for it: as many, fewer, or more racing for them; now and then first
   one with a ttl of 1 s that must expire unused, and a ``prune`` racing the waiters); *start keys*
   (one key from 2-3 threads and 0-2 ``start --key`` processes at once, each with its own input;
   later starts with an older key, and one with another definition, which must be refused);
   *child instances* (chaos-parent runs
   chaos-child -- work, call, timer, a signal answered later -- and takes its variables: mode ok;
   timed, a run with a timeout that the child's answer beats or not; doom, a child that fails on
   purpose so the parent faults at its run; cancel, a parent cancelled while its child runs); and
   *timed waits* (chaos-timed waits 1.5 s for a signal that comes 0.1-3.5 s after the wait is seen:
   resumed in time, or late and then kept, ttl 10m, or dropped, ttl 0). Each start is recorded,
   each kept signal and answer with its token and outcome (kinds kept, answer, keyed).
   The branches, seeded too (an instance every 2 s, times --rate; the first four one of each):
   chaos-fan, a ``parallel`` joining all of three branches (io work then a call; a timer; a signal
   the driver answers 0.1-1 s after it sees the branch wait, then a ``for_each`` in turn over 1-3
   items nested in that branch, each calling); chaos-race, a ``parallel`` with join ``any`` of a
   quick branch, a slow one (a tie of two 300 ms timers, or a sure loss) and one that runs a
   chaos-sleeper child, which must be cancelled when the race is won; chaos-each, a ``for_each``
   in parallel over 3-8 items (a call and a count each); chaos-turn, a ``for_each`` in turn over
   2-4 items (a set, a timer, a call each). Branch calls record their effect like the others,
   under ``current_call().key`` (``instance:branch:N``) and with their branch.
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
   invariant with the count checked and the violations, then each violation's evidence. Those of
   the workflow features: each kept signal resumed at most one instance (its token in one instance's
   signal result at most), one that waited for its name and took it while it was live; one taken is
   gone from ``kept_signals``, one not taken is still there, and no wait began while one was there
   without taking it. Each start key started one instance (one row), every start with it got that
   id, one was told "new" (and its input is the instance's), another definition's was refused.
   Every child ended before its parent went on (a completed child's variables are its parent's
   result; a faulted child faulted the parent at its run), or was cancelled in the very commit of
   its parent's cancel or timeout; a cancelled parent left no child running or waiting. A timed
   wait (signal or run) ended one way only -- received or timed out, never both, never neither,
   never early -- and the way is what happened (an answer that resumed it: received, with its
   token; a timed-out run's child cancelled; an answer committed before the due time found it).
   The existing checks know the new paths: on_timeout branches, run waits, children cancelled
   before their first step, and the effects of a burst a cancel cut short.
   Those of the branches: each path of an instance (its main path, each branch, by the journal's
   ``branch``) follows the definition's chain from its start (a branch: its fork's ``branches[i]``
   or the for_each ``body``); every branch of a join-all fork (every item: none missing) ended
   before the join row; a for_each in turn ran item i after item i-1's last step; a join any names
   a winner that ended first, and no branch it removed took a step after it but the one each had
   running then (its child cancelled by that commit). Two bursts of an instance never overlap, nor
   two steps of one branch within a burst (steps of different branches of one burst may). No
   (branch, activity) step or call committed twice; a completed instance committed exactly the
   calls its branches make (every item's once; each with its effect, keyed by branch) and its
   variables are what its branches made (a count per item equals the items, a race has one winner,
   the one its join names; a for_each in turn's last item set ``last``).
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
    "again TEXT NOT NULL, branch TEXT)",
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


RETRY_DELAY_MAX = 60.0  # a node's longest wait before delivering a failed job again (serve's nack backoff)


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
            "charge": {
                "type": "call",
                "function": "effect",
                "retry": {"attempts": 3, "delay": "500ms"},
                "next": "check",
            },
            "check": {
                "type": "if",
                "condition": {"var": "input.doom", "op": "==", "value": True},
                "then": "doomed",
                "else": "go",
            },
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

# The definitions of the workflow features (kept signals, start keys, child instances, timed waits):
# defined once, at version 1 (the redefines above keep to chaos-a and chaos-b).
TIMED_TIMEOUT = "1500ms"  # chaos-timed's signal wait: the driver answers 0.1-3.5 s after it sees the wait
CHILD_TIMEOUT = "8s"  # chaos-parent's timed run: its child's answer comes 0.1-0.6 s or 9-10 s after it waits
KEPT_TTL = "10m"  # a kept signal of the run outlives it (one with ttl EXPIRING_TTL is meant to expire first)
EXPIRING_TTL = "1s"


def definition_kept() -> dict[str, Any]:
    """Waits for signal ``input.name``, which the driver sent (and nodeflow kept) before it started this."""
    return {
        "id": "chaos-kept",
        "name": "Chaos kept-signal waiter",
        "start": "hello",
        "activities": {
            "hello": {"type": "log", "message": "waiter {input.n} for {input.name}", "next": "wait"},
            "wait": {"type": "signal", "name": "{input.name}", "result": "got", "next": "bye"},
            "bye": {"type": "log", "message": "waiter {input.n} resumed"},
        },
    }


def definition_timed() -> dict[str, Any]:
    """A signal wait with a timeout that the driver's answer sometimes beats: thanks, or late."""
    return {
        "id": "chaos-timed",
        "name": "Chaos timed wait",
        "start": "hello",
        "activities": {
            "hello": {"type": "log", "message": "timed {input.n}", "next": "ask"},
            "ask": {
                "type": "signal",
                "name": "{input.name}",
                "result": "answer",
                "timeout": TIMED_TIMEOUT,
                "on_timeout": "late",
                "next": "thanks",
            },
            "thanks": {"type": "log", "message": "timed {input.n}: answered"},
            "late": {"type": "log", "message": "timed {input.n}: no answer in time"},
        },
    }


def definition_keyed() -> dict[str, Any]:
    """Started with a key, by several threads and processes at once: one instance per key."""
    return {
        "id": "chaos-keyed",
        "name": "Chaos keyed start",
        "start": "hello",
        "activities": {
            "hello": {"type": "log", "message": "keyed {input.key} (call {input.call})", "next": "charge"},
            "charge": {"type": "call", "function": "effect", "next": "bye"},
            "bye": {"type": "log", "message": "keyed {input.key} done"},
        },
    }


def definition_parent() -> dict[str, Any]:
    """Runs a chaos-child and takes its variables (in ``child``); mode timed: a run with a timeout
    that goes on to ``late`` (its child cancelled); mode doom: the child fails, so the parent faults
    at its run; mode cancel: the driver cancels it while its child runs (the child is cancelled too)."""
    given = {"n": "{input.n}", "doom": "{input.doom}", "hold": "{input.hold}", "delay": "{input.delay}"}
    return {
        "id": "chaos-parent",
        "name": "Chaos parent",
        "start": "hello",
        "activities": {
            "hello": {"type": "log", "message": "parent {input.n} ({input.mode})", "next": "pick"},
            "pick": {
                "type": "if",
                "condition": {"var": "input.mode", "op": "==", "value": "timed"},
                "then": "run-timed",
                "else": "run",
            },
            "run": {"type": "run", "definition": "chaos-child", "input": given, "result": "child", "next": "after"},
            "run-timed": {
                "type": "run",
                "definition": "chaos-child",
                "input": given,
                "result": "child",
                "timeout": CHILD_TIMEOUT,
                "on_timeout": "late",
                "next": "after",
            },
            "after": {"type": "log", "message": "parent {input.n}: {child.done}"},
            "late": {"type": "log", "message": "parent {input.n} gave up on its child"},
        },
    }


def definition_child() -> dict[str, Any]:
    """work, call, timer, then fail (doom) or wait for signal child-N (answered after input.delay
    seconds; never, with input.hold: its parent is cancelled meanwhile), and set ``done``."""
    return {
        "id": "chaos-child",
        "name": "Chaos child",
        "start": "hello",
        "activities": {
            "hello": {"type": "log", "message": "child {input.n}", "next": "work"},
            "work": {"type": "work", "duration": "150ms", "next": "charge"},
            "charge": {"type": "call", "function": "effect", "next": "nap"},
            "nap": {"type": "timer", "duration": "500ms", "next": "check"},
            "check": {
                "type": "if",
                "condition": {"var": "input.doom", "op": "==", "value": True},
                "then": "doomed",
                "else": "ask",
            },
            "doomed": {"type": "fail", "message": "doomed child {input.n} on purpose"},
            "ask": {"type": "signal", "name": "child-{input.n}", "result": "answer", "next": "done"},
            "done": {"type": "set", "values": {"done": "child {input.n} done"}},
        },
    }


# The branches: parallel (join all, join any) and for_each (in parallel, in turn, nested in a branch).
# Defined once, at version 1, like the features above.
RACE_NAMES = {"race/0": "quick", "race/1": "slow", "race/2": "never"}  # chaos-race's branches, by name


def definition_fan() -> dict[str, Any]:
    """A parallel, join all, of three branches: io work then a call; a timer; a signal (answered by
    the driver) then a for_each in turn over ``input.items`` whose body calls and counts (a for_each
    nested in a branch). Each branch adds 1 to ``done``; after the join ``total`` is ``done``: 3."""
    return {
        "id": "chaos-fan",
        "name": "Chaos parallel, join all",
        "start": "hello",
        "activities": {
            "hello": {"type": "log", "message": "fan {input.n}", "next": "fan"},
            "fan": {"type": "parallel", "branches": ["f-work", "f-nap", "f-ask"], "next": "f-sum"},
            "f-work": {"type": "work", "duration": "100ms", "next": "f-call"},
            "f-call": {"type": "call", "function": "effect", "result": "fcall", "next": "f-work-done"},
            "f-work-done": {"type": "set", "add": {"done": 1}},
            "f-nap": {"type": "timer", "duration": "300ms", "next": "f-nap-done"},
            "f-nap-done": {"type": "set", "add": {"done": 1}},
            "f-ask": {"type": "signal", "name": "fan-{input.n}", "result": "answer", "next": "f-nest"},
            "f-nest": {
                "type": "for_each",
                "items": "{input.items}",
                "as": "item",
                "body": "f-item-call",
                "next": "f-ask-done",
            },
            "f-item-call": {"type": "call", "function": "effect", "next": "f-item-set"},
            "f-item-set": {"type": "set", "add": {"items": 1}},
            "f-ask-done": {"type": "set", "add": {"done": 1}},
            "f-sum": {"type": "set", "values": {"total": "{done}"}, "next": "bye"},
            "bye": {"type": "log", "message": "fan {input.n}: {total} branches, {items} items"},
        },
    }


def definition_race() -> dict[str, Any]:
    """A parallel, join any: quick (a 300 ms timer, a call), slow (the same, or a 1.5 s timer with
    ``input.lag``: a tie or a sure loss) and never (runs a chaos-sleeper, which waits 10 minutes:
    cancelled when another branch wins). The winner sets ``winner`` and adds 1 to ``wins``."""
    return {
        "id": "chaos-race",
        "name": "Chaos parallel, join any",
        "start": "hello",
        "activities": {
            "hello": {"type": "log", "message": "race {input.n}", "next": "race"},
            "race": {"type": "parallel", "branches": ["q-nap", "s-pick", "n-run"], "join": "any", "next": "bye"},
            "q-nap": {"type": "timer", "duration": "300ms", "next": "q-call"},
            "q-call": {"type": "call", "function": "effect", "next": "q-done"},
            "q-done": {"type": "set", "values": {"winner": "quick"}, "add": {"wins": 1}},
            "s-pick": {
                "type": "if",
                "condition": {"var": "input.lag", "op": "==", "value": True},
                "then": "s-lag",
                "else": "s-nap",
            },
            "s-lag": {"type": "timer", "duration": "1500ms", "next": "s-call"},
            "s-nap": {"type": "timer", "duration": "300ms", "next": "s-call"},
            "s-call": {"type": "call", "function": "effect", "next": "s-done"},
            "s-done": {"type": "set", "values": {"winner": "slow"}, "add": {"wins": 1}},
            "n-run": {
                "type": "run",
                "definition": "chaos-sleeper",
                "input": {"n": "{input.n}"},
                "result": "slept",
                "next": "n-done",
            },
            "n-done": {"type": "set", "values": {"winner": "never"}, "add": {"wins": 1}},
            "bye": {"type": "log", "message": "race {input.n}: {winner} won"},
        },
    }


def definition_sleeper() -> dict[str, Any]:
    """chaos-race's never branch runs it: it waits 10 minutes, and is cancelled when the race is won."""
    return {
        "id": "chaos-sleeper",
        "name": "Chaos sleeper",
        "start": "hello",
        "activities": {
            "hello": {"type": "log", "message": "sleeper {input.n}", "next": "nap"},
            "nap": {"type": "timer", "duration": "10m", "next": "bye"},
            "bye": {"type": "log", "message": "sleeper {input.n} woke: nobody cancelled it"},
        },
    }


def definition_each() -> dict[str, Any]:
    """A for_each in parallel over ``input.items`` (3-8): each item calls, then adds 1 to ``count``."""
    return {
        "id": "chaos-each",
        "name": "Chaos for_each in parallel",
        "start": "hello",
        "activities": {
            "hello": {"type": "log", "message": "each {input.n}", "next": "each"},
            "each": {
                "type": "for_each",
                "items": "{input.items}",
                "as": "item",
                "body": "e-call",
                "parallel": True,
                "next": "bye",
            },
            "e-call": {"type": "call", "function": "effect", "next": "e-set"},
            "e-set": {"type": "set", "add": {"count": 1}},
            "bye": {"type": "log", "message": "each {input.n}: {count} items"},
        },
    }


def definition_turn() -> dict[str, Any]:
    """A for_each in turn over ``input.items`` (2-4): each item adds 1 to ``turns`` and sets ``last``
    to itself, waits 100 ms, then calls: ``last`` ends as the last item."""
    return {
        "id": "chaos-turn",
        "name": "Chaos for_each in turn",
        "start": "hello",
        "activities": {
            "hello": {"type": "log", "message": "turn {input.n}", "next": "turn"},
            "turn": {"type": "for_each", "items": "{input.items}", "as": "item", "body": "t-set", "next": "bye"},
            "t-set": {"type": "set", "values": {"last": "{item}"}, "add": {"turns": 1}, "next": "t-nap"},
            "t-nap": {"type": "timer", "duration": "100ms", "next": "t-call"},
            "t-call": {"type": "call", "function": "effect"},
            "bye": {"type": "log", "message": "turn {input.n}: {turns} items, the last {last}"},
        },
    }


FIXED_DEFINITIONS: dict[str, Callable[[], dict[str, Any]]] = {
    "chaos-kept": definition_kept,
    "chaos-timed": definition_timed,
    "chaos-keyed": definition_keyed,
    "chaos-child": definition_child,  # before chaos-parent, which runs it
    "chaos-parent": definition_parent,
    "chaos-fan": definition_fan,
    "chaos-sleeper": definition_sleeper,  # before chaos-race, which runs it
    "chaos-race": definition_race,
    "chaos-each": definition_each,
    "chaos-turn": definition_turn,
}
BRANCHY = ("chaos-fan", "chaos-race", "chaos-each", "chaos-turn")  # the definitions with branches


def child_doom_message(n: Any) -> str:
    return f"doomed child {n} on purpose"


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
    ("steps", "no step committed twice (journal 0..n-1 on the definition's path, each branch on its chain)"),
    ("overlap", "no two steps of an instance overlap in time (with branches: no two bursts, no two of a branch)"),
    ("fences", "fences rise between bursts, steady within one"),
    ("wf-timers", "every workflow timer elapsed once, not early"),
    ("kept", "each kept signal resumed at most one instance, a waiter of its name"),
    ("keys", "each start key started one instance; every start with it got its id"),
    ("children", "every child ended before its parent went on; a parent's result is its child's"),
    ("timed-waits", "a timed wait ended one way only, the way that happened"),
    ("branch-once", "each branch step and call committed once, every item's call too"),
    ("branch-vars", "an instance's variables are what its branches' sets and calls made"),
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
        row[0]: row for row in conn.execute("SELECT key, queue, message, node, at, count, again FROM chaos_received")
    }
    dead: dict[str, list[tuple[Any, ...]]] = defaultdict(list)  # queue -> dead letters
    for row in conn.execute("SELECT id, queue, body, attempts, died, last_error FROM dead_letters"):
        dead[row[1]].append(row)
    left = conn.execute(
        "SELECT queue, count(*) FROM messages GROUP BY queue HAVING queue LIKE 'chaos.%' OR queue = ?",
        (nodeflow.WORKFLOW_QUEUE,),
    ).fetchall()

    undecodable = {int(detail["message"]): key for key, _, detail in sent["undecodable"] if "message" in detail}
    _check_workflows(conn, found, figures, sent, at_of, dead, undecodable, meta)
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
            found["crashes"].fail(f"{os.path.basename(path)} logged a traceback:\n{text[max(0, at - 300) : at + 1500]}")
    figures["node logs"] = dict(said)
    return figures


# Workflows ------------------------------------------------------------------------------------

# How the journal tells of waits: a signal wait begun (with its due time when it has a timeout, and
# whether a kept signal ended it at once), a run activity's child started, and how a wait ended.
WAITING_FOR = re.compile(r"^waiting for signal (.+?)(?: until (\S+?))?(: it was sent at \S+ and kept; resumed)?$")
RUN_STARTED = re.compile(r"^started (\S+) v(\d+)(?:, waiting until (\S+))?: instance ([0-9a-f]+)$")
TIMED_OUT = "timed out after "
KEPT_TOKEN = re.compile(r"^ks\d+\.(?:\d+|x)$")
# How the journal tells of branches: a fork (parallel, for_each) and its join.
FORKS = ("parallel", "for_each")
FORKED = re.compile(r"^forked (\d+) branch\(es\): (.*) \(join (all|any)\)$")
ITEMS = re.compile(r"^(\d+) item\(s\), (in parallel|in turn)$")
JOINED_ALL = re.compile(r"^joined: all (\d+) branch\(es\) ended$")
JOINED_ANY = re.compile(r"^joined: branch (\S+) ended first(?:; (\d+) cancelled)?$")


def _meant_end(
    workflow: str,
    given: dict[str, Any],
    status: str,
    error: str | None,
    rows: list[tuple[Any, ...]],
    parent: tuple[Any, ...] | None,
) -> tuple[str | None, str]:
    """How an instance was meant to end, by its input (and its parent's): the figure's label when it
    ended so, else None; and what was meant, for the evidence."""
    last = rows[-1] if rows else None
    cancelled = status == "cancelled" and last is not None and last[2] == "cancel"
    if workflow == "chaos-parent":
        mode = given.get("mode")
        if mode == "doom":
            why = f"it ran was faulted: {child_doom_message(given.get('n'))}"
            ok = (
                status == "faulted"
                and (error or "").endswith(why)
                and last is not None
                and last[2] == "run"
                and (last[7].startswith("faulted: instance "))
            )
            return ("faulted on purpose (its child failed)" if ok else None), "faulted at its run (its child failed)"
        if mode == "cancel":
            return ("cancelled on purpose (a parent)" if cancelled else None), "cancelled while its child ran"
        return ("completed" if status == "completed" else None), "completed"
    if workflow == "chaos-child":
        if parent is None:
            return None, "the child of an instance in the database"
        mode = (_loads(parent[5]) or {}).get("input", {}).get("mode")
        if mode == "doom":
            ok = (
                status == "faulted"
                and error == child_doom_message(given.get("n"))
                and last is not None
                and (last[2] == "fail")
            )
            return ("faulted on purpose (a child)" if ok else None), "faulted at its fail step"
        if mode == "cancel":
            ok = cancelled and f"its parent {parent[0]} was cancelled" in last[7]  # type: ignore[index]
            return ("cancelled with its parent (a child)" if ok else None), "cancelled with its parent"
        if mode == "timed" and cancelled and f"its parent {parent[0]} stopped waiting for it" in last[7]:  # type: ignore[index]
            return "cancelled: its parent stopped waiting (a child)", "completed, or cancelled by its parent's timeout"
        return ("completed" if status == "completed" else None), "completed"
    if workflow == "chaos-sleeper":  # a chaos-race's never branch ran it: cancelled when the race was won
        ok = cancelled and parent is not None and f"its parent {parent[0]} stopped waiting for it" in last[7]  # type: ignore[index]
        return ("cancelled: its race was won (a sleeper)" if ok else None), "cancelled when its parent's race was won"
    if workflow in FIXED_DEFINITIONS:
        return ("completed" if status == "completed" else None), "completed"
    # chaos-a and chaos-b: the fail branch; a call that ends its process every time (it faults once
    # its run message has had its deliveries); cancelled on purpose (the hostile mix).
    doomed, exits, cancels = given.get("doom") is True, given.get("hostile") == "exit", given.get("cancel") is True
    if doomed and status == "faulted" and error == doom_message(given.get("n")) and last and last[2] == "fail":
        return "faulted on purpose", ""
    if (exits and status == "faulted" and (error or "").startswith(BURST_FAULT) and last
            and last[7].startswith(f"faulted: {BURST_FAULT}")):  # fmt: skip
        return "faulted on purpose (its call exits)", ""
    if cancels and cancelled:
        return "cancelled on purpose", ""
    if not (doomed or exits or cancels) and status == "completed":
        return "completed", ""
    meant = (
        "faulted at its fail step" if doomed else
        "faulted with no burst finished (its call exits)" if exits else
        "cancelled" if cancels else "completed"
    )  # fmt: skip
    return None, meant


def _check_workflows(
    conn: sqlite3.Connection,
    found: dict[str, Invariant],
    figures: dict[str, Any],
    sent: dict[str, list[tuple[str, str, Any]]],
    at_of: dict[str, float],
    dead: dict[str, list[tuple[Any, ...]]],
    undecodable: dict[int, str],
    meta: dict[str, Any] | None = None,
) -> None:
    definitions = {
        (workflow, version): json.loads(body)
        for workflow, version, body in conn.execute("SELECT id, version, body FROM definitions")
    }
    columns = _columns(conn, "instances")
    extra = ", ".join(column if column in columns else "NULL" for column in ("parent", "start_key", "updated", "ended"))
    instances = {
        row[0]: row
        for row in conn.execute(
            f"SELECT id, definition, version, status, error, variables, steps, fence, started_by, {extra} "
            "FROM instances"
        )
    }  # rows: (id, definition, version, status, error, variables, steps, fence, started_by, parent, start_key, ...)
    # Journal rows: (step, activity, type, node, fence, started, ended, outcome, branch); branch None
    # on the main path.
    branch = "branch" if "branch" in _columns(conn, "journal") else "NULL"
    journals: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for instance, *row in conn.execute(
        f"SELECT instance, step, activity, type, node, fence, started, ended, outcome, {branch} FROM journal "
        "ORDER BY instance, step"
    ):
        journals[instance].append(tuple(row))
    branch = "branch" if "branch" in _columns(conn, "chaos_effects") else "NULL"
    effects = {
        row[0]: row
        for row in conn.execute(
            f"SELECT key, instance, activity, step, fence, node, runs, again, {branch} FROM chaos_effects"
        )
    }

    statuses: Counter[str] = Counter()
    by_version: Counter[str] = Counter()
    committed_calls: set[str] = set()
    removed_of: dict[str, dict[str, tuple[Any, ...]]] = {}  # instance -> branch a join any removed -> the join row
    tally: Counter[str] = Counter()  # figures of the branches
    for instance, (_, workflow, version, status, error, variables, steps, fence, _by, parent, *_) in instances.items():
        rows = journals.get(instance, [])
        data = _loads(variables) or {}
        given = data.get("input") if isinstance(data.get("input"), dict) else {}
        where = f"instance {instance} ({workflow} v{version}, input {json.dumps(given)}, {status}"
        where += f", error {error!r})" if error else ")"
        evidence = f"{where}; journal:\n{_rows_text(rows)}"
        by_version[f"{workflow} v{version}"] += 1

        # Completed, or faulted on purpose (the fail branch; a call that ends its process every time,
        # until the run message has had its deliveries; a child that failed on purpose), or cancelled
        # on purpose (a parent, a child with it) -- nothing else.
        found["instances"].checked += 1
        parent_row = instances.get(parent) if parent is not None else None
        label, meant = _meant_end(workflow, given, status, error, rows, parent_row)
        if label is not None:
            statuses[label] += 1
        else:
            statuses[f"{status} (not meant)"] += 1
            found["instances"].fail(f"meant to end {meant}: {evidence}")

        body = definitions.get((workflow, version))
        if body is None:
            found["steps"].fail(f"no definition {workflow} v{version}: {evidence}")
            continue
        removed = removed_of[instance] = _check_journal(
            found, instance, status, steps, fence, body, rows, evidence, tally
        )
        branched = any(row[8] for row in rows) or workflow in BRANCHY
        calls: set[str] = set()  # this instance's committed call keys
        on_path: dict[str | None, list[int]] = defaultdict(list)  # branch (None: the main path) -> its rows' indexes
        for index, (step, activity, kind, _node, _fence, _started, _ended, outcome, branch) in enumerate(rows):
            own = on_path[branch]
            own.append(index)
            if kind == "call" and outcome.startswith("called "):
                # The key is the call's first try's step on its path (the journal step on the main
                # path of an instance without branches; a branch counts its own steps): the tries
                # that failed before it (journaled "error (try N ...") share it.
                first = len(own) - 1
                while (
                    first > 0
                    and rows[own[first - 1]][1] == activity
                    and (rows[own[first - 1]][7].startswith("error (try "))
                ):
                    first -= 1
                key = f"{instance}:{branch}:{first}" if branch else f"{instance}:{first}"
                if key in calls:
                    found["branch-once" if branched else "steps"].fail(
                        f"step {step} ({activity}{f' on {branch}' if branch else ''}) is a second committed call "
                        f"with key {key}: {evidence}"
                    )
                calls.add(key)
                committed_calls.add(key)
                found["effects"].checked += 1
                effect = effects.get(key)
                if effect is None:
                    found["effects"].fail(
                        f"step {step} ({activity}{f' on {branch}' if branch else ''}) committed, its call's effect "
                        f"(key {key}) never recorded: {evidence}"
                    )
                elif branched and (effect[1], effect[2], effect[8]) != (instance, activity, branch):
                    # A lost burst run again may number the steps of its branches otherwise: the key
                    # (the step on the branch) holds, the journal step may not.
                    found["effects"].fail(
                        f"step {step} ({activity} on {branch})'s effect {key} was recorded for "
                        f"{(effect[1], effect[2], effect[8])}: {evidence}"
                    )
                elif not branched and (effect[1], effect[2], effect[3]) != (instance, activity, step):
                    found["effects"].fail(
                        f"step {step} ({activity})'s effect was recorded for {effect[1:4]}: {evidence}"
                    )
        if branched:
            _check_branch_once(found["branch-once"], instance, workflow, status, data, rows, calls, removed, evidence)
            _check_branch_vars(found["branch-vars"], instance, workflow, status, data, rows, evidence, tally)

    cut_short = raced = 0
    for key, (_, instance, activity, step, fence, node, runs, again, branch) in effects.items():
        if key in committed_calls:
            continue
        rows = journals.get(instance, [])
        row = instances.get(instance)
        taken = sum(1 for entry in rows if entry[8] == branch) if branch else 0
        if row is not None and row[3] == "cancelled" and rows and rows[-1][2] == "cancel" and step >= rows[-1][0]:
            cut_short += 1  # its burst was under way when the instance was cancelled: it committed nothing
        elif (
            branch
            and branch in removed_of.get(instance, {})
            and key == f"{instance}:{branch}:{key.rsplit(':', 1)[-1]}"
            and key.rsplit(":", 1)[-1].isdigit()
            and int(key.rsplit(":", 1)[-1]) >= taken
        ):
            # A join any removed its branch: a burst lost before it committed ran the call, and the
            # burst run again had the race won before the branch got there.
            raced = raced + 1
        else:
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
        "of bursts a cancel cut short": cut_short,
        "of branches a join any removed (a lost burst ran them)": raced,
    }
    figures["branches"] = dict(sorted(tally.items()))
    figures["definitions"] = {
        workflow: max(version for (other, version) in definitions if other == workflow)
        for workflow in sorted({workflow for workflow, _ in definitions})
    }
    ended = float((meta or {}).get("ended") or time.time())
    flows = Flows(definitions, instances, journals, sent, ended, removed=removed_of)
    _check_features(conn, found, figures, flows)


def _wait_end(kind: str, began: str, ended: str) -> str | None:
    """How the row ``ended`` ended the wait that the row ``began`` began at a timer, signal or run
    activity: elapsed, received, completed (its child) or timed out; None if it is no end of it."""
    if kind == "timer":
        return "elapsed" if ended == "timer elapsed" else None
    if kind == "signal":
        if ended == "signal received":
            return "received"
        return "timed out" if ended.startswith(TIMED_OUT) and " waiting for signal " in ended else None
    started = RUN_STARTED.match(began)
    child = started.group(4) if started else None
    if child is None:
        return None
    if ended == f"instance {child} completed":
        return "completed"
    return (
        "timed out"
        if ended.startswith(TIMED_OUT) and f" waiting for instance {child}, now cancelled" in ended
        else None
    )


def _check_journal(
    found: dict[str, Invariant],
    instance: str,
    status: str,
    steps: int,
    fence: int,
    body: dict[str, Any],
    rows: list[tuple[Any, ...]],
    evidence: str,
    tally: Counter[str] | None = None,
) -> dict[str, tuple[Any, ...]]:
    """The journal's invariants (steps, overlap, fences, wf-timers). Returns the branches that a join
    any removed (and the branches they forked), each with the join row that removed it."""
    activities: dict[str, Any] = body["activities"]

    # Steps 0..n-1, as many as the instance counts, along the definition's path: each activity once,
    # but a wait (a "waiting" row, then one that resumed) and a call's failed tries.
    found["steps"].checked += len(rows)
    if [row[0] for row in rows] != list(range(len(rows))):
        found["steps"].fail(f"steps are not 0..{len(rows) - 1}: {evidence}")
    if steps != len(rows):
        found["steps"].fail(f"the instance counts {steps} steps, its journal has {len(rows)}: {evidence}")
    removed: dict[str, tuple[Any, ...]] = {}
    has_branches = any(row[8] for row in rows)
    if has_branches or any(spec.get("type") in FORKS for spec in activities.values()):
        removed = _check_branches(found["steps"], status, body, rows, evidence, tally)
    else:
        _check_path(found, status, body, rows, evidence)
    if has_branches:
        _check_burst_overlap(found["overlap"], rows, evidence)
    else:
        _check_steps_overlap(found["overlap"], rows, evidence)
    _check_fences(found["fences"], fence, rows, evidence)
    _check_wf_timers(found["wf-timers"], status, activities, rows, removed, evidence)
    return removed


def _check_path(
    found: dict[str, Invariant], status: str, body: dict[str, Any], rows: list[tuple[Any, ...]], evidence: str
) -> None:
    """The one path of an instance without branches: along the definition's chain from its start."""
    activities: dict[str, Any] = body["activities"]
    # A cancel row (type "cancel", at the activity where it stood) or a row that faulted the instance
    # ("faulted: ...", at any activity) ends the path, and must be the last row.
    position: str | None = body["start"]
    index = 0
    while index < len(rows):
        step, activity, kind, _node, _fence, _started, _ended, outcome, _branch = rows[index]
        if position in ("(faulted)", "(cancelled)"):
            found["steps"].fail(f"step {step} follows the end of the instance ({position}): {evidence}")
            break
        if kind == "cancel":  # "(start)": cancelled before its first burst committed
            if activity != (position or "(start)") and not (index == 0 and activity == "(start)"):
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
        if (kind in ("timer", "signal") and outcome.startswith("waiting")) or (
            kind == "run" and outcome.startswith("started ")
        ):
            resumed = rows[index + 1] if index + 1 < len(rows) else None
            if resumed is not None and (resumed[2] == "cancel" or resumed[7].startswith("faulted: ")):
                index += 1  # it ended while waiting (a child that did not complete faults it): the next row says how
                continue
            way = _wait_end(kind, outcome, resumed[7]) if resumed is not None and resumed[1] == activity else None
            if way is None:
                found["steps"].fail(f"step {step} waits at {activity}; the next step is not its end: {evidence}")
                break
            if way == "timed out" and (
                spec.get("on_timeout") is None or not resumed[7].endswith(f": on to {spec['on_timeout']}")
            ):
                found["steps"].fail(
                    f"step {step + 1} times out at {activity} to {resumed[7].rsplit(' ', 1)[-1]}, its "
                    f"on_timeout is {spec.get('on_timeout')}: {evidence}"
                )
                break
            index += 2
            position = spec.get("on_timeout") if way == "timed out" else spec.get("next")
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
            found["steps"].fail(
                f"{status}, and the journal {'ends' if position == '(cancelled)' else 'does not end'} "
                f"with a cancel: {evidence}"
            )


@dataclasses.dataclass
class _Path:
    """One path of an instance's journal, its main path (name None) or a branch, read along the
    definition's chain from its start."""

    name: str | None
    rows: list[tuple[Any, ...]]
    end: str = "open"  # ended (its chain ran out), faulted, cancelled, broken (a violation shown), open
    at: str | None = None  # where an open path stands: a wait, a fork waiting for its branches, or between steps
    forks: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the forks it made, in order

    def shown(self) -> str:
        return self.name or "the main path"


def _walk(path: _Path, start: str | None, activities: dict[str, Any], fail: Callable[[str], None]) -> None:
    """Follow ``path``'s rows along the definition from ``start``: each row the activity the chain
    goes to, a wait followed by its end, a fork by its join (the fork's branches are walked by the
    caller), a call's failed tries by the next try; a fault or a cancel (the main path's) ends it."""
    position, rows, index = start, path.rows, 0
    on = f" ({path.name})" if path.name else ""
    while index < len(rows):
        step, activity, kind, _node, _fence, _started, _ended, outcome, _branch = rows[index]
        if path.end in ("faulted", "cancelled"):
            fail(f"step {step}{on} follows the end of the instance ({path.end})")
            path.end = "broken"
            return
        if kind == "cancel":  # "(start)": cancelled before its first burst committed
            if path.name is not None or (
                activity != (position or "(start)") and not (index == 0 and activity == "(start)")
            ):
                fail(f"step {step}{on} cancels at {activity} where the path stood at {position}")
                path.end = "broken"
                return
            path.end = "cancelled"
            index += 1
            continue
        spec = activities.get(activity)
        if activity != position or spec is None or spec["type"] != kind:
            fail(f"step {step}{on} is {activity} ({kind}) where the path goes to {position}")
            path.end = "broken"
            return
        if kind == "fail" or outcome.startswith(("faulted: ", "faulted after ", "failed: ")):
            path.end = "faulted"
            index += 1
            continue
        following = rows[index + 1] if index + 1 < len(rows) else None
        if (kind in ("timer", "signal") and outcome.startswith("waiting")) or (
            kind == "run" and outcome.startswith("started ")
        ):
            if following is None:
                path.at = activity  # it waits (or waited, on a branch removed since)
                return
            if following[2] == "cancel" or following[7].startswith("faulted: "):
                index += 1  # it ended while waiting: the next row says how
                continue
            way = _wait_end(kind, outcome, following[7]) if following[1] == activity else None
            if way is None:
                fail(f"step {step}{on} waits at {activity}; the next step of its path is not its end")
                path.end = "broken"
                return
            if way == "timed out" and (
                spec.get("on_timeout") is None or not following[7].endswith(f": on to {spec['on_timeout']}")
            ):
                fail(f"step {following[0]}{on} times out at {activity}, its on_timeout is {spec.get('on_timeout')}")
                path.end = "broken"
                return
            index += 2
            position = spec.get("on_timeout") if way == "timed out" else spec.get("next")
            continue
        if kind in FORKS:
            if kind == "for_each" and outcome == "no items":
                position = spec.get("next")
                index += 1
                continue
            if kind == "parallel":
                match, count, mode = FORKED.match(outcome), len(spec.get("branches") or []), spec.get("join") or "all"
                ok = match is not None and int(match.group(1)) == count and match.group(3) == mode
            else:
                match = ITEMS.match(outcome)
                count = int(match.group(1)) if match else 0
                mode = "parallel" if spec.get("parallel") else "turn"
                ok = match is not None and count > 0 and (match.group(2) == "in parallel") == bool(spec.get("parallel"))
            if not ok:
                fail(f"step {step}{on} forks at {activity} ({kind}): {outcome!r} is not what it forks")
                path.end = "broken"
                return
            prefix = f"{path.name}/" if path.name else ""
            fork = {"row": rows[index], "join": None, "activity": activity, "count": count, "mode": mode,
                    "children": [f"{prefix}{activity}/{number}" for number in range(count)]}  # fmt: skip
            path.forks.append(fork)
            if following is None:
                path.at = activity  # it waits for its branches
                return
            if following[2] == "cancel" or following[7].startswith("faulted: "):
                index += 1
                continue
            if following[1] != activity or not (JOINED_ANY if mode == "any" else JOINED_ALL).match(following[7]):
                fail(f"step {step}{on} forks at {activity}; its path's next step, {following[0]}, is no join of it")
                path.end = "broken"
                return
            fork["join"] = following
            index += 2
            position = spec.get("next")
            continue
        if kind == "call" and outcome.startswith("error (try"):
            index += 1  # tried again: the same activity comes next
            continue
        if kind == "if":
            branch = outcome.split(": ", 1)[-1]
            position = None if branch == "end" else branch
        else:
            position = spec.get("next")
        index += 1
    if path.end == "open":
        if position is None:
            path.end = "ended"
        else:
            path.at = position


def _check_branches(
    check: Invariant,
    status: str,
    body: dict[str, Any],
    rows: list[tuple[Any, ...]],
    evidence: str,
    tally: Counter[str] | None = None,
) -> dict[str, tuple[Any, ...]]:
    """An instance with branches: each path (the main one, each branch) follows the definition's
    chain from its start (a branch: the fork's branches[i], or the for_each body); every branch
    of a join-all fork ended before the join row, and all of its items ran; for_each in turn: item
    i's steps after item i-1's last; join any: its winner ended before the join, and no removed
    branch stepped after it but the one step each may have had running then. Returns the branches
    a join any removed (the branches they forked too), each with the join row."""
    activities: dict[str, Any] = body["activities"]
    counts = tally if tally is not None else Counter()

    def fail(text: str) -> None:
        check.fail(f"{text}: {evidence}")

    by_name: dict[str | None, list[tuple[Any, ...]]] = defaultdict(list)
    for row in rows:
        by_name[row[8]].append(row)
    main = _Path(None, by_name.get(None, []))
    _walk(main, body["start"], activities, fail)
    paths: dict[str | None, _Path] = {None: main}
    winners: dict[str, tuple[Any, ...]] = {}  # branch a join any removed -> the join row
    queue = [main]
    while queue:
        path = queue.pop(0)
        for fork in path.forks:
            spec = activities[fork["activity"]]
            made = []
            for number, name in enumerate(fork["children"]):
                start = spec["branches"][number] if spec["type"] == "parallel" else spec["body"]
                child = paths[name] = _Path(name, by_name.get(name, []))
                _walk(child, start, activities, fail)
                made.append(child)
                queue.append(child)
            counts[f"forks ({spec['type']}, {fork['mode']})"] += 1
            counts["branches forked"] += len(made)
            _check_join(fork, made, paths, winners, fail, counts)
    for name, own in by_name.items():
        if name not in paths:
            fail(f"branch {name} has steps {[row[0] for row in own]}, and no fork of its instance made it")
    counts["journal rows on branches"] += sum(len(own) for name, own in by_name.items() if name)

    # A removed branch (and what it forked) took no step after the join that removed it, but the
    # one it had running then (begun before the join, journaled when it ended).
    removed: dict[str, tuple[Any, ...]] = {}
    for name, path in paths.items():
        if name is None:
            continue
        join = next((row for root, row in winners.items() if name == root or name.startswith(f"{root}/")), None)
        if join is None:
            continue
        removed[name] = join
        late = [row[0] for row in path.rows if row[0] > join[0] or row[5] > join[5] + 0.001]
        running = [row[0] for row in path.rows if row[6] > join[5] + 0.001]
        if late:
            fail(f"branch {name}, removed by the join any at step {join[0]}, took steps {late} after it")
        elif len(running) > 1:
            fail(f"branch {name}, removed by the join any at step {join[0]}, had {len(running)} steps running then")
        counts["steps of removed branches journaled after the join (running then)"] += len(running)

    # How the instance ended.
    faulted = [path.shown() for path in paths.values() if path.end == "faulted"]
    if status == "completed":
        if main.end != "ended":
            fail(f"completed, but its main path stops at {main.at} ({main.end})")
        for name, path in paths.items():
            if name is not None and path.rows and path.end not in ("ended", "broken") and name not in removed:
                fail(f"completed, but branch {name} stops at {path.at} ({path.end})")
    if status == "faulted" and not faulted:
        fail("faulted, but no path of it ends at a fault")
    if faulted and status != "faulted":
        fail(f"{status}, yet {faulted} ended at a fault")
    if (status == "cancelled") != (main.end == "cancelled"):
        fail(f"{status}, and the journal {'ends' if main.end == 'cancelled' else 'does not end'} with a cancel")
    return removed


def _check_join(
    fork: dict[str, Any],
    children: list[_Path],
    paths: dict[str | None, _Path],
    winners: dict[str, tuple[Any, ...]],
    fail: Callable[[str], None],
    counts: Counter[str],
) -> None:
    """One fork's branches and its join row (None: it still waits, or its instance ended there)."""
    row, join, mode, activity = fork["row"], fork["join"], fork["mode"], fork["activity"]
    what = "item" if mode in ("parallel", "turn") else "branch"
    for child in children:
        if child.rows and (child.rows[0][0] < row[0] or child.rows[0][5] < row[5] - 0.001):
            fail(f"{child.name} began (step {child.rows[0][0]}) before its fork at step {row[0]}")
    if mode == "turn":  # item i's first step after item i-1's last (which ended it)
        for earlier, later in itertools.pairwise(children):
            if not later.rows:
                continue
            first = later.rows[0]
            if not earlier.rows or earlier.end != "ended":
                fail(f"item {later.name} of {activity} (in turn) ran, while item {earlier.name} had not ended "
                     f"({earlier.end}, at {earlier.at})")  # fmt: skip
            elif earlier.rows[-1][0] > first[0] or earlier.rows[-1][6] > first[5] + 0.001:
                last = earlier.rows[-1]
                fail(f"item {later.name} of {activity} (in turn) began at step {first[0]} ({first[5]:.3f}), before "
                     f"item {earlier.name} ended at step {last[0]} ({last[6]:.3f})")  # fmt: skip
    if join is None:
        return
    counts[f"joins ({mode})"] += 1
    if mode == "any":
        match = JOINED_ANY.match(join[7])
        assert match is not None  # _walk matched it
        winner, cancelled = match.group(1), int(match.group(2) or 0)
        counts[f"join any won by {RACE_NAMES.get(winner, winner)}"] += 1
        ending = paths.get(winner)
        if winner not in fork["children"] or ending is None:
            fail(f"the join any at step {join[0]} names {winner}, no branch of its fork at step {row[0]}")
        elif ending.end != "ended" or ending.rows[-1][0] > join[0] or ending.rows[-1][6] > join[5] + 0.001:
            fail(f"the join any at step {join[0]} says {winner} ended first; it did not end before it "
                 f"({ending.end}, at {ending.at})")  # fmt: skip
        if cancelled != len(children) - 1:
            fail(f"the join any at step {join[0]} cancelled {cancelled} branches; its fork had {len(children)}")
        for child in children:
            if child.name != winner and child.name is not None:
                winners[child.name] = join
        return
    match = JOINED_ALL.match(join[7])
    assert match is not None
    if int(match.group(1)) != len(children):
        fail(f"the join at step {join[0]} says {match.group(1)} branches ended; its fork at step {row[0]} made "
             f"{len(children)}")  # fmt: skip
    for child in children:
        if not child.rows:
            fail(f"{what} {child.name} of {activity} never ran, yet the join at step {join[0]} says all ended")
        elif child.end != "ended":
            fail(f"{what} {child.name} of {activity} stops at {child.at} ({child.end}), yet it was joined "
                 f"at step {join[0]}")  # fmt: skip
        elif child.rows[-1][0] > join[0] or child.rows[-1][6] > join[5] + 0.001:
            last = child.rows[-1]
            fail(f"the join of {activity} at step {join[0]} ({join[5]:.3f}) came before {child.name}'s last step "
                 f"{last[0]} ended ({last[6]:.3f})")  # fmt: skip


def _check_branch_once(
    check: Invariant,
    instance: str,
    workflow: str,
    status: str,
    variables: dict[str, Any],
    rows: list[tuple[Any, ...]],
    calls: set[str],
    removed: dict[str, tuple[Any, ...]],
    evidence: str,
) -> None:
    """No step of a branch (or of the main path) of a branch definition committed twice: no loops
    there, so each (branch, activity) ends once -- a wait's begin, a fork's, and a call's failed
    tries aside. A completed instance committed exactly the calls its branches make, each once
    (the effects row checks each has its effect): every item's, the winner's of a race."""
    check.checked += 1
    ends: Counter[tuple[str | None, str]] = Counter()
    for row in rows:
        outcome = row[7]
        opening = (
            row[2] == "cancel"
            or outcome.startswith(("waiting", "error (try "))
            or (row[2] == "run" and RUN_STARTED.match(outcome) is not None)
            or FORKED.match(outcome) is not None
            or ITEMS.match(outcome) is not None
        )
        if not opening:
            ends[(row[8], row[1])] += 1
    twice = {f"{branch or 'main'} {activity}": count for (branch, activity), count in ends.items() if count > 1}
    if twice:
        check.fail(f"steps committed more than once on one path (path activity: times) {twice}: {evidence}")
    if status != "completed" or workflow not in BRANCHY:
        return
    given = variables.get("input") if isinstance(variables.get("input"), dict) else {}
    items = given.get("items") if isinstance(given.get("items"), list) else []
    want: set[str] = set()
    if workflow == "chaos-fan":
        want = {f"{instance}:fan/0:1", *(f"{instance}:fan/2/f-nest/{index}:0" for index in range(len(items)))}
    elif workflow == "chaos-each":
        want = {f"{instance}:each/{index}:0" for index in range(len(items))}
    elif workflow == "chaos-turn":
        want = {f"{instance}:turn/{index}:3" for index in range(len(items))}
    elif workflow == "chaos-race":
        winner = variables.get("winner")
        want = (
            {f"{instance}:race/0:2"} if winner == "quick" else {f"{instance}:race/1:3"} if winner == "slow" else set()
        )
    # A race's loser may have had its call running when the race was won: committed, on a removed branch.
    extra = {key for key in calls - want if key.rsplit(":", 1)[0].split(":", 1)[-1] not in removed}
    if want - calls or extra:
        check.fail(
            f"{workflow} {instance} committed the calls {sorted(calls)}; its branches make {sorted(want)} "
            f"(missing {sorted(want - calls)}, extra {sorted(extra)}): {evidence}"
        )


def _check_branch_vars(
    check: Invariant,
    instance: str,
    workflow: str,
    status: str,
    variables: dict[str, Any],
    rows: list[tuple[Any, ...]],
    evidence: str,
    tally: Counter[str] | None = None,
) -> None:
    """A completed branch instance's variables are what its branches' sets and calls made: chaos-fan
    done 3 (one per branch), total 3, items one per item of its nested for_each, its answer the
    driver's, f-call's key its branch's; chaos-race wins 1 and winner the branch its join names;
    chaos-each count one per item, its call's result an item's key; chaos-turn turns one per item,
    last the last item, its call's result the last item's key."""
    if status != "completed" or workflow not in BRANCHY:
        return
    check.checked += 1
    given = variables.get("input") if isinstance(variables.get("input"), dict) else {}
    items = given.get("items") if isinstance(given.get("items"), list) else []

    def key_of(name: str) -> Any:
        value = variables.get(name)
        return value.get("key") if isinstance(value, dict) else value

    want: dict[str, Any] = {}
    got: dict[str, Any] = {}
    if workflow == "chaos-fan":
        want = {"done": 3, "total": 3, "items": len(items), "answer": {"token": f"fan-{given.get('n')}"},
                "fcall": f"{instance}:fan/0:1"}  # fmt: skip
        got = {name: variables.get(name) for name in want}
        got["fcall"] = key_of("fcall")
    elif workflow == "chaos-race":
        join = next((row for row in rows if row[1] == "race" and JOINED_ANY.match(row[7])), None)
        match = JOINED_ANY.match(join[7]) if join is not None else None
        want = {"wins": 1, "winner": RACE_NAMES.get(match.group(1)) if match else "(no join row)"}
        got = {name: variables.get(name) for name in want}
        if got.get("winner") == "never":
            check.fail(f"chaos-race {instance} was won by its never branch (its sleeper completed?): {evidence}")
    elif workflow == "chaos-each":
        want = {"count": len(items)}
        got = {name: variables.get(name) for name in want}
        keys = {f"{instance}:each/{index}:0" for index in range(len(items))}
        if key_of("e-call") not in keys:
            got["e-call"], want["e-call"] = key_of("e-call"), "the key of one of its items' calls"
    elif workflow == "chaos-turn":
        want = {"turns": len(items), "last": items[-1] if items else None,
                "t-call": f"{instance}:turn/{len(items) - 1}:3"}  # fmt: skip
        got = {name: variables.get(name) for name in want}
        got["t-call"] = key_of("t-call")
    if tally is not None:
        tally[f"completed {workflow}"] += 1
    if got != want:
        check.fail(f"{workflow} {instance}: variables {json.dumps(got)}, its branches make {json.dumps(want)}: "
                   f"{evidence}")  # fmt: skip


def _check_steps_overlap(check: Invariant, rows: list[tuple[Any, ...]], evidence: str) -> None:
    """An instance without branches: its steps one after the other, never at once."""
    for index, row in enumerate(rows):
        check.checked += 1
        if row[5] > row[6]:
            check.fail(f"step {row[0]} ends before it starts: {evidence}")
        if index and rows[index - 1][6] > row[5]:
            gap = rows[index - 1][6] - row[5]
            check.fail(f"step {row[0]} starts {gap * 1000:.1f} ms before step {row[0] - 1} ended: {evidence}")


def _bursts(rows: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """The journal's bursts: runs of rows with one fence."""
    bursts: list[list[tuple[Any, ...]]] = []
    for row in rows:
        if bursts and bursts[-1][0][4] == row[4]:
            bursts[-1].append(row)
        else:
            bursts.append([row])
    return bursts


def _check_burst_overlap(check: Invariant, rows: list[tuple[Any, ...]], evidence: str) -> None:
    """An instance with branches: a burst runs its ready paths side by side, so steps of different
    branches of one burst may overlap; but two bursts never do (every step of one ended before any
    of the next began), nor two steps of one branch (or of the main path) in one burst."""
    for row in rows:
        check.checked += 1
        if row[5] > row[6]:
            check.fail(f"step {row[0]} ends before it starts: {evidence}")
    bursts = _bursts(rows)
    for earlier, later in itertools.pairwise(bursts):
        last = max(earlier, key=lambda row: row[6])
        first = min(later, key=lambda row: row[5])
        if last[6] > first[5]:
            check.fail(
                f"the burst of fence {later[0][4]} (steps {later[0][0]}..{later[-1][0]}) began "
                f"{(last[6] - first[5]) * 1000:.1f} ms (step {first[0]}) before the burst of fence {earlier[0][4]} "
                f"(steps {earlier[0][0]}..{earlier[-1][0]}) ended (step {last[0]}): {evidence}"
            )
    for burst in bursts:
        previous: dict[str | None, tuple[Any, ...]] = {}
        for row in burst:
            before = previous.get(row[8])
            if before is not None and before[6] > row[5]:
                check.fail(
                    f"step {row[0]} ({row[8] or 'the main path'}) starts {(before[6] - row[5]) * 1000:.1f} ms before "
                    f"step {before[0]} of the same path ended: {evidence}"
                )
            previous[row[8]] = row


def _check_fences(check: Invariant, fence: int, rows: list[tuple[Any, ...]], evidence: str) -> None:
    """Bursts: a run of rows with one fence; the fences of successive bursts strictly rise."""
    bursts = [burst[0][4] for burst in _bursts(rows)]
    check.checked += len(bursts)
    if any(later <= earlier for earlier, later in itertools.pairwise(bursts)):
        check.fail(f"burst fences {bursts} do not strictly rise: {evidence}")
    if bursts and fence != bursts[-1]:
        check.fail(f"the instance's fence is {fence}, its last burst's {bursts[-1]}: {evidence}")


def _check_wf_timers(
    check: Invariant,
    status: str,
    activities: dict[str, Any],
    rows: list[tuple[Any, ...]],
    removed: dict[str, tuple[Any, ...]],
    evidence: str,
) -> None:
    """Timers: one wait and one end per timer activity a path reached (each branch has its own); the
    end no earlier than the due time."""
    for activity, spec in activities.items():
        if spec["type"] != "timer":
            continue
        on: dict[str | None, tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]] = defaultdict(lambda: ([], []))
        for row in rows:
            if row[1] == activity and row[7].startswith("waiting until "):
                on[row[8]][0].append(row)
            elif row[1] == activity and row[7] == "timer elapsed":
                on[row[8]][1].append(row)
        for branch, (waits, ends) in sorted(on.items(), key=lambda item: item[0] or ""):
            check.checked += 1
            where = f"timer {activity}{f' on {branch}' if branch else ''}"
            if branch is None:
                # An instance that ended past the timer has its end; one that ended at it (faulted
                # while it waited, cancelled) has none.
                ended_here = (
                    bool(rows)
                    and rows[-1][1] == activity
                    and (rows[-1][2] == "cancel" or rows[-1][7].startswith("faulted: "))
                )
                ended = status in ("completed", "faulted", "cancelled")
                wrong = ended and len(ends) != (0 if ended_here else 1)
            else:
                # A branch's wait ends unless a join any removed the branch, or the instance ended
                # otherwise than completed.
                wrong = status == "completed" and branch not in removed and len(ends) != 1
            if len(waits) != 1 or len(ends) > 1 or wrong:
                check.fail(f"{where}: {len(waits)} waits, {len(ends)} ends: {evidence}")
                continue
            due = _iso_seconds(waits[0][7][len("waiting until ") :])
            seconds = nodeflow.parse_duration(spec["duration"])
            if due is None:
                check.fail(f"{where}: no due time in {waits[0][7]!r}: {evidence}")
            elif not waits[0][5] + seconds - 0.002 <= due <= waits[0][6] + seconds + 0.002:
                check.fail(f"{where}: due {due:.3f} is not {seconds} s after its wait: {evidence}")
            elif ends and ends[0][5] < due:
                check.fail(f"{where} elapsed {(due - ends[0][5]) * 1000:.1f} ms early (due {due:.3f}): {evidence}")


# The workflow features: kept signals, start keys, child instances, timed waits -----------------


@dataclasses.dataclass
class Flows:
    """What the feature checks read: the definitions, instances and journals, and the driver's records."""

    definitions: dict[tuple[str, int], dict[str, Any]]
    instances: dict[str, tuple[Any, ...]]
    journals: dict[str, list[tuple[Any, ...]]]
    sent: dict[str, list[tuple[str, str, Any]]]
    ended: float  # when the run ended (its meta), or now
    variables: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    removed: dict[str, dict[str, tuple[Any, ...]]] = dataclasses.field(default_factory=dict)  # see _check_branches

    def __post_init__(self) -> None:
        for instance, row in self.instances.items():
            data = _loads(row[5])
            self.variables[instance] = data if isinstance(data, dict) else {}

    def body(self, instance: str) -> dict[str, Any]:
        row = self.instances[instance]
        return self.definitions.get((row[1], row[2])) or {"activities": {}}

    def spec(self, instance: str, activity: str) -> dict[str, Any]:
        return self.body(instance)["activities"].get(activity) or {}

    def shown(self, instance: str) -> str:
        """An instance and its journal, for evidence."""
        row = self.instances.get(instance)
        if row is None:
            return f"instance {instance}: not in the database"
        given = self.variables[instance].get("input")
        text = f"instance {instance} ({row[1]} v{row[2]}, input {json.dumps(given)}, {row[3]}"
        text += f", error {row[4]!r})" if row[4] else ")"
        return f"{text}; journal:\n{_rows_text(self.journals.get(instance, []))}"


def _check_features(
    conn: sqlite3.Connection,
    found: dict[str, Invariant],
    figures: dict[str, Any],
    flows: Flows,
) -> None:
    kept = _table(conn, "SELECT id, name, input, sent, expires, by FROM kept_signals")
    figures["kept signals"] = _check_kept(found["kept"], flows, kept)
    figures["start keys"] = _check_keys(found["keys"], flows)
    figures["children"] = _check_children(found["children"], flows)
    figures["timed waits"] = _check_timed_waits(found["timed-waits"], flows)


def _tokens(flows: Flows) -> dict[str, list[tuple[str, str]]]:
    """token -> (instance, signal activity) of each instance whose signal result holds that token."""
    held: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for instance in flows.instances:
        for activity, spec in flows.body(instance)["activities"].items():
            if spec.get("type") != "signal":
                continue
            value = flows.variables[instance].get(spec.get("result") or activity)
            if isinstance(value, dict) and isinstance(value.get("token"), str):
                held[value["token"]].append((instance, activity))
    return held


def _check_kept(check: Invariant, flows: Flows, kept: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Each signal the driver sent with a token (kind kept: before any waiter of its name existed;
    kind answer: a timed wait's answer, kept when it came late with a ttl): its token is in at most
    one instance, one that waited for its name and took it kept (or that the signal resumed), while
    it was live; one taken is gone from kept_signals; one not taken is still there until it
    expires; and no instance began to wait for a name while a kept signal of it was there without
    taking it."""
    held = _tokens(flows)
    left: dict[str, tuple[Any, ...]] = {}
    for row in kept:
        data = _loads(row[2])
        if isinstance(data, dict) and isinstance(data.get("token"), str):
            left[data["token"]] = row
    waits: dict[str, list[tuple[str, tuple[Any, ...], re.Match[str]]]] = defaultdict(list)
    for instance, rows in flows.journals.items():
        for row in rows:
            if row[2] == "signal" and (match := WAITING_FOR.match(row[7])):
                waits[match.group(1)].append((instance, row, match))
    records = {detail.get("token"): (kind, detail) for kind in ("kept", "answer") for _, _, detail in flows.sent[kind]}
    counts: Counter[str] = Counter()
    for token, (kind, detail) in records.items():
        name, resumed, until = detail.get("name"), detail.get("resumed") or [], detail.get("kept_until")
        if isinstance(until, str):
            until = _iso_seconds(until)
        if kind == "answer" and until is None:
            continue  # resumed its instance, or dropped (ttl 0): the timed waits' question
        check.checked += 1
        holders = held.get(token, [])
        where = (
            f"signal {name} with token {token} ({kind}, ttl {detail.get('ttl')}, sent {detail.get('began', 0):.3f}.."
            f"{detail.get('returned', 0):.3f}, resumed {resumed}, kept until {until})"
        )
        if kind == "kept" and (resumed or until is None):
            check.fail(f"{where}: sent before any instance waited for {name}, yet not kept")
        if len(holders) > 1:
            check.fail(f"{where} resumed {len(holders)} instances:\n"
                       + "\n".join(flows.shown(instance) for instance, _ in holders))  # fmt: skip
        for instance, activity in holders:
            took = [(row, match) for row in flows.journals.get(instance, [])
                    if row[1] == activity and (match := WAITING_FOR.match(row[7]))]  # fmt: skip
            if not took:
                check.fail(
                    f"{where}: its token is in instance {instance}, which never waited at {activity}: "
                    f"{flows.shown(instance)}"
                )
                continue
            row, match = took[0]
            if match.group(1) != name:
                check.fail(f"{where} resumed an instance waiting for signal {match.group(1)}: {flows.shown(instance)}")
            elif instance in resumed:
                counts["resumed its waiter when sent"] += 1
            elif not match.group(3):
                check.fail(
                    f"{where}: its token is in instance {instance}, whose wait took no kept signal and which "
                    f"the signal did not resume: {flows.shown(instance)}"
                )
            elif until is not None and row[5] >= until:
                check.fail(f"{where} was taken {row[5] - until:.3f} s after it expired: {flows.shown(instance)}")
            else:
                counts["taken by a waiter"] += 1
        if holders and token in left:
            check.fail(f"{where} resumed {holders[0][0]}, yet is still in kept_signals: {left[token]}")
        if not holders and until is not None:
            if token in left:
                counts["still kept" if left[token][4] > flows.ended else "expired, not taken"] += 1
            elif until > flows.ended:
                check.fail(
                    f"{where} is neither in an instance nor in kept_signals, and would not expire before "
                    f"{until:.3f} (the run ended {flows.ended:.3f}): lost"
                )
            else:
                counts["expired, not taken"] += 1
    for token, holders in held.items():
        if token not in records and KEPT_TOKEN.match(token):
            check.fail(
                f"token {token} is in {[instance for instance, _ in holders]}, but no signal the driver recorded had it"
            )
    # A kept signal still there at the end (and live) was there for every wait of its name that
    # began after it was sent: each of those must have taken one.
    for token, row in left.items():
        kind, detail = records.get(token, (None, {}))
        if kind is None or row[4] <= flows.ended or "returned" not in detail:
            continue
        for instance, wait, match in waits.get(row[1], []):
            check.checked += 1
            if not match.group(3) and wait[5] > detail["returned"]:
                check.fail(
                    f"instance {instance} began to wait for {row[1]} at {wait[5]:.3f} without taking the kept signal "
                    f"with token {token} (sent {detail['returned']:.3f}, kept until {row[4]:.3f}, still kept): "
                    f"{flows.shown(instance)}"
                )
    return {
        "sent before their waiters": len(flows.sent["kept"]),
        "timed-wait answers kept": sum(1 for _, _, detail in flows.sent["answer"] if detail.get("kept_until")),
        **dict(sorted(counts.items())),
        "left in kept_signals": len(kept),
    }


def _check_keys(check: Invariant, flows: Flows) -> dict[str, Any]:
    """Each key the driver started with (from threads and processes at once, again later, and with
    another definition): one instance has it, every start of chaos-keyed with it got that id, one
    start at most was told it was new (one exactly, unless a start failed) and its input is the
    instance's; a start with another definition was refused."""
    calls: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _, _, detail in flows.sent["keyed"]:
        calls[detail["key"]].append(detail)
    having: dict[str, list[str]] = defaultdict(list)
    for instance, row in flows.instances.items():
        if row[10] is not None:
            having[row[10]].append(instance)
    counts: Counter[str] = Counter()
    for key, made in sorted(calls.items()):
        check.checked += 1
        owners = having.get(key, [])
        summary = [(call["call"], call["via"], call.get("instance"), call.get("new"), call.get("refused") is not None)
                   for call in made]  # fmt: skip
        where = f"start key {key} (calls: call, via, id, new, refused: {summary})"
        counts["starts"] += len(made)
        counts["of which by the command line"] += sum(1 for call in made if call["via"] == "cli")
        if len(owners) != 1:
            check.fail(f"{where}: {len(owners)} instances have it: " + "\n".join(map(flows.shown, owners)))
            continue
        owner = owners[0]
        if flows.instances[owner][1] != "chaos-keyed":
            check.fail(f"{where}: its instance is of {flows.instances[owner][1]}: {flows.shown(owner)}")
        failed = sum(1 for call in made if "error" in call)
        news = []
        for call in made:
            if "error" in call:
                continue
            if call["definition"] != "chaos-keyed":
                counts["refused (another definition)"] += call.get("refused") is not None
                if call.get("refused") is None:
                    check.fail(
                        f"{where}: the start with {call['definition']} was not refused: it got {call['instance']}"
                    )
            elif call.get("instance") != owner:
                check.fail(
                    f"{where}: call {call['call']} ({call['via']}) got {call.get('instance')}, the key's instance "
                    f"is {owner}"
                )
            elif call.get("new"):
                news.append(call)
        if len(news) > 1 or (not news and not failed):
            check.fail(f"{where}: {len(news)} starts were told they started it")
        given = flows.variables[owner].get("input") or {}
        if len(news) == 1 and given.get("call") != news[0]["call"]:
            check.fail(
                f"{where}: call {news[0]['call']} was told it started {owner}, whose input is that of call "
                f"{given.get('call')}"
            )
    for key, owners in having.items():
        if key not in calls:
            check.checked += 1
            check.fail(f"start key {key} is on {owners}, and no start the driver recorded used it")
    return {"keys": len(calls), **dict(counts), "instances with a key": sum(map(len, having.values()))}


def _check_children(check: Invariant, flows: Flows) -> dict[str, Any]:
    """Each instance a run activity started: its parent's journal started it once (and no run row
    names a child that is missing); it ended; a child that completed or faulted did so before its
    parent went on (the parent's result is its variables; a faulted child faulted the parent there);
    one cancelled with its parent, or by its parent's timeout, was cancelled by that very commit,
    after the parent's row; and no cancelled parent left a child running or waiting."""
    children: dict[str, list[str]] = defaultdict(list)
    for instance, row in flows.instances.items():
        if row[9] is not None:
            children[row[9]].append(instance)
    started: dict[str, tuple[str, int]] = {}  # child -> (parent, index of its run row)
    counts: Counter[str] = Counter()
    for parent, rows in flows.journals.items():
        for index, row in enumerate(rows):
            match = RUN_STARTED.match(row[7]) if row[2] == "run" else None
            if match is None:
                continue
            child = match.group(4)
            check.checked += 1
            if child in started:
                check.fail(f"instance {child} was started by two run rows: {started[child]} and {(parent, index)}")
            started[child] = (parent, index)
            if child not in flows.instances or flows.instances[child][9] != parent:
                check.fail(
                    f"{parent}'s step {row[0]} started instance {child}, which is not in the database as its "
                    f"child: {flows.shown(parent)}"
                )
    for parent, kids in sorted(children.items()):
        for child in kids:
            check.checked += 1
            counts["children"] += 1
            row, rows = flows.instances[child], flows.journals.get(child, [])
            where = f"child {child} ({row[3]}) of {parent}"
            if parent not in flows.instances:
                check.fail(f"{where}: its parent is not in the database: {flows.shown(child)}")
                continue
            if started.get(child, (None,))[0] != parent:
                check.fail(f"{where}: no run row of its parent started it: {flows.shown(parent)}")
                continue
            prows = flows.journals[parent]
            index = started[child][1]
            path = prows[index][8]  # the branch it ran on (None: the main path): its next step is the run's end
            after = next((entry for entry in prows[index + 1 :] if entry[8] == path), None)
            last = rows[-1] if rows else None
            evidence = f"{flows.shown(child)}\n    its parent: {flows.shown(parent)}"
            if row[3] in ("running", "waiting") or last is None:
                check.fail(f"{where} is still {row[3]}; its parent is {flows.instances[parent][3]}: {evidence}")
                continue
            counts[row[3]] += 1
            join = flows.removed.get(parent, {}).get(path) if path else None
            if join is not None and after is None:  # a join any removed its branch: cancelled by that commit
                if last[2] != "cancel" or f"its parent {parent} stopped waiting for it" not in last[7]:
                    check.fail(f"{where}: a join any (step {join[0]}) removed the branch that runs it, and its "
                               f"last step is no cancel by its parent: {evidence}")  # fmt: skip
                elif last[5] < join[5] - 0.001:
                    check.fail(f"{where} was cancelled at {last[5]:.3f}, before the join any that removed its "
                               f"branch at {join[5]:.3f}: {evidence}")  # fmt: skip
                else:
                    counts["cancelled: a join any removed its branch"] += 1
                continue
            if row[3] in ("completed", "faulted"):
                end = (f"instance {child} completed" if row[3] == "completed"
                       else f"faulted: instance {child} ({row[1]}) it ran was faulted")  # fmt: skip
                if after is None or not after[7].startswith(end):
                    check.fail(f"{where}: its parent's step after the run is not {end!r}: {evidence}")
                elif after[5] < last[6] - 0.001:
                    check.fail(
                        f"{where} ended at {last[6]:.3f}, after its parent went on at {after[5]:.3f}: {evidence}"
                    )
                elif row[3] == "completed":
                    result = flows.spec(parent, after[1]).get("result") or after[1]
                    if flows.variables[parent].get(result) != flows.variables[child]:
                        check.fail(
                            f"{where}: its parent's {result} is {json.dumps(flows.variables[parent].get(result))}, "
                            f"the child's variables {json.dumps(flows.variables[child])}: {evidence}"
                        )
                continue
            if last[2] != "cancel":
                check.fail(f"{where}: its last step is no cancel: {evidence}")
            elif f"its parent {parent} was cancelled" in last[7]:
                if after is None or after[2] != "cancel" or flows.instances[parent][3] != "cancelled":
                    check.fail(
                        f"{where} says its parent was cancelled; the parent's step after the run: {after}: {evidence}"
                    )
                elif last[5] < after[5] - 0.001:
                    check.fail(
                        f"{where} was cancelled at {last[5]:.3f}, before its parent at {after[5]:.3f}: {evidence}"
                    )
                else:
                    counts["cancelled with its parent"] += 1
            elif f"its parent {parent} stopped waiting for it" in last[7]:
                if (
                    after is None
                    or not after[7].startswith(TIMED_OUT)
                    or f"instance {child}, now cancelled" not in after[7]
                ):
                    check.fail(
                        f"{where} says its parent stopped waiting; the parent's step after the run: {after}: {evidence}"
                    )
                elif last[5] < after[5] - 0.001:
                    check.fail(
                        f"{where} was cancelled at {last[5]:.3f}, before its parent timed out at {after[5]:.3f}: "
                        f"{evidence}"
                    )
                else:
                    counts["cancelled by its parent's timeout"] += 1
            elif after is None or not after[7].startswith(f"faulted: instance {child} ({row[1]}) it ran was cancelled"):
                check.fail(f"{where} was cancelled, and its parent did not fault at the run: {evidence}")
    for parent, row in flows.instances.items():
        if row[3] == "cancelled" and row[1] == "chaos-parent":
            check.checked += 1
            busy = [child for child in children.get(parent, []) if flows.instances[child][3] in ("running", "waiting")]
            if busy:
                check.fail(f"cancelled parent {parent} left children {busy} running or waiting: {flows.shown(parent)}")
    modes = Counter((flows.variables[parent].get("input") or {}).get("mode") for parent, row in flows.instances.items()
                    if row[1] == "chaos-parent")  # fmt: skip
    return {"parents by mode": dict(sorted((str(mode), count) for mode, count in modes.items())), **dict(counts)}


def _check_timed_waits(check: Invariant, flows: Flows) -> dict[str, Any]:
    """Each wait at a signal or run activity with a timeout ended one way: received (the signal; the
    child's end), or timed out (not before its due time), never both, never neither (but a cancel
    there); and the way is what happened: an answer that resumed the instance means received, with
    its token; timed out means no answer resumed it (a late one was kept or dropped), and its child
    (a run) was cancelled; an answer sent before the due time to an instance seen waiting found it."""
    answers = {detail["instance"]: detail for _, _, detail in flows.sent["answer"]}
    counts: Counter[str] = Counter()
    for instance, rows in flows.journals.items():
        if instance not in flows.instances:
            continue
        for activity, spec in flows.body(instance)["activities"].items():
            if spec.get("type") not in ("signal", "run") or spec.get("timeout") is None:
                continue
            for index, row in enumerate(rows):
                if row[1] != activity:
                    continue
                if spec["type"] == "signal":
                    began, due_text = WAITING_FOR.match(row[7]), None
                    if began is None:
                        continue
                    due_text, kept_in = began.group(2), bool(began.group(3))
                else:
                    began = RUN_STARTED.match(row[7])
                    if began is None:
                        continue
                    due_text, kept_in = began.group(3), False
                check.checked += 1
                _check_timed_wait(check, flows, instance, spec, rows, index, due_text, kept_in, answers, counts)
    for answer in answers.values():
        counts[f"answers: {'resumed' if answer['resumed'] else 'kept' if answer['kept_until'] else 'dropped'}"] += 1
    return dict(sorted(counts.items()))


def _check_timed_wait(
    check: Invariant,
    flows: Flows,
    instance: str,
    spec: dict[str, Any],
    rows: list[tuple[Any, ...]],
    index: int,
    due_text: str | None,
    kept_in: bool,
    answers: dict[str, dict[str, Any]],
    counts: Counter[str],
) -> None:
    wait = rows[index]
    activity, kind = wait[1], spec["type"]
    due = _iso_seconds(due_text) if due_text else None
    child = match.group(4) if kind == "run" and (match := RUN_STARTED.match(wait[7])) else None
    ways: list[tuple[str, tuple[Any, ...]]] = []
    for row in rows[index + 1 :]:
        if row[1] != activity:
            continue
        if (WAITING_FOR if kind == "signal" else RUN_STARTED).match(row[7]):
            break  # its next wait there (a loop)
        text = row[7].removeprefix("faulted: ")
        if text.startswith(TIMED_OUT):
            ways.append(("timed out", row))
        elif (
            row[7] == "signal received"
            or row[7] == f"instance {child} completed"
            or (child and row[7].startswith(f"faulted: instance {child} "))
        ):
            ways.append(("received" if kind == "signal" else "its child ended", row))
    evidence = flows.shown(instance)
    answer = answers.get(instance) if kind == "signal" else None
    token = answer["token"] if answer else None
    result = flows.variables[instance].get(spec.get("result") or activity)
    got = result.get("token") if isinstance(result, dict) else None
    if len(ways) > 1:
        check.fail(
            f"the wait at {activity} (step {wait[0]}) ended {len(ways)} ways: "
            f"{[(way, row[0]) for way, row in ways]}: {evidence}"
        )
        return
    if not ways:
        last = rows[-1]
        if not (last[1] == activity and last[2] == "cancel" and last[0] > wait[0]):
            check.fail(
                f"the wait at {activity} (step {wait[0]}) never ended (neither received nor timed out): {evidence}"
            )
        else:
            counts["cancelled while waiting"] += 1
        return
    way, row = ways[0]
    counts[f"{kind}: {way}{' (a kept signal)' if kept_in else ''}"] += 1
    if way == "timed out":
        if due is None:
            check.fail(f"the wait at {activity} timed out, its start row gives no due time: {evidence}")
        elif row[5] < due - 0.001:
            check.fail(
                f"the wait at {activity} timed out {(due - row[5]) * 1000:.1f} ms early (due {due:.3f}): {evidence}"
            )
        if answer is not None and instance in answer["resumed"]:
            check.fail(f"the answer {answer} resumed {instance}, yet its wait at {activity} timed out: {evidence}")
        if got is not None:
            check.fail(f"the wait at {activity} timed out, yet its result holds token {got}: {evidence}")
        if child is not None and flows.instances.get(child, (None,) * 4)[3] != "cancelled":
            row_child = flows.instances.get(child)
            check.fail(
                f"the run at {activity} timed out, its child {child} is "
                f"{row_child[3] if row_child else 'missing'}, not cancelled: {evidence}"
            )
    elif kind == "signal":
        if answer is None or got != token:
            check.fail(f"the wait at {activity} received {result}, not the driver's answer {answer}: {evidence}")
        elif instance not in answer["resumed"] and not (kept_in and answer["kept_until"]):
            check.fail(
                f"the wait at {activity} received the answer {answer}, which neither resumed it nor was kept "
                f"for it: {evidence}"
            )
    elif child is not None:
        status = (flows.instances.get(child) or (None,) * 4)[3]
        if status != ("completed" if row[7] == f"instance {child} completed" else "faulted"):
            check.fail(f"the run at {activity} says {row[7]!r}, its child {child} is {status}: {evidence}")
    if (answer is not None and not answer["resumed"] and answer.get("seen") is not None and due is not None
            and answer["returned"] < due - 0.001 and answer["seen"] > wait[6]):  # fmt: skip
        check.fail(
            f"the answer {answer}, committed {due - answer['returned']:.3f} s before the due time to an "
            f"instance seen waiting, resumed nothing: {evidence}"
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
            died = f" (a dead letter: {dead_timers.get(key)!r})" if key in dead_timers else ""
            check.fail(f"never received{died}: {where}")
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
            check.fail(
                f"node {node} (pid {pid}, {role}, {state}) applied instructions through {position}, "
                f"the log goes to {last_instruction}"
            )
        for workflow, version in (_loads(cached) or {}).items():
            check.checked += 1
            if version != latest.get(workflow):
                check.fail(
                    f"node {node} (pid {pid}, {state}) would start {workflow} v{version}, the latest is "
                    f"v{latest.get(workflow)}"
                )
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
                check.fail(
                    f"lock {name}: two holders at once for {(earlier[4] - later[3]) * 1000:.1f} ms: "
                    f"{earlier} and {later}"
                )
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
            if (
                fault["kind"] in ("stop", "freeze")
                and fault["pid"] in pids
                and _overlap(lo, hi, fault["at"], fault["until"] or self.end)
            ):
                return fault
        return None

    def loop_blocks(self, pids: set[int], lo: float, hi: float) -> list[dict[str, Any]]:
        """The runs of a loop-blocking handler on one of ``pids`` at some time in [lo, hi]."""
        return [run for run in self.runs("block-loop", pids) if _overlap(lo, hi, run["started"], self.run_end(run))]

    def writer_frozen(self, lo: float, hi: float, but: set[int] | None = None) -> dict[str, Any] | None:
        """A SIGSTOP in [lo, hi] of a node that held the writers' turn then: every commit waited for it."""
        for fault in self.faults:
            if (
                fault["writer"]
                and fault["pid"] not in (but or set())
                and _overlap(lo, hi, fault["at"], fault["until"] or self.end)
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
        return (
            self.frozen(pids, lo, hi) is None
            and not self.loop_blocks(pids, lo, hi)
            and (self.writer_frozen(lo, hi) is None)
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
        return (
            "; ".join(f"{fault['kind']} {fault['at']:.3f}..{fault['until'] or fault['at']:.3f}" for fault in near)
            or "no fault near"
        )


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
            check.fail(
                f"poison {key} ended its node {exits[key]} times; at most {bound} (its {limit} deliveries, "
                f"and {refunded} deaths refunded before it is tried alone): "
                f"{[run for run in story.hostile if run['key'] == key]}"
            )

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
            check.fail(
                f"instance {instance}'s call ended its node {exits[instance]} times; at most {burst_bound} "
                f"({story.burst_factor}x its run message's limit, and {refunded} deaths refunded before it "
                f"is tried alone): {[run for run in story.hostile if run['key'] == instance][-3:]}"
            )

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
            check.fail(
                f"an innocent message is a dead letter ({key or 'no key'}): {row[:2]} {str(row[2])[:200]} {row[3:]}"
            )
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
            text = (
                f"no standby took office (terms after: {later[:2]})"
                if takeover is None or takeover[3] > until
                else f"{takeover[1]} took office {takeover[3] - at:.2f} s after the freeze (epoch {takeover[0]})"
            )
            if excuse:
                outcomes[f"no bound: {excuse}"] += 1
            else:
                check.fail(
                    f"{where}: {text}; bound {stall + 2:g} s (a violation past {stall + 3:g} s); standbys up "
                    f"throughout: {[(life['node'], life['pid']) for life in healthy]}"
                )
        if takeover is None or takeover[3] > until:
            outcomes["not replaced while frozen"] += takeover is not None and not excuse
            continue
        delays.append(takeover[3] - at)
        outcomes["replaced"] += 1
        claim = taken.get(takeover[0])
        if claim is None or claim[0] != node:
            check.fail(
                f"{where}: epoch {takeover[0]} ({takeover[1]}) began {takeover[3] - at:.2f} s after the freeze, "
                f"yet no log says it was taken from {node} for its silence: {claim}"
            )
        for row in firings:
            if row[3] == epoch and row[2] >= takeover[3]:
                check.fail(
                    f"{where}: the frozen epoch fired {row} after epoch {takeover[0]} began at {takeover[3]:.3f}"
                )
        life = next((life for life in story.lives if life["pid"] == pid), None)
        stepped = [line for line in lost.get(epoch, []) if line.pid == pid]
        died_soon = life is not None and life["ended"] is not None and life["ended"] <= until + 5
        if not stepped and not died_soon:
            check.fail(f"{where}: it never said it lost office after it woke (its life: {life})")
        elif stepped and stepped[0].at > until + 5:
            check.fail(
                f"{where}: it said it lost office only {stepped[0].at - until:.2f} s after it woke: {stepped[0]}"
            )
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
        command = [
            PYTHON,
            self.run.nodeflow,
            "--db",
            self.run.db,
            "serve",
            "--node-id",
            self.node_id,
            "--app",
            self.run.app,
            "--lease",
            LEASE,
            "--grace",
            GRACE,
            "--stall-after",
            self.run.options.stall_after,
        ]
        if self.replica:
            command += ["--role", "replica"]
        env = dict(os.environ, CHAOS_DB=self.run.db, PYTHONPATH=str(ROOT))
        with open(path, "w") as log:
            self.process = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=self.run.folder,
                env=env,
                preexec_fn=_die_with_parent,
            )
        self.logs.append(path)
        self.state, self.wake_at, self._ready, self.frozen_by = "up", None, False, None
        self.life = {
            "node": self.node_id,
            "life": self.lives,
            "pid": self.pid,
            "replica": int(self.replica),
            "started": time.time(),
            "ready": None,
            "ended": None,
            "how": None,
        }
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
        self.timed: dict[str, dict[str, Any]] = {}  # chaos-timed instances whose answer is to come
        self.cancels: list[dict[str, Any]] = []  # parents to cancel while their child runs (see start_parent)
        self.keys: list[str] = []  # start keys used, for later starts with them again
        self.first_modes: list[str] = []  # the modes of the first parents: one of each
        self.first_branchy: list[str] = []  # the first branch definitions started: one of each
        self.fan_waits: dict[tuple[str, str], list[float]] = {}  # (instance, branch) -> [first seen, delay, last sent]

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
            [PYTHON, self.nodeflow, "--db", self.db, *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            cwd=self.folder,
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
        row = {
            "kind": kind,
            "node": member.node_id,
            "pid": member.pid,
            "at": time.time(),
            "until": None,
            "epoch": None,
            "writer": 0,
            "detail": None,
            **extra,
        }
        self.fault_rows.append(row)
        return row

    def save_records(self) -> None:
        """The faults and lives of the run, and when it ended, for the checker (all nodes are gone now)."""
        assert self.nf is not None
        faults = [
            (
                row["kind"],
                row["node"],
                row["pid"],
                row["at"],
                row["until"],
                row["epoch"],
                int(row["writer"]),
                json.dumps(row["detail"]) if row["detail"] is not None else None,
            )
            for row in self.fault_rows
        ]
        lives = [
            (
                row["node"],
                row["life"],
                row["pid"],
                row["replica"],
                row["started"],
                row["ready"],
                row["ended"],
                row["how"],
            )
            for row in self.lives
        ]

        def save(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO chaos_faults (kind, node, pid, at, until, epoch, writer, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                faults,
            )
            conn.executemany(
                "INSERT INTO chaos_lives (node, life, pid, replica, started, ready, ended, how) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                lives,
            )

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
        self.meta(
            began=time.time(),
            seed=self.seed,
            stall_after=self.stall_after,
            lease=LEASE,
            max_deliveries=nodeflow.Settings().max_deliveries,
            hostile=self.options.hostile,
            isolate_after_deaths=getattr(nodeflow, "ISOLATE_AFTER_DEATHS", 1),
            burst_delivery_factor=getattr(nodeflow, "BURST_DELIVERY_FACTOR", 4),
        )
        for workflow, make in DEFINITIONS.items():
            info = nf.define(make(1))
            self.record(f"define:{workflow}:{info.version}", "define", "used", {"rev": 1})
        for workflow, fixed in FIXED_DEFINITIONS.items():
            info = nf.define(fixed())
            self.record(f"define:{workflow}:{info.version}", "define", "used", {"rev": 1})
        # Cron timers: one from the command line, one from the API (a slot a minute each).
        self.cli_ok(
            "schedule",
            "add",
            "chaos-cron-1",
            "--cron",
            "* * * * *",
            "--queue",
            "chaos.cron",
            "--body",
            json.dumps({"cron": "chaos-cron-1"}),
        )
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
        every 4 s (times --rate); with the faults, about half a core on top of the nodes' own work.
        The workflow features add a kept-signal group every 6 s, a start key every 4 s, a parent
        every 2.5 s and a timed wait every 3 s, and the branches an instance every 2 s (times --rate)."""
        w, rate = self.stop_workload, self.options.rate
        self.worker("instances", 0.3 / rate, self.start_instance, w)
        self.worker("jobs", 0.25 / rate, self.send_job, w)
        self.worker("timers", 0.3 / rate, self.add_timer, w)
        self.worker("defines", 4.0 / rate, self.redefine, w)
        self.worker("locks-cli", 1.5 / rate, self.lock_cli, w)
        self.worker("locks-api", 0.6 / rate, self.lock_api, w)
        self.worker("signals", 0.2, self.answer_signals, self.stop_signals)
        # The workflow features: kept signals, start keys, child instances, timed waits (about 1.5
        # instances a second more, times --rate).
        self.worker("kept", 6.0 / rate, self.kept_group, w)
        self.worker("keys", 4.0 / rate, self.start_keyed, w)
        self.worker("parents", 2.5 / rate, self.start_parent, w)
        self.worker("timed", 3.0 / rate, self.start_timed, w)
        self.worker("timed-answers", 0.1, self.answer_timed, self.stop_signals)
        # Branches: a parallel (join all, join any) or for_each (in parallel, in turn) every 2 s
        # (times --rate), and the answers to chaos-fan's branch that waits for a signal.
        self.worker("branches", 2.0 / rate, self.start_branchy, w)
        self.worker("fan-answers", 0.2, self.answer_fans, self.stop_signals)
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
            self.cli_ok(
                "schedule",
                "add",
                name,
                "--after",
                f"{after}s",
                "--queue",
                "chaos.timers",
                "--body",
                json.dumps({"timer": name}),
            )
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
        kinds = [
            kind for kind, every in self.HOSTILE_EVERY.items() for _ in range(max(1, round(seconds * scale / every)))
        ]
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
            lambda conn: (
                conn.execute(
                    "INSERT INTO messages (queue, body, priority, available_at, created) VALUES (?, ?, 0, ?, ?)",
                    (queue, body, now, now),
                ).lastrowid
            )
        )
        self.record(
            f"undecodable:{message}", "undecodable", "dead", {"queue": queue, "variant": variant, "message": message}
        )
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

        Only instances seen waiting get one, with ttl 0 (it never stays kept: it resumes what waits,
        or nothing); one still waiting three seconds after its signal gets it again. A chaos-child
        waits ``input.delay`` seconds for its answer, and none with ``input.hold``: its parent is
        cancelled (see cancel_parents). The timed waits (chaos-timed) are answer_timed's.
        """
        assert self.nf is not None
        self.cancel_parents()
        waiting = self.nf.store.read(
            lambda conn: conn.execute(
                "SELECT id, waiting_for, json_extract(variables, '$.input.cancel'), "
                "json_extract(variables, '$.input.delay'), json_extract(variables, '$.input.hold'), parent "
                "FROM instances WHERE status = 'waiting' AND waiting_for IS NOT NULL AND definition != 'chaos-timed'"
            ).fetchall()
        )
        now = time.monotonic()
        seen = self.waits
        for instance, name, cancel, delay, hold, parent in waiting:
            if hold:  # a child whose parent is cancelled while it runs: no answer, ever
                first = seen.setdefault((instance, name), [now, 0.0, 0.0])[0]
                if parent is not None and (self.settling or now - first > 5):
                    with self.mutex:  # at once: the planned cancel went astray
                        self.cancels.append({"parent": parent, "cli": False, "due": 0.0})
                continue
            given = float(delay) if isinstance(delay, (int, float)) and not isinstance(delay, bool) else None
            wait = seen.setdefault((instance, name), [now, given if given is not None else rng.uniform(0.1, 1.0), 0.0])
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
                self.cli_ok("signal", name, "--input", json.dumps({"by": "cli"}), "--ttl", "0")
            elif not self.nf.signal(name, {"by": "api"}, ttl=0).resumed:
                self.counts["signals that found no waiter (dropped)"] += 1
            self.counts["signals sent"] += 1

    # The workflow features: kept signals, start keys, child instances, timed waits ------------

    def instance_started(self, instance: str, expect: str, detail: dict[str, Any]) -> None:
        self.record(f"instance:{instance}", "instance", expect, detail)
        self.counts["instances started"] += 1

    def send_kept(self, name: str, token: str, ttl: str, cli: bool) -> dict[str, Any]:
        """Send signal ``name`` with ``token`` in its input (nobody waits for it yet: it is kept);
        recorded as kind kept with its outcome."""
        assert self.nf is not None
        began = time.time()
        if cli:
            entry = json.loads(
                self.cli_ok("signal", name, "--input", json.dumps({"token": token}), "--ttl", ttl, "--json")
            )
            resumed, kept_until = list(entry.get("resumed") or []), entry.get("kept_until")
            if isinstance(kept_until, str):  # the command line says when in ISO 8601, to the millisecond
                kept_until = _iso_seconds(kept_until)
        else:
            outcome = self.nf.signal(name, {"token": token}, ttl=ttl)
            resumed, kept_until = list(outcome.resumed), outcome.kept_until
        detail = {
            "name": name,
            "token": token,
            "ttl": ttl,
            "via": "cli" if cli else "api",
            "began": began,
            "returned": time.time(),
            "resumed": resumed,
            "kept_until": kept_until,
        }
        self.record(f"kept:{token}", "kept", "kept", detail)
        self.counts["kept signals sent"] += 1
        return detail

    def kept_group(self, rng: random.Random) -> None:
        """Signals nobody waits for yet (kept), then instances that wait for their name: as many,
        fewer or more than the signals (those racing for fewer; the ones left waiting are answered
        by answer_signals, with no token). Now and then first one with a ttl of 1 s, whose waiters
        come after it expired: it must resume nothing; and now and then a ``prune`` as the waiters
        start (it removes expired kept signals: none of those live may go)."""
        group = self.number()
        name = f"kept-{group}"
        signals = rng.randint(1, 3)
        waiters = max(1, signals + rng.choice((-1, 0, 0, 1, 2)))
        if rng.random() < 0.3:
            sent = self.send_kept(name, f"ks{group}.x", EXPIRING_TTL, cli=False)
            if self.stop_workload.wait(
                max(0.0, sent["returned"] + nodeflow.parse_duration(EXPIRING_TTL) + 0.5 - time.time())
            ):
                return  # the workload stops: no waiters (it expires unused)
        for index in range(signals):
            self.send_kept(name, f"ks{group}.{index}", KEPT_TTL, cli=rng.random() < 0.1)
        clis = [rng.random() < 0.1 for _ in range(waiters)]
        numbers = [self.number() for _ in range(waiters)]
        prune = rng.choice(("api", "cli", None, None, None))  # it removes expired kept signals, never live ones

        def start(index: int) -> None:
            given, began = {"n": numbers[index], "name": name, "group": group}, time.time()
            try:
                if clis[index]:
                    instance = self.cli_ok("start", "chaos-kept", "--input", json.dumps(given)).strip()
                else:
                    assert self.nf is not None
                    instance = self.nf.start("chaos-kept", given)
                self.instance_started(
                    instance, "completed", {**given, "via": "cli" if clis[index] else "api", "began": began}
                )
            except Exception as error:
                self.driver_error("kept waiter", error)

        threads = [threading.Thread(target=start, args=(index,), daemon=True) for index in range(waiters)]
        for thread in threads:  # at once: they race for the kept signals (and a prune, now and then)
            thread.start()
        if prune == "cli":
            self.cli_ok("prune", "--older-than", "1d")
        elif prune == "api":
            assert self.nf is not None
            self.nf.prune("1d")
        if prune is not None:
            self.counts[f"prunes ({prune})"] += 1
        for thread in threads:
            thread.join(60)
        self.counts["kept-signal groups"] += 1

    def start_keyed(self, rng: random.Random) -> None:
        """Starts of one new key from 2-3 threads and 0-2 processes at once (each with its own input:
        the one told "new" must be the one whose input the instance has); now and then a later start
        with an older key, and one with an older key of another definition (refused)."""
        key = f"chaos-key-{self.number()}"
        vias = ["api"] * rng.randint(2, 3) + ["cli"] * rng.choice((0, 1, 1, 2))
        rng.shuffle(vias)
        barrier = threading.Barrier(len(vias))

        def start(index: int, via: str) -> None:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(10)
            try:
                self.keyed_call(key, str(index), via)
            except Exception as error:
                self.driver_error("keyed start", error)

        threads = [threading.Thread(target=start, args=item, daemon=True) for item in enumerate(vias)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with self.mutex:
            self.keys.append(key)
            older = self.keys[rng.randrange(len(self.keys))]
        if rng.random() < 0.3:
            self.keyed_call(older, f"again-{self.number()}", "cli" if rng.random() < 0.3 else "api")
        if rng.random() < 0.15:
            self.keyed_call(older, f"other-{self.number()}", "api", definition="chaos-b")
        self.counts["start keys"] += 1

    def keyed_call(self, key: str, call: str, via: str, definition: str = "chaos-keyed") -> None:
        """One start with ``key``, recorded as kind keyed: the id it got, and whether it was new."""
        assert self.nf is not None
        given, began = {"n": self.number(), "key": key, "call": call}, time.time()
        instance: str | None = None
        new: bool | None = None
        refused: str | None = None
        try:
            if via == "cli":
                done = self.cli("start", definition, "--input", json.dumps(given), "--key", key)
                if done.returncode != 0:
                    raise RuntimeError(f"start --key exited {done.returncode}: {done.stderr.strip()[-500:]}")
                instance, new = done.stdout.strip(), "already" not in done.stderr
            else:
                instance, new = self.nf.workflows.begin(definition, given, key)
        except nodeflow.InvalidInput as error:
            refused = str(error)
        except Exception as error:
            self.driver_error("keyed start", error)
            self.record(
                f"keyed:{key}:{call}",
                "keyed",
                "error",
                {"key": key, "call": call, "via": via, "definition": definition, "error": str(error)},
            )
            return
        detail = {
            "key": key,
            "call": call,
            "via": via,
            "definition": definition,
            "instance": instance,
            "new": new,
            "refused": refused,
            "began": began,
            "returned": time.time(),
        }
        self.record(f"keyed:{key}:{call}", "keyed", "refused" if definition != "chaos-keyed" else "one id", detail)
        self.counts["keyed starts"] += 1
        if new and instance is not None:
            self.instance_started(instance, "completed", {**given, "via": via, "began": began})

    def start_parent(self, rng: random.Random) -> None:
        """A chaos-parent: mode ok (its child completes), timed (its run has a timeout; its child's
        answer comes in time, or not), doom (its child fails on purpose: it faults), or cancel (it
        is cancelled 0-1.5 s after its child exists, while the child runs: the child is cancelled
        too; or, one in four, 0.3-2.5 s after its start, perhaps before its run made the child). The
        first four are one of each mode, in a seeded order (every run has each)."""
        assert self.nf is not None
        n, roll, began = self.number(), rng.random(), time.time()
        mode = "ok" if roll < 0.35 else "timed" if roll < 0.65 else "doom" if roll < 0.8 else "cancel"
        first = False
        if self.counts["parents started"] == 0:
            self.first_modes = rng.sample(("ok", "timed", "doom", "cancel"), 4)
        if self.counts["parents started"] < len(self.first_modes):
            mode, first = self.first_modes[self.counts["parents started"]], True
        self.counts["parents started"] += 1
        if mode == "timed":  # in time, or not (CHILD_TIMEOUT 8 s: the faults delay a child's bursts by seconds)
            delay = rng.uniform(0.1, 0.6) if rng.random() < 0.5 else rng.uniform(9.0, 10.0)
        else:
            delay = rng.uniform(0.1, 1.0)
        given = {"n": n, "mode": mode, "doom": mode == "doom", "hold": mode == "cancel", "delay": round(delay, 2)}
        if rng.random() < 0.1:
            instance, via = self.cli_ok("start", "chaos-parent", "--input", json.dumps(given)).strip(), "cli"
        else:
            instance, via = self.nf.start("chaos-parent", given), "api"
        expect = {"ok": "completed", "timed": "completed", "doom": "faulted", "cancel": "cancelled"}[mode]
        self.instance_started(instance, expect, {**given, "via": via, "began": began})
        if mode == "cancel":
            plan: dict[str, Any] = {"parent": instance, "cli": rng.random() < 0.2}
            if rng.random() < 0.25 and not first:
                plan["due"] = time.monotonic() + rng.uniform(0.3, 2.5)
            else:
                plan["due"], plan["after_child"] = None, rng.uniform(0.0, 1.5)
            with self.mutex:
                self.cancels.append(plan)

    def cancel_parents(self) -> None:
        """Cancel the parents (mode cancel) whose time has come (all of them once the run settles)."""
        assert self.nf is not None
        now = time.monotonic()
        with self.mutex:
            plans = list(self.cancels)
        unborn = [plan["parent"] for plan in plans if plan["due"] is None]
        if unborn:
            marks = ", ".join("?" * len(unborn))
            born = {
                row[0]
                for row in self.nf.store.read(
                    lambda conn: conn.execute(
                        f"SELECT parent FROM instances WHERE parent IN ({marks})", tuple(unborn)
                    ).fetchall()
                )
            }
            for plan in plans:
                if plan["due"] is None and plan["parent"] in born:
                    plan["due"] = now + plan["after_child"]
        due = [plan for plan in plans if self.settling or (plan["due"] is not None and plan["due"] <= now)]
        with self.mutex:
            self.cancels = [plan for plan in self.cancels if all(plan is not other for other in due)]
        for plan in due:
            parent, cli = plan["parent"], plan["cli"]
            try:
                if cli:
                    done = self.cli("cancel", parent, "--reason", "chaos: cancelled while its child runs")
                    if done.returncode != 0 and "already" not in done.stderr:
                        raise RuntimeError(f"cancel exited {done.returncode}: {done.stderr.strip()[-500:]}")
                else:
                    self.nf.cancel(parent, "chaos: cancelled while its child runs")
                self.counts["parents cancelled"] += 1
            except nodeflow.InvalidInput:
                pass  # cancelled already (the backstop, a second look)
            except Exception as error:
                self.driver_error("cancel parent", error)
                with self.mutex:
                    self.cancels.append({"parent": parent, "cli": False, "due": now + 1.0})

    def start_timed(self, rng: random.Random) -> None:
        """A chaos-timed instance, whose answer answer_timed sends 0.1-3.5 s after it sees the wait
        (the wait times out after 1.5 s): with ttl 0 (a late answer is dropped) or 10m (kept)."""
        assert self.nf is not None
        n, began = self.number(), time.time()
        given = {"n": n, "name": f"timed-{n}"}
        instance = self.nf.start("chaos-timed", given)
        self.instance_started(instance, "completed", {**given, "via": "api", "began": began})
        with self.mutex:
            self.timed[instance] = {
                "n": n,
                "name": given["name"],
                "delay": round(rng.uniform(0.1, 3.5), 2),
                "ttl": rng.choice(("0", KEPT_TTL)),
                "started": time.monotonic(),
                "seen": None,
                "seen_at": None,
            }

    def answer_timed(self, rng: random.Random) -> None:
        """Answer each chaos-timed instance ``delay`` seconds after it was seen waiting (or 6 s after
        its start if it never was): a signal with a token, recorded as kind answer with its outcome."""
        assert self.nf is not None
        with self.mutex:
            pending = dict(self.timed)
        if not pending:
            return
        marks = ", ".join("?" * len(pending))
        rows = self.nf.store.read(
            lambda conn: conn.execute(
                f"SELECT id, status, waiting_for FROM instances WHERE id IN ({marks})", tuple(pending)
            ).fetchall()
        )
        now = time.monotonic()
        for instance, status, waiting_for in rows:
            plan = pending[instance]
            if plan["seen"] is None and status == "waiting" and waiting_for == plan["name"]:
                plan["seen"], plan["seen_at"] = now, time.time()
            due = plan["seen"] + plan["delay"] if plan["seen"] is not None else plan["started"] + 6.0
            if now < due:
                continue
            with self.mutex:
                self.timed.pop(instance, None)
            token, began = f"ts{plan['n']}", time.time()
            outcome = self.nf.signal(plan["name"], {"token": token}, ttl=plan["ttl"])
            detail = {
                "instance": instance,
                "name": plan["name"],
                "token": token,
                "ttl": plan["ttl"],
                "delay": plan["delay"],
                "seen": plan["seen_at"],
                "began": began,
                "returned": time.time(),
                "resumed": list(outcome.resumed),
                "kept_until": outcome.kept_until,
            }
            self.record(f"answer:{instance}", "answer", "once", detail)
            self.counts["timed answers sent"] += 1

    # Branches: parallel and for_each ----------------------------------------------------------

    def start_branchy(self, rng: random.Random) -> None:
        """An instance of chaos-fan (parallel, join all; a for_each in turn nested in a branch),
        chaos-race (parallel, join any), chaos-each (for_each in parallel, 3-8 items) or chaos-turn
        (for_each in turn, 2-4 items). The first four are one of each, in a seeded order."""
        assert self.nf is not None
        n, roll, began = self.number(), rng.random(), time.time()
        workflow = (
            "chaos-fan" if roll < 0.3 else "chaos-race" if roll < 0.55 else "chaos-each" if roll < 0.8 else "chaos-turn"
        )
        done = self.counts["branch instances started"]
        if done == 0:
            self.first_branchy = rng.sample(BRANCHY, len(BRANCHY))
        if done < len(self.first_branchy):
            workflow = self.first_branchy[done]
        self.counts["branch instances started"] += 1
        given: dict[str, Any] = {"n": n}
        if workflow == "chaos-fan":
            given["items"] = [f"f{n}.{index}" for index in range(rng.randint(1, 3))]
        elif workflow == "chaos-race":
            given["lag"] = rng.random() < 0.4  # slow's timer 1.5 s: quick wins; else a tie of two 300 ms timers
        elif workflow == "chaos-each":
            given["items"] = [f"e{n}.{index}" for index in range(rng.randint(3, 8))]
        else:
            given["items"] = [f"t{n}.{index}" for index in range(rng.randint(2, 4))]
        if rng.random() < 0.1:
            instance, via = self.cli_ok("start", workflow, "--input", json.dumps(given)).strip(), "cli"
        else:
            instance, via = self.nf.start(workflow, given), "api"
        self.instance_started(instance, "completed", {**given, "via": via, "began": began})
        self.counts[f"started {workflow}"] += 1

    def answer_fans(self, rng: random.Random) -> None:
        """Answer each chaos-fan branch seen waiting for its signal 0.1-1 s after it was seen (at once
        while the run settles), with ttl 0 and the signal's name as its token; again 3 s later if it
        still waits."""
        assert self.nf is not None
        waiting = self.nf.store.read(
            lambda conn: conn.execute(
                "SELECT instance, name, waiting_for FROM branches WHERE waiting_for LIKE 'fan-%'"
            ).fetchall()
        )
        now = time.monotonic()
        for instance, branch, name in waiting:
            wait = self.fan_waits.setdefault((instance, branch), [now, rng.uniform(0.1, 1.0), 0.0])
            if (now - wait[0] < wait[1] and not self.settling) or now - wait[2] < 3.0:
                continue
            if wait[2]:
                self.counts["fan signals sent again"] += 1
            wait[2] = now
            if not self.nf.signal(name, {"token": name}, ttl=0).resumed:
                self.counts["fan signals that found no waiter (dropped)"] += 1
            self.counts["fan signals sent"] += 1

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
        if (
            hostile
            and not self.faults["freezes replaced"]
            and self.faults["freeze"] < 3
            and (left < 0.85 * self.options.seconds)
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
            self.say(
                f"SIGSTOP {what}; SIGCONT in {victim.wake_at - time.monotonic():.1f}s"
                + (" (it holds the writers' turn)" if row["writer"] else "")
            )
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
        row = self.fault(
            "freeze", victim, at=at, epoch=office["epoch"], detail={"seconds": round(seconds, 2), "tries": attempt}
        )
        self.faults["freeze"] += 1
        self.faults["of which the scheduler"] += 1
        victim.state, victim.wake_at, victim.frozen_by = "stopped", time.monotonic() + seconds, row
        self.no_faults_until = time.monotonic() + self.stall_after + 3.5
        self.say(
            f"FREEZE the scheduler {victim.node_id} (pid {pid}, epoch {office['epoch']}) for {seconds:.1f}s: "
            f"a standby must take office within {self.stall_after + 2:g}s"
        )
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
                self.observe(
                    f"node {member.node_id} (pid {member.pid}, life {member.lives}) exited by itself with "
                    f"code {code} during {self.phase}:\n{member.tail()}"
                )
                member.state, member.wake_at = "down", now
            elif member.state == "terminating" and code is not None:
                member.ended(f"exit {code} after SIGTERM")
                if member.fault_row is not None:
                    member.fault_row["until"] = time.time()
                    member.fault_row = None
                if code != 0:
                    self.observe(
                        f"node {member.node_id} (pid {member.pid}) exited {code} after SIGTERM:\n{member.tail()}"
                    )
                member.state, member.wake_at = "down", now + member.then_restart
            elif member.state == "terminating" and now - member.term_at > TERM_BOUND:
                self.observe(
                    f"node {member.node_id} (pid {member.pid}) still running {TERM_BOUND:.0f} s after "
                    f"SIGTERM; killed:\n{member.tail()}"
                )
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
            if thread.name not in ("chaos-signals", "chaos-timed-answers", "chaos-fan-answers"):  # they go on
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
            # A job nacked late in the chaos waits out its retry delay (up to a minute, longer as
            # refunded deliveries count in it): it is not lost, and the bound waits for its due time.
            due = self.nf.store.read(
                lambda conn: conn.execute(
                    "SELECT MAX(available_at) FROM messages WHERE queue LIKE 'chaos.%' AND lease_owner IS NULL"
                ).fetchone()[0]
            )
            if due is not None:
                due_in = due - time.time() + 5.0
                deadline = min(
                    began + self.options.settle + RETRY_DELAY_MAX + 5.0, max(deadline, time.monotonic() + due_in)
                )
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
            self.say(
                f"NOT settled within {self.options.settle:.0f}s (instances running or waiting, messages "
                f"queued, timers due): {busy}"
            )
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
    rerun = (
        f"python3 tests/chaos.py --seed {chaos.seed} --nodes {options.nodes} --replicas {options.replicas} "
        f"--seconds {options.seconds:g}"
        + (f" --rate {options.rate:g}" if options.rate != 1 else "")
        + (f" --faults {options.faults:g}" if options.faults != 1 else "")
        + (f" --hostile {options.hostile:g}" if options.hostile != 1 else "")
        + (f" --stall-after {options.stall_after}" if options.stall_after != STALL_AFTER else "")
    )
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
                {
                    "key": item.key,
                    "invariant": item.title,
                    "checked": item.checked,
                    "violations": len(item.violations),
                    "evidence": item.violations[:200],
                }
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
    parser.add_argument(
        "--hostile",
        type=float,
        default=1.0,
        help="the hostile mix (poison, exiting calls, blocking handlers, undecodable messages, "
        "scheduler freezes): a multiplier; 0 turns it off (default 1)",
    )
    parser.add_argument("--stall-after", default=STALL_AFTER, help=f"the nodes' --stall-after (default {STALL_AFTER})")
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
