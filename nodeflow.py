#!/usr/bin/env python3
"""nodeflow: several cooperating processes on one host, coordinated through one directory.

Architecture in ten lines:
  - A cluster is one SQLite file (WAL mode) and a lock folder beside it, ``PATH.d/``.
  - Store: opens the database, owns the schema and its migrations, and runs every write inside
    ``BEGIN IMMEDIATE`` with bounded retries on SQLITE_BUSY.
  - Locks: kernel ``flock`` on one open file description per held lock in ``PATH.d/locks/``;
    the kernel wakes a blocked waiter the moment the lock is free and frees a dead holder's lock.
  - Fencing: every acquisition takes the next token for its name from SQLite, in one commit.
  - Doorbells: a datagram socket per listening process in ``PATH.d/nodes/``, rung after commits.
  - Bus: queues in SQLite with leases and dead letters; one process's writes share transactions.
  - Instructions: an ordered log with a cursor per node, under change tokens and a memory cache.
  - The handle returned by ``connect()`` is the Python API; ``main()`` is the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import datetime
import errno
import fcntl
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import secrets
import select
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import weakref
import zoneinfo
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

__all__ = [
    "NodeflowError",
    "InvalidInput",
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
        return seconds
    if not isinstance(value, str):
        raise InvalidInput(f"{what}: expected a duration, got {type(value).__name__}")
    text = value.strip()
    if _PLAIN_NUMBER.fullmatch(text):
        if not math.isfinite(float(text)):
            raise InvalidInput(f"{what}: {value!r} is too long to be a duration")
        return float(text)
    order = [unit for unit, _ in _DURATION_UNITS]
    total, position, last_rank = 0.0, 0, -1
    for match in _DURATION_PART.finditer(text):
        rank = order.index(match.group(2))
        if match.start() != position or rank <= last_rank:
            break
        total += float(match.group(1)) * dict(_DURATION_UNITS)[match.group(2)]
        position, last_rank = match.end(), rank
    else:
        if position == len(text) and position > 0 and math.isfinite(total):
            return total
    raise InvalidInput(
        f"{what}: {value!r} is not a duration; use a number and a unit (ms, s, m, h, d), "
        "largest first, such as 1.5s, 250ms or 1m30s"
    )


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
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.3g}s"


def _show_name(name: str, limit: int = 80) -> str:
    shown = repr(name)
    return shown if len(shown) <= limit else shown[: limit - 5] + "...'"


# ══════════════════════════════════════════════════════════════════════════════════════════
# 2. Store: the SQLite file, its lock folder, file modes, schema migrations and write retries.
# ══════════════════════════════════════════════════════════════════════════════════════════

SCHEMA_VERSION = 3
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


def _is_busy(error: sqlite3.Error) -> bool:
    text = str(error)
    return "database is locked" in text or "database is busy" in text or "database table is locked" in text


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
        self.path = os.path.abspath(path)
        self.lock_dir = self.path + ".d"
        self._mutex = threading.Lock()  # the read connection
        self._write_mutex = threading.Lock()  # the write connection: reads never wait for a commit
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        self._write_conn: sqlite3.Connection | None = None
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
        _LIVE_STORES.add(self)

    # Opening ------------------------------------------------------------------------------

    def _refuse_unusable_file(self) -> None:
        info = os.stat(self.path)
        if not stat.S_ISREG(info.st_mode):
            raise NotADatabase(f"{self.path} is not a regular file, so not a nodeflow database")
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
        conn = sqlite3.connect(path, timeout=self.settings.busy_timeout, isolation_level=None, check_same_thread=False)
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

    # Transactions ---------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            raise NodeflowError(
                f"this nodeflow handle was opened in process {self._pid}; a forked child must call "
                "nodeflow.connect() itself"
            )
        if self._conn is None:
            raise NodeflowError(f"the handle on {self.path} is closed")
        return self._conn

    def check_open(self) -> None:
        """Raise unless this handle may be used: open, and in the process that opened it."""
        with self._mutex:
            self._connection()

    def _writer(self) -> sqlite3.Connection:
        """The write connection, opened on first use; the caller holds _write_mutex."""
        self._connection()  # open and in its own process? (reads of two fields: no need to wait for a read)
        if self._write_conn is None:
            self._write_conn = self._connect(self.path)
        return self._write_conn

    def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one ``BEGIN IMMEDIATE`` transaction and commit; retried while busy."""
        ok, outcome = self.write_batch([work])[0]
        if not ok:
            raise outcome
        return outcome  # type: ignore[no-any-return]

    def write_batch(self, works: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        """Run several pieces of work in one transaction, each in its own savepoint.

        A piece that raises is rolled back alone; the others commit together. Returns, per
        piece, (True, its result) or (False, its exception). Retried while another writer holds
        the database, up to ``busy_timeout``, then every piece gets StoreBusy.
        """
        deadline = time.monotonic() + self.settings.busy_timeout
        pause = 0.001
        while True:
            with self._write_mutex:
                conn = self._writer()
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
        if "not a database" in text:
            return NotADatabase(
                f"{path} is not an SQLite database, or its header is damaged ({text}); "
                "choose another --db, or restore the file from a backup"
            )
        if "malformed" in text:
            return CorruptDatabase(
                f"{path} is damaged or not a database ({text}); nodeflow will not run on it: "
                "restore it from a backup or choose another --db"
            )
        if "disk is full" in text:
            return StoreError(f"{path}: the disk is full ({text}); free some space and retry")
        if "readonly" in text or "read-only" in text:
            return StoreError(f"{path} is read-only ({text}); nodeflow needs to write the file and its folder")
        if _is_busy(error):
            return StoreBusy(f"{path} is locked by another writer ({text}); retry")
        return StoreError(f"{path}: {text}")

    def close(self) -> None:
        with self._write_mutex, self._mutex:
            conns = [conn for conn in (self._write_conn, self._conn) if conn is not None]
            self._conn = self._write_conn = None
            if self._pid == os.getpid():
                for conn in conns:
                    conn.close()
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


class HeldLock:
    """A lock this process holds; ``release()`` (or leaving the ``with`` block) frees it."""

    __slots__ = ("name", "fence", "_locks", "_path", "_fd", "_inode", "_owner_set", "_pid", "__weakref__")

    def __init__(self, locks: LockManager, name: str, fence: int | None, path: str, fd: int, inode: int) -> None:
        self.name = name
        self.fence = fence
        self._locks = locks
        self._path = path
        self._fd: int | None = fd
        self._inode = inode
        self._owner_set: set[tuple[str, str]] | None = None
        self._pid = os.getpid()

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


class LockManager:
    """Named locks of one cluster for one process."""

    def __init__(self, store: Store, node: str | None = None, folder: str = "locks") -> None:
        self.store = store
        self.node = node
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
        self, name: str, fence: bool, blocking: bool, give_up: Callable[[], bool] = lambda: False
    ) -> HeldLock | None:
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
            token = self._next_fence(name) if fence else None
            note = {"name": name, "pid": os.getpid(), "node": self.node, "fence": token, "since": time.time()}
            data = json.dumps(note).encode("ascii")  # the default encoder is cached: much the fastest
            try:  # the note serves holder() only; safety never depends on it
                os.pwrite(fd, data, 0)
                if info.st_size > len(data):
                    os.ftruncate(fd, len(data))  # a killed holder left a longer note
            except OSError:
                pass
        except BaseException:
            _park_lock_file(fd, inode, path)
            raise
        return HeldLock(self, name, token, path, fd, inode)

    def _next_fence(self, name: str) -> int:
        def bump(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "INSERT INTO lock_fences (name, fence, acquired, pid, node) VALUES (?, 1, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET fence = fence + 1, acquired = excluded.acquired, "
                "pid = excluded.pid, node = excluded.node" + (" RETURNING fence" if _HAS_RETURNING else ""),
                (name, time.time(), os.getpid(), self.node),
            ).fetchall()
            if not row:
                row = conn.execute("SELECT fence FROM lock_fences WHERE name = ?", (name,)).fetchall()
            return int(row[0][0])

        return self.store.write(bump)

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
        return held

    # Asyncio API ----------------------------------------------------------------------------

    async def aacquire(self, name: str, timeout: float | str | None = None, *, fence: bool = True) -> HeldLock:
        self.store.check_open()
        name = check_lock_name(name)
        wait = _check_timeout(timeout)
        started = time.monotonic()
        if not fence:  # no database write, so the non-blocking try cannot stall the event loop
            held = self._acquire_now(name, False, blocking=False)
            if held is not None:
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
        return held

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
        except (OSError, ValueError):
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
                if not same:  # the whole folder went: give up the old lock, take the id again
                    with _LOCK_FDS_MUTEX:
                        _close_lock_fd(self._liveness_fd)
                    self._liveness_fd = None
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

    def ring(self, topics: Iterable[str]) -> None:
        """Send the topics to every other node's doorbell; never blocks, never raises."""
        data = "\n".join(sorted(set(topics))).encode("utf-8", "replace")[:4096]
        if not data:
            return
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        own = f"{self.node}.sock"
        with self._mutex:
            if self._sender is None:
                try:
                    self._sender = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                    )
                except OSError:
                    return  # out of descriptors, say: a lost ring costs a poll interval, no more
            sender = self._sender
        for name in names:
            if not name.endswith(".sock") or name == own or name.startswith("."):
                continue
            try:
                sender.sendto(data, self._address(name))
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
GROUP_COMMIT_MAX = 256  # pieces of work in one shared transaction


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


def encode_body(body: Any, limit: int) -> str:
    """A message body as compact JSON text; InvalidInput when it is not JSON or too large."""
    try:
        text = json.dumps(body, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as error:
        raise InvalidInput(f"a message body must be JSON data: {error}") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput("a message body must be valid Unicode text; it holds a lone surrogate") from None
    if size > limit:
        raise InvalidInput(f"the message body is {size} bytes of JSON; the limit is {limit} bytes")
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

    __slots__ = ("work", "rings", "state", "ok", "outcome", "event", "loop", "future")

    def __init__(self, work: Callable[[sqlite3.Connection], Any], rings: Iterable[str]) -> None:
        self.work, self.rings = work, frozenset(rings)
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
    own commit, and a durable commit is paid once per batch, not once per operation. Around
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
        self._busy = False  # a batch is being run, by the committer thread or by a leading caller
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

    def submit(self, work: Callable[[sqlite3.Connection], T], rings: Iterable[str] = ()) -> T:
        """Run ``work`` in the next shared transaction; returns once that has committed."""
        self._store.check_open()
        piece = _Piece(work, rings)
        piece.event = threading.Event()
        if self._enqueue(piece, may_lead=True):
            self._lead()
        if not piece.event.wait(self._store.settings.busy_timeout + 5):
            with self._cond:
                if piece.state == "queued":
                    piece.state = "abandoned"
                    raise StoreBusy(
                        f"{self._store.path}: no write slot within "
                        f"{_format_seconds(self._store.settings.busy_timeout)}; another process holds the "
                        "writer lock or a long transaction; retry"
                    )
            piece.event.wait()  # running: SQLite's own busy timeout bounds it
        if not piece.ok:
            raise piece.outcome
        return piece.outcome  # type: ignore[no-any-return]

    async def asubmit(self, work: Callable[[sqlite3.Connection], T], rings: Iterable[str] = ()) -> T:
        self._store.check_open()
        piece = _Piece(work, rings)
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

    def _lead(self) -> None:
        """Run one batch in the caller's thread, saving two thread switches, if the writer lock is
        free at once; else leave it to the committer thread, whose wait for the lock is unbounded."""
        try:
            try:
                locked = self._lock_writer(blocking=False)
            except Exception as error:  # the committer thread will meet it too, and answer everyone
                log.warning("taking the writer lock failed: %s", error)
                locked = False
            if locked:
                try:
                    batch = self._take_batch()
                    outcomes = self._write(batch)
                finally:
                    self._unlock_writer()
                self._finish(batch, outcomes)
        finally:
            with self._cond:
                self._busy = False
                if self._pending or self._closed:  # a closing committer's thread must see it is done
                    self._wake_thread()

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
                    self._finish(batch, [(False, failed)] * len(batch))
                    continue
                try:
                    batch = self._take_batch()
                    outcomes = self._write(batch)
                finally:
                    self._unlock_writer()
                self._finish(batch, outcomes)  # after the unlock: the next writer need not wait for it
            finally:
                with self._cond:
                    self._busy = False

    def _write(self, batch: list[_Piece]) -> list[tuple[bool, Any]]:
        if not batch:
            return []
        try:
            return self._store.write_batch([piece.work for piece in batch])
        except BaseException as error:  # the store is closed, the disk is gone, ...
            return [(False, error if isinstance(error, Exception) else NodeflowError(repr(error)))] * len(batch)

    def _finish(self, batch: list[_Piece], outcomes: list[tuple[bool, Any]]) -> None:
        """Ring the doorbells the committed pieces asked for, then answer every caller."""
        if not batch:
            return
        self.batches += 1
        self.pieces += len(batch)
        rings: set[str] = set()
        for piece, (ok, _) in zip(batch, outcomes, strict=True):
            if ok:
                rings |= piece.rings
        if rings:
            try:
                self._ring(rings)
            except Exception:
                log.exception("ringing doorbells failed")
        for piece, (ok, outcome) in zip(batch, outcomes, strict=True):
            self._answer(piece, ok, outcome)

    def _answer(self, piece: _Piece, ok: bool, outcome: Any) -> None:
        with self._cond:
            piece.state, piece.ok, piece.outcome = "done", ok, outcome
        if piece.event is not None:
            piece.event.set()
        elif piece.loop is not None and piece.future is not None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody to tell
                piece.loop.call_soon_threadsafe(_settle_future, piece.future, ok, outcome)

    def _lock_writer(self, blocking: bool) -> bool:
        if self._writer_fd is None:
            self._writer_fd = open_lock_file(os.path.join(self._store.lock_dir, "writer.lock"), (self._store.lock_dir,))
        try:
            fcntl.flock(self._writer_fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

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


def hand_back_leases(conn: sqlite3.Connection, owner: str, why: str) -> tuple[int, set[str]]:
    """Make every message leased by ``owner`` ready again now; how many, and their queues (to ring)."""
    queues = {queue for (queue,) in conn.execute("SELECT DISTINCT queue FROM messages WHERE lease_owner = ?", (owner,))}
    count = conn.execute(
        "UPDATE messages SET lease_owner = NULL, available_at = ?, last_error = ? WHERE lease_owner = ?",
        (time.time(), why, owner),
    ).rowcount
    return count, queues


def _bury(conn: sqlite3.Connection, message_id: int, error: str | None, now: float) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO dead_letters (id, queue, body, priority, attempts, created, died, last_error) "
        "SELECT id, queue, body, priority, attempts, created, ?, ? FROM messages WHERE id = ?",
        (now, error, message_id),
    )
    conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))


class Bus:
    """Durable queues with competing consumers, for one handle (its lease owner is ``owner``)."""

    def __init__(self, store: Store, committer: GroupCommitter, owner: str, wakeups: Wakeups) -> None:
        self.store, self.committer, self.owner, self.wakeups = store, committer, owner, wakeups
        self.settings = store.settings
        self.turns = LockManager(store, owner, folder="receivers")  # whose turn it is to wait, per queue
        # Queues whose last claim here got a message: the next receive claims at once, without
        # first reading whether one is ready (it most likely is).
        self._busy_queues: set[str] = set()

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

    def _claim_work(self, queue: str, lease: float, count: int) -> Callable[[sqlite3.Connection], list[Message]]:
        owner, limit = self.owner, self.settings.max_deliveries

        def claim(conn: sqlite3.Connection) -> list[Message]:
            now = time.time()
            taken: list[Message] = []
            # Priority by priority, highest first, each an index range of what is available now:
            # one ORDER BY over the whole queue would scan every delayed or leased message.
            level = conn.execute("SELECT MAX(priority) FROM messages WHERE queue = ?", (queue,)).fetchone()[0]
            while level is not None and len(taken) < count:
                rows = conn.execute(
                    "SELECT id, body, priority, attempts, created, last_error, lease_owner FROM messages "
                    "WHERE queue = ? AND priority = ? AND available_at <= ? ORDER BY available_at LIMIT ?",
                    (queue, level, now, count - len(taken)),
                ).fetchall()
                if not rows:
                    level = conn.execute(
                        "SELECT MAX(priority) FROM messages WHERE queue = ? AND priority < ?", (queue, level)
                    ).fetchone()[0]
                    continue
                for message_id, body, priority, attempts, created, last_error, previous in rows:
                    if previous is not None:  # its lease ran out without an ack or a nack
                        last_error = f"lease of {previous} expired after delivery {attempts}"
                    if attempts >= limit:  # delivered the most times allowed: a poison message
                        _bury(conn, message_id, last_error, now)
                        continue
                    conn.execute(
                        "UPDATE messages SET lease_owner = ?, available_at = ?, attempts = attempts + 1, "
                        "last_error = ? WHERE id = ?",
                        (owner, now + lease, last_error, message_id),
                    )
                    taken.append(
                        Message(
                            message_id, queue, json.loads(body), attempts + 1, priority, created, now + lease,
                            last_error, owner,
                        )
                    )  # fmt: skip
            return taken

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
        return self.committer.submit(work, rings)

    async def asend(
        self, queue: str, body: Any, delay: float | str = 0, priority: int = 0, key: str | None = None
    ) -> int:
        work, rings = self._prepare_send(queue, body, delay, priority, key)
        return await self.committer.asubmit(work, rings)

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

    def receive(self, queue: str, lease: float | str = 30, wait: float | str = 0, batch: int = 1) -> list[Message]:
        queue, lease_s, wait_s = self._check_receive(queue, lease, wait, batch)
        topic = _ring_topic_for_queue(queue)
        deadline = time.monotonic() + wait_s
        waiting_turn: HeldLock | None = None
        turn_wait: _LockAttempt | None = None  # one blocked attempt per call, however long it waits
        turn_granted = threading.Event()

        def granted() -> bool:
            turn_granted.set()
            return True

        try:
            while True:
                seen = self.wakeups.generation(topic)  # read before looking: a ring after it is not lost
                due = 0.0 if queue in self._busy_queues else self._ready_or_next_due(queue)
                if due == 0.0:
                    taken = self.committer.submit(self._claim_work(queue, lease_s, batch))
                    if taken:
                        self._busy_queues.add(queue)
                        return taken
                    self._busy_queues.discard(queue)
                    continue  # another consumer took it first, or it has run dry; look again
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
                        turn_wait = _LockAttempt(self.turns, queue, False, True, granted)
                        turn_wait.start()
                    if turn_granted.wait(min(left, self.settings.poll_interval)):
                        waiting_turn, turn_wait = turn_wait.abandon(), None
                    continue
                self.wakeups.wait(topic, seen, self._sleep_for(due, deadline))
        finally:
            if turn_wait is not None:
                late = turn_wait.abandon()
                if late is not None:
                    late.release()
            if waiting_turn is not None:
                waiting_turn.release()  # the next receiver in line watches from now on

    async def areceive(
        self, queue: str, lease: float | str = 30, wait: float | str = 0, batch: int = 1
    ) -> list[Message]:
        queue, lease_s, wait_s = self._check_receive(queue, lease, wait, batch)
        topic = _ring_topic_for_queue(queue)
        deadline = time.monotonic() + wait_s
        while True:
            seen = self.wakeups.generation(topic)
            due = 0.0 if queue in self._busy_queues else self._ready_or_next_due(queue)  # a short WAL read
            if due == 0.0:
                taken = await self.committer.asubmit(self._claim_work(queue, lease_s, batch))
                if taken:
                    self._busy_queues.add(queue)
                    return taken
                self._busy_queues.discard(queue)
                continue
            if time.monotonic() >= deadline:
                return []
            await self.wakeups.await_change(topic, seen, self._sleep_for(due, deadline))

    # Settling -----------------------------------------------------------------------------

    def _ack_work(self, message: Message, also: Callable[[sqlite3.Connection], T] | None) -> Callable[..., T | None]:
        def ack(conn: sqlite3.Connection) -> T | None:
            result = also(conn) if also is not None else None
            gone = conn.execute(
                "DELETE FROM messages WHERE id = ? AND attempts = ? AND lease_owner = ?",
                (message.id, message.attempts, message.owner),
            ).rowcount
            if not gone:
                raise LeaseLost(
                    f"message {message.id} of queue {message.queue!r} is no longer leased to {message.owner} "
                    "(its lease ran out and it was delivered again); the ack and its writes were rolled back"
                )
            return result

        ack.single_statement = also is None  # type: ignore[attr-defined]
        return ack

    def ack(self, message: Message, also: Callable[[sqlite3.Connection], T] | None = None) -> T | None:
        """Delete a handled message; ``also(conn)`` runs in the same transaction (all or nothing)."""
        return self.committer.submit(self._ack_work(message, also))

    async def aack(self, message: Message, also: Callable[[sqlite3.Connection], T] | None = None) -> T | None:
        return await self.committer.asubmit(self._ack_work(message, also))

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
                raise LeaseLost(
                    f"message {message.id} of queue {message.queue!r} is no longer leased to {message.owner}"
                )
            if message.attempts >= limit:
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
        return self.committer.submit(work, rings)  # type: ignore[no-any-return]

    async def anack(self, message: Message, delay: float | str = 0, error: str | None = None) -> str:
        work, rings = self._prepare_nack(message, delay, error)
        return await self.committer.asubmit(work, rings)

    def extend(self, message: Message, lease: float | str) -> float:
        """Push the lease to ``lease`` seconds from now; returns the new lease end (wall clock)."""
        return self.committer.submit(self._extend_work(message, lease))

    async def aextend(self, message: Message, lease: float | str) -> float:
        return await self.committer.asubmit(self._extend_work(message, lease))

    def _extend_work(self, message: Message, lease: float | str) -> Callable[[sqlite3.Connection], float]:
        seconds = parse_duration(lease, "lease")

        def extend(conn: sqlite3.Connection) -> float:
            until = time.time() + seconds
            changed = conn.execute(
                "UPDATE messages SET available_at = ? WHERE id = ? AND attempts = ? AND lease_owner = ?",
                (until, message.id, message.attempts, message.owner),
            ).rowcount
            if not changed:
                raise LeaseLost(
                    f"message {message.id} of queue {message.queue!r} is no longer leased to {message.owner}"
                )
            return until

        return extend

    def release_leases(self, owner: str) -> int:
        """Hand back at once every message leased by ``owner`` (a node known to be gone)."""

        count, queues = self.committer.submit(
            lambda conn: hand_back_leases(conn, owner, f"the lease holder {owner} went away")
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
        return [DeadLetter(row[0], row[1], json.loads(row[2]), *row[3:]) for row in rows]

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

    def __contains__(self, key: Any) -> bool:
        return self._lookup(key)[0]


# ══════════════════════════════════════════════════════════════════════════════════════════
# 7. Membership and election: who is alive (liveness locks), who schedules (scheduler.lock).
# ══════════════════════════════════════════════════════════════════════════════════════════

NODE_STATES = ("running", "stalled", "stopped", "dead")


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
    """node id -> pid of every node whose liveness lock is held now (the kernel's word, not a heartbeat)."""
    return {
        node: pid
        for node, pid in _lock_file_holders(os.path.join(lock_dir, "nodes"), ".lock").items()
        if pid is not None
    }


def scheduler_pid(lock_dir: str) -> int | None:
    return _lock_file_holders(lock_dir, ".lock").get("scheduler")


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


def take_office(conn: sqlite3.Connection, node: str) -> int:
    """The new scheduler's first act: bump the election epoch, in its own transaction."""
    conn.execute("UPDATE election SET epoch = epoch + 1, node = ?, since = ? WHERE id = 1", (node, time.time()))
    return int(conn.execute("SELECT epoch FROM election WHERE id = 1").fetchone()[0])


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
#   Vixie cron reaches the same result by watching its clock jump; we compute it, so it also holds for
#   gaps longer than the three hours Vixie would treat as a DST change.


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
        if self.minute_or_hour_starred:
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


def _fire_due_work(epoch: int) -> Callable[[sqlite3.Connection], tuple[int, set[str]]]:
    def fire(conn: sqlite3.Connection) -> tuple[int, set[str]]:
        check_epoch(conn, epoch)
        now = time.time()  # in the transaction: the firing time is its commit's, not its queueing's
        rows = conn.execute(
            "SELECT name, queue, body, cron, tz, due FROM timers WHERE due IS NOT NULL AND due <= ? "
            "ORDER BY due LIMIT ?",
            (now, FIRE_BATCH),
        ).fetchall()
        queues: set[str] = set()
        fired = 0
        for name, queue, body, cron, tz, _due in rows:
            # A cron timer's next slot is the first after now: slots missed while no scheduler
            # ran are fired once, here, not once each.
            try:
                following = _cron_schedule(cron, tz).next_after(now) if cron else None
            except (InvalidInput, ValueError) as error:  # its zone left tzdata, say: park it, fire the rest
                log.warning("timer %r cannot be scheduled any more (%s); it is paused", name, error)
                conn.execute("UPDATE timers SET due = NULL WHERE name = ?", (name,))
                continue
            conn.execute(
                "INSERT INTO messages (queue, body, priority, available_at, created) VALUES (?, ?, 0, ?, ?)",
                (queue, body, now, now),
            )
            conn.execute(
                "UPDATE timers SET due = ?, fired = fired + 1, last_fired = ? WHERE name = ?",
                (following, now, name),
            )
            queues.add(queue)
            fired += 1
        return fired, queues

    return fire


def _next_due(conn: sqlite3.Connection) -> float | None:
    due = conn.execute("SELECT MIN(due) FROM timers WHERE due IS NOT NULL").fetchone()[0]
    return None if due is None else float(due)


# ══════════════════════════════════════════════════════════════════════════════════════════
# Python API: connect() and the handle it returns, over the pieces above (not a DESIGN.md layer).
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
        self.bus = Bus(self.store, self.committer, self.id, self.wakeups)
        self.signals = Signals(self.store, self.committer, self.id, node is not None, self._listen)
        self.cache = MemoryCache(self.signals)
        self._listener: _Listener | None = None
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

    @overload
    def receive(
        self, queue: str, lease: float | str = ..., wait: float | str = ..., batch: None = ...
    ) -> Message | None: ...
    @overload
    def receive(
        self, queue: str, lease: float | str = ..., wait: float | str = ..., *, batch: int
    ) -> list[Message]: ...

    def receive(
        self, queue: str, lease: float | str = 30, wait: float | str = 0, batch: int | None = None
    ) -> Message | list[Message] | None:
        """Lease the next message (or up to ``batch`` of them), waiting up to ``wait`` seconds."""
        if parse_duration(wait, "wait") > 0:
            self._listen()
        taken = self.bus.receive(queue, lease, wait, 1 if batch is None else batch)
        return taken if batch is not None else (taken[0] if taken else None)

    @overload
    async def areceive(
        self, queue: str, lease: float | str = ..., wait: float | str = ..., batch: None = ...
    ) -> Message | None: ...
    @overload
    async def areceive(
        self, queue: str, lease: float | str = ..., wait: float | str = ..., *, batch: int
    ) -> list[Message]: ...

    async def areceive(
        self, queue: str, lease: float | str = 30, wait: float | str = 0, batch: int | None = None
    ) -> Message | list[Message] | None:
        if parse_duration(wait, "wait") > 0:
            self._listen()
        taken = await self.bus.areceive(queue, lease, wait, 1 if batch is None else batch)
        return taken if batch is not None else (taken[0] if taken else None)

    def ack(self, message: Message, also: Callable[[sqlite3.Connection], T] | None = None) -> T | None:
        """Delete a handled message. ``also(conn)`` runs in the ack's transaction: both or neither."""
        return self.bus.ack(message, also)

    async def aack(self, message: Message, also: Callable[[sqlite3.Connection], T] | None = None) -> T | None:
        return await self.bus.aack(message, also)

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
        return [Timer(r[0], r[1], json.loads(r[2]), *r[3:]) for r in rows]

    # Membership ---------------------------------------------------------------------------

    def nodes(self, stall_after: float = 5.0) -> list[dict[str, Any]]:
        """Every node that ever ran here: id, pid, host, role, state and heartbeat age (seconds)."""
        alive = live_nodes(self.store.lock_dir)
        rows = self.store.read(
            lambda conn: conn.execute(
                "SELECT id, pid, host, role, started, heartbeat, state FROM nodes ORDER BY id"
            ).fetchall()
        )
        now = time.time()
        found = []
        for node, pid, host, role, started, heartbeat, state in rows:
            if alive.get(node) is not None:
                state = "stalled" if now - heartbeat > stall_after else "running"
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
RING_MEMBERSHIP = "n"  # a node joined: its peers start watching its liveness lock at once


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
        self.out = out if out is not None else sys.stderr
        self.handlers = dict(_HANDLERS if handlers is None else handlers)
        for queue in self.handlers:
            check_queue_name(queue)
        self.lease = parse_duration(lease, "lease")
        self.handled = 0
        self.failed = 0
        self._handling: set[asyncio.Task[None]] = set()  # handler runs in flight
        self.id = node_id or "?"
        self.nf: Cluster | None = None
        self.epoch: int | None = None  # set while in office
        self.timers_fired = 0
        self._say_mutex = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_reason = "asked to"
        self._office_fd: int | None = None
        self._election: _FlockWaiter | None = None
        self._peers: dict[str, _FlockWaiter] = {}
        self._scheduling: asyncio.Task[None] | None = None
        self._log_handler = _NodeLogHandler(self)

    # The log ------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        if self.epoch is not None:
            return "scheduler"
        return "replica" if self.role == "replica" else "standby"

    def say(self, event: str) -> None:
        stamp = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
        with self._say_mutex:
            print(f"{stamp} {self.id} {self.label:<9} {event}", file=self.out, flush=True)

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
            "INSERT INTO nodes (id, pid, host, role, started, heartbeat, state) VALUES (?, ?, ?, ?, ?, ?, 'running') "
            "ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, host = excluded.host, role = excluded.role, "
            "started = excluded.started, heartbeat = excluded.heartbeat, state = 'running'",
            (self.id, os.getpid(), socket.gethostname(), self.role, now, now),
        )
        # Leases of an earlier life under this id are its own no more: hand them back now.
        return hand_back_leases(conn, self.id, f"node {self.id} restarted")[0]

    def request_stop(self, reason: str = "asked to") -> None:
        """Begin a graceful stop; safe from any thread and from signal handlers."""
        self._stop_reason = reason
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        logging.getLogger("nodeflow").addHandler(self._log_handler)
        try:
            nf = self.nf = self._join()
        except BaseException:
            logging.getLogger("nodeflow").removeHandler(self._log_handler)
            raise
        tasks: list[asyncio.Task[None]] = []
        try:
            handed_back = await nf.committer.asubmit(self._register)
            self.say(
                f"joined {nf.path} (pid {os.getpid()}, role {self.role})"
                + (f"; handed back {handed_back} leases of its earlier life" if handed_back else "")
            )
            await asyncio.to_thread(self._look_after_peers)
            nf.doorbells.ring({RING_MEMBERSHIP})  # the others start watching our liveness lock now
            if self.role == "auto":
                self._stand_for_election()
            beating = asyncio.create_task(self._beat())
            tasks.append(beating)
            workers = [
                asyncio.create_task(self._consume(queue, function))
                for queue, function in sorted(self.handlers.items())
                for _ in range(self.concurrency)
            ]
            tasks.extend(workers)
            if self.handlers:
                self.say(f"consuming {', '.join(sorted(self.handlers))} ({self.concurrency} at once each)")
            await self._stop.wait()
            self.say(f"stopping ({self._stop_reason}); grace {_format_seconds(self.grace)}")
            for watcher in self._peers.values():
                watcher.stop()  # peers leaving with us are for the nodes that stay to reap
            await self._drain(workers)
            beating.cancel()
            await self._step_down()
            with contextlib.suppress(NodeflowError):  # anything still leased to us goes back now
                nf.release_leases(self.id)
            now = time.time()
            await nf.committer.asubmit(
                lambda conn: conn.execute(
                    "UPDATE nodes SET state = 'stopped', heartbeat = ? WHERE id = ? AND pid = ?",
                    (now, self.id, os.getpid()),
                )
            )
            self.say("stopped")
            return 0
        finally:
            # Also when run() itself was cancelled or failed: nothing of this node may outlive it.
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
            logging.getLogger("nodeflow").removeHandler(self._log_handler)
            nf.close()

    # Work -----------------------------------------------------------------------------------

    async def _consume(self, queue: str, function: Callable[[Message], Any]) -> None:
        """One worker: receive a message of ``queue``, run its handler, settle it; until stopping."""
        assert self.nf is not None and self._stop is not None
        while not self._stop.is_set():
            try:
                message = await self.nf.areceive(queue, lease=self.lease, wait=self.settings.poll_interval)
            except NodeflowError as error:
                self.say(f"receiving from {queue} failed: {error}")
                await asyncio.sleep(self.settings.poll_interval)
                continue
            if message is None:
                continue
            handling = asyncio.create_task(self._handle(message, function))
            self._handling.add(handling)
            try:
                await asyncio.shield(handling)  # stopping cancels this worker, not the handler run
            finally:
                self._handling.discard(handling)

    async def _keep_leased(self, message: Message) -> None:
        """While a handler runs, renew its message's lease every third of a lease: a slow handler
        must not see its message delivered again elsewhere."""
        assert self.nf is not None
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self.nf.aextend(message, self.lease)
            except LeaseLost:
                return
            except NodeflowError as error:  # a busy database: the next try may do
                self.say(f"renewing the lease of message {message.id} failed: {error}")

    async def _handle(self, message: Message, function: Callable[[Message], Any]) -> None:
        assert self.nf is not None
        keeper = asyncio.create_task(self._keep_leased(message))
        try:
            try:
                if inspect.iscoroutinefunction(function):
                    await function(message)
                else:
                    await asyncio.to_thread(function, message)
            finally:
                keeper.cancel()
        except asyncio.CancelledError:  # the grace period ran out: hand the message back at once
            with contextlib.suppress(NodeflowError):
                await self.nf.anack(message, 0, "interrupted: the node stopped before the handler finished")
            raise
        except Exception as error:
            self.failed += 1
            delay = min(60.0, 2.0 ** (message.attempts - 1))
            text = f"{type(error).__name__}: {error}"
            try:
                outcome = await self.nf.anack(message, delay, text)
            except NodeflowError as settle_error:
                self.say(f"message {message.id} of {message.queue}: {text}; could not nack it: {settle_error}")
                return
            then = "now a dead letter" if outcome == "dead" else f"retry in {_format_seconds(delay)}"
            self.say(f"message {message.id} of {message.queue} failed (delivery {message.attempts}): {text}; {then}")
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
            conn.execute(
                "UPDATE nodes SET heartbeat = ?, state = 'running' WHERE id = ? AND pid = ?", (time.time(), node, pid)
            )

        while True:
            seen = self.nf.wakeups.generation(RING_MEMBERSHIP)
            try:
                await self.nf.committer.asubmit(beat)
                await asyncio.to_thread(self._look_after_peers)  # may wait for the writer: not on the loop
            except Exception as error:  # a busy or full disk: keep beating, say so
                self.say(f"heartbeat failed: {error}")
            await self.nf.wakeups.await_change(RING_MEMBERSHIP, seen, self.heartbeat)  # a node joined: watch it now

    def _look_after_peers(self) -> None:
        self._reap_dead()
        self._watch_peers()

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
            if peer == self.id or peer in alive:
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
        while True:
            try:
                epoch = self.nf.committer.submit(functools.partial(take_office, node=self.id))
                break
            except NodeflowError as error:
                if self._stop is not None and self._stop.is_set():
                    with _LOCK_FDS_MUTEX:
                        _close_lock_fd(fd)
                    return
                self.say(f"taking office failed ({error}); retrying")
                time.sleep(0.5)
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._begin_office, fd, epoch)

    def _begin_office(self, fd: int, epoch: int) -> None:
        assert self._stop is not None
        if self._stop.is_set():  # won while stopping: leave at once
            with _LOCK_FDS_MUTEX:
                _close_lock_fd(fd)
            return
        self._office_fd, self.epoch = fd, epoch
        self.say(f"took office as the scheduling node (epoch {epoch})")
        self._scheduling = asyncio.create_task(self._schedule(epoch))

    async def _schedule(self, epoch: int) -> None:
        """Fire what is due, sleep until the next due time or a ring, and again, while in office."""
        assert self.nf is not None and self._stop is not None
        nf = self.nf
        next_prune = time.monotonic() + PRUNE_INTERVAL
        while not self._stop.is_set():
            seen = nf.wakeups.generation(RING_TIMERS)
            try:
                fired, queues = await nf.committer.asubmit(_fire_due_work(epoch))
            except LostOffice as error:  # our scheduler.lock was removed and another node took a new one
                self.say(f"lost office: {error}; standing again")
                if self._office_fd is not None:
                    with _LOCK_FDS_MUTEX:
                        _close_lock_fd(self._office_fd)
                self._office_fd, self.epoch, self._scheduling = None, None, None
                self._stand_for_election()
                return
            except NodeflowError as error:
                self.say(f"firing timers failed: {error}; retrying")
                await asyncio.sleep(min(1.0, self.settings.poll_interval))
                continue
            if fired:
                self.timers_fired += fired
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
            due = nf.store.read(_next_due)
            # Wake at the next due time, on a ring (a timer added), and at least every second:
            # a wall-clock step must not leave a timer waiting long.
            pause = 1.0 if due is None else min(1.0, max(0.0, due - time.time()))
            await nf.wakeups.await_change(RING_TIMERS, seen, pause)

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
        with contextlib.suppress(NodeflowError):
            await self.nf.committer.asubmit(
                lambda conn: conn.execute(
                    "UPDATE election SET node = NULL, since = NULL WHERE id = 1 AND epoch = ?", (epoch,)
                )
            )
        with _LOCK_FDS_MUTEX:
            _close_lock_fd(self._office_fd)
        self._office_fd = None
        self.say(f"stepped down (epoch {epoch})")
        self.epoch = None


# ══════════════════════════════════════════════════════════════════════════════════════════
# 12. CLI: one subcommand per verb; exit 0 success, 1 a failure explained, 2 bad usage or input.
# ══════════════════════════════════════════════════════════════════════════════════════════

_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not the whole usage text
        raise InvalidInput(f"{self.prog}: {message} (see --help)")


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
    }


def _timer_entry(timer: Timer) -> dict[str, Any]:
    return {"name": timer.name, "queue": timer.queue, "cron": timer.cron, "tz": timer.tz, "next": _iso(timer.due)}


def cmd_status(args: argparse.Namespace) -> int:
    stall_after = parse_duration(args.stall_after, "--stall-after")
    with Cluster(args.db, create=False) as nf:
        nodes = nf.nodes(stall_after)
        scheduler = nf.scheduler()
        locks = nf.held()
        queues = nf.queues()
        timers = [timer for timer in nf.timers(limit=10) if timer.due is not None]
        if args.json:
            report = {
                "nodes": [
                    {key: node[key] for key in ("id", "pid", "role", "state", "heartbeat_age")} for node in nodes
                ],
                "scheduler": None if scheduler is None else {"node": scheduler["node"], "epoch": scheduler["epoch"]},
                "queues": queues,
                "locks": [_lock_entry(i) for i in locks],
                "timers": [_timer_entry(timer) for timer in timers],
            }
            print(json.dumps(report))
            return 0
        print(f"cluster {nf.path}")
        if scheduler is None:
            print("scheduler: none (no eligible node runs; timers wait)")
        else:
            print(f"scheduler: {scheduler['node']} (pid {scheduler['pid']}, epoch {scheduler['epoch']})")
        if not nodes:
            print("nodes: none has run")
        for node in nodes:
            office = " (scheduler)" if scheduler is not None and scheduler["node"] == node["id"] else ""
            print(
                f"node {node['id']}{office}: {node['state']}, role {node['role']}, pid {node['pid']}, "
                f"heartbeat {node['heartbeat_age']:.1f}s ago"
            )
        if not queues:
            print("queues: none")
        for queue, depth in queues.items():
            counts = ", ".join(f"{count} {kind}" for kind, count in depth.items())
            print(f"queue {_show_name(queue)}: {counts}")
        for timer in timers:
            print(f"timer {_show_name(timer.name)}: next {_iso(timer.due)} -> queue {_show_name(timer.queue)}")
        if not locks:
            print("locks: none held")
        for info in locks:
            fence = f"fence {info.fence}" if info.fence is not None else "no fence"
            print(f"lock {_show_name(info.name)}: {fence}, held by {info.describe()}")
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

    async def serve() -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        return await node.run()

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
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        libc = None
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


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="nodeflow.py", description="Cooperating processes on one host.")
    parser.add_argument("--db", default=None, help="cluster database (default $NODEFLOW_DB or ./nodeflow.db)")
    parser.add_argument("--version", action="version", version=f"nodeflow {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=_ArgumentParser)
    verbs.required = True

    status = verbs.add_parser("status", help="nodes, scheduler, queues, timers and locks held")
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.add_argument("--stall-after", default="5s", help="a live node's heartbeat older than this is stalled")
    status.set_defaults(run=cmd_status)

    serve = verbs.add_parser("serve", help="run a node of the cluster until SIGTERM or Ctrl-C")
    serve.add_argument("--node-id", default=None, help="this node's id (default: the first free of n1, n2, ...)")
    serve.add_argument("--role", choices=["auto", "replica"], default="auto", help="replica: never schedules")
    serve.add_argument("--concurrency", default="8", help="messages handled at once")
    serve.add_argument("--grace", default="10s", help="on SIGTERM, how long in-flight work may take to finish")
    serve.add_argument("--heartbeat", default="1s", help="how often the node records that it is alive")
    serve.add_argument("--lease", default="30s", help="a handler's lease on its message, renewed while it runs")
    serve.add_argument("--app", default=None, help="module (or .py file) whose @nodeflow.handler functions to run")
    serve.set_defaults(run=cmd_serve)

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
        print(f"nodeflow: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # An --app module's `import nodeflow` must get this very module (its handler registry), not a
    # second copy of the file imported under its own name.
    sys.modules.setdefault("nodeflow", sys.modules[__name__])
    sys.exit(main())
