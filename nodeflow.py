#!/usr/bin/env python3
"""nodeflow: several cooperating processes on one host, coordinated through one directory.

Architecture in a few lines:
  - A cluster is one SQLite file (WAL mode) and a lock folder beside it, ``PATH.d/``.
  - Store: opens the database, owns the schema and its migrations, and runs every write inside
    ``BEGIN IMMEDIATE`` with bounded retries on SQLITE_BUSY.
  - Locks: kernel ``flock`` on one open file description per held lock in ``PATH.d/locks/``;
    the kernel wakes a blocked waiter the moment the lock is free and frees a dead holder's lock.
  - Fencing: every acquisition takes the next token for its name from SQLite, in one commit.
  - Doorbells: a datagram socket per listening process in ``PATH.d/nodes/``, rung after commits.
  - Bus: queues in SQLite with leases and dead letters; one process's writes share transactions,
    which wait for the disk only when a write's loss could lose more than a redelivery.
  - Instructions: an ordered log with a cursor per node, under change tokens and a memory cache.
  - Membership: a node's liveness lock says it is alive; its heartbeat, timed by each peer, says it
    stalled, and then its leases, instance locks and scheduler office are taken from it.
  - Election: one node holds ``scheduler.lock`` and the current epoch; only it fires timers.
  - Workflows: versioned definitions, cached blueprints; instances run in bursts under instance locks,
    each burst every path of the instance that can go on (its main path, parallel and for_each
    branches); signals kept for the next waiter, waits that time out, child instances, retention.
  - Node: the asyncio daemon of ``serve``; user code runs in threads of its own, never the node's.
  - The handle returned by ``connect()`` is the Python API; ``main()`` is the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import ctypes
import datetime
import errno
import fcntl
import functools
import hashlib
import hmac
import importlib
import importlib.util
import inspect
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import secrets
import select
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import weakref
import zoneinfo
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, replace
from queue import Empty, SimpleQueue
from typing import Any, TypeVar, overload

__all__ = [
    "NodeflowError",
    "InvalidInput",
    "NotFound",
    "LockTimeout",
    "StoreError",
    "StoreBusy",
    "UnsupportedFilesystem",
    "NotADatabase",
    "CorruptDatabase",
    "SchemaTooNew",
    "Settings",
    "parse_duration",
    "Store",
    "LockInfo",
    "HeldLock",
    "LeaseLost",
    "Message",
    "DeadLetter",
    "ChangeToken",
    "MemoryCache",
    "Cluster",
    "connect",
    "Node",
    "handler",
    "NodeIdInUse",
    "LostOffice",
    "Timer",
    "InvalidDefinition",
    "DefinitionInfo",
    "Instance",
    "JournalEntry",
    "SignalOutcome",
    "Blueprint",
    "Template",
    "compile_definition",
    "parse_definition",
    "activity",
    "current_call",
    "CallContext",
    "SETTLED",
    "main",
]

__version__ = "0.1.0"

T = TypeVar("T")
log = logging.getLogger("nodeflow")


# ══════════════════════════════════════════════════════════════════════════════════════════
# 1. Errors and settings: the exception tree, exit codes, durations and defaults.
# ══════════════════════════════════════════════════════════════════════════════════════════


class NodeflowError(Exception):
    """Root of every error nodeflow raises on purpose; its message is written for a person."""

    exit_code = 1


class InvalidInput(NodeflowError, ValueError):
    """Bad input from the caller: nothing was changed."""

    exit_code = 2


class NotFound(InvalidInput):
    """No instance, definition or version by the id or name given (over HTTP: 404)."""


class LockTimeout(NodeflowError, TimeoutError):
    """A lock could not be had within the time given."""

    def __init__(self, name: str, waited: float, holder: LockInfo | None) -> None:
        self.name = name
        self.waited = waited
        self.holder = holder
        who = f"held by {holder.describe()}" if holder else "held by another process"
        when = "it is" if waited == 0 else f"gave up after {_format_seconds(waited)};"
        super().__init__(f"lock {_show_name(name)} is busy: {when} {who}")


class StoreError(NodeflowError):
    """The database cannot be used; the message says why and what to do."""


class StoreBusy(StoreError):
    """Another writer kept the database locked for longer than the busy timeout."""


class UnsupportedFilesystem(StoreError):
    """The database would live on a filesystem where SQLite WAL and file locks are unsafe."""


class NotADatabase(StoreError):
    """The file is not a nodeflow database."""


class CorruptDatabase(StoreError):
    """SQLite reports the database file as damaged."""


class SchemaTooNew(StoreError):
    """The database was written by a newer nodeflow; it is left untouched."""


class NodeIdInUse(NodeflowError):
    """Another live process already runs as this node id."""


class LostOffice(NodeflowError):
    """The scheduler's election epoch is no longer the current one: another node holds office."""


MAX_DURATION = 100 * 365.25 * 86400.0  # a century: any longer and a due time would not fit a calendar
_DURATION_UNITS = (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001))
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_duration(value: str | float | int, what: str = "duration") -> float:
    """Seconds in a duration such as ``1.5s``, ``250ms``, ``1m30s`` or a bare number of seconds.

    Units run from largest to smallest, each at most once, so ``30s1m`` is refused as a likely typo.
    """
    if isinstance(value, bool):
        raise InvalidInput(f"{what}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds) or seconds < 0:
            raise InvalidInput(f"{what}: {value!r} is not a duration; give zero or more seconds")
        return _within_a_century(seconds, value, what)
    if not isinstance(value, str):
        raise InvalidInput(f"{what}: expected a duration, got {type(value).__name__}")
    text = value.strip()
    if _PLAIN_NUMBER.fullmatch(text):
        return _within_a_century(float(text), value, what)
    order = [unit for unit, _ in _DURATION_UNITS]
    total, position, last_rank = 0.0, 0, -1
    for match in _DURATION_PART.finditer(text):
        rank = order.index(match.group(2))
        if match.start() != position or rank <= last_rank:
            break
        total += float(match.group(1)) * dict(_DURATION_UNITS)[match.group(2)]
        position, last_rank = match.end(), rank
    else:
        if position == len(text) and position > 0:
            return _within_a_century(total, value, what)
    raise InvalidInput(
        f"{what}: {value!r} is not a duration; use a number and a unit (ms, s, m, h, d), "
        "largest first, such as 1.5s, 250ms or 1m30s"
    )


def _within_a_century(seconds: float, given: object, what: str) -> float:
    if not seconds <= MAX_DURATION:  # also NaN and infinity
        shown = _show_name(given) if isinstance(given, str) else repr(given)
        raise InvalidInput(f"{what}: {shown} is longer than 100 years, the longest duration nodeflow takes")
    return seconds


@dataclass(frozen=True)
class Settings:
    """Tunables of one handle; the defaults are the safe ones."""

    busy_timeout: float = 10.0  # longest a write waits for another writer, in seconds
    synchronous: str = "FULL"  # FULL: durable on return; NORMAL: may lose the last commits on power loss
    poll_interval: float = 1.0  # a waiter re-reads the database this often when no doorbell rings
    max_deliveries: int = 5  # deliveries of one message before it becomes a dead letter
    max_body_bytes: int = 1 << 20  # a message body, as JSON text
    instruction_max_age: float = 2 * 86400.0  # instructions older than this are pruned
    instruction_max_count: int = 100_000  # and beyond this many, the oldest

    def __post_init__(self) -> None:
        if self.synchronous not in ("FULL", "NORMAL"):
            raise InvalidInput(f"synchronous must be FULL or NORMAL, not {self.synchronous!r}")
        for name in ("busy_timeout", "poll_interval", "instruction_max_age"):
            object.__setattr__(self, name, parse_duration(getattr(self, name), name))
        if self.poll_interval <= 0:
            raise InvalidInput("poll_interval must be more than zero, such as 1s or 200ms")
        for name in ("max_deliveries", "max_body_bytes", "instruction_max_count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(f"{name} must be a whole number of at least 1, not {value!r}")


def default_db_path() -> str:
    return os.environ.get("NODEFLOW_DB") or "nodeflow.db"


def _format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.3g}s" if seconds < 1000 else f"{seconds:.0f}s"  # never 7.2e+03s


CLOCK_STEP_NOTICE = 2.0  # a wall clock that moved this much more or less than the monotonic clock stepped


class ClockWatch:
    """Notices steps of the wall clock (an operator, NTP) by comparing it with the monotonic clock.

    Due times and leases are wall-clock times in the database (every process must read the same
    clock); a step moves them all at once. ``stepped()`` says by how much it stepped since it was
    last asked: positive forward, negative back, 0.0 for no step.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._last = (time.time(), time.monotonic())

    def stepped(self) -> float:
        now = (time.time(), time.monotonic())
        with self._mutex:
            last, self._last = self._last, now
        step = (now[0] - last[0]) - (now[1] - last[1])
        return step if abs(step) >= CLOCK_STEP_NOTICE else 0.0


def _iso_text(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment).astimezone().isoformat(timespec="milliseconds")


def one_line(text: str) -> str:
    """Text made safe for one line of a terminal or a log: every character that does not print
    (controls, newlines, bidi overrides such as U+202E, zero-width ones) is shown escaped, so input
    quoted in a message can neither break the line nor reorder what is shown around it."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def _show_name(name: str, limit: int = 80) -> str:
    shown = repr(name)
    return shown if len(shown) <= limit else shown[: limit - 5] + "...'"


# ══════════════════════════════════════════════════════════════════════════════════════════
# 2. Store: the SQLite file, its lock folder, file modes, schema migrations and write retries.
# ══════════════════════════════════════════════════════════════════════════════════════════

SCHEMA_VERSION = 9
APPLICATION_ID = 0x6E666C77  # "nflw": tells a nodeflow database from any other SQLite file

_MIGRATIONS: dict[int, str] = {
    1: """
        CREATE TABLE lock_fences (
            name     TEXT PRIMARY KEY,
            fence    INTEGER NOT NULL,
            acquired REAL NOT NULL,
            pid      INTEGER NOT NULL,
            node     TEXT
        ) WITHOUT ROWID;
    """,
    2: """
        CREATE TABLE messages (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            queue        TEXT NOT NULL,
            body         TEXT NOT NULL,
            priority     INTEGER NOT NULL,
            available_at REAL NOT NULL,
            lease_owner  TEXT,
            attempts     INTEGER NOT NULL DEFAULT 0,
            dedup_key    TEXT,
            created      REAL NOT NULL,
            last_error   TEXT
        );
        CREATE INDEX messages_next ON messages (queue, priority DESC, available_at);
        CREATE UNIQUE INDEX messages_dedup ON messages (queue, dedup_key) WHERE dedup_key IS NOT NULL;
        CREATE INDEX messages_leased ON messages (lease_owner) WHERE lease_owner IS NOT NULL;
        CREATE TABLE dead_letters (
            id         INTEGER PRIMARY KEY,
            queue      TEXT NOT NULL,
            body       TEXT NOT NULL,
            priority   INTEGER NOT NULL,
            attempts   INTEGER NOT NULL,
            created    REAL NOT NULL,
            died       REAL NOT NULL,
            last_error TEXT
        );
        CREATE INDEX dead_letters_queue ON dead_letters (queue, id);
        CREATE TABLE instructions (
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            topic   TEXT NOT NULL,
            payload TEXT NOT NULL,
            origin  TEXT NOT NULL,
            created REAL NOT NULL
        );
        CREATE TABLE instruction_cursors (
            node     TEXT PRIMARY KEY,
            position INTEGER NOT NULL,
            updated  REAL NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value ANY
        ) WITHOUT ROWID;
    """,
    3: """
        CREATE TABLE nodes (
            id        TEXT PRIMARY KEY,
            pid       INTEGER NOT NULL,
            host      TEXT NOT NULL,
            role      TEXT NOT NULL,
            started   REAL NOT NULL,
            heartbeat REAL NOT NULL,
            state     TEXT NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE election (
            id    INTEGER PRIMARY KEY CHECK (id = 1),
            epoch INTEGER NOT NULL,
            node  TEXT,
            since REAL
        );
        INSERT INTO election (id, epoch, node, since) VALUES (1, 0, NULL, NULL);
        CREATE TABLE timers (
            name       TEXT PRIMARY KEY,
            queue      TEXT NOT NULL,
            body       TEXT NOT NULL,
            cron       TEXT,
            tz         TEXT,
            due        REAL,
            created    REAL NOT NULL,
            fired      INTEGER NOT NULL DEFAULT 0,
            last_fired REAL
        ) WITHOUT ROWID;
        CREATE INDEX timers_due ON timers (due) WHERE due IS NOT NULL;
    """,
    4: """
        CREATE TABLE definitions (
            id      TEXT NOT NULL,
            version INTEGER NOT NULL,
            name    TEXT NOT NULL,
            body    TEXT NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (id, version)
        );
        CREATE TABLE signal_triggers (
            name       TEXT NOT NULL,
            definition TEXT NOT NULL,
            position   INTEGER NOT NULL,
            input      TEXT NOT NULL,
            PRIMARY KEY (name, definition, position)
        ) WITHOUT ROWID;
        CREATE TABLE instances (
            id          TEXT PRIMARY KEY,
            definition  TEXT NOT NULL,
            version     INTEGER NOT NULL,
            status      TEXT NOT NULL,
            position    TEXT,
            variables   TEXT NOT NULL,
            seq         INTEGER NOT NULL DEFAULT 0,
            fence       INTEGER NOT NULL DEFAULT 0,
            steps       INTEGER NOT NULL DEFAULT 0,
            attempt     INTEGER NOT NULL DEFAULT 0,
            bookmark    TEXT,
            waiting_for TEXT,
            wake_at     REAL,
            resume      TEXT,
            error       TEXT,
            started_by  TEXT NOT NULL,
            created     REAL NOT NULL,
            updated     REAL NOT NULL,
            ended       REAL
        );
        CREATE INDEX instances_status ON instances (status, created);
        CREATE INDEX instances_waiting ON instances (waiting_for) WHERE waiting_for IS NOT NULL;
        CREATE TABLE journal (
            instance TEXT NOT NULL,
            step     INTEGER NOT NULL,
            activity TEXT NOT NULL,
            type     TEXT NOT NULL,
            node     TEXT NOT NULL,
            fence    INTEGER NOT NULL,
            started  REAL NOT NULL,
            ended    REAL NOT NULL,
            outcome  TEXT NOT NULL,
            PRIMARY KEY (instance, step)
        ) WITHOUT ROWID;
    """,
    5: """
        CREATE INDEX instances_created ON instances (created, id);
        CREATE INDEX instances_definition ON instances (definition, created, id);
    """,
    6: """
        CREATE INDEX journal_ended ON journal (ended);
    """,
    7: """
        CREATE TABLE elections (
            epoch INTEGER PRIMARY KEY,
            node  TEXT NOT NULL,
            pid   INTEGER NOT NULL,
            since REAL NOT NULL
        );
        CREATE TABLE timer_firings (
            name    TEXT NOT NULL,
            due     REAL NOT NULL,
            fired   REAL NOT NULL,
            epoch   INTEGER NOT NULL,
            node    TEXT,
            message INTEGER NOT NULL,
            PRIMARY KEY (name, due)
        ) WITHOUT ROWID;
        CREATE INDEX timer_firings_fired ON timer_firings (fired);
        ALTER TABLE nodes ADD COLUMN blueprints TEXT;
    """,
    8: """
        ALTER TABLE messages ADD COLUMN refunds INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE messages ADD COLUMN suspect INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX messages_suspects ON messages (available_at) WHERE suspect = 1;
        ALTER TABLE instances ADD COLUMN unwaited INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE nodes ADD COLUMN stall_after REAL;
    """,
    9: """
        CREATE TABLE kept_signals (
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            name    TEXT NOT NULL,
            input   TEXT NOT NULL,
            sent    REAL NOT NULL,
            expires REAL NOT NULL,
            by      TEXT NOT NULL
        );
        CREATE INDEX kept_signals_name ON kept_signals (name, id);
        CREATE INDEX kept_signals_expires ON kept_signals (expires);
        ALTER TABLE instances ADD COLUMN start_key TEXT;
        ALTER TABLE instances ADD COLUMN parent TEXT;
        ALTER TABLE instances ADD COLUMN child TEXT;
        ALTER TABLE instances ADD COLUMN wake_message INTEGER;
        CREATE INDEX instances_parent ON instances (parent) WHERE parent IS NOT NULL;
        CREATE UNIQUE INDEX instances_start_key ON instances (start_key) WHERE start_key IS NOT NULL;
        CREATE INDEX instances_ended ON instances (updated) WHERE status IN ('completed', 'faulted', 'cancelled');
        ALTER TABLE instances ADD COLUMN forked TEXT;
        ALTER TABLE instances ADD COLUMN call_first INTEGER;
        ALTER TABLE instances ADD COLUMN path_steps INTEGER;
        ALTER TABLE journal ADD COLUMN branch TEXT;
        CREATE TABLE branches (
            instance    TEXT NOT NULL,
            name        TEXT NOT NULL,
            fork        TEXT NOT NULL,
            position    TEXT,
            bookmark    TEXT,
            waiting_for TEXT,
            wake_at     REAL,
            resume      TEXT,
            attempt     INTEGER NOT NULL DEFAULT 0,
            child       TEXT,
            locals      TEXT NOT NULL,
            forked      TEXT,
            call_first  INTEGER,
            path_steps  INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (instance, name)
        ) WITHOUT ROWID;
        CREATE INDEX branches_waiting ON branches (waiting_for) WHERE waiting_for IS NOT NULL;
        CREATE INDEX branches_child ON branches (child) WHERE child IS NOT NULL;
    """,
}

# Filesystems on which SQLite WAL (shared memory) or kernel file locks are not reliable.
_UNSAFE_FILESYSTEMS = {
    "nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "9p", "virtiofs", "afs", "ceph",
    "glusterfs", "lustre", "ncpfs", "coda", "gfs2", "ocfs2", "davfs", "sshfs",
}  # fmt: skip


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def filesystem_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the filesystem holding ``path``: longest mount-point prefix of its real path."""
    real = os.path.realpath(path)
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as lines:
            best_point, best_type = "", None
            for line in lines:
                before, _, after = line.partition(" - ")
                fields, types = before.split(), after.split()
                if len(fields) < 5 or not types:
                    continue
                point = _unescape_mountinfo(fields[4])
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best_point):  # a later mount over the same point wins
                    best_point, best_type = point, types[0]
            return best_type
    except OSError:
        return None  # no /proc: nothing to check against


def check_local_filesystem(path: str, mountinfo: str = "/proc/self/mountinfo") -> None:
    fstype = filesystem_type(path, mountinfo)
    if fstype and (fstype in _UNSAFE_FILESYSTEMS or fstype.startswith("fuse")):
        raise UnsupportedFilesystem(
            f"{path} is on a {fstype} filesystem, where SQLite's WAL mode and kernel file locks "
            "are not safe; put the database on a local disk and pass it with --db"
        )


# SQLite's primary result codes (the low byte of sqlite_errorcode), which sort its errors; the
# English text of a message is only looked at for an error that carries no code.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = (
    5,
    6,
    8,
    10,
    11,
    13,
    26,
)


def _sqlite_code(error: sqlite3.Error) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _is_busy(error: sqlite3.Error) -> bool:
    code = _sqlite_code(error)
    if code is not None:
        return code in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(error)
    return "database is locked" in text or "database is busy" in text or "database table is locked" in text


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _kernel_flock_owners() -> dict[tuple[int, int, int], int] | None:
    """(major, minor, inode) -> pid for every granted flock on the host, from /proc/locks."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as table:
            text = table.read()
    except OSError:
        return None
    owners: dict[tuple[int, int, int], int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # "->" rows are blocked waiters
            continue
        try:
            major, minor, inode = fields[5].split(":")
            owners[(int(major, 16), int(minor, 16), int(inode))] = int(fields[4])
        except ValueError:
            continue
    return owners


def _held_lock_files(folder: str) -> list[str]:
    """The lock files under ``folder`` (a lock folder) that some process holds a flock on now."""
    owners = _kernel_flock_owners() or {}
    held = []
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                info = os.stat(os.path.join(root, name), follow_symlinks=False)
            except OSError:
                continue
            if (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino) in owners:
                held.append(os.path.join(root, name))
    return held


def database_path(path: str) -> str:
    """The one name of a database file, however it is reached: symbolic links and ``..`` resolved.

    The lock folder is named after it, so every path to one file leads to one lock folder. A
    symbolic link to nothing is refused: following it would create a database where it points.
    """
    given = os.path.abspath(path)
    if os.path.islink(given) and not os.path.exists(given):
        raise InvalidInput(
            f"database path {given} is a symbolic link to {os.readlink(given)!r}, which does not exist; "
            "give the path of the database itself, or remove the link"
        )
    return os.path.realpath(given)


def _private_directory(path: str, create: bool) -> bool:
    """Make sure ``path`` is a directory of mode 0700 that this user owns; False if absent."""
    if create:
        try:
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
        except FileExistsError:
            pass
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        raise StoreError(f"{path} should be nodeflow's lock folder but is not a directory; move it away")
    if info.st_uid != os.geteuid():
        raise StoreError(f"lock folder {path} belongs to another user (uid {info.st_uid}); refusing to use it")
    if info.st_mode & 0o022:
        raise StoreError(
            f"lock folder {path} can be written by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run: chmod 700 {path}"
        )
    return True


class Store:
    """One process's connection to the cluster database, safe to share between its threads."""

    def __init__(self, path: str, *, create: bool = True, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.path = database_path(path)
        self.lock_dir = self.path + ".d"
        self._refuse_an_older_lock_folder(os.path.abspath(path) + ".d")
        self._mutex = threading.Lock()  # the read connection
        self._write_mutex = threading.Lock()  # the write connection: reads never wait for a commit
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._write_level = self.settings.synchronous  # PRAGMA synchronous of the write connection now
        self._log_fd: int | None = None  # the -wal file, for sync_log(); opened on first use
        self._log_mutex = threading.Lock()  # held while syncing: close() waits for a sync under way
        self._identity_checked = 0.0  # when a write that need not last last looked at the file's identity
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise InvalidInput(f"database folder {folder} does not exist; create it or choose another --db")
        if os.path.isdir(self.path):
            raise InvalidInput(f"{self.path} is a directory; --db takes the path of the database file")
        check_local_filesystem(folder)
        exists = os.path.exists(self.path)
        if not exists and not create:
            raise StoreError(f"no nodeflow database at {self.path}; give --db or set NODEFLOW_DB")
        if exists:
            self._refuse_unusable_file()
            self._conn = self._open(self.path)
            try:
                _private_directory(self.lock_dir, create=True)
            except BaseException:
                self._conn.close()
                self._conn = None
                raise
        else:
            _private_directory(self.lock_dir, create=True)
            self._create_atomically()
            self._conn = self._open(self.path)
        opened = os.stat(self.path)
        self._identity = (opened.st_dev, opened.st_ino)
        self._largest = opened.st_size
        self._refusal: str | None = None  # set once the file is known not to be ours any more
        # Our -wal and -shm (made by the reads of _open): they stay the same files while we have a
        # connection open, and are ours to remove should the database be removed or replaced.
        self._companions = {suffix: _file_identity(self.path + suffix) for suffix in ("-wal", "-shm")}
        _LIVE_STORES.add(self)

    # Opening ------------------------------------------------------------------------------

    def _refuse_an_older_lock_folder(self, named: str) -> None:
        """Nodes of an older nodeflow that reach this file through a symbolic link keep their locks
        beside the link; this one keeps them beside the real file. Both at once would be two
        clusters on one file (two schedulers, one lock held twice): refused until they stop."""
        if named == self.lock_dir or not os.path.isdir(named):
            return
        held = _held_lock_files(named)
        if held:
            raise StoreError(
                f"{named} is the lock folder of processes of an older nodeflow that reach {self.path} through "
                f"{named[:-2]} ({len(held)} lock(s) held, such as {os.path.basename(held[0])}); this version keeps "
                f"the locks in {self.lock_dir}: stop those processes first"
            )

    def _refuse_unusable_file(self) -> None:
        info = os.stat(self.path)
        if not stat.S_ISREG(info.st_mode):
            raise NotADatabase(f"{self.path} is not a regular file, so not a nodeflow database")
        # One file, one cluster: through a second name SQLite would keep a second -wal and we a
        # second lock folder, and two clusters would write one file. A creator links the new file
        # in place and then drops its temporary name: wait out that moment before refusing.
        for _ in range(20):
            if info.st_nlink <= 1:
                break
            time.sleep(0.05)
            info = os.stat(self.path)
        else:
            raise StoreError(
                f"{self.path} has {info.st_nlink} hard links: each name would get its own -wal file and lock "
                "folder, and two clusters would write one file; remove the other names (find them with: "
                f"find / -xdev -samefile {self.path})"
            )
        if info.st_uid != os.geteuid():  # also for root: its -wal and -shm would lock the owner out
            raise StoreError(
                f"{self.path} belongs to another user (uid {info.st_uid}); run nodeflow as that user "
                "or choose another --db"
            )
        if info.st_size == 0:
            raise NotADatabase(
                f"{self.path} is an empty file, not a nodeflow database; remove it or choose another --db"
            )
        if not os.access(self.path, os.R_OK | os.W_OK) or not os.access(os.path.dirname(self.path), os.W_OK):
            raise StoreError(f"{self.path} is read-only for this user; nodeflow needs to write the file and its folder")

    def _create_atomically(self) -> None:
        """Build the database under a temporary name, then link it into place.

        Nobody ever sees a half-made database at ``path``, and two processes creating it at once
        end up with one database: the second link fails and that process opens the first's.
        """
        temp = os.path.join(self.lock_dir, f"creating-{os.getpid()}-{threading.get_ident()}.db")
        try:
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, 0o600)  # whatever the umask; SQLite gives -wal and -shm the same mode
            os.close(fd)  # closed before SQLite ever opens the file
            conn = self._connect(temp)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                self._migrate(conn, temp)
            finally:
                conn.close()
            try:
                os.link(temp, self.path)
            except FileExistsError:
                pass  # another process won the race; use its database
        except sqlite3.Error as error:
            raise self._translate(error) from error
        finally:
            for leftover in (temp, temp + "-wal", temp + "-shm"):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass

    def _connect(self, path: str) -> sqlite3.Connection:
        """A connection to the file at ``path``, which must exist: SQLite never creates one (it would
        make it 0644, at whatever a link points to); only _create_atomically makes databases."""
        try:
            conn = sqlite3.connect(
                f"file:{urllib.parse.quote(path)}?mode=rw",
                timeout=self.settings.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
                uri=True,
            )
        except sqlite3.Error as error:
            raise self._translate(error, path) from error
        try:
            conn.execute(f"PRAGMA synchronous={self.settings.synchronous}")
        except sqlite3.Error as error:
            conn.close()
            raise self._translate(error, path) from error
        return conn

    def _open(self, path: str) -> sqlite3.Connection:
        conn = self._connect(path)
        try:
            application_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if application_id != APPLICATION_ID:
                raise NotADatabase(
                    f"{path} is an SQLite database of another program, not a nodeflow one; choose another --db"
                )
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"{path} was written by a newer nodeflow (schema {version}; this one knows "
                    f"{SCHEMA_VERSION}); it was left untouched: upgrade nodeflow to use it"
                )
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # reads the schema pages
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            if version < SCHEMA_VERSION:
                self._migrate(conn, path)
            return conn
        except sqlite3.Error as error:
            conn.close()
            raise self._translate(error, path) from error
        except BaseException:
            conn.close()
            raise

    def _migrate(self, conn: sqlite3.Connection, path: str) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # re-read: another may have won
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(f"{path} was upgraded by a newer nodeflow while opening it; left untouched")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step].split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def file_problem(self) -> tuple[str, str] | None:
        """What became of the file at ``path`` if it is no longer the database this handle opened:
        ("removed" | "replaced" | "truncated" | "unreadable", a sentence), or None.

        Only ``os.stat``: opening the file would drop SQLite's own locks on it. A new inode means
        the file was replaced. Only a VACUUM shrinks a database file (freed pages are otherwise
        reused, not cut off), so a smaller file that no longer reads whole was truncated.
        """
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return "removed", self._gone("removed")
        except OSError as error:
            return "unreadable", f"the database file {self.path} cannot be looked at ({error.strerror})"
        if (now.st_dev, now.st_ino) != self._identity:
            return "replaced", self._gone("replaced")
        if now.st_size < self._largest and not self._reads_whole():
            shrunk = f"{self._largest} bytes, now {now.st_size}"
            return "truncated", f"the database file {self.path} was truncated ({shrunk})"
        self._largest = now.st_size
        return None

    def _reads_whole(self) -> bool:
        """After the file shrank: whether SQLite still reads every page of it (a VACUUM shrinks it,
        rightly), or finds pages missing (it was cut). Reads the whole database, once per shrink."""
        try:
            return bool(self.read(lambda conn: conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"))
        except StoreError:
            return False

    def _gone(self, how: str) -> str:
        return f"the database file {self.path} was {'removed' if how == 'removed' else 'replaced by another file'}"

    def _moved(self) -> str | None:
        """Why the path no longer leads to the file this handle opened (one stat), or None."""
        found = _file_identity(self.path)
        if found == self._identity:
            return None
        return self._gone("removed" if found is None else "replaced")

    def refuse(self, problem: str) -> None:
        """From now on every read and write through this handle fails with ``problem``: the file at
        the path is not the database it opened, and nothing more may be done on either."""
        self._refusal = problem

    def rescue(self) -> tuple[str, bool]:
        """Copy the database this handle still has open (its file was removed or replaced; what we
        have open may be all that is left of it) to ``PATH.rescued-<inode>``, through SQLite's
        backup API, also after ``refuse()``. Returns the copy's path, and whether this call made it
        (False: another node of the cluster, which had the same file open, made it first)."""
        folder = os.path.dirname(self.path)
        temp = os.path.join(folder, f".{os.path.basename(self.path)}.rescuing-{os.getpid()}-{threading.get_ident()}")
        target = f"{self.path}.rescued-{self._identity[1]}"
        try:
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
            copy = sqlite3.connect(temp, isolation_level=None)
            try:
                with self._mutex:
                    if self._conn is None:
                        raise StoreError(f"the handle on {self.path} is closed")
                    self._conn.backup(copy)
            finally:
                copy.close()
            try:
                os.link(temp, target)
            except FileExistsError:
                return target, False
            return target, True
        finally:
            for leftover in (temp, temp + "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)

    def remove_companions(self) -> None:
        """After close(): remove our -wal and -shm if they are still at the path. Left beside a new
        database at the path, SQLite would read the old one's pages through them. (A refused
        handle's connections are never closed, so SQLite itself does not remove them.)"""
        for suffix, identity in self._companions.items():
            if identity is not None and _file_identity(self.path + suffix) == identity:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path + suffix)

    # Transactions ---------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._refusal is not None:
            raise StoreError(self._refusal)
        if self._pid != os.getpid():
            raise NodeflowError(
                f"this nodeflow handle was opened in process {self._pid}; a forked child must call "
                "nodeflow.connect() itself"
            )
        if self._conn is None:
            raise NodeflowError(f"the handle on {self.path} is closed")
        return self._conn

    def check_open(self) -> None:
        """Raise unless this handle may be used: open, and in the process that opened it. (Reads
        of three fields: it never waits for a read that another thread is running.)"""
        self._connection()

    def _writer(self) -> sqlite3.Connection:
        """The write connection, opened on first use; the caller holds _write_mutex."""
        self._connection()  # open and in its own process? (reads of two fields: no need to wait for a read)
        if self._write_conn is None:
            # Open only the file this handle opened: never one that replaced it, never a new one.
            moved = self._moved()
            if moved is None:
                conn = self._connect(self.path)
                moved = self._moved()  # replaced while connecting, perhaps
                if moved is None:
                    self._write_conn, self._write_level = conn, self.settings.synchronous
                    return conn
                conn.close()
            raise StoreError(f"{moved} since this handle opened it; open a new handle")
        return self._write_conn

    def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one ``BEGIN IMMEDIATE`` transaction and commit; retried while busy."""
        ok, outcome = self.write_batch([work])[0]
        if not ok:
            raise outcome
        return outcome  # type: ignore[no-any-return]

    def write_batch(
        self, works: list[Callable[[sqlite3.Connection], Any]], durable: bool = True, *, sync_later: bool = False
    ) -> list[tuple[bool, Any]]:
        """Run several pieces of work in one transaction, each in its own savepoint.

        A piece that raises is rolled back alone; the others commit together. Returns, per
        piece, (True, its result) or (False, its exception). Retried while another writer holds
        the database, up to ``busy_timeout``, then every piece gets StoreBusy.

        ``durable=False``: the commit need not reach the disk before this returns (it is in the
        WAL, so it survives a crash of this process, and the next durable commit of any process
        syncs it too; a power cut before that may undo it). For writes whose loss can only
        cause a redelivery: a claim, a plain ack, a nack, a lease extension.

        ``sync_later``: a durable commit does not wait for the disk either; the caller makes it
        durable with sync_log() once it has let the next writer in, and only then tells anyone
        that it is.
        """
        level = "FULL" if durable and self.settings.synchronous == "FULL" and not sync_later else "NORMAL"
        deadline = time.monotonic() + self.settings.busy_timeout
        pause = 0.001
        while True:
            with self._write_mutex:
                conn = self._writer()
                # One stat: never commit what must last to a file that is no longer at the path. A
                # claim or an ack there loses nothing (its messages went with the file), so those
                # look once a second: a consumer of a replaced file learns it within a second.
                moved = None
                if durable or time.monotonic() >= self._identity_checked + 1.0:
                    moved = self._moved()
                    self._identity_checked = time.monotonic()
                if moved:
                    return [(False, StoreError(f"{moved}; nothing was written")) for _ in works]
                if level != self._write_level:  # per connection, set between transactions
                    try:
                        conn.execute(f"PRAGMA synchronous={level}")
                    except sqlite3.Error as error:
                        raise self._translate(error) from error
                    self._write_level = level
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as error:
                    if not _is_busy(error):
                        raise self._translate(error) from error
                else:
                    return self._run_in_transaction(conn, works)
            left = deadline - time.monotonic()
            if left <= 0:
                busy = StoreBusy(
                    f"{self.path} stayed locked by another writer for {_format_seconds(self.settings.busy_timeout)}; "
                    "retry, or find the process holding a long write transaction"
                )
                return [(False, busy) for _ in works]
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)

    def _run_in_transaction(
        self, conn: sqlite3.Connection, works: list[Callable[[sqlite3.Connection], Any]]
    ) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        try:
            for work in works:
                if not conn.in_transaction:  # an earlier piece's error ended the transaction
                    outcomes.append((False, StoreError("the transaction was rolled back by an earlier error")))
                    continue
                # A piece of one statement (or that raises before writing) needs no savepoint:
                # SQLite undoes a failed statement by itself.
                savepoint = len(works) > 1 and not getattr(work, "single_statement", False)
                if savepoint:
                    conn.execute("SAVEPOINT piece")
                try:
                    result = work(conn)
                except BaseException as error:
                    if savepoint and conn.in_transaction:
                        conn.execute("ROLLBACK TO piece")
                        conn.execute("RELEASE piece")
                    if isinstance(error, sqlite3.Error):
                        error = self._translate(error)
                    elif not isinstance(error, Exception):
                        raise  # KeyboardInterrupt and the like: roll everything back below
                    outcomes.append((False, error))
                    continue
                if savepoint:
                    conn.execute("RELEASE piece")
                outcomes.append((True, result))
            if all(not ok for ok, _ in outcomes):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                return outcomes
            conn.execute("COMMIT")
            return outcomes
        except BaseException as error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(error, sqlite3.Error):
                failed = self._translate(error)
                return [(False, failed) for _ in works]
            raise

    def sync_log(self) -> None:
        """Make every commit in the write-ahead log so far durable: an ``fdatasync`` of the -wal file.

        A commit waits for the disk while it holds the database's write lock; a commit made without
        waiting and synced here lets other writers commit during the sync, and one sync covers
        every commit before it, whichever process made it. SQLite puts no lock on the -wal file
        (its locks are on the database file and the -shm), so a descriptor of our own on it cannot
        drop one when closed; it is opened once and kept until the handle closes.
        """
        with self._log_mutex:
            self._connection()  # refused (an earlier sync failed, say) or closed: nothing is durable
            if self._log_fd is None:
                self._log_fd = self._open_log()
            try:
                os.fdatasync(self._log_fd)
            except OSError as error:
                # The kernel reports a failed write-back once and then calls the pages clean: a later
                # sync would succeed over a hole in the log. No write through this handle is trusted
                # to last from here on.
                problem = (
                    f"{self.path}-wal: the disk did not confirm a commit ({error.strerror}); it is in the "
                    "database now but may be lost on a power cut, and this handle writes no more: open a new one"
                )
                self.refuse(problem)
                raise StoreError(problem) from None

    def _open_log(self) -> int:
        wal = self.path + "-wal"
        try:
            fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as error:
            raise StoreError(f"{wal}: cannot open the write-ahead log to sync it ({error.strerror})") from None
        info = os.fstat(fd)
        known = self._companions.get("-wal")
        if known is not None and (info.st_dev, info.st_ino) != known:
            os.close(fd)
            raise StoreError(f"{wal} was replaced since this handle opened the database; open a new handle")
        return fd

    def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one short read transaction (one consistent snapshot)."""
        with self._mutex:
            conn = self._connection()
            try:
                conn.execute("BEGIN")
                try:
                    return work(conn)
                finally:
                    conn.execute("COMMIT")  # never leave a read open: it would stall checkpoints
            except sqlite3.Error as error:
                raise self._translate(error) from error

    def _translate(self, error: sqlite3.Error, path: str | None = None) -> StoreError:
        path = path or self.path
        text = str(error)
        code = _sqlite_code(error)
        unknown = code is None  # an error of Python's sqlite3 module itself: only its text says what it is
        if code == _SQLITE_NOTADB or (unknown and "not a database" in text):
            return NotADatabase(
                f"{path} is not an SQLite database, or its header is damaged ({text}); "
                "choose another --db, or restore the file from a backup"
            )
        if code == _SQLITE_CORRUPT or (unknown and "database disk image is malformed" in text):
            return CorruptDatabase(
                f"{path} is damaged or not a database ({text}); nodeflow will not run on it: "
                "restore it from a backup or choose another --db"
            )
        if code == _SQLITE_FULL or (unknown and "disk is full" in text):
            return StoreError(f"{path}: the disk is full ({text}); free some space and retry")
        if code == _SQLITE_IOERR:
            return StoreError(
                f"{path}: writing or reading the file failed ({text}, {getattr(error, 'sqlite_errorname', '')}): "
                "a full disk or a file-size limit (ulimit -f) does this"
            )
        if code == _SQLITE_READONLY or (unknown and ("readonly" in text or "read-only" in text)):
            return StoreError(f"{path} is read-only ({text}); nodeflow needs to write the file and its folder")
        if _is_busy(error):
            return StoreBusy(f"{path} is locked by another writer ({text}); retry")
        return StoreError(f"{path}: {text}")

    def close(self) -> None:
        with self._write_mutex, self._mutex:
            conns = [conn for conn in (self._write_conn, self._conn) if conn is not None]
            self._conn = self._write_conn = None
            if self._refusal is not None:  # closing would checkpoint the WAL into a file that is not ours
                _FORK_ORPHANS.extend(conns)
            elif self._pid == os.getpid():
                for conn in conns:
                    conn.close()
        with self._log_mutex:
            if self._log_fd is not None and self._pid == os.getpid():
                os.close(self._log_fd)  # holds no lock: closing it cannot disturb SQLite's
            self._log_fd = None
        _LIVE_STORES.discard(self)

    def _abandon_after_fork(self) -> None:
        # A connection must not be used, nor closed, in a forked child: closing could checkpoint
        # and delete the WAL under the parent. Keep the objects alive so they are never finalized.
        _FORK_ORPHANS.extend(conn for conn in (self._conn, self._write_conn) if conn is not None)


_LIVE_STORES: weakref.WeakSet[Store] = weakref.WeakSet()
_FORK_ORPHANS: list[Any] = []


# ══════════════════════════════════════════════════════════════════════════════════════════
# 3. Locks: named kernel locks in PATH.d/locks/, fencing tokens, holders, fork safety.
# ══════════════════════════════════════════════════════════════════════════════════════════

LOCK_NAME_MAX_BYTES = 4096
_HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)

# Every descriptor of a lock file this process has open, and the mutex that keeps that set in
# step with the descriptors across fork(): a child closes them all, so it never keeps a lock
# of its parent's alive after the parent releases it.
_LOCK_FDS: set[int] = set()
_LOCK_FDS_MUTEX = threading.Lock()

# Releasing a lock parks its descriptor here, unlocked, rather than removing the file: the next
# acquisition of that name in this process then skips open(O_CREAT) and the first write to a
# new file, which were most of the cost of a lock, and a waiter in another process gets the
# same file at once instead of retrying on a new one. A parked file is removed, under LOCK_EX as
# a release once did, when it has been idle IDLE_LOCK_LINGER seconds, when more than
# IDLE_LOCK_FILES are parked, when its handle is closed and at exit: lock files never pile up.
IDLE_LOCK_LINGER = 0.5
IDLE_LOCK_FILES = 64


@dataclass(slots=True)
class _ParkedLockFile:
    fd: int
    inode: int
    until: float  # time.monotonic() when the sweeper removes it


_PARKED: dict[str, _ParkedLockFile] = {}  # by path, oldest first; guarded by _LOCK_FDS_MUTEX
_PARKED_SWEEP = threading.Condition(_LOCK_FDS_MUTEX)
_PARKED_SWEEPER: threading.Thread | None = None


def _before_fork() -> None:
    _LOCK_FDS_MUTEX.acquire()


def _after_fork_in_parent() -> None:
    _LOCK_FDS_MUTEX.release()


def _after_fork_in_child() -> None:
    global _PARKED_SWEEP, _PARKED_SWEEPER
    for fd in _LOCK_FDS:
        try:
            os.close(fd)  # never LOCK_UN: that would release the parent's lock too
        except OSError:
            pass
    _LOCK_FDS.clear()
    _PARKED.clear()
    _PARKED_SWEEP, _PARKED_SWEEPER = threading.Condition(_LOCK_FDS_MUTEX), None  # the sweeper stayed behind
    _LOCK_FDS_MUTEX.release()
    for store in list(_LIVE_STORES):
        store._abandon_after_fork()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def check_lock_name(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidInput(f"a lock name is a string, not {type(name).__name__}")
    if not name:
        raise InvalidInput("a lock name cannot be empty")
    if "\0" in name:
        raise InvalidInput(f"lock name {_show_name(name)} contains a NUL character; remove it")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput(f"lock name {_show_name(name)} is not valid UTF-8 text") from None
    if size > LOCK_NAME_MAX_BYTES:
        raise InvalidInput(f"lock name is {size} bytes long; the limit is {LOCK_NAME_MAX_BYTES} bytes")
    return name


def lock_file_name(name: str) -> str:
    """The file of a lock: a digest of its name, so no name can escape the lock folder."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:40] + ".lock"


def _check_timeout(timeout: float | str | None) -> float | None:
    return None if timeout is None else parse_duration(timeout, "lock timeout")


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock now: the pid comes from the kernel, the rest from the holder's note."""

    name: str
    fence: int | None
    pid: int
    node: str | None
    since: float | None

    @property
    def holder(self) -> str:
        return self.node or f"pid {self.pid}"

    def describe(self) -> str:
        who = f"node {self.node} (pid {self.pid})" if self.node else f"pid {self.pid}"
        if self.since:
            who += f" for {_format_seconds(max(0.0, time.time() - self.since))}"
        return who


class HeldLock:
    """A lock this process holds; ``release()`` (or leaving the ``with`` block) frees it."""

    __slots__ = ("name", "fence", "_locks", "_path", "_fd", "_inode", "_owner_set", "_pid", "_since", "__weakref__")

    def __init__(self, locks: LockManager, name: str, fence: int | None, path: str, fd: int, inode: int) -> None:
        self.name = name
        self.fence = fence
        self._locks = locks
        self._path = path
        self._fd: int | None = fd
        self._inode = inode
        self._owner_set: set[tuple[str, str]] | None = None
        self._pid = os.getpid()
        self._since = time.monotonic()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._pid != os.getpid():
            return  # a forked child's copy: its descriptor was closed at fork; the lock is the parent's
        if self._owner_set is not None:
            self._owner_set.discard((self._locks.directory, self.name))
        self._locks.hold_seconds += time.monotonic() - self._since
        _park_lock_file(fd, self._inode, self._path)

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: the kernel frees the lock with the process
            pass

    def __repr__(self) -> str:
        return f"<HeldLock {_show_name(self.name)} fence={self.fence} held={self.held}>"


def _close_lock_fd(fd: int) -> None:
    """Close a lock descriptor; the caller holds _LOCK_FDS_MUTEX."""
    _LOCK_FDS.discard(fd)
    os.close(fd)


def open_lock_file(path: str, folders: tuple[str, ...] = ()) -> int:
    """Open (creating, mode 0600) a lock file the safe way, and register it for fork safety.

    Never follows a symbolic link (a planted one is refused by name), never truncates; when the
    file's folder is gone, ``folders`` (outermost first) are made again, privately, and it retries.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    with _LOCK_FDS_MUTEX:
        try:
            try:
                fd = os.open(path, flags, 0o600)
            except FileNotFoundError:
                if not folders:
                    raise
                for folder in folders:
                    _private_directory(folder, create=True)
                fd = os.open(path, flags, 0o600)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise StoreError(f"lock file {path} is a symbolic link; someone planted it: remove it") from None
            raise
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:  # a hard link to a victim would be written through
            os.close(fd)
            what = "has other hard links" if stat.S_ISREG(info.st_mode) else "is not a regular file"
            raise StoreError(f"lock file {path} {what}; someone planted it: remove it")
        _LOCK_FDS.add(fd)
        return fd


def create_locked_lock_file(path: str) -> int | None:
    """Make a new lock file at ``path`` that is locked (LOCK_EX) before anyone can see it; None
    when something is at the path already or the filesystem cannot make unnamed files.

    For liveness locks, where a free lock means a dead node: made the usual way (create, then
    flock), the file is there unlocked for a moment, and a peer's probe in that moment takes the
    live node for dead (and its own brief flock makes the node's flock fail). So the file is made
    unnamed (O_TMPFILE), locked, and only then named by linkat, which never replaces what is
    there: a planted link or a leftover file is left to open_lock_file's checks.
    """
    folder, name = os.path.split(path)
    with _LOCK_FDS_MUTEX:
        try:
            folder_fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=folder_fd)
        except OSError:  # EOPNOTSUPP and the like: a filesystem without unnamed files
            os.close(folder_fd)
            return None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # With a dir fd, os.link is linkat(AT_SYMLINK_FOLLOW): it names the file /proc/self/fd/N is.
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=folder_fd)
        except OSError:
            os.close(fd)
            return None
        finally:
            os.close(folder_fd)
        _LOCK_FDS.add(fd)
        return fd


def _remove_parked(path: str, parked: _ParkedLockFile) -> None:
    """Remove a parked lock file if nobody holds it, then close it; caller holds _LOCK_FDS_MUTEX.

    The file is unlinked while we hold LOCK_EX on it, so whoever locks it next sees, by its
    inode check, that it is no longer the file at the path, and retries on a new one.
    """
    try:
        fcntl.flock(parked.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # held now, by us through another descriptor or by another process: theirs to remove
    else:
        try:
            if os.stat(path, follow_symlinks=False).st_ino == parked.inode:
                os.unlink(path)
        except FileNotFoundError:
            pass
    _close_lock_fd(parked.fd)


def _sweep_parked_lock_files() -> None:
    global _PARKED_SWEEPER
    with _LOCK_FDS_MUTEX:
        while _PARKED:
            path, parked = next(iter(_PARKED.items()))  # the oldest is due first
            due_in = parked.until - time.monotonic()
            if due_in > 0:
                _PARKED_SWEEP.wait(due_in)
                continue
            del _PARKED[path]
            _remove_parked(path, parked)
        _PARKED_SWEEPER = None


def _park_lock_file(fd: int, inode: int, path: str) -> None:
    """Release a lock and keep its descriptor for the next acquisition of the same name."""
    global _PARKED_SWEEPER
    with _LOCK_FDS_MUTEX:
        fcntl.flock(fd, fcntl.LOCK_UN)
        if path in _PARKED:  # another thread of ours released this name first
            _close_lock_fd(fd)
            return
        _PARKED[path] = _ParkedLockFile(fd, inode, time.monotonic() + IDLE_LOCK_LINGER)
        while len(_PARKED) > IDLE_LOCK_FILES:
            oldest = next(iter(_PARKED))
            _remove_parked(oldest, _PARKED.pop(oldest))
        if _PARKED_SWEEPER is None:
            _PARKED_SWEEPER = threading.Thread(target=_sweep_parked_lock_files, name="nodeflow-lock-sweep", daemon=True)
            _PARKED_SWEEPER.start()


def _unpark_lock_file(path: str) -> _ParkedLockFile | None:
    with _LOCK_FDS_MUTEX:
        return _PARKED.pop(path, None)


def remove_idle_lock_files(directory: str | None = None) -> None:
    """Remove now the lock files this process parked (in ``directory``, or everywhere)."""
    with _LOCK_FDS_MUTEX:
        for path in [path for path in _PARKED if directory is None or os.path.dirname(path) == directory]:
            _remove_parked(path, _PARKED.pop(path))


atexit.register(remove_idle_lock_files)


class _LockAttempt:
    """A blocking acquisition run in its own thread, which the caller may give up on.

    The kernel cannot interrupt a thread blocked in flock(), so giving up marks the attempt
    abandoned, and the thread releases at once any lock it gets afterwards.
    """

    def __init__(self, locks: LockManager, name: str, fence: bool, blocking: bool, notify: Callable[[], bool]) -> None:
        self._locks, self._name, self._fence, self._blocking = locks, name, fence, blocking
        self._notify = notify
        self._mutex = threading.Lock()
        self._state = "waiting"  # -> granted | failed | abandoned
        self._held: HeldLock | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, name="nodeflow-lock-wait", daemon=True).start()

    def _abandoned(self) -> bool:
        return self._state == "abandoned"

    def _run(self) -> None:
        try:
            held = self._locks._acquire_now(self._name, self._fence, self._blocking, self._abandoned)
        except BaseException as error:
            with self._mutex:
                if self._state != "waiting":
                    return
                self._state, self.error = "failed", error
            self._notify()
            return
        with self._mutex:
            waiting = self._state == "waiting"
            if waiting:
                self._state, self._held = ("granted", held) if held is not None else ("failed", None)
        if not waiting:
            if held is not None:
                held.release()
            return
        if held is None:  # a try-lock that found the lock busy: the waiter raises LockTimeout
            self._notify()
            return
        if not self._notify():  # the waiter's event loop is gone: nobody will take the lock
            late = self.abandon()
            if late is not None:
                late.release()

    def abandon(self) -> HeldLock | None:
        """Stop waiting; returns the lock if it was granted meanwhile (the caller then owns it)."""
        with self._mutex:
            held = self._held if self._state == "granted" else None
            if self._state != "failed":
                self._state = "abandoned"
            self._held = None
            return held


def bump_fence(conn: sqlite3.Connection, name: str, node: str | None) -> int:
    """The next fencing token of lock ``name``, taken by its new holder right after locking."""
    row = conn.execute(
        "INSERT INTO lock_fences (name, fence, acquired, pid, node) VALUES (?, 1, ?, ?, ?) "
        "ON CONFLICT (name) DO UPDATE SET fence = fence + 1, acquired = excluded.acquired, "
        "pid = excluded.pid, node = excluded.node" + (" RETURNING fence" if _HAS_RETURNING else ""),
        (name, time.time(), os.getpid(), node),
    ).fetchall()
    if not row:
        row = conn.execute("SELECT fence FROM lock_fences WHERE name = ?", (name,)).fetchall()
    return int(row[0][0])


class LockManager:
    """Named locks of one cluster for one process."""

    def __init__(self, store: Store, node: str | None = None, folder: str = "locks") -> None:
        self.store = store
        self.node = node
        # Set by the handle: lets a fenced async acquisition take its token in a shared transaction.
        self.write_async: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]] | None = None
        self.acquisitions, self.wait_seconds, self.hold_seconds = 0, 0.0, 0.0  # for /metrics
        self.directory = os.path.join(store.lock_dir, folder)
        self._mine = threading.local()  # names each thread holds through the blocking API
        if folder == "locks":  # other folders are made when first used
            _private_directory(self.directory, create=True)

    # The kernel part -----------------------------------------------------------------------

    def _open_lock_file(self, path: str) -> int:
        return open_lock_file(path, (self.store.lock_dir, self.directory))

    def _close_unheld(self, fd: int) -> None:
        with _LOCK_FDS_MUTEX:
            _close_lock_fd(fd)

    def _lock_file(self, path: str, blocking: bool, give_up: Callable[[], bool]) -> tuple[int, os.stat_result] | None:
        """Lock the file that is at ``path`` now; None when busy (non-blocking) or given up."""
        parked = _unpark_lock_file(path)
        while not give_up():
            fd = parked.fd if parked is not None else self._open_lock_file(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if parked is not None:
                    _park_lock_file(fd, parked.inode, path)  # still good for the next try
                else:
                    self._close_unheld(fd)
                return None
            except BaseException:
                self._close_unheld(fd)
                raise
            parked = None
            info = os.fstat(fd)
            try:
                current = os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                current = None
            if current == info.st_ino:
                return fd, info
            # This file was removed (idle) after we opened it: the lock is now a new file.
            self._close_unheld(fd)
        if parked is not None:  # given up before the first try
            _park_lock_file(parked.fd, parked.inode, path)
        return None

    def _acquire_now(
        self, name: str, fence: bool, blocking: bool, give_up: Callable[[], bool] = lambda: False, note: bool = True
    ) -> HeldLock | None:
        """Take the lock now (or, ``blocking``, once free). ``note=False`` leaves the file's note (who
        holds it, for holder()) as it was: for a queue's waiting turn, which nobody asks about."""
        path = os.path.join(self.directory, lock_file_name(name))
        locked = self._lock_file(path, blocking, give_up)
        if locked is None:
            return None
        fd, info = locked
        inode = info.st_ino
        if give_up():
            _park_lock_file(fd, inode, path)
            return None
        try:
            token = self.store.write(functools.partial(bump_fence, name=name, node=self.node)) if fence else None
            if note:
                self._write_note(fd, name, token, info.st_size)
        except BaseException:
            _park_lock_file(fd, inode, path)
            raise
        return HeldLock(self, name, token, path, fd, inode)

    def _write_note(self, fd: int, name: str, token: int | None, old_size: int) -> None:
        note = {"name": name, "pid": os.getpid(), "node": self.node, "fence": token, "since": time.time()}
        data = json.dumps(note).encode("ascii")  # the default encoder is cached: much the fastest
        try:  # the note serves holder() only; safety never depends on it
            os.pwrite(fd, data, 0)
            if old_size > len(data):
                os.ftruncate(fd, len(data))  # a killed holder left a longer note
        except OSError:
            pass

    # Blocking API ---------------------------------------------------------------------------

    def acquire(self, name: str, timeout: float | str | None = None, *, fence: bool = True) -> HeldLock:
        self.store.check_open()  # a closed or forked handle gives no locks, fenced or not
        name = check_lock_name(name)
        wait = _check_timeout(timeout)
        mine: set[tuple[str, str]] = self._mine.__dict__.setdefault("names", set())
        if (self.directory, name) in mine:
            raise NodeflowError(f"lock {_show_name(name)} is already held by this thread; locks are not reentrant")
        started = time.monotonic()
        held = self._acquire_now(name, fence, blocking=False)
        if held is None:
            if wait == 0:
                raise LockTimeout(name, 0, self.holder(name))
            done = threading.Event()

            def notify() -> bool:
                done.set()
                return True

            attempt = _LockAttempt(self, name, fence, True, notify)
            attempt.start()
            finished = False
            try:
                done.wait(wait)
                finished = True
            finally:
                held = attempt.abandon()
                if not finished and held is not None:  # interrupted (Ctrl-C): never keep it
                    held.release()
            if held is None:
                if attempt.error is not None:
                    raise attempt.error
                raise LockTimeout(name, time.monotonic() - started, self.holder(name))
        held._owner_set = mine
        mine.add((self.directory, name))
        self._count(started)
        return held

    def _count(self, started: float) -> None:
        self.acquisitions += 1
        self.wait_seconds += time.monotonic() - started

    # Asyncio API ----------------------------------------------------------------------------

    async def aacquire(self, name: str, timeout: float | str | None = None, *, fence: bool = True) -> HeldLock:
        self.store.check_open()
        name = check_lock_name(name)
        wait = _check_timeout(timeout)
        started = time.monotonic()
        write_async = self.write_async
        if not fence or write_async is not None:  # no database write here: the loop never waits on a disk
            held = self._acquire_now(name, False, blocking=False)
            if held is not None:
                if fence and write_async is not None:
                    try:
                        held.fence = await write_async(functools.partial(bump_fence, name=name, node=self.node))
                    except BaseException:
                        held.release()
                        raise
                    assert held._fd is not None
                    self._write_note(held._fd, name, held.fence, 1 << 16)  # may be shorter than the note it replaces
                self._count(started)
                return held
            if wait == 0:
                raise LockTimeout(name, 0, self.holder(name))
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def notify() -> bool:
            try:
                loop.call_soon_threadsafe(done.set)
                return True
            except RuntimeError:  # loop closed
                return False

        attempt = _LockAttempt(self, name, fence, wait != 0, notify)
        attempt.start()
        try:
            async with asyncio.timeout(wait if wait else None):
                await done.wait()
        except TimeoutError:
            pass
        except BaseException:  # cancelled: a lock granted meanwhile is released, never kept
            late = attempt.abandon()
            if late is not None:
                late.release()
            raise
        held = attempt.abandon()
        if held is None:
            if attempt.error is not None:
                raise attempt.error
            raise LockTimeout(name, time.monotonic() - started if wait else 0, self.holder(name))
        self._count(started)
        return held

    async def atake_from(self, name: str, stalled: Callable[[sqlite3.Connection, LockInfo], bool]) -> LockInfo | None:
        """Remove the file of lock ``name`` if ``stalled`` judges its holder gone for good enough
        (another node, frozen past its stall limit): the next acquisition then locks a new file, with
        a higher fence, while the old holder keeps a lock on a file nobody else will open. Only for
        locks whose holders check their fence before they commit (instance locks); a lock taken
        through ``lock()`` is never taken away. The check and the removal run in one write
        transaction, so of two takers only one removes a file. Returns the holder it was taken from."""
        path = os.path.join(self.directory, lock_file_name(check_lock_name(name)))
        try:
            inode = os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            return None
        holder = self._describe(path, _kernel_flock_owners(), name)
        if holder is None:
            return None

        def take(conn: sqlite3.Connection) -> LockInfo | None:
            if not stalled(conn, holder):
                return None
            try:
                info = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                return None
            if info.st_ino != inode:
                return None  # released, or taken by another node already
            # Still locked by the stalled process? It may have woken, let go, and another locked the file.
            owners = _kernel_flock_owners() or {}
            if owners.get((os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)) != holder.pid:
                return None
            os.unlink(path)
            return holder

        if self.write_async is not None:
            taken: LockInfo | None = await self.write_async(take)
            return taken
        return self.store.write(take)

    # Who holds what -------------------------------------------------------------------------

    def _describe(self, path: str, owners: dict[tuple[int, int, int], int] | None, name: str | None) -> LockInfo | None:
        try:
            info = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if owners is None:
            return None
        pid = owners.get((os.major(info.st_dev), os.minor(info.st_dev), info.st_ino))
        if pid is None:
            return None
        note: dict[str, Any] = {}
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # a new description: no lock lost
            try:
                note = json.loads(os.read(fd, 65536) or b"{}")
            finally:
                os.close(fd)
        except (OSError, ValueError, RecursionError):
            pass  # the holder is writing its note right now
        shown = name if name is not None else str(note.get("name") or os.path.basename(path))
        fence = note.get("fence")
        return LockInfo(
            name=shown,
            fence=fence if isinstance(fence, int) else None,
            pid=pid,
            node=note.get("node") if isinstance(note.get("node"), str) else None,
            since=note.get("since") if isinstance(note.get("since"), (int, float)) else None,
        )

    def holder(self, name: str) -> LockInfo | None:
        name = check_lock_name(name)
        return self._describe(os.path.join(self.directory, lock_file_name(name)), _kernel_flock_owners(), name)

    def held(self) -> list[LockInfo]:
        owners = _kernel_flock_owners()
        try:
            files = sorted(entry for entry in os.listdir(self.directory) if entry.endswith(".lock"))
        except FileNotFoundError:
            return []
        found = (self._describe(os.path.join(self.directory, entry), owners, None) for entry in files)
        return sorted((info for info in found if info is not None), key=lambda info: info.name)


# ══════════════════════════════════════════════════════════════════════════════════════════
# 4. Doorbells: a datagram socket per listening process in PATH.d/nodes/, rung after commits.
# ══════════════════════════════════════════════════════════════════════════════════════════

# A ring is a hint that something changed; a lost one costs latency (a waiter re-reads the
# database every poll_interval), never correctness. A datagram carries topics, one per line:
# "q:QUEUE" (a message became ready in QUEUE) or "i" (an instruction was appended).
RING_INSTRUCTIONS = "i"
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; longer paths go through /proc/self/fd
# A folder's mtime comes from the kernel's coarse clock (a tick of 1 to 10 ms): a listing taken less
# than this after the last change may have missed a second change that left the mtime as it was.
_MTIME_TRUSTED_AFTER_NS = 50_000_000


def check_node_id(node: object) -> str:
    if not isinstance(node, str) or not _NODE_ID.fullmatch(node):
        raise InvalidInput(
            f"node id {node!r} is not valid; use 1 to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return node


def _ring_topic_for_queue(queue: str) -> str:
    return "q:" + queue


class Doorbells:
    """This process's doorbell (bound on first use) and the ringing of everyone else's."""

    def __init__(self, lock_dir: str, node: str) -> None:
        self.node = node
        self.lock_dir = lock_dir
        self.directory = os.path.join(lock_dir, "nodes")  # made by the first node that listens
        self._dir_fd: int | None = None
        self._sender: socket.socket | None = None
        self._receiver: socket.socket | None = None
        self._closed = False
        self._bound_inode = 0
        self._liveness_fd: int | None = None
        self._mutex = threading.Lock()
        self.rings_sent = 0
        # The other doorbells as last listed: (the folder's inode and mtime then, when listed, [(name, address)]).
        self._listed: tuple[tuple[int, int], int, list[tuple[str, str]]] = ((0, 0), 0, [])

    def _address(self, name: str) -> str:
        path = os.path.join(self.directory, name)
        if len(path.encode()) <= _SOCKET_PATH_MAX:
            return path
        if self._dir_fd is None:
            self._dir_fd = os.open(self.directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._dir_fd}/{name}"

    # The listening side -------------------------------------------------------------------

    def bind(self) -> socket.socket:
        """Take this node's liveness lock and bind its doorbell; refused if the id is in use."""
        with self._mutex:
            if self._closed:
                raise NodeflowError(f"the doorbell of node {self.node} is closed")
            if self._receiver is not None:
                return self._receiver
            _private_directory(self.lock_dir, create=True)
            _private_directory(self.directory, create=True)
            fd = self._liveness_fd if self._liveness_fd is not None else self._take_liveness_lock()
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            name = f"{self.node}.sock"
            temporary = f".{self.node}.{os.getpid()}.sock"
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, temporary))
                receiver.bind(self._address(temporary))
                os.chmod(os.path.join(self.directory, temporary), 0o600)
                os.rename(os.path.join(self.directory, temporary), os.path.join(self.directory, name))
                self._bound_inode = os.stat(os.path.join(self.directory, name)).st_ino
                receiver.setblocking(False)
            except BaseException:
                receiver.close()
                if fd != self._liveness_fd:
                    with _LOCK_FDS_MUTEX:
                        _close_lock_fd(fd)
                raise
            self._receiver, self._liveness_fd = receiver, fd
            return receiver

    def _take_liveness_lock(self) -> int:
        lock_path = os.path.join(self.directory, f"{self.node}.lock")
        fd = create_locked_lock_file(lock_path)  # a file never seen unlocked: no peer takes us for dead
        if fd is not None:
            return fd
        for attempt in range(20):
            fd = open_lock_file(lock_path, (self.lock_dir, self.directory))  # fork-safe: a child never looks alive
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with _LOCK_FDS_MUTEX:
                    _close_lock_fd(fd)
                if attempt < 3:  # perhaps a ringer removing the dead node's files: let it finish
                    time.sleep(0.02)
                    continue
                pid = None
                with contextlib.suppress(OSError):
                    info = os.stat(lock_path)
                    pid = (_kernel_flock_owners() or {}).get(
                        (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)
                    )
                raise NodeIdInUse(
                    f"node id {self.node} is in use by a live process{f' (pid {pid})' if pid else ''}; "
                    "choose another id or stop that process"
                ) from None
            try:
                same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            except BaseException:
                with _LOCK_FDS_MUTEX:
                    _close_lock_fd(fd)
                raise
            if same:
                return fd
            with _LOCK_FDS_MUTEX:  # removed as a dead node's file after we opened it: again
                _close_lock_fd(fd)
        raise NodeflowError(f"could not take the liveness lock of node {self.node}; retry")

    def is_bound_here(self, receiver: socket.socket) -> bool:
        """Whether our socket file is still in place (it may have been removed by hand)."""
        try:
            return os.stat(os.path.join(self.directory, f"{self.node}.sock")).st_ino == self._bound_inode
        except OSError:
            return False

    def rebind(self) -> socket.socket:
        """Bind a new doorbell in place of one that was removed; the liveness lock is kept."""
        with self._mutex:
            old, self._receiver = self._receiver, None
            if old is not None:
                old.close()
            if self._liveness_fd is not None:
                liveness_path = os.path.join(self.directory, f"{self.node}.lock")
                try:
                    same = os.stat(liveness_path).st_ino == os.fstat(self._liveness_fd).st_ino
                except OSError:
                    same = False
                if not same:  # the whole folder went: take the id again on a new file, then let the old one go
                    _private_directory(self.lock_dir, create=True)
                    _private_directory(self.directory, create=True)
                    fresh = self._take_liveness_lock()  # first: never a moment with no lock held
                    with _LOCK_FDS_MUTEX:
                        _close_lock_fd(self._liveness_fd)
                    self._liveness_fd = fresh
        return self.bind()

    def close(self) -> None:
        with self._mutex:
            self._closed = True
            receiver, self._receiver = self._receiver, None
            fd, self._liveness_fd = self._liveness_fd, None
            if receiver is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, f"{self.node}.sock"))
                receiver.close()
            if fd is not None:
                with _LOCK_FDS_MUTEX:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.directory, f"{self.node}.lock"))  # while still locked
                    _close_lock_fd(fd)
            if self._sender is not None:
                self._sender.close()
                self._sender = None
            if self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None

    # The ringing side ---------------------------------------------------------------------

    def _others(self) -> list[tuple[str, str]]:
        """The other nodes' doorbells: (name, address). One stat a ring; the folder is listed again
        when its mtime moved, or while it changed too lately to trust: changes within one tick of
        the file system's clock leave its mtime as it was."""
        try:
            folder = os.stat(self.directory)
        except OSError:
            return []
        identity, listed_at, others = self._listed
        # A file system that keeps whole seconds (ext3, ext4 with small inodes) ticks once a second.
        tick = _MTIME_TRUSTED_AFTER_NS if folder.st_mtime_ns % 1_000_000_000 else 1_100_000_000
        if identity == (folder.st_ino, folder.st_mtime_ns) and listed_at - folder.st_mtime_ns > tick:
            return others
        now = time.time_ns()
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        own = f"{self.node}.sock"
        others = []
        for name in names:
            if name.endswith(".sock") and name != own and not name.startswith("."):
                try:
                    others.append((name, self._address(name)))
                except OSError:  # out of descriptors, or the folder went: that ring is lost, no more
                    return others
        self._listed = ((folder.st_ino, folder.st_mtime_ns), now, others)
        return others

    def ring(self, topics: Iterable[str]) -> None:
        """Send the topics to every other node's doorbell; never blocks, never raises."""
        data = "\n".join(sorted(set(topics))).encode("utf-8", "replace")[:4096]
        if not data:
            return
        others = self._others()
        if not others:
            return
        with self._mutex:
            if self._sender is None:
                try:
                    self._sender = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                    )
                except OSError:
                    return  # out of descriptors, say: a lost ring costs a poll interval, no more
            sender = self._sender
        for name, address in others:
            try:
                sender.sendto(data, address)
                self.rings_sent += 1
            except (BlockingIOError, FileNotFoundError):
                pass  # its queue is full (it has rings to read) or it just left
            except ConnectionRefusedError:
                self._remove_if_dead(name[: -len(".sock")])
            except OSError:
                pass

    def _remove_if_dead(self, node: str) -> None:
        """Remove a doorbell nobody listens on, if its node's liveness lock is free."""
        lock_path = os.path.join(self.directory, f"{node}.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            fd = None  # no liveness lock at all: the socket is a leftover
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, f"{node}.sock"))
            if fd is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)
        except OSError:
            pass  # alive (a node between bind and rename, or stopped): leave it
        finally:
            if fd is not None:
                os.close(fd)

    def remove_dead(self) -> None:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name.endswith(".sock") and not name.startswith(".") and name != f"{self.node}.sock":
                try:
                    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    try:
                        probe.connect(self._address(name))
                    finally:
                        probe.close()
                except ConnectionRefusedError:
                    self._remove_if_dead(name[: -len(".sock")])
                except OSError:
                    pass


# ══════════════════════════════════════════════════════════════════════════════════════════
# 5. Bus: group commit, durable queues with leases, retries, dead letters, wake-ups.
# ══════════════════════════════════════════════════════════════════════════════════════════

QUEUE_NAME_MAX_BYTES = 200
# nodeflow's own queue of workflow runs (section 9): its messages never become dead letters, since
# losing one would strand its instance; its handler settles a message it cannot serve itself.
WORKFLOW_QUEUE = "nodeflow.workflows"
GROUP_COMMIT_MAX = 256  # pieces of work in one shared transaction
_WRITER_LOCK_RETRIES = (0.00005,) * 6 + (0.0001,) * 4  # about 1 ms in all, then the committer thread waits
SEND_MANY_MAX = 10_000  # messages one send_many may queue: one transaction, which holds other writers back
SEND_MANY_MAX_BYTES = 64 << 20  # and their bodies' JSON together
SETTLE_MANY_MAX = 10_000  # messages one ack_many (or receive's ack) may settle


class LeaseLost(NodeflowError):
    """The message's lease ran out and it was delivered again (or it was removed): the ack is refused."""


def check_queue_name(queue: object) -> str:
    if not isinstance(queue, str):
        raise InvalidInput(f"a queue name is a string, not {type(queue).__name__}")
    if not queue or not queue.isprintable():
        raise InvalidInput(f"queue name {queue!r} must be non-empty printable text (no NUL, newline or tab)")
    if len(queue.encode("utf-8", "replace")) > QUEUE_NAME_MAX_BYTES:
        raise InvalidInput(f"queue name {_show_name(queue)} is longer than {QUEUE_NAME_MAX_BYTES} bytes")
    return queue


JSON_MAX_DEPTH = 64  # lists and objects nested in any value nodeflow takes in (a body, an input, a result)
# An instance's variables hold such values one or two levels down ({"input": ..., "approval": ...}):
# the limit they are stored under leaves room for that, and is still far from Python's recursion limit.
VARIABLES_MAX_DEPTH = 2 * JSON_MAX_DEPTH


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists and objects nest more than ``limit`` deep in ``value`` (a loop: no recursion,
    and a value that contains itself ends at the limit too)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))
    return False


_COMPACT_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)  # made once: json.dumps
# with options builds an encoder on every call


def encode_body(body: Any, limit: int, depth: int = JSON_MAX_DEPTH) -> str:
    """A message body as compact JSON text; InvalidInput when it is not JSON, too large or nested
    more than ``depth`` deep. What this accepts, every node can decode and handle again: the checks
    are made here, where values come in, never where a node reads them back."""
    if isinstance(body, (dict, list, tuple)) and _nested_deeper_than(body, depth):
        raise InvalidInput(
            f"the value nests lists and objects more than {depth} deep; flatten it (the limit keeps "
            "every node able to read it back)"
        )
    try:
        text = _COMPACT_JSON.encode(body)
    except (TypeError, ValueError, RecursionError) as error:
        raise InvalidInput(f"a message body must be JSON data: {error}") from None
    if text.isascii():  # a byte a character, and no lone surrogate
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidInput("a message body must be valid Unicode text; it holds a lone surrogate") from None
    if size > limit:
        raise InvalidInput(f"the message body is {size} bytes of JSON; the limit is {limit} bytes")
    return text


def decode_stored(text: str) -> Any:
    """JSON that nodeflow stored, decoded for a listing; text that cannot be decoded (written by an
    older nodeflow or by hand) is returned as it is rather than failing the whole listing."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def check_dedup_key(key: object, what: str = "a deduplication key") -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not key or len(key) > 1024:
        shown = _show_name(key) if isinstance(key, str) else repr(key)
        raise InvalidInput(f"{what} is a non-empty string of at most 1024 characters, not {shown}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} {_show_name(key)} is not valid Unicode text") from None
    return key


def _setter(event: threading.Event) -> Callable[[], bool]:
    """A callback that sets ``event`` and says it was heard."""

    def set_it() -> bool:
        event.set()
        return True

    return set_it


def _check_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not -(2**31) <= priority < 2**31:
        raise InvalidInput(f"priority must be a whole number (higher is delivered first), not {priority!r}")
    return priority


@dataclass(frozen=True)
class Message:
    """A leased message: ack it, nack it, or extend its lease before ``lease_until``."""

    id: int
    queue: str
    body: Any
    attempts: int  # deliveries so far, this one included
    priority: int
    created: float
    lease_until: float
    last_error: str | None
    owner: str  # who holds the lease
    refunds: int = 0  # deliveries not counted against it: each ended with a node that held others too

    @property
    def charged(self) -> int:
        """The deliveries that count towards its dead-letter limit, this one included."""
        return self.attempts - self.refunds


# Iterables that are one value, not a list of them: a list of bodies or messages is never one of these.
_NOT_A_LIST = (str, bytes, bytearray, memoryview, dict)


def _check_messages(messages: object, what: str) -> list[Message]:
    """The messages a caller gives to settle at once: a Message, or a list of them."""
    if isinstance(messages, Message):
        return [messages]
    if isinstance(messages, _NOT_A_LIST) or not isinstance(messages, Iterable):
        shown = type(messages).__name__
        raise InvalidInput(f"{what} takes received messages (a Message or a list of them), not {shown}")
    chosen = list(itertools.islice(messages, SETTLE_MANY_MAX + 1))
    if len(chosen) > SETTLE_MANY_MAX:
        raise InvalidInput(f"{what} takes at most {SETTLE_MANY_MAX:,} messages at once; split the list")
    deliveries = set()
    for message in chosen:
        if not isinstance(message, Message):
            raise InvalidInput(f"{what} takes messages that receive() returned, not {type(message).__name__}")
        delivery = (message.id, message.attempts, message.owner)
        if delivery in deliveries:
            raise InvalidInput(f"{what} was given message {message.id} twice; give each message once")
        deliveries.add(delivery)
    return chosen


@dataclass(frozen=True)
class DeadLetter:
    id: int
    queue: str
    body: Any
    attempts: int
    priority: int
    created: float
    died: float
    last_error: str | None


class _Piece:
    """One caller's work waiting for the group committer."""

    __slots__ = ("work", "rings", "durable", "state", "ok", "outcome", "event", "loop", "future")

    def __init__(self, work: Callable[[sqlite3.Connection], Any], rings: Iterable[str], durable: bool) -> None:
        self.work, self.rings, self.durable = work, frozenset(rings), durable
        self.state = "queued"  # -> running -> done, or queued -> abandoned
        self.ok = False
        self.outcome: Any = None
        self.event: threading.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.future: asyncio.Future[Any] | None = None


def _settle_future(future: asyncio.Future[Any], ok: bool, outcome: Any) -> None:
    if not future.done():
        if ok:
            future.set_result(outcome)
        else:
            future.set_exception(outcome)


class GroupCommitter:
    """Runs the writes of one handle's threads and coroutines in shared transactions.

    One thread takes whatever is queued (up to GROUP_COMMIT_MAX pieces), runs each piece in a
    savepoint of one ``BEGIN IMMEDIATE`` transaction, commits once, rings the doorbells the
    committed pieces asked for, then answers each caller: an operation returns only after its
    own commit, and a durable commit is paid once per batch, not once per operation, and only
    when a piece of the batch needs one (see Store.write_batch). That wait for the disk comes
    after the batch has let the writer lock go: other writers commit meanwhile, and one sync
    makes theirs durable too. (So another process may read a commit a moment before it is
    durable; no caller is told that its write is done before it is.) Around
    each transaction it holds ``PATH.d/writer.lock``: the kernel queues writers of all nodes
    there, which shares the database fairly where SQLite's busy handler would starve some.
    """

    def __init__(self, store: Store, ring: Callable[[set[str]], None]) -> None:
        self._store, self._ring = store, ring
        self._cond = threading.Condition()
        self._pending: list[_Piece] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._writer_fd: int | None = None
        self._writer_path = os.path.join(store.lock_dir, "writer.lock")
        self._writer_checked = time.monotonic()  # when the writer lock's file was last compared with the path
        self._busy = False  # a batch is being run, by the committer thread or by a leading caller
        self._syncs = store.settings.synchronous == "FULL"  # durable pieces wait for sync_log()
        self._pid = os.getpid()
        self.batches = 0
        self.pieces = 0

    def _enqueue(self, piece: _Piece, may_lead: bool) -> bool:
        """Queue a piece; True when the caller should run the next batch itself (nobody is)."""
        with self._cond:
            if self._closed or self._pid != os.getpid():
                raise NodeflowError(f"the handle on {self._store.path} is closed")
            self._pending.append(piece)
            if may_lead and not self._busy:
                self._busy = True
                return True
            self._wake_thread()
            return False

    def _wake_thread(self) -> None:
        """Start or wake the committer thread; the caller holds _cond."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nodeflow-commit", daemon=True)
            self._thread.start()
        else:
            self._cond.notify()

    def submit(self, work: Callable[[sqlite3.Connection], T], rings: Iterable[str] = (), durable: bool = True) -> T:
        """Run ``work`` in the next shared transaction; returns once that has committed."""
        self._store.check_open()
        with self._cond:
            if self._closed or self._pid != os.getpid():
                raise NodeflowError(f"the handle on {self._store.path} is closed")
            alone = not self._busy and not self._pending
            if alone:
                self._busy = True
        if alone:  # nobody to share a transaction with: run it here, if the writer lock is free
            done, ok, outcome = self._run_alone(work, rings, durable)
            if done:
                if not ok:
                    raise outcome
                return outcome  # type: ignore[no-any-return]
        piece = _Piece(work, rings, durable)
        if self._enqueue(piece, may_lead=True):
            self._lead()
        with self._cond:
            if piece.state == "done":  # it ran in the batch this caller led: no need to be told
                event = None
            else:
                event = piece.event = threading.Event()
        if event is not None and not event.wait(self._store.settings.busy_timeout + 5):
            with self._cond:
                if piece.state == "queued":
                    piece.state = "abandoned"
                    raise StoreBusy(
                        f"{self._store.path}: no write slot within "
                        f"{_format_seconds(self._store.settings.busy_timeout)}; another process holds the "
                        "writer lock or a long transaction; retry"
                    )
            event.wait()  # running: SQLite's own busy timeout bounds it
        if not piece.ok:
            raise piece.outcome
        return piece.outcome  # type: ignore[no-any-return]

    async def asubmit(
        self, work: Callable[[sqlite3.Connection], T], rings: Iterable[str] = (), durable: bool = True
    ) -> T:
        self._store.check_open()
        piece = _Piece(work, rings, durable)
        loop = piece.loop = asyncio.get_running_loop()
        piece.future = loop.create_future()
        self._enqueue(piece, may_lead=False)  # an event loop must never wait for a disk flush
        expiry = loop.call_later(self._store.settings.busy_timeout + 5, self._expire, piece)
        try:
            return await piece.future  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            with self._cond:
                if piece.state == "queued":
                    piece.state = "abandoned"  # never runs; a piece already running may still commit
            raise
        finally:
            expiry.cancel()

    def _expire(self, piece: _Piece) -> None:
        """An async caller's bound: a piece still queued then is dropped and the caller told."""
        with self._cond:
            if piece.state != "queued":
                return  # running: SQLite's own busy timeout bounds it
            piece.state = "abandoned"
        if piece.future is not None and not piece.future.done():
            piece.future.set_exception(StoreBusy(f"{self._store.path}: no write slot in time; retry"))

    def _take_batch(self) -> list[_Piece]:
        with self._cond:
            batch, self._pending = self._pending[:GROUP_COMMIT_MAX], self._pending[GROUP_COMMIT_MAX:]
            batch = [piece for piece in batch if piece.state == "queued"]
            for piece in batch:
                piece.state = "running"
            return batch

    def _run_alone(
        self, work: Callable[[sqlite3.Connection], Any], rings: Iterable[str], durable: bool
    ) -> tuple[bool, bool, Any]:
        """A batch of one, run by its caller, who holds ``_busy``: (ran, ok, outcome). Not run
        when the writer lock is taken (another process writes): then the caller queues it."""
        try:
            try:
                locked = self._lock_writer(blocking=False)
                # Another process's commit under the lock is short: looking again a few times costs
                # less than handing the piece to the committer thread. After that, the kernel's queue.
                for pause in _WRITER_LOCK_RETRIES:
                    if locked:
                        break
                    time.sleep(pause)
                    locked = self._lock_writer(blocking=False)
            except Exception as error:  # the committer thread will meet it too, and answer everyone
                log.warning("taking the writer lock failed: %s", error)
                return False, False, None
            if not locked:
                return False, False, None
            try:
                ok, outcome = self._write_one(work, durable)
            finally:
                self._unlock_writer()
            self.batches += 1
            self.pieces += 1
        finally:
            with self._cond:
                self._busy = False
                if self._pending or self._closed:  # queued meanwhile: the committer thread takes them
                    self._wake_thread()
        if ok and rings:
            try:
                self._ring(set(rings))
            except Exception:
                log.exception("ringing doorbells failed")
        if ok and durable:
            ok, outcome = self._made_durable([(ok, outcome)], [True])[0]
        return True, ok, outcome

    def _write_one(self, work: Callable[[sqlite3.Connection], Any], durable: bool) -> tuple[bool, Any]:
        try:
            return self._store.write_batch([work], durable, sync_later=True)[0]
        except BaseException as error:  # the store is closed, the disk is gone, ...
            return False, error if isinstance(error, Exception) else NodeflowError(repr(error))

    def _made_durable(self, outcomes: list[tuple[bool, Any]], durable: list[bool]) -> list[tuple[bool, Any]]:
        """Wait for the disk (once the writer lock is free): a sync that fails fails the durable pieces,
        committed though they are; the others asked for no more than their commit."""
        if not self._syncs or not any(ok and must for (ok, _), must in zip(outcomes, durable, strict=True)):
            return outcomes
        try:
            self._store.sync_log()
        except Exception as error:
            failed = error if isinstance(error, NodeflowError) else StoreError(f"syncing the log failed: {error}")
            return [
                (False, failed) if ok and must else (ok, outcome)
                for (ok, outcome), must in zip(outcomes, durable, strict=True)
            ]
        return outcomes

    def _lead(self) -> None:
        """Run one batch in the caller's thread, saving two thread switches, if the writer lock is
        free at once; else leave it to the committer thread, whose wait for the lock is unbounded."""
        try:
            try:
                locked = self._lock_writer(blocking=False)
            except Exception as error:  # the committer thread will meet it too, and answer everyone
                log.warning("taking the writer lock failed: %s", error)
                locked = False
            batch: list[_Piece] = []
            outcomes: list[tuple[bool, Any]] = []
            if locked:
                try:
                    batch = self._take_batch()
                    outcomes = self._write(batch)
                finally:
                    self._unlock_writer()
                self._count(batch)
        finally:
            with self._cond:
                self._busy = False
                if self._pending or self._closed:  # a closing committer's thread must see it is done
                    self._wake_thread()
        self._finish(batch, outcomes)  # while the next batch may run: this one waits for the disk

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending or self._busy:
                    if self._closed and not self._pending:
                        return
                    self._cond.wait()
                self._busy = True
            try:
                try:
                    self._lock_writer(blocking=True)
                except Exception as error:  # the lock folder is unusable: answer, never hang
                    batch, failed = self._take_batch(), StoreError(f"cannot take the writer lock: {error}")
                    outcomes = [(False, failed)] * len(batch)
                else:
                    try:
                        batch = self._take_batch()
                        outcomes = self._write(batch)
                    finally:
                        self._unlock_writer()
                self._count(batch)
            finally:
                with self._cond:
                    self._busy = False
            self._finish(batch, outcomes)  # after the unlock and while a caller may lead the next batch

    def _write(self, batch: list[_Piece]) -> list[tuple[bool, Any]]:
        if not batch:
            return []
        try:
            durable = any(piece.durable for piece in batch)
            return self._store.write_batch([piece.work for piece in batch], durable, sync_later=True)
        except BaseException as error:  # the store is closed, the disk is gone, ...
            return [(False, error if isinstance(error, Exception) else NodeflowError(repr(error)))] * len(batch)

    def _count(self, batch: list[_Piece]) -> None:
        """Counted while the batch still holds ``_busy``: one batch at a time adds to them."""
        if batch:
            self.batches += 1
            self.pieces += len(batch)

    def _finish(self, batch: list[_Piece], outcomes: list[tuple[bool, Any]]) -> None:
        """Ring the doorbells the committed pieces asked for, wait for the disk if a piece needs it,
        then answer every caller."""
        if not batch:
            return
        rings: set[str] = set()
        for piece, (ok, _) in zip(batch, outcomes, strict=True):
            if ok:
                rings |= piece.rings
        if rings:
            try:
                self._ring(rings)
            except Exception:
                log.exception("ringing doorbells failed")
        if any(piece.durable for piece in batch):
            outcomes = self._made_durable(outcomes, [piece.durable for piece in batch])
        for piece, (ok, outcome) in zip(batch, outcomes, strict=True):
            self._answer(piece, ok, outcome)

    def _answer(self, piece: _Piece, ok: bool, outcome: Any) -> None:
        with self._cond:  # the same lock under which a caller decides whether it needs an Event
            piece.state, piece.ok, piece.outcome = "done", ok, outcome
            event = piece.event
        if event is not None:
            event.set()
        elif piece.loop is not None and piece.future is not None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody to tell
                piece.loop.call_soon_threadsafe(_settle_future, piece.future, ok, outcome)

    def _lock_writer(self, blocking: bool) -> bool:
        path = self._writer_path
        while True:
            if self._writer_fd is None:
                self._writer_fd = open_lock_file(path, (self._store.lock_dir,))
            try:
                fcntl.flock(self._writer_fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            # Is it still the file at the path? Asked at most once a second: this is about fairness,
            # not correctness, and two syscalls on every commit cost sends about a tenth of their rate.
            if time.monotonic() < self._writer_checked + 1.0:
                return True
            self._writer_checked = time.monotonic()
            try:
                current = os.stat(path, follow_symlinks=False).st_ino == os.fstat(self._writer_fd).st_ino
            except FileNotFoundError:
                current = False
            except BaseException:
                fcntl.flock(self._writer_fd, fcntl.LOCK_UN)  # nobody would release it
                raise
            if current:
                return True
            # The lock folder was removed (and perhaps made again): writers that open the path now
            # queue on another file. Move to the file at the path, so all keep queueing on one.
            with _LOCK_FDS_MUTEX:
                _close_lock_fd(self._writer_fd)
            self._writer_fd = None

    def _unlock_writer(self) -> None:
        if self._writer_fd is not None:
            fcntl.flock(self._writer_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread() and self._pid == os.getpid():
            thread.join(self._store.settings.busy_timeout + 5)
        if self._writer_fd is not None and self._pid == os.getpid():
            with _LOCK_FDS_MUTEX:
                _close_lock_fd(self._writer_fd)
            self._writer_fd = None


class Wakeups:
    """Per-topic generation counters that waiters in threads and coroutines sleep on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generations: dict[str, int] = {}
        self._futures: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}

    def generation(self, topic: str) -> int:
        with self._cond:
            return self._generations.get(topic, 0)

    def bump(self, topics: Iterable[str]) -> None:
        woken: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        with self._cond:
            for topic in topics:
                self._generations[topic] = self._generations.get(topic, 0) + 1
                woken += self._futures.pop(topic, [])
            self._cond.notify_all()
        for loop, future in woken:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle_future, future, True, None)

    def wait(self, topic: str, seen: int, timeout: float) -> bool:
        """Sleep until ``topic`` moves past generation ``seen`` or ``timeout`` ends; True if it moved."""
        with self._cond:
            return self._cond.wait_for(lambda: self._generations.get(topic, 0) != seen, max(0.0, timeout))

    async def await_change(self, topic: str, seen: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self._generations.get(topic, 0) != seen:
                return True
            self._futures.setdefault(topic, []).append((loop, future))
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await future
            return True
        except TimeoutError:
            return False
        finally:
            with self._cond:
                waiting = self._futures.get(topic, [])
                if (loop, future) in waiting:
                    waiting.remove((loop, future))


# The earliest time any message of a queue is available, from the (queue, priority DESC,
# available_at) index alone: walk the distinct priorities (a seek each) and take the first entry
# of each, so a queue of a million delayed messages costs a few seeks, not a scan.
_NEXT_DUE = """
    WITH RECURSIVE levels(priority) AS (
        SELECT MAX(priority) FROM messages WHERE queue = :queue
        UNION ALL
        SELECT (SELECT MAX(priority) FROM messages WHERE queue = :queue AND priority < levels.priority)
        FROM levels WHERE levels.priority IS NOT NULL
    )
    SELECT MIN((SELECT MIN(available_at) FROM messages WHERE queue = :queue AND priority = levels.priority))
    FROM levels WHERE levels.priority IS NOT NULL
"""


# After the wall clock steps forward every lease looks expired at once, though its holder is
# alive and renews it every third of a lease. For this long after a step is noticed (by any
# process: it is kept in meta), a claim leaves an expired lease to its holder, moving its expiry
# to the end of the grace, instead of delivering the message a second time. (Dead holders'
# leases are handed back by their liveness locks, not by expiry, and are not held up.)
LEASE_STEP_GRACE = 15.0


def note_clock_step(conn: sqlite3.Connection, now: float) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clock_stepped_at', ?)", (now,))


def _clock_step_grace_until(conn: sqlite3.Connection, now: float) -> float:
    """When the grace after the last clock step noticed ends (0.0: no grace now). A note from
    later than now was made before the clock was set back again: it holds nothing up."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'clock_stepped_at'").fetchone()
    if row is None or float(row[0]) > now:
        return 0.0
    return float(row[0]) + LEASE_STEP_GRACE


# Who is to blame when a node dies (or freezes, or lets a lease run out) with several messages in
# hand? Any of them may have killed it (a handler that calls os._exit, a `call` that crashes the
# interpreter), or none (an operator's kill -9, the OOM killer). So such a delivery is charged (it
# counts towards the dead-letter limit) only when the message was alone in its consumer's hands:
# otherwise it is refunded (`refunds`), and the message is tried again at once, as before. A message
# refunded ISOLATE_AFTER_DEATHS times was there at as many deaths: it becomes a *suspect*, and a
# suspect is tried alone: a consumer takes one only with nothing else in hand, and takes nothing
# else while it holds one. A poison message is thus charged at each death after that, and dies a
# dead letter; the messages that happened to share its node are never charged for it. One crash
# of a node costs no message anything, and its messages go back to work in parallel.
ISOLATE_AFTER_DEATHS = 2
RECEIVING_RECENTLY = 30.0  # a consumer that received from a queue this recently makes way for its suspects


def hand_back_leases(conn: sqlite3.Connection, owner: str, why: str, ended: bool = True) -> tuple[int, set[str]]:
    """Make every message leased by ``owner`` ready again now; how many, and their queues (to ring).

    ``ended``: the holder died or stalled, so the deliveries ended abnormally, and are charged or
    refunded as the rule above says. Otherwise (the holder leaves in good order) nothing changes
    but the lease.
    """
    rows = conn.execute("SELECT id, queue, suspect, refunds FROM messages WHERE lease_owner = ?", (owner,)).fetchall()
    now = time.time()
    alone = len(rows) == 1
    for message_id, _, suspect, refunds in rows:
        if not ended or alone or suspect:  # in good order; or it alone was in hand: it counts
            change, error = "", why
        else:
            change = f", refunds = refunds + 1, suspect = {int(refunds + 1 >= ISOLATE_AFTER_DEATHS)}"
            error = f"{why} holding {len(rows)} messages; this delivery is not counted against any of them"
        conn.execute(
            f"UPDATE messages SET lease_owner = NULL, available_at = ?, last_error = ?{change} WHERE id = ?",
            (now, error, message_id),
        )
    return len(rows), {queue for _, queue, _, _ in rows}


def _bury(conn: sqlite3.Connection, message_id: int, error: str | None, now: float) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO dead_letters (id, queue, body, priority, attempts, created, died, last_error) "
        "SELECT id, queue, body, priority, attempts, created, ?, ? FROM messages WHERE id = ?",
        (now, error, message_id),
    )
    conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))


def _lease_lost(conn: sqlite3.Connection, message: Message, outcome: str) -> LeaseLost:
    """Why a settle of ``message`` found it no longer leased to its holder, told apart by what is left
    of it: settled already, a dead letter, or delivered again."""
    where = f"message {message.id} of queue {_show_name(message.queue)}"
    row = conn.execute("SELECT attempts, lease_owner FROM messages WHERE id = ?", (message.id,)).fetchone()
    if row is None:
        dead = conn.execute("SELECT 1 FROM dead_letters WHERE id = ?", (message.id,)).fetchone()
        gone = "is a dead letter now" if dead else "is gone: it was acked already (or purged)"
        return LeaseLost(f"{where} {gone}; {outcome}")
    attempts, owner = row
    if attempts == message.attempts and owner is None:
        return LeaseLost(f"{where} was handed back already (nacked, or its holder was taken for dead); {outcome}")
    return LeaseLost(
        f"{where} is no longer leased to {message.owner}: its lease ran out and it was delivered again "
        f"(delivery {attempts}, to {owner or 'nobody yet'}); {outcome}"
    )


class Bus:
    """Durable queues with competing consumers, for one handle (its lease owner is ``owner``)."""

    def __init__(self, store: Store, committer: GroupCommitter, owner: str, wakeups: Wakeups) -> None:
        self.store, self.committer, self.owner, self.wakeups = store, committer, owner, wakeups
        self.settings = store.settings
        self.turns = LockManager(store, owner, folder="receivers")  # whose turn it is to wait, per queue
        # Queues whose last claim here saw more ready than it took: the next receive claims at once,
        # without first reading whether one is ready. (After one that took the last, the next reads
        # first: a read does not queue for the writer lock, as a claim of nothing would.)
        self._busy_queues: set[str] = set()
        self._receiving: dict[str, float] = {}  # queue -> when this handle last received from it (monotonic)
        self._clock = ClockWatch()
        self.sent = self.acked = self.nacked = self.dead_lettered = 0  # this handle's, for /metrics

    # The pieces of work, each run inside a shared transaction ------------------------------

    def _send_work(
        self, queue: str, body: str, delay: float, priority: int, key: str | None
    ) -> Callable[[sqlite3.Connection], int]:
        def send(conn: sqlite3.Connection) -> int:
            now = time.time()
            cursor = conn.execute(
                "INSERT INTO messages (queue, body, priority, available_at, dedup_key, created) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (queue, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING",
                (queue, body, priority, now + delay, key, now),
            )
            if cursor.rowcount == 1 and cursor.lastrowid is not None:
                return cursor.lastrowid
            return int(
                conn.execute("SELECT id FROM messages WHERE queue = ? AND dedup_key = ?", (queue, key)).fetchone()[0]
            )

        send.single_statement = True  # type: ignore[attr-defined]
        return send

    def _ack_rows(self, conn: sqlite3.Connection, messages: Sequence[Message], outcome: str) -> None:
        """Delete handled messages still leased to their holders; LeaseLost (the caller's
        transaction rolls back) at the first one that is not."""
        for message in messages:
            gone = conn.execute(
                "DELETE FROM messages WHERE id = ? AND attempts = ? AND lease_owner = ?",
                (message.id, message.attempts, message.owner),
            ).rowcount
            if not gone:
                raise _lease_lost(conn, message, outcome)

    def _claim_work(
        self, queue: str, lease: float, count: int, settle: Sequence[Message] = ()
    ) -> Callable[[sqlite3.Connection], tuple[list[Message], bool]]:
        """A claim of up to ``count`` messages: (those taken, whether more were ready then)."""
        owner, limit = self.owner, self.settings.max_deliveries
        recently = time.monotonic() - RECEIVING_RECENTLY
        receiving = [name for name, when in self._receiving.items() if when >= recently]
        columns = "id, body, priority, attempts, refunds, suspect, created, last_error, lease_owner"
        leases: list[tuple[Any, ...]] = []  # the UPDATEs of the rows taken, run together

        def take(conn: sqlite3.Connection, row: tuple[Any, ...], now: float) -> Message | None:
            """Lease one message to this consumer, or bury it if nothing can handle it any more."""
            message_id, body, priority, attempts, refunds, suspect, created, last_error, _ = row
            if attempts - refunds >= limit and queue != WORKFLOW_QUEUE:  # a poison message
                _bury(conn, message_id, last_error, now)
                return None
            try:
                decoded = json.loads(body)
                # Whether a body this deep decodes at all depends on how deep the stack already is:
                # past the limit new values are held to, it is refused here, the same on every node.
                if len(body) > 2 * VARIABLES_MAX_DEPTH and _nested_deeper_than(decoded, VARIABLES_MAX_DEPTH):
                    raise ValueError(f"nested more than {VARIABLES_MAX_DEPTH} deep")
            except (ValueError, RecursionError) as error:  # stored by hand, or by an older nodeflow
                why = f"its body cannot be decoded ({type(error).__name__}: {str(error)[:200]})"
                _bury(conn, message_id, why, now)
                log.warning("message %d of queue %s is a dead letter now: %s", message_id, queue, why)
                return None
            leases.append((owner, now + lease, refunds, suspect, last_error, message_id))
            return Message(
                message_id, queue, decoded, attempts + 1, priority, created, now + lease, last_error, owner, refunds
            )

        def lease_taken(conn: sqlite3.Connection) -> None:
            if leases:
                conn.executemany(
                    "UPDATE messages SET lease_owner = ?, available_at = ?, attempts = attempts + 1, refunds = ?, "
                    "suspect = ?, last_error = ? WHERE id = ?",
                    leases,
                )
                leases.clear()

        def claim(conn: sqlite3.Connection) -> tuple[list[Message], bool]:
            now = time.time()
            if self._clock.stepped() > 0:
                note_clock_step(conn, now)
            self._ack_rows(conn, settle, "neither it nor the messages acked with it were acked, and none was received")
            # A suspect runs alone (see hand_back_leases): none is taken beside other work, and
            # nothing is taken beside one. A consumer that sees a suspect waiting in a queue it
            # receives from finishes what it holds first, so the suspect finds an empty pair of hands.
            # One look at the index of suspects (nearly always empty, never a scan of a queue) finds
            # the one this consumer holds, else the first one waiting for it.
            suspect = conn.execute(
                f"SELECT {columns}, queue FROM messages INDEXED BY messages_suspects WHERE suspect = 1 "
                f"AND (lease_owner = ? OR (available_at <= ? AND queue IN ({','.join('?' * len(receiving))}))) "
                "ORDER BY lease_owner IS ? DESC, available_at LIMIT 1",
                (owner, now, *receiving, owner),
            ).fetchone()
            grace: list[float] = []  # when the grace after a clock step ends, read at the first expired lease

            def in_step_grace(message_id: int) -> bool:
                """After the wall clock stepped forward, a lease only seems to have run out: its holder
                renews it. Left to that holder for LEASE_STEP_GRACE."""
                if not grace:
                    grace.append(_clock_step_grace_until(conn, now))
                if now >= grace[0]:
                    return False
                conn.execute("UPDATE messages SET available_at = ? WHERE id = ?", (grace[0], message_id))
                return True

            if suspect is not None:
                if suspect[8] == owner:  # it holds one: nothing beside it
                    return [], False
                held = conn.execute("SELECT 1 FROM messages WHERE lease_owner = ? LIMIT 1", (owner,)).fetchone()
                if held or suspect[-1] != queue:
                    return [], False
                row = suspect[:-1]
                previous = row[8]
                if previous is not None:  # a suspect's lease ran out: tried alone, it counts
                    if in_step_grace(row[0]):
                        return [], False
                    row = (*row[:7], f"lease of {previous} expired after delivery {row[3]}", previous)
                taken_alone = take(conn, row, now)
                lease_taken(conn)
                return ([taken_alone] if taken_alone is not None else []), False
            taken: list[Message] = []
            # Priority by priority, highest first, each an index range of what is available now:
            # one ORDER BY over the whole queue would scan every delayed or leased message. The
            # highest level is found in the statement that reads its first rows. Each read asks for
            # one row more than it takes: whether more are ready.
            wanted = count
            rows = conn.execute(
                f"SELECT {columns} FROM messages WHERE queue = ? AND priority = "
                "(SELECT MAX(priority) FROM messages WHERE queue = ?) AND available_at <= ? AND suspect = 0 "
                "ORDER BY available_at LIMIT ?",
                (queue, queue, now, wanted + 1),
            ).fetchall()
            level = rows[0][2] if rows else conn.execute(
                "SELECT MAX(priority) FROM messages WHERE queue = ?", (queue,)
            ).fetchone()[0]  # fmt: skip
            while True:
                more = len(rows) > wanted
                for row in rows[:wanted]:
                    message_id, attempts, refunds, previous = row[0], row[3], row[4], row[8]
                    if previous is not None:  # its lease ran out without an ack or a nack
                        if in_step_grace(message_id):
                            continue
                        # Its holder may have held others (see hand_back_leases): refunded, perhaps a suspect.
                        refunds += 1
                        error = f"lease of {previous} expired after delivery {attempts}; not counted against it"
                        if refunds >= ISOLATE_AFTER_DEATHS:
                            conn.execute(
                                "UPDATE messages SET lease_owner = NULL, refunds = ?, suspect = 1, last_error = ? "
                                "WHERE id = ?",
                                (refunds, error, message_id),
                            )
                            continue  # tried alone from now on
                        row = (*row[:4], refunds, 0, row[6], error, previous)
                    message = take(conn, row, now)
                    if message is not None:
                        taken.append(message)
                lease_taken(conn)  # before reading this level again: what was taken is not ready now
                if len(taken) >= count or level is None:
                    return taken, more
                if len(rows) < wanted:  # this level has no more ready: the next lower one
                    level = conn.execute(
                        "SELECT MAX(priority) FROM messages WHERE queue = ? AND priority < ?", (queue, level)
                    ).fetchone()[0]
                    if level is None:
                        return taken, False
                wanted = count - len(taken)
                rows = conn.execute(
                    f"SELECT {columns} FROM messages WHERE queue = ? AND priority = ? AND available_at <= ? "
                    "AND suspect = 0 ORDER BY available_at LIMIT ?",
                    (queue, level, now, wanted + 1),
                ).fetchall()

        return claim

    # Sending ------------------------------------------------------------------------------

    def _prepare_send(
        self, queue: str, body: Any, delay: float | str, priority: int, key: str | None
    ) -> tuple[Callable[[sqlite3.Connection], int], tuple[str, ...]]:
        queue = check_queue_name(queue)
        text = encode_body(body, self.settings.max_body_bytes)
        wait = parse_duration(delay, "delay")
        priority = _check_priority(priority)
        key = check_dedup_key(key)
        # A delayed message rings too: a receiver asleep until its next poll learns the new due time.
        return self._send_work(queue, text, wait, priority, key), (_ring_topic_for_queue(queue),)

    def send(self, queue: str, body: Any, delay: float | str = 0, priority: int = 0, key: str | None = None) -> int:
        work, rings = self._prepare_send(queue, body, delay, priority, key)
        sent = self.committer.submit(work, rings)
        self.sent += 1
        return sent

    async def asend(
        self, queue: str, body: Any, delay: float | str = 0, priority: int = 0, key: str | None = None
    ) -> int:
        work, rings = self._prepare_send(queue, body, delay, priority, key)
        sent = await self.committer.asubmit(work, rings)
        self.sent += 1
        return sent

    def _prepare_send_many(
        self, queue: str, bodies: Iterable[Any], delay: float | str, priority: int, keys: Iterable[str | None] | None
    ) -> tuple[Callable[[sqlite3.Connection], list[int]], tuple[str, ...], int]:
        """The work of a send_many, its rings, and how many bodies it sends."""
        queue = check_queue_name(queue)
        if isinstance(bodies, _NOT_A_LIST) or not isinstance(bodies, Iterable):
            raise InvalidInput(f"send_many takes a list of message bodies, not {type(bodies).__name__}")
        texts: list[str] = []
        total = 0
        for body in bodies:
            if len(texts) == SEND_MANY_MAX:
                raise InvalidInput(f"send_many takes at most {SEND_MANY_MAX:,} messages at once; split the list")
            text = encode_body(body, self.settings.max_body_bytes)
            total += len(text) if text.isascii() else len(text.encode("utf-8"))
            if total > SEND_MANY_MAX_BYTES:
                raise InvalidInput(
                    f"the bodies given to send_many come to more than {SEND_MANY_MAX_BYTES >> 20} MiB of JSON; "
                    "split the list (one transaction holds the database's writers back while it runs)"
                )
            texts.append(text)
        if keys is None:
            checked: list[str | None] = [None] * len(texts)
        else:
            if isinstance(keys, _NOT_A_LIST) or not isinstance(keys, Iterable):
                shown = type(keys).__name__
                raise InvalidInput(f"keys is a list with one deduplication key (or None) per body, not {shown}")
            checked = [check_dedup_key(key) for key in itertools.islice(keys, len(texts) + 1)]
            if len(checked) != len(texts):
                raise InvalidInput(f"keys has {len(checked)} entries for {len(texts)} bodies; give one per body")
        wait = parse_duration(delay, "delay")
        priority = _check_priority(priority)
        one = self._send_work

        def send_all(conn: sqlite3.Connection) -> list[int]:
            return [one(queue, text, wait, priority, key)(conn) for text, key in zip(texts, checked, strict=True)]

        return send_all, (_ring_topic_for_queue(queue),), len(texts)

    def send_many(
        self,
        queue: str,
        bodies: Iterable[Any],
        delay: float | str = 0,
        priority: int = 0,
        keys: Iterable[str | None] | None = None,
    ) -> list[int]:
        work, rings, count = self._prepare_send_many(queue, bodies, delay, priority, keys)
        sent = self.committer.submit(work, rings) if count else []  # nothing to send: no commit
        self.sent += len(sent)
        return sent

    async def asend_many(
        self,
        queue: str,
        bodies: Iterable[Any],
        delay: float | str = 0,
        priority: int = 0,
        keys: Iterable[str | None] | None = None,
    ) -> list[int]:
        work, rings, count = self._prepare_send_many(queue, bodies, delay, priority, keys)
        sent = await self.committer.asubmit(work, rings) if count else []
        self.sent += len(sent)
        return sent

    # Receiving ----------------------------------------------------------------------------

    def _check_receive(self, queue: str, lease: float | str, wait: float | str, batch: int) -> tuple[str, float, float]:
        queue = check_queue_name(queue)
        lease_s = parse_duration(lease, "lease")
        if lease_s <= 0:
            raise InvalidInput("a lease must be longer than zero, such as 30s")
        wait_s = parse_duration(wait, "wait")
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 1000:
            raise InvalidInput(f"batch must be a whole number from 1 to 1000, not {batch!r}")
        return queue, lease_s, wait_s

    def _ready_or_next_due(self, queue: str) -> float | None:
        """0 when a message is ready now, else the wall-clock time the next one becomes ready."""

        def look(conn: sqlite3.Connection) -> float | None:
            due = conn.execute(_NEXT_DUE, {"queue": queue}).fetchone()[0]
            if due is None:
                return None
            return 0.0 if due <= time.time() else float(due)

        return self.store.read(look)

    def _sleep_for(self, due: float | None, deadline: float) -> float:
        left = deadline - time.monotonic()
        pause = min(left, self.settings.poll_interval)
        if due is not None:
            pause = min(pause, max(0.0, due - time.time()) + 0.001)
        return pause

    def receive(
        self, queue: str, lease: float | str = 30, wait: float | str = 0, batch: int = 1, ack: Sequence[Message] = ()
    ) -> list[Message]:
        """Lease up to ``batch`` messages; ``ack``: messages acked in the first claim's transaction
        (all or none of them, and nothing is received if one of them is no longer leased)."""
        queue, lease_s, wait_s = self._check_receive(queue, lease, wait, batch)
        topic = _ring_topic_for_queue(queue)
        deadline = time.monotonic() + wait_s
        waiting_turn: HeldLock | None = None
        turn_wait: _LockAttempt | None = None  # one blocked attempt per call, however long it waits
        turn_granted: list[threading.Event] = []  # one per blocked attempt for the turn; the last is current

        claimed_nothing = False
        rung = False  # the last wait ended with a ring for this queue: a message came, claim it at once
        settle = ack
        try:
            while True:
                seen = self.wakeups.generation(topic)  # read before looking: a ring after it is not lost
                # Acks to commit claim at once, whatever is ready: they must not wait for a message.
                claim_at_once = queue in self._busy_queues or bool(settle) or rung
                due = 0.0 if claim_at_once else self._ready_or_next_due(queue)
                rung = False
                if due == 0.0 and not claimed_nothing:
                    self._receiving[queue] = time.monotonic()
                    taken, more = self.committer.submit(self._claim_work(queue, lease_s, batch, settle), durable=False)
                    self._count_acks(settle)
                    settle = ()
                    if more:
                        self._busy_queues.add(queue)
                    else:
                        self._busy_queues.discard(queue)
                    if taken:
                        return taken
                    claimed_nothing = True
                    continue  # another consumer took it first, or it has run dry; look again
                if due == 0.0:  # ready, but not for us now (a suspect, kept for empty hands): wait for news
                    due = None
                claimed_nothing = False
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                if waiting_turn is None:
                    # One waiting receiver per queue on the host watches for messages; the others
                    # queue in the kernel behind it. A message then wakes one receiver, not a herd
                    # of them that all read, all claim, and all but one come away empty. While
                    # waiting for the turn, look at the queue every poll interval anyway: the
                    # receiver whose turn it is may be stopped (SIGSTOP) and must starve nobody.
                    if turn_wait is None:
                        waiting_turn = self.turns._acquire_now(queue, False, blocking=False, note=False)
                        if waiting_turn is None:
                            turn_granted.append(threading.Event())
                            turn_wait = _LockAttempt(self.turns, queue, False, True, _setter(turn_granted[-1]))
                            turn_wait.start()
                        elif self.wakeups.generation(topic) != seen:
                            continue  # free at once, but a ring came meanwhile: look again
                    if waiting_turn is None:
                        if turn_granted[-1].wait(min(left, self.settings.poll_interval)):
                            waiting_turn, turn_wait = turn_wait.abandon(), None  # type: ignore[union-attr]
                        continue  # look again, with the turn or after a poll interval
                rung = self.wakeups.wait(topic, seen, self._sleep_for(due, deadline))
        finally:
            if turn_wait is not None:
                late = turn_wait.abandon()
                if late is not None:
                    late.release()
            if waiting_turn is not None:
                waiting_turn.release()  # the next receiver in line watches from now on

    async def areceive(
        self, queue: str, lease: float | str = 30, wait: float | str = 0, batch: int = 1, ack: Sequence[Message] = ()
    ) -> list[Message]:
        queue, lease_s, wait_s = self._check_receive(queue, lease, wait, batch)
        topic = _ring_topic_for_queue(queue)
        deadline = time.monotonic() + wait_s
        claimed_nothing = False
        settle = ack
        while True:
            seen = self.wakeups.generation(topic)
            due = 0.0 if queue in self._busy_queues or settle else self._ready_or_next_due(queue)  # a short WAL read
            if due == 0.0 and not claimed_nothing:
                self._receiving[queue] = time.monotonic()
                taken, more = await self.committer.asubmit(
                    self._claim_work(queue, lease_s, batch, settle), durable=False
                )
                self._count_acks(settle)
                settle = ()
                if more:
                    self._busy_queues.add(queue)
                else:
                    self._busy_queues.discard(queue)
                if taken:
                    return taken
                claimed_nothing = True
                continue
            if due == 0.0:  # ready, but not for us now (a suspect, kept for empty hands): wait for news
                due = None
            claimed_nothing = False
            if time.monotonic() >= deadline:
                return []
            await self.wakeups.await_change(topic, seen, self._sleep_for(due, deadline))

    # Settling -----------------------------------------------------------------------------

    def _ack_work(self, message: Message, also: Callable[[sqlite3.Connection], T] | None) -> Callable[..., T | None]:
        def ack(conn: sqlite3.Connection) -> T | None:
            result = also(conn) if also is not None else None
            self._ack_rows(conn, (message,), "the ack and its writes were rolled back")
            return result

        ack.single_statement = also is None  # type: ignore[attr-defined]
        return ack

    def _count_acks(self, messages: Sequence[Message]) -> None:
        self.acked += len(messages)

    def ack(
        self, message: Message, also: Callable[[sqlite3.Connection], T] | None = None, rings: Iterable[str] = ()
    ) -> T | None:
        """Delete a handled message; ``also(conn)`` runs in the same transaction (all or nothing).

        ``rings`` are the doorbell topics to ring after the commit, for what ``also`` wrote.
        """
        # A plain ack need not wait for the disk: lost to a power cut, it costs a redelivery. An
        # ack with writes of its own is as durable as they need to be.
        result = self.committer.submit(self._ack_work(message, also), rings, durable=also is not None)
        self.acked += 1
        return result

    async def aack(
        self, message: Message, also: Callable[[sqlite3.Connection], T] | None = None, rings: Iterable[str] = ()
    ) -> T | None:
        result = await self.committer.asubmit(self._ack_work(message, also), rings, durable=also is not None)
        self.acked += 1
        return result

    def _ack_many_work(self, messages: Sequence[Message]) -> Callable[[sqlite3.Connection], list[Message]]:
        def ack_many(conn: sqlite3.Connection) -> list[Message]:
            lost = []
            for message in messages:
                if not conn.execute(
                    "DELETE FROM messages WHERE id = ? AND attempts = ? AND lease_owner = ?",
                    (message.id, message.attempts, message.owner),
                ).rowcount:
                    lost.append(message)
            return lost

        return ack_many

    def ack_many(self, messages: Iterable[Message]) -> list[Message]:
        """Ack every message given that is still leased to its holder, in one transaction; returns
        the others (their leases ran out, and they were delivered again or became dead letters)."""
        chosen = _check_messages(messages, "ack_many")
        if not chosen:
            return []
        lost = self.committer.submit(self._ack_many_work(chosen), durable=False)
        self.acked += len(chosen) - len(lost)
        return lost

    async def aack_many(self, messages: Iterable[Message]) -> list[Message]:
        chosen = _check_messages(messages, "ack_many")
        if not chosen:
            return []
        lost = await self.committer.asubmit(self._ack_many_work(chosen), durable=False)
        self.acked += len(chosen) - len(lost)
        return lost

    def _nack_work(self, message: Message, delay: float, error: str | None) -> Callable[[sqlite3.Connection], str]:
        limit = self.settings.max_deliveries

        def nack(conn: sqlite3.Connection) -> str:
            now = time.time()
            changed = conn.execute(
                "UPDATE messages SET lease_owner = NULL, available_at = ?, last_error = ? "
                "WHERE id = ? AND attempts = ? AND lease_owner = ?",
                (now + delay, error, message.id, message.attempts, message.owner),
            ).rowcount
            if not changed:
                raise _lease_lost(conn, message, "the nack changed nothing")
            if message.charged >= limit and message.queue != WORKFLOW_QUEUE:
                _bury(conn, message.id, error, now)
                return "dead"
            return "queued"

        return nack

    def _prepare_nack(self, message: Message, delay: float | str, error: str | None) -> tuple[Any, tuple[str, ...]]:
        wait = parse_duration(delay, "nack delay")
        text = None if error is None else str(error)[:4000]
        return self._nack_work(message, wait, text), (_ring_topic_for_queue(message.queue),)

    def nack(self, message: Message, delay: float | str = 0, error: str | None = None) -> str:
        """Hand a message back for another try after ``delay``; "dead" once it has had its deliveries."""
        work, rings = self._prepare_nack(message, delay, error)
        return self._count_nack(self.committer.submit(work, rings, durable=False))

    async def anack(self, message: Message, delay: float | str = 0, error: str | None = None) -> str:
        work, rings = self._prepare_nack(message, delay, error)
        return self._count_nack(await self.committer.asubmit(work, rings, durable=False))

    def _count_nack(self, outcome: str) -> str:
        self.nacked += 1
        self.dead_lettered += outcome == "dead"
        return outcome

    def extend(self, message: Message, lease: float | str) -> float:
        """Push the lease to ``lease`` seconds from now; returns the new lease end (wall clock)."""
        return self.committer.submit(self._extend_work(message, lease), durable=False)

    async def aextend(self, message: Message, lease: float | str) -> float:
        return await self.committer.asubmit(self._extend_work(message, lease), durable=False)

    def _extend_work(self, message: Message, lease: float | str) -> Callable[[sqlite3.Connection], float]:
        seconds = parse_duration(lease, "lease")

        def extend(conn: sqlite3.Connection) -> float:
            until = time.time() + seconds
            changed = conn.execute(
                "UPDATE messages SET available_at = ? WHERE id = ? AND attempts = ? AND lease_owner = ?",
                (until, message.id, message.attempts, message.owner),
            ).rowcount
            if not changed:
                raise _lease_lost(conn, message, "its lease was not extended")
            return until

        return extend

    def release_leases(self, owner: str) -> int:
        """Hand back at once every message leased by ``owner`` (a node known to be gone)."""

        count, queues = self.committer.submit(
            lambda conn: hand_back_leases(conn, owner, f"the lease holder {owner} went away", ended=False)
        )
        if queues:
            self.committer._ring({_ring_topic_for_queue(queue) for queue in queues})
        return count

    # Dead letters and depths --------------------------------------------------------------

    def dead_letters(self, queue: str, limit: int = 1000) -> list[DeadLetter]:
        queue = check_queue_name(queue)
        rows = self.store.read(
            lambda conn: conn.execute(
                "SELECT id, queue, body, attempts, priority, created, died, last_error FROM dead_letters "
                "WHERE queue = ? ORDER BY id LIMIT ?",
                (queue, limit),
            ).fetchall()
        )
        return [DeadLetter(row[0], row[1], decode_stored(row[2]), *row[3:]) for row in rows]

    def retry_dead(self, queue: str, ids: Iterable[int] | None = None) -> int:
        """Queue dead letters again with a fresh delivery count; returns how many."""
        queue = check_queue_name(queue)
        chosen = None if ids is None else sorted({int(i) for i in ids})

        def retry(conn: sqlite3.Connection) -> int:
            where, args = self._dead_filter(queue, chosen)
            now = time.time()
            moved = conn.execute(
                "INSERT INTO messages (id, queue, body, priority, available_at, attempts, created, last_error) "
                f"SELECT id, queue, body, priority, ?, 0, created, last_error FROM dead_letters WHERE {where}",
                (now, *args),
            ).rowcount
            conn.execute(f"DELETE FROM dead_letters WHERE {where}", args)
            return moved

        return self.committer.submit(retry, (_ring_topic_for_queue(queue),))

    def purge_dead(self, queue: str, ids: Iterable[int] | None = None) -> int:
        queue = check_queue_name(queue)
        chosen = None if ids is None else sorted({int(i) for i in ids})

        def purge(conn: sqlite3.Connection) -> int:
            where, args = self._dead_filter(queue, chosen)
            return conn.execute(f"DELETE FROM dead_letters WHERE {where}", args).rowcount

        return self.committer.submit(purge)

    @staticmethod
    def _dead_filter(queue: str, ids: list[int] | None) -> tuple[str, tuple[Any, ...]]:
        if ids is None:
            return "queue = ?", (queue,)
        return f"queue = ? AND id IN ({','.join('?' * len(ids))})", (queue, *ids)

    def depths(self) -> dict[str, dict[str, int]]:
        """Per queue: ready now, leased, delayed (not ready yet) and dead."""

        def count(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            now = time.time()
            found: dict[str, dict[str, int]] = {}
            for queue, ready, leased, delayed in conn.execute(
                "SELECT queue, SUM(available_at <= :now), SUM(lease_owner IS NOT NULL AND available_at > :now), "
                "SUM(lease_owner IS NULL AND available_at > :now) FROM messages GROUP BY queue",
                {"now": now},
            ):
                found[queue] = {"ready": ready, "leased": leased, "delayed": delayed, "dead": 0}
            for queue, dead in conn.execute("SELECT queue, COUNT(*) FROM dead_letters GROUP BY queue"):
                found.setdefault(queue, {"ready": 0, "leased": 0, "delayed": 0, "dead": 0})["dead"] = dead
            return dict(sorted(found.items()))

        return self.store.read(count)


# ══════════════════════════════════════════════════════════════════════════════════════════
# 6. Instructions and cache signals: an ordered log with a cursor per node, change tokens,
#    and a local memory cache whose entries expire when their tokens fire.
# ══════════════════════════════════════════════════════════════════════════════════════════

SIGNAL_TOPIC = "signal"  # an instruction whose payload is the key of a change token
PRUNE_EVERY = 256  # every this many instructions, the appender also prunes the log
SIGNAL_KEY_MAX_BYTES = 1024


def check_signal_key(key: object) -> str:
    if not isinstance(key, str) or not key or "\0" in key or len(key.encode("utf-8", "replace")) > SIGNAL_KEY_MAX_BYTES:
        raise InvalidInput(f"a signal key is non-empty text of at most {SIGNAL_KEY_MAX_BYTES} bytes, not {key!r}")
    return key


def prune_instructions(conn: sqlite3.Connection, max_age: float, max_count: int) -> int:
    """Delete the oldest instructions beyond ``max_count`` or older than ``max_age``; returns how many.

    Only a prefix of the log is ever deleted, and the last id deleted is kept as the horizon:
    a node whose cursor is below it has missed instructions and must cold-boot.
    """
    horizon = _pruned_through(conn)
    newest = conn.execute("SELECT MAX(id) FROM instructions").fetchone()[0] or 0
    by_count = newest - max_count
    by_age = conn.execute("SELECT MAX(id) FROM instructions WHERE created < ?", (time.time() - max_age,)).fetchone()[0]
    cut = max(by_count, by_age or 0)
    if cut <= horizon:
        return 0
    deleted = conn.execute("DELETE FROM instructions WHERE id <= ?", (cut,)).rowcount
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('instructions_pruned_through', ?)", (cut,))
    return deleted


def _pruned_through(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'instructions_pruned_through'").fetchone()
    return int(row[0]) if row else 0


class ChangeToken:
    """Fires once ``key`` is triggered, by any process on the host, after the token was made.

    Read ``.changed``, register ``on_change(callback)``, ``wait(timeout)`` in a thread, or
    ``await token`` in a coroutine. Callbacks run in the handle's listener thread.
    """

    __slots__ = ("key", "_signals", "_fired", "_callbacks", "_event", "_futures", "__weakref__")

    def __init__(self, signals: Signals, key: str) -> None:
        self.key = key
        self._signals = signals
        self._fired = False
        self._callbacks: list[Callable[[ChangeToken], None]] = []
        self._event = threading.Event()
        self._futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def changed(self) -> bool:
        if not self._fired:
            self._signals.catch_up()  # exact, even between a trigger and the ring that follows it
        return self._fired

    def on_change(self, callback: Callable[[ChangeToken], None]) -> None:
        self._signals.listen()
        with self._signals.mutex:
            if not self._fired:
                self._callbacks.append(callback)
                self._signals.kept.add(self)  # a token with a callback lives until it fires
                return
        callback(self)

    def cancel(self) -> None:
        """Drop this token's callbacks; a token nobody holds is then freed."""
        with self._signals.mutex:
            self._callbacks = []
            self._signals.kept.discard(self)

    def wait(self, timeout: float | None = None) -> bool:
        self._signals.listen()
        return self.changed or self._event.wait(timeout)

    def __await__(self) -> Generator[Any, None, bool]:
        return self._await().__await__()

    async def _await(self) -> bool:
        self._signals.listen()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._signals.mutex:
            if self._fired:
                return True
            self._futures.append((loop, future))
        await future
        return True

    def _fire(self) -> None:
        """Mark fired and run the callbacks; the caller holds no lock."""
        with self._signals.mutex:
            if self._fired:
                return
            self._fired = True
            callbacks, self._callbacks = self._callbacks, []
            futures, self._futures = self._futures, []
            self._signals.kept.discard(self)
        self._event.set()
        for loop, future in futures:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle_future, future, True, None)
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("a change-token callback for %r failed", self.key)

    def __repr__(self) -> str:
        return f"<ChangeToken {self.key!r} changed={self._fired}>"


class Signals:
    """One handle's view of the instruction log: its cursor, its tokens, its handlers."""

    def __init__(
        self, store: Store, committer: GroupCommitter, node: str, persistent: bool, listen: Callable[[], None]
    ) -> None:
        self.store, self.committer, self.node, self.persistent = store, committer, node, persistent
        self.listen = listen  # starts the handle's listener thread (doorbell + poll)
        self.mutex = threading.Lock()  # tokens and callbacks
        self._catch_up_mutex = threading.Lock()  # one reader of the log at a time, in order
        self._applying: int | None = None  # the thread inside catch_up, whose callbacks may call back
        self._tokens: dict[str, weakref.WeakSet[ChangeToken]] = {}
        self.kept: set[ChangeToken] = set()  # tokens with callbacks, which nobody else may hold
        self._handlers: dict[str, list[Callable[[str, Any], None]]] = {}
        self._cold_boot_handlers: list[Callable[[str], None]] = []
        self.cursor: int | None = None
        self._saved_cursor: int | None = None  # the position last written to instruction_cursors
        self.applied = 0
        self.cold_boots = 0

    # Tokens -------------------------------------------------------------------------------

    def token(self, key: str) -> ChangeToken:
        key = check_signal_key(key)
        self.catch_up()  # what was triggered before the token was made must not fire it
        made = ChangeToken(self, key)
        with self.mutex:
            self._tokens.setdefault(key, weakref.WeakSet()).add(made)
        return made

    def _fire_key(self, key: str) -> None:
        with self.mutex:
            tokens = list(self._tokens.pop(key, ()))
        for token in tokens:
            token._fire()

    def _fire_all(self) -> None:
        with self.mutex:
            tokens = [token for group in self._tokens.values() for token in group]
            self._tokens.clear()
        for token in tokens:
            token._fire()

    def on_instruction(self, topic: str, handler: Callable[[str, Any], None]) -> None:
        """Call ``handler(topic, payload)`` for each instruction of ``topic`` another node appends."""
        self._handlers.setdefault(topic, []).append(handler)

    def on_cold_boot(self, handler: Callable[[str], None]) -> None:
        self._cold_boot_handlers.append(handler)

    # Appending ----------------------------------------------------------------------------

    def _append_work(self, topic: str, payload: str) -> Callable[[sqlite3.Connection], int]:
        settings, node = self.store.settings, self.node

        def append(conn: sqlite3.Connection) -> int:
            number = conn.execute(
                "INSERT INTO instructions (topic, payload, origin, created) VALUES (?, ?, ?, ?)",
                (topic, payload, node, time.time()),
            ).lastrowid
            assert number is not None
            if number % PRUNE_EVERY == 0:
                prune_instructions(conn, settings.instruction_max_age, settings.instruction_max_count)
            return number

        return append

    def append(self, topic: str, payload: Any) -> int:
        """Append an instruction for every other node; returns its position in the log."""
        return self.committer.submit(self._append_work(topic, json.dumps(payload)), (RING_INSTRUCTIONS,))

    def trigger(self, key: str) -> int:
        """Fire ``key``'s tokens here at once and, through the log, on every node."""
        key = check_signal_key(key)
        number = self.committer.submit(self._append_work(SIGNAL_TOPIC, json.dumps(key)), (RING_INSTRUCTIONS,))
        self._fire_key(key)
        return number

    async def atrigger(self, key: str) -> int:
        key = check_signal_key(key)
        number = await self.committer.asubmit(self._append_work(SIGNAL_TOPIC, json.dumps(key)), (RING_INSTRUCTIONS,))
        self._fire_key(key)
        return number

    # Reading ------------------------------------------------------------------------------

    def catch_up(self, save: bool = False) -> int:
        """Apply, in order, every instruction after the cursor that another node appended.

        Only ``save=True`` (the listener, every ring and poll) writes a moved cursor to the
        database: a read of ``token.changed`` on an event loop must never wait for a commit.
        """
        if self._applying == threading.get_ident():
            return 0  # a callback of this very catch-up (making its next token, say): nothing to do
        with self._catch_up_mutex:
            self._applying = threading.get_ident()
            try:
                applied = self._catch_up_in_order()
                if save and self.persistent and self.cursor != self._saved_cursor:
                    self._save_cursor()
                return applied
            finally:
                self._applying = None

    def _catch_up_in_order(self) -> int:
        if self.cursor is None:
            self._start()
        applied = 0
        while True:
            start = self.cursor or 0

            def read(conn: sqlite3.Connection, after: int = start) -> tuple[int, list[tuple[Any, ...]]]:
                rows = conn.execute(
                    "SELECT id, topic, payload, origin FROM instructions WHERE id > ? ORDER BY id LIMIT 1000",
                    (after,),
                ).fetchall()
                return _pruned_through(conn), rows

            horizon, rows = self.store.read(read)
            if start < horizon:
                self._cold_boot(f"its cursor {start} is behind the pruned horizon {horizon}")
                continue
            for number, topic, payload, origin in rows:
                if origin != self.node:
                    self._apply(topic, payload)
                    applied += 1
                self.cursor = number
            if len(rows) < 1000:
                break
        self.applied += applied
        return applied

    def _start(self) -> None:
        newest, horizon, saved = self.store.read(
            lambda conn: (
                conn.execute("SELECT COALESCE(MAX(id), 0) FROM instructions").fetchone()[0],
                _pruned_through(conn),
                conn.execute("SELECT position FROM instruction_cursors WHERE node = ?", (self.node,)).fetchone(),
            )
        )
        newest = max(newest, horizon)
        if not self.persistent:
            self.cursor = newest  # a passing handle has no cache to be stale: start from now
        elif saved is None:
            self.cursor = 0
            self._cold_boot("it has never synced")
        else:
            self.cursor = int(saved[0])

    def _cold_boot(self, why: str) -> None:
        """Everything this node cached may be stale: drop it all and start from the log's end."""
        newest = self.store.read(
            lambda conn: max(
                conn.execute("SELECT COALESCE(MAX(id), 0) FROM instructions").fetchone()[0], _pruned_through(conn)
            )
        )
        self.cold_boots += 1
        log.warning(
            "node %s: cold boot (%s): dropping all cached state; resuming at instruction %d", self.node, why, newest
        )
        self.cursor = newest
        for handler in self._cold_boot_handlers:
            try:
                handler(why)
            except Exception:
                log.exception("a cold-boot handler failed")
        self._fire_all()

    def _apply(self, topic: str, payload: str) -> None:
        try:
            value = json.loads(payload)
        except ValueError:
            log.warning("node %s: skipped an instruction of topic %r whose payload is not JSON", self.node, topic)
            return
        if topic == SIGNAL_TOPIC and isinstance(value, str):
            self._fire_key(value)
        for handler in self._handlers.get(topic, ()):
            try:
                handler(topic, value)
            except Exception:
                log.exception("node %s: the handler of instruction topic %r failed", self.node, topic)

    def _save_cursor(self) -> None:
        if not self.persistent or self.cursor is None:
            return
        node, position = self.node, self.cursor

        def save(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO instruction_cursors (node, position, updated) VALUES (?, ?, ?) "
                "ON CONFLICT (node) DO UPDATE SET position = MAX(position, excluded.position), "
                "updated = excluded.updated",
                (node, position, time.time()),
            )

        self.committer.submit(save)
        self._saved_cursor = position

    def lag(self) -> list[tuple[dict[str, str], int]]:
        """For each node with a saved cursor: how many instructions it has yet to apply."""
        rows = self.store.read(
            lambda conn: conn.execute(
                "SELECT c.node, MAX(0, (SELECT COALESCE(MAX(id), 0) FROM instructions) - c.position) "
                "FROM instruction_cursors c ORDER BY c.node"
            ).fetchall()
        )
        return [({"node": node}, int(behind)) for node, behind in rows]

    def prune(self, max_age: float | str | None = None, max_count: int | None = None) -> int:
        settings = self.store.settings
        age = settings.instruction_max_age if max_age is None else parse_duration(max_age, "max_age")
        count = settings.instruction_max_count if max_count is None else int(max_count)
        if count < 0:
            raise InvalidInput("max_count cannot be negative")
        return self.committer.submit(lambda conn: prune_instructions(conn, age, count))


def _forget(tokens: Iterable[ChangeToken]) -> None:
    """An evicted entry's tokens need not fire any more: drop their callbacks, and the tokens."""
    for token in tokens:
        token.cancel()


class MemoryCache:
    """A process-local cache whose entries are evicted when a change token they depend on fires.

    ``get_or_create(key, factory, tokens=("definitions",), ttl=60)`` returns the cached value,
    or calls ``factory()`` and caches its result. The tokens are made before the factory runs,
    so a change triggered while it runs evicts what it built.
    """

    def __init__(self, signals: Signals) -> None:
        self._signals = signals
        self._mutex = threading.Lock()
        self._entries: dict[Any, tuple[Any, list[ChangeToken], float | None]] = {}
        self.hits = 0
        self.misses = 0
        signals.on_cold_boot(lambda why: self.clear())

    def _lookup(self, key: Any) -> tuple[bool, Any]:
        with self._mutex:
            entry = self._entries.get(key)
        if entry is not None:
            value, tokens, expires = entry
            if not any(token._fired for token in tokens) and (expires is None or time.monotonic() < expires):
                self.hits += 1
                return True, value
            self.evict(key, entry)
        self.misses += 1
        return False, None

    def _tokens(self, key: Any, tokens: Iterable[str]) -> list[ChangeToken]:
        self._signals.listen()  # entries are only as fresh as the listener keeps the tokens
        made = [self._signals.token(name) for name in tokens]

        def evict(_token: ChangeToken) -> None:
            self._evict_if_stale(key)

        for token in made:
            token.on_change(evict)
        return made

    def _store(self, key: Any, value: Any, tokens: list[ChangeToken], ttl: float | None) -> None:
        expires = None if ttl is None else time.monotonic() + ttl
        if any(token._fired for token in tokens):
            _forget(tokens)
            return  # changed while the factory ran: do not cache a value that may be stale
        with self._mutex:
            replaced = self._entries.get(key)
            self._entries[key] = (value, tokens, expires)
        if replaced is not None:
            _forget(replaced[1])

    def get_or_create(
        self, key: Any, factory: Callable[[], T], *, tokens: Iterable[str] = (), ttl: float | str | None = None
    ) -> T:
        found, value = self._lookup(key)
        if found:
            return value  # type: ignore[no-any-return]
        seconds = None if ttl is None else parse_duration(ttl, "ttl")
        made = self._tokens(key, tokens)
        value = factory()
        self._store(key, value, made, seconds)
        return value

    async def aget_or_create(
        self,
        key: Any,
        factory: Callable[[], Any],
        *,
        tokens: Iterable[str] = (),
        ttl: float | str | None = None,
    ) -> Any:
        found, value = self._lookup(key)
        if found:
            return value
        seconds = None if ttl is None else parse_duration(ttl, "ttl")
        made = self._tokens(key, tokens)
        value = factory()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        self._store(key, value, made, seconds)
        return value

    def _evict_if_stale(self, key: Any) -> None:
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None or not any(token._fired for token in entry[1]):
                return
            del self._entries[key]
        _forget(entry[1])

    def evict(self, key: Any, entry: Any = None) -> None:
        with self._mutex:
            found = self._entries.get(key)
            if found is None or (entry is not None and found is not entry):
                return
            del self._entries[key]
        _forget(found[1])

    def clear(self) -> None:
        with self._mutex:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            _forget(entry[1])

    def __len__(self) -> int:
        return len(self._entries)

    def fresh_items(self) -> list[tuple[Any, Any]]:
        """(key, value) of every entry whose tokens have not fired: what a lookup would return now."""
        with self._mutex:
            entries = list(self._entries.items())
        return [(key, value) for key, (value, tokens, _) in entries if not any(token._fired for token in tokens)]

    def __contains__(self, key: Any) -> bool:
        return self._lookup(key)[0]


# ══════════════════════════════════════════════════════════════════════════════════════════
# 7. Membership and election: who is alive (liveness locks), who schedules (scheduler.lock).
# ══════════════════════════════════════════════════════════════════════════════════════════

NODE_STATES = ("running", "stalled", "stopped", "dead")
DEFAULT_STALL_AFTER = 5.0  # a node whose heartbeat stands still this long (or 3 heartbeats) has stalled


def _lock_file_holders(directory: str, suffix: str) -> dict[str, int | None]:
    """name -> pid holding a flock on ``directory/<name><suffix>`` (None: the file is there, unheld)."""
    owners = _kernel_flock_owners() or {}
    found: dict[str, int | None] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for entry in names:
        if not entry.endswith(suffix) or entry.startswith("."):
            continue
        try:
            info = os.stat(os.path.join(directory, entry), follow_symlinks=False)
        except OSError:
            continue
        found[entry[: -len(suffix)]] = owners.get((os.major(info.st_dev), os.minor(info.st_dev), info.st_ino))
    return found


def live_nodes(lock_dir: str) -> dict[str, int]:
    """node id -> pid of every node whose liveness lock is held now by the node itself (the
    kernel's word, not a heartbeat).

    A peer clearing a dead node's files holds its lock for a moment too: the pid the node wrote
    in its file tells the two apart (an empty file is a node still binding: its holder counts).
    """
    directory = os.path.join(lock_dir, "nodes")
    found = {}
    for node, pid in _lock_file_holders(directory, ".lock").items():
        if pid is not None and _pid_written_in(os.path.join(directory, f"{node}.lock")) in (None, pid):
            found[node] = pid
    return found


def _pid_written_in(path: str) -> int | None:
    """The pid a node wrote in its liveness lock file, or None (empty, unreadable or gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:  # closing our descriptor leaves the holder's flock alone (flock locks are per description)
        text = os.pread(fd, 32, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(text) if text.strip().isdigit() else None


def _process_runs(pid: int) -> bool:
    """Whether ``pid`` is a process that can still run: a zombie (killed, not yet reaped) cannot."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except (OSError, IndexError):
        return True  # unknown: assume it runs


def liveness_lock_free(lock_dir: str, node: str, pid: int) -> bool:
    """Whether node ``node`` (last seen as ``pid``) is gone, asked of the kernel directly.

    /proc/locks is read in page-sized pieces that are not one snapshot: while other locks come
    and go, a held lock can be missing from the text. So a node that looks dead there is only
    declared dead once a non-blocking flock on its liveness lock succeeds, and that lock is still
    the file at the path: a node whose folder was removed makes a new file and lets the old one
    go, and a probe that opened the old one just before gets its lock.
    """
    path = os.path.join(lock_dir, "nodes", f"{node}.lock")
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:  # cleared after its death, or its folder was removed under it
            return not _process_runs(pid)  # a live process may still do its work: never hand that back
        except OSError:
            return False
        try:  # our probe's lock (if any) goes with its own description, closed below
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return True
        except FileNotFoundError:
            return not _process_runs(pid)
        except OSError:
            return False
        finally:
            os.close(fd)
    return False  # replaced at every look: a node re-making its files is no proof of death


def scheduler_pid(lock_dir: str) -> int | None:
    # /proc/locks is not one snapshot (see liveness_lock_free): a lock missing once is looked for again.
    return _lock_file_holders(lock_dir, ".lock").get("scheduler") or _lock_file_holders(lock_dir, ".lock").get(
        "scheduler"
    )


class _FlockWaiter:
    """Waits in a thread for an exclusive flock on a file, then calls ``on_granted(fd)`` there.

    The kernel wakes the thread the moment the holder releases or dies. ``stop()`` gives up:
    a lock the thread gets after that is closed (released) at once. With ``steadfast`` (the
    election), a file that cannot be opened, or that was replaced while we waited on it, is
    tried again every second until it works or we stop: the node must never quietly stop
    standing.
    """

    def __init__(self, path: str, on_granted: Callable[[int], None], name: str, steadfast: bool = False) -> None:
        self.path, self._on_granted, self._name, self._steadfast = path, on_granted, name, steadfast
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.waiting_on: int | None = None  # the inode of the file it waits for (None: not waiting yet)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopped.is_set():
            fd = self._wait_once()
            if fd is not None:
                try:
                    self._on_granted(fd)
                except Exception:
                    log.exception("handling %s failed", self.path)
                return
            if not self._steadfast:
                return
            self._stopped.wait(1.0)

    def _wait_once(self) -> int | None:
        """The locked descriptor of the file at the path, or None (a problem, logged, or stopped)."""
        try:
            fd = open_lock_file(self.path)
        except (OSError, StoreError) as error:
            log.warning("cannot open %s: %s", self.path, error)
            return None
        try:
            self.waiting_on = os.fstat(fd).st_ino
            fcntl.flock(fd, fcntl.LOCK_EX)
            replaced = self._steadfast and os.stat(self.path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino
        except OSError as error:
            log.warning("waiting for %s failed: %s", self.path, error)
            replaced = True
        if replaced or self._stopped.is_set():
            with _LOCK_FDS_MUTEX:
                _close_lock_fd(fd)
            return None
        return fd


def take_office(conn: sqlite3.Connection, node: str, fd: int | None = None, path: str | None = None) -> int:
    """The new scheduler's first act: bump the election epoch, in its own transaction.

    With ``fd`` and ``path``: only while the file at ``path`` (scheduler.lock) is the one ``fd``
    locked. A stalled scheduler's office is taken by replacing that file (take_office_from_stalled),
    in a transaction too, so of a waiter that got the old file and a taker, one alone bumps the epoch.
    Each term is also kept in ``elections``: an audit of who held office when, which lets a
    checker prove that no epoch ever had two schedulers.
    """
    if fd is not None and path is not None and not _is_file_at(fd, path):
        raise LostOffice(f"{path} was replaced while this node waited for it: another node took office")
    now = time.time()
    conn.execute("UPDATE election SET epoch = epoch + 1, node = ?, since = ? WHERE id = 1", (node, now))
    epoch = int(conn.execute("SELECT epoch FROM election WHERE id = 1").fetchone()[0])
    conn.execute("INSERT INTO elections (epoch, node, pid, since) VALUES (?, ?, ?, ?)", (epoch, node, os.getpid(), now))
    return epoch


def _is_file_at(fd: int, path: str) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def take_office_from_stalled(
    conn: sqlite3.Connection, node: str, epoch: int, last_beat: float | None, replacement: str, path: str
) -> int:
    """Take office from a scheduler that has stalled (frozen by SIGSTOP or Ctrl-Z, its event loop
    blocked): its kernel lock on scheduler.lock outlives its use, so in this transaction the file is
    replaced by ``replacement``, a file this node has locked already, and the epoch bumped. Refused
    (LostOffice) unless office is still in ``epoch`` and its holder's heartbeat still the one the
    taker saw standing still (``last_beat``; None: office had stood empty). Whatever the old
    scheduler does when it wakes is refused by the epoch; it finds the file replaced, steps down."""
    current, holder = conn.execute("SELECT epoch, node FROM election WHERE id = 1").fetchone()
    if current != epoch:
        raise LostOffice(f"office changed hands meanwhile (epoch {current})")
    if holder is not None and last_beat is not None:
        beat = conn.execute("SELECT heartbeat FROM nodes WHERE id = ?", (holder,)).fetchone()
        if beat is None or beat[0] != last_beat:
            raise LostOffice(f"node {holder} beat again")
    os.rename(replacement, path)  # atomic: the path names the old file or ours, never nothing
    return take_office(conn, node)


def check_epoch(conn: sqlite3.Connection, epoch: int) -> None:
    """Every act of the scheduler runs this in its transaction: a deposed scheduler acts no more."""
    current = conn.execute("SELECT epoch FROM election WHERE id = 1").fetchone()[0]
    if current != epoch:
        raise LostOffice(f"the election epoch is {current}, not {epoch}: another node holds office")


# ══════════════════════════════════════════════════════════════════════════════════════════
# 8. Scheduler: timers (one-shot and cron) fired exactly once by the node in office.
# ══════════════════════════════════════════════════════════════════════════════════════════


# Cron schedules: Vixie cron's five fields, evaluated in the wall-clock time of an IANA time zone.
# uses InvalidInput from section 1

# The rules, as in Vixie cron 4.1 and cronie (`man 5 crontab`), and the choices made where they are silent:
#
# Fields: minute 0-59, hour 0-23, day-of-month 1-31, month 1-12 (or jan..dec), day-of-week 0-7 (or sun..sat;
# 0 and 7 are both Sunday). A field is a comma-separated list of items; an item is `*`, a number, a name or a
# range `a-b` (`mon-fri`), and `*` or a range may take a step (`*/15`, `10-50/20`). Names are three letters, in
# any case, as in Vixie. A lone value with a step (`5/10`) is refused: Vixie refuses it, and the crons that
# accept it disagree on its meaning. So is a step longer than its field (`*/90`: cron has no "every 90 minutes").
#
# Days: when day-of-month and day-of-week are both restricted, a day matches when EITHER matches (`0 0 13 * fri`
# runs on every 13th and on every Friday). When either field is unrestricted, a day must match BOTH, which comes
# to "only the other counts" for a plain `*`. Like Vixie (its DOM_STAR and DOW_STAR flags) "unrestricted" means
# the field text starts with `*`, so `0 0 */2 * mon` runs on Mondays that fall on an odd day of the month, not
# on every odd day and every Monday.
#
# Time zones: the fields are matched against the wall clock of `tz` (None: this machine's local time zone).
# Around daylight-saving changes we follow Vixie cron's split between jobs whose minute or hour field starts
# with `*` ("wildcard" jobs, its MIN_STAR and HR_STAR flags) and all others ("fixed-time" jobs):
#   - Wildcard jobs (`*/30 * * * *`, `0 * * * *`, `*/15 2 * * *`) run at every real instant whose wall-clock
#     time matches. The hour a spring-forward skips has no such instant, so nothing runs for it; the hour a
#     fall-back repeats is run through twice. `0 * * * *` thus keeps firing once per real hour.
#   - Fixed-time jobs (`30 2 * * *`, `0 1-3 * * *`) run once per matching wall-clock time. A time that a
#     spring-forward skips runs at the first instant after the gap (03:00 when 02:00-02:59 is skipped), once
#     even when several skipped times match; a time that a fall-back repeats runs at its first occurrence only.
#   Vixie cron reaches the same result by watching its clock jump; we compute it. Like Vixie, a gap longer
#   than three hours is no daylight-saving change: the times it skips are not made up (CRON_MADE_UP_GAP).


# A skipped time of a fixed-time job is made up at the end of its gap only when the gap is a daylight-saving
# shift, at most three hours, as Vixie cron decides (a longer jump is a time change to it). A zone that
# skips a whole day (Pacific/Apia skipped 2011-12-30) has no firing for that day, rather than a second
# firing on the next.
CRON_MADE_UP_GAP = 3 * 3600.0
_CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
_CRON_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_CRON_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_CRON_WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CRON_NAMES: tuple[dict[str, int], ...] = (
    {},
    {},
    {},
    {name: number for number, name in enumerate(_CRON_MONTH_NAMES, start=1)},
    {name: number for number, name in enumerate(_CRON_WEEKDAY_NAMES)},
)
_CRON_MONTH_TITLES = ("January", "February", "March", "April", "May", "June",
                      "July", "August", "September", "October", "November", "December")  # fmt: skip
# The longest each month can be: February has a 29th in leap years.
_CRON_LONGEST_MONTHS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_CRON_SHORTHANDS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# The Gregorian calendar, weekdays included, repeats every 400 years (146,097 days, a whole number of weeks):
# an expression that parse() accepted therefore matches some day in any 401 consecutive years.
_CRON_SEARCH_YEARS = 401
_CRON_NUMBER = re.compile(r"[0-9]+")  # ASCII digits only: int() would also take other scripts' digits
_CRON_NAME = re.compile(r"[A-Za-z]+")
_CRON_QUARTZ = re.compile(r"\?|L|LW|[0-9]*L|[0-9]+W|[0-9]+#[0-9]+")  # Quartz-only syntax, named in the error
_CRON_EPOCH = datetime.datetime(1970, 1, 1)


def _cron_quote(text: str) -> str:
    """Text in double quotes for a one-line message; escaped like repr() when it holds control characters."""
    return f'"{text}"' if text.isprintable() else repr(text)


def _cron_error(expression: str, problem: str) -> InvalidInput:
    return InvalidInput(f"bad cron expression {_cron_quote(expression)}: {problem}")


def _cron_zone(tz: str | None) -> zoneinfo.ZoneInfo | None:
    """The ZoneInfo for an IANA name; None stands for the machine's local time (see _cron_wall_clock)."""
    if tz is None:
        return None
    if not isinstance(tz, str):
        raise InvalidInput(f"a time zone is an IANA name such as Europe/Paris, not {type(tz).__name__}")
    try:
        return zoneinfo.ZoneInfo(tz)  # cached by zoneinfo itself
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        # ValueError: empty, absolute or ".." keys and files that are not TZif; OSError: names too long.
        raise InvalidInput(f"unknown time zone {_cron_quote(tz)}; use an IANA name such as Europe/Paris") from None


def _cron_wall_clock(moment: float, zone: zoneinfo.ZoneInfo | None) -> datetime.datetime:
    """The naive wall-clock time at `moment`, with fold=1 when it is the second pass of a repeated time."""
    if zone is None:
        return datetime.datetime.fromtimestamp(moment)  # local time; sets fold like ZoneInfo does (PEP 495)
    return datetime.datetime.fromtimestamp(moment, zone).replace(tzinfo=None)


def _cron_instant(wall: datetime.datetime, fold: int, zone: zoneinfo.ZoneInfo | None) -> float:
    """The Unix time of a naive wall-clock time. PEP 495: for a repeated time fold=0 is the first pass and
    fold=1 the second; for a skipped time fold=0 reads it with the offset from before the change (landing
    after the gap) and fold=1 with the offset from after it (landing before the gap)."""
    if zone is None:
        return wall.replace(fold=fold).timestamp()
    return wall.replace(tzinfo=zone, fold=fold).timestamp()


def _cron_utc_offset(moment: int, zone: zoneinfo.ZoneInfo | None) -> datetime.timedelta:
    return _cron_wall_clock(moment, zone) - (_CRON_EPOCH + datetime.timedelta(seconds=moment))


def _cron_gap_end(before_gap: int, after_gap: int, zone: zoneinfo.ZoneInfo | None) -> float:
    """The first instant after a skipped stretch of wall-clock time, found by bisection between an instant
    before the change and one after it: zoneinfo does not list its transitions."""
    offset_before = _cron_utc_offset(before_gap, zone)
    while after_gap - before_gap > 1:
        middle = (before_gap + after_gap) // 2
        if _cron_utc_offset(middle, zone) == offset_before:
            before_gap = middle
        else:
            after_gap = middle
    return float(after_gap)


def _cron_first_at_least(values: tuple[int, ...], least: int) -> int | None:
    """The smallest of the sorted `values` that is >= `least` (a field holds 60 values at most: a plain loop)."""
    for value in values:
        if value >= least:
            return value
    return None


def _cron_days_in_month(year: int, month: int) -> int:
    if month == 2 and not (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)):
        return 28
    return _CRON_LONGEST_MONTHS[month - 1]


def _cron_list(values: list[str], conjunction: str) -> str:
    """ "a", "a or b", "a, b or c"."""
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + f" {conjunction} " + values[-1]


def _cron_value(text: str, index: int, item: str, expression: str) -> int:
    """One number or name of field `index`, checked against the field's range."""
    field = _CRON_FIELDS[index]
    low, high = _CRON_BOUNDS[index]
    names = _CRON_NAMES[index]
    if _CRON_NUMBER.fullmatch(text):
        value = int(text)
        if not low <= value <= high:
            sunday = " (0 and 7 are Sunday)" if index == 4 else ""
            raise _cron_error(expression, f"{field} {value} is out of range {low}-{high}{sunday}")
        return value
    if names and _CRON_NAME.fullmatch(text):
        if text.lower() in names:
            return names[text.lower()]
        first, last = next(iter(names)), list(names)[-1]
        raise _cron_error(expression, f"unknown {field} name {_cron_quote(text)}; use {first}..{last} or {low}-{high}")
    if not text:
        raise _cron_error(expression, f"{field} {_cron_quote(item)} is missing a number")
    quartz = " (Quartz-style ?, L, W and # are not supported)" if _CRON_QUARTZ.fullmatch(text) else ""
    if names:
        hint = " or a name"
    elif _CRON_NAME.fullmatch(text):
        hint = " (names are for month and day-of-week only)"
    else:
        hint = ""
    raise _cron_error(expression, f"{field} {_cron_quote(text)} is not a number{hint}{quartz}")


def _cron_field(text: str, index: int, expression: str) -> tuple[int, ...]:
    """The sorted values one field selects, day-of-week 7 folded into 0."""
    field = _CRON_FIELDS[index]
    low, high = _CRON_BOUNDS[index]
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise _cron_error(expression, f"{field} {_cron_quote(text)} has an empty list item")
        range_text, slash, step_text = item.partition("/")
        if range_text == "*":
            first, last = low, high
        elif slash and "-" not in range_text:
            raise _cron_error(
                expression,
                f"{field} {_cron_quote(item)}: a step goes after * or a range, as in */{step_text} or "
                f"{range_text}-{high}/{step_text}",
            )
        else:
            if range_text.count("-") > 1:
                raise _cron_error(expression, f"{field} range {_cron_quote(range_text)} has more than one -")
            first_text, dash, last_text = range_text.partition("-")
            first = _cron_value(first_text, index, item, expression)
            last = _cron_value(last_text, index, item, expression) if dash else first
            if first > last:
                wrap_high = 6 if index == 4 else high  # Sunday is already 0
                raise _cron_error(
                    expression,
                    f"{field} range {_cron_quote(range_text)} is reversed ({first} > {last}); to wrap around, "
                    f"use a list such as {first}-{wrap_high},{low}-{last}",
                )
        step = 1
        if slash:
            if not _CRON_NUMBER.fullmatch(step_text):
                problem = f"{field} step {_cron_quote(step_text)} in {_cron_quote(item)} is not a number"
                raise _cron_error(expression, problem)
            step = int(step_text)
            # A step longer than the field selects its first value only: almost surely a misreading.
            count = high - low + 1
            if step == 0:
                raise _cron_error(expression, f"{field} step 0 in {_cron_quote(item)} must be at least 1")
            if step > count:
                raise _cron_error(expression, f"{field} step {step} in {_cron_quote(item)} is out of range 1-{count}")
        values.update(range(first, last + 1, step))
    if index == 4 and 7 in values:
        values.discard(7)
        values.add(0)
    return tuple(sorted(values))


@dataclass(frozen=True)
class CronSchedule:
    """A parsed cron expression and its time zone; `next_after()` gives its firing times (see the rules above)."""

    expression: str
    tz: str | None  # IANA name; None: the machine's local time zone
    minutes: tuple[int, ...]  # each field's values, sorted
    hours: tuple[int, ...]
    days_of_month: tuple[int, ...]
    months: tuple[int, ...]
    days_of_week: tuple[int, ...]  # 0 is Sunday (a 7 in the expression is stored as 0)
    day_of_month_starred: bool  # the field starts with `*`: Vixie's DOM_STAR, for the day rule
    day_of_week_starred: bool  # Vixie's DOW_STAR
    minute_or_hour_starred: bool  # Vixie's MIN_STAR or HR_STAR: a "wildcard" job for the DST rules

    @staticmethod
    def parse(expression: str, tz: str | None = None) -> CronSchedule:
        """Parse five cron fields (or an @shorthand) for the time zone `tz`; InvalidInput says what is wrong."""
        if not isinstance(expression, str):
            raise InvalidInput(f"a cron expression is text such as '*/5 * * * *', not {type(expression).__name__}")
        _cron_zone(tz)  # refuse an unknown zone now rather than when the schedule is first used
        text = expression.strip()
        if not text:
            raise InvalidInput("the cron expression is empty; give five fields such as '*/5 * * * *' or @hourly")
        fields_text = text
        if text.startswith("@"):
            shorthand = text.lower()
            if shorthand == "@reboot":
                raise _cron_error(text, "@reboot runs once when cron starts and has no next time; give a schedule")
            if shorthand not in _CRON_SHORTHANDS:
                raise _cron_error(text, f"unknown shorthand; use one of {', '.join(_CRON_SHORTHANDS)}")
            fields_text = _CRON_SHORTHANDS[shorthand]
        fields = fields_text.split()
        if len(fields) != 5:
            problem = f"it has {len(fields)} fields; expected 5: minute hour day-of-month month day-of-week"
            raise _cron_error(text, problem)
        minutes, hours, days_of_month, months, days_of_week = (
            _cron_field(field, index, text) for index, field in enumerate(fields)
        )
        schedule = CronSchedule(
            expression=text,
            tz=tz,
            minutes=minutes,
            hours=hours,
            days_of_month=days_of_month,
            months=months,
            days_of_week=days_of_week,
            day_of_month_starred=fields[2].startswith("*"),
            day_of_week_starred=fields[4].startswith("*"),
            minute_or_hour_starred=fields[0].startswith("*") or fields[1].startswith("*"),
        )
        schedule._check_can_fire(fields[4])
        return schedule

    def _check_can_fire(self, day_of_week_text: str) -> None:
        """Refuse a date that never exists, such as `0 0 30 2 *`, instead of searching for it forever."""
        if not (self.day_of_month_starred or self.day_of_week_starred):
            return  # either day field may match, and every month has every weekday
        # Both day fields must match. Every (month, day) that exists in some year falls on every weekday
        # within 400 years (February 29 too), so the day-of-week set cannot make the schedule impossible.
        if any(day <= _CRON_LONGEST_MONTHS[month - 1] for month in self.months for day in self.days_of_month):
            return
        months = _cron_list([_CRON_MONTH_TITLES[month - 1] for month in self.months], "and")
        days = _cron_list([str(day) for day in self.days_of_month], "or")
        has = "has" if len(self.months) == 1 else "have"
        # Explain Vixie's rule when the day-of-week looks like it should have let the day match on its own.
        both = (
            f" (day-of-week {_cron_quote(day_of_week_text)} starts with *, so the day-of-month must match too)"
            if day_of_week_text != "*" and not self.day_of_month_starred
            else ""
        )
        raise _cron_error(self.expression, f"it can never fire: {months} {has} no day {days}{both}")

    def _day_matches(self, day: int, weekday: int) -> bool:
        """`weekday` counts from 0 for Sunday, like cron."""
        in_month = day in self.days_of_month
        in_week = weekday in self.days_of_week
        if self.day_of_month_starred or self.day_of_week_starred:
            return in_month and in_week
        return in_month or in_week

    def _first_matching_day(self, year: int, month: int, least: int) -> int | None:
        last = _cron_days_in_month(year, month)
        if least > last:
            return None
        weekday = (datetime.date(year, month, least).weekday() + 1) % 7  # Python counts from Monday
        for day in range(least, last + 1):
            if self._day_matches(day, weekday):
                return day
            weekday = (weekday + 1) % 7
        return None

    def _next_matching_wall_time(self, start: datetime.datetime) -> datetime.datetime:
        """The first wall-clock minute at or after `start` (a whole minute) that matches every field, found by
        jumping field by field: to the next matching month, then day, then hour, then minute."""
        year, month, day, hour, minute = start.year, start.month, start.day, start.hour, start.minute
        last_year = min(start.year + _CRON_SEARCH_YEARS, datetime.MAXYEAR)
        while year <= last_year:
            next_month = _cron_first_at_least(self.months, month)
            if next_month is None:
                year, month, day, hour, minute = year + 1, 1, 1, 0, 0
                continue
            if next_month != month:
                month, day, hour, minute = next_month, 1, 0, 0
            next_day = self._first_matching_day(year, month, day)
            if next_day is None:
                # Month 13 sends the next pass to the next year.
                month, day, hour, minute = month + 1, 1, 0, 0
                continue
            if next_day != day:
                day, hour, minute = next_day, 0, 0
            next_hour = _cron_first_at_least(self.hours, hour)
            if next_hour is None:
                # Past the month's end, _first_matching_day sends the next pass to the next month.
                day, hour, minute = day + 1, 0, 0
                continue
            if next_hour != hour:
                hour, minute = next_hour, 0
            next_minute = _cron_first_at_least(self.minutes, minute)
            if next_minute is None:
                # Hour 24 sends the next pass to the next day.
                hour, minute = hour + 1, 0
                continue
            return datetime.datetime(year, month, day, hour, next_minute)
        problem = f"no firing time from {start:%Y-%m-%d %H:%M} to the end of year {last_year}"
        raise _cron_error(self.expression, problem)

    def _firing_instants(self, wall: datetime.datetime, zone: zoneinfo.ZoneInfo | None) -> tuple[float, ...]:
        """The real instants, in order, at which a matching wall-clock minute fires (the DST rules above)."""
        first_reading = _cron_instant(wall, 0, zone)
        second_reading = _cron_instant(wall, 1, zone)
        if first_reading == second_reading:
            return (first_reading,)
        if first_reading < second_reading:  # a fall-back repeats this wall time
            return (first_reading, second_reading) if self.minute_or_hour_starred else (first_reading,)
        # A spring-forward skips this wall time: second_reading lies before the gap, first_reading after it.
        if self.minute_or_hour_starred or first_reading - second_reading > CRON_MADE_UP_GAP:
            return ()
        return (_cron_gap_end(int(second_reading), int(first_reading), zone),)

    def next_after(self, moment: float) -> float:
        """The first firing time strictly after `moment`; both are Unix times, as time.time() gives."""
        if isinstance(moment, bool) or not isinstance(moment, (int, float)) or not -1e18 < moment < 1e18:
            # Also refuses NaN and the infinities, which compare False with everything.
            raise InvalidInput(f"a moment is a finite Unix time in seconds, not {moment!r}")
        zone = _cron_zone(self.tz)
        try:
            wall = _cron_wall_clock(moment, zone)
        except (OverflowError, OSError, ValueError) as error:
            # datetime's range is the years 1-9999; the platform's local-time functions may be narrower.
            raise InvalidInput(f"moment {moment!r} is out of the range of dates cron can compute: {error}") from None
        try:
            start = wall.replace(second=0, microsecond=0, fold=0)
            first_pass, second_pass = _cron_instant(wall, 0, zone), _cron_instant(wall, 1, zone)
            if wall.fold == 0 and first_pass < second_pass:
                # `moment` is in the first pass of a repeated stretch: the second pass of the wall times
                # just before `wall` is still to come, so the search starts that much earlier.
                start -= datetime.timedelta(seconds=second_pass - first_pass)
            best: float | None = None
            while True:
                candidate = self._next_matching_wall_time(start)
                instants = self._firing_instants(candidate, zone)
                later = [instant for instant in instants if instant > moment]
                if later and (best is None or later[0] < best):
                    best = later[0]
                if instants and instants[0] > moment:
                    # Every later wall time fires at or after this candidate's first instant, so nothing
                    # after it in wall-clock order can come sooner.
                    assert best is not None
                    return best
                start = candidate + datetime.timedelta(minutes=1)
        except (OverflowError, OSError) as error:  # the search ran past the year 9999 or the platform's range
            raise InvalidInput(f"moment {moment!r} is out of the range of dates cron can compute: {error}") from None


RING_TIMERS = "t"  # a timer was added or removed: the scheduler looks again at what is due next
TIMER_NAME_MAX_BYTES = 200
FIRE_BATCH = 500  # timers fired in one transaction


def check_timer_name(name: object) -> str:
    if not isinstance(name, str) or not name or not name.isprintable():
        raise InvalidInput(f"a timer name is non-empty printable text, not {name!r}")
    if len(name.encode("utf-8", "replace")) > TIMER_NAME_MAX_BYTES:
        raise InvalidInput(f"timer name {_show_name(name)} is longer than {TIMER_NAME_MAX_BYTES} bytes")
    return name


# The latest due time every local time zone can show in ISO 8601 (a day short of year 10000).
LATEST_DUE = datetime.datetime(9999, 12, 30, tzinfo=datetime.UTC).timestamp()


def check_due(moment: float, what: str) -> float:
    if not math.isfinite(moment) or not 0 <= moment <= LATEST_DUE:
        raise InvalidInput(f"{what}: the time must fall between 1970 and 9999")
    return moment


def parse_time(text: str, what: str = "--at") -> float:
    """ISO 8601 to a Unix time; local time when no offset is given."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except (ValueError, TypeError):
        raise InvalidInput(
            f"{what}: {text!r} is not an ISO 8601 time; use one such as 2026-12-24T18:00 or 2026-12-24T18:00+01:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time
    return moment.timestamp()


@dataclass(frozen=True)
class Timer:
    name: str
    queue: str
    body: Any
    cron: str | None
    tz: str | None
    due: float | None  # None once a one-shot timer has fired
    fired: int
    last_fired: float | None


@functools.lru_cache(maxsize=1024)
def _cron_schedule(expression: str, tz: str | None) -> CronSchedule:
    return CronSchedule.parse(expression, tz)  # parsed once per expression, not once per firing


def _fire_due_work(epoch: int, node: str | None = None) -> Callable[[sqlite3.Connection], tuple[int, set[str], float]]:
    """Fire what is due; returns how many fired, the queues they sent to, and their total lateness.

    Each firing is kept in ``timer_firings``, keyed by timer and due time: the record of what
    fired, when, in which epoch, as which message, and a second guard (besides the epoch) that
    no due time of a timer is ever fired twice.
    """

    def fire(conn: sqlite3.Connection) -> tuple[int, set[str], float]:
        check_epoch(conn, epoch)
        now = time.time()  # in the transaction: the firing time is its commit's, not its queueing's
        rows = conn.execute(
            "SELECT name, queue, body, cron, tz, due, created FROM timers WHERE due IS NOT NULL AND due <= ? "
            "ORDER BY due LIMIT ?",
            (now, FIRE_BATCH),
        ).fetchall()
        queues: set[str] = set()
        fired, lateness = 0, 0.0
        for name, queue, body, cron, tz, due, created in rows:
            # A cron timer's next slot is the first after now: slots missed while no scheduler
            # ran are fired once, here, not once each.
            try:
                following = _cron_schedule(cron, tz).next_after(now) if cron else None
            except (InvalidInput, ValueError) as error:  # its zone left tzdata, say: park it, fire the rest
                log.warning("timer %r cannot be scheduled any more (%s); it is paused", name, error)
                conn.execute("UPDATE timers SET due = NULL WHERE name = ?", (name,))
                continue
            conn.execute("UPDATE timers SET due = ? WHERE name = ?", (following, name))
            if conn.execute(
                "SELECT 1 FROM timer_firings WHERE name = ? AND due = ? AND fired >= ?", (name, due, created)
            ).fetchone():  # never seen; if it ever is, it must not fire twice
                log.warning("timer %r was fired for %s already; not again", name, _iso_text(due))
                continue
            message = conn.execute(
                "INSERT INTO messages (queue, body, priority, available_at, created) VALUES (?, ?, 0, ?, ?)",
                (queue, body, now, now),
            ).lastrowid
            conn.execute(
                "INSERT OR REPLACE INTO timer_firings (name, due, fired, epoch, node, message) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, due, now, epoch, node, message),
            )
            conn.execute("UPDATE timers SET fired = fired + 1, last_fired = ? WHERE name = ?", (now, name))
            queues.add(queue)
            fired += 1
            lateness += max(0.0, now - due)
        return fired, queues, lateness

    return fire


def prune_timer_firings(conn: sqlite3.Connection, max_age: float) -> int:
    """Forget firings older than ``max_age``: the guard only matters for due times still ahead or just past."""
    return conn.execute("DELETE FROM timer_firings WHERE fired < ?", (time.time() - max_age,)).rowcount


def _next_due(conn: sqlite3.Connection) -> float | None:
    due = conn.execute("SELECT MIN(due) FROM timers WHERE due IS NOT NULL").fetchone()[0]
    return None if due is None else float(due)


# ══════════════════════════════════════════════════════════════════════════════════════════
# 9. Workflows: definitions (validated, versioned), blueprints cached per node, instances run
#    in bursts under instance locks, one journal row per step.
# ══════════════════════════════════════════════════════════════════════════════════════════

# WORKFLOW_QUEUE (section 5) carries "run" and "start" messages; every serve node consumes it.
DEFINITIONS_TOKEN = "definitions"  # the change token every define triggers: cached blueprints are stale
RING_INSTANCES = "w"  # an instance completed or faulted: callers waiting for its end look again
INSTANCE_STATUSES = ("running", "waiting", "completed", "faulted", "cancelled")
ENDED_STATUSES = ("completed", "faulted", "cancelled")  # an instance in these runs no more (a faulted one until retry)
ACTIVITY_TYPES = (
    "log",
    "set",
    "if",
    "timer",
    "start_at",
    "signal",
    "call",
    "fail",
    "work",
    "run",
    "parallel",
    "for_each",
)
DEFINITION_MAX_BYTES = 256 * 1024
DEFINITION_MAX_ACTIVITIES = 1000
DEFINITION_MAX_TRIGGERS = 32
TEMPLATE_MAX_CHARS = 4096
RENDERED_MAX_CHARS = 1 << 20  # a filled template (a run's variables are limited to max_body_bytes too)
CONDITION_MAX_DEPTH = 16
TRIGGER_INPUT_MAX_BYTES = 64 * 1024
WORK_MAX_SECONDS = 3600.0
BURST_MAX_STEPS = 100  # then the instance goes back in the queue, so a loop shares the node
BUSY_LOOP_MAX_STEPS = 10_000  # steps without a wait (a timer, a signal) before an instance faults as a runaway loop
JOURNAL_KEEP_STEPS = 10_000  # an instance's journal keeps its newest steps; older ones are pruned as it runs
CALL_ATTEMPTS = 3  # tries of a failing call before its instance is faulted ("retry" per activity)
CALL_RETRY_DELAY = 1.0  # before the second try; doubled for each try after it, up to an hour
INSTANCE_LOCK_WAIT = 5.0  # then a run message goes back in the queue, to try again a second later
# A run message delivered this many times (times max_deliveries) without a burst committing: each
# node running it died, stopped or could not commit. The instance is faulted (retry resumes it)
# rather than crash the cluster's nodes one by one for ever; its message is never a dead letter.
BURST_DELIVERY_FACTOR = 4
INSTANCE_ID_MIN_PREFIX = 4
SIGNAL_KEEP_DEFAULT = 3600.0  # how long a signal that found no waiting instance waits for one (signal --ttl)
KEPT_SIGNALS_SHOWN = 100  # status lists the oldest kept signals, and counts them all
START_KEY_MAX_CHARS = 200
CHILD_MAX_DEPTH = 32  # instances started by run activities, nested: a definition that runs itself stops here
PARALLEL_MAX_BRANCHES = 100  # branches one parallel activity names
FOR_EACH_MAX_ITEMS = 1000  # items one for_each activity goes through (a bigger list: split it, or run children)
INSTANCE_MAX_BRANCHES = 1000  # branches of one instance at once, nested ones too: a burst runs them all
KEEP_INSTANCES_DEFAULT = 7 * 86400.0  # ended instances (completed, cancelled) are removed this long after they ended
KEEP_FAULTED_DEFAULT = 30 * 86400.0  # a faulted instance waits for an operator (retry or cancel) longer
PRUNE_BATCH_ROWS = 2000  # rows (journal and instances) one retention transaction removes: a short turn at the writer

_WORKFLOW_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_ACTIVITY_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,99}")
_VARIABLE_PATH = re.compile(r"[A-Za-z0-9_-]{1,100}(?:\.[A-Za-z0-9_-]{1,100}){0,31}")
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_FUNCTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,199}(?::[A-Za-z_][A-Za-z0-9_.]{0,199})?")
_INSTANCE_ID = re.compile(r"[0-9a-f]{16}")
_COMPARISONS = ("==", "!=", ">", ">=", "<", "<=", "in", "not in", "contains", "exists")


class InvalidDefinition(InvalidInput):
    """A workflow definition with problems; ``problems`` lists each one with its place."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _Fault(Exception):
    """An activity failed in a way a retry cannot mend (a missing variable, a bad comparison)."""


class _Failed(_Fault):
    """A fail activity: the definition faults its instance on purpose."""


class _CallFailed(Exception):
    """A ``call`` activity's function raised: retried with back-off, then the instance faults."""


def check_workflow_id(value: object, what: str = "a workflow id") -> str:
    if not isinstance(value, str) or not _WORKFLOW_ID.fullmatch(value):
        shown = _show_name(value) if isinstance(value, str) else repr(value)
        raise InvalidInput(
            f"{what} is 1 to 100 letters, digits, '_', '.' or '-' (starting with a letter or digit), not {shown}"
        )
    return value


def check_signal_name(value: object, what: str = "a signal name") -> str:
    if (
        not isinstance(value, str)
        or not value
        or not value.isprintable()
        or len(value.encode("utf-8", "replace")) > 200
    ):
        shown = _show_name(value) if isinstance(value, str) else repr(value)
        raise InvalidInput(f"{what} is printable text of 1 to 200 bytes, not {shown}")
    return value


def check_instance_input(value: object, what: str = "input") -> dict[str, Any]:
    """An input (an instance's or a signal's) is a JSON object, nested at most JSON_MAX_DEPTH deep;
    encoding it where it is stored checks the rest."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f'{what} must be a JSON object, such as {{"order": 42}}, not {type(value).__name__}')
    if _nested_deeper_than(value, JSON_MAX_DEPTH):
        raise InvalidInput(f"{what} nests lists and objects more than {JSON_MAX_DEPTH} deep; flatten it")
    return value


# Templates and conditions: data that reads variables, never code ---------------------------


def _lookup(variables: dict[str, Any], path: tuple[str, ...]) -> Any:
    current: Any = variables
    for depth, part in enumerate(path):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            raise _Fault(f"no variable {'.'.join(path[: depth + 1])}")
    return current


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Template:
    """Text with ``{path}`` placeholders, such as ``order {input.order} received``.

    A placeholder names a variable by its dotted path (``{charge.receipt}``, ``{items.0}``);
    ``{{`` and ``}}`` are literal braces. Filling one only looks values up: it runs no code.
    """

    __slots__ = ("text", "_parts")

    def __init__(self, text: str) -> None:
        if len(text) > TEMPLATE_MAX_CHARS:
            raise ValueError(f"a template is at most {TEMPLATE_MAX_CHARS} characters; this one has {len(text)}")
        parts: list[str | tuple[str, ...]] = []
        literal: list[str] = []
        position = 0
        for match in _TEMPLATE_TOKEN.finditer(text):
            literal.append(text[position : match.start()])
            token = match.group(0)
            if token in ("{{", "}}"):
                literal.append(token[0])
            elif token in ("{", "}"):
                raise ValueError(
                    f"unmatched {token!r} at character {match.start() + 1}; write {token * 2} for a literal brace"
                )
            else:
                path = (match.group(1) or "").strip()
                if not _VARIABLE_PATH.fullmatch(path):
                    raise ValueError(f"{token} is not a variable path such as {{input.order}}")
                if "".join(literal):
                    parts.append("".join(literal))
                literal = []
                parts.append(tuple(path.split(".")))
            position = match.end()
        literal.append(text[position:])
        if "".join(literal):
            parts.append("".join(literal))
        self.text = text
        self._parts = tuple(parts)

    @property
    def is_constant(self) -> bool:
        return all(isinstance(part, str) for part in self._parts)

    def render(self, variables: dict[str, Any], limit: int = RENDERED_MAX_CHARS) -> str:
        """The text, failing (a _Fault) as soon as it grows past ``limit`` characters: a template that
        repeats a variable ({s}{s}{s}...) over steps that feed each other would otherwise double its
        memory at every step, so the bound is kept while the text is made, never checked after."""
        pieces, size = [], 0
        for part in self._parts:
            text = part if isinstance(part, str) else _as_text(_lookup(variables, part))
            size += len(text)
            if size > limit:
                raise _Fault(f"the text of template {_show_name(self.text, 60)} grew past {limit} characters")
            pieces.append(text)
        return "".join(pieces)

    def value(self, variables: dict[str, Any], limit: int = RENDERED_MAX_CHARS) -> Any:
        """The variable itself (any JSON type) when the template is one placeholder, else the text."""
        if len(self._parts) == 1 and isinstance(self._parts[0], tuple):
            return _lookup(variables, self._parts[0])
        return self.render(variables, limit)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


# A compiled condition: ("all" | "any", (conditions...)), ("not", condition), or
# ("compare", path, operator, operand) where operand is ("value", data) or ("var", path).
Condition = tuple[Any, ...]


def _compare(left: Any, operator: str, right: Any) -> bool:
    def kind(value: Any) -> str:
        if isinstance(value, bool) or value is None:
            return "boolean or null"
        return "number" if isinstance(value, (int, float)) else type(value).__name__

    if operator == "==":
        return bool(left == right and kind(left) == kind(right))
    if operator == "!=":
        return not (left == right and kind(left) == kind(right))
    if operator in ("in", "not in"):
        if isinstance(right, list):
            found = any(left == item and kind(left) == kind(item) for item in right)
        elif isinstance(right, str) and isinstance(left, str):
            found = left in right
        else:
            raise _Fault(f"'{operator}' needs a list (or text) on its right, not {kind(right)}")
        return found if operator == "in" else not found
    if operator == "contains":
        if isinstance(left, str) and not isinstance(right, str):
            raise _Fault(f"'contains' on text needs text on its right, not {kind(right)}")
        if isinstance(left, (list, str, dict)):
            return _compare(right, "in", list(left) if isinstance(left, dict) else left)
        raise _Fault(f"'contains' needs a list, text or object on its left, not {kind(left)}")
    if kind(left) != kind(right) or kind(left) not in ("number", "str"):
        raise _Fault(
            f"cannot compare {kind(left)} {_as_text(left)[:40]} {operator} {kind(right)} {_as_text(right)[:40]}"
        )
    return bool(
        left > right if operator == ">" else left >= right if operator == ">=" else left < right
        if operator == "<" else left <= right
    )  # fmt: skip


def evaluate_condition(condition: Condition, variables: dict[str, Any]) -> bool:
    kind = condition[0]
    if kind == "all":
        return all(evaluate_condition(part, variables) for part in condition[1])
    if kind == "any":
        return any(evaluate_condition(part, variables) for part in condition[1])
    if kind == "not":
        return not evaluate_condition(condition[1], variables)
    _, path, operator, operand = condition
    if operator == "exists":
        try:
            _lookup(variables, path)
        except _Fault:
            return False
        return True
    right = _lookup(variables, operand[1]) if operand[0] == "var" else operand[1]
    return _compare(_lookup(variables, path), operator, right)


# Validation: every problem, each with its place ----------------------------------------------


def _quoted(value: Any) -> str:
    return one_line(json.dumps(value, ensure_ascii=False)[:80])


class _Checker:
    """Collects the problems of one definition; each check returns the compiled value or None."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, place: str, problem: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(f"{place}: {problem}")

    def text(self, value: Any, place: str, limit: int = 200) -> str | None:
        if not isinstance(value, str):
            self.fail(place, f"must be text, not {_json_kind(value)}")
            return None
        if not value.strip():
            self.fail(place, "must not be empty")
            return None
        if len(value) > limit:
            self.fail(place, f"is {len(value)} characters; the most is {limit}")
            return None
        return value

    def template(self, value: Any, place: str) -> Template | None:
        text = self.text(value, place, TEMPLATE_MAX_CHARS)
        if text is None:
            return None
        try:
            return Template(text)
        except ValueError as error:
            self.fail(place, str(error))
            return None

    def duration(self, value: Any, place: str, most: float | None = None) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.fail(place, f'must be a duration such as "5s" or "1m30s", not {_json_kind(value)}')
            return None
        try:
            seconds = parse_duration(value, "duration")
        except InvalidInput as error:
            self.fail(place, str(error).removeprefix("duration: "))
            return None
        if most is not None and seconds > most:
            self.fail(place, f"is {_format_seconds(seconds)}; the most is {_format_seconds(most)}")
            return None
        return seconds

    def input_object(self, value: Any, place: str) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.fail(place, f"must be a JSON object, not {_json_kind(value)}")
            return None
        try:
            encode_body(value, TRIGGER_INPUT_MAX_BYTES)
        except InvalidInput as error:
            self.fail(place, str(error))
            return None
        return value

    def condition(self, value: Any, place: str, depth: int = 0) -> Condition | None:
        if depth > CONDITION_MAX_DEPTH:
            self.fail(place, f"conditions nest at most {CONDITION_MAX_DEPTH} deep")
            return None
        example = '{"var": "total", "op": ">", "value": 100}'
        if not isinstance(value, dict):
            self.fail(place, f"must be a condition object such as {example}, not {_json_kind(value)}")
            return None
        for group in ("all", "any"):
            if group in value:
                if len(value) != 1:
                    self.fail(place, f'"{group}" stands alone: {{"{group}": [conditions]}}')
                    return None
                parts = value[group]
                if not isinstance(parts, list) or not parts:
                    self.fail(f"{place}.{group}", "must be a non-empty list of conditions")
                    return None
                compiled = [self.condition(part, f"{place}.{group}[{i}]", depth + 1) for i, part in enumerate(parts)]
                return None if any(c is None for c in compiled) else (group, tuple(compiled))
        if "not" in value:
            if len(value) != 1:
                self.fail(place, '"not" stands alone: {"not": condition}')
                return None
            inner = self.condition(value["not"], f"{place}.not", depth + 1)
            return None if inner is None else ("not", inner)
        unknown = sorted(set(value) - {"var", "op", "value"})
        if unknown:
            self.fail(place, f"unknown field {_quoted(unknown[0])}; a condition has var, op and value")
            return None
        path = value.get("var")
        if not isinstance(path, str) or not _VARIABLE_PATH.fullmatch(path):
            self.fail(f"{place}.var", f'must be a variable path such as "input.total", not {_quoted(path)}')
            return None
        operator = value.get("op")
        if operator not in _COMPARISONS:
            self.fail(f"{place}.op", f"must be one of {', '.join(_COMPARISONS)}, not {_quoted(operator)}")
            return None
        if operator == "exists":
            if "value" in value:
                self.fail(place, '"exists" takes no value')
                return None
            return ("compare", tuple(path.split(".")), operator, ("value", None))
        if "value" not in value:
            self.fail(place, f'"{operator}" needs a value (a JSON value, or {{"var": "path"}})')
            return None
        right = value["value"]
        if isinstance(right, dict) and set(right) == {"var"}:
            if not isinstance(right["var"], str) or not _VARIABLE_PATH.fullmatch(right["var"]):
                self.fail(f"{place}.value.var", f"must be a variable path, not {_quoted(right['var'])}")
                return None
            return ("compare", tuple(path.split(".")), operator, ("var", tuple(right["var"].split("."))))
        if operator in ("in", "not in") and not isinstance(right, (list, str)):
            self.fail(f"{place}.value", f'"{operator}" needs a list (or text), not {_json_kind(right)}')
            return None
        if operator in (">", ">=", "<", "<=") and (isinstance(right, bool) or not isinstance(right, (int, float, str))):
            self.fail(f"{place}.value", f'"{operator}" compares numbers or text, not {_json_kind(right)}')
            return None
        return ("compare", tuple(path.split(".")), operator, ("value", right))


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


@dataclass(frozen=True)
class BlueprintActivity:
    """One compiled activity of a blueprint; ``spec`` holds its checked, compiled fields."""

    id: str
    type: str
    next: str | None
    spec: dict[str, Any]


@dataclass(frozen=True)
class Blueprint:
    """A definition compiled for running: what every step reads, built once per node and version."""

    id: str
    name: str
    version: int
    start: str
    activities: dict[str, BlueprintActivity]
    triggers: tuple[dict[str, Any], ...]
    variables: dict[str, Any]  # the starting values, under the instance's input
    body: str  # the canonical JSON stored for this version


# field -> (kind, required) for each activity type; "type", "next" and "description" are common.
_ACTIVITY_FIELDS: dict[str, dict[str, tuple[str, bool]]] = {
    "log": {"message": ("template", True)},
    "set": {"values": ("values", False), "add": ("adds", False)},
    "if": {"condition": ("condition", True), "then": ("ref", False), "else": ("ref", False)},
    "timer": {"duration": ("duration", True)},
    "start_at": {"at": ("time", True)},
    "signal": {
        "name": ("template", True),
        "result": ("variable", False),
        "timeout": ("duration", False),
        "on_timeout": ("ref", False),
    },
    "call": {"function": ("function", True), "result": ("variable", False), "retry": ("retry", False)},
    "fail": {"message": ("template", True)},
    "work": {"duration": ("work", True), "kind": ("work-kind", False)},
    "parallel": {"branches": ("branches", True), "join": ("join", False)},
    "for_each": {
        "items": ("template", True),
        "as": ("variable", True),
        "body": ("ref", True),
        "parallel": ("bool", False),
    },
    "run": {
        "definition": ("workflow", True),
        "input": ("values", False),
        "result": ("variable", False),
        "timeout": ("duration", False),
        "on_timeout": ("ref", False),
    },
}
_DEFINITION_FIELDS = ("id", "name", "description", "start", "activities", "triggers", "variables")


def _check_activity_field(check: _Checker, kind: str, value: Any, place: str) -> Any:
    if kind == "template":
        return check.template(value, place)
    if kind == "ref":
        return check.text(value, place, 100)
    if kind == "workflow":
        try:
            return check_workflow_id(value, "a workflow id")
        except InvalidInput as error:
            check.fail(place, str(error))
            return None
    if kind == "duration":
        return check.duration(value, place)
    if kind == "work":
        return check.duration(value, place, WORK_MAX_SECONDS)
    if kind == "branches":
        if not isinstance(value, list) or not 1 <= len(value) <= PARALLEL_MAX_BRANCHES:
            check.fail(place, f'must be a list of 1 to {PARALLEL_MAX_BRANCHES} activity ids, such as ["pack", "bill"]')
            return None
        if not all(isinstance(item, str) for item in value) or len(set(value)) != len(value):
            check.fail(place, "must name each branch's first activity once, as text")
            return None
        return tuple(value)
    if kind == "join":
        if value not in ("all", "any"):
            check.fail(place, f'must be "all" (every branch ends) or "any" (the first one), not {_quoted(value)}')
            return None
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            check.fail(place, f"must be true or false, not {_quoted(value)}")
            return None
        return value
    if kind == "work-kind":
        if value not in ("io", "cpu"):
            check.fail(place, f'must be "io" (waits) or "cpu" (computes), not {_quoted(value)}')
            return None
        return value
    if kind == "condition":
        return check.condition(value, place)
    if kind == "variable":
        if not isinstance(value, str) or not _ACTIVITY_ID.fullmatch(value):
            check.fail(place, f"must be a variable name (letters, digits, '_' or '-'), not {_quoted(value)}")
            return None
        return value
    if kind == "function":
        if not isinstance(value, str) or not _FUNCTION_NAME.fullmatch(value):
            check.fail(
                place, f'must name a registered function, such as "charge" or "shop:charge", not {_quoted(value)}'
            )
            return None
        return value
    if kind == "time":
        template = check.template(value, place)
        if template is None or not template.is_constant:
            return template  # filled in when the instance gets there
        try:
            check_due(parse_time(template.render({}), place), place)
        except InvalidInput as error:
            check.fail(place, str(error).split(": ", 1)[-1])
            return None
        return template
    if kind == "values":
        if not isinstance(value, dict) or not value:
            check.fail(
                place, f'must be an object of variables to set, such as {{"total": 120}}, not {_json_kind(value)}'
            )
            return None
        compiled: dict[str, Any] = {}
        for name, item in value.items():
            if not _ACTIVITY_ID.fullmatch(name):
                check.fail(f"{place}.{name}", "is not a variable name (letters, digits, '_' or '-')")
                continue
            compiled[name] = check.template(item, f"{place}.{name}") if isinstance(item, str) else item
        return compiled
    if kind == "adds":
        if not isinstance(value, dict) or not value:
            check.fail(place, f'must be an object of numbers to add, such as {{"tries": 1}}, not {_json_kind(value)}')
            return None
        for name, item in value.items():
            if not _ACTIVITY_ID.fullmatch(name):
                check.fail(f"{place}.{name}", "is not a variable name (letters, digits, '_' or '-')")
            elif isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                check.fail(f"{place}.{name}", f"must be a number, not {_json_kind(item)}")
        return value
    if kind == "retry":
        if not isinstance(value, dict) or set(value) - {"attempts", "delay"}:
            check.fail(place, 'must be an object such as {"attempts": 5, "delay": "2s"}')
            return None
        attempts = value.get("attempts", CALL_ATTEMPTS)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
            check.fail(f"{place}.attempts", f"must be a whole number from 1 to 100, not {_quoted(attempts)}")
            return None
        delay = check.duration(value.get("delay", CALL_RETRY_DELAY), f"{place}.delay", 3600.0)
        return None if delay is None else (attempts, delay)
    raise AssertionError(kind)


def _check_activity(check: _Checker, activity_id: str, value: Any) -> BlueprintActivity | None:
    place = f"activities.{activity_id}"
    if not _ACTIVITY_ID.fullmatch(activity_id):
        check.fail(place, "an activity id is 1 to 100 letters, digits, '_' or '-'")
        return None
    if not isinstance(value, dict):
        check.fail(place, f"must be an object with a type, not {_json_kind(value)}")
        return None
    kind = value.get("type")
    if kind not in _ACTIVITY_FIELDS:
        if kind is None:
            check.fail(f"{place}.type", f"is missing; give one of {', '.join(ACTIVITY_TYPES)}")
        else:
            check.fail(
                f"{place}.type", f"unknown activity type {_quoted(kind)}; the types are {', '.join(ACTIVITY_TYPES)}"
            )
        return None
    fields = _ACTIVITY_FIELDS[kind]
    spec: dict[str, Any] = {}
    ok = True
    for name in value:
        if name not in fields and name not in ("type", "next", "description"):
            check.fail(
                f"{place}.{name}",
                f"unknown field for a {kind} activity; its fields are {', '.join(fields)}, next, description",
            )
            ok = False
    for name, (field_kind, required) in fields.items():
        if name not in value:
            if required:
                check.fail(f"{place}.{name}", f"is missing: a {kind} activity needs it")
                ok = False
            continue
        compiled = _check_activity_field(check, field_kind, value[name], f"{place}.{name}")
        if compiled is None:
            ok = False
        spec[name] = compiled
    following = value.get("next")
    if "next" in value and check.text(following, f"{place}.next", 100) is None:
        ok = False
    if "description" in value and not isinstance(value["description"], str):
        check.fail(f"{place}.description", f"must be text, not {_json_kind(value['description'])}")
    if kind == "set" and not ("values" in value or "add" in value):
        check.fail(place, 'a set activity needs "values" or "add"')
        ok = False
    if kind == "if" and not ({"then", "else", "next"} & set(value)):
        check.fail(place, 'an if activity needs "then", "else" or "next": where does each outcome go?')
        ok = False
    if kind == "fail" and "next" in value:
        check.fail(f"{place}.next", "a fail activity ends its instance; remove next")
        ok = False
    if "on_timeout" in value and "timeout" not in value:
        check.fail(f"{place}.on_timeout", "goes with timeout: how long the wait lasts before it goes there")
        ok = False
    if spec.get("timeout") == 0:  # it would end every wait at once: a loop through it would never rest
        check.fail(f"{place}.timeout", "must be more than zero, such as 30s or 2d")
        ok = False
    if kind == "call" and "retry" not in value:
        spec["retry"] = (CALL_ATTEMPTS, CALL_RETRY_DELAY)
    return BlueprintActivity(activity_id, kind, following, spec) if ok else None


def _exits(activity: Any) -> list[tuple[str, str]]:
    """(field, target activity id) for each way out of an activity as written (its JSON object)."""
    if not isinstance(activity, dict):
        return []
    fields = ("next", "then", "else") if activity.get("type") == "if" else ("next", "on_timeout", "body")
    exits = [(field, activity[field]) for field in fields if isinstance(activity.get(field), str)]
    if activity.get("type") == "parallel" and isinstance(activity.get("branches"), list):
        exits += [(f"branches[{i}]", start) for i, start in enumerate(activity["branches"]) if isinstance(start, str)]
    return exits


class _JSONObject(dict[str, Any]):
    """A parsed JSON object that remembers the keys it was given more than once."""

    repeated: tuple[str, ...] = ()


def _object_with_repeats(pairs: list[tuple[str, Any]]) -> _JSONObject:
    made = _JSONObject()
    repeated = []
    for key, value in pairs:
        if key in made:
            repeated.append(key)
        made[key] = value
    made.repeated = tuple(repeated)
    return made


def _repeated_keys(check: _Checker, value: Any, place: str) -> None:
    """Report every key given twice in one object, anywhere in the definition (the last one would win)."""
    if isinstance(value, list):
        for index, item in enumerate(value):
            _repeated_keys(check, item, f"{place}[{index}]")
        return
    if not isinstance(value, dict):
        return
    for key in getattr(value, "repeated", ()):
        what = "two activities have this id" if place == "activities" else "given more than once"
        check.fail(f"{place}.{key}" if place else key, what)
    for key, item in value.items():
        _repeated_keys(check, item, f"{place}.{key}" if place else key)


def _check_trigger(check: _Checker, index: int, value: Any) -> dict[str, Any] | None:
    place = f"triggers[{index}]"
    if not isinstance(value, dict):
        check.fail(place, f"must be an object, not {_json_kind(value)}")
        return None
    kind = value.get("type")
    allowed = {"cron": {"type", "cron", "tz", "input"}, "signal": {"type", "name", "input"}}
    if kind not in allowed:
        check.fail(f"{place}.type", f'must be "cron" or "signal", not {_quoted(kind)}')
        return None
    for name in sorted(set(value) - allowed[kind]):
        check.fail(
            f"{place}.{name}",
            f"unknown field for a {kind} trigger; its fields are {', '.join(sorted(allowed[kind] - {'type'}))}",
        )
    trigger: dict[str, Any] = {"type": kind, "input": {}}
    if "input" in value:
        checked_input = check.input_object(value["input"], f"{place}.input")
        if checked_input is None:
            return None
        trigger["input"] = checked_input
    if kind == "cron":
        expression, tz = value.get("cron"), value.get("tz")
        if not isinstance(expression, str):
            check.fail(
                f"{place}.cron", f'must be a cron expression such as "*/5 * * * *", not {_json_kind(expression)}'
            )
            return None
        if tz is not None and not isinstance(tz, str):
            check.fail(f"{place}.tz", f"must be an IANA time zone name, not {_json_kind(tz)}")
            return None
        try:
            CronSchedule.parse(expression, tz)
        except InvalidInput as error:
            check.fail(f"{place}.{'tz' if tz is not None and 'zone' in str(error) else 'cron'}", str(error))
            return None
        trigger.update(cron=expression, tz=tz)
    else:
        try:
            trigger["name"] = check_signal_name(value.get("name"), "the signal name")
        except InvalidInput as error:
            check.fail(f"{place}.name", str(error))
            return None
    return trigger


def compile_definition(data: Any, version: int = 0) -> Blueprint:
    """Check a definition (parsed JSON) and compile it; InvalidDefinition lists every problem."""
    check = _Checker()
    if not isinstance(data, dict):
        raise InvalidDefinition([f"definition: must be a JSON object, not {_json_kind(data)}"])
    if _nested_deeper_than(data, VARIABLES_MAX_DEPTH):  # first: the checks below walk it recursively
        raise InvalidDefinition([f"definition: nests lists and objects more than {VARIABLES_MAX_DEPTH} deep"])
    try:
        body = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InvalidDefinition([f"definition: not JSON data ({error})"]) from None
    size = len(body.encode("utf-8", "replace"))
    if size > DEFINITION_MAX_BYTES:
        raise InvalidDefinition([f"definition: {size} bytes of JSON; the most is {DEFINITION_MAX_BYTES}"])
    _repeated_keys(check, data, "")
    for name in data:
        if name not in _DEFINITION_FIELDS:
            hint = "; versions are numbered by define" if name == "version" else ""
            check.fail(name, f"unknown field{hint}; a definition has {', '.join(_DEFINITION_FIELDS)}")
    workflow_id = data.get("id")
    try:
        check_workflow_id(workflow_id, "the id")
    except InvalidInput as error:
        check.fail("id", str(error) if workflow_id is not None else "is missing: give the workflow an id")
    name = data.get("name", workflow_id)
    if "name" in data:
        check.text(name, "name")
    if "description" in data and not isinstance(data["description"], str):
        check.fail("description", f"must be text, not {_json_kind(data['description'])}")
    if "variables" in data:
        check.input_object(data["variables"], "variables")
    raw_activities = data.get("activities")
    named = raw_activities if isinstance(raw_activities, dict) else {}  # for start, even when too many
    activities: dict[str, BlueprintActivity] = {}
    if not isinstance(raw_activities, dict) or not raw_activities:
        check.fail("activities", "must be a non-empty object of activities by id")
        raw_activities = {}
    elif len(raw_activities) > DEFINITION_MAX_ACTIVITIES:
        check.fail("activities", f"{len(raw_activities)} activities; the most is {DEFINITION_MAX_ACTIVITIES}")
        raw_activities = {}
    for activity_id, value in raw_activities.items():
        activity = _check_activity(check, activity_id, value)
        if activity is not None:
            activities[activity_id] = activity
    start = data.get("start")
    if start is None:
        check.fail("start", "is missing: name the first activity")
    elif not isinstance(start, str) or start not in named:
        check.fail("start", f"no activity named {_quoted(start)}")
    for activity_id, value in raw_activities.items():
        for field, target in _exits(value):
            if target not in raw_activities:
                check.fail(f"activities.{activity_id}.{field}", f"no activity named {_quoted(target)}")
    if isinstance(start, str) and start in raw_activities:
        seen, frontier = {start}, [start]
        while frontier:
            for _, target in _exits(raw_activities[frontier.pop()]):
                if target in raw_activities and target not in seen:
                    seen.add(target)
                    frontier.append(target)
        for activity_id in raw_activities:
            if activity_id not in seen:
                check.fail(
                    f"activities.{activity_id}", f"is unreachable: no path from start {_quoted(start)} leads to it"
                )
    triggers: list[dict[str, Any]] = []
    raw_triggers = data.get("triggers", [])
    if not isinstance(raw_triggers, list):
        check.fail("triggers", f"must be a list, not {_json_kind(raw_triggers)}")
    elif len(raw_triggers) > DEFINITION_MAX_TRIGGERS:
        check.fail("triggers", f"{len(raw_triggers)} triggers; the most is {DEFINITION_MAX_TRIGGERS}")
    else:
        for index, value in enumerate(raw_triggers):
            trigger = _check_trigger(check, index, value)
            if trigger is not None:
                triggers.append(trigger)
    if check.problems:
        raise InvalidDefinition(check.problems)
    assert isinstance(workflow_id, str) and isinstance(start, str)
    variables = data.get("variables", {})
    return Blueprint(workflow_id, str(name), version, start, activities, tuple(triggers), variables, body)


def parse_definition(text: str | bytes, source: str = "definition") -> Any:
    """JSON text to data, with the line and column of a syntax error."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidDefinition([f"{source}: not UTF-8 text (byte {error.start})"]) from None
    if len(text.encode("utf-8", "replace")) > DEFINITION_MAX_BYTES * 4:
        raise InvalidDefinition([f"{source}: larger than {DEFINITION_MAX_BYTES * 4} bytes"])
    try:
        return json.loads(text, object_pairs_hook=_object_with_repeats)
    except json.JSONDecodeError as error:
        raise InvalidDefinition(
            [f"{source}: not JSON: {error.msg} at line {error.lineno} column {error.colno}"]
        ) from None
    except RecursionError:
        raise InvalidDefinition([f"{source}: nested too deeply"]) from None


# Functions that `call` activities run ------------------------------------------------------------

_ACTIVITIES: dict[str, Callable[[dict[str, Any]], Any]] = {}  # name -> function, filled by @nodeflow.activity


def activity(name: str) -> Callable[[Callable[[dict[str, Any]], Any]], Callable[[dict[str, Any]], Any]]:
    """Register the function that ``{"type": "call", "function": name}`` runs (sync or async).

    It is given a copy of the instance's variables (``input`` among them) and returns JSON data,
    which is stored in the variable named by the activity's ``result`` (default: its id). Put the
    functions in a module and start nodes with ``serve --app MODULE``; ``"module:name"`` also
    finds a function registered as ``name`` in that module.
    """
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        raise InvalidInput(f'an activity function name is such as "charge" or "shop:charge", not {name!r}')

    def register(function: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
        names = [name] if ":" in name else [name, f"{getattr(function, '__module__', '')}:{name}"]
        for key in names:
            known = _ACTIVITIES.get(key)
            if known is not None and known is not function:
                raise NodeflowError(
                    f"activity function {key!r} is registered already: {getattr(known, '__qualname__', known)}"
                )
        for key in names:
            _ACTIVITIES[key] = function
        return function

    return register


@dataclass(frozen=True)
class CallContext:
    """What a ``call`` function may ask of the step it runs for, through ``nodeflow.current_call()``."""

    instance: str
    activity: str
    step: int  # the journal step this try of the call will be recorded as
    fence: int  # the instance lock's fencing token for this burst
    node: str
    first_step: int  # the step of this call's first try on its path (tries after an error come later)
    branch: str | None = None  # the branch of a parallel or for_each it runs on (None: the main path)

    @property
    def key(self) -> str:
        """An idempotency key: the same for every try of this call, the tries after an error and a
        try run again because its burst was lost (a crash). ``retry`` of a faulted instance gives
        the call its tries afresh, under a new key. On the main path, ``first_step`` is the journal
        step of its first try while the instance has no branches; a branch counts its own steps."""
        if self.branch:
            return f"{self.instance}:{self.branch}:{self.first_step}"
        return f"{self.instance}:{self.first_step}"


_CURRENT_CALL: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("nodeflow_call", default=None)


def current_call() -> CallContext:
    """Inside a function that a ``call`` activity runs: its instance, step, fence and idempotency key.

    A call runs at least once: when a node dies after the call but before its burst commits,
    the call runs again from the last committed state, with the same ``key``. A function whose
    effects are keyed by it (an INSERT OR IGNORE, a request with an idempotency key) has them once.
    """
    context = _CURRENT_CALL.get()
    if context is None:
        raise NodeflowError("nodeflow.current_call() is only known inside a function that a call activity runs")
    return context


# What the runtime reads and shows -----------------------------------------------------------------


@dataclass(frozen=True)
class DefinitionInfo:
    id: str
    name: str
    version: int
    created: float
    activities: int
    triggers: tuple[dict[str, Any], ...]
    changed: bool = True  # False when define found this very definition as the latest version


@dataclass(frozen=True)
class JournalEntry:
    """One step of an instance: an activity run (or a wait begun or ended) in one burst."""

    step: int
    activity: str
    type: str
    node: str
    fence: int
    started: float
    ended: float
    outcome: str
    branch: str | None = None  # the branch of a parallel or for_each it ran on (None: the main path)


@dataclass(frozen=True)
class Instance:
    id: str
    definition: str
    version: int
    status: str  # running, waiting, completed or faulted
    position: str | None  # the activity it is at (None before its first step and once completed)
    variables: dict[str, Any]
    waiting_for: str | None  # the signal it waits for
    wake_at: float | None  # when its timer is due
    error: str | None
    attempt: int  # failed tries of the current call
    started_by: str
    created: float
    updated: float
    ended: float | None
    journal: tuple[JournalEntry, ...] = ()
    key: str | None = None  # the key it was started with (start --key): no second instance has it
    parent: str | None = None  # the instance whose run activity started it
    children: tuple[tuple[str, str, str], ...] = ()  # (id, definition, status) of those its run activities started
    branches: tuple[tuple[str, str | None, str | None, float | None], ...] = ()  # (name, activity, signal, wake)
    child: str | None = None  # the instance its main path's run activity waits for


@dataclass(frozen=True)
class SignalOutcome:
    resumed: tuple[str, ...]  # instances that were waiting for the signal
    started: tuple[str, ...]  # definitions a signal trigger starts (one instance each, queued)
    kept_until: float | None = None  # it resumed and started nothing: kept for the next instance to wait, until then

    @property
    def kept(self) -> bool:
        return self.kept_until is not None


@dataclass(frozen=True)
class KeptSignal:
    """A signal that found no instance waiting for it: the next instance to wait for its name takes it."""

    id: int
    name: str
    sent: float
    expires: float
    by: str


_INSTANCE_COLUMNS = (
    "id, definition, version, status, position, variables, waiting_for, wake_at, error, attempt, "
    "started_by, created, updated, ended, start_key, parent, child"
)


def _instance_from_row(
    row: tuple[Any, ...], journal: tuple[JournalEntry, ...] = (), children: tuple[tuple[str, str, str], ...] = ()
) -> Instance:
    (instance_id, definition, version, status, position, variables, waiting_for, wake_at, error, attempt,
     started_by, created, updated, ended, key, parent, child) = row  # fmt: skip
    return Instance(
        instance_id, definition, version, status, position, json.loads(variables), waiting_for, wake_at, error,
        attempt, started_by, created, updated, ended, journal, key, parent, children, child=child,
    )  # fmt: skip


# The instance a run message is for, in SQL; a body that is not JSON (stored by hand) names none.
_RUN_OF_MESSAGE = "CASE WHEN json_valid(body) THEN json_extract(body, '$.run') END"


def _run_message(conn: sqlite3.Connection, instance: str, seq: int, at: float, now: float) -> int:
    cursor = conn.execute(
        "INSERT INTO messages (queue, body, priority, available_at, created) VALUES (?, ?, 0, ?, ?)",
        (WORKFLOW_QUEUE, json.dumps({"run": instance, "seq": seq}), at, now),
    )
    return int(cursor.lastrowid or 0)


def _wake_instance(conn: sqlite3.Connection, instance: str, now: float) -> None:
    """Something it waited for came (a signal, a child's end): it runs again, at a new seq (so the
    run message of a timeout racing this is stale), unless it is faulted: then a retry runs it."""
    _drop_wake_message(conn, instance)
    row = conn.execute(
        "UPDATE instances SET status = CASE status WHEN 'faulted' THEN 'faulted' ELSE 'running' END, seq = seq + 1, "
        "updated = ? WHERE id = ? RETURNING seq, status",
        (now, instance),
    ).fetchone()
    if row is not None and row[1] != "faulted":
        _run_message(conn, instance, int(row[0]), now, now)


def _drop_wake_message(conn: sqlite3.Connection, instance: str) -> None:
    """A wait that had a timeout ended otherwise: its queued timeout would only be acked as stale
    when due (days later, say), counted in the queue's depth meanwhile; it goes now."""
    conn.execute(
        "DELETE FROM messages WHERE id = (SELECT wake_message FROM instances WHERE id = ?) AND lease_owner IS NULL",
        (instance,),
    )


def _latest_version(conn: sqlite3.Connection, definition: str) -> int:
    version = conn.execute("SELECT MAX(version) FROM definitions WHERE id = ?", (definition,)).fetchone()[0]
    if version is None:
        raise InvalidInput(f"no workflow definition {_show_name(definition)}; add it first with: define FILE")
    return int(version)


def _create_instance(
    conn: sqlite3.Connection,
    definition: str,
    version: int | None,
    variables: str,
    by: str,
    key: str | None = None,
    parent: str | None = None,
) -> str:
    """Insert a new instance and the message that runs its first burst; returns its id.

    With a ``key`` already used, the instance that has it: the key's row is looked up inside the
    write transaction, which every start takes in turn, so two starts of one key never both insert
    (the unique index would refuse the second anyway)."""
    if key is not None:
        found = conn.execute("SELECT id, definition FROM instances WHERE start_key = ?", (key,)).fetchone()
        if found is not None:
            if found[1] != definition:
                raise InvalidInput(
                    f"key {_show_name(key)} started instance {found[0]} of workflow {_show_name(found[1])} already; "
                    "a key names one instance: choose another key"
                )
            return str(found[0])
    if version is None:
        version = _latest_version(conn, definition)
    now = time.time()
    while True:
        # Milliseconds, then 20 random bits: new rows of instances, journal and lock_fences land
        # at the end of their indexes, in pages a commit has in hand, not all over a large file.
        instance = f"{int(now * 1000):011x}{secrets.randbits(20):05x}"
        try:
            conn.execute(
                "INSERT INTO instances (id, definition, version, status, variables, started_by, created, updated, "
                "start_key, parent) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                (instance, definition, version, variables, by, now, now, key, parent),
            )
            break
        except sqlite3.IntegrityError:  # another start in the same millisecond drew the same bits
            if key is not None and conn.execute("SELECT 1 FROM instances WHERE start_key = ?", (key,)).fetchone():
                raise  # never: the key was looked up in this transaction
            continue
    _run_message(conn, instance, 0, now, now)
    return instance


def _resolve_instance(conn: sqlite3.Connection, text: str) -> str:
    """An instance id from its full id, the key it was started with, or a unique prefix or suffix of
    at least four characters.

    Ids begin with their start time, so instances started together share a prefix; the end of
    an id (its random part) is the quicker thing to type.
    """
    if conn.execute("SELECT 1 FROM instances WHERE id = ?", (text,)).fetchone():
        return text
    keyed = conn.execute("SELECT id FROM instances WHERE start_key = ?", (text,)).fetchone()
    if keyed is not None:  # the key it was started with (start --key)
        return str(keyed[0])
    if len(text) >= INSTANCE_ID_MIN_PREFIX and re.fullmatch(r"[0-9a-f]+", text):
        for query in (
            "SELECT id FROM instances WHERE id > :text AND id < :text || 'g' ORDER BY id LIMIT 3",
            "SELECT id FROM instances WHERE substr(id, -length(:text)) = :text LIMIT 3",  # reads every id
        ):
            found = [str(row[0]) for row in conn.execute(query, {"text": text})]
            if len(found) == 1:
                return found[0]
            if found:
                raise InvalidInput(f"instance id {text!r} is ambiguous: {', '.join(found[:2])}, ...; give more of it")
    raise NotFound(f"no instance {_show_name(text)}; list them with: instances")


def _resume_parent(
    conn: sqlite3.Connection, child: str, parent: str | None, status: str, variables: str, error: str | None
) -> bool:
    """A child instance ended: the parent waiting for it at its run activity goes on (a child that
    did not complete faults it there). Its seq moves on, so the timeout of its wait is stale."""
    if parent is None:
        return False
    outcome = json.dumps({"child": child, "status": status, "error": error})
    resume = f'{outcome[:-1]}, "variables": {variables}}}'  # the child's variables as stored, not parsed again
    # Its main path, or one of its branches, waits for this child (none: it stopped waiting, timed
    # out or cancelled, and nothing waits for this end).
    waits = (
        conn.execute(
            "UPDATE instances SET wake_at = NULL, resume = ? WHERE id = ? AND bookmark = 'child' AND child = ? "
            "AND status NOT IN ('completed', 'cancelled')",
            (resume, parent, child),
        ).rowcount
        or conn.execute(
            "UPDATE branches SET wake_at = NULL, resume = ? WHERE instance = ? AND bookmark = 'child' AND child = ?",
            (resume, parent, child),
        ).rowcount
    )
    if not waits:
        return False
    _wake_instance(conn, parent, time.time())
    return True


def _cancel_instances(conn: sqlite3.Connection, instance: str, reason: str | None, node: str) -> list[str]:
    """Cancel ``instance`` and every instance its run activities started that has not ended, nested:
    each one's status becomes cancelled, its seq moves on (a burst under way commits nothing), its
    queued runs go. A parent waiting for ``instance`` faults at its run activity. Returns the ids."""
    cancelled: list[str] = []
    pending: list[tuple[str, str | None]] = [(instance, reason)]
    while pending:
        current, why = pending.pop()
        row = conn.execute(
            "SELECT status, position, steps, fence, parent, variables FROM instances WHERE id = ?", (current,)
        ).fetchone()
        if row is None or row[0] in ("completed", "cancelled"):
            continue
        status, position, steps, fence, parent, variables = row
        now = time.time()
        conn.execute(
            "UPDATE instances SET status = 'cancelled', seq = seq + 1, steps = steps + 1, bookmark = NULL, "
            "waiting_for = NULL, wake_at = NULL, resume = NULL, error = NULL, child = NULL, updated = ?, ended = ? "
            "WHERE id = ?",
            (now, now, current),
        )
        conn.execute(
            "INSERT INTO journal (instance, step, activity, type, node, fence, started, ended, outcome) "
            "VALUES (?, ?, ?, 'cancel', ?, ?, ?, ?, ?)",
            (current, steps, position or "(start)", node, fence, now, now,
             f"cancelled{': ' + why if why else ''} (was {status})"),
        )  # fmt: skip
        conn.execute(  # its waiting timer and queued runs: never needed now (one in a node's hands is acked)
            f"DELETE FROM messages WHERE queue = ? AND lease_owner IS NULL AND {_RUN_OF_MESSAGE} = ?",
            (WORKFLOW_QUEUE, current),
        )
        conn.execute("DELETE FROM lock_fences WHERE name = ?", (INSTANCE_LOCK_PREFIX + current,))
        conn.execute("DELETE FROM branches WHERE instance = ?", (current,))  # their waits end with them
        cancelled.append(current)
        _resume_parent(conn, current, parent, "cancelled", variables, why)
        for (child,) in conn.execute(
            "SELECT id FROM instances WHERE parent = ? AND status NOT IN ('completed', 'cancelled')", (current,)
        ).fetchall():
            pending.append((child, f"its parent {current} was cancelled"))
    return cancelled


def check_start_key(key: object) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= START_KEY_MAX_CHARS or not key.isprintable():
        shown = _show_name(key) if isinstance(key, str) else type(key).__name__
        raise InvalidInput(f"a start key is printable text of 1 to {START_KEY_MAX_CHARS} characters, not {shown}")
    return key


def _take_kept_signal(conn: sqlite3.Connection, name: str, now: float) -> tuple[str, float] | None:
    """The oldest live kept signal of ``name``, removed in this transaction: (its input, when it was sent).
    Writers take turns, so one kept signal resumes one instance however many reach their waits at once."""
    row = conn.execute(
        "DELETE FROM kept_signals WHERE id = (SELECT id FROM kept_signals WHERE name = ? AND expires > ? "
        "ORDER BY id LIMIT 1) RETURNING input, sent",
        (name, now),
    ).fetchone()
    return None if row is None else (str(row[0]), float(row[1]))


def prune_ended_batch(
    conn: sqlite3.Connection, ended_before: float, faulted_before: float, budget: int = PRUNE_BATCH_ROWS
) -> tuple[int, int, bool]:
    """Remove ended instances last changed before the cut-offs, with their journals and fence
    counters, and expired kept signals: at most ``budget`` rows. Returns (instances removed, kept
    signals removed, whether more is left). An instance whose journal outlasts the budget loses
    its oldest steps now and goes in a later batch."""
    now = time.time()
    signals = conn.execute(
        "DELETE FROM kept_signals WHERE id IN (SELECT id FROM kept_signals WHERE expires <= ? LIMIT ?)", (now, budget)
    ).rowcount
    left = budget - signals
    removed = 0
    candidates = conn.execute(
        "SELECT id FROM instances WHERE status IN ('completed', 'faulted', 'cancelled') AND updated < :latest "
        "AND updated < CASE status WHEN 'faulted' THEN :faulted ELSE :ended END ORDER BY updated LIMIT :most",
        {"latest": max(ended_before, faulted_before), "faulted": faulted_before, "ended": ended_before,
         "most": max(1, left)},
    ).fetchall()  # fmt: skip
    for (instance,) in candidates:
        if left <= 0:
            return removed, signals, True
        left -= conn.execute(
            "DELETE FROM journal WHERE instance = ? AND step < (SELECT MIN(step) FROM journal WHERE instance = ?) + ?",
            (instance, instance, left),
        ).rowcount
        if conn.execute("SELECT 1 FROM journal WHERE instance = ? LIMIT 1", (instance,)).fetchone():
            return removed, signals, True
        conn.execute("DELETE FROM instances WHERE id = ?", (instance,))
        conn.execute("DELETE FROM lock_fences WHERE name = ?", (INSTANCE_LOCK_PREFIX + instance,))
        conn.execute("DELETE FROM branches WHERE instance = ?", (instance,))  # a faulted one's waiting branches
        removed, left = removed + 1, left - 1
    return removed, signals, left <= 0 or len(candidates) == max(1, budget - signals)


def _check_reason(reason: object) -> str | None:
    if reason is None:
        return None
    if not isinstance(reason, str) or len(reason) > 1000 or not reason.isprintable():
        shown = _show_name(reason) if isinstance(reason, str) else type(reason).__name__
        raise InvalidInput(f"a reason is printable text of at most 1000 characters, not {shown}")
    return reason


# A cancel ends instances (callers waiting for an end look again) and may resume a parent (a run message).
_CANCEL_RINGS = (RING_INSTANCES, _ring_topic_for_queue(WORKFLOW_QUEUE))


class Workflows:
    """Definitions, instances and signals, for one handle.

    On a listening handle (a node), blueprints are kept in its memory cache until the
    ``definitions`` change token fires: a define on any node reaches it through the instruction
    log within milliseconds, and a lookup first reads the log, so a start that follows a define
    (in any process) always gets the new version.
    """

    def __init__(
        self,
        store: Store,
        committer: GroupCommitter,
        signals: Signals,
        cache: MemoryCache,
        wakeups: Wakeups,
        node: str,
        listening: Callable[[], bool],
    ) -> None:
        self.store, self.committer, self.signals, self.cache = store, committer, signals, cache
        self.wakeups, self.node, self._listening = wakeups, node, listening
        self.blueprints_loaded = 0
        self.cache_signals = True  # False only in `demo cache`: then cached blueprints are never evicted

    # Definitions ----------------------------------------------------------------------------

    def _define_work(self, blueprint: Blueprint) -> Callable[[sqlite3.Connection], tuple[int, float, bool]]:
        append = self.signals._append_work(SIGNAL_TOPIC, json.dumps(DEFINITIONS_TOKEN))

        def define(conn: sqlite3.Connection) -> tuple[int, float, bool]:
            latest = conn.execute(
                "SELECT version, body, created FROM definitions WHERE id = ? ORDER BY version DESC LIMIT 1",
                (blueprint.id,),
            ).fetchone()
            if latest is not None and latest[1] == blueprint.body:
                return int(latest[0]), float(latest[2]), False  # the same definition again: no new version
            version, now = (latest[0] + 1 if latest else 1), time.time()
            conn.execute(
                "INSERT INTO definitions (id, version, name, body, created) VALUES (?, ?, ?, ?, ?)",
                (blueprint.id, version, blueprint.name, blueprint.body, now),
            )
            conn.execute("DELETE FROM signal_triggers WHERE definition = ?", (blueprint.id,))
            prefix, kept = f"workflow:{blueprint.id}#", set()
            for index, trigger in enumerate(blueprint.triggers):
                text = json.dumps(trigger["input"], separators=(",", ":"))
                if trigger["type"] == "signal":
                    conn.execute(
                        "INSERT OR IGNORE INTO signal_triggers (name, definition, position, input) VALUES (?, ?, ?, ?)",
                        (trigger["name"], blueprint.id, index, text),
                    )
                    continue
                name = f"{prefix}{index}"
                kept.add(name)
                body = json.dumps({"start": blueprint.id, "input": trigger["input"], "by": f"cron trigger {index}"})
                old = conn.execute("SELECT cron, tz, body FROM timers WHERE name = ?", (name,)).fetchone()
                if old == (trigger["cron"], trigger["tz"], body):
                    continue  # unchanged: keep its due time, so a firing due now is not skipped
                due = _cron_schedule(trigger["cron"], trigger["tz"]).next_after(now)
                conn.execute(
                    "INSERT OR REPLACE INTO timers (name, queue, body, cron, tz, due, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (name, WORKFLOW_QUEUE, body, trigger["cron"], trigger["tz"], due, now),
                )
            for (name,) in conn.execute(
                "SELECT name FROM timers WHERE substr(name, 1, ?) = ?", (len(prefix), prefix)
            ).fetchall():
                if name not in kept:
                    conn.execute("DELETE FROM timers WHERE name = ?", (name,))
            append(conn)  # the "definitions" token fires on every node, in this very commit
            return version, now, True

        return define

    def _prepare_define(self, definition: Any) -> Blueprint:
        data = parse_definition(definition) if isinstance(definition, (str, bytes)) else definition
        return compile_definition(data)

    def _defined(self, blueprint: Blueprint, outcome: tuple[int, float, bool]) -> DefinitionInfo:
        version, created, changed = outcome
        if changed:
            self.signals._fire_key(DEFINITIONS_TOKEN)  # this handle's own cache, at once
        return DefinitionInfo(
            blueprint.id, blueprint.name, version, created, len(blueprint.activities), blueprint.triggers, changed
        )

    def define(self, definition: Any) -> DefinitionInfo:
        blueprint = self._prepare_define(definition)
        outcome = self.committer.submit(self._define_work(blueprint), (RING_INSTRUCTIONS, RING_TIMERS))
        return self._defined(blueprint, outcome)

    async def adefine(self, definition: Any) -> DefinitionInfo:
        blueprint = self._prepare_define(definition)
        outcome = await self.committer.asubmit(self._define_work(blueprint), (RING_INSTRUCTIONS, RING_TIMERS))
        return self._defined(blueprint, outcome)

    def definitions(self) -> list[DefinitionInfo]:
        """The latest version of every definition, by id."""
        rows = self.store.read(
            lambda conn: conn.execute(
                "SELECT d.id, d.version, d.name, d.created, d.body FROM definitions d "
                "WHERE d.version = (SELECT MAX(version) FROM definitions WHERE id = d.id) ORDER BY d.id"
            ).fetchall()
        )
        found = []
        for workflow_id, version, name, created, body in rows:
            data = decode_stored(body)
            if not isinstance(data, dict):
                data = {}  # stored in a form this nodeflow cannot read: listed, with nothing to show
            triggers = tuple(data.get("triggers") or ())
            found.append(
                DefinitionInfo(workflow_id, name, version, created, len(data.get("activities") or ()), triggers)
            )
        return found

    def definition(self, workflow_id: str, version: int | None = None) -> dict[str, Any]:
        """A stored definition as JSON data: the latest version, or the one given."""
        return dict(json.loads(self._definition_body(check_workflow_id(workflow_id), version)[1]))

    def _definition_body(self, workflow_id: str, version: int | None) -> tuple[int, str]:
        def read(conn: sqlite3.Connection) -> tuple[int, str]:
            try:
                wanted = _latest_version(conn, workflow_id) if version is None else version
            except InvalidInput as error:
                raise NotFound(str(error)) from None
            row = conn.execute(
                "SELECT body FROM definitions WHERE id = ? AND version = ?", (workflow_id, wanted)
            ).fetchone()
            if row is None:
                raise NotFound(f"workflow {_show_name(workflow_id)} has no version {wanted}")
            return wanted, str(row[0])

        return self.store.read(read)

    def _load_blueprint(self, workflow_id: str, version: int | None) -> Blueprint:
        found, body = self._definition_body(workflow_id, version)
        self.blueprints_loaded += 1
        compiled = compile_definition(json.loads(body), found)
        return compiled

    def blueprint(self, workflow_id: str, version: int | None = None) -> Blueprint:
        """The compiled definition (the latest version when none is given), from the cache when fresh."""
        if not self._listening():
            return self._load_blueprint(workflow_id, version)
        if version is None and self.cache_signals:
            self.signals.catch_up()  # a define committed before this call has fired the token now
        return self.cache.get_or_create(
            ("blueprint", workflow_id, version),
            functools.partial(self._load_blueprint, workflow_id, version),
            tokens=(DEFINITIONS_TOKEN,) if self.cache_signals else (),  # the demo's stale cache keeps what it has
        )

    def cached_versions(self) -> dict[str, int]:
        """definition id -> the version a start would use from this process's cache (no read)."""
        return {
            key[1]: value.version
            for key, value in self.cache.fresh_items()
            if isinstance(key, tuple) and len(key) == 3 and key[0] == "blueprint" and key[2] is None
        }

    # Instances ------------------------------------------------------------------------------

    def _prepare_start(
        self, workflow_id: str, data: Any, key: str | None = None
    ) -> tuple[Callable[[sqlite3.Connection], tuple[str, bool]], tuple[str, ...]]:
        workflow_id = check_workflow_id(workflow_id, "the workflow id")
        key = check_start_key(key)
        variables = encode_body(
            {"input": check_instance_input(data)}, self.store.settings.max_body_bytes, VARIABLES_MAX_DEPTH
        )
        version = self.blueprint(workflow_id).version if self._listening() else None
        node = self.node

        def start(conn: sqlite3.Connection) -> tuple[str, bool]:
            used = key is not None and conn.execute("SELECT 1 FROM instances WHERE start_key = ?", (key,)).fetchone()
            return _create_instance(conn, workflow_id, version, variables, node, key), not used

        return start, (_ring_topic_for_queue(WORKFLOW_QUEUE),)

    def begin(self, workflow_id: str, data: Any = None, key: str | None = None) -> tuple[str, bool]:
        """Start an instance of the latest version with ``data`` as its input: its id, and whether it
        is new. With a ``key`` some instance was started with already, that instance, and nothing starts."""
        work, rings = self._prepare_start(workflow_id, data, key)
        return self.committer.submit(work, rings)

    async def abegin(self, workflow_id: str, data: Any = None, key: str | None = None) -> tuple[str, bool]:
        work, rings = self._prepare_start(workflow_id, data, key)
        return await self.committer.asubmit(work, rings)

    def start(self, workflow_id: str, data: Any = None, key: str | None = None) -> str:
        return self.begin(workflow_id, data, key)[0]

    async def astart(self, workflow_id: str, data: Any = None, key: str | None = None) -> str:
        return (await self.abegin(workflow_id, data, key))[0]

    def _signal_work(
        self, name: str, data: dict[str, Any], ttl: float
    ) -> Callable[[sqlite3.Connection], SignalOutcome]:
        settings = self.store.settings
        resume = encode_body(data, settings.max_body_bytes)
        node = self.node

        def deliver(conn: sqlite3.Connection) -> SignalOutcome:
            now = time.time()
            resumed: list[str] = []
            for (instance,) in conn.execute(
                "SELECT id FROM instances WHERE waiting_for = ? ORDER BY created", (name,)
            ).fetchall():
                conn.execute(
                    "UPDATE instances SET waiting_for = NULL, wake_at = NULL, resume = ? WHERE id = ?",
                    (resume, instance),
                )
                resumed.append(instance)
            for instance, branch in conn.execute(
                "SELECT instance, name FROM branches WHERE waiting_for = ? ORDER BY instance, name", (name,)
            ).fetchall():
                conn.execute(
                    "UPDATE branches SET waiting_for = NULL, wake_at = NULL, resume = ? "
                    "WHERE instance = ? AND name = ?",
                    (resume, instance, branch),
                )
                if instance not in resumed:
                    resumed.append(instance)
            for instance in resumed:
                # seq moves on: the run message of its timeout (if it has one) is stale from here,
                # so a signal and a timeout that race resolve one way only.
                _wake_instance(conn, instance, now)
            started = []
            for definition, trigger_input in conn.execute(
                "SELECT definition, input FROM signal_triggers WHERE name = ? ORDER BY definition, position", (name,)
            ).fetchall():
                body = {"start": definition, "input": {**json.loads(trigger_input), **data}, "by": f"signal {name}"}
                conn.execute(
                    "INSERT INTO messages (queue, body, priority, available_at, created) VALUES (?, ?, 0, ?, ?)",
                    (WORKFLOW_QUEUE, encode_body(body, settings.max_body_bytes, VARIABLES_MAX_DEPTH), now, now),
                )
                started.append(definition)
            conn.execute(  # a few expired ones at a time: the table stays small even with no scheduler
                "DELETE FROM kept_signals WHERE id IN (SELECT id FROM kept_signals WHERE expires <= ? LIMIT 100)",
                (now,),
            )
            if resumed or started or ttl <= 0:
                return SignalOutcome(tuple(resumed), tuple(started))
            conn.execute(
                "INSERT INTO kept_signals (name, input, sent, expires, by) VALUES (?, ?, ?, ?, ?)",
                (name, resume, now, now + ttl, node),
            )
            return SignalOutcome((), (), now + ttl)

        return deliver

    def _prepare_signal(self, name: str, data: Any, ttl: float | str) -> Callable[[sqlite3.Connection], SignalOutcome]:
        name = check_signal_name(name)
        seconds = parse_duration(ttl, "the signal's ttl")
        return self._signal_work(name, check_instance_input(data, "the signal's input"), seconds)

    def signal(self, name: str, data: Any = None, ttl: float | str = SIGNAL_KEEP_DEFAULT) -> SignalOutcome:
        """Resume every instance waiting for signal ``name`` (its ``data`` becomes the signal
        activity's result) and start the definitions with a signal trigger of that name. A signal
        that does neither is kept for ``ttl`` (0: dropped): the next instance to wait for it takes it."""
        work = self._prepare_signal(name, data, ttl)
        return self.committer.submit(work, (_ring_topic_for_queue(WORKFLOW_QUEUE),))

    async def asignal(self, name: str, data: Any = None, ttl: float | str = SIGNAL_KEEP_DEFAULT) -> SignalOutcome:
        work = self._prepare_signal(name, data, ttl)
        return await self.committer.asubmit(work, (_ring_topic_for_queue(WORKFLOW_QUEUE),))

    def kept_signals(self, limit: int = KEPT_SIGNALS_SHOWN) -> tuple[list[KeptSignal], int]:
        """The oldest live kept signals (at most ``limit``) and how many there are in all."""

        def read(conn: sqlite3.Connection) -> tuple[list[KeptSignal], int]:
            now = time.time()
            rows = conn.execute(
                "SELECT id, name, sent, expires, by FROM kept_signals WHERE expires > ? ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
            total = conn.execute("SELECT COUNT(*) FROM kept_signals WHERE expires > ?", (now,)).fetchone()[0]
            return [KeptSignal(*row) for row in rows], int(total)

        return self.store.read(read)

    def instances(
        self, status: str | None = None, definition: str | None = None, limit: int | None = None
    ) -> list[Instance]:
        """Instances, oldest first (the newest ``limit`` of them when given); by status or definition."""
        if status is not None and status not in INSTANCE_STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(INSTANCE_STATUSES)}, not {status!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InvalidInput(f"limit must be a whole number of at least 1, not {limit!r}")
        where, args = [], []
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if definition is not None:
            where.append("definition = ?")
            args.append(check_workflow_id(definition))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        query = (
            f"SELECT * FROM (SELECT {_INSTANCE_COLUMNS} FROM instances {clause} ORDER BY created DESC, id DESC "
            f"LIMIT ?) ORDER BY created, id"
        )
        rows = self.store.read(lambda conn: conn.execute(query, (*args, -1 if limit is None else limit)).fetchall())
        return [_instance_from_row(row) for row in rows]

    def counts(self) -> dict[str, int]:
        """How many instances are in each status."""
        rows = self.store.read(
            lambda conn: [
                (status, conn.execute("SELECT COUNT(*) FROM instances WHERE status = ?", (status,)).fetchone()[0])
                for status in INSTANCE_STATUSES
            ]
        )
        return dict(rows)

    def latest_steps(self, limit: int = 20) -> list[dict[str, Any]]:
        """The steps committed last, across instances, newest first (for the dashboard's feed)."""
        rows = self.store.read(
            lambda conn: conn.execute(
                "SELECT j.instance, i.definition, j.step, j.activity, j.type, j.node, j.fence, j.started, j.ended, "
                "j.outcome FROM journal j JOIN instances i ON i.id = j.instance ORDER BY j.ended DESC LIMIT ?",
                (limit,),
            ).fetchall()
        )
        keys = ("instance", "definition", "step", "activity", "type", "node", "fence", "started", "ended", "outcome")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def instance(self, instance_id: str, journal: bool = True) -> Instance:
        """One instance, with its journal (a unique prefix of the id will do)."""
        if not isinstance(instance_id, str) or not instance_id:
            raise InvalidInput(f"an instance id is text, not {instance_id!r}")

        def read(conn: sqlite3.Connection) -> Instance:
            found = _resolve_instance(conn, instance_id)
            row = conn.execute(f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE id = ?", (found,)).fetchone()
            entries: tuple[JournalEntry, ...] = ()
            if journal:
                entries = tuple(
                    JournalEntry(*entry)
                    for entry in conn.execute(
                        "SELECT step, activity, type, node, fence, started, ended, outcome, branch FROM journal "
                        "WHERE instance = ? ORDER BY step",
                        (found,),
                    )
                )
            children = tuple(  # the newest 1,000: the one it waits for among them
                (str(child), str(definition), str(status))
                for child, definition, status, _ in conn.execute(
                    "SELECT * FROM (SELECT id, definition, status, created FROM instances WHERE parent = ? "
                    "ORDER BY created DESC, id DESC LIMIT 1000) ORDER BY created, id",
                    (found,),
                )
            )
            branches = tuple(
                conn.execute(
                    "SELECT name, position, waiting_for, wake_at FROM branches WHERE instance = ? ORDER BY name "
                    "LIMIT 1000",
                    (found,),
                ).fetchall()
            )
            return replace(_instance_from_row(row, entries, children), branches=branches)

        return self.store.read(read)

    def retry(self, instance_id: str) -> Instance:
        """Resume a faulted instance at the activity that failed (a call gets its tries afresh).

        A running instance whose run message is gone (a dead letter) gets a new one.
        """
        found = self.instance(instance_id, journal=False).id

        def retry(conn: sqlite3.Connection) -> None:
            now = time.time()
            status, seq = conn.execute("SELECT status, seq FROM instances WHERE id = ?", (found,)).fetchone()
            if status == "faulted":
                conn.execute(
                    "UPDATE instances SET status = 'running', seq = seq + 1, attempt = 0, error = NULL, unwaited = 0, "
                    "updated = ? WHERE id = ?",
                    (now, found),
                )
                conn.execute("UPDATE branches SET attempt = 0 WHERE instance = ?", (found,))
                _run_message(conn, found, seq + 1, now, now)
                return
            queued = conn.execute(
                f"SELECT 1 FROM messages WHERE queue = ? AND {_RUN_OF_MESSAGE} = ?", (WORKFLOW_QUEUE, found)
            ).fetchone()
            wake = conn.execute(
                "SELECT MIN(wake_at) FROM (SELECT wake_at FROM instances WHERE id = :id "
                "UNION ALL SELECT wake_at FROM branches WHERE instance = :id)",
                {"id": found},
            ).fetchone()[0]
            if queued is None and (status == "running" or (status == "waiting" and wake is not None)):
                _run_message(conn, found, seq, max(now, wake or now), now)  # its message went dead: a new one
                return
            raise InvalidInput(
                f"instance {found} is {status}; only a faulted instance (or one whose message died) can be retried"
            )

        self.committer.submit(retry, (_ring_topic_for_queue(WORKFLOW_QUEUE),))
        return self.instance(found, journal=False)

    def _cancel_work(self, instance: str, reason: str | None) -> Callable[[sqlite3.Connection], list[str]]:
        node = self.node

        def cancel(conn: sqlite3.Connection) -> list[str]:
            status = conn.execute("SELECT status FROM instances WHERE id = ?", (instance,)).fetchone()[0]
            if status in ("completed", "cancelled"):
                raise InvalidInput(
                    f"instance {instance} is {status} already; only one that has not ended can be cancelled"
                )
            return _cancel_instances(conn, instance, reason, node)

        return cancel

    def cancel(self, instance_id: str, reason: str | None = None) -> Instance:
        """End an instance that has not ended (running, waiting, or faulted) as cancelled: its wait ends,
        its queued runs are dropped and a burst under way commits nothing. The journal records who
        cancelled it and why."""
        found = self.instance(instance_id, journal=False).id
        self.committer.submit(self._cancel_work(found, _check_reason(reason)), _CANCEL_RINGS)
        return self.instance(found)

    async def acancel(self, instance_id: str, reason: str | None = None) -> Instance:
        found = self.instance(instance_id, journal=False).id
        await self.committer.asubmit(self._cancel_work(found, _check_reason(reason)), _CANCEL_RINGS)
        return self.instance(found)

    def prune(
        self, older_than: float | str = KEEP_INSTANCES_DEFAULT, faulted_older_than: float | str | None = None
    ) -> tuple[int, int]:
        """Remove instances that ended (completed or cancelled) more than ``older_than`` ago, faulted
        ones more than ``faulted_older_than`` ago (default: the longer of older_than and 30 days),
        with their journals, and expired kept signals; in small transactions, each a short turn at
        the writer. Returns (instances removed, kept signals removed)."""
        ended = parse_duration(older_than, "older_than")
        faulted = (
            max(ended, KEEP_FAULTED_DEFAULT)
            if faulted_older_than is None
            else parse_duration(faulted_older_than, "faulted_older_than")
        )
        instances = signals = 0
        more = True
        while more:
            now = time.time()
            removed, expired, more = self.committer.submit(
                functools.partial(prune_ended_batch, ended_before=now - ended, faulted_before=now - faulted)
            )
            instances, signals = instances + removed, signals + expired
        return instances, signals

    def _ended_or_pause(self, instance_id: str, deadline: float | None) -> tuple[Instance, float | None]:
        """The instance, and how long to wait for a ring before looking again (None: stop waiting)."""
        found = self.instance(instance_id, journal=False)
        left = 3600.0 if deadline is None else deadline - time.monotonic()
        if found.status in ENDED_STATUSES or left <= 0:
            return found, None
        return found, min(left, self.store.settings.poll_interval)

    def _deadline(self, timeout: float | str | None) -> float | None:
        limit = None if timeout is None else parse_duration(timeout, "timeout")
        self.signals.listen()  # ends are rung: hear them
        return None if limit is None else time.monotonic() + limit

    def wait(self, instance_id: str, timeout: float | str | None = None) -> Instance:
        """Wait until the instance completes or faults (or ``timeout`` runs out); returns it as it is then."""
        deadline = self._deadline(timeout)
        while True:
            seen = self.wakeups.generation(RING_INSTANCES)  # before looking: a ring after it is not lost
            found, pause = self._ended_or_pause(instance_id, deadline)
            if pause is None:
                return found
            self.wakeups.wait(RING_INSTANCES, seen, pause)

    async def await_end(self, instance_id: str, timeout: float | str | None = None) -> Instance:
        deadline = self._deadline(timeout)
        while True:
            seen = self.wakeups.generation(RING_INSTANCES)
            found, pause = self._ended_or_pause(instance_id, deadline)
            if pause is None:
                return found
            await self.wakeups.await_change(RING_INSTANCES, seen, pause)


# Running instances: bursts of steps under the instance lock ---------------------------------------

SETTLED = object()  # what a handler returns when it acked (or nacked) its message itself
INSTANCE_LOCK_PREFIX = "nodeflow.instance:"


class UserCodeEscaped(NodeflowError):
    """A handler or ``call`` function ended by raising what is not an Exception (SystemExit from
    sys.exit(), KeyboardInterrupt, GeneratorExit): it fails its own message, never the node."""


def describe_failure(error: BaseException) -> str:
    """What user code raised, for a journal, a dead letter or a log line: its type and message."""
    return str(error) if isinstance(error, UserCodeEscaped) else f"{type(error).__name__}: {error}"


class DaemonThreads:
    """Threads for blocking calls that never run short: a call finds an idle thread or gets a new one.

    Unlike asyncio's default executor (min(32, CPUs + 4) threads, shared by everything that calls
    to_thread), a call that blocks for ever holds only its own thread: it can starve neither the
    calls queued behind it nor the node's heartbeat and file checks, which use threads of another
    pool. The threads are daemons, never joined at exit, so a stuck one cannot keep a stopping
    process alive; a thread idle for IDLE_SECONDS ends.
    """

    IDLE_SECONDS = 30.0

    def __init__(self, name: str) -> None:
        self.name = name
        self._mutex = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()  # a forked child has none of these threads: it starts afresh
        self._work: SimpleQueue[Callable[[], None]] = SimpleQueue()
        self._idle = 0  # threads waiting for work and not yet promised any

    def submit(self, work: Callable[[], None]) -> None:
        with self._mutex:
            if self._pid != os.getpid():
                self._reset()
            idle = self._idle > 0
            if idle:
                self._idle -= 1  # this work is that thread's now
        self._work.put(work)
        if not idle:
            threading.Thread(target=self._serve, name=self.name, daemon=True).start()

    def _serve(self) -> None:
        work: Callable[[], None] | None = self._work.get()
        while work is not None:
            work()
            with self._mutex:
                self._idle += 1
            work = None
            while work is None:
                try:
                    work = self._work.get(timeout=self.IDLE_SECONDS)
                except Empty:
                    with self._mutex:
                        if self._idle > 0:  # not promised to a call on its way: this thread may go
                            self._idle -= 1
                            return


_NODEFLOW_THREADS = DaemonThreads("nodeflow-work")  # the library's own blocking calls (file checks, peers)


async def run_in_thread(function: Callable[..., T], *args: Any, threads: DaemonThreads = _NODEFLOW_THREADS) -> T:
    """Run a blocking function in one of ``threads`` and await its result, off the event loop.

    A cancelled caller stops waiting at once; the thread's late result is dropped. Whatever the
    function raises comes back as an Exception: sys.exit() in user code must not end the event
    loop. The caller's context variables are seen in the thread (current_call(), say).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def work() -> None:
        outcome: Any
        try:
            ok, outcome = True, context.run(function, *args)
        except Exception as error:
            ok, outcome = False, error
        except BaseException as error:
            ok, outcome = False, UserCodeEscaped(f"{type(error).__name__}: {error}")
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_settle_future, future, ok, outcome)

    threads.submit(work)
    return await future


class UserThreads:
    """Counts the application's functions (handlers, ``call`` functions, cpu ``work``) running in threads.

    A thread cannot be cancelled: when a node stops, one may still run after the grace period
    although its message was handed back. The count lets ``serve`` leave without waiting for it.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self.running = 0
        self._threads = DaemonThreads("nodeflow-user")  # never the threads the node's own work uses

    def wrap(self, function: Callable[..., T]) -> Callable[..., T]:
        def run(*args: Any) -> T:
            with self._mutex:
                self.running += 1
            try:
                return function(*args)
            finally:
                with self._mutex:
                    self.running -= 1

        return run

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """Run user code in a thread of its own (see DaemonThreads), counted while it runs."""
        return await run_in_thread(self.wrap(function), *args, threads=self._threads)


class _StaleInstance(NodeflowError):
    """The instance moved on, or a later lock holder wrote it: this burst's commit is refused."""


_UNSET = object()  # a variable that did not exist before a step set it


class _Thread:
    """One path through an instance's activities: its main path (name ""), or a branch that a
    parallel or for_each activity forked (a row of ``branches``). Each waits on its own: a timer, a
    signal, a child instance, a call's next try, or the branches it forked; a burst runs every
    path that can go on, one after the other, under the one instance lock."""

    def __init__(
        self,
        name: str,
        fork: str | None,
        position: str | None,
        bookmark: str | None = None,
        waiting_for: str | None = None,
        wake_at: float | None = None,
        resume: Any = None,
        attempt: int = 0,
        child: str | None = None,
        locals_: dict[str, Any] | None = None,
        forked: dict[str, Any] | None = None,
        call_first: int | None = None,
        path_steps: int = 0,
    ) -> None:
        self.name, self.fork, self.position, self.bookmark = name, fork, position, bookmark
        self.waiting_for, self.wake_at, self.resume, self.attempt = waiting_for, wake_at, resume, attempt
        self.child, self.locals, self.forked = child, dict(locals_ or {}), forked
        self.call_first = call_first  # the path step of the first try of the call it is at: its key
        self.path_steps = path_steps  # steps this path has begun: a lost burst run again numbers them alike
        self.ended = False  # its chain ran out (a branch) or the instance completed (the main path)
        self.removed = False  # a branch that ended or was cancelled: its row goes
        self.start_child: tuple[str, int, str] | None = None  # (definition, version, variables): the commit starts it
        self.child_row: int | None = None  # the journal step that says so, to which the commit adds the child's id
        self.began_signal_wait: int | None = None  # the journal step of a signal wait begun now (a kept one may end it)
        self.loaded: tuple[Any, ...] | None = None  # its row as read, to write it back only when it changed

    def due(self, now: float) -> bool:
        return self.wake_at is not None and self.wake_at <= now + 0.001

    def runnable(self, now: float) -> bool:
        """Whether its next step can run now."""
        if self.ended or self.removed:
            return False
        if self.bookmark is None:
            return True
        if self.bookmark == "fork":
            return False  # its branches resume it when they join
        if self.bookmark in ("signal", "child"):
            return self.resume is not None or self.due(now)  # it came, or the wait timed out
        return self.due(now)  # a timer, or a call's next try

    def row(self) -> tuple[Any, ...]:
        """Its branches row, less the instance."""
        return (
            self.name, self.fork or "", self.position, self.bookmark, self.waiting_for, self.wake_at,
            None if self.resume is None else json.dumps(self.resume), self.attempt, self.child,
            json.dumps(self.locals), None if self.forked is None else json.dumps(self.forked), self.call_first,
            self.path_steps,
        )  # fmt: skip


_BRANCH_COLUMNS = (
    "name, fork, position, bookmark, waiting_for, wake_at, resume, attempt, child, locals, forked, call_first, "
    "path_steps"
)


class _Burst:
    """The state of an instance as one burst of steps changes it, committed all at once.

    ``stored`` is the variables' JSON as they will be committed: every step that writes variables
    checks the new ones (size, depth) at once and stores them, or is undone and faults the instance
    at that step, so the journal and the variables committed never disagree. Branches see the
    variables too, with their own (``locals``: a for_each item) over them.
    """

    def __init__(self, row: tuple[Any, ...], blueprint: Blueprint, branches: Iterable[tuple[Any, ...]] = ()) -> None:
        (self.id, self.seq, self.status, position, self.stored, attempt, bookmark, waiting_for, wake_at, resume,
         self.steps) = row[:11]  # fmt: skip
        self.unwaited: int = row[13] if len(row) > 13 else 0  # steps since its last wait (a timer, a signal)
        self.parent: str | None = row[14] if len(row) > 14 else None  # whose run activity started it
        child: str | None = row[15] if len(row) > 15 else None
        forked: str | None = row[16] if len(row) > 16 else None
        call_first: int | None = row[17] if len(row) > 17 else None
        path_steps: int | None = row[18] if len(row) > 18 else None
        self.broken: str | None = None  # why its stored state cannot be read (then it faults, changing nothing)
        self.variables: dict[str, Any] = {}
        self.first = position is None  # the first burst: the definition's variables, then the input over them
        main_steps = self.steps if path_steps is None else path_steps  # (None: stored before paths counted)
        self.main = _Thread("", None, position, bookmark, waiting_for, wake_at, None, attempt, child,
                            call_first=call_first, path_steps=main_steps)  # fmt: skip
        self.threads = [self.main]
        try:
            self.variables = json.loads(self.stored)
            self.main.resume = None if resume is None else json.loads(resume)
            self.main.forked = None if forked is None else json.loads(forked)
            for branch in branches:
                thread = _Thread(
                    branch[0], branch[1], branch[2], branch[3], branch[4], branch[5],
                    None if branch[6] is None else json.loads(branch[6]), branch[7], branch[8], json.loads(branch[9]),
                    None if branch[10] is None else json.loads(branch[10]), branch[11], branch[12],
                )  # fmt: skip
                thread.loaded = thread.row()
                self.threads.append(thread)
        except (ValueError, RecursionError, IndexError, TypeError) as error:
            self.broken = f"its stored state cannot be read ({type(error).__name__}: {error})"
        if self.first:
            self.variables = {**json.loads(json.dumps(blueprint.variables)), **self.variables}
            self.main.position = blueprint.start
        self.error: str | None = None
        self.journal: list[tuple[Any, ...]] = []  # (step, activity, type, started, ended, outcome, branch)
        self.next_step: int = self.steps  # steps are numbered as they begin: branches' steps may end in another order
        self.budget = BURST_MAX_STEPS
        self.run_again_at: float | None = None  # when to send the next run message (None: no message)
        self.cancel_children: list[str] = []  # children nothing waits for now: the commit cancels them
        self.definition = blueprint.id
        self.fence = 0  # the instance lock's fence for this burst

    @property
    def position(self) -> str | None:
        return self.main.position

    def thread(self, name: str) -> _Thread | None:
        return next((thread for thread in self.threads if thread.name == name and not thread.removed), None)

    def view(self, thread: _Thread) -> dict[str, Any]:
        """The variables as ``thread``'s steps read them: the instance's, under the for_each items of
        the branches it was forked from, under its own (read through the chain, never copied down)."""
        chain: list[dict[str, Any]] = []
        current: _Thread | None = thread
        while current is not None and current.name:
            if current.locals:
                chain.append(current.locals)
            current = self.thread(current.fork or "")
        if not chain:
            return self.variables
        merged = dict(self.variables)
        for own in reversed(chain):
            merged.update(own)
        return merged

    def held_bytes(self) -> int:
        """What its live branches hold of their own: for_each items, and the lists of for_each in turn."""
        return sum(
            len(json.dumps(thread.locals)) + (len(json.dumps(thread.forked)) if thread.forked else 0)
            for thread in self.threads
            if not thread.removed
        )

    def live_branches(self) -> list[_Thread]:
        return [thread for thread in self.threads[1:] if not thread.removed]


class WorkflowRunner:
    """Runs instances for a node: the handler of WORKFLOW_QUEUE's messages.

    A "run" message names an instance and the sequence number it expects. The runner takes the
    instance lock, takes a fence, re-reads the instance and its branches, runs the steps of every
    path that can go on (side by side) until each waits or ends, or BURST_MAX_STEPS are run, and
    commits state, branches, journal, follow-up message and the ack in one transaction, refused
    unless the sequence number and fence still hold. A crash before that commit leaves the message
    to run again from the last committed state: no step is committed twice (a ``call`` whose burst
    was lost does run again, under the same key; make such functions idempotent).
    """

    def __init__(
        self,
        workflows: Workflows,
        bus: Bus,
        locks: LockManager,
        node: str,
        functions: dict[str, Callable[[dict[str, Any]], Any]],
        say: Callable[[str], None],
        threads: UserThreads | None = None,
        holder_stalled: Callable[[sqlite3.Connection, LockInfo], bool] | None = None,
    ) -> None:
        self.workflows, self.bus, self.locks, self.node = workflows, bus, locks, node
        self.functions, self.say = functions, say
        self.threads = threads or UserThreads()
        self.holder_stalled = holder_stalled  # judges an instance lock's holder frozen: its lock is taken
        self.bursts = 0
        self.steps = 0
        self.requeued = 0

    # Messages -----------------------------------------------------------------------------

    async def handle(self, message: Message) -> object:
        body = message.body
        if isinstance(body, dict) and isinstance(body.get("start"), str):
            await self._start(message, body)
        elif isinstance(body, dict) and isinstance(body.get("run"), str) and isinstance(body.get("seq"), int):
            await self._run(message, body["run"], body["seq"])
        else:
            self.say(f"dropped message {message.id} of {WORKFLOW_QUEUE}: not a workflow message")
            await self.bus.aack(message)
        return SETTLED

    async def _start(self, message: Message, body: dict[str, Any]) -> None:
        """A trigger fired (cron, signal): start an instance of the version this node has in use."""
        definition = body["start"]
        data = body.get("input") if isinstance(body.get("input"), dict) else {}
        try:
            version = self.workflows.blueprint(definition).version
        except StoreError:
            raise  # the database is busy, say: the message comes back for another try
        except Exception as error:  # no such definition, or one no node can read: nothing to start
            self.say(f"trigger for workflow {definition!r} dropped: {describe_failure(error)}")
            await self.bus.aack(message)
            return
        variables = encode_body({"input": data}, self.workflows.store.settings.max_body_bytes, VARIABLES_MAX_DEPTH)
        by = f"{self.node} ({body.get('by') or 'trigger'})"
        instance = await self.bus.aack(
            message,
            also=lambda conn: _create_instance(conn, definition, version, variables, by),
            rings=(_ring_topic_for_queue(WORKFLOW_QUEUE),),
        )
        self.say(f"started {definition} v{version} instance {instance} ({body.get('by') or 'trigger'})")

    def _read(self, instance: str) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self.workflows.store.read(
            lambda conn: conn.execute(
                "SELECT id, seq, status, position, variables, attempt, bookmark, waiting_for, wake_at, resume, steps, "
                "definition, version, unwaited, parent, child, forked, call_first, path_steps FROM instances "
                "WHERE id = ?",
                (instance,),
            ).fetchone()
        )
        return row

    def _branches(self, instance: str) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self.workflows.store.read(
            lambda conn: conn.execute(
                f"SELECT {_BRANCH_COLUMNS} FROM branches WHERE instance = ? ORDER BY name", (instance,)
            ).fetchall()
        )
        return rows

    @staticmethod
    def _runnable(row: tuple[Any, ...] | None, seq: int) -> bool:
        # Running or waiting with this seq: the burst runs whatever of it can go on (a timer or a
        # timeout due, a signal come); anything else is stale.
        return row is not None and row[1] == seq and row[2] in ("running", "waiting")

    async def _run(self, message: Message, instance: str, seq: int) -> None:
        if not self._runnable(self._read(instance), seq):
            await self.bus.aack(message)  # a stale duplicate: the instance moved on
            return
        lock_name = INSTANCE_LOCK_PREFIX + instance
        try:
            held = await self._instance_lock(lock_name, instance)
        except LockTimeout:
            # Another burst of it is under way (on a stopped node, say): back in the queue, a fresh
            # delivery count, so waiting for a lock never makes it a dead letter.
            body = encode_body(message.body, self.workflows.store.settings.max_body_bytes)

            def requeue(conn: sqlite3.Connection) -> None:
                now = time.time()
                conn.execute(
                    "INSERT INTO messages (queue, body, priority, available_at, created) VALUES (?, ?, 0, ?, ?)",
                    (WORKFLOW_QUEUE, body, now + 1.0, now),
                )

            await self.bus.aack(message, also=requeue, rings=(_ring_topic_for_queue(WORKFLOW_QUEUE),))
            self.requeued += 1
            return
        try:
            assert held.fence is not None
            row = self._read(instance)  # under the lock, the state to build on
            if not self._runnable(row, seq):
                await self.bus.aack(message)
                return
            assert row is not None
            burst = await self._burst(row, held.fence, message.charged)
            try:
                await self.bus.aack(message, also=self._commit_work(burst, held.fence), rings=self._rings(burst))
            except _StaleInstance as error:
                self.say(f"instance {instance}: {error}")
                await self.bus.aack(message)
                return
            except LeaseLost:  # stopped past its lease: the message went to another node, which runs it
                self.say(f"instance {instance}: burst of fence {held.fence} not committed; its message went elsewhere")
                return
            self.bursts += 1
            self.steps += len(burst.journal)
            if burst.status == "faulted":
                self.say(f"instance {instance} faulted at {burst.position}: {burst.error}")
        finally:
            held.release()

    async def _instance_lock(self, lock_name: str, instance: str) -> HeldLock:
        """The instance lock, waiting INSTANCE_LOCK_WAIT for it; taken from a holder frozen past the
        stall limit (its burst can commit nothing any more: its run message was handed back, and
        its fence is now the lower one), so an instance waits for no frozen node."""
        try:
            return await self.locks.aacquire(lock_name, INSTANCE_LOCK_WAIT)
        except LockTimeout:
            if self.holder_stalled is None:
                raise
            taken = await self.locks.atake_from(lock_name, self.holder_stalled)
            if taken is None:
                raise
        self.say(
            f"instance {instance}: took its lock from node {taken.node} (pid {taken.pid}), which is stalled; "
            "its burst there will not commit"
        )
        return await self.locks.aacquire(lock_name, INSTANCE_LOCK_WAIT)

    @staticmethod
    def _rings(burst: _Burst) -> tuple[str, ...]:
        rings = []
        if (
            burst.run_again_at is not None
            or any(thread.began_signal_wait is not None or thread.start_child for thread in burst.threads)
            or (burst.parent is not None and burst.status in ENDED_STATUSES)  # its parent goes on
        ):
            rings.append(_ring_topic_for_queue(WORKFLOW_QUEUE))
        if burst.status in ENDED_STATUSES:
            rings.append(RING_INSTANCES)
        return tuple(rings)

    def _commit_work(self, burst: _Burst, fence: int) -> Callable[[sqlite3.Connection], None]:
        node = self.node
        ended = time.time() if burst.status == "completed" else None
        journal = [
            (burst.id, step, activity, kind, node, fence, started, finished, outcome, branch)
            for step, activity, kind, started, finished, outcome, branch in sorted(burst.journal)
        ]
        index_of = {row[1]: index for index, row in enumerate(journal)}
        steps = burst.steps + len(journal)

        def commit(conn: sqlite3.Connection) -> None:
            # Work on copies: a busy database runs this again from the start.
            now = time.time()
            status, run_at = burst.status, burst.run_again_at
            rows = list(journal)
            live = [thread for thread in burst.threads if not thread.removed]
            state = {id(t): (t.child, t.waiting_for, t.wake_at, t.resume) for t in live}
            for thread in live:
                child, waiting_for, wake_at, resume = state[id(thread)]
                if thread.start_child is not None:
                    definition, version, variables = thread.start_child
                    by = f"{node} (run by {burst.id} at {thread.position})"
                    child = _create_instance(conn, definition, version, variables, by, parent=burst.id)
                    if thread.child_row in index_of:
                        at = index_of[thread.child_row]
                        rows[at] = (*rows[at][:-2], f"{rows[at][-2]}: instance {child}", rows[at][-1])
                if waiting_for is not None and thread.began_signal_wait in index_of and status != "faulted":
                    kept = _take_kept_signal(conn, waiting_for, now)  # sent before it got here
                    if kept is not None:
                        waiting_for, wake_at, resume = None, None, json.loads(kept[0])
                        status, run_at = "running", now
                        at = index_of[thread.began_signal_wait]
                        said = f"{rows[at][-2]}: it was sent at {_iso_text(kept[1])} and kept; resumed"
                        rows[at] = (*rows[at][:-2], said, rows[at][-1])
                state[id(thread)] = (child, waiting_for, wake_at, resume)
            main = burst.main
            child, waiting_for, wake_at, resume = state[id(main)]
            changed = conn.execute(
                "UPDATE instances SET status = ?, position = ?, variables = ?, seq = seq + 1, fence = ?, "
                "steps = steps + ?, attempt = ?, bookmark = ?, waiting_for = ?, wake_at = ?, resume = ?, "
                "error = ?, updated = ?, ended = ?, unwaited = ?, child = ?, forked = ?, call_first = ?, "
                "path_steps = ? WHERE id = ? AND seq = ? AND fence < ?",
                (status, main.position, burst.stored, fence, len(rows), main.attempt, main.bookmark,
                 waiting_for, wake_at, None if resume is None else json.dumps(resume), burst.error, now, ended,
                 burst.unwaited, child, None if main.forked is None else json.dumps(main.forked), main.call_first,
                 main.path_steps, burst.id, burst.seq, fence),
            ).rowcount  # fmt: skip
            if not changed:
                raise _StaleInstance(
                    f"burst of fence {fence} not committed: the instance moved past seq {burst.seq} meanwhile"
                )
            live_names = {thread.name for thread in live if thread is not main}
            gone = {thread.name for thread in burst.threads[1:] if thread.removed} - live_names
            conn.executemany("DELETE FROM branches WHERE instance = ? AND name = ?", [(burst.id, n) for n in gone])
            writes = []
            for thread in live:
                if thread is main:
                    continue
                child, waiting_for, wake_at, resume = state[id(thread)]
                saved = list(thread.row())
                saved[4], saved[5], saved[8] = waiting_for, wake_at, child
                saved[6] = None if resume is None else json.dumps(resume)
                if tuple(saved) != thread.loaded:
                    writes.append((burst.id, *saved))
            conn.executemany(
                f"INSERT OR REPLACE INTO branches (instance, {_BRANCH_COLUMNS}) VALUES ({', '.join('?' * 14)})",
                writes,
            )
            conn.executemany(
                "INSERT INTO journal (instance, step, activity, type, node, fence, started, ended, outcome, branch) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            if steps > JOURNAL_KEEP_STEPS:  # a long-lived loop: its oldest steps go, the journal stays bounded
                conn.execute(
                    "DELETE FROM journal WHERE instance = ? AND step < ?", (burst.id, steps - JOURNAL_KEEP_STEPS)
                )
            if run_at is not None and status not in ENDED_STATUSES:
                message = _run_message(conn, burst.id, burst.seq + 1, run_at, now)
                if run_at > now:  # a timer or timeout that a signal or a child's end may make needless
                    conn.execute("UPDATE instances SET wake_message = ? WHERE id = ?", (message, burst.id))
            for child_id in burst.cancel_children:  # after our own rows: its end then finds nothing waiting
                _cancel_instances(conn, child_id, f"its parent {burst.id} stopped waiting for it", node)
            if status in ("completed", "faulted"):
                _resume_parent(conn, burst.id, burst.parent, status, burst.stored, burst.error)
            if status == "completed":  # it never runs again: its fence counter and branches can go
                conn.execute("DELETE FROM lock_fences WHERE name = ?", (INSTANCE_LOCK_PREFIX + burst.id,))
                conn.execute("DELETE FROM branches WHERE instance = ?", (burst.id,))

        return commit

    # Steps --------------------------------------------------------------------------------

    async def _burst(self, row: tuple[Any, ...], fence: int, deliveries: int = 1) -> _Burst:
        definition, version = row[11:13]
        branches = self._branches(row[0])
        try:
            blueprint = self.workflows.blueprint(definition, version)
        except StoreError:
            raise  # the database is busy, say: the run message comes back for another try
        except Exception as error:  # gone, or stored by an older nodeflow in a form no node can read now
            burst = _Burst(row, _EMPTY_BLUEPRINT, branches)
            burst.status, burst.error = "faulted", f"cannot load workflow {definition} v{version}: {error}"
            burst.main.position = row[3]  # where it was: a retry after the definition is mended starts there
            return burst
        burst = _Burst(row, blueprint, branches)
        burst.status, burst.fence = "running", fence
        limit = BURST_DELIVERY_FACTOR * self.workflows.store.settings.max_deliveries
        if burst.broken is None and burst.first:
            burst.broken = self._store_variables(burst)
        if burst.broken is None and deliveries > limit:
            burst.broken = (
                f"no node finished a burst of it in {deliveries - 1} deliveries (each died, was stopped or could not "
                "commit); see the node logs, then retry it"
            )
        if burst.broken is not None:
            self._fault_before(burst, blueprint, burst.broken)
            if burst.first and burst.stored == row[4]:
                burst.main.position = None  # its start was never stored: a retry begins it afresh
            return burst
        while burst.status == "running" and burst.budget > 0:
            ready = [thread for thread in burst.threads if thread.runnable(time.time())]
            if not ready:
                break
            # Side by side: one branch's wait (io work, a call) overlaps the others' steps. Each runs to
            # its end before an error of another is raised: none goes on changing a burst given up.
            outcomes = await asyncio.gather(
                *(self._run_thread(burst, blueprint, thread) for thread in ready), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        if burst.status == "running":
            self._settle(burst)
        return burst

    @staticmethod
    def _settle(burst: _Burst) -> None:
        """After its steps: when the instance runs next, and whether it is waiting meanwhile."""
        now = time.time()
        live = [thread for thread in burst.threads if not thread.removed and not thread.ended]
        if any(thread.runnable(now) for thread in live):
            burst.run_again_at = now  # a long run of steps: let other instances have a turn
            return
        wakes = [thread.wake_at for thread in live if thread.wake_at is not None]
        burst.run_again_at = min(wakes) if wakes else None
        retrying = any(thread.bookmark == "retry" for thread in live)
        burst.status = "running" if retrying else "waiting"

    async def _run_thread(self, burst: _Burst, blueprint: Blueprint, thread: _Thread) -> None:
        """Run ``thread``'s steps until it waits, ends or faults, or the burst's budget of steps is spent."""
        while burst.budget > 0 and burst.status == "running" and thread.runnable(time.time()):
            activity = blueprint.activities.get(thread.position or "")
            if activity is None:
                self._fault(
                    burst, thread, None, f"no activity {thread.position!r} in {blueprint.id} v{blueprint.version}"
                )
                return
            burst.budget -= 1
            step, started = self._reserve(burst), time.time()
            path_step, thread.path_steps = thread.path_steps, thread.path_steps + 1
            if burst.unwaited >= BUSY_LOOP_MAX_STEPS:  # the steps of this burst so far stand, journaled
                self._fault(
                    burst, thread, (activity, step, started),
                    f"it ran {burst.unwaited} steps without a wait (a timer or a signal): a loop with no way out? "
                    "Fix the definition and retry it, or cancel it",
                )  # fmt: skip
                return
            try:
                following, outcome = await self._step(burst, thread, activity, (step, path_step))
            except _Fault as error:
                said = f"{'failed' if isinstance(error, _Failed) else 'faulted'}: {error}"
                self._fault(burst, thread, (activity, step, started), str(error), said)
                return
            except _CallFailed as error:
                attempts, delay = activity.spec["retry"]
                thread.attempt += 1
                burst.unwaited += 1
                if thread.attempt < attempts:
                    wait = min(3600.0, delay * 2 ** (thread.attempt - 1))
                    thread.bookmark, thread.wake_at = "retry", time.time() + wait
                    outcome = f"error (try {thread.attempt} of {attempts}; next in {_format_seconds(wait)}): {error}"
                    burst.error = str(error)
                    self._journal(burst, thread, activity, step, started, outcome)
                else:
                    self._fault(
                        burst, thread, (activity, step, started), str(error), f"faulted after {attempts} tries: {error}"
                    )
                return
            except Exception as error:  # a bug of ours, or a value nothing foresaw: this instance faults, not the node
                log.exception("instance %s: activity %s failed", burst.id, activity.id)
                self._fault(
                    burst, thread, (activity, step, started),
                    f"activity {activity.id} failed unexpectedly: {type(error).__name__}: {error}",
                )  # fmt: skip
                return
            self._journal(burst, thread, activity, step, started, outcome)
            if thread.start_child is not None and thread.child_row is None:
                thread.child_row = step
            if thread.bookmark == "signal" and thread.waiting_for is not None and thread.began_signal_wait is None:
                thread.began_signal_wait = step
            burst.unwaited = 0 if thread.bookmark in ("timer", "signal", "child") else burst.unwaited + 1
            if thread.removed or thread.bookmark is not None:
                return  # removed while its step ran (a join any): the step stands, the branch goes no further
            # It moves on even when a sibling faulted meanwhile: a retry must not run this step again.
            thread.attempt, thread.call_first = 0, None
            if (
                burst.status == "running"
                and burst.error is not None
                and not any(other.bookmark == "retry" for other in burst.threads)
            ):
                burst.error = None
            if following is None:
                self._end_thread(burst, blueprint, thread)
                return
            thread.position = following

    @staticmethod
    def _reserve(burst: _Burst) -> int:
        step = burst.next_step
        burst.next_step += 1
        return step

    @staticmethod
    def _journal(
        burst: _Burst, thread: _Thread, activity: BlueprintActivity, step: int, started: float, outcome: str
    ) -> None:
        burst.journal.append(
            (step, activity.id, activity.type, started, time.time(), outcome[:2000], thread.name or None)
        )

    def _fault(
        self,
        burst: _Burst,
        thread: _Thread,
        at: tuple[BlueprintActivity, int, float] | None,
        error: str,
        outcome: str | None = None,
    ) -> None:
        """The instance faults at ``thread``'s activity (a branch's, named in the error); a retry runs it
        again. ``at``: the activity, its step and when it began, for the journal."""
        burst.status = "faulted"
        burst.error = (error if not thread.name else f"branch {thread.name} at {thread.position}: {error}")[:2000]
        if at is not None:
            activity, step, started = at
            self._journal(burst, thread, activity, step, started, outcome or f"faulted: {error}")

    def _end_thread(self, burst: _Burst, blueprint: Blueprint, thread: _Thread) -> None:
        """``thread``'s chain ran out: the main path completes the instance; a branch joins its fork."""
        if thread is burst.main and burst.status != "running":
            return  # a sibling faulted meanwhile: it completes once a retry gets it here again
        thread.ended, thread.position = True, None
        if thread is burst.main:
            burst.status = "completed"
            for branch in burst.live_branches():  # a chain that ran back into the main path: nothing waits now
                self._remove_branch(burst, branch)
            return
        thread.removed = True
        forker = burst.thread(thread.fork or "")
        if forker is not None and forker.forked is not None:  # else its fork was cancelled meanwhile
            self._join(burst, blueprint, forker, thread)

    def _join(self, burst: _Burst, blueprint: Blueprint, forker: _Thread, ended: _Thread) -> None:
        state = forker.forked or {}
        siblings = [branch for branch in burst.live_branches() if branch.fork == forker.name]
        if state.get("join") == "any":
            for branch in siblings:
                self._remove_branch(burst, branch)
            said = f"joined: branch {ended.name} ended first" + (f"; {len(siblings)} cancelled" if siblings else "")
        elif state.get("items") is not None and state["next_item"] < len(state["items"]):
            index = state["next_item"]
            state["next_item"] = index + 1
            self._fork_branch(burst, forker, state["body"], index, {state["as"]: state["items"][index]})
            return
        elif siblings:
            return
        else:
            said = f"joined: all {state.get('count', 0)} branch(es) ended"
        activity = blueprint.activities[forker.position or ""]
        forker.bookmark, forker.forked = None, None
        forker.path_steps += 1  # the join is a step of the path that forked
        self._journal(burst, forker, activity, self._reserve(burst), time.time(), said)
        if activity.next is None:
            self._end_thread(burst, blueprint, forker)
        else:
            forker.position = activity.next

    def _remove_branch(self, burst: _Burst, branch: _Thread) -> None:
        """A branch nothing waits for now (join any, the instance completed): gone with its wait, its
        child instance cancelled, and the branches it forked with it."""
        branch.removed = True
        if branch.child is not None:
            burst.cancel_children.append(branch.child)
        for nested in burst.live_branches():
            if nested.fork == branch.name:
                self._remove_branch(burst, nested)

    @staticmethod
    def _fork_branch(burst: _Burst, forker: _Thread, start: str, index: int, locals_: dict[str, Any]) -> None:
        activity = (forker.forked or {}).get("activity", "fork")
        name = f"{forker.name + '/' if forker.name else ''}{activity}/{index}"
        for stale in burst.threads[1:]:  # a fork run again in a loop reuses its branches' names
            if stale.name == name:
                stale.removed = True
        burst.threads.append(_Thread(name, forker.name, start, locals_=locals_))

    @staticmethod
    def _fault_before(burst: _Burst, blueprint: Blueprint, error: str) -> _Burst:
        """Fault the instance where it stands, before any step of this burst: nothing else changes."""
        burst.status, burst.error = "faulted", error
        burst.journal.clear()
        activity = blueprint.activities.get(burst.position or "")
        if activity is not None:
            now = time.time()
            burst.journal.append((burst.steps, activity.id, activity.type, now, now, f"faulted: {error}"[:2000], None))
            burst.main.path_steps += 1
        return burst

    def _store_variables(self, burst: _Burst, undo: dict[str, Any] | None = None) -> str | None:
        """Check the variables as a step left them and keep their JSON for the commit; None if they
        can be stored. Else the step's writes are undone (``undo``: each name's value before it, or
        _UNSET) and the reason is returned."""
        try:
            burst.stored = encode_body(
                burst.variables, self.workflows.store.settings.max_body_bytes, VARIABLES_MAX_DEPTH
            )
            return None
        except InvalidInput as error:
            for name, value in (undo or {}).items():
                if value is _UNSET:
                    burst.variables.pop(name, None)
                else:
                    burst.variables[name] = value
            return f"variables: {error}"

    def _write_variables(self, burst: _Burst, values: dict[str, Any], thread: _Thread | None = None) -> None:
        """Set variables for a step, checked at once: a _Fault (with the step undone) when they could
        not be stored. A for_each item is written where it lives: in the nearest branch (this one, or
        one it was forked from) that holds it; the rest are the instance's."""
        holder: _Thread | None = thread
        while values and holder is not None and holder.name:
            own = {name: value for name, value in values.items() if name in holder.locals}
            if own:
                merged = {**holder.locals, **own}
                try:
                    encode_body(merged, self.workflows.store.settings.max_body_bytes, VARIABLES_MAX_DEPTH)
                except InvalidInput as error:
                    raise _Fault(f"variables: {error}") from None
                if burst.held_bytes() - len(json.dumps(holder.locals)) + len(json.dumps(merged)) > (
                    self.workflows.store.settings.max_body_bytes
                ):
                    raise _Fault("variables: its branches' for_each items would outgrow the variables' limit")
                holder.locals.update(own)
                values = {name: value for name, value in values.items() if name not in own}
            holder = burst.thread(holder.fork or "")
        undo = {name: burst.variables.get(name, _UNSET) for name in values}
        burst.variables.update(values)
        problem = self._store_variables(burst, undo)
        if problem is not None:
            raise _Fault(problem)

    async def _step(
        self, burst: _Burst, thread: _Thread, activity: BlueprintActivity, steps: tuple[int, int]
    ) -> tuple[str | None, str]:
        """Run one activity of ``thread``; returns where it goes next and the journal's outcome."""
        spec, variables = activity.spec, burst.view(thread)
        limit = self.workflows.store.settings.max_body_bytes  # no text a step makes may outgrow the variables
        if thread.bookmark == "retry":  # a call's next try: the activity runs again
            thread.bookmark, thread.wake_at = None, None
        elif thread.bookmark is not None:  # the wait this activity began is over
            kind, thread.bookmark, thread.wake_at = thread.bookmark, None, None
            received, thread.resume = thread.resume, None
            if kind == "child":
                return self._child_ended(burst, thread, activity, received)
            if kind == "signal" and received is None:  # no signal came (one that does now finds it gone)
                text = f"timed out after {_format_seconds(spec['timeout'])} waiting for signal {thread.waiting_for}"
                thread.waiting_for = None
                if spec.get("on_timeout") is None:
                    raise _Fault(f"{text}; give the activity on_timeout to go on instead")
                return spec["on_timeout"], f"{text}: on to {spec['on_timeout']}"
            if kind == "signal":
                thread.waiting_for = None
                self._write_variables(burst, {spec.get("result") or activity.id: received}, thread)
                return activity.next, "signal received"
            return activity.next, "timer elapsed"
        kind = activity.type
        if kind == "log":
            text = spec["message"].render(variables, limit)
            where = f" ({thread.name})" if thread.name else ""
            self.say(f"{burst.definition} {burst.id} {activity.id}{where}: {text[:2000]}")
            return activity.next, text
        if kind == "set":
            values: dict[str, Any] = {}
            view = dict(variables)  # a later value may read an earlier one of the same step
            for name, value in (spec.get("values") or {}).items():
                view[name] = values[name] = value.value(view, limit) if isinstance(value, Template) else value
            for name, amount in (spec.get("add") or {}).items():
                current = view.get(name, 0)
                if isinstance(current, bool) or not isinstance(current, (int, float)):
                    raise _Fault(f"cannot add {amount} to {name}: it is {_json_kind(current)}")
                view[name] = values[name] = current + amount
            self._write_variables(burst, values, thread)
            return activity.next, "set " + ", ".join([*(spec.get("values") or {}), *(spec.get("add") or {})])
        if kind == "if":
            holds = evaluate_condition(spec["condition"], variables)
            branch = spec.get("then" if holds else "else") or activity.next
            return branch, f"{'true' if holds else 'false'}: {branch or 'end'}"
        if kind in ("timer", "start_at"):
            if kind == "timer":
                due = time.time() + spec["duration"]
            else:
                text = spec["at"].render(variables, limit)
                try:
                    due = check_due(parse_time(text, f"{activity.id}.at"), f"{activity.id}.at")
                except InvalidInput as error:
                    raise _Fault(str(error)) from None
            if due <= time.time():
                return activity.next, "due already"
            thread.bookmark, thread.wake_at = "timer", due
            return None, f"waiting until {_iso_text(due)}"
        if kind == "signal":
            name = spec["name"].render(variables, limit)
            try:
                check_signal_name(name)
            except InvalidInput as error:
                raise _Fault(str(error)) from None
            thread.bookmark, thread.waiting_for, thread.resume = "signal", name, None
            thread.began_signal_wait = None
            if spec.get("timeout") is None:
                return None, f"waiting for signal {name}"
            thread.wake_at = time.time() + spec["timeout"]
            return None, f"waiting for signal {name} until {_iso_text(thread.wake_at)}"
        if kind == "call":
            # Its key stays its path's step of the first try, over every try and every burst that runs
            # it again (a branch's tries are not consecutive journal steps: others' come between).
            step, path_step = steps  # its journal step, and its path's
            if thread.attempt == 0 or thread.call_first is None:  # (a try stored before keys were kept: as then)
                thread.call_first = path_step - thread.attempt
            context = CallContext(
                burst.id, activity.id, step, burst.fence, self.node, thread.call_first, thread.name or None
            )
            result = await self._call(spec["function"], variables, context)
            self._write_variables(burst, {spec.get("result") or activity.id: result}, thread)
            return activity.next, f"called {spec['function']}"
        if kind == "run":
            return await self._start_child(burst, thread, activity)
        if kind in ("parallel", "for_each"):
            return self._fork(burst, thread, activity, variables, limit)
        if kind == "fail":
            raise _Failed(spec["message"].render(variables, limit))
        if kind == "work":
            seconds = spec["duration"]
            if spec.get("kind") == "cpu":
                stop = threading.Event()
                try:
                    await self.threads.run(_spin, seconds, stop)
                finally:
                    stop.set()  # cancelled (the node stops): the thread ends within a slice, not after seconds
            else:
                await asyncio.sleep(seconds)
            return activity.next, f"worked {_format_seconds(seconds)} ({spec.get('kind') or 'io'})"
        raise _Fault(f"unknown activity type {kind!r}")

    def _fork(
        self, burst: _Burst, thread: _Thread, activity: BlueprintActivity, variables: dict[str, Any], limit: int
    ) -> tuple[str | None, str]:
        """A parallel or for_each activity: ``thread`` waits at it for the branches it forks."""
        spec = activity.spec
        live = len(burst.live_branches())
        if activity.type == "parallel":
            starts, join = spec["branches"], spec.get("join") or "all"
            if live + len(starts) > INSTANCE_MAX_BRANCHES:
                raise _Fault(f"{live + len(starts)} branches at once; an instance has {INSTANCE_MAX_BRANCHES} at most")
            thread.bookmark = "fork"
            thread.forked = {"activity": activity.id, "join": join, "count": len(starts)}
            for index, start in enumerate(starts):
                self._fork_branch(burst, thread, start, index, {})
            return None, f"forked {len(starts)} branch(es): {', '.join(starts)} (join {join})"
        items = spec["items"].value(variables, limit)
        if not isinstance(items, list):
            raise _Fault(f"items must be a list, and {spec['items']!r} is {_json_kind(items)}")
        if len(items) > FOR_EACH_MAX_ITEMS:
            raise _Fault(f"{len(items)} items; a for_each goes through {FOR_EACH_MAX_ITEMS} at most")
        if not items:
            return activity.next, "no items"
        name, body, parallel = spec["as"], spec["body"], bool(spec.get("parallel"))
        if live + (len(items) if parallel else 1) > INSTANCE_MAX_BRANCHES:
            raise _Fault(f"more than {INSTANCE_MAX_BRANCHES} branches at once, the most an instance has")
        # Branches keep their items apart from the variables: all of them together are held to the
        # variables' limit too, or nested for_each over one large list would copy it many times.
        held = burst.held_bytes() + len(json.dumps(items)) * (1 if parallel else 2)
        if held > self.workflows.store.settings.max_body_bytes:
            raise _Fault(
                f"its branches would hold {held} bytes of for_each items; the most is "
                f"{self.workflows.store.settings.max_body_bytes}, as for its variables"
            )
        thread.bookmark = "fork"
        if parallel:
            thread.forked = {"activity": activity.id, "join": "all", "count": len(items)}
            for index, item in enumerate(items):
                self._fork_branch(burst, thread, body, index, {name: item})
            return None, f"{len(items)} item(s), in parallel"
        thread.forked = {
            "activity": activity.id, "join": "all", "count": len(items), "items": items, "next_item": 1,
            "as": name, "body": body,
        }  # fmt: skip
        self._fork_branch(burst, thread, body, 0, {name: items[0]})
        return None, f"{len(items)} item(s), in turn"

    async def _start_child(self, burst: _Burst, thread: _Thread, activity: BlueprintActivity) -> tuple[str | None, str]:
        """A run activity: the child instance is made by the commit that begins this wait, so a burst
        that never commits starts no child."""
        spec, settings = activity.spec, self.workflows.store.settings
        definition = spec["definition"]
        try:
            blueprint = self.workflows.blueprint(definition)
        except StoreError:
            raise
        except NodeflowError as error:
            raise _Fault(f"cannot run workflow {definition}: {error}") from None
        depth = await run_in_thread(self._depth, burst.id)
        if depth >= CHILD_MAX_DEPTH:
            raise _Fault(f"instances run by run activities nest {depth} deep here; the most is {CHILD_MAX_DEPTH}")
        view = burst.view(thread)
        given = {
            name: value.value(view, settings.max_body_bytes) if isinstance(value, Template) else value
            for name, value in (spec.get("input") or {}).items()
        }
        try:
            variables = encode_body({"input": given}, settings.max_body_bytes, VARIABLES_MAX_DEPTH)
        except InvalidInput as error:
            raise _Fault(f"the input of the {definition} instance to run: {error}") from None
        thread.bookmark, thread.resume, thread.child_row = "child", None, None
        thread.start_child = (definition, blueprint.version, variables)
        if spec.get("timeout") is None:
            return None, f"started {definition} v{blueprint.version}"
        thread.wake_at = time.time() + spec["timeout"]
        return None, f"started {definition} v{blueprint.version}, waiting until {_iso_text(thread.wake_at)}"

    def _depth(self, instance: str) -> int:
        """How many parents above ``instance`` (a parent never changes, so this read needs no lock)."""

        def read(conn: sqlite3.Connection) -> int:
            depth, current = 0, instance
            while depth <= CHILD_MAX_DEPTH:
                row = conn.execute("SELECT parent FROM instances WHERE id = ?", (current,)).fetchone()
                if row is None or row[0] is None:
                    return depth
                depth, current = depth + 1, row[0]
            return depth

        return self.workflows.store.read(read)

    def _child_ended(
        self, burst: _Burst, thread: _Thread, activity: BlueprintActivity, ended: Any
    ) -> tuple[str | None, str]:
        """The wait of a run activity is over: its child ended (``ended`` says how), or the wait timed out."""
        spec, child = activity.spec, thread.child
        thread.child = None
        if ended is None:  # timed out: the child is cancelled by the commit
            if child is not None:
                burst.cancel_children.append(child)
            text = f"timed out after {_format_seconds(spec['timeout'])} waiting for instance {child}, now cancelled"
            if spec.get("on_timeout") is None:
                raise _Fault(f"{text}; give the activity on_timeout to go on instead")
            return spec["on_timeout"], f"{text}: on to {spec['on_timeout']}"
        ended = ended if isinstance(ended, dict) else {}
        status = ended.get("status")
        if status != "completed":
            why = f": {ended['error']}" if ended.get("error") else ""
            raise _Fault(f"instance {child} ({spec['definition']}) it ran was {status}{why}")
        self._write_variables(burst, {spec.get("result") or activity.id: ended.get("variables")}, thread)
        return activity.next, f"instance {child} completed"

    async def _call(self, name: str, variables: dict[str, Any], context: CallContext) -> Any:
        function = self.functions.get(name)
        if function is None and ":" in name:
            function = self.functions.get(name.split(":", 1)[1])
        if function is None:
            # Perhaps only some nodes run the module: another node (or a later try) may have it.
            raise _CallFailed(
                f"no function {name!r} on node {self.node}; start nodes with --app MODULE that registers it"
            )
        given = json.loads(json.dumps(variables))  # a copy: the function cannot change state behind our back
        reset = _CURRENT_CALL.set(context)  # run_in_thread copies the context: sync functions see it too
        try:
            if inspect.iscoroutinefunction(function):
                result = await function(given)
            else:
                result = await self.threads.run(function, given)
            if inspect.isawaitable(result):  # a plain function that hands back a coroutine (a wrapper, say)
                result = await result
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # whatever the function raises (sys.exit() too) fails this call only
            raise _CallFailed(describe_failure(error)) from None
        finally:
            _CURRENT_CALL.reset(reset)
        try:
            encode_body(result, self.workflows.store.settings.max_body_bytes)
        except InvalidInput as error:
            raise _Fault(f"{name} returned a value that cannot be stored: {error}") from None
        return result


_EMPTY_BLUEPRINT = Blueprint("", "", 0, "", {}, (), {}, "{}")


def _spin(seconds: float, stop: threading.Event) -> None:
    """Simulated CPU work: compute until ``seconds`` have passed or ``stop`` is set (in a thread)."""
    end = time.monotonic() + seconds
    total = 0
    while time.monotonic() < end and not stop.is_set():
        total += sum(range(200))


# ══════════════════════════════════════════════════════════════════════════════════════════
# Python API: connect() and the handle it returns, over the pieces above (a layer of its own, unnumbered).
# ══════════════════════════════════════════════════════════════════════════════════════════


class _AsyncLockRequest:
    """``await nf.alock(name)`` gives a HeldLock; ``async with nf.alock(name) as held`` also works."""

    def __init__(self, locks: LockManager, name: str, timeout: float | str | None, fence: bool) -> None:
        self._locks, self._name, self._timeout, self._fence = locks, name, timeout, fence
        self._held: HeldLock | None = None

    def __await__(self) -> Generator[Any, None, HeldLock]:
        return self._locks.aacquire(self._name, self._timeout, fence=self._fence).__await__()

    async def __aenter__(self) -> HeldLock:
        self._held = await self._locks.aacquire(self._name, self._timeout, fence=self._fence)
        return self._held

    async def __aexit__(self, *exc: object) -> None:
        if self._held is not None:
            self._held.release()


class _Listener:
    """The thread that makes a handle current: doorbell rings and, failing those, the poll interval."""

    def __init__(self, doorbells: Doorbells, wakeups: Wakeups, signals: Signals, poll_interval: float) -> None:
        self._doorbells, self._wakeups, self._signals = doorbells, wakeups, signals
        self._poll = poll_interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # stop() needs no socket file
        self.rings_heard = 0
        self.rebinds = 0

    def start(self) -> None:
        receiver = self._doorbells.bind()
        self._doorbells.remove_dead()
        self._thread = threading.Thread(target=self._run, args=(receiver,), name="nodeflow-listen", daemon=True)
        self._thread.start()

    def _run(self, bound: socket.socket) -> None:
        receiver: socket.socket | None = bound  # None after a failed rebind: the poll alone serves
        last_read = time.monotonic()
        try:
            while not self._stopping.is_set():
                topics: set[str] = set()
                watched = [self._wake_read] if receiver is None else [receiver.fileno(), self._wake_read]
                try:
                    ready, _, _ = select.select(watched, [], [], self._poll)
                    while receiver is not None and receiver.fileno() in ready:  # drain: one catch-up serves all
                        data = receiver.recv(4096, socket.MSG_DONTWAIT)
                        topics.update(data.decode("utf-8", "replace").split("\n"))
                        self.rings_heard += 1
                except BlockingIOError:
                    pass
                except (OSError, ValueError) as error:  # the socket went bad: rebind at the next look
                    log.warning("node %s: its doorbell failed (%s)", self._doorbells.node, error)
                    receiver = None
                    time.sleep(self._poll)
                if self._stopping.is_set():
                    return
                topics.discard("")
                if topics:
                    self._wakeups.bump(topics)
                # A ring for the log, or a poll interval without one: rings to a full socket are
                # dropped, and queue rings arriving often must not starve the log of its poll.
                if RING_INSTRUCTIONS in topics or time.monotonic() - last_read >= self._poll:
                    last_read = time.monotonic()
                    try:
                        self._signals.catch_up(save=True)
                    except Exception as error:
                        log.warning("node %s: reading the instruction log failed: %s", self._signals.node, error)
                    receiver = self._rebind_if_removed(receiver)
        finally:
            os.close(self._wake_read)

    def _rebind_if_removed(self, receiver: socket.socket | None) -> socket.socket | None:
        """Someone removed our doorbell file (or the lock folder): bind a new one, so rings reach us."""
        if self._stopping.is_set() or (receiver is not None and self._doorbells.is_bound_here(receiver)):
            return receiver
        try:
            fresh = self._doorbells.rebind()
        except (OSError, NodeflowError) as error:
            log.warning("node %s: cannot bind its doorbell again (%s); polling instead", self._doorbells.node, error)
            return None
        self.rebinds += 1
        log.warning("node %s: its doorbell was removed; bound a new one", self._doorbells.node)
        return fresh

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._poll + 5)
        os.close(self._wake_write)


# JSON shapes: what `--json` prints and the HTTP API answers, built in one place.


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.datetime.fromtimestamp(moment).astimezone().isoformat(timespec="milliseconds")


def _lock_entry(info: LockInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "fence": info.fence,
        "holder": info.holder,
        "pid": info.pid,
        "node": info.node,
        "since": _iso(info.since),
        "held_for": None if info.since is None else round(max(0.0, time.time() - info.since), 3),
    }


def _timer_entry(timer: Timer) -> dict[str, Any]:
    return {"name": timer.name, "queue": timer.queue, "cron": timer.cron, "tz": timer.tz, "next": _iso(timer.due)}


def _definition_entry(info: DefinitionInfo) -> dict[str, Any]:
    return {"id": info.id, "name": info.name, "version": info.version, "created": _iso(info.created),
            "activities": info.activities, "triggers": list(info.triggers)}  # fmt: skip


def _instance_entry(instance: Instance, full: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": instance.id,
        "definition": instance.definition,
        "version": instance.version,
        "status": instance.status,
        "activity": instance.position,
        "waiting_for": instance.waiting_for,
        "wake_at": _iso(instance.wake_at),
        "error": instance.error,
        "created": _iso(instance.created),
        "updated": _iso(instance.updated),
        "ended": _iso(instance.ended),
        "key": instance.key,
        "parent": instance.parent,
    }
    if full:
        entry["children"] = [
            {"id": child, "definition": definition, "status": status} for child, definition, status in instance.children
        ]
        entry["journal_pruned"] = instance.journal[0].step if instance.journal else 0  # the oldest steps, pruned
        entry["started_by"] = instance.started_by
        entry["variables"] = instance.variables
        entry["journal"] = [
            {"step": e.step, "activity": e.activity, "type": e.type, "node": e.node, "fence": e.fence,
             "started": _iso(e.started), "ended": _iso(e.ended), "outcome": e.outcome, "branch": e.branch}
            for e in instance.journal
        ]  # fmt: skip
        entry["branches"] = [
            {"branch": name, "activity": position, "waiting_for": waiting_for, "wake_at": _iso(wake_at)}
            for name, position, waiting_for, wake_at in instance.branches
        ]
    return entry


def _signal_entry(outcome: SignalOutcome) -> dict[str, Any]:
    return {
        "resumed": list(outcome.resumed), "started": list(outcome.started), "kept": outcome.kept,
        "kept_until": _iso(outcome.kept_until),
    }  # fmt: skip


def _instance_state(instance: Instance) -> str:
    if instance.status == "waiting" and instance.child is None and not instance.waiting_for and instance.branches:
        return f"waiting at {instance.position} for {len(instance.branches)} branch(es)"
    if instance.status == "waiting" and instance.child is not None:
        return f"waiting for instance {instance.child}"
    if instance.status == "waiting":
        return (
            f"waiting for signal {instance.waiting_for}"
            if instance.waiting_for
            else f"waiting until {_iso(instance.wake_at)}"
        )
    if instance.status == "faulted":
        return f"faulted at {instance.position}: {instance.error}"
    if instance.status == "running" and instance.error:
        return f"running (retrying {instance.position}: {instance.error})"
    return instance.status


class Cluster:
    """A synchronous handle on a cluster, with ``a``-prefixed coroutine twins for asyncio code.

    ``node`` names this handle as a node: its instruction cursor is kept in the database across
    restarts and its lock notes carry the name. Without it the handle is a passing client.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        node: str | None = None,
        create: bool = True,
        settings: Settings | None = None,
    ) -> None:
        if node is not None:
            check_node_id(node)
        self.store = Store(path or default_db_path(), create=create, settings=settings)
        self.path = self.store.path
        self.settings = self.store.settings
        self.node = node
        self.id = node or f"p{os.getpid()}-{secrets.token_hex(3)}"
        try:
            self.locks = LockManager(self.store, node)
            self.doorbells = Doorbells(self.store.lock_dir, self.id)
        except BaseException:
            self.store.close()
            raise
        self.wakeups = Wakeups()
        self.committer = GroupCommitter(self.store, self._ring)
        self.locks.write_async = self.committer.asubmit
        self.bus = Bus(self.store, self.committer, self.id, self.wakeups)
        self.signals = Signals(self.store, self.committer, self.id, node is not None, self._listen)
        self.cache = MemoryCache(self.signals)
        self._listener: _Listener | None = None
        self.workflows = Workflows(
            self.store,
            self.committer,
            self.signals,
            self.cache,
            self.wakeups,
            self.id,
            lambda: self._listener is not None,
        )
        self._listen_mutex = threading.Lock()
        self._closed = False

    def _ring(self, topics: set[str]) -> None:
        self.wakeups.bump(topics)  # waiters on this very handle
        self.doorbells.ring(topics)  # everyone else's

    def _listen(self) -> None:
        """Start the listener thread once: from then on rings and polls keep this handle current."""
        if self._listener is not None:
            return
        with self._listen_mutex:
            if self._listener is None:
                self.store.check_open()
                listener = _Listener(self.doorbells, self.wakeups, self.signals, self.settings.poll_interval)
                listener.start()
                self._listener = listener  # from here close() stops it, whatever happens next
                self.signals.catch_up()

    # Locks --------------------------------------------------------------------------------

    def lock(self, name: str, timeout: float | str | None = None, *, fence: bool = True) -> HeldLock:
        """Acquire ``name`` now; ``timeout=0`` tries once; raises LockTimeout when time runs out."""
        return self.locks.acquire(name, timeout, fence=fence)

    def alock(self, name: str, timeout: float | str | None = None, *, fence: bool = True) -> _AsyncLockRequest:
        return _AsyncLockRequest(self.locks, name, timeout, fence)

    def holder(self, name: str) -> LockInfo | None:
        return self.locks.holder(name)

    def held(self) -> list[LockInfo]:
        return self.locks.held()

    # Queues -------------------------------------------------------------------------------

    def send(self, queue: str, body: Any, delay: float | str = 0, priority: int = 0, key: str | None = None) -> int:
        """Queue ``body`` (JSON data); durable when this returns; ``key`` makes the send idempotent."""
        return self.bus.send(queue, body, delay, priority, key)

    async def asend(
        self, queue: str, body: Any, delay: float | str = 0, priority: int = 0, key: str | None = None
    ) -> int:
        return await self.bus.asend(queue, body, delay, priority, key)

    def send_many(
        self,
        queue: str,
        bodies: Iterable[Any],
        delay: float | str = 0,
        priority: int = 0,
        keys: Iterable[str | None] | None = None,
    ) -> list[int]:
        """Queue several bodies in one durable commit; their ids in order. ``keys``: one
        deduplication key (or None) per body. All or none: a bad body queues nothing."""
        return self.bus.send_many(queue, bodies, delay, priority, keys)

    async def asend_many(
        self,
        queue: str,
        bodies: Iterable[Any],
        delay: float | str = 0,
        priority: int = 0,
        keys: Iterable[str | None] | None = None,
    ) -> list[int]:
        return await self.bus.asend_many(queue, bodies, delay, priority, keys)

    @overload
    def receive(
        self,
        queue: str,
        lease: float | str = ...,
        wait: float | str = ...,
        batch: None = ...,
        *,
        ack: Message | Iterable[Message] | None = ...,
    ) -> Message | None: ...
    @overload
    def receive(
        self,
        queue: str,
        lease: float | str = ...,
        wait: float | str = ...,
        *,
        batch: int,
        ack: Message | Iterable[Message] | None = ...,
    ) -> list[Message]: ...

    def receive(
        self,
        queue: str,
        lease: float | str = 30,
        wait: float | str = 0,
        batch: int | None = None,
        *,
        ack: Message | Iterable[Message] | None = None,
    ) -> Message | list[Message] | None:
        """Lease the next message (or up to ``batch`` of them), waiting up to ``wait`` seconds.

        ``ack``: the message (or messages) handled before, acked in the same commit as this claim,
        which saves a commit per message. All or nothing: if one of them is no longer leased to its
        holder, LeaseLost is raised, and nothing is acked or received. The acks go with the first
        claim, at once, even when nothing is ready: an error while waiting after it leaves them done.
        """
        settle = () if ack is None else _check_messages(ack, "receive's ack")
        if parse_duration(wait, "wait") > 0:
            self._listen()
        taken = self.bus.receive(queue, lease, wait, 1 if batch is None else batch, settle)
        return taken if batch is not None else (taken[0] if taken else None)

    @overload
    async def areceive(
        self,
        queue: str,
        lease: float | str = ...,
        wait: float | str = ...,
        batch: None = ...,
        *,
        ack: Message | Iterable[Message] | None = ...,
    ) -> Message | None: ...
    @overload
    async def areceive(
        self,
        queue: str,
        lease: float | str = ...,
        wait: float | str = ...,
        *,
        batch: int,
        ack: Message | Iterable[Message] | None = ...,
    ) -> list[Message]: ...

    async def areceive(
        self,
        queue: str,
        lease: float | str = 30,
        wait: float | str = 0,
        batch: int | None = None,
        *,
        ack: Message | Iterable[Message] | None = None,
    ) -> Message | list[Message] | None:
        settle = () if ack is None else _check_messages(ack, "areceive's ack")
        if parse_duration(wait, "wait") > 0:
            self._listen()
        taken = await self.bus.areceive(queue, lease, wait, 1 if batch is None else batch, settle)
        return taken if batch is not None else (taken[0] if taken else None)

    def ack(self, message: Message, also: Callable[[sqlite3.Connection], T] | None = None) -> T | None:
        """Delete a handled message. ``also(conn)`` runs in the ack's transaction: both or neither."""
        return self.bus.ack(message, also)

    async def aack(self, message: Message, also: Callable[[sqlite3.Connection], T] | None = None) -> T | None:
        return await self.bus.aack(message, also)

    def ack_many(self, messages: Iterable[Message]) -> list[Message]:
        """Ack handled messages in one commit: those still leased to their holders. Returns the
        rest (their leases ran out: they were delivered again, or are dead letters now)."""
        return self.bus.ack_many(messages)

    async def aack_many(self, messages: Iterable[Message]) -> list[Message]:
        return await self.bus.aack_many(messages)

    def nack(self, message: Message, delay: float | str = 0, error: str | None = None) -> str:
        """Give a message back for a later try; returns "queued", or "dead" after its last delivery."""
        return self.bus.nack(message, delay, error)

    async def anack(self, message: Message, delay: float | str = 0, error: str | None = None) -> str:
        return await self.bus.anack(message, delay, error)

    def extend(self, message: Message, lease: float | str) -> float:
        """Keep a long job's message: its lease ends ``lease`` seconds from now; LeaseLost if too late."""
        return self.bus.extend(message, lease)

    async def aextend(self, message: Message, lease: float | str) -> float:
        return await self.bus.aextend(message, lease)

    def release_leases(self, owner: str) -> int:
        return self.bus.release_leases(owner)

    def dead_letters(self, queue: str, limit: int = 1000) -> list[DeadLetter]:
        return self.bus.dead_letters(queue, limit)

    def retry_dead_letters(self, queue: str, ids: Iterable[int] | None = None) -> int:
        return self.bus.retry_dead(queue, ids)

    def purge_dead_letters(self, queue: str, ids: Iterable[int] | None = None) -> int:
        return self.bus.purge_dead(queue, ids)

    def queues(self) -> dict[str, dict[str, int]]:
        """Depth of every queue: ready, leased, delayed and dead messages."""
        return self.bus.depths()

    # Instructions and cache signals -------------------------------------------------------

    def trigger(self, key: str) -> int:
        """Fire the change token ``key`` in this process and, through the log, on every node."""
        return self.signals.trigger(key)

    async def atrigger(self, key: str) -> int:
        return await self.signals.atrigger(key)

    def token(self, key: str) -> ChangeToken:
        return self.signals.token(key)

    def prune_instructions(self, max_age: float | str | None = None, max_count: int | None = None) -> int:
        return self.signals.prune(max_age, max_count)

    # Timers -------------------------------------------------------------------------------

    def schedule(
        self,
        name: str,
        queue: str,
        body: Any,
        *,
        cron: str | None = None,
        tz: str | None = None,
        at: float | str | None = None,
        after: float | str | None = None,
    ) -> Timer:
        """Add a timer that sends ``body`` to ``queue``: once ``after`` a delay, once ``at`` a time, or on ``cron``.

        The scheduling node fires it, exactly once per due time; ``next`` is known at once.
        """
        name = check_timer_name(name)
        queue = check_queue_name(queue)
        text = encode_body(body, self.settings.max_body_bytes)
        if sum(option is not None for option in (cron, at, after)) != 1:
            raise InvalidInput("give exactly one of cron, at and after")
        if tz is not None and cron is None:
            raise InvalidInput("a time zone goes with a cron expression only")
        now = time.time()
        if cron is not None:
            due = CronSchedule.parse(cron, tz).next_after(now)
        elif at is not None:
            due = parse_time(at) if isinstance(at, str) else float(at)
            if not math.isfinite(due):
                raise InvalidInput(f"at: {at!r} is not a time")
        else:
            due = now + parse_duration(after if after is not None else 0, "after")
        check_due(due, "at" if at is not None else "after" if after is not None else "cron")

        def add(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM timers WHERE name = ?", (name,)).fetchone():
                raise NodeflowError(f"a timer named {_show_name(name)} exists already; remove it first")
            conn.execute(
                "INSERT INTO timers (name, queue, body, cron, tz, due, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, queue, text, cron, tz, due, now),
            )

        self.committer.submit(add, (RING_TIMERS,))
        return Timer(name, queue, body, cron, tz, due, 0, None)

    def unschedule(self, name: str) -> bool:
        name = check_timer_name(name)
        return bool(
            self.committer.submit(
                lambda conn: conn.execute("DELETE FROM timers WHERE name = ?", (name,)).rowcount, (RING_TIMERS,)
            )
        )

    def timers(self, limit: int | None = None) -> list[Timer]:
        """Every timer, the next due first (fired one-shot timers last)."""
        rows = self.store.read(
            lambda conn: conn.execute(
                "SELECT name, queue, body, cron, tz, due, fired, last_fired FROM timers "
                "ORDER BY due IS NULL, due, name LIMIT ?",
                (-1 if limit is None else limit,),
            ).fetchall()
        )
        return [Timer(r[0], r[1], decode_stored(r[2]), *r[3:]) for r in rows]

    # Workflows ----------------------------------------------------------------------------

    def define(self, definition: Any) -> DefinitionInfo:
        """Check a workflow definition (JSON text or data) and store it as its next version.

        Raises InvalidDefinition listing every problem, and then writes nothing. Defining the
        latest version again changes nothing (``changed`` is False).
        """
        return self.workflows.define(definition)

    async def adefine(self, definition: Any) -> DefinitionInfo:
        return await self.workflows.adefine(definition)

    def definitions(self) -> list[DefinitionInfo]:
        return self.workflows.definitions()

    def definition(self, workflow_id: str, version: int | None = None) -> dict[str, Any]:
        return self.workflows.definition(workflow_id, version)

    def start(self, workflow_id: str, input: Any = None, key: str | None = None) -> str:
        """Start an instance of the latest version of ``workflow_id``; returns its id at once.
        A ``key`` used before (by any process) returns that instance's id and starts nothing."""
        return self.workflows.start(workflow_id, input, key)

    async def astart(self, workflow_id: str, input: Any = None, key: str | None = None) -> str:
        return await self.workflows.astart(workflow_id, input, key)

    def signal(self, name: str, input: Any = None, ttl: float | str = SIGNAL_KEEP_DEFAULT) -> SignalOutcome:
        """Resume the instances waiting for signal ``name``; start definitions it triggers. If it
        does neither, it is kept for ``ttl`` (0: dropped) and resumes the next instance to wait for it."""
        return self.workflows.signal(name, input, ttl)

    async def asignal(self, name: str, input: Any = None, ttl: float | str = SIGNAL_KEEP_DEFAULT) -> SignalOutcome:
        return await self.workflows.asignal(name, input, ttl)

    def instances(
        self, status: str | None = None, definition: str | None = None, limit: int | None = None
    ) -> list[Instance]:
        return self.workflows.instances(status, definition, limit)

    def instance(self, instance_id: str) -> Instance:
        """One instance with its variables and journal; a unique prefix of its id will do."""
        return self.workflows.instance(instance_id)

    def retry(self, instance_id: str) -> Instance:
        return self.workflows.retry(instance_id)

    def cancel(self, instance_id: str, reason: str | None = None) -> Instance:
        """End an instance that has not ended yet as ``cancelled`` (a loop, a wait nobody will end)."""
        return self.workflows.cancel(instance_id, reason)

    async def acancel(self, instance_id: str, reason: str | None = None) -> Instance:
        return await self.workflows.acancel(instance_id, reason)

    def prune(
        self, older_than: float | str = KEEP_INSTANCES_DEFAULT, faulted_older_than: float | str | None = None
    ) -> tuple[int, int]:
        """Remove ended instances older than ``older_than`` (faulted ones: ``faulted_older_than``,
        by default 30 days or older_than if longer) and their journals; (instances, kept signals) removed."""
        return self.workflows.prune(older_than, faulted_older_than)

    def wait(self, instance_id: str, timeout: float | str | None = None) -> Instance:
        """Block until the instance completes or faults, or ``timeout`` passes; returns it."""
        return self.workflows.wait(instance_id, timeout)

    async def await_instance(self, instance_id: str, timeout: float | str | None = None) -> Instance:
        return await self.workflows.await_end(instance_id, timeout)

    # Membership ---------------------------------------------------------------------------

    def nodes(self, stall_after: float | None = None) -> list[dict[str, Any]]:
        """Every node that ever ran here: id, pid, host, role, state and heartbeat age (seconds).

        A live node is ``stalled`` when its heartbeat is older than ``stall_after``, or by default
        than the limit the node declared (its --stall-after), as its peers judge it."""
        # The rows first, then the kernel's word: a node that joins in between is seen alive.
        rows = self.store.read(
            lambda conn: conn.execute(
                "SELECT id, pid, host, role, started, heartbeat, state, stall_after FROM nodes ORDER BY id"
            ).fetchall()
        )
        alive = live_nodes(self.store.lock_dir)
        for node, pid, *_, state, _ in rows:  # /proc/locks can miss a held lock: ask the lock before saying dead
            if state == "running" and node not in alive and not liveness_lock_free(self.store.lock_dir, node, pid):
                alive[node] = pid
        now = time.time()
        found = []
        for node, pid, host, role, started, heartbeat, state, declared in rows:
            if alive.get(node) is not None:
                limit = stall_after if stall_after is not None else declared or DEFAULT_STALL_AFTER
                state = "stalled" if now - heartbeat > limit else "running"
                pid = alive[node]
            elif state != "stopped":
                state = "dead"  # its liveness lock is free, whatever its last heartbeat says
            found.append(
                {"id": node, "pid": pid, "host": host, "role": role, "state": state,
                 "heartbeat_age": round(max(0.0, now - heartbeat), 3), "started": started}
            )  # fmt: skip
        return found

    def scheduler(self) -> dict[str, Any] | None:
        """The node in office and its epoch, or None when no node is in office now.

        Office is scheduler.lock held *and* the election row written by that holder: between
        getting the lock and committing its epoch, a new scheduler is not in office yet, and
        the row still names its predecessor (perhaps a dead node).
        """
        pid = scheduler_pid(self.store.lock_dir)
        if pid is None:
            return None
        epoch, node, node_pid, current = self.store.read(
            lambda conn: conn.execute(
                "SELECT e.epoch, e.node, n.pid, e.since >= n.started FROM election e "
                "LEFT JOIN nodes n ON n.id = e.node WHERE e.id = 1"
            ).fetchone()
        )
        if node is None or node_pid != pid or not current:
            return None
        return {"node": node, "epoch": epoch, "pid": pid}

    def status(self, stall_after: float | None = None) -> dict[str, Any]:
        """The cluster at a glance, as ``status --json`` prints it and ``GET /api/status`` answers."""
        nodes = self.nodes(stall_after)
        scheduler = self.scheduler()
        return {
            "path": self.path,
            "nodes": [
                {key: node[key] for key in ("id", "pid", "role", "state", "heartbeat_age", "host")} for node in nodes
            ],
            "scheduler": None if scheduler is None else {"node": scheduler["node"], "epoch": scheduler["epoch"]},
            "queues": self.queues(),
            "locks": [_lock_entry(info) for info in self.held()],
            "timers": [_timer_entry(timer) for timer in self.timers(limit=10) if timer.due is not None],
            "instances": self.workflows.counts(),
            "kept_signals": self._kept_signals_entry(),
        }

    def _kept_signals_entry(self) -> dict[str, Any]:
        shown, total = self.workflows.kept_signals()
        return {
            "count": total,
            "oldest": [
                {"name": kept.name, "sent": _iso(kept.sent), "expires": _iso(kept.expires), "by": kept.by}
                for kept in shown
            ],
        }

    # Lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.stop()
        if self.signals.persistent and self.signals.cursor != self.signals._saved_cursor:
            with contextlib.suppress(NodeflowError):
                self.signals._save_cursor()  # a restart resumes exactly here
        self.committer.close()
        self.doorbells.close()
        remove_idle_lock_files(self.locks.directory)
        remove_idle_lock_files(self.bus.turns.directory)
        self.store.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(path: str | None = None, **options: Any) -> Cluster:
    """Open the cluster at ``path`` (default ``$NODEFLOW_DB`` or ``./nodeflow.db``), creating it."""
    return Cluster(path, **options)


# ══════════════════════════════════════════════════════════════════════════════════════════
# 10. Node: the daemon that `serve` runs: membership, heartbeats, election, the scheduler.
# ══════════════════════════════════════════════════════════════════════════════════════════

PRUNE_INTERVAL = 60.0  # the scheduler prunes the instruction log this often
FILE_LOOKS_BEFORE_FAILING = 3  # heartbeats in a row that cannot stat the database file before a node gives up
RING_MEMBERSHIP = "n"  # a node joined: its peers start watching its liveness lock at once
LOOP_TICK = 0.25  # a node's event loop notes the time this often; a thread watches that it does
LOOP_BLOCKED_NOTICE = 2.0  # the event loop blocked this long is worth a warning, with where it is


_HANDLERS: dict[str, Callable[[Message], Any]] = {}  # queue -> handler, filled by @nodeflow.handler


def handler(queue: str) -> Callable[[Callable[[Message], Any]], Callable[[Message], Any]]:
    """Register the function a ``serve`` node runs for each message of ``queue`` (sync or async).

    Put handlers in a module and start nodes with ``serve --app MODULE``. A handler that returns
    acks the message; one that raises nacks it with back-off (1 s, 2 s, 4 s, ... up to a minute),
    and after ``max_deliveries`` the message becomes a dead letter with the error.
    """
    queue = check_queue_name(queue)

    def register(function: Callable[[Message], Any]) -> Callable[[Message], Any]:
        known = _HANDLERS.get(queue)
        if known is not None and known is not function:
            raise NodeflowError(f"queue {queue!r} has a handler already: {getattr(known, '__qualname__', known)}")
        _HANDLERS[queue] = function
        return function

    return register


def load_app(module: str) -> dict[str, Callable[[Message], Any]]:
    """Import ``--app MODULE`` (a module name, or a path to a .py file); returns the handlers it registered."""
    before = dict(_HANDLERS)
    try:
        if module.endswith(".py") or os.sep in module:
            spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(module))[0], module)
            if spec is None or spec.loader is None:
                raise ImportError(f"no module at {module}")
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = loaded
            spec.loader.exec_module(loaded)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            importlib.import_module(module)
    except NodeflowError:
        raise
    except Exception as error:
        raise InvalidInput(f"--app {module}: cannot import it ({type(error).__name__}: {error})") from None
    return {queue: function for queue, function in _HANDLERS.items() if before.get(queue) is not function}


class _NodeLogHandler(logging.Handler):
    """Library warnings (a cold boot, a failed read) go to the node's log, one line each."""

    def __init__(self, node: Node) -> None:
        super().__init__(logging.INFO)
        self._node = node

    def emit(self, record: logging.LogRecord) -> None:
        try:
            cause = f": {record.exc_info[1]!r}" if record.exc_info and record.exc_info[1] else ""
            self._node.say(f"{record.levelname.lower()}: {record.getMessage()}{cause}")
        except Exception:
            self.handleError(record)


class Node:
    """One member of a cluster: ``python3 nodeflow.py serve`` runs one; programs may run one in-process.

    ``await Node(path).run()`` joins the cluster (taking the node id's liveness lock), beats its
    heart, watches its peers' liveness locks, stands for election unless it is a replica, fires
    timers while in office, and on ``request_stop()`` steps down and leaves cleanly.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        node_id: str | None = None,
        role: str = "auto",
        concurrency: int = 8,
        settings: Settings | None = None,
        grace: float | str = 10.0,
        heartbeat: float | str = 1.0,
        handlers: dict[str, Callable[[Message], Any]] | None = None,
        lease: float | str = 30.0,
        out: Any = None,
        activities: dict[str, Callable[[dict[str, Any]], Any]] | None = None,
        workflows: bool = True,
        http: str | None = None,
        http_token: str | None = None,
        stall_after: float | str | None = None,
        keep_instances: float | str = KEEP_INSTANCES_DEFAULT,
        keep_faulted: float | str | None = None,
    ) -> None:
        if role not in ("auto", "replica"):
            raise InvalidInput(f"role must be auto or replica, not {role!r}")
        if node_id is not None:
            check_node_id(node_id)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 1024:
            raise InvalidInput(f"concurrency must be a whole number from 1 to 1024, not {concurrency!r}")
        self.path = path or default_db_path()
        self.requested_id, self.role, self.concurrency = node_id, role, concurrency
        self.settings = settings or Settings()
        self.grace = parse_duration(grace, "grace")
        self.heartbeat = parse_duration(heartbeat, "heartbeat")
        if self.heartbeat <= 0:
            raise InvalidInput("heartbeat must be more than zero, such as 1s")
        # Peers judge this node by the limit it declares (nodes.stall_after), each node by its own.
        default_stall = max(DEFAULT_STALL_AFTER, 3 * self.heartbeat)
        self.stall_after = default_stall if stall_after is None else parse_duration(stall_after, "stall_after")
        if self.stall_after < 2 * self.heartbeat:
            raise InvalidInput(
                f"stall_after ({_format_seconds(self.stall_after)}) must be at least twice the heartbeat "
                f"({_format_seconds(self.heartbeat)}): a node between two beats is not stalled"
            )
        # Retention, done by the node in office: ended instances older than these are removed.
        self.keep_instances = parse_duration(keep_instances, "keep_instances")
        self.keep_faulted = (
            max(self.keep_instances, KEEP_FAULTED_DEFAULT)
            if keep_faulted is None
            else parse_duration(keep_faulted, "keep_faulted")
        )
        self.instances_pruned = 0
        self.out = out if out is not None else sys.stderr
        self.handlers = dict(_HANDLERS if handlers is None else handlers)
        for queue in self.handlers:
            check_queue_name(queue)
        self.lease = parse_duration(lease, "lease")
        self.activities = dict(_ACTIVITIES if activities is None else activities)
        self.runs_workflows = workflows
        self.runner: WorkflowRunner | None = None
        self.http_address = None if http is None else parse_http_address(http)
        if self.http_address is not None and not is_loopback(self.http_address[0]) and not http_token:
            raise InvalidInput(
                f"--http {http} can be reached from other machines: give --http-token TOKEN "
                "(or NODEFLOW_HTTP_TOKEN), or bind 127.0.0.1"
            )
        self.http_token = http_token or None
        self.http: HttpServer | None = None
        # Teaching switches, for `demo` only (serve has no option for them): each turns one piece off.
        self._without_liveness_locks = False  # a dead peer goes unseen: its leases must run out
        self._without_election = False  # every node fires timers, as a scheduler with no election would
        self._without_cache_signals = False  # cached blueprints are never evicted by a define
        self.handled = 0
        self.failed = 0
        self.log_lines_lost = 0
        self._lines_unsaid = 0  # lost since the last line that could be written
        self._handling: set[asyncio.Task[None]] = set()  # handler runs in flight
        self.user_threads = UserThreads()
        self._clock = ClockWatch()
        self._renew_now = asyncio.Event()  # set (and replaced) when the wall clock stepped forward
        self.id = node_id or "?"
        self.nf: Cluster | None = None
        self.epoch: int | None = None  # set while in office
        self.timers_fired = 0
        self.timer_lateness = 0.0  # seconds past their due times, summed over the timers fired
        self._say_mutex = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_reason = "asked to"
        self._fatal: str | None = None  # why the node must stop at once, writing nothing more
        self._forsake_companions = False  # on the way out, remove the -wal and -shm of a database that is gone
        self._unreadable_beats = 0  # heartbeats in a row that could not stat the database file
        self._last_beat = time.monotonic()  # when this node's heartbeat last committed
        self._office_vacant: tuple[int, float] | None = None  # (epoch, since when, monotonic) office seen empty
        self._peer_beats: dict[str, tuple[int, float, float]] = {}  # peer -> (pid, heartbeat, when it last moved)
        self._peer_limits: dict[str, float] = {}  # peer -> the stall limit it declared
        self._office_mutex = threading.Lock()  # one attempt at a time to take office from a stalled node
        self._office_fd: int | None = None
        self._election: _FlockWaiter | None = None
        self._peers: dict[str, _FlockWaiter] = {}
        self._scheduling: asyncio.Task[None] | None = None
        self._log_handler = _NodeLogHandler(self)
        self._loop_seen = time.monotonic()  # when the event loop last ran its ticker (see _watch_the_loop)
        self._left = threading.Event()  # set when run() ends, however: its threads end with it
        self._process_stopped: tuple[float, float] | None = None  # (when noticed, for how long), monotonic

    # The log ------------------------------------------------------------------------------

    @property
    def fatal(self) -> str | None:
        """Why the node stopped on its own (its database file removed, replaced or damaged), or None."""
        return self._fatal

    @property
    def label(self) -> str:
        if self.epoch is not None:
            return "scheduler"
        return "replica" if self.role == "replica" else "standby"

    def say(self, event: str, probe: bool = False, label: str | None = None) -> None:
        """Log one line. Never raises: a log on a full disk (or a closed pipe) must not take down
        the loop that wanted to say something; the lines lost are counted in ``log_lines_lost``."""
        stamp = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
        with self._say_mutex:
            try:
                if self._lines_unsaid:
                    print(
                        f"{stamp} {self.id} {self.label:<9} {self._lines_unsaid} log line(s) before this one could not "
                        "be written (a full disk, a file-size limit?)",
                        file=self.out,
                        flush=True,
                    )
                    self._lines_unsaid = 0
                print(f"{stamp} {self.id} {label or self.label:<9} {one_line(event)}", file=self.out, flush=True)
            except (OSError, ValueError):
                if not probe:  # a line only written to see whether the log works again is no loss
                    self.log_lines_lost += 1
                    self._lines_unsaid += 1

    # Joining and leaving ------------------------------------------------------------------

    def _join(self) -> Cluster:
        """Open the cluster as the requested node id, or the first free of n1, n2, ..."""
        candidates = [self.requested_id] if self.requested_id else [f"n{number}" for number in range(1, 1000)]
        for candidate in candidates:
            nf = Cluster(self.path, node=candidate, settings=self.settings)
            self.id = candidate
            try:
                nf._listen()  # takes PATH.d/nodes/<id>.lock for the node's whole life
            except NodeIdInUse:
                nf.close()
                if self.requested_id:
                    raise
                continue
            except BaseException:
                nf.close()
                raise
            self.id = candidate
            return nf
        raise NodeflowError("no free node id among n1 .. n999; give one with --node-id")

    def _register(self, conn: sqlite3.Connection) -> int:
        now = time.time()
        conn.execute(
            "INSERT INTO nodes (id, pid, host, role, started, heartbeat, state, stall_after) "
            "VALUES (?, ?, ?, ?, ?, ?, 'running', ?) ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, "
            "host = excluded.host, role = excluded.role, started = excluded.started, "
            "heartbeat = excluded.heartbeat, state = 'running', stall_after = excluded.stall_after",
            (self.id, os.getpid(), socket.gethostname(), self.role, now, now, self.stall_after),
        )
        # Leases of an earlier life under this id are its own no more: hand them back now.
        return hand_back_leases(conn, self.id, f"node {self.id} restarted")[0]

    def _fail(self, problem: str) -> None:
        """Stop at once without another write: the file under us is not the cluster's database any more."""
        if self._fatal is None:
            self._fatal = problem
            if self.nf is not None:
                self.nf.store.refuse(problem)
            self.say(f"error: {problem}; stopping now, without writing to it: restart the nodes once it is sorted out")
        self.request_stop("a fatal error")

    def request_stop(self, reason: str = "asked to") -> None:
        """Begin a graceful stop; safe from any thread and from signal handlers."""
        self._stop_reason = reason
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.http_address is not None:  # before joining: a port in use fails here, with nothing joined yet
            self.http = HttpServer(self, *self.http_address, self.http_token)
            await self.http.start()  # until the node has joined, the API answers 503 "the node is starting"
        logging.getLogger("nodeflow").addHandler(self._log_handler)
        try:
            nf = self.nf = self._join()
        except BaseException:
            logging.getLogger("nodeflow").removeHandler(self._log_handler)
            if self.http is not None:
                await self.http.close()
            raise
        tasks: list[asyncio.Task[None]] = []
        try:
            handed_back = await nf.committer.asubmit(self._register)
            self._last_beat = time.monotonic()
            self.say(
                f"joined {nf.path} (pid {os.getpid()}, role {self.role})"
                + (f"; handed back {handed_back} leases of its earlier life" if handed_back else "")
            )
            await run_in_thread(self._look_after_peers)
            nf.doorbells.ring({RING_MEMBERSHIP})  # the others start watching our liveness lock now
            nf.workflows.cache_signals = not self._without_cache_signals
            if self.role == "auto" and self._without_election:
                self._scheduling = asyncio.create_task(self._fire_without_election())
            elif self.role == "auto":
                self._stand_for_election()
                tasks.append(self._supervised(self._watch_office(), "the watch on office"))
            beating = self._supervised(self._beat(), "the heartbeat")
            tasks.append(beating)
            tasks.append(self._supervised(self._tick(), "the event loop's ticker"))
            threading.Thread(
                target=self._watch_the_loop, args=(threading.get_ident(),), name="nodeflow-loop-watch", daemon=True
            ).start()
            if self.runs_workflows:
                self.runner = WorkflowRunner(
                    nf.workflows,
                    nf.bus,
                    nf.locks,
                    self.id,
                    self.activities,
                    self.say,
                    self.user_threads,
                    self._holder_stalled,
                )
                self.handlers[WORKFLOW_QUEUE] = self.runner.handle
            workers = [
                self._supervised(self._consume(queue, function), f"the consumer of {queue}")
                for queue, function in sorted(self.handlers.items())
            ]
            tasks.extend(workers)
            queues = sorted(queue for queue in self.handlers if queue != WORKFLOW_QUEUE)
            if queues:
                self.say(f"consuming {', '.join(queues)} ({self.concurrency} at once each)")
            if self.http is not None:
                self.say(f"dashboard and API at {self.http.url}" + (" (token required)" if self.http_token else ""))
            if self.runner is not None:
                self.say(
                    f"running workflows ({self.concurrency} at once, {len(set(self.activities.values()))} functions)"
                )
            await self._stop.wait()
            if self._fatal is not None:
                for task in [*workers, *self._handling]:
                    task.cancel()
                await asyncio.wait([*workers, *self._handling], timeout=5)  # a handler may shield itself
                return 1
            self.say(f"stopping ({self._stop_reason}); grace {_format_seconds(self.grace)}")
            for watcher in self._peers.values():
                watcher.stop()  # peers leaving with us are for the nodes that stay to reap
            if self.http is not None:
                await self.http.close()
            await self._drain(workers)
            beating.cancel()
            await self._step_down()
            with contextlib.suppress(NodeflowError):  # anything still leased to us goes back now
                nf.release_leases(self.id)
            now = time.time()
            with contextlib.suppress(NodeflowError):  # the file went while we stopped (see _fail)
                await nf.committer.asubmit(
                    lambda conn: conn.execute(
                        "UPDATE nodes SET state = 'stopped', heartbeat = ? WHERE id = ? AND pid = ?",
                        (now, self.id, os.getpid()),
                    )
                )
            self.say("stopped")
            return 0 if self._fatal is None else 1
        finally:
            # Also when run() itself was cancelled or failed: nothing of this node may outlive it.
            self._left.set()
            for task in [*tasks, *([self._scheduling] if self._scheduling else [])]:
                task.cancel()
            if self._election is not None:
                self._election.stop()
            for watcher in self._peers.values():
                watcher.stop()
            if self._office_fd is not None:
                with _LOCK_FDS_MUTEX:
                    _close_lock_fd(self._office_fd)
                self._office_fd, self.epoch = None, None
            if self.http is not None:  # also when run() failed or was cancelled: the port is freed
                await self.http.close()
            logging.getLogger("nodeflow").removeHandler(self._log_handler)
            nf.close()
            if self._forsake_companions:
                nf.store.remove_companions()

    async def _tick(self) -> None:
        while True:
            self._loop_seen = time.monotonic()
            await asyncio.sleep(LOOP_TICK)

    def _watch_the_loop(self, loop_thread: int) -> None:
        """In a thread: say when the event loop has been blocked (an async handler or call that
        computes or sleeps without awaiting), and where, so the culprit can be found: such a node
        beats no more, and its peers take its work after --stall-after."""
        assert self._stop is not None
        reported = 0.0
        while not self._stop.is_set() and not self._left.is_set():
            before = time.monotonic()
            time.sleep(LOOP_TICK)
            slept = time.monotonic() - before
            if slept > LOOP_TICK + 1.0:  # this thread was held up too: the whole process was stopped (SIGSTOP)
                self._process_stopped = (time.monotonic(), slept)
                continue
            blocked = time.monotonic() - self._loop_seen
            if blocked > LOOP_BLOCKED_NOTICE and not reported:
                frame = sys._current_frames().get(loop_thread)  # its innermost Python frame: the culprit
                where = ""
                if frame is not None:
                    code = frame.f_code
                    where = f" (at {os.path.basename(code.co_filename)}:{frame.f_lineno} in {code.co_name})"
                self.say(
                    f"warning: the event loop has been blocked for {_format_seconds(blocked)}{where}: an async "
                    "handler or function must await, not block (run blocking code in a plain def); past "
                    "--stall-after its peers take this node's work"
                )
                reported = blocked
            elif blocked <= LOOP_TICK * 2 and reported:
                self.say("the event loop runs again")
                reported = 0.0

    def _supervised(self, work: Awaitable[None], what: str) -> asyncio.Task[None]:
        """A task of the node's own, whose loop catches what it can meet. Should one still end by an
        error (a bug), the node says so and stops, rather than live on without it (a node without
        its heartbeat would be taken for stalled while it goes on working)."""
        task: asyncio.Task[None] = asyncio.ensure_future(work)

        def ended(task: asyncio.Task[None]) -> None:
            if task.cancelled() or task.exception() is None:
                return
            error = task.exception()
            self.say(f"error: {what} ended: {type(error).__name__}: {error}; stopping this node")
            self.request_stop(f"{what} failed")

        task.add_done_callback(ended)
        return task

    # Work -----------------------------------------------------------------------------------

    async def _consume(self, queue: str, function: Callable[[Message], Any]) -> None:
        """Take messages of ``queue`` while fewer than ``concurrency`` are in hand, until stopping.

        One receiver per queue claims messages in one transaction and starts a handler run for
        each. (A receiver per place would wake all of them on every doorbell, and all but one
        would read and claim for nothing.) It claims one at a time while the queue runs dry,
        and doubles its claim, up to the free places, while claims come back full: a few
        messages spread over the nodes, a flood is taken in batches.
        """
        assert self.nf is not None and self._stop is not None
        free = self.concurrency
        claim = 1
        room = asyncio.Event()

        def finished(task: asyncio.Task[None]) -> None:
            nonlocal free
            free += 1
            self._handling.discard(task)
            room.set()
            if not task.cancelled() and task.exception() is not None:  # a bug of ours: say it, go on
                error = task.exception()
                self.say(f"handling a message of {queue} failed: {type(error).__name__}: {error}")

        while not self._stop.is_set():
            if free == 0:
                room.clear()
                await room.wait()
                continue
            if self.stalled_for() > self.stall_after:  # its peers may be taking this node's work: take no more
                await asyncio.sleep(self.heartbeat)
                continue
            try:
                wanted = min(claim, free)
                messages = await self.nf.areceive(
                    queue, lease=self.lease, wait=self.settings.poll_interval, batch=wanted
                )
            except Exception as error:  # whatever it is, this queue's consumer lives on
                self.say(f"receiving from {queue} failed: {type(error).__name__}: {error}; trying again")
                await asyncio.sleep(self.settings.poll_interval)
                continue
            claim = min(self.concurrency, claim * 2) if len(messages) == wanted else 1
            for message in messages:  # stopping cancels this receiver, never the runs it started
                free -= 1
                handling = asyncio.create_task(self._handle(message, function))
                self._handling.add(handling)
                handling.add_done_callback(finished)

    async def _keep_leased(self, message: Message) -> None:
        """While a handler runs, renew its message's lease every third of a lease: a slow handler
        must not see its message delivered again elsewhere."""
        assert self.nf is not None
        while True:
            with contextlib.suppress(TimeoutError):  # a third of a lease, or at once after a clock step
                await asyncio.wait_for(self._renew_now.wait(), self.lease / 3)
            if self.stalled_for() > self.stall_after:
                continue  # peers may have taken this node for stalled and handed the message on: keep nothing
            try:
                await self.nf.aextend(message, self.lease)
            except LeaseLost:
                return
            except Exception as error:  # a busy database: the next try may do
                self.say(f"renewing the lease of message {message.id} failed: {error}")

    async def _handle(self, message: Message, function: Callable[[Message], Any]) -> None:
        assert self.nf is not None
        keeper = asyncio.create_task(self._keep_leased(message))
        try:
            try:
                if inspect.iscoroutinefunction(function):
                    outcome = await function(message)
                else:
                    outcome = await self.user_threads.run(function, message)
                if inspect.isawaitable(outcome):  # a plain function that hands back a coroutine
                    outcome = await outcome
            finally:
                keeper.cancel()
        except asyncio.CancelledError:  # the grace period ran out: hand the message back at once
            with contextlib.suppress(NodeflowError):
                await self.nf.anack(message, 0, "interrupted: the node stopped before the handler finished")
            raise
        except BaseException as error:  # anything a handler raises (sys.exit() too) fails its message only
            self.failed += 1
            delay = min(60.0, 2.0 ** (message.attempts - 1))
            text = describe_failure(error)
            try:
                outcome = await self.nf.anack(message, delay, text)
            except NodeflowError as settle_error:
                self.say(f"message {message.id} of {message.queue}: {text}; could not nack it: {settle_error}")
                return
            then = "now a dead letter" if outcome == "dead" else f"retry in {_format_seconds(delay)}"
            self.say(f"message {message.id} of {message.queue} failed (delivery {message.attempts}): {text}; {then}")
            return
        if outcome is SETTLED:  # the handler acked it itself, with its own writes in the same commit
            self.handled += 1
            return
        try:
            await self.nf.aack(message)
            self.handled += 1
        except NodeflowError as error:
            self.say(f"message {message.id} of {message.queue} was handled but not acked: {error}")

    async def _drain(self, workers: list[asyncio.Task[None]]) -> None:
        """Stop taking work, let handler runs finish within the grace period, hand back the rest."""
        for worker in workers:
            worker.cancel()
        in_flight = set(self._handling)
        if in_flight:
            self.say(f"waiting for {len(in_flight)} message(s) in flight, up to {_format_seconds(self.grace)}")
            _, late = await asyncio.wait(in_flight, timeout=self.grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
                self.say(f"handed back {len(late)} message(s) still in flight after the grace period")
        await asyncio.gather(*workers, return_exceptions=True)

    # Heartbeats and peers -----------------------------------------------------------------

    async def _beat(self) -> None:
        assert self.nf is not None
        node, pid = self.id, os.getpid()

        def beat(conn: sqlite3.Connection) -> None:
            # With the beat, the versions of the blueprints this node would use: a stale cache shows.
            blueprints = json.dumps(self.nf.workflows.cached_versions() if self.nf else {}, sort_keys=True)
            conn.execute(
                "UPDATE nodes SET heartbeat = ?, state = 'running', blueprints = ? WHERE id = ? AND pid = ?",
                (time.time(), blueprints, node, pid),
            )

        while True:
            seen = self.nf.wakeups.generation(RING_MEMBERSHIP)
            if self._lines_unsaid:  # try the log again: once it works, the count of lines lost goes first
                self.say("the log can be written again", probe=True)
            await self._notice_clock_step()
            if await self._database_file_gone():
                return
            try:
                asked = time.monotonic()
                await self.nf.committer.asubmit(beat)
                beaten = time.monotonic()
                silent, self._last_beat = beaten - self._last_beat, beaten
                if silent > self.stall_after:
                    self.say(
                        f"this node was stalled: no heartbeat for {_format_seconds(silent)} "
                        f"({self._why_silent(silent, beaten - asked, beaten)}); its peers may have taken its leases, "
                        "bursts and office, and what it commits now is checked against them"
                    )
                # Judging peers stalled takes a node that beats on time itself: after the database
                # was blocked for everyone, every heartbeat looks old for a moment.
                await run_in_thread(self._look_after_peers, silent <= self.stall_after)
            except (CorruptDatabase, NotADatabase) as error:
                self._fail(str(error))
                return
            except Exception as error:  # a busy or full disk: keep beating, say so
                self.say(f"heartbeat failed: {type(error).__name__}: {error}")
            await self.nf.wakeups.await_change(RING_MEMBERSHIP, seen, self.heartbeat)  # a node joined: watch it now

    async def _database_file_gone(self) -> bool:
        """Whether the database file was removed, replaced or cut under us; then the node fails,
        first saving what it has open of a file that went (it may be all that is left of it)."""
        assert self.nf is not None
        problem = await run_in_thread(self.nf.store.file_problem)  # a shrink means a whole read
        if problem is None:
            self._unreadable_beats = 0
            return False
        kind, text = problem
        if kind == "unreadable" and self._unreadable_beats < FILE_LOOKS_BEFORE_FAILING:
            self._unreadable_beats += 1  # a folder chmod'ed a moment, say: look again before giving up
            self.say(f"{text}; looking again")
            return False
        self.nf.store.refuse(text)  # before the copy: nothing more is committed to the file we copy
        self._forsake_companions = kind in ("removed", "replaced")
        if self._forsake_companions:
            try:
                rescued, made = await run_in_thread(self.nf.store.rescue)
                text += f"; {'saved' if made else 'another node saved'} what it had open as {rescued}"
            except (OSError, sqlite3.Error, NodeflowError) as error:
                text += f"; could not save a copy of what it had open ({error})"
        self._fail(text)
        return True

    async def _notice_clock_step(self) -> None:
        """When the wall clock stepped (NTP, an operator), say so; after a step forward, renew the
        leases in hand at once and note the step for the claims of every process (see LEASE_STEP_GRACE)."""
        assert self.nf is not None
        step = self._clock.stepped()
        if not step:
            return
        self.say(
            f"the wall clock stepped {'forward' if step > 0 else 'back'} by {_format_seconds(abs(step))}: "
            + (
                "what fell due in the skipped time fires now, once; leases in hand are renewed"
                if step > 0
                else "timers wait for their due times to come round again; none fires twice"
            )
        )
        if step > 0:
            renew, self._renew_now = self._renew_now, asyncio.Event()
            renew.set()
            now = time.time()
            with contextlib.suppress(NodeflowError):
                await self.nf.committer.asubmit(functools.partial(note_clock_step, now=now))

    def _why_silent(self, silent: float, waited: float, now: float) -> str:
        """Why this node's heartbeat stood still for ``silent`` seconds, as far as it can tell."""
        stopped = self._process_stopped
        if stopped is not None and now - stopped[0] <= silent + LOOP_TICK:
            return f"the process was stopped for {_format_seconds(stopped[1])}"
        if waited > silent / 2:
            return f"its heartbeat waited {_format_seconds(waited)} for the database: busy, or a slow disk"
        return "its event loop was blocked"

    def stalled_for(self) -> float:
        """Seconds since this node's heartbeat last committed (its own view of its health)."""
        return time.monotonic() - self._last_beat

    def _look_after_peers(self, on_time: bool = False) -> None:
        """In a thread, every heartbeat: reap dead peers, watch new ones; when this node's own beats
        are on time, take the leases and scheduler office of peers whose heartbeats are not."""
        if self._without_liveness_locks:
            return
        self._reap_dead()
        self._watch_peers()
        stalled = self._stalled_peers()  # observed every beat, so stillness is timed from the first look
        if on_time and not self._without_election:
            self._reap_stalled(stalled)
            self._wait_for_the_current_office_file()

    async def _watch_office(self) -> None:
        """An eligible standby looks at the scheduler's heartbeat four times a heartbeat, so that a
        stalled scheduler is replaced within its stall limit and a fraction of a heartbeat, not two."""
        assert self._stop is not None
        while not self._stop.is_set():
            await asyncio.sleep(self.heartbeat / 4)
            if self.epoch is None and self.stalled_for() <= self.stall_after:
                try:
                    await run_in_thread(lambda: self._take_office_if_stalled(self._stalled_peers()))
                except Exception as error:  # a busy database: the next look may do
                    self.say(f"looking at the scheduler's heartbeat failed: {type(error).__name__}: {error}")

    def _watch_peers(self) -> None:
        """A thread per live peer waits on its liveness lock: the kernel says when it dies."""
        assert self.nf is not None
        directory = self.nf.doorbells.directory
        for peer, pid in _lock_file_holders(directory, ".lock").items():
            if peer == self.id or pid is None:
                continue
            watcher = self._peers.get(peer)
            if watcher is not None and not watcher.done:
                continue
            watcher = _FlockWaiter(
                os.path.join(directory, f"{peer}.lock"),
                functools.partial(self._peer_died, peer),
                f"nodeflow-watch-{peer}",
            )
            self._peers[peer] = watcher
            watcher.start()

    def _peer_died(self, peer: str, fd: int) -> None:
        """In a watcher thread holding the dead peer's liveness lock: clear its files, hand back its work."""
        assert self.nf is not None
        directory = self.nf.doorbells.directory
        lock_path = os.path.join(directory, f"{peer}.lock")
        try:
            current = os.stat(lock_path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        with _LOCK_FDS_MUTEX:
            if current == os.fstat(fd).st_ino:  # not cleared yet by another node
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, f"{peer}.sock"))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)  # while still locked: a restart makes a new file
            _close_lock_fd(fd)
        if self._stop is not None and self._stop.is_set():
            return  # we are leaving too: the nodes that stay reap it
        try:
            self._reap_dead()
        except NodeflowError as error:
            self.say(f"could not reap node {peer}: {error}")

    def _reap_dead(self) -> None:
        """Mark dead every running node whose liveness lock is free, and hand back its leases."""
        assert self.nf is not None
        # The rows first, then the kernel's word: a node that joins in between is seen alive.
        rows = self.nf.store.read(
            lambda conn: conn.execute("SELECT id, pid FROM nodes WHERE state = 'running'").fetchall()
        )
        if _kernel_flock_owners() is None:
            return  # /proc/locks unreadable: nobody can be known dead, so nobody is reaped
        alive = live_nodes(self.nf.store.lock_dir)
        for peer, pid in rows:
            if peer == self.id or peer in alive or not liveness_lock_free(self.nf.store.lock_dir, peer, pid):
                continue

            def reap(conn: sqlite3.Connection, peer: str = peer, pid: int = pid) -> tuple[int, set[str]] | None:
                # The pid guards against a peer that restarted under the same id meanwhile.
                if not conn.execute(
                    "UPDATE nodes SET state = 'dead' WHERE id = ? AND pid = ? AND state = 'running'", (peer, pid)
                ).rowcount:
                    return None
                return hand_back_leases(conn, peer, f"node {peer} died")

            try:
                released = self.nf.committer.submit(reap)
            except NodeflowError as error:
                self.say(f"could not mark node {peer} dead: {error}")
                continue
            if released is not None:
                count, queues = released
                self.say(f"node {peer} (pid {pid}) is gone: its liveness lock is free; handed back {count} leases")
                if queues:
                    self.nf._ring({_ring_topic_for_queue(queue) for queue in queues})

    def _observe_peers(self) -> dict[str, tuple[int, float, float, float]]:
        """Every running peer: (pid, its heartbeat as last read, how long that heartbeat has stood still
        by this node's monotonic clock, the stall limit it declared). Stillness is measured here,
        never by comparing wall clocks: a clock step, or a skew between processes, must not make a
        peer look stalled; and each peer is judged by its own limit, which suits its heartbeat."""
        assert self.nf is not None
        rows = self.nf.store.read(
            lambda conn: conn.execute(
                "SELECT id, pid, heartbeat, stall_after FROM nodes WHERE state = 'running' AND id != ?", (self.id,)
            ).fetchall()
        )
        now = time.monotonic()
        seen: dict[str, tuple[int, float, float]] = {}
        limits: dict[str, float] = {}
        for peer, pid, beat, limit in rows:
            known = self._peer_beats.get(peer)
            seen[peer] = known if known is not None and known[:2] == (pid, beat) else (pid, beat, now)
            limits[peer] = max(limit or DEFAULT_STALL_AFTER, self.heartbeat)  # an older node declares none
        self._peer_beats, self._peer_limits = seen, limits
        return {peer: (pid, beat, now - since, limits[peer]) for peer, (pid, beat, since) in seen.items()}

    def _stalled_peers(self) -> dict[str, tuple[int, float, float, float]]:
        """The running peers whose heartbeats have stood still for longer than their stall limits."""
        return {peer: seen for peer, seen in self._observe_peers().items() if seen[2] > seen[3]}

    def _reap_stalled(self, stalled: dict[str, tuple[int, float, float, float]]) -> None:
        """Hand back the leases of every peer that has stalled: a node frozen (SIGSTOP, Ctrl-Z) or with
        its event loop blocked renews nothing, and its messages and workflow runs must not wait for
        it. When it wakes, its acks fail (LeaseLost) and the burst commits in them with them; its
        handlers' outside effects may have happened once more."""
        assert self.nf is not None
        for peer, (pid, beat, silent, _) in stalled.items():
            why = f"node {peer} stalled: no heartbeat for {_format_seconds(silent)}"

            def reap(
                conn: sqlite3.Connection, peer: str = peer, pid: int = pid, beat: float = beat, why: str = why
            ) -> tuple[int, set[str]]:
                still = "SELECT 1 FROM nodes WHERE id = ? AND pid = ? AND state = 'running' AND heartbeat = ?"
                if conn.execute(still, (peer, pid, beat)).fetchone() is None:
                    return 0, set()  # it beat again meanwhile, or left
                return hand_back_leases(conn, peer, why)

            try:
                count, queues = self.nf.committer.submit(reap)
            except NodeflowError as error:
                self.say(f"could not take the leases of stalled node {peer}: {error}")
                continue
            if count:
                self.say(
                    f"node {peer} (pid {pid}) stalled: no heartbeat for {_format_seconds(silent)}; "
                    f"handed back {count} leases"
                )
                self.nf._ring({_ring_topic_for_queue(queue) for queue in queues})

    def _holder_stalled(self, conn: sqlite3.Connection, holder: LockInfo) -> bool:
        """For the workflow runner, in a transaction: whether an instance lock's holder is another
        node of this cluster whose heartbeat has stood still past stall_after, while ours is on time."""
        if holder.node is None or holder.node == self.id or self.stalled_for() > self.stall_after:
            return False
        seen = self._peer_beats.get(holder.node)
        limit = self._peer_limits.get(holder.node, DEFAULT_STALL_AFTER)
        if seen is None or seen[0] != holder.pid or time.monotonic() - seen[2] <= limit:
            return False
        row = conn.execute(
            "SELECT heartbeat FROM nodes WHERE id = ? AND pid = ? AND state = 'running'", (holder.node, holder.pid)
        ).fetchone()
        return row is not None and row[0] == seen[1]

    # Election and the scheduler -----------------------------------------------------------

    def _stand_for_election(self) -> None:
        assert self.nf is not None
        self._election = _FlockWaiter(
            os.path.join(self.nf.store.lock_dir, "scheduler.lock"), self._won_election, "nodeflow-election", True
        )
        self._election.start()

    def _won_election(self, fd: int) -> None:
        """In the election thread, holding scheduler.lock: take office, then schedule on the loop."""
        assert self.nf is not None and self._loop is not None
        path = os.path.join(self.nf.store.lock_dir, "scheduler.lock")
        while True:
            try:
                epoch = self.nf.committer.submit(functools.partial(take_office, node=self.id, fd=fd, path=path))
                break
            except LostOffice as error:  # the file was replaced by a node taking office from a stalled one
                self.say(f"not taking office: {error}; standing again")
                with _LOCK_FDS_MUTEX:
                    _close_lock_fd(fd)
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._stand_again)
                return
            except NodeflowError as error:
                if self._stop is not None and self._stop.is_set():
                    with _LOCK_FDS_MUTEX:
                        _close_lock_fd(fd)
                    return
                self.say(f"taking office failed ({error}); retrying")
                time.sleep(0.5)
        self._took_office(fd, epoch)

    def _stand_again(self) -> None:
        """On the loop: wait for scheduler.lock again (a new waiter on the file at the path now)."""
        assert self._stop is not None
        if not self._stop.is_set() and self.epoch is None:
            if self._election is not None:
                self._election.stop()
            self._stand_for_election()

    def _take_office_if_stalled(self, stalled: dict[str, tuple[int, float, float, float]]) -> None:
        """In a thread, every heartbeat of an eligible standby: take office from a scheduler whose
        heartbeat has stood still past stall_after, or when office has stood empty (or held by a
        node no longer running) that long: its holder froze between locking scheduler.lock and
        taking office, or every waiter waits on a file a frozen node holds."""
        assert self.nf is not None and self._loop is not None and self._stop is not None
        if self.role == "replica" or self.epoch is not None or self._stop.is_set():
            return
        if not self._office_mutex.acquire(blocking=False):
            return  # another thread of this node is at it
        try:
            self._take_office_from_the_stalled(stalled)
        finally:
            self._office_mutex.release()

    def _take_office_from_the_stalled(self, stalled: dict[str, tuple[int, float, float, float]]) -> None:
        assert self.nf is not None
        epoch, holder = self.nf.store.read(
            lambda conn: conn.execute("SELECT epoch, node FROM election WHERE id = 1").fetchone()
        )
        if holder == self.id:
            return
        last_beat: float | None = None
        if holder is not None and holder in self._peer_beats:  # a running node in office
            self._office_vacant = None
            if holder not in stalled:
                return  # a scheduler on time
            last_beat = stalled[holder][1]
            silent = f"{holder} has had no heartbeat for {_format_seconds(stalled[holder][2])}"
        else:  # nobody (running) in office: a waiter usually takes it in milliseconds; take it if none did
            if self._office_vacant is None or self._office_vacant[0] != epoch:
                self._office_vacant = (epoch, time.monotonic())
            if time.monotonic() - self._office_vacant[1] <= self.stall_after:
                return
            silent = f"office has stood empty for {_format_seconds(time.monotonic() - self._office_vacant[1])}"
        lock_dir = self.nf.store.lock_dir
        path = os.path.join(lock_dir, "scheduler.lock")
        replacement = os.path.join(lock_dir, f".scheduler.{os.getpid()}.lock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(replacement)
        try:
            fd = open_lock_file(replacement, (lock_dir,))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (OSError, StoreError) as error:
            self.say(f"cannot take office from a stalled scheduler ({error})")
            return
        try:
            epoch = self.nf.committer.submit(
                functools.partial(
                    take_office_from_stalled, node=self.id, epoch=epoch, last_beat=last_beat,
                    replacement=replacement, path=path,
                )
            )  # fmt: skip
        except NodeflowError as error:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(replacement)
            held_path = _is_file_at(fd, path)  # renamed, and then the commit failed: we hold the office file
            if not held_path:
                with _LOCK_FDS_MUTEX:
                    _close_lock_fd(fd)
                if not isinstance(error, LostOffice):
                    self.say(f"could not take office from a stalled scheduler: {error}")
                return
            self._won_election(fd)  # take office as any holder of the file would
            return
        self._office_vacant = None
        if self._election is not None:
            self._election.stop()  # it waits on the old file, which the stalled node holds; it lets go later
        self._took_office(fd, epoch, silent)

    def _wait_for_the_current_office_file(self) -> None:
        """A standby whose election thread waits on a scheduler.lock that was replaced (office taken
        from a stalled node, which still holds the old file) waits on the new one instead: else it
        would only take office by the slower stall rule when the new scheduler dies."""
        assert self.nf is not None and self._loop is not None
        waiter = self._election
        if waiter is None or self.epoch is not None or waiter.waiting_on is None:
            return
        try:
            current = os.stat(os.path.join(self.nf.store.lock_dir, "scheduler.lock"), follow_symlinks=False).st_ino
        except OSError:
            return
        if current != waiter.waiting_on and not waiter.done:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stand_again)

    def _took_office(self, fd: int, epoch: int, taken_from: str | None = None) -> None:
        """In a thread, right after the commit that bumped the epoch: say so now (the log's time is the
        commit's, even if the event loop is held up), then begin scheduling on the loop."""
        self.say(
            f"took office as the scheduling node (epoch {epoch})" + (f": {taken_from}" if taken_from else ""),
            label="scheduler",
        )
        try:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._begin_office, fd, epoch)
        except RuntimeError:  # the loop is closed: the node has gone
            with _LOCK_FDS_MUTEX:
                _close_lock_fd(fd)

    def _begin_office(self, fd: int, epoch: int) -> None:
        assert self._stop is not None
        if self._stop.is_set():  # won while stopping: leave at once
            with _LOCK_FDS_MUTEX:
                _close_lock_fd(fd)
            self.say(f"left office at once (epoch {epoch}): this node is stopping")
            return
        self._office_fd, self.epoch = fd, epoch
        self._scheduling = self._supervised(self._schedule(epoch), "the scheduler")

    async def _schedule(self, epoch: int) -> None:
        """While in office: fire what is due (and prune the logs), and remove ended instances past
        their retention, side by side."""
        retention = asyncio.create_task(self._retain())
        try:
            await self._fire_timers(epoch)
        finally:
            retention.cancel()

    async def _retain(self) -> None:
        """Remove ended instances past their retention, batch by batch, while in office. Between
        batches it pauses four times as long as the batch took, so it holds the writer a fifth of
        the time at most, and other nodes' work goes on at close to its usual pace."""
        assert self.nf is not None
        nf, removed = self.nf, 0
        while True:
            began = time.monotonic()
            try:
                now = time.time()
                instances, _, more = await nf.committer.asubmit(
                    functools.partial(
                        prune_ended_batch,
                        ended_before=now - self.keep_instances,
                        faulted_before=now - self.keep_faulted,
                    )
                )
            except Exception as error:  # a busy database, a full disk: the next round may do better
                self.say(
                    f"removing ended instances failed: {describe_failure(error)}; trying again in "
                    f"{_format_seconds(PRUNE_INTERVAL)}"
                )
                await asyncio.sleep(PRUNE_INTERVAL)
                continue
            removed += instances
            self.instances_pruned += instances
            if more:
                await asyncio.sleep(max(0.01, 4 * (time.monotonic() - began)))
                continue
            if removed:
                self.say(f"removed {removed} instance(s) ended more than {_format_seconds(self.keep_instances)} ago")
                removed = 0
            await asyncio.sleep(PRUNE_INTERVAL)

    async def _fire_timers(self, epoch: int) -> None:
        """Fire what is due, sleep until the next due time or a ring, and again, while in office."""
        assert self.nf is not None and self._stop is not None
        nf = self.nf
        next_prune = time.monotonic() + PRUNE_INTERVAL
        while not self._stop.is_set():
            seen = nf.wakeups.generation(RING_TIMERS)
            try:
                if not self._keep_office_file():
                    raise LostOffice("scheduler.lock was replaced, and another node holds the new one")
                fired, queues, lateness = await nf.committer.asubmit(_fire_due_work(epoch, self.id))
            except LostOffice as error:  # another node took office: we were stalled, or our file was removed
                self.say(f"lost office (epoch {epoch}): {error}; stepped down and standing again")
                if self._office_fd is not None:
                    with _LOCK_FDS_MUTEX:
                        _close_lock_fd(self._office_fd)
                self._office_fd, self.epoch, self._scheduling = None, None, None
                self._stand_for_election()
                return
            except Exception as error:  # a busy database, or anything else: the loop must outlive it
                self.say(f"firing timers failed: {error}; retrying")
                await asyncio.sleep(min(1.0, self.settings.poll_interval))
                continue
            if fired:
                self.timers_fired += fired
                self.timer_lateness += lateness
                nf._ring({_ring_topic_for_queue(queue) for queue in queues})
                if fired == FIRE_BATCH:
                    continue
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_INTERVAL
                with contextlib.suppress(NodeflowError):
                    pruned = await nf.committer.asubmit(
                        functools.partial(
                            prune_instructions,
                            max_age=self.settings.instruction_max_age,
                            max_count=self.settings.instruction_max_count,
                        )
                    )
                    if pruned:
                        self.say(f"pruned {pruned} old instructions")
                    await nf.committer.asubmit(
                        functools.partial(prune_timer_firings, max_age=self.settings.instruction_max_age)
                    )
            due = nf.store.read(_next_due)
            # Wake at the next due time, on a ring (a timer added), and at least every second:
            # a wall-clock step must not leave a timer waiting long.
            pause = 1.0 if due is None else min(1.0, max(0.0, due - time.time()))
            await nf.wakeups.await_change(RING_TIMERS, seen, pause)

    def _keep_office_file(self) -> bool:
        """Whether we still hold the file at scheduler.lock; when it was removed (the lock folder
        deleted, say), lock a new one: a node starting now would otherwise find it free and take
        office too (its new epoch would depose us, but the cluster would change scheduler for nothing)."""
        assert self.nf is not None
        if self._office_fd is None:
            return True
        lock_dir = self.nf.store.lock_dir
        path = os.path.join(lock_dir, "scheduler.lock")
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(self._office_fd).st_ino:
                return True
        except FileNotFoundError:
            pass
        except OSError as error:  # the folder is not one just now (ENOTDIR, EACCES): look again next time
            self.say(f"cannot look at scheduler.lock ({error.strerror}); keeping office and looking again")
            return True
        try:
            fd = open_lock_file(path, (lock_dir,))
        except (OSError, StoreError) as error:
            self.say(f"scheduler.lock was removed and cannot be made again ({error}); trying again")
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            kept = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except OSError:
            kept = False
        with _LOCK_FDS_MUTEX:
            _close_lock_fd(self._office_fd if kept else fd)
        if kept:
            self._office_fd = fd
            self.say("scheduler.lock was removed; locked a new one and kept office")
        return kept

    async def _fire_without_election(self) -> None:
        """For `demo timers` only: what every node does when no election picks one to schedule.
        Each wakes when a timer falls due, reads what is due, sends it, then marks it fired; the
        others woke at the same moment, read the same timers before that mark, and send them too."""
        assert self.nf is not None and self._stop is not None
        nf = self.nf
        while not self._stop.is_set():
            try:
                await self._fire_what_is_due_without_election(nf)
            except NodeflowError as error:
                self.say(f"firing timers failed: {error}")
                await asyncio.sleep(0.2)

    async def _fire_what_is_due_without_election(self, nf: Cluster) -> None:
        """One pass: read what is due, send it, then mark it fired; then sleep until the next is due."""
        due = nf.store.read(
            lambda conn: conn.execute(
                "SELECT name, queue, body FROM timers WHERE due IS NOT NULL AND due <= ?", (time.time(),)
            ).fetchall()
        )
        for _name, queue, body in due:
            await nf.asend(queue, json.loads(body))
            self.timers_fired += 1
        if due:
            self.say(f"fired {len(due)} timers (no election: every node fires what it sees due)")
            marks = [(time.time(), row[0]) for row in due]

            def mark(conn: sqlite3.Connection, marks: list[tuple[float, str]] = marks) -> None:
                conn.executemany(
                    "UPDATE timers SET due = NULL, fired = fired + 1, last_fired = ? WHERE name = ?", marks
                )

            await nf.committer.asubmit(mark)
        # Like an in-process timer, wake when the next one falls due: every node wakes at once.
        following = nf.store.read(_next_due)
        await asyncio.sleep(0.2 if following is None else min(0.2, max(0.0, following - time.time())))

    async def _step_down(self) -> None:
        """Leave office (if in it) before leaving the cluster, so a standby takes over at once."""
        assert self.nf is not None
        if self._election is not None:
            self._election.stop()
        if self._scheduling is not None:
            self._scheduling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._scheduling
        if self._office_fd is None:
            return
        epoch = self.epoch
        now = time.time()
        with contextlib.suppress(NodeflowError):  # since: when office fell empty (see _take_office_if_stalled)
            await self.nf.committer.asubmit(
                lambda conn: conn.execute(
                    "UPDATE election SET node = NULL, since = ? WHERE id = 1 AND epoch = ?", (now, epoch)
                )
            )
        with _LOCK_FDS_MUTEX:
            _close_lock_fd(self._office_fd)
        self._office_fd = None
        self.say(f"stepped down (epoch {epoch})")
        self.epoch = None


# ══════════════════════════════════════════════════════════════════════════════════════════
# 11. HTTP: a small asyncio HTTP/1.1 server in a node: the JSON API, the dashboard, /metrics.
# ══════════════════════════════════════════════════════════════════════════════════════════

# The dashboard: one page, no outside assets; it polls the JSON API of the node that served it.
DASHBOARD_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>nodeflow</title>
<style>
:root{color-scheme:light dark;--bg:#f5f6f8;--fg:#1c2230;--mut:#667085;--card:#fff;--line:#e2e5ea;--ok:#1a9c4b;
--warn:#c98300;--bad:#d03b3b;--off:#98a2b3;--acc:#3b5bdb;--hl:#fff1b8;--nl:36%}
@media(prefers-color-scheme:dark){:root{--bg:#111419;--fg:#e4e7ee;--mut:#98a2b3;--card:#1a1e26;--line:#2b313c;
--ok:#3ecf72;--warn:#f0b429;--bad:#f26b6b;--off:#7a8494;--acc:#7c9cff;--hl:#4d4213;--nl:70%}}
*{box-sizing:border-box}[hidden]{display:none!important}
body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:6px 18px;padding:14px 20px;
border-bottom:1px solid var(--line);background:var(--card)}
h1{font-size:20px;margin:0}
h2{font-size:13px;text-transform:uppercase;letter-spacing:.6px;color:var(--mut);margin:0 0 10px}
#cluster-line{font-size:15px;margin:0}
.meta{color:var(--mut);font-size:12.5px;margin-left:auto}
#banner{margin:12px 20px 0;padding:10px 14px;border-radius:8px;border:1px solid var(--bad);
background:color-mix(in srgb,var(--bad) 12%,var(--card));font-weight:500}
#banner[data-kind=auth]{border-color:var(--warn);background:color-mix(in srgb,var(--warn) 14%,var(--card))}
main{display:grid;gap:16px;padding:16px 20px 28px;grid-template-columns:minmax(0,1fr)}
@media(min-width:960px){main{grid-template-columns:minmax(0,3fr) minmax(0,2fr)}}
.full{grid-column:1/-1}.col{display:grid;gap:16px;align-content:start}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px;min-width:0}
.stale main{opacity:.55}
#nodes{display:grid;gap:12px;grid-template-columns:repeat(auto-fill,minmax(230px,1fr))}
.node{border:1px solid var(--line);border-left:5px solid var(--off);border-radius:9px;padding:10px 12px;
background:var(--card)}
.node[data-state=running]{border-left-color:var(--ok)}.node[data-state=stalled]{border-left-color:var(--warn)}
.node[data-state=dead]{border-left-color:var(--bad);background:color-mix(in srgb,var(--bad) 7%,var(--card))}
.node[data-scheduler=true]{border:2px solid var(--acc);border-left-width:5px;
box-shadow:0 0 0 3px color-mix(in srgb,var(--acc) 18%,transparent)}
.nhead{display:flex;align-items:center;gap:5px 8px;flex-wrap:wrap}
.nid{font-size:26px;font-weight:700;line-height:1.1}
.badge{font-size:10.5px;font-weight:700;letter-spacing:.5px;padding:2px 7px;border-radius:20px;
border:1px solid var(--line);color:var(--mut);white-space:nowrap}
.b-sched{background:var(--acc)}.b-dead{background:var(--bad)}.b-stalled{background:var(--warn)}
.badge[class*=b-]{border-color:transparent;color:#fff}
.nstate{display:flex;align-items:center;gap:6px;margin:4px 0 6px;font-weight:600}
.dot{width:10px;height:10px;border-radius:50%;background:var(--off)}
[data-state=running] .dot{background:var(--ok)}[data-state=stalled] .dot{background:var(--warn)}
[data-state=dead] .dot{background:var(--bad)}
.kv{display:grid;grid-template-columns:auto 1fr;gap:2px 10px;margin:0;font-size:12.5px}
dt{color:var(--mut)}dd{margin:0;min-width:0;overflow-wrap:anywhere}
.nc{color:hsl(var(--h,220) 65% var(--nl));font-weight:600}
.chip{white-space:nowrap}.chip:before{content:"";display:inline-block;width:8px;height:8px;margin-right:4px;
border-radius:50%;background:hsl(var(--h,220) 65% 50%)}
.tag{display:inline-block;font-size:11.5px;padding:0 6px;border-radius:5px;
background:color-mix(in srgb,var(--fg) 7%,transparent);margin:1px 3px 1px 0;max-width:100%}
.tag,.trunc{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}.tag{vertical-align:bottom}
.trunc{max-width:220px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:4px 8px 4px 0;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--mut);font-weight:500;font-size:12px}
.num{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:var(--bad);font-weight:600}.warn{color:var(--warn)}.mut{color:var(--mut)}.ok{color:var(--ok)}
#instance-counts{display:grid;grid-template-columns:repeat(4,1fr);gap:8px;margin-bottom:12px}
.tile{border:1px solid var(--line);border-radius:8px;padding:6px 10px;font-size:12px;color:var(--mut)}
.tile b{display:block;font-size:24px;font-variant-numeric:tabular-nums}
[data-status=running]>b,.st-running{color:var(--acc)}[data-status=waiting]>b,.st-waiting{color:var(--warn)}
[data-status=completed]>b,.st-completed{color:var(--ok)}[data-status=faulted]>b,.st-faulted{color:var(--bad)}
.list{list-style:none;margin:0;padding:0}
.inst{display:grid;grid-template-columns:5.5em minmax(6em,auto) 6.5em minmax(0,1fr);gap:8px;align-items:baseline;
padding:5px 6px;border-bottom:1px solid var(--line);cursor:pointer}
.inst:hover,.inst:focus{background:color-mix(in srgb,var(--acc) 9%,transparent);outline:none}
.inst.sel{background:color-mix(in srgb,var(--acc) 16%,transparent)}
.mono,textarea{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
.st{font-size:12px;font-weight:600}
#journal li{display:flex;gap:8px;flex-wrap:wrap;padding:3px 0;border-bottom:1px dashed var(--line);font-size:12.5px}
.lnk{cursor:pointer;text-decoration:underline dotted}
.empty{color:var(--mut);font-style:italic;margin:4px 0}
form{display:grid;gap:6px;margin-bottom:14px}
label{display:grid;gap:3px;font-size:12.5px;color:var(--mut)}
select,input,textarea,button{font:inherit;color:inherit;background:var(--bg);border:1px solid var(--line);
border-radius:6px;padding:5px 8px}
button{background:var(--acc);color:#fff;font-weight:600;cursor:pointer;justify-self:start;padding:5px 16px}
button:disabled{opacity:.5}
.result{margin:0;font-size:13px;overflow-wrap:anywhere}
.result[data-ok=true]{color:var(--ok)}.result[data-ok=false]{color:var(--bad)}
#panel{position:fixed;top:0;right:0;bottom:0;width:min(520px,100vw);background:var(--card);
border-left:1px solid var(--line);box-shadow:-6px 0 24px #0003;padding:16px;overflow:auto}
#panel-close{float:right;background:none;color:var(--fg);padding:2px 10px}
pre{background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:8px;overflow:auto;max-height:200px;
font-size:12px;margin:4px 0 12px}
@keyframes chg{from{background:var(--hl)}}
.chg{animation:chg 1.4s ease-out}
@media(prefers-reduced-motion:reduce){.chg{animation:none}}
</style>
</head>
<body>
<header>
<h1>nodeflow</h1>
<p id="cluster-line"><span id="sum-nodes">connecting…</span> · scheduler <b id="scheduler">…</b><span
  id="epoch-wrap"> · epoch <b id="epoch">…</b></span></p>
<span class="meta">served by <b id="served-by" class="nc">…</b> · <span id="updated">not updated yet</span></span>
</header>
<div id="banner" role="alert" hidden></div>
<main>
<section class="full"><h2>Nodes</h2><div id="nodes"></div>
<p id="nodes-empty" class="empty" hidden>No node has joined this cluster.</p></section>
<div class="col">
<section><h2>Instances</h2><div id="instance-counts"></div>
<ul id="instances" class="list"></ul><p id="instances-empty" class="empty" hidden>No instances yet.</p>
<p id="instances-err" class="result" data-ok="false"></p></section>
<section><h2>Latest steps</h2><ol id="journal" class="list"></ol>
<p id="journal-empty" class="empty" hidden>No steps yet.</p><p id="journal-err" class="result" data-ok="false"></p>
</section>
</div>
<div class="col">
<section><h2>Queues</h2><table id="queues"><thead><tr><th>queue</th><th class="num">ready</th>
<th class="num">in flight</th><th class="num">delayed</th><th class="num">dead</th></tr></thead><tbody></tbody>
</table><p id="queues-empty" class="empty" hidden>No queues.</p></section>
<section><h2>Locks held</h2><table id="locks"><thead><tr><th>name</th><th>node</th><th class="num">fence</th>
<th>held for</th></tr></thead><tbody></tbody></table><p id="locks-empty" class="empty" hidden>No locks held.</p>
</section>
<section><h2>Timers</h2><table id="timers"><thead><tr><th>name</th><th>queue</th><th>schedule</th><th>next due</th>
</tr></thead><tbody></tbody></table><p id="timers-empty" class="empty" hidden>No timers.</p></section>
<section><h2>Kept signals <span id="kept-count" class="mut"></span></h2><table id="kept"><thead><tr><th>name</th>
<th>sent</th><th>expires</th></tr></thead><tbody></tbody></table><p id="kept-empty" class="empty" hidden>No signal
is waiting for an instance to take it.</p></section>
<section><h2>Controls</h2>
<form id="start-form"><label>Start an instance of<select id="start-definition"></select></label>
<label>Input (JSON object)<textarea id="start-input" rows="3" spellcheck="false">{}</textarea></label>
<button id="start-button">Start</button><p id="start-result" class="result" role="status"></p></form>
<form id="signal-form"><label>Send the signal named<input id="signal-name" placeholder="approve-42"
  autocomplete="off"></label>
<label>Input (JSON object)<textarea id="signal-input" rows="3" spellcheck="false">{}</textarea></label>
<button id="signal-button">Send signal</button><p id="signal-result" class="result" role="status"></p></form>
</section>
</div>
</main>
<aside id="panel" hidden>
<button id="panel-close" type="button" aria-label="Close">&times;</button>
<h2 id="panel-title">Instance</h2><dl class="kv" id="panel-meta"></dl>
<p id="panel-err" class="result" data-ok="false"></p>
<p id="panel-actions"><button id="panel-cancel" type="button" hidden>Cancel instance</button>
<button id="panel-retry" type="button" hidden>Retry</button></p>
<h2 style="margin-top:12px">Variables</h2><pre id="panel-vars"></pre>
<h2>Journal</h2><table id="panel-journal"><thead><tr><th class="num">#</th><th>node</th><th class="num">fence</th>
<th>activity</th><th>outcome</th><th>time</th></tr></thead><tbody></tbody></table>
</aside>
<script>
'use strict';
(()=>{
const POLL=1000,TIMEOUT=4000,WIN=10,JLIM=50,FEED=20;
const $=(id)=>document.getElementById(id);
let token=null,skew=0,timer=null,busy=false,lastOk=0,sel=null,journal=[],defsAt=0;
const prev={},deadAt={};
const readToken=()=>{const m=/(?:^#|&)token=([^&]*)/.exec(location.hash); token=m?decodeURIComponent(m[1]):null;};
const now=()=>Date.now()+skew;

// DOM helpers: text only, so no server string ever becomes markup
function h(tag,props,...kids){
 const e=document.createElement(tag);
 for(const k in props||{}){
  const v=props[k];
  if(v==null) continue;
  if(k==='t') e.textContent=v; else if(k==='c') e.className=v; else e.setAttribute(k,v); // t: text, c: class
 }
 for(const c of kids) if(c!=null) e.append(c);
 return e;
}
const flash=(e)=>{e.classList.remove('chg'); void e.offsetWidth; e.classList.add('chg');};
function txt(e,v,quiet){// set text; highlight a change (not the first fill, not when quiet)
 const s=v==null?'':String(v);
 if(e.textContent===s) return;
 const seen=e.dataset.seen;
 e.textContent=s; e.dataset.seen=1;
 if(seen&&!quiet) flash(e);
}
const show=(e,y)=>{e.hidden=!y;};
function hue(id){// one colour per node id everywhere: nN -> golden-angle steps, other ids -> hash
 id=String(id==null?'':id);
 const m=/^[^0-9]*([0-9]+)$/.exec(id);
 let n=m?+m[1]:7;
 if(!m) for(const c of id) n=(n*31+c.charCodeAt(0)) >>> 0;
 return Math.round((n*137.508+200)%360);
}
const paint=(e,id)=>{e.style.setProperty('--h',hue(id)); return e;};
const chip=(id)=>paint(h('span',{c:'chip nc',t:id==null?'?':id}),id);
const short=(id)=>{id=String(id==null?'':id); return id.length>6?'…'+id.slice(-6):id;};
const ms=(v)=>v==null||v===''?NaN:typeof v==='number'?(v>1e12?v:v*1000):Date.parse(v);
const clock=(v)=>{const t=ms(v); return isNaN(t)?'-':new Date(t).toLocaleTimeString([],{hour12:false});};
function dur(s){
 if(s==null||isNaN(s)) return '-';
 const a=Math.abs(s),f=Math.floor;
 return (s<0?'-':'')+(a<10?a.toFixed(1)+' s':a<60?Math.round(a)+' s':a<3600?f(a/60)+'m '+f(a%60)+'s'
 :a<86400?f(a/3600)+'h '+f(a%3600/60)+'m':f(a/86400)+'d '+f(a%86400/3600)+'h');
}
const plural=(n,w)=>n+' '+w+(n===1?'':'s');
const outCls=(o)=>/fault|error|fail/i.test(o)?'bad':/wait/i.test(o)?'warn':'ok';
const byId=(a,b)=>String(a.id).localeCompare(String(b.id),undefined,{numeric:true});

function sync(box,items,key,make,upd){// keyed list: one element per key, kept across polls
 const old=box._rows||new Map(),rows=new Map();
 let last=null;
 for(const it of items){
  const k=String(key(it));
  let e=old.get(k);
  const isNew=!e;
  if(isNew) e=make(it);
  if(upd) upd(e,it,isNew&&old.size>0);
  rows.set(k,e);
  const want=last?last.nextSibling:box.firstChild;
  if(want!==e) box.insertBefore(e,want);
  last=e;
 }
 old.forEach((e,k)=>{if(!rows.has(k)) e.remove();});
 box._rows=rows;
}

async function api(path,method,body){
 const ctl=new AbortController(),t=setTimeout(()=>ctl.abort(),TIMEOUT);
 const hd={Accept:'application/json' };
 if(token) hd.Authorization='Bearer '+token;
 if(body!==undefined) hd['Content-Type']='application/json';
 let res,text;
 try {
  res=await fetch(path,{method:method||'GET',headers:hd,cache:'no-store',signal:ctl.signal,
    body:body===undefined?undefined:JSON.stringify(body)});
  text=await res.text();
 } catch(e){
  throw Object.assign(new Error(e.name==='AbortError'?'no answer within '+TIMEOUT/1000+' s':'connection failed'),
    {net:true});
 } finally {clearTimeout(t);}
 const d=Date.parse(res.headers.get('Date')||''); // the node's clock, to judge "last 10 s" right
 if(!isNaN(d)){const s=d+500-Date.now(); skew=Math.abs(s)>2000?s:0;}
 let data=null;
 try {data=JSON.parse(text);} catch(e){data=null;}
 if(!res.ok) throw Object.assign(new Error((data&&data.error)||'HTTP '+res.status),{status:res.status});
 if(!data||typeof data!=='object') throw new Error('the node did not answer JSON');
 return data;
}

function banner(kind,msg){
 const b=$('banner');
 show(b,!!kind); b.dataset.kind=kind||''; b.textContent=msg||'';
 document.body.classList.toggle('stale',kind==='unreachable'||kind==='auth');
}
const authMsg=()=>'Unauthorized: '+
  (token?'this node refused the token in the address. ':'this node requires a token. ') +
 'Open the page as '+location.origin+location.pathname+'#token=YOUR_TOKEN';

async function poll(){
 timer=null;
 if(document.hidden||busy) return;
 busy=true;
 const want=sel,paths=['/api/status','/api/instances?limit=12','/api/journal?limit='+JLIM];
 if(want) paths.push('/api/instances/'+encodeURIComponent(want));
 const r=await Promise.allSettled(paths.map((p)=>api(p)));
 busy=false;
 try {handle(r,want);} catch(e){console.error(e);}
 if(lastOk&&Date.now()-defsAt>15000) loadDefs();
 if(!timer&&!document.hidden) timer=setTimeout(poll,POLL);
}
function pollNow(){clearTimeout(timer); timer=null; poll();}

function handle(r,want){
 const [st,inst,jr,one]=r;
 if(r.some((x)=>x.reason&&x.reason.status===401)){banner('auth',
   authMsg()); document.title='nodeflow · unauthorized'; return;}
 if(st.reason){
  const e=st.reason;
  if(!e.net) return banner('error','The node answered with an error: '+e.message);
  banner('unreachable','Node unreachable ('+e.message+'). ' +
   (lastOk?'Showing data from '+clock(lastOk)+', '+dur((Date.now()-lastOk)/1000)+' ago. ':'')+
     'Retrying every second…');
  document.title='nodeflow · unreachable';
  return;
 }
 banner();
 lastOk=Date.now();
 txt($('updated'),'updated '+clock(lastOk),1);
 if(jr.reason) txt($('journal-err'),'Latest steps unavailable: '+jr.reason.message);
 else {journal=Array.isArray(jr.value.journal)?jr.value.journal:[]; txt($('journal-err'),'');}
 renderStatus(st.value);
 renderFeed();
 if(inst.reason) txt($('instances-err'),'Instances unavailable: '+inst.reason.message);
 else {renderInstances(inst.value.instances||[]); txt($('instances-err'),'');}
 if(one&&want===sel){if(one.reason) txt($('panel-err'),one.reason.message); else renderPanel(one.value);}
}

function renderStatus(s){
 const me=s.node,sch=s.scheduler,t=now();
 txt(paint($('served-by'),me),me==null?'?':me,1);
 const nodes=(s.nodes||[]).slice().sort(byId),by={};
 nodes.forEach((n)=>{by[n.state]=(by[n.state]||0)+1;});
 const run=by.running||0;
 let line=(run===nodes.length?'':run+' of ')+plural(nodes.length,'node')+' running';
 ['stalled','dead','stopped'].forEach((k)=>{if(by[k]) line += ' · '+by[k]+' '+k;});
 txt($('sum-nodes'),line);
 txt($('scheduler'),sch?sch.node:'none');
 $('scheduler').className=sch?'nc':'warn';
 if(sch) paint($('scheduler'),sch.node);
 $('epoch-wrap').firstChild.textContent=sch?' · epoch ':''; // no scheduler: no epoch either
 txt($('epoch'),sch?sch.epoch:'');
 document.title='nodeflow · '+(me||'?')+(sch?' · scheduler '+sch.node:' · no scheduler');

 const locks=Array.isArray(s.locks)?s.locks:[],recent={};
 const at=(j)=>ms(j.ended)||ms(j.started);
 journal.forEach((j)=>{if(t-at(j)<=WIN*1000) (recent[j.node]=recent[j.node]||[]).push(j);});
 const full=journal.length>=JLIM&&
   t-at(journal[journal.length-1])<=WIN*1000; // the window holds more than we fetched
 sync($('nodes'),nodes,(n)=>n.id,makeNode,(e,n)=>updateNode(e,n,sch,me,locks,recent[n.id]||[],full));
 show($('nodes-empty'),!nodes.length);

 const qs=s.queues||{},internal=(n)=>n.startsWith('nodeflow.');
 const names=Object.keys(qs).sort((a,b)=>internal(a)-internal(b)||a.localeCompare(b));
 sync($('queues').tBodies[0],names,(n)=>n,(n)=>h('tr',{'data-queue': n},
  h('td',{c:'trunc',title:n,t:internal(n)?n.slice(9)+' (internal)':n}),
  h('td',{c:'num'}),h('td',{c:'num'}),h('td',{c:'num'}),h('td',{c:'num'})),(tr,n)=>{
  const q=qs[n]||{};
  ['ready','leased','delayed','dead'].forEach((k,i)=>txt(tr.cells[i+1],q[k]==null?0:q[k]));
  tr.cells[4].classList.toggle('bad',q.dead>0);
 });
 show($('queues-empty'),!names.length);

 sync($('locks').tBodies[0],locks,(l)=>l.name+'|'+l.fence,(l)=>h('tr',{'data-lock': l.name,title:'holder: '+
   (l.holder||'?')+(l.pid?' · pid '+l.pid:'')},
  h('td',{c:'trunc mono',title:l.name,t:l.name}),
  h('td',null,l.node?chip(l.node):h('span',{c:'mut',t:'pid '+l.pid})),
  h('td',{c:'num',t:l.fence}),h('td')),(tr,l)=>txt(tr.cells[3],dur((t-ms(l.since))/1000),1));
 show($('locks-empty'),!locks.length);

 const timers=Array.isArray(s.timers)?s.timers:[];
 sync($('timers').tBodies[0],timers,(x)=>x.name,(x)=>h('tr',{'data-timer': x.name},
  h('td',{c:'trunc',title:x.name,t:x.name}),h('td',{c:'trunc'}),h('td',{c:'mono'}),h('td')),(tr,x)=>{
  const nx=ms(x.next),c=tr.cells;
  txt(c[1],x.queue);
  txt(c[2],x.cron?x.cron+(x.tz?' ('+x.tz+')':''):'once');
  c[3].title=x.next||'';
  txt(c[3],isNaN(nx)?'fired':(nx>=t?'in '+dur((nx-t)/1000):'due '+dur((t-nx)/1000)+' ago')+' · '+clock(nx),1);
 });
 show($('timers-empty'),!timers.length);

 const kept=s.kept_signals||{},oldest=Array.isArray(kept.oldest)?kept.oldest:[];
 txt($('kept-count'),kept.count?'('+kept.count+')':'');
 sync($('kept').tBodies[0],oldest,(x)=>x.name+'|'+x.sent,(x)=>h('tr',{'data-kept': x.name},
  h('td',{c:'trunc mono',title:x.name,t:x.name}),h('td',{c:'mono',title:x.sent,t:clock(x.sent)}),
  h('td',{c:'mono',title:x.expires,t:clock(x.expires)})));
 show($('kept-empty'),!oldest.length);

 const c=s.instances||{};
 sync($('instance-counts'),['running','waiting','completed','faulted','cancelled'],(k)=>k,
  (k)=>h('div',{c:'tile','data-status': k},h('b'),k),(e,k)=>txt(e.firstChild,c[k]||0));
}

function makeNode(n){
 const f={},row=(label,key)=>[h('dt',{t:label}),f[key]=h('dd')];
 const e=h('article',{c:'node','data-node': n.id},
  h('div',{c:'nhead'},paint(h('span',{c:'nid nc',t:n.id}),n.id),f.badges=h('span',{c:'nhead'})),
  h('div',{c:'nstate'},h('span',{c:'dot'}),f.state=h('span')),
  h('dl',{c:'kv'},...row('role','role'),...row('pid','pid'),...row('heartbeat','hb'),
   ...row('doing','now'),...row('last 10 s','steps'),...row('locks','locks')));
 e._f=f;
 return e;
}
function updateNode(e,n,sch,me,locks,steps,full){
 const f=e._f,st=n.state||'unknown',was=prev[n.id],isSch=!!sch&&sch.node===n.id,gone=st==='dead'||st==='stopped';
 e.dataset.state=st;
 e.dataset.scheduler=isSch;
 e.dataset.self=n.id===me;
 if(was&&was!==st) flash(e);
 if(st!=='dead') delete deadAt[n.id]; else if(was&&was!=='dead') deadAt[n.id]=now();
 prev[n.id]=st;
 const b=[];
 if(isSch) b.push(h('span',{c:'badge b-sched',t:'SCHEDULER · epoch '+sch.epoch}));
 if(st==='dead'||st==='stalled') b.push(h('span',{c:'badge b-'+st,t:st.toUpperCase()}));
 if(n.id===me) b.push(h('span',{c:'badge',t:'serves this page' }));
 f.badges.replaceChildren(...b);
 txt(f.state,st);
 txt(f.role,n.role==='replica'?'replica (never schedules)':n.role);
 txt(f.pid,n.pid);
 const age=Number(n.heartbeat_age);
 let hb=dur(age)+' ago';
 if(gone) hb='last seen '+clock(now()-age*1000)+' ('+dur(age)+' ago)'+(deadAt[n.id]?' · dead since '+
   clock(deadAt[n.id]):'');
 else if(st==='stalled') hb='none for '+dur(age);
 txt(f.hb,hb,1);
 f.hb.className=st==='stalled'?'warn':st==='dead'?'bad':'';
 const j=steps[0];
 txt(f.now,gone?'—':j?j.activity+' ('+j.definition+' '+short(j.instance)+')':'idle');
 txt(f.steps,(full&&steps.length?'≥ ':'')+plural(steps.length,'step'));
 const mine=locks.filter((l)=>l.node===n.id);
 f.locks.replaceChildren(...(mine.length?mine.map((l)=>h('span',{c:'tag mono',title:l.name+' · fence '+l.fence,
   t:l.name+' #'+l.fence}))
 :[h('span',{c:'mut',t:'none' })]));
}

function detail(i){
 if(i.status==='faulted') return 'error: '+(i.error||'?');
 if(i.status==='waiting') return (i.activity?i.activity+' · ':'')+
   (i.waiting_for?'waits for '+i.waiting_for:'timer')+(i.wake_at?' until '+
   clock(i.wake_at):'');
 if(i.status==='completed') return 'done '+clock(i.ended);
 if(i.status==='cancelled') return 'cancelled '+clock(i.ended)+(i.activity?' at '+i.activity:'');
 return i.activity?'at '+i.activity:'';
}
function renderInstances(list){
 sync($('instances'),list.slice().reverse(),(i)=>i.id,(i)=>{
  const li=h('li',{c:'inst',tabindex:0,role:'button','data-instance': i.id},
   h('span',{c:'mono',title:i.id,t:short(i.id)}),h('span',{c:'trunc'}),h('span'),h('span',{c:'trunc'}));
  li.onclick=()=>openPanel(i.id);
  li.onkeydown=(ev)=>{if(ev.key==='Enter'||ev.key===' '){ev.preventDefault(); openPanel(i.id);}};
  return li;
 },(li,i,isNew)=>{
  const c=li.children,d=detail(i);
  li.dataset.status=i.status;
  li.classList.toggle('sel',i.id===sel);
  txt(c[1],i.definition+' v'+i.version);
  txt(c[2],i.status); c[2].className='st st-'+i.status;
  txt(c[3],d); c[3].title=d; c[3].classList.toggle('bad',i.status==='faulted');
  if(isNew) flash(li);
 });
 show($('instances-empty'),!list.length);
}

function renderFeed(){
 const rows=journal.slice(0,FEED);
 sync($('journal'),rows,(j)=>j.instance+':'+j.step+':'+j.fence,(j)=>{
  const o=j.outcome==null?'':String(j.outcome);
  const a=h('span',{c:'lnk',title:'instance '+j.instance,t:j.definition+' '+short(j.instance)});
  a.onclick=()=>openPanel(j.instance);
  return h('li',{'data-instance': j.instance,'data-node': j.node},h('span',{c:'mut mono',t:clock(j.ended||
    j.started)}),chip(j.node),a,
   h('span',{t:'#'+j.step+' '+j.activity}),h('span',{c:'mut',t:j.type}),h('span',{c:outCls(o),t:o}),
   h('span',{c:'mut',t:'fence '+j.fence}));
 },(li,j,isNew)=>{if(isNew) flash(li);});
 show($('journal-empty'),!rows.length);
}

function openPanel(id){
 sel=id;
 $('panel').dataset.instance=id;
 txt($('panel-title'),'Instance '+short(id)); $('panel-title').title=id;
 const tb=$('panel-journal').tBodies[0];
 tb._rows=null; tb.replaceChildren(); $('panel-meta').replaceChildren(); $('panel-vars').textContent='';
 txt($('panel-err'),'loading…');
 document.querySelectorAll('.inst').forEach((li)=>li.classList.toggle('sel',li.dataset.instance===id));
 show($('panel'),true);
 $('panel-close').focus();
 pollNow();
}
function closePanel(){
 sel=null; show($('panel'),false);
 document.querySelectorAll('.inst.sel').forEach((li)=>li.classList.remove('sel'));
}
function renderPanel(i){
 txt($('panel-err'),'');
 const kv=[['id',i.id,'mono'],['definition',i.definition+' v'+i.version],['status',i.status,'st st-'+i.status]];
 if(i.activity) kv.push(['activity',i.activity]);
 if(i.waiting_for) kv.push(['waits for',i.waiting_for+(i.wake_at?' until '+clock(i.wake_at):'')]);
 if(i.error) kv.push(['error',i.error,'bad']);
 kv.push(['created',clock(i.created)],['updated',clock(i.updated)]);
 if(i.ended) kv.push(['ended',clock(i.ended)]);
 if(i.key) kv.push(['key',i.key,'mono']);
 if(i.parent) kv.push(['parent',i.parent,'mono lnk']);
 (Array.isArray(i.children)?i.children:[]).forEach((ch)=>kv.push(['child',short(ch.id)+' '+ch.definition+' · '+
   ch.status,'mono']));
 $('panel-meta').replaceChildren(...kv.flatMap(([k,v,c])=>[h('dt',{t:k}),h('dd',{c:c,t:v})]));
 const up=$('panel-meta').querySelector('dd.lnk');
 if(up) up.onclick=()=>openPanel(i.parent);
 const cb=$('panel-cancel');
 show(cb,i.status!=='completed'&&i.status!=='cancelled');
 show($('panel-retry'),i.status==='faulted');
 if(cb.dataset.armed&&cb.dataset.armed!==i.id) disarm();
 txt($('panel-vars'),JSON.stringify(i.variables==null?{}:i.variables,null,2),1);
 sync($('panel-journal').tBodies[0],Array.isArray(i.journal)?i.journal:[],(j)=>j.step+':'+j.fence+':'+j.started,
   (j)=>{
  const o=j.outcome==null?'':String(j.outcome),took=ms(j.ended)-ms(j.started);
  return h('tr',{'data-step': j.step,'data-node': j.node},h('td',{c:'num',t:j.step}),h('td',null,chip(j.node)),
   h('td',{c:'num',t:j.fence}),h('td',null,j.activity+' ',h('span',{c:'mut',t:j.type})),
   h('td',{c:outCls(o),t:o}),
   h('td',{c:'mono',title:j.started+' → '+j.ended,t:clock(j.started)+(isNaN(took)?'':' · '+Math.max(0,
     Math.round(took))+' ms')}));
 },(tr,j,isNew)=>{if(isNew) flash(tr);});
}

async function loadDefs(){
 defsAt=Date.now();
 let defs;
 try {defs=(await api('/api/definitions')).definitions||[];} catch(e){return;}
 const s=$('start-definition'),keep=s.value,sig=JSON.stringify(defs.map((d)=>[d.id,d.version,d.name]));
 if(s._sig===sig) return;
 s._sig=sig;
 s.replaceChildren(...(defs.length?defs.map((d)=>h('option',{value:d.id,t:(d.name&&d.name!==d.id?d.name+' ('+d.id+
   ')':d.id)+' v'+d.version}))
 :[h('option',{value:'',t:'no definitions yet' })]));
 if(defs.some((d)=>d.id===keep)) s.value=keep;
}
function parseInput(text){
 if(!text.trim()) return {};
 let v;
 try {v=JSON.parse(text);} catch(e){throw new Error('Input is not valid JSON: '+e.message);}
 if(!v||typeof v!=='object'||
   Array.isArray(v)) throw new Error('Input must be a JSON object, such as {} or {"order": 42}.');
 return v;
}
function form(id,fail,run){// validate the JSON input, run, show the answer or the error
 const f=$(id),out=f.querySelector('.result'),btn=f.querySelector('button');
 const say=(ok,...msg)=>{out.dataset.ok=ok; out.replaceChildren(...msg);};
 f.addEventListener('submit',async (ev)=>{
  ev.preventDefault();
  let input;
  try {input=parseInput(f.querySelector('textarea').value);} catch(e){return say(false,e.message);}
  btn.disabled=true; say(true,'…');
  try {say(true,...await run(input)); pollNow();} catch(e){
   say(false,fail+(e.status===401?'unauthorized, open the page with #token=YOUR_TOKEN ('+e.message+')':e.message));
  } finally {btn.disabled=false;}
 });
}
form('start-form','Could not start: ',async (input)=>{
 const def=$('start-definition').value;
 if(!def) throw new Error('choose a definition first (add one with: nodeflow define FILE).');
 const r=await api('/api/instances','POST',{definition:def,input});
 $('start-result').dataset.instance=r.id;
 const a=h('span',{c:'lnk mono',title:'show its journal',t:r.id});
 a.onclick=()=>openPanel(r.id);
 return ['Started ',a];
});
form('signal-form','Could not send: ',async (input)=>{
 const name=$('signal-name').value.trim();
 if(!name) throw new Error('give the signal a name.');
 const r=await api('/api/signals/'+encodeURIComponent(name),'POST',{input});
 const rs=r.resumed||[],sd=r.started||[];
 if(r.kept) return ['Signal '+name+': no instance waits for it; kept until '+clock(r.kept_until)+
   ' for the next one that does'];
 return ['Signal '+name+': resumed '+rs.length+', started '+sd.length+(rs.length?' ('+rs.map(short).join(', ')+
   ')':'')];
});

$('start-definition').onfocus=()=>{if(Date.now()-defsAt>3000) loadDefs();};
$('panel-close').onclick=closePanel;
// Cancel asks twice (a second click within 5 s) rather than through a blocking confirm dialog.
function disarm(){const b=$('panel-cancel'); delete b.dataset.armed; txt(b,'Cancel instance');}
async function act(id,path,body,what){
 try {await api('/api/instances/'+encodeURIComponent(id)+path,'POST',body); txt($('panel-err'),'');}
 catch(e){txt($('panel-err'),'Could not '+what+': '+e.message);}
 pollNow();
}
$('panel-cancel').onclick=async ()=>{
 const b=$('panel-cancel'),id=sel;
 if(!id) return;
 if(b.dataset.armed!==id){b.dataset.armed=id; txt(b,'Click again to cancel '+short(id)); setTimeout(()=>{
  if(b.dataset.armed===id) disarm();},5000); return;}
 disarm(); b.disabled=true;
 try {await act(id,'/cancel',{reason:'cancelled from the dashboard'},'cancel');} finally {b.disabled=false;}
};
$('panel-retry').onclick=async ()=>{
 const b=$('panel-retry'),id=sel;
 if(!id) return;
 b.disabled=true;
 try {await act(id,'/retry',{},'retry');} finally {b.disabled=false;}
};
document.addEventListener('keydown',(e)=>{if(e.key==='Escape'&&sel) closePanel();});
document.addEventListener('visibilitychange',
  ()=>{if(document.hidden){clearTimeout(timer); timer=null;} else pollNow();});
window.addEventListener('hashchange',()=>{readToken(); loadDefs(); pollNow();});
readToken();
loadDefs();
poll();
})();
</script>
</body>
</html>
"""

HTTP_MAX_HEAD_BYTES = 16 * 1024  # request line and headers
HTTP_MAX_BODY_BYTES = 2 * 1024 * 1024  # a definition (256 KiB) or an input (1 MiB), with room
HTTP_READ_TIMEOUT = 10.0  # a request's head and body must arrive within this: a slow client is cut off
HTTP_IDLE_TIMEOUT = 30.0  # a kept-alive connection with no new request is closed after this
HTTP_MAX_CONNECTIONS = 128  # beyond this, new connections are answered 503 and closed
HTTP_WORKERS = 4  # threads that read the database and encode answers: the event loop never does
HTTP_DEFAULT_LIMIT = 1000  # instances listed when no ?limit= is given (the newest)
_HTTP_SINGLE_HEADERS = {"host", "content-length", "content-type", "authorization", "transfer-encoding", "origin"}
_HTTP_REASONS = {
    200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
    415: "Unsupported Media Type", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable",
}  # fmt: skip


class HTTPError(NodeflowError):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def parse_http_address(text: str, what: str = "--http") -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (on 127.0.0.1); port 0 takes any free port."""
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidInput(f"{what} {text!r}: give HOST:PORT, such as 127.0.0.1:8080") from None
    if not 0 <= port <= 65535:
        raise InvalidInput(f"{what} {text!r}: the port must be from 0 to 65535")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: it may resolve anywhere


def _proc_net_forms(host: str, port: int) -> list[tuple[str, str]]:
    """Where /proc/net may list one end of a TCP connection: (table, address as the table writes
    it: each 32-bit word in the host's byte order, in hexadecimal, then the port). An IPv4 address
    shows in "tcp", or in "tcp6" in its IPv4-mapped form when the socket is a dual-stack one."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    forms: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if address.version == 4:
        forms.append(ipaddress.IPv6Address(f"::ffff:{address}"))
    found = []
    for form in forms:
        packed = form.packed
        words = "".join(f"{int.from_bytes(packed[i : i + 4], sys.byteorder):08X}" for i in range(0, len(packed), 4))
        found.append(("tcp" if form.version == 4 else "tcp6", f"{words}:{port:04X}"))
    return found


_TCP_ESTABLISHED = "01"  # the st column of /proc/net/tcp: only a connection still open names its owner


def loopback_peer_uid(server: tuple[Any, ...], client: tuple[Any, ...], proc: str = "/proc/net") -> int | None:
    """The uid that owns the client end of an open TCP connection made on this host: the row of
    /proc/net/tcp (or tcp6) whose local address is the client's and whose remote address is ours,
    in state ESTABLISHED. A closed socket's row (FIN_WAIT2, TIME_WAIT) belongs to the kernel and
    shows uid 0, so it never counts. None when no such row is found."""
    try:
        clients = _proc_net_forms(client[0], client[1])
        servers = dict(_proc_net_forms(server[0], server[1]))
    except (ValueError, IndexError, TypeError):
        return None
    for table, local in clients:
        remote = servers.get(table)
        if remote is None:
            continue
        try:
            with open(os.path.join(proc, table), encoding="ascii", errors="replace") as rows:
                for row in rows:
                    fields = row.split()
                    if len(fields) > 7 and fields[1] == local and fields[2] == remote:
                        return int(fields[7]) if fields[3] == _TCP_ESTABLISHED else None
        except (OSError, ValueError):
            continue
    return None


class _Request:
    __slots__ = ("method", "path", "query", "headers", "body", "version")

    def __init__(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes, version: str
    ) -> None:
        self.method, self.path, self.query, self.headers, self.body = method, path, query, headers, body
        self.version = version

    @property
    def keep_alive(self) -> bool:
        """HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless told to keep it."""
        options = {option.strip().lower() for option in self.headers.get("connection", "").split(",")}
        return "close" not in options and (self.version != "HTTP/1.0" or "keep-alive" in options)

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise HTTPError(400, f"the body is not JSON: {error}") from None


class HttpServer:
    """Serves one node's HTTP: each connection is its own task, every read has a deadline, every
    body a size limit, so a slow or malformed client costs a task and a socket, never the node."""

    def __init__(self, node: Node, host: str, port: int, token: str | None) -> None:
        self.node, self.host, self.port, self.token = node, host, port, token
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._slots = asyncio.Semaphore(HTTP_WORKERS)  # requests beyond these wait their turn, off the pool
        self.requests = 0
        self.errors = 0

    async def start(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(HTTP_WORKERS, thread_name_prefix="nodeflow-http")
        try:
            self._server = await asyncio.start_server(self._accept, self.host, self.port, limit=HTTP_MAX_HEAD_BYTES)
        except OSError as error:
            raise NodeflowError(f"--http {self.url[7:-1]}: cannot listen there: {error.strerror or error}") from None
        self.port = self._server.sockets[0].getsockname()[1]  # the port taken, when 0 was asked

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._server = self._pool = None

    async def _off_loop(self, work: Callable[[], T]) -> T:
        """Database reads and JSON encoding run on the HTTP threads: a big answer never stalls the
        node's heartbeat, leases and workers, which share its event loop."""
        assert self._pool is not None
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= HTTP_MAX_CONNECTIONS:
            await self._send(writer, 503, {"error": "too many connections; try again"}, keep_alive=False)
            writer.close()
            return
        self._connections.add(task)
        try:
            # Who is at the other end, asked of the kernel before a byte of the request is read:
            # the answer is the connection's, while it is open.
            owner = await self._off_loop(functools.partial(self._from_owner, writer))
            await self._serve_connection(reader, writer, owner)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError, TimeoutError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, owner: bool) -> None:
        first = True
        while True:
            try:
                async with asyncio.timeout(HTTP_READ_TIMEOUT if first else HTTP_IDLE_TIMEOUT):
                    line = await reader.readline()
                if not line:
                    return  # the client closed the connection
                async with asyncio.timeout(HTTP_READ_TIMEOUT):
                    request = await self._read_request(line, reader)
            except TimeoutError:
                if not first:
                    return  # an idle kept-alive connection: close it quietly
                await self._send(writer, 408, {"error": "the request did not arrive in time"}, keep_alive=False)
                return
            except HTTPError as error:
                self.errors += 1
                await self._send(writer, error.status, {"error": str(error)}, keep_alive=False)
                return
            except (ValueError, asyncio.LimitOverrunError):
                self.errors += 1
                await self._send(writer, 431, {"error": "the request head is too large"}, keep_alive=False)
                return
            first = False
            self.requests += 1
            keep_alive = request.keep_alive
            status, content_type, payload, extra = await self._respond(request, owner)
            await self._send_bytes(writer, status, content_type, payload, keep_alive, extra)
            if not keep_alive:
                return

    async def _read_request(self, line: bytes, reader: asyncio.StreamReader) -> _Request:
        try:
            method, target, version = line.decode("ascii").rstrip("\r\n").split(" ")
        except (UnicodeDecodeError, ValueError):
            raise HTTPError(400, "a request line is METHOD PATH HTTP/1.1") from None
        if not version.startswith("HTTP/1."):
            raise HTTPError(400, f"only HTTP/1.x is spoken here, not {version[:20]!r}")
        headers: dict[str, str] = {}
        size = len(line)
        while True:
            header = await reader.readline()
            size += len(header)
            if size > HTTP_MAX_HEAD_BYTES:
                raise HTTPError(431, f"the request head is larger than {HTTP_MAX_HEAD_BYTES} bytes")
            if header in (b"\r\n", b"\n", b""):
                break
            if header[:1] in (b" ", b"\t"):
                raise HTTPError(400, "folded header lines are not accepted")
            name, colon, value = header.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip() or " " in name or "\t" in name:
                raise HTTPError(400, f"a malformed header line: {name.strip()[:40]!r}")
            key, value = name.lower(), value.strip()
            if key == "content-length" and headers.get(key, value) != value:
                raise HTTPError(400, "two different Content-Length headers")
            if key in _HTTP_SINGLE_HEADERS and key in headers and key != "content-length":
                # Which would count? A proxy and this server could each pick another (RFC 9112: 400).
                raise HTTPError(400, f"the {name.strip()[:40]} header is given twice; send it once")
            headers[key] = value
        if "transfer-encoding" in headers:
            raise HTTPError(501, "transfer encodings (chunked, ...) are not accepted; send Content-Length")
        body = b""
        if "content-length" in headers:
            text = headers["content-length"]
            if not (text.isascii() and text.isdigit()):
                raise HTTPError(400, f"Content-Length is not a whole number: {text[:20]!r}")
            length = int(text)
            if length > HTTP_MAX_BODY_BYTES:
                raise HTTPError(413, f"the body is {length} bytes; the limit is {HTTP_MAX_BODY_BYTES}")
            body = await reader.readexactly(length)
        elif method in ("POST", "PUT", "PATCH"):
            raise HTTPError(411, "send Content-Length with a body")
        path, _, query_text = target.partition("?")
        query: dict[str, str] = {}
        for pair in query_text.split("&"):
            if pair:
                key, _, value = pair.partition("=")
                query[urllib.parse.unquote_plus(key)] = urllib.parse.unquote_plus(value)
        return _Request(method, path, query, headers, body, version)  # parts are unquoted one by one

    def _from_owner(self, writer: asyncio.StreamWriter) -> bool:
        """Whether the connection comes from a process of the user this node runs as. Loopback is
        no boundary between the users of one host; the kernel says who owns the other end."""
        peer, own = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        if not isinstance(peer, tuple) or not is_loopback(str(peer[0])):
            return False  # from another machine: only the token can let it in
        return loopback_peer_uid(own, peer) == os.geteuid()

    def _check_user(self, request: _Request, owner: bool) -> None:
        """Another local user (another uid) is refused on every route unless it gives the token."""
        if owner or self.token is not None:  # with a token, _check_token asks every one for it
            return
        raise HTTPError(
            403,
            f"this node answers only processes of its own user (uid {os.geteuid()}); another user needs the node "
            "started with --http-token TOKEN, and to send Authorization: Bearer TOKEN",
        )

    async def _respond(self, request: _Request, owner: bool) -> tuple[int, str, bytes, dict[str, str]]:
        try:
            self._check_user(request, owner)
            if request.path == "/" and request.method == "GET":  # static, and with a token it reads that
                return 200, "text/html; charset=utf-8", DASHBOARD_HTML.encode("utf-8"), {}
            self._check_origin(request)
            self._check_token(request)
            if request.path == "/metrics" and request.method == "GET":
                if self.node.nf is None:
                    raise HTTPError(503, "the node is starting")
                text = await self._off_loop(functools.partial(render_metrics, self.node))
                return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode("utf-8"), {}
            if request.path in ("/", "/metrics"):  # a GET would have been answered above
                raise HTTPError(405, f"{request.path} takes GET, not {request.method[:10]}", {"Allow": "GET"})
            status, answer = await self._api(request)
            return status, "application/json", await self._off_loop(functools.partial(_json_bytes, answer)), {}
        except Exception as error:
            self.errors += 1
            if isinstance(error, InvalidDefinition):
                status, answer = 400, {"error": str(error.problems[0]), "problems": error.problems}
            elif isinstance(error, NodeflowError):
                status, answer = _http_status(error), {"error": str(error)}
            else:  # a bug: say so, keep serving
                log.exception("HTTP %s %s failed", request.method, request.path)
                status, answer = 500, {"error": f"internal error: {type(error).__name__}"}
            return status, "application/json", _json_bytes(answer), getattr(error, "headers", {})

    def _check_origin(self, request: _Request) -> None:
        """Without a token, only this host's own pages may drive the API: a page from elsewhere can
        neither post to it (every POST must say it is JSON, which a plain form cannot, and a script
        from another origin would need CORS, which this server never grants) nor read it through
        a DNS name rebound to 127.0.0.1 (its Host header would not be ours)."""
        if self.token is not None:
            return
        host = request.headers.get("host")
        if host is not None:
            name = _host_name(host)
            if name.lower() not in {"127.0.0.1", "localhost", "::1", self.host.lower()}:
                raise HTTPError(403, f"Host {host[:80]!r} is not this node; give it a token to serve other names")

    def _check_token(self, request: _Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise HTTPError(
                401, "this node wants its token: send Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"}
            )

    async def _api(self, request: _Request) -> tuple[int, Any]:
        nf = self.node.nf
        if nf is None:
            raise HTTPError(503, "the node is starting")
        parts = [urllib.parse.unquote(part) for part in request.path.split("/") if part]
        if len(parts) < 2 or parts[0] != "api":
            raise HTTPError(404, f"no route {request.path[:200]!r}; the API is under /api/ (see README)")
        route, rest, method = parts[1], parts[2:], request.method
        allowed = {
            ("status", 0): ("GET",), ("nodes", 0): ("GET",), ("queues", 0): ("GET",), ("locks", 0): ("GET",),
            ("timers", 0): ("GET",), ("definitions", 0): ("GET", "POST"), ("definitions", 1): ("GET",),
            ("instances", 0): ("GET", "POST"), ("instances", 1): ("GET",), ("instances", 2): ("POST",),
            ("signals", 1): ("POST",), ("journal", 0): ("GET",),
        }.get((route, len(rest)))  # fmt: skip
        if allowed is None or (route == "instances" and len(rest) == 2 and rest[1] not in ("retry", "cancel")):
            raise HTTPError(404, f"no route {request.path[:200]!r}")
        if method not in allowed:
            raise HTTPError(
                405, f"{request.path} takes {' or '.join(allowed)}, not {method[:10]}", {"Allow": ", ".join(allowed)}
            )
        if method == "GET":
            return 200, await self._off_loop(functools.partial(self._read_route, nf, route, rest, request))
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":  # a plain cross-site form cannot say this (see _check_origin)
            raise HTTPError(415, f"send JSON with Content-Type: application/json, not {kind or 'nothing'!r}")
        if route == "definitions":
            _object_body(request, "a workflow definition")
            info = await nf.adefine(request.body)  # parsed by parse_definition, which catches repeated keys
            return 201 if info.changed else 200, {**_definition_entry(info), "changed": info.changed}
        if route == "instances" and rest and rest[1] == "cancel":
            body = _object_body(request, '{"reason": TEXT} or {}')
            if set(body) - {"reason"}:
                raise HTTPError(400, 'send {"reason": TEXT}, or {}')
            cancelled = await nf.acancel(rest[0], body.get("reason"))
            return 200, _instance_entry(cancelled)
        if route == "instances" and rest:
            return 200, _instance_entry(await self._off_loop(functools.partial(nf.retry, rest[0])))
        if route == "instances":
            body = _object_body(request, '{"definition": ID, "input": {...}}')
            unknown = sorted(set(body) - {"definition", "input", "key"})
            if unknown or not isinstance(body.get("definition"), str):
                raise HTTPError(
                    400,
                    'send {"definition": ID, "input": {...}, "key": TEXT (optional)}'
                    + (f"; unknown {unknown[0]!r}" if unknown else ""),
                )
            try:
                instance_id, new = await nf.workflows.abegin(body["definition"], body.get("input"), body.get("key"))
            except NotFound as error:  # named in the body, not the path: a bad request, not a missing page
                raise HTTPError(400, str(error)) from None
            entry = _instance_entry(await self._off_loop(functools.partial(nf.instance, instance_id)))
            return (201 if new else 200), {**entry, "new": new}
        body = _object_body(request, '{"input": {...}, "ttl": DURATION (optional)}')
        if set(body) - {"input", "ttl"}:
            raise HTTPError(400, 'send {"input": {...}, "ttl": DURATION (optional)}')
        outcome = await nf.asignal(rest[0], body.get("input"), body.get("ttl", SIGNAL_KEEP_DEFAULT))
        return 200, _signal_entry(outcome)

    def _read_route(self, nf: Cluster, route: str, rest: list[str], request: _Request) -> Any:
        """A GET route's answer, read in an HTTP thread."""
        if route == "status":
            return {"node": self.node.id, **nf.status()}
        if route == "nodes":
            return {"nodes": nf.nodes()}
        if route == "queues":
            return {"queues": nf.queues()}
        if route == "locks":
            return {"locks": [_lock_entry(info) for info in nf.held()]}
        if route == "timers":
            return {"timers": [_timer_entry(timer) for timer in nf.timers(limit=_limit(request, 1000))]}
        if route == "journal":
            steps = nf.workflows.latest_steps(_limit(request, 20) or 20)
            return {
                "journal": [{**step, "started": _iso(step["started"]), "ended": _iso(step["ended"])} for step in steps]
            }
        if route == "definitions":
            if rest:
                return nf.definition(rest[0], _whole_query(request, "version"))
            return {"definitions": [_definition_entry(info) for info in nf.definitions()]}
        if rest:
            return _instance_entry(nf.instance(rest[0]), full=True)
        found = nf.instances(
            request.query.get("status"), request.query.get("definition"), _limit(request, HTTP_DEFAULT_LIMIT)
        )
        return {"instances": [_instance_entry(instance) for instance in found]}

    async def _send(self, writer: asyncio.StreamWriter, status: int, answer: Any, keep_alive: bool) -> None:
        await self._send_bytes(writer, status, "application/json", _json_bytes(answer), keep_alive)

    async def _send_bytes(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        content_type: str,
        payload: bytes,
        keep_alive: bool,
        extra: dict[str, str] | None = None,
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_HTTP_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime())}\r\n"
            f"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            f"X-Frame-Options: DENY\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in (extra or {}).items())
            + f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        writer.write(head.encode("ascii") + payload)
        async with asyncio.timeout(HTTP_READ_TIMEOUT):  # a client that does not read is cut off too
            await writer.drain()


def _http_status(error: NodeflowError) -> int:
    if isinstance(error, HTTPError):
        return error.status
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, InvalidInput):
        return 400
    return 503 if isinstance(error, StoreBusy) else 500


def _host_name(host: str) -> str:
    """The name in a Host header: "[::1]:8080" gives "::1", "localhost:8080" gives "localhost"."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.partition(":")[0] if host.count(":") <= 1 else host  # a bare IPv6 address has several


def _json_bytes(answer: Any) -> bytes:
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _object_body(request: _Request, shape: str) -> dict[str, Any]:
    body = request.json()
    if not isinstance(body, dict):
        raise HTTPError(400, f"send a JSON object: {shape}")
    return body


def _limit(request: _Request, default: int | None) -> int | None:
    value = _whole_query(request, "limit")
    return default if value is None else value


def _whole_query(request: _Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 1_000_000:
        raise HTTPError(400, f"?{name}= takes a whole number from 1, not {text[:20]!r}")
    return int(text)


def _metric_label_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric_labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_metric_label_value(value)}"' for key, value in labels.items()) + "}"


def render_metrics(node: Node) -> str:
    """The Prometheus text format (0.0.4): this node's counters, and the cluster's gauges as it sees them."""
    nf = node.nf
    assert nf is not None
    lines: list[str] = []

    def family(name: str, kind: str, text: str, samples: Iterable[tuple[dict[str, Any], float]]) -> None:
        lines.append(f"# HELP nodeflow_{name} {text}")
        lines.append(f"# TYPE nodeflow_{name} {kind}")
        for labels, value in samples:
            lines.append(f"nodeflow_{name}{_metric_labels(labels)} {float(value)!r}")

    me = {"node": node.id}
    status = nf.status()
    states = {state: 0 for state in NODE_STATES}
    for peer in status["nodes"]:
        states[peer["state"]] += 1
    office = status["scheduler"]
    bus, locks, runner = nf.bus, nf.locks, node.runner
    family("up", "gauge", "1 while this node serves.", [(me, 1)])
    family(
        "nodes",
        "gauge",
        "Nodes that ever ran on this cluster, by state.",
        [({"state": s}, n) for s, n in states.items()],
    )
    family(
        "scheduler_epoch",
        "gauge",
        "The election epoch of the node in office (0: none).",
        [({}, office["epoch"] if office else 0)],
    )
    family(
        "is_scheduler", "gauge", "1 while this node is the scheduling node.", [(me, 1 if node.epoch is not None else 0)]
    )
    depths = [({"queue": q, "state": kind}, n) for q, depth in status["queues"].items() for kind, n in depth.items()]
    family("queue_messages", "gauge", "Messages per queue: ready, leased (in flight), delayed, dead.", depths)
    family("messages_sent_total", "counter", "Messages this node sent.", [(me, bus.sent)])
    family("messages_acked_total", "counter", "Messages this node acked.", [(me, bus.acked)])
    family("messages_nacked_total", "counter", "Messages this node handed back for another try.", [(me, bus.nacked)])
    family(
        "messages_dead_lettered_total",
        "counter",
        "Messages this node's nacks made dead letters.",
        [(me, bus.dead_lettered)],
    )
    family("handler_failures_total", "counter", "Handler runs on this node that raised.", [(me, node.failed)])
    family("log_lines_lost_total", "counter", "Log lines this node could not write.", [(me, node.log_lines_lost)])
    family("lock_acquisitions_total", "counter", "Named locks this node acquired.", [(me, locks.acquisitions)])
    family(
        "lock_wait_seconds_total",
        "counter",
        "Time this node spent waiting for named locks.",
        [(me, locks.wait_seconds)],
    )
    family(
        "lock_hold_seconds_total",
        "counter",
        "Time this node held named locks (released ones).",
        [(me, locks.hold_seconds)],
    )
    family("timers_fired_total", "counter", "Timers this node fired while in office.", [(me, node.timers_fired)])
    family("timer_lateness_seconds", "summary", "How long after their due time this node fired timers.", [])
    lines.append(f"nodeflow_timer_lateness_seconds_sum{_metric_labels(me)} {float(node.timer_lateness):.6f}")
    lines.append(f"nodeflow_timer_lateness_seconds_count{_metric_labels(me)} {node.timers_fired}")
    family(
        "instances",
        "gauge",
        "Workflow instances by status.",
        [({"status": s}, n) for s, n in status["instances"].items()],
    )
    family(
        "workflow_bursts_total",
        "counter",
        "Bursts of workflow steps this node committed.",
        [(me, runner.bursts if runner else 0)],
    )
    family(
        "workflow_steps_total", "counter", "Workflow steps this node committed.", [(me, runner.steps if runner else 0)]
    )
    family("instruction_lag", "gauge", "Instructions in the log each node has yet to apply.", nf.signals.lag())
    http = node.http
    family("http_requests_total", "counter", "HTTP requests this node answered.", [(me, http.requests if http else 0)])
    family(
        "http_errors_total", "counter", "HTTP requests this node refused or failed.", [(me, http.errors if http else 0)]
    )
    family(
        "workflow_runs_requeued_total", "counter", "Workflow runs put back because another node held the instance.",
        [(me, runner.requeued if runner else 0)],
    )  # fmt: skip
    return "\n".join(lines) + "\n"


# ══════════════════════════════════════════════════════════════════════════════════════════
# 12. CLI: one subcommand per verb; exit 0 success, 1 a failure explained, 2 bad usage or input.
# ══════════════════════════════════════════════════════════════════════════════════════════

_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not the whole usage text
        raise InvalidInput(f"{self.prog}: {message} (see --help)")


def cmd_status(args: argparse.Namespace) -> int:
    stall_after = None if args.stall_after is None else parse_duration(args.stall_after, "--stall-after")
    with Cluster(args.db, create=False) as nf:
        report = nf.status(stall_after)
    if args.json:
        print(json.dumps(report))
        return 0
    scheduler, instances = report["scheduler"], report["instances"]
    print(f"cluster {report['path']}")
    if scheduler is None:
        print("scheduler: none (no eligible node runs; timers wait)")
    else:
        pid = next((node["pid"] for node in report["nodes"] if node["id"] == scheduler["node"]), "?")
        print(f"scheduler: {scheduler['node']} (pid {pid}, epoch {scheduler['epoch']})")
    if not report["nodes"]:
        print("nodes: none has run")
    for node in report["nodes"]:
        office = " (scheduler)" if scheduler is not None and scheduler["node"] == node["id"] else ""
        print(
            f"node {node['id']}{office}: {node['state']}, role {node['role']}, pid {node['pid']}, "
            f"heartbeat {node['heartbeat_age']:.1f}s ago"
        )
    if not report["queues"]:
        print("queues: none")
    for queue, depth in report["queues"].items():
        counts = ", ".join(f"{count} {kind}" for kind, count in depth.items())
        print(f"queue {_show_name(queue)}: {counts}")
    if any(instances.values()):
        print("instances: " + ", ".join(f"{count} {status}" for status, count in instances.items()))
    for timer in report["timers"]:
        print(f"timer {_show_name(timer['name'])}: next {timer['next']} -> queue {_show_name(timer['queue'])}")
    kept = report["kept_signals"]
    for signal_kept in kept["oldest"][:10]:
        print(
            f"kept signal {_show_name(signal_kept['name'])}: sent {signal_kept['sent']}, until {signal_kept['expires']}"
        )
    if kept["count"] > min(10, len(kept["oldest"])):
        print(f"kept signals: {kept['count']} in all (status --json lists the oldest {KEPT_SIGNALS_SHOWN})")
    if not report["locks"]:
        print("locks: none held")
    for lock in report["locks"]:
        fence = f"fence {lock['fence']}" if lock["fence"] is not None else "no fence"
        who = f"node {lock['node']} (pid {lock['pid']})" if lock["node"] else f"pid {lock['pid']}"
        held = "" if lock["held_for"] is None else f" for {_format_seconds(lock['held_for'])}"
        print(f"lock {_show_name(lock['name'])}: {fence}, held by {who}{held}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    concurrency = _whole_number(args.concurrency, "--concurrency")
    handlers = load_app(args.app) if args.app else {}
    node = Node(
        args.db,
        node_id=args.node_id,
        role=args.role,
        concurrency=concurrency,
        grace=args.grace,
        heartbeat=args.heartbeat,
        handlers=handlers,
        lease=args.lease,
        http=args.http,
        http_token=args.http_token or os.environ.get("NODEFLOW_HTTP_TOKEN"),
        stall_after=args.stall_after,
        keep_instances=args.keep_instances,
        keep_faulted=args.keep_faulted,
    )
    interrupts = 0

    def on_signal(signum: int) -> None:
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:
                node.say("second interrupt: exiting at once")
                os._exit(130)
        node.request_stop(signal.Signals(signum).name)

    # A file-size limit (ulimit -f) reached by a write kills a process by SIGXFSZ by default;
    # ignored, the write fails with EFBIG instead, as it does on a full disk, and is retried.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    async def serve() -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            code = await node.run()
        except BaseException as error:
            if node.user_threads.running or node.fatal is not None:  # leave_now() ends the process: say why
                node.say(f"stopped by {type(error).__name__}: {error}")
            leave_now(1)
            raise
        leave_now(code)
        return code

    def leave_now(code: int) -> None:
        """Leave at once, past asyncio.run()'s wait for its threads and the interpreter's clean-up,
        when a handler or call function still runs in a thread (its message was handed back; the
        wait could be for ever), or after a fatal error (finalizing the SQLite connections would
        checkpoint their WAL into a file that is no longer the cluster's database)."""
        if not node.user_threads.running and node.fatal is None:
            return
        if node.user_threads.running:
            node.say(f"leaving {node.user_threads.running} handler or call function(s) running in threads")
        remove_idle_lock_files()
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(1 if node.fatal is not None else code)

    return asyncio.run(serve())


def cmd_schedule(args: argparse.Namespace) -> int:
    if args.action == "add":
        if not args.name:
            raise InvalidInput(
                "schedule add: give the timer's name, as in: schedule add nightly --cron '0 3 * * *' ..."
            )
        if args.queue is None or args.body is None:
            raise InvalidInput("schedule add: --queue and --body are required")
        name = check_timer_name(args.name)
        queue = check_queue_name(args.queue)
        body = _json_argument(args.body, "--body")
        encode_body(body, Settings().max_body_bytes)
        chosen = [flag for flag, value in (("--cron", args.cron), ("--at", args.at), ("--after", args.after)) if value]
        if len(chosen) != 1:
            raise InvalidInput("schedule add: give exactly one of --cron, --at and --after")
        if args.tz and not args.cron:
            raise InvalidInput("schedule add: --tz goes with --cron")
        if args.cron:
            CronSchedule.parse(args.cron, args.tz)
        at = check_due(parse_time(args.at), "--at") if args.at else None
        after = parse_duration(args.after, "--after") if args.after else None
        if after is not None:
            check_due(time.time() + after, "--after")  # before the database is opened (or created)
        with Cluster(args.db) as nf:
            timer = nf.schedule(name, queue, body, cron=args.cron, tz=args.tz, at=at, after=after)
        print(f"timer {_show_name(timer.name)}: next {_iso(timer.due)} -> queue {_show_name(timer.queue)}")
        return 0
    if args.action == "remove":
        if not args.name:
            raise InvalidInput("schedule remove: give the timer's name")
        name = check_timer_name(args.name)
        with Cluster(args.db, create=False) as nf:
            if not nf.unschedule(name):
                raise NodeflowError(f"no timer named {_show_name(name)}")
        print(f"removed timer {_show_name(name)}")
        return 0
    if args.name:
        raise InvalidInput("schedule list takes no name")
    with Cluster(args.db, create=False) as nf:
        timers = nf.timers()
    if args.json:
        print(json.dumps({"schedules": [_timer_entry(timer) for timer in timers]}))
        return 0
    for timer in timers:
        when = f"cron {timer.cron!r}" + (f" ({timer.tz})" if timer.tz else "") if timer.cron else "once"
        print(f"{timer.name}\t{when}\tnext {_iso(timer.due) or 'fired'}\tqueue {timer.queue}\tfired {timer.fired}")
    if not timers:
        print("no timers", file=sys.stderr)
    return 0


def _libc() -> Any:
    """The C library, for prctl (a child's death signal); None where it cannot be loaded."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _child_setup(parent: int, libc: Any, mask: Iterable[int]) -> None:
    # Runs in the child between fork and exec: it must not inherit the blocked signals, and it
    # dies with the `lock` process, so the command never runs on after the lock was freed.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, mask)
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _run_holding(held: HeldLock, command: list[str], db: str) -> int:
    env = dict(os.environ, NODEFLOW_LOCK=held.name, NODEFLOW_FENCE=str(held.fence), NODEFLOW_DB=db)
    libc = _libc()
    waited = {*_FORWARDED_SIGNALS, signal.SIGCHLD}
    parent = os.getpid()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        try:
            child = subprocess.Popen(command, env=env, preexec_fn=lambda: _child_setup(parent, libc, waited))
        except FileNotFoundError:
            print(f"nodeflow: lock: command not found: {command[0]}", file=sys.stderr)
            return 127
        except PermissionError:
            print(f"nodeflow: lock: cannot run {command[0]}: permission denied", file=sys.stderr)
            return 126
        while child.poll() is None:
            info = signal.sigwaitinfo(waited)
            # Signals sent with kill() are passed on; a terminal's Ctrl-C (si_code > 0, from the
            # kernel) already reached the command, which shares our process group.
            if info.si_signo != signal.SIGCHLD and info.si_code <= 0:
                child.send_signal(info.si_signo)
        return child.returncode if child.returncode >= 0 else 128 - child.returncode
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def cmd_lock(args: argparse.Namespace) -> int:
    if not args.command:
        raise InvalidInput("lock: give the command to run after --, as in: nodeflow.py lock NAME -- CMD [ARGS...]")
    name = check_lock_name(args.name)
    timeout = _check_timeout(args.timeout)
    with Cluster(args.db) as nf:
        held = nf.lock(name, timeout)
        try:
            return _run_holding(held, args.command, nf.path)
        finally:
            held.release()


def _json_argument(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise InvalidInput(
            f'{what} is not valid JSON ({error}); quote it for the shell, as in \'{{"to": "a@b.c"}}\''
        ) from None


def _whole_number(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"{what} must be a whole number, not {text!r}") from None


def cmd_send(args: argparse.Namespace) -> int:
    queue = check_queue_name(args.queue)
    body = _json_argument(args.body, "the message body")
    encode_body(body, Settings().max_body_bytes)
    delay = parse_duration(args.delay, "--delay")
    priority = _check_priority(_whole_number(args.priority, "--priority"))
    key = check_dedup_key(args.key, "--key")
    with Cluster(args.db) as nf:
        print(nf.send(queue, body, delay=delay, priority=priority, key=key))
    return 0


def _message_entry(message: Message) -> dict[str, Any]:
    return {"id": message.id, "queue": message.queue, "body": message.body, "attempts": message.attempts}


def cmd_receive(args: argparse.Namespace) -> int:
    queue = check_queue_name(args.queue)
    wait = parse_duration(args.wait, "--wait")
    with Cluster(args.db, create=False) as nf:
        message = nf.receive(queue, lease=60, wait=wait)
        if message is None:
            raise NodeflowError(f"no message in queue {_show_name(queue)} within {_format_seconds(wait)}")
        print(json.dumps(_message_entry(message) if args.json else message.body), flush=True)
        nf.ack(message)  # printed first: a crash before the ack redelivers it, never loses it
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    queue = check_queue_name(args.queue)
    ids = [_whole_number(text, "--id") for text in args.id] if args.id else None
    with Cluster(args.db, create=False) as nf:
        if args.action == "list":
            every = nf.dead_letters(queue, limit=sys.maxsize)  # the API's default page is 1000
            letters = [letter for letter in every if ids is None or letter.id in ids]
            if args.json:
                entries = [
                    {"id": d.id, "body": d.body, "attempts": d.attempts, "died": _iso(d.died), "error": d.last_error}
                    for d in letters
                ]
                print(json.dumps({"queue": queue, "dead_letters": entries}))
            else:
                for d in letters:
                    print(
                        f"{d.id}\t{d.attempts} deliveries\t{_iso(d.died)}\t{d.last_error or '-'}\t{json.dumps(d.body)}"
                    )
                print(f"{len(letters)} dead letter(s) in queue {_show_name(queue)}", file=sys.stderr)
        elif args.action == "retry":
            print(f"{nf.retry_dead_letters(queue, ids)} dead letter(s) queued again in {_show_name(queue)}")
        else:
            print(f"{nf.purge_dead_letters(queue, ids)} dead letter(s) purged from {_show_name(queue)}")
    return 0


def cmd_define(args: argparse.Namespace) -> int:
    source = "stdin" if args.file == "-" else args.file
    try:
        if args.file == "-":
            text: str | bytes = sys.stdin.buffer.read(DEFINITION_MAX_BYTES * 4 + 1)
        else:
            with open(args.file, "rb") as handle:
                text = handle.read(DEFINITION_MAX_BYTES * 4 + 1)
    except OSError as error:
        raise InvalidInput(f"define: cannot read {source}: {error.strerror or error}") from None
    try:
        blueprint = compile_definition(parse_definition(text, source))
    except InvalidDefinition as error:
        for problem in error.problems:
            print(f"nodeflow: define {one_line(source)}: {one_line(problem)}", file=sys.stderr)
        noun = "problem" if len(error.problems) == 1 else "problems"
        print(f"nodeflow: define {source}: {len(error.problems)} {noun}; nothing was stored", file=sys.stderr)
        return InvalidInput.exit_code
    with Cluster(args.db) as nf:
        info = nf.define(json.loads(blueprint.body))
    if args.json:
        print(json.dumps({**_definition_entry(info), "changed": info.changed}))
    elif info.changed:
        print(f"defined {info.id} version {info.version} ({info.activities} activities, {len(info.triggers)} triggers)")
    else:
        print(f"{info.id} version {info.version} is already this definition; nothing changed")
    return 0


def cmd_definitions(args: argparse.Namespace) -> int:
    with Cluster(args.db, create=False) as nf:
        found = nf.definitions()
    if args.json:
        print(json.dumps({"definitions": [_definition_entry(info) for info in found]}))
        return 0
    if not found:
        print("no workflow definitions; add one with: define FILE")
    for info in found:
        triggers = ", ".join(
            f"cron {t['cron']}" if t["type"] == "cron" else f"signal {t['name']}" for t in info.triggers
        )
        print(f"{info.id}\tv{info.version}\t{info.activities} activities\t{_iso(info.created)}\t{info.name}"
              + (f"\ttriggers: {triggers}" if triggers else ""))  # fmt: skip
    return 0


# The example `cluster` defines when the database has no workflow yet: something to start from
# the dashboard and watch spread over the nodes, with no --app module needed.
EXAMPLE_WORKFLOW = {
    "id": "example",
    "name": "Example: three steps, a wait, three more",
    "start": "hello",
    "activities": {
        "hello": {"type": "log", "message": "example started with input {input}", "next": "work"},
        "work": {"type": "work", "duration": "300ms", "next": "pause"},
        "pause": {"type": "timer", "duration": "2s", "next": "more-work"},
        "more-work": {"type": "work", "duration": "300ms", "next": "done"},
        "done": {"type": "log", "message": "example done"},
    },
}
_NODE_COLOURS = (36, 33, 35, 32, 34, 31)  # ANSI foreground colours for the nodes' log prefixes


def _cluster_child_setup(parent: int, libc: Any) -> None:
    # Between fork and exec: a node dies (gracefully) with its `cluster` process, even a SIGKILLed one.
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


class _ClusterMember:
    """One `serve` child of `cluster`: its process, and a thread copying its log lines, prefixed."""

    def __init__(self, node_id: str, command: list[str], prefix: str, out: Any, out_mutex: threading.Lock) -> None:
        self.node_id, self.command, self.prefix = node_id, command, prefix
        self._out, self._out_mutex = out, out_mutex
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.restarts = 0
        self.url: str | None = None
        self.joined = threading.Event()

    def start(self, libc: Any) -> None:
        parent = os.getpid()
        self.joined.clear()
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,  # the terminal's Ctrl-C reaches `cluster` alone, which stops each node once
            preexec_fn=lambda: _cluster_child_setup(parent, libc),
        )
        self.started = time.monotonic()
        threading.Thread(target=self._copy, args=(self.process,), name=f"cluster-{self.node_id}", daemon=True).start()

    def _copy(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if " dashboard and API at " in line:
                self.url = line.rsplit(" at ", 1)[1].split(" ")[0]
            if " joined " in line:
                self.joined.set()
            with self._out_mutex, contextlib.suppress(OSError, ValueError):  # a closed stdout: keep draining
                print(f"{self.prefix}{line}", file=self._out, flush=True)
        process.stdout.close()


def cmd_cluster(args: argparse.Namespace) -> int:
    nodes = _whole_number(args.nodes, "--nodes")
    replicas = _whole_number(args.replicas, "--replicas")
    if not 1 <= nodes <= 32:
        raise InvalidInput(f"--nodes must be from 1 to 32, not {nodes}")
    if not 0 <= replicas < nodes:
        raise InvalidInput(f"--replicas must be from 0 to {nodes - 1}: at least one node must be able to schedule")
    port = _whole_number(args.http_port, "--http-port")
    if port != 0 and not 1 <= port <= 65536 - nodes:
        raise InvalidInput(f"--http-port must leave room for {nodes} ports below 65536 (or be 0 for any free ports)")
    grace = parse_duration(args.grace, "--grace")
    if args.app:
        load_app(args.app)  # a bad module is refused here, once, not by every node in turn
    with Cluster(args.db) as nf:
        if not nf.definitions():
            nf.define(EXAMPLE_WORKFLOW)
            print(f"cluster: {args.db} had no workflow: defined one named example, to start from the dashboard")
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    out_mutex = threading.Lock()
    members = []
    for number in range(1, nodes + 1):
        node_id = f"n{number}"
        command = [sys.executable, os.path.abspath(__file__), "--db", args.db, "serve", "--node-id", node_id,
                   "--grace", args.grace, "--http", f"127.0.0.1:{port + number - 1 if port else 0}"]  # fmt: skip
        if number > nodes - replicas:
            command += ["--role", "replica"]
        if args.app:
            command += ["--app", args.app]
        shade = _NODE_COLOURS[(number - 1) % len(_NODE_COLOURS)]
        prefix = f"\033[{shade}m{node_id:>3} |\033[0m " if colour else f"{node_id:>3} | "
        members.append(_ClusterMember(node_id, command, prefix, sys.stdout, out_mutex))
    libc = _libc()
    asked = 0  # stop requests (Ctrl-C, SIGTERM) so far: the first stops gracefully, the second at once

    def on_signal(*_: object) -> None:
        nonlocal asked
        asked += 1

    def say(text: str) -> None:
        with out_mutex, contextlib.suppress(OSError, ValueError):
            print(f"cluster: {text}", flush=True)

    def pause(seconds: float) -> bool:
        """Sleep up to ``seconds``; True when a stop was asked for meanwhile."""
        ends = time.monotonic() + seconds
        while not asked and time.monotonic() < ends:
            time.sleep(0.05)
        return bool(asked)

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for member in members:
            member.start(libc)
        deadline = time.monotonic() + 30
        while not asked and time.monotonic() < deadline:
            started = [m for m in members if m.process is not None and m.process.poll() is None]
            if all(member.joined.is_set() and member.url for member in started) and len(started) == len(members):
                break
            if len(started) < len(members) and all(m.joined.is_set() for m in started):
                break  # a node could not start (its own log line said why); the others are up
            time.sleep(0.05)
        urls = ", ".join(f"{member.node_id} {member.url}" for member in members if member.url)
        say(f"{nodes} nodes on {args.db}" + (f" ({replicas} replicas)" if replicas else ""))
        say(f"dashboard at {members[0].url or '(n1 has no HTTP server)'}   (all: {urls})")
        say("Ctrl-C stops every node gracefully")
        while not pause(0.2):
            for member in members:
                process = member.process
                if process is None or process.poll() is None:
                    continue
                say(f"node {member.node_id} exited with status {process.returncode}")
                if not args.restart:
                    member.process = None
                    continue
                # A node that keeps dying soon after starting is restarted ever more slowly.
                wait = 1.0 if time.monotonic() - member.started > 10 else min(30.0, 2.0 ** (member.restarts + 1))
                member.restarts += 1
                if pause(wait):
                    break
                say(f"restarting node {member.node_id}")
                member.start(libc)
            if all(member.process is None for member in members):
                with contextlib.suppress(OSError, ValueError):
                    print("cluster: every node has exited", file=sys.stderr, flush=True)
                return 1
        say("stopping every node (Ctrl-C again: at once)")
        for member in members:
            if member.process is not None and member.process.poll() is None:
                member.process.send_signal(signal.SIGTERM)
        ends = time.monotonic() + grace + 10
        for member in members:
            while member.process is not None and member.process.poll() is None:
                if asked > 1 or time.monotonic() > ends:
                    member.process.kill()
                time.sleep(0.05)
        return 0
    finally:
        for member in members:
            if member.process is not None and member.process.poll() is None:
                member.process.kill()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _check_wait_timeout(text: str | None) -> float | None:
    return None if text is None else parse_duration(text, "--timeout")


def cmd_start(args: argparse.Namespace) -> int:
    workflow_id = check_workflow_id(args.definition, "the workflow id")
    data = check_instance_input(_json_argument(args.input, "--input"), "--input")
    timeout = _check_wait_timeout(args.timeout)
    key = check_start_key(args.key)
    with Cluster(args.db, create=False) as nf:
        instance_id, new = nf.workflows.begin(workflow_id, data, key)
        if not new:
            print(f"nodeflow: key {_show_name(args.key)} started {instance_id} already; no new one", file=sys.stderr)
        if not args.wait:
            print(json.dumps({"id": instance_id}) if args.json else instance_id, flush=True)
            return 0
        if not args.json:
            print(instance_id, flush=True)
        if not any(node["state"] in ("running", "stalled") for node in nf.nodes()):
            print("nodeflow: no node is running: the instance starts when one does (serve)", file=sys.stderr)
        ended = nf.wait(instance_id, timeout)
    if args.json:
        print(json.dumps(_instance_entry(ended, full=True)))
    else:
        print(f"{ended.id} {_instance_state(ended)}")
        if ended.status == "completed":
            print(json.dumps(ended.variables, ensure_ascii=False))
    if ended.status == "completed":
        return 0
    if ended.status in ENDED_STATUSES:
        return 1
    print(f"nodeflow: instance {ended.id} still {ended.status} after {_format_seconds(timeout or 0)}", file=sys.stderr)
    return 1


def cmd_signal(args: argparse.Namespace) -> int:
    name = check_signal_name(args.name)
    data = check_instance_input(_json_argument(args.input, "--input"), "--input")
    ttl = parse_duration(args.ttl, "--ttl")
    with Cluster(args.db, create=False) as nf:
        outcome = nf.signal(name, data, ttl)
    if args.json:
        print(json.dumps(_signal_entry(outcome)))
    elif outcome.kept_until is not None:
        print(f"signal {_show_name(name)}: no instance waits for it; kept until {_iso_text(outcome.kept_until)} "
              "for the next one that does")  # fmt: skip
    else:
        print(f"signal {_show_name(name)}: resumed {len(outcome.resumed)} instance(s)"
              + (f", started {', '.join(outcome.started)}" if outcome.started else "")
              + ("" if outcome.resumed or outcome.started else " (dropped: --ttl 0)"))  # fmt: skip
    return 0


def cmd_instances(args: argparse.Namespace) -> int:
    limit = None if args.limit is None else _whole_number(args.limit, "--limit")
    with Cluster(args.db, create=False) as nf:
        found = nf.instances(args.status, args.definition, limit)
    if args.json:
        print(json.dumps({"instances": [_instance_entry(instance) for instance in found]}))
        return 0
    for instance in found:
        print(f"{instance.id}\t{instance.definition} v{instance.version}\t{_instance_state(instance)}\t"
              f"{_iso(instance.updated)}")  # fmt: skip
    print(f"{len(found)} instance(s)", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with Cluster(args.db, create=False) as nf:
        instance = nf.instance(args.instance)
    if args.json:
        print(json.dumps(_instance_entry(instance, full=True)))
        return 0
    print(f"instance {instance.id}: {instance.definition} v{instance.version}, {_instance_state(instance)}")
    print(f"started {_iso(instance.created)} by {instance.started_by}; updated {_iso(instance.updated)}"
          + (f"; ended {_iso(instance.ended)}" if instance.ended else ""))  # fmt: skip
    if instance.key is not None:
        print(f"key {_show_name(instance.key)}")
    if instance.parent is not None:
        print(f"parent {instance.parent} (its run activity started this one)")
    for child, definition, status in instance.children:
        print(f"child {child} {definition} {status}")
    for name, position, waiting_for, wake_at in instance.branches:
        waits = f": waiting for signal {waiting_for}" if waiting_for else f": due {_iso(wake_at)}" if wake_at else ""
        print(f"branch {name} at {position}{waits}")
    print(f"variables {json.dumps(instance.variables, ensure_ascii=False)}")
    print("journal:" if instance.journal else "journal: no steps yet")
    if instance.journal and instance.journal[0].step > 0:
        pruned = instance.journal[0].step
        print(f"  (its first {pruned} steps were pruned: an instance keeps its last {JOURNAL_KEEP_STEPS})")
    for entry in instance.journal:
        took = _format_seconds(entry.ended - entry.started)
        clock = datetime.datetime.fromtimestamp(entry.started).strftime("%H:%M:%S.%f")[:-3]
        where = f"[{entry.branch}] " if entry.branch else ""
        print(f"  {entry.step:>3} {clock} {entry.node} fence {entry.fence} {where}{entry.activity} "
              f"({entry.type}, {took}): {entry.outcome}")  # fmt: skip
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    reason = _check_reason(args.reason)
    with Cluster(args.db, create=False) as nf:
        instance = nf.cancel(args.instance, reason)
    if args.json:
        print(json.dumps(_instance_entry(instance)))
    else:
        print(f"instance {instance.id} cancelled at {instance.position or 'its start'}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    older_than = parse_duration(args.older_than, "--older-than")
    faulted = (
        None if args.faulted_older_than is None else parse_duration(args.faulted_older_than, "--faulted-older-than")
    )
    with Cluster(args.db, create=False) as nf:
        instances, signals = nf.prune(older_than, faulted)
    if args.json:
        print(json.dumps({"instances": instances, "kept_signals": signals}))
    else:
        print(f"removed {instances} ended instance(s) and their journals, {signals} expired kept signal(s)")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    with Cluster(args.db, create=False) as nf:
        instance = nf.retry(args.instance)
    print(f"instance {instance.id} resumed at {instance.position or 'its start'}")
    return 0


# Teaching demos: each runs a small cluster twice, the piece off and then on, and reports the counts.

_DEMO_NODE = r"""
import asyncio, json, signal, sys
sys.path.insert(0, sys.argv[1])
import nodeflow
options, switches = json.loads(sys.argv[3]), json.loads(sys.argv[4])
app = options.pop("app", None)
if app:
    nodeflow.load_app(app)
node = nodeflow.Node(sys.argv[2], out=sys.stdout, **options)
for name, value in switches.items():
    setattr(node, name, value)
async def main():
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, node.request_stop, "SIGTERM")
    return await node.run()
sys.exit(asyncio.run(main()))
"""

_DEMO_COUNTER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import nodeflow
db, path, rounds, locked = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "on"
fences = []
with nodeflow.connect(db) as nf:
    for _ in range(rounds):
        held = nf.lock("demo-counter") if locked else None
        with open(path) as counter:
            value = int(counter.read())
        time.sleep(0.0005)  # between its read and its write, another process reads the same value
        with open(path + f".{os.getpid()}", "w") as counter:
            counter.write(str(value + 1))
        os.replace(path + f".{os.getpid()}", path)  # whole: a reader sees the old count or the new one
        if held is not None:
            fences.append(f"{held.fence}:{value + 1}")
            held.release()
print(" ".join(fences))
"""

_DEMO_JOBS = """
import time
import nodeflow

@nodeflow.handler("demo-jobs")
def job(message):
    time.sleep(1.0)
"""


class _DemoCluster:
    """A few nodes for one run of a demo, in a folder of their own; stop() ends them all."""

    def __init__(self, folder: str, nodes: int, switches: dict[str, Any], **options: Any) -> None:
        self.folder, self.db = folder, os.path.join(folder, "demo.db")
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.nf = Cluster(self.db)  # the demo's own handle; it creates the database the nodes join
        try:
            self._start(nodes, switches, options)
        except BaseException:
            self.stop()
            raise

    def _start(self, nodes: int, switches: dict[str, Any], options: dict[str, Any]) -> None:
        here, parent = os.path.dirname(os.path.abspath(__file__)), os.getpid()
        libc = _libc()
        for number in range(1, nodes + 1):
            node_id = f"n{number}"
            arguments = [json.dumps({"node_id": node_id, "grace": 1, **options}), json.dumps(switches)]
            with open(os.path.join(self.folder, f"{node_id}.log"), "wb") as log:
                self.processes[node_id] = subprocess.Popen(
                    [sys.executable, "-c", _DEMO_NODE, here, self.db, *arguments],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=lambda: _cluster_child_setup(parent, libc),  # the demo's nodes die with it
                )
        nf = self.nf
        _demo_wait(lambda: len([n for n in nf.nodes() if n["state"] == "running"]) == nodes, 15, "the nodes to start")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.nf.close()


def _demo_wait(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Wait for ``condition``; a demo whose cluster does not get there in time reports no counts."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise NodeflowError(f"demo: waited {_format_seconds(seconds)} for {what} in vain")
        time.sleep(0.01)


def _demo_locks(folder: str, on: bool) -> dict[str, Any]:
    processes, rounds = 4, 150
    counter = os.path.join(folder, "counter.txt")
    with open(counter, "w") as handle:
        handle.write("0")
    db = os.path.join(folder, "demo.db")
    Cluster(db).close()
    here = os.path.dirname(os.path.abspath(__file__))
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _DEMO_COUNTER, here, db, counter, str(rounds), "on" if on else "off"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    try:
        outputs = [worker.communicate(timeout=60)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    pairs = [token.split(":") for output in outputs for token in output.split()]
    with open(counter) as handle:
        final = int(handle.read())
    # In turn: the holder of fence N wrote the count N (its predecessor had written N - 1).
    in_turn = bool(pairs) and all(fence == value for fence, value in pairs)
    return {"expected": processes * rounds, "counter": final, "lost": processes * rounds - final,
            "fences_in_turn": in_turn}  # fmt: skip


def _demo_timers(folder: str, on: bool) -> dict[str, Any]:
    timers = 20
    cluster = _DemoCluster(folder, 3, {"_without_election": not on})
    nf = cluster.nf
    try:
        due = time.time() + 1.5
        for number in range(timers):
            nf.schedule(f"t{number}", "demo-fired", {"timer": number}, at=due)
        _demo_wait(lambda: not any(timer.due for timer in nf.timers()), 10, "every timer to fire")
        time.sleep(0.5)  # let any late duplicate land
        sent = nf.queues().get("demo-fired", {}).get("ready", 0)
    finally:
        cluster.stop()
    return {"timers": timers, "fired": sent, "duplicates": sent - timers}


def _demo_cache(folder: str, on: bool) -> dict[str, Any]:
    cluster = _DemoCluster(folder, 3, {"_without_cache_signals": not on})

    def definition(version: int) -> dict[str, Any]:
        steps = {"a": {"type": "log", "message": f"version {version}"}}
        return {"id": "demo", "start": "a", "activities": steps, "triggers": [{"type": "signal", "name": "go"}]}

    try:
        nf = cluster.nf
        nf.define(definition(1))
        asked = 0

        def every_node_has_started_one() -> bool:  # then every node has version 1 in its cache
            nonlocal asked
            nf.signal("go", {"round": "before"})
            asked += 1
            return len({instance.started_by.split(" ")[0] for instance in nf.instances()}) == 3

        _demo_wait(every_node_has_started_one, 10, "every node to start an instance")
        _demo_wait(lambda: len(nf.instances()) >= asked, 10, "the warm-up starts")  # none pending at the define
        nf.define(definition(2))
        for _ in range(30):
            nf.signal("go", {"round": "after"})  # each start these ask for follows the define

        def after() -> list[Instance]:
            return [i for i in nf.instances() if i.variables["input"].get("round") == "after"]

        _demo_wait(lambda: len(after()) >= 30, 10, "the starts after the define")
        started = after()
    finally:
        cluster.stop()
    stale = [i for i in started if i.version == 1]
    return {"started": len(started), "stale": len(stale),
            "stale_nodes": sorted({i.started_by.split(" ")[0] for i in stale})}  # fmt: skip


def _flock_waiters(path: str) -> int:
    """How many flock() calls wait for the file at ``path`` now (the "->" rows of /proc/locks)."""
    try:
        info = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as table:
            rows = [line.split() for line in table]
    except OSError:
        return 0
    where = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return sum(1 for row in rows if len(row) > 6 and row[1] == "->" and row[2] == "FLOCK" and row[6] == where)


def _demo_failover(folder: str, on: bool) -> dict[str, Any]:
    app = os.path.join(folder, "demo_jobs.py")
    with open(app, "w") as handle:
        handle.write(_DEMO_JOBS)
    lease = 4.0
    cluster = _DemoCluster(folder, 3, {"_without_liveness_locks": not on}, app=app, concurrency=2, lease=lease)
    try:
        nf = cluster.nf
        for number in range(12):
            nf.send("demo-jobs", {"job": number})

        def held_by(node: str) -> list[int]:
            return nf.store.read(
                lambda conn: [row[0] for row in conn.execute("SELECT id FROM messages WHERE lease_owner = ?", (node,))]
            )

        if on:  # both peers watch n2's liveness lock (blocked flocks in the kernel's table) before it dies
            _demo_wait(lambda: _flock_waiters(os.path.join(nf.store.lock_dir, "nodes", "n2.lock")) >= 2, 10,
                       "nodes n1 and n3 to watch n2's liveness lock")  # fmt: skip
        _demo_wait(lambda: bool(held_by("n2")), 10, "node n2 to take a job")
        held = held_by("n2")
        cluster.processes["n2"].kill()
        killed = time.monotonic()

        def taken_over() -> bool:
            owners = nf.store.read(
                lambda conn: [
                    row[0] for row in conn.execute(
                        f"SELECT lease_owner FROM messages WHERE id IN ({','.join('?' * len(held))})", held
                    )
                ]
            )  # fmt: skip
            return "n2" not in owners  # each handed back, done, or leased to a live node

        _demo_wait(taken_over, lease + 10, "the killed node's jobs to be handed back")
        took = time.monotonic() - killed
    finally:
        cluster.stop()
    return {"held": len(held), "lease": lease, "seconds": round(took, 2)}


_DEMOS: dict[str, tuple[Callable[[str, bool], dict[str, Any]], str]] = {
    "locks": (_demo_locks, "4 processes add 1 to a counter in a file, 150 times each"),
    "timers": (_demo_timers, "3 nodes, 20 timers due at the same moment"),
    "cache": (_demo_cache, "3 nodes start instances of a workflow, which is then redefined"),
    "failover": (_demo_failover, "3 nodes run 1-second jobs; one is killed holding some"),
}


def _demo_report(scenario: str, off: dict[str, Any], on: dict[str, Any]) -> list[str]:
    if scenario == "locks":
        return [
            f"without the lock: the counter ended at {off['counter']} of {off['expected']}: {off['lost']} updates "
            "were lost, each time two processes read the same value and both wrote it plus one.",
            f"with the lock:    the counter ended at {on['counter']} of {on['expected']}: "
            + ("none lost" if on["lost"] == 0 else f"{on['lost']} lost") + "; counts and fencing tokens "
            + ("match: the holder of token N wrote count N, one at a time."
               if on["fences_in_turn"] else "do not match."),
        ]  # fmt: skip
    if scenario == "timers":
        return [
            f"without the scheduler lock: 3 nodes fired {off['timers']} timers {off['fired']} times "
            f"({off['duplicates']} duplicates): each node saw them due and sent them before any marked them fired.",
            f"with it: one elected node fired {on['timers']} timers {on['fired']} times.",
        ]
    if scenario == "cache":
        where = ", ".join(off["stale_nodes"]) or "no node"
        return [
            f"without cache signals: of {off['started']} instances started after version 2 was defined, "
            f"{off['stale']} ran the stale version 1 (on {where}), which the nodes had cached.",
            f"with them: {on['stale']} of {on['started']} ran version 1; the define evicted every node's cached copy.",
        ]
    return [
        f"without liveness locks: the {off['held']} jobs the killed node held stayed stuck {off['seconds']} s, "
        f"until their {off['lease']:.0f}-second leases ran out.",
        f"with them: its {on['held']} jobs were handed back {on['seconds']} s after the kill: the kernel freed "
        "its liveness lock at once, and a peer watching that lock handed back its leases.",
    ]


def cmd_demo(args: argparse.Namespace) -> int:
    run, what = _DEMOS[args.scenario]
    results: dict[str, dict[str, Any]] = {}
    if not args.json:
        print(f"demo {args.scenario}: {what}; first with the piece switched off, then on.", flush=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: every node is stopped
    try:
        for label, on in (("off", False), ("on", True)):
            folder = tempfile.mkdtemp(prefix=f"nodeflow-demo-{args.scenario}-{label}-")
            try:
                results[label] = run(folder, on)
            except NodeflowError as error:  # keep the folder: the error names it, for the nodes' logs
                raise NodeflowError(f"{error} (the nodes' logs are in {folder})") from None
            except BaseException:  # interrupted: nothing to look at
                shutil.rmtree(folder, ignore_errors=True)
                raise
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        print(json.dumps({"demo": args.scenario, **results}))
    else:
        for line in _demo_report(args.scenario, results["off"], results["on"]):
            print(f"  {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="nodeflow.py", description="Cooperating processes on one host.")
    parser.add_argument("--db", default=None, help="cluster database (default $NODEFLOW_DB or ./nodeflow.db)")
    parser.add_argument("--version", action="version", version=f"nodeflow {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=_ArgumentParser)
    verbs.required = True

    status = verbs.add_parser("status", help="nodes, scheduler, queues, instances, timers and locks held")
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.add_argument(
        "--stall-after",
        default=None,
        help="a live node's heartbeat older than this is stalled (default: its own limit)",
    )
    status.set_defaults(run=cmd_status)

    serve = verbs.add_parser("serve", help="run a node of the cluster until SIGTERM or Ctrl-C")
    serve.add_argument("--node-id", default=None, help="this node's id (default: the first free of n1, n2, ...)")
    serve.add_argument("--role", choices=["auto", "replica"], default="auto", help="replica: never schedules")
    serve.add_argument("--concurrency", default="8", help="messages handled at once")
    serve.add_argument("--grace", default="10s", help="on SIGTERM, how long in-flight work may take to finish")
    serve.add_argument("--heartbeat", default="1s", help="how often the node records that it is alive")
    serve.add_argument("--lease", default="30s", help="a handler's lease on its message, renewed while it runs")
    serve.add_argument(
        "--stall-after",
        default=None,
        help="this node is stalled when its heartbeat stands still this long (default 5s, or 3 heartbeats if "
        "longer): its peers then take its leases, workflow bursts and office",
    )
    serve.add_argument(
        "--keep-instances",
        default="7d",
        help="while scheduling, remove completed and cancelled instances (and their journals) this long after",
    )
    serve.add_argument(
        "--keep-faulted",
        default=None,
        help="remove faulted instances this long after they faulted (default 30d, or --keep-instances if longer)",
    )
    serve.add_argument("--app", default=None, help="module (or .py file) whose @nodeflow.handler functions to run")
    serve.add_argument("--http", default=None, help="serve the dashboard, JSON API and /metrics at HOST:PORT")
    serve.add_argument(
        "--http-token",
        default=None,
        help="bearer token the API requires (needed beyond loopback; or NODEFLOW_HTTP_TOKEN)",
    )
    serve.set_defaults(run=cmd_serve)

    cluster = verbs.add_parser("cluster", help="run N serve nodes with merged logs and dashboards; Ctrl-C stops all")
    cluster.add_argument("--nodes", default="3", help="how many nodes (default 3)")
    cluster.add_argument("--replicas", default="0", help="how many of them (the last ones) never schedule")
    cluster.add_argument("--http-port", default="8080", help="node i serves HTTP on this port + i - 1 (0: any free)")
    cluster.add_argument("--restart", action="store_true", help="start a node again when it dies")
    cluster.add_argument("--app", default=None, help="module (or .py file) every node loads, as serve --app")
    cluster.add_argument("--grace", default="10s", help="how long each node may take to stop")
    cluster.set_defaults(run=cmd_cluster)

    schedule = verbs.add_parser("schedule", help="add, list or remove timers (fired by the scheduling node)")
    schedule.add_argument("action", choices=["add", "list", "remove"])
    schedule.add_argument("name", nargs="?", default=None)
    schedule.add_argument("--cron", default=None, help="5-field cron expression or @hourly, @daily, ...")
    schedule.add_argument("--tz", default=None, help="IANA time zone of the cron expression (default: local)")
    schedule.add_argument("--at", default=None, help="once, at this ISO 8601 time (local when no offset)")
    schedule.add_argument("--after", default=None, help="once, after this duration")
    schedule.add_argument("--queue", default=None, help="the queue each firing sends to")
    schedule.add_argument("--body", default=None, help="the message each firing sends, JSON")
    schedule.add_argument("--json", action="store_true", help="list as one JSON object")
    schedule.set_defaults(run=cmd_schedule)

    lock = verbs.add_parser("lock", help="run a command holding a named lock (NAME [--timeout S] -- CMD ...)")
    lock.add_argument("name", help="lock name")
    lock.add_argument("--timeout", default=None, help="give up after this long (a duration; 0 tries once)")
    lock.set_defaults(run=cmd_lock)

    send = verbs.add_parser("send", help="queue a message (QUEUE JSON); prints its id")
    send.add_argument("queue")
    send.add_argument("body", help="the message body, JSON")
    send.add_argument("--delay", default="0", help="deliver no sooner than this (a duration)")
    send.add_argument("--priority", default="0", help="higher is delivered first (a whole number)")
    send.add_argument(
        "--key", default=None, help="deduplication key: a second send while the first is queued is a no-op"
    )
    send.set_defaults(run=cmd_send)

    receive = verbs.add_parser("receive", help="print one message's body and ack it")
    receive.add_argument("queue")
    receive.add_argument("--wait", default="0", help="wait this long for a message (a duration)")
    receive.add_argument("--json", action="store_true", help="print id, queue, body and attempts as one JSON object")
    receive.set_defaults(run=cmd_receive)

    dead = verbs.add_parser("dead-letters", help="list, retry or purge the dead letters of a queue")
    dead.add_argument("action", choices=["list", "retry", "purge"])
    dead.add_argument("queue")
    dead.add_argument("--id", action="append", help="only this dead letter (repeatable)")
    dead.add_argument("--json", action="store_true", help="list as one JSON object")
    dead.set_defaults(run=cmd_dead_letters)

    define = verbs.add_parser("define", help="check and store a workflow definition (a new version if it exists)")
    define.add_argument("file", help="the definition, a JSON file (- reads standard input)")
    define.add_argument("--json", action="store_true", help="print the stored definition's id and version as JSON")
    define.set_defaults(run=cmd_define)

    definitions = verbs.add_parser("definitions", help="the latest version of each workflow definition")
    definitions.add_argument("--json", action="store_true", help="one JSON object")
    definitions.set_defaults(run=cmd_definitions)

    start = verbs.add_parser("start", help="start an instance of a workflow; prints its id")
    start.add_argument("definition", help="the workflow id")
    start.add_argument("--input", default="{}", help="the instance's input, a JSON object")
    start.add_argument("--wait", action="store_true", help="wait for the end; exit 0 completed, 1 faulted")
    start.add_argument("--timeout", default=None, help="with --wait: give up waiting after this long")
    start.add_argument("--json", action="store_true", help="print the id (or, with --wait, the instance) as JSON")
    start.add_argument(
        "--key", default=None, help="start at most one instance with this key: used before, its id is printed"
    )
    start.set_defaults(run=cmd_start)

    signal_verb = verbs.add_parser("signal", help="resume instances waiting for a signal; start those it triggers")
    signal_verb.add_argument("name")
    signal_verb.add_argument("--input", default="{}", help="the signal's data, a JSON object")
    signal_verb.add_argument(
        "--ttl", default="1h",
        help="if it resumes and starts nothing, keep it this long for the next instance to wait for it (0: drop it)",
    )  # fmt: skip
    signal_verb.add_argument("--json", action="store_true", help="one JSON object")
    signal_verb.set_defaults(run=cmd_signal)

    instances = verbs.add_parser("instances", help="workflow instances, oldest first")
    instances.add_argument("--status", choices=INSTANCE_STATUSES, default=None)
    instances.add_argument("--definition", default=None, help="only instances of this workflow")
    instances.add_argument("--limit", default=None, help="only the newest N")
    instances.add_argument("--json", action="store_true", help="one JSON object")
    instances.set_defaults(run=cmd_instances)

    show = verbs.add_parser("show", help="state, variables and journal of one instance")
    show.add_argument("instance", help="its id, or a unique prefix of it")
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.set_defaults(run=cmd_show)

    retry = verbs.add_parser("retry", help="resume a faulted instance at the activity that failed")
    retry.add_argument("instance")
    retry.set_defaults(run=cmd_retry)

    cancel = verbs.add_parser("cancel", help="end an instance that has not ended (its wait or loop ends too)")
    cancel.add_argument("instance", help="its id, or a unique prefix of it")
    cancel.add_argument("--reason", default=None, help="why, for its journal")
    cancel.add_argument("--json", action="store_true", help="print the cancelled instance as JSON")
    cancel.set_defaults(run=cmd_cancel)

    prune = verbs.add_parser("prune", help="remove ended instances and their journals now")
    prune.add_argument(
        "--older-than", default="7d", help="completed and cancelled instances that ended longer ago than this"
    )
    prune.add_argument(
        "--faulted-older-than",
        default=None,
        help="faulted instances that faulted longer ago than this (default 30d, or --older-than if longer)",
    )
    prune.add_argument("--json", action="store_true", help="one JSON object")
    prune.set_defaults(run=cmd_prune)

    demo = verbs.add_parser("demo", help="teaching scenarios: each piece switched off, then on, with counts")
    demo.add_argument("scenario", choices=sorted(_DEMOS))
    demo.add_argument("--json", action="store_true", help="the measured counts as one JSON object")
    demo.set_defaults(run=cmd_demo)
    return parser


def _split_command(words: list[str]) -> tuple[list[str], list[str]]:
    """For ``lock``, everything after the first ``--`` is the command to run, options and all."""
    position = 0
    while position < len(words):
        word = words[position]
        if word == "--db":
            position += 2
            continue
        if word.startswith("-"):
            position += 1
            continue
        if word == "lock" and "--" in words[position:]:
            split = words.index("--", position)
            return words[:split], words[split + 1 :]
        break
    return words, []


def main(argv: list[str] | None = None) -> int:
    words, command = _split_command(list(sys.argv[1:] if argv is None else argv))
    try:
        args = build_parser().parse_args(words)
        args.command = command
        args.db = args.db or default_db_path()
        return int(args.run(args))
    except NodeflowError as error:
        for line in str(error).split("\n"):  # several problems of a definition: a line each
            print(f"nodeflow: {one_line(line)}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `show ID | head -1`: the reader left; say nothing more, as cat does
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    # An --app module's `import nodeflow` must get this very module (its handler registry), not a
    # second copy of the file imported under its own name.
    sys.modules.setdefault("nodeflow", sys.modules[__name__])
    sys.exit(main())
