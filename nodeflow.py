#!/usr/bin/env python3
"""nodeflow: several cooperating processes on one host, coordinated through one directory.

Architecture in ten lines:
  - A cluster is one SQLite file (WAL mode) and a lock folder beside it, ``PATH.d/``.
  - Store: opens the database, owns the schema and its migrations, and runs every write inside
    ``BEGIN IMMEDIATE`` with bounded retries on SQLITE_BUSY.
  - Locks: kernel ``flock`` on one open file description per held lock in ``PATH.d/locks/``;
    the kernel wakes a blocked waiter the moment the lock is free and frees a dead holder's lock.
  - Fencing: every acquisition takes the next token for its name from SQLite, in one commit.
  - The handle returned by ``connect()`` is the Python API; ``main()`` is the command line.
  - Everything is the standard library; a section only uses the sections above it.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import ctypes
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

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
    "Cluster",
    "connect",
    "main",
]

__version__ = "0.1.0"

T = TypeVar("T")


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

    def __post_init__(self) -> None:
        if self.synchronous not in ("FULL", "NORMAL"):
            raise InvalidInput(f"synchronous must be FULL or NORMAL, not {self.synchronous!r}")
        object.__setattr__(self, "busy_timeout", parse_duration(self.busy_timeout, "busy_timeout"))


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

SCHEMA_VERSION = 1
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
        self._mutex = threading.Lock()
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
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

    def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one ``BEGIN IMMEDIATE`` transaction and commit; retried while busy."""
        deadline = time.monotonic() + self.settings.busy_timeout
        pause = 0.001
        while True:
            with self._mutex:
                conn = self._connection()
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as error:
                    if not _is_busy(error):
                        raise self._translate(error) from error
                else:
                    try:
                        result = work(conn)
                        conn.execute("COMMIT")
                        return result
                    except BaseException as error:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        if isinstance(error, sqlite3.Error):
                            raise self._translate(error) from error
                        raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreBusy(
                    f"{self.path} stayed locked by another writer for {_format_seconds(self.settings.busy_timeout)}; "
                    "retry, or find the process holding a long write transaction"
                )
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)

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
        with self._mutex:
            conn, self._conn = self._conn, None
            if conn is not None and self._pid == os.getpid():
                conn.close()
        _LIVE_STORES.discard(self)

    def _abandon_after_fork(self) -> None:
        # A connection must not be used, nor closed, in a forked child: closing could checkpoint
        # and delete the WAL under the parent. Keep the object alive so it is never finalized.
        if self._conn is not None:
            _FORK_ORPHANS.append(self._conn)


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

    def __init__(self, store: Store, node: str | None = None) -> None:
        self.store = store
        self.node = node
        self.directory = os.path.join(store.lock_dir, "locks")
        self._mine = threading.local()  # names each thread holds through the blocking API
        _private_directory(self.directory, create=True)

    # The kernel part -----------------------------------------------------------------------

    def _open_lock_file(self, path: str) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        with _LOCK_FDS_MUTEX:
            try:
                fd = os.open(path, flags, 0o600)
            except FileNotFoundError:  # the lock folder was removed: make it again, privately
                _private_directory(self.store.lock_dir, create=True)
                _private_directory(self.directory, create=True)
                fd = os.open(path, flags, 0o600)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise StoreError(f"lock file {path} is a symbolic link; someone planted it: remove it") from None
                raise
            _LOCK_FDS.add(fd)
            return fd

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


class Cluster:
    """A synchronous handle on a cluster, with ``a``-prefixed coroutine twins for asyncio code."""

    def __init__(
        self,
        path: str | None = None,
        *,
        node: str | None = None,
        create: bool = True,
        settings: Settings | None = None,
    ) -> None:
        self.store = Store(path or default_db_path(), create=create, settings=settings)
        self.path = self.store.path
        try:
            self.locks = LockManager(self.store, node)
        except BaseException:
            self.store.close()
            raise

    def lock(self, name: str, timeout: float | str | None = None, *, fence: bool = True) -> HeldLock:
        """Acquire ``name`` now; ``timeout=0`` tries once; raises LockTimeout when time runs out."""
        return self.locks.acquire(name, timeout, fence=fence)

    def alock(self, name: str, timeout: float | str | None = None, *, fence: bool = True) -> _AsyncLockRequest:
        return _AsyncLockRequest(self.locks, name, timeout, fence)

    def holder(self, name: str) -> LockInfo | None:
        return self.locks.holder(name)

    def held(self) -> list[LockInfo]:
        return self.locks.held()

    def close(self) -> None:
        remove_idle_lock_files(self.locks.directory)
        self.store.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(path: str | None = None, **options: Any) -> Cluster:
    """Open the cluster at ``path`` (default ``$NODEFLOW_DB`` or ``./nodeflow.db``), creating it."""
    return Cluster(path, **options)


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


def cmd_status(args: argparse.Namespace) -> int:
    with Cluster(args.db, create=False) as nf:
        locks = nf.held()
        if args.json:
            print(json.dumps({"nodes": [], "scheduler": None, "queues": {}, "locks": [_lock_entry(i) for i in locks]}))
            return 0
        print(f"cluster {nf.path}")
        if not locks:
            print("locks: none held")
        for info in locks:
            fence = f"fence {info.fence}" if info.fence is not None else "no fence"
            print(f"lock {_show_name(info.name)}: {fence}, held by {info.describe()}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="nodeflow.py", description="Cooperating processes on one host.")
    parser.add_argument("--db", default=None, help="cluster database (default $NODEFLOW_DB or ./nodeflow.db)")
    parser.add_argument("--version", action="version", version=f"nodeflow {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=_ArgumentParser)
    verbs.required = True

    status = verbs.add_parser("status", help="nodes, scheduler, queues and locks held")
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(run=cmd_status)

    lock = verbs.add_parser("lock", help="run a command holding a named lock (NAME [--timeout S] -- CMD ...)")
    lock.add_argument("name", help="lock name")
    lock.add_argument("--timeout", default=None, help="give up after this long (a duration; 0 tries once)")
    lock.set_defaults(run=cmd_lock)
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
    sys.exit(main())
