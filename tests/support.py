"""Shared helpers for nodeflow's tests: temporary clusters, real child processes, checksums."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODEFLOW = str(ROOT / "nodeflow.py")
PYTHON = sys.executable


class ClusterTestCase(unittest.TestCase):
    """Each test gets a fresh folder with a database path in it (not created until used)."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="nodeflow-test-")
        self.db = os.path.join(self.dir, "cluster.db")
        self.children: list[subprocess.Popen] = []

    def tearDown(self) -> None:
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

    def cli(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``nodeflow.py --db DB ARGS...`` to completion."""
        return subprocess.run(
            [PYTHON, NODEFLOW, "--db", self.db, *args],
            capture_output=True, text=True, timeout=timeout, input=input,
            env=dict(os.environ, **(env or {})), cwd=self.dir,
        )

    def spawn_cli(self, *args: str, **kwargs) -> subprocess.Popen:
        child = subprocess.Popen(
            [PYTHON, NODEFLOW, "--db", self.db, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.dir, **kwargs,
        )
        self.children.append(child)
        return child

    def spawn_python(self, code: str, *args: str, **kwargs) -> subprocess.Popen:
        """Start a Python child that can ``import nodeflow``; ``code`` is dedented first."""
        env = dict(os.environ, PYTHONPATH=str(ROOT), NODEFLOW_DB=self.db)
        child = subprocess.Popen(
            [PYTHON, "-c", textwrap.dedent(code), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.dir, env=env, **kwargs,
        )
        self.children.append(child)
        return child

    def wait_for_line(self, child: subprocess.Popen, expected: str, timeout: float = 20) -> str:
        """Read the child's stdout until a line starting with ``expected``; fail on EOF or time-out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                self.fail(f"child exited (rc={child.poll()}) before printing {expected!r}: "
                          f"{child.stderr.read()}")
            if line.startswith(expected):
                return line.strip()
        self.fail(f"no line {expected!r} within {timeout}s")


def file_digest(path: str) -> str | None:
    """SHA-256 of a file, or None if it does not exist (call only while no SQLite has it open)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def tree_snapshot(path: str) -> dict[str, str | None]:
    """Digests of a database file and its -wal/-shm companions, to prove nothing changed."""
    return {suffix: file_digest(path + suffix) for suffix in ("", "-wal", "-shm")}
