"""Shared helpers for nodeflow's tests: temporary clusters, real child processes, checksums."""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
from pathlib import Path

# `make chaos` sets NODEFLOW_CHAOS=1: the churn tests then run their long versions; `make test`
# runs shorter ones that still kill, stop and check the same things.
CHAOS = os.environ.get("NODEFLOW_CHAOS") == "1"

ROOT = Path(__file__).resolve().parent.parent
NODEFLOW = str(ROOT / "nodeflow.py")
PYTHON = sys.executable


class ClusterTestCase(unittest.TestCase):
    """Each test gets a fresh folder with a database path in it (not created until used)."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="nodeflow-test-")
        self.db = os.path.join(self.dir, "cluster.db")
        self.children: list[subprocess.Popen] = []
        self.extra_pids: list[int] = []  # grandchildren (forked by children) to kill at the end
        self._pending: dict[int, bytes] = {}  # bytes read from a child's stdout past the last line

    def tearDown(self) -> None:
        for pid in self.extra_pids:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for child in self.children:
            if child.poll() is None:
                try:
                    child.kill()
                except ProcessLookupError:
                    pass
            child.wait(timeout=10)
            for stream in (child.stdout, child.stderr, child.stdin):
                if stream is not None:
                    stream.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def cli(
        self, *args: str, timeout: float = 60, env: dict[str, str] | None = None, input: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run ``nodeflow.py --db DB ARGS...`` to completion."""
        return subprocess.run(
            [PYTHON, NODEFLOW, "--db", self.db, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=dict(os.environ, **(env or {})),
            cwd=self.dir,
        )

    def spawn_cli(self, *args: str, **kwargs) -> subprocess.Popen:
        child = subprocess.Popen(
            [PYTHON, NODEFLOW, "--db", self.db, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.dir,
            **kwargs,
        )
        self.children.append(child)
        return child

    def spawn_python(self, code: str, *args: str, **kwargs) -> subprocess.Popen:
        """Start a Python child that can ``import nodeflow``; ``code`` is dedented first."""
        env = dict(os.environ, PYTHONPATH=str(ROOT), NODEFLOW_DB=self.db)
        child = subprocess.Popen(
            [PYTHON, "-c", textwrap.dedent(code), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.dir,
            env=env,
            **kwargs,
        )
        self.children.append(child)
        return child

    def read_line(self, child: subprocess.Popen, prefix: str, timeout: float = 20) -> str:
        """The next stdout line starting with ``prefix``; fails on EOF or after ``timeout`` s."""
        fd = child.stdout.fileno()
        pending = self._pending.get(child.pid, b"")
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in pending:
                raw, pending = pending.split(b"\n", 1)
                line = raw.decode("utf-8", "replace")
                if line.startswith(prefix):
                    self._pending[child.pid] = pending
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                self.fail(f"no line {prefix!r} from child {child.pid} within {timeout}s")
            if select.select([fd], [], [], left)[0]:
                data = os.read(fd, 65536)
                if not data:
                    self.fail(
                        f"child {child.pid} ended (rc={child.poll()}) before printing {prefix!r}: "
                        f"{self.stderr_of(child)}"
                    )
                pending += data

    def stderr_of(self, child: subprocess.Popen) -> str:
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "(still running)"
        fd = child.stderr.fileno()
        chunks = []
        while select.select([fd], [], [], 1)[0]:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode("utf-8", "replace")

    def finish(self, child: subprocess.Popen, timeout: float = 30) -> tuple[int, str, str]:
        """Wait (bounded) for a child to end; its exit status and the rest of its output."""
        out, err = child.communicate(timeout=timeout)
        return child.returncode, self._pending.pop(child.pid, b"").decode() + out, err

    def wait_until(self, condition, timeout: float = 10, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"{what}: not true within {timeout}s")
            time.sleep(0.01)


class LoggedProcess:
    """A child process and the file its output goes to."""

    def __init__(self, process: subprocess.Popen, log_path: str) -> None:
        self.process, self.log_path = process, log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return log.read()


def logs_of(nodes: list[LoggedProcess], tail: int = 40) -> str:
    """The last lines of every node's log, each under a line naming it and saying how it is."""
    parts = []
    for node in nodes:
        try:
            lines = node.text().splitlines()
        except FileNotFoundError:
            lines = ["(log gone)"]
        state = "running" if node.process.poll() is None else f"exited {node.process.returncode}"
        name = os.path.basename(node.log_path)
        parts.append(f"--- {name} (pid {node.pid}, {state}): {min(tail, len(lines))} of {len(lines)} lines")
        parts.extend(lines[-tail:])
    return "\n".join(parts)


class PrintsLogsOnFailure(unittest.TestCase):
    """A test case with a ``logs()`` method: on a failure or an error, the end of every node's log is
    printed (read in tearDown, before the test's folder goes)."""

    def logs(self) -> str:
        raise NotImplementedError

    def tearDown(self) -> None:
        self.saved_logs = self.logs()
        super().tearDown()

    def run(self, result: unittest.TestResult | None = None) -> unittest.TestResult | None:
        result = super().run(result)
        if result is not None and any(case is self for case, _ in [*result.failures, *result.errors]):
            logs = getattr(self, "saved_logs", None) or self.logs()
            print(f"\n{self.id()} failed; the nodes' logs:\n{logs}", file=sys.stderr, flush=True)
        return result


def table_rows(db: str, tables: tuple[str, ...]) -> dict[str, list[tuple]]:
    """Every row of ``tables``, sorted, read through a read-only connection (which writes nothing)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {table: sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr) for table in tables}
    finally:
        conn.close()


def thread_states(pid: int) -> set[str]:
    """The state letters of every thread of a process (all "T" once a SIGSTOP has stopped it)."""
    states = set()
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as stat:
                    states.add(stat.read().rsplit(")", 1)[1].split()[0])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue  # a thread that just ended
    return states


def process_state(pid: int) -> str | None:
    """The state letter of a process from /proc (R, S, T, Z, ...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z", "X")


def blocked_flock_waiters() -> set[int]:
    """Pids blocked in flock() right now, from the kernel's lock table (rows marked '->')."""
    with open("/proc/locks") as table:
        rows = [line.split() for line in table]
    return {int(row[5]) for row in rows if len(row) > 6 and row[1] == "->" and row[2] == "FLOCK"}


def file_digest(path: str) -> str | None:
    """SHA-256 of a file, or None if it does not exist (call only while no SQLite has it open)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def tree_snapshot(path: str) -> dict[str, str | None]:
    """Digests of a database file and its -wal/-shm companions, to prove nothing changed."""
    return {suffix: file_digest(path + suffix) for suffix in ("", "-wal", "-shm")}
