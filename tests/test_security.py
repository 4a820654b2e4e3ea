"""Security checks as tests: file modes, lock folders, planted links, HTTP exposure, names, no code.

Each test plays the attacker (or the careless operator) against real ``nodeflow.py`` processes,
and each can fail: it checks the bytes on disk, the kernel's tables or the process's answers.

- Private files: with a real ``serve`` node running, after a ``lock`` and a ``send``, the database
  (and -wal, -shm), ``PATH.d``, ``locks/``, ``nodes/``, the node's socket and lock files give
  group and others nothing (mode bits), also when the children run with ``umask 000``.
- Lock folders another user can write (mode 0o777, 0o770, ...), or owns (root only: chown to
  65534), or that are symbolic links, are refused with a message that says what to do.
- Planted links: a symbolic link (or a hard link) in place of a named lock file, a node's liveness
  lock, its doorbell socket, ``scheduler.lock`` or ``writer.lock``: nodeflow never writes, truncates
  or follows into the victim file; it refuses with a clear error, or replaces the link safely.
- HTTP: ``--http 127.0.0.1:0`` listens on loopback only (the kernel's /proc/net/tcp and tcp6);
  beyond loopback without a token it exits 2; with a token every request without exactly that
  token gets 401; the comparison goes through ``hmac.compare_digest`` (checked in-process).
- Names: no lock name (``../../x``, absolute, long, odd) can put its file anywhere but directly in
  ``PATH.d/locks`` under a fixed-length digest; NUL and over-long names are refused; bad node ids
  (``../x``, ``a/b``, ``.``, ``..``, empty) exit 2 and create nothing.
- No code: templates such as ``{__class__}`` or ``{input!r}``, conditions and call function names
  that look like Python, message bodies, signal inputs and HTTP requests holding such text are data:
  refused at define time or treated as plain text and lookups; no marker file ever appears.
- ``--app``: a module named like a call's function, in the working folder, next to the database or
  on PYTHONPATH, is never imported unless the operator names it; ``--app FILE`` loads that file only.
- Hard links: a lock file or liveness lock planted as a hard link to another file is refused, so
  the victim is never written through (this suite found it; open_lock_file now checks st_nlink).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http.client
import io
import json
import os
import re
import socket
import stat
import subprocess
import textwrap
import time
import unittest
from collections.abc import Callable
from typing import Any
from unittest import mock

import nodeflow
from tests.support import NODEFLOW, PYTHON, ROOT, ClusterTestCase, LoggedProcess, table_rows

READY = "running workflows"
URL_LINE = re.compile(r"dashboard and API at http://(\[[^\]]+\]|[^:/]+):(\d+)/")
DIGEST_NAME = re.compile(r"\A[0-9a-f]{40}\.lock\Z")  # 160 bits of SHA-256: one fixed length
VICTIM_BYTES = b"precious data that no lock may touch\n"
TAKE_LOCK = """
import asyncio
import sys

import nodeflow


async def take(nf, name):
    async with nf.alock(name, timeout=1):
        pass


with nodeflow.connect(sys.argv[1]) as nf:
    for how in ("blocking", "asyncio"):
        try:
            if how == "blocking":
                nf.lock(sys.argv[2], timeout=1).release()
            else:
                asyncio.run(take(nf, sys.argv[2]))
            print(f"{how}: taken")
        except nodeflow.NodeflowError as error:
            print(f"{how}: {type(error).__name__}: {error}")
"""


def child_env(**extra: str) -> dict[str, str]:
    """This environment without the variables that would change what a child does, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if key not in ("NODEFLOW_HTTP_TOKEN", "NODEFLOW_DB")}
    return {**env, **extra}


def with_umask(mask: int | None) -> Callable[[], None] | None:
    if mask is None:
        return None
    return lambda: os.umask(mask)  # in the child, between fork and exec


def request(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        sent = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def listening_addresses(port: int) -> list[str]:
    """Local addresses of the TCP sockets listening on ``port``, from the kernel (hex as in /proc)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    address, _, port_hex = fields[1].partition(":")
                    if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                        found.append(address)
        except FileNotFoundError:
            continue
    return found


def is_loopback_hex(address: str) -> bool:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host order, little-endian here)."""
    if len(address) == 8:
        return address[6:8] == "7F"  # 127.x.x.x: the first octet is the word's last byte
    return address in ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F")


def non_loopback_address() -> str | None:
    """An address of this host that is not loopback (no packet is sent), or None."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the route's source address
        address = probe.getsockname()[0]
        if not address.startswith("127.") and address != "0.0.0.0":
            return address
    return None


def tree(root: str) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` (not following links) -> (type and mode, size, inode)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            with contextlib.suppress(FileNotFoundError):
                info = os.lstat(path)
                found[path] = (info.st_mode, info.st_size if not stat.S_ISDIR(info.st_mode) else 0, info.st_ino)
    return found


class Victim:
    """A file an attacker would like nodeflow to write to; knows its bytes, mode and times."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "wb") as f:
            f.write(VICTIM_BYTES)
        os.chmod(path, 0o640)
        info = os.stat(path)
        self.before = (info.st_mode, info.st_mtime_ns, info.st_ino, info.st_size)

    def assert_untouched(self, test: unittest.TestCase, what: str) -> None:
        with open(self.path, "rb") as f:
            test.assertEqual(f.read(), VICTIM_BYTES, f"{what}: the victim's bytes changed")
        info = os.stat(self.path)
        test.assertEqual(
            (info.st_mode, info.st_mtime_ns, info.st_ino, info.st_size),
            self.before,
            f"{what}: the victim's mode, time or inode changed",
        )


class SecurityTestCase(ClusterTestCase):
    """Starts real nodes with their log (stderr) in a file; waits for them to run workflows."""

    @property
    def lock_dir(self) -> str:
        return self.db + ".d"

    def serve(
        self,
        *options: str,
        node_id: str | None = "n1",
        db: str | None = None,
        umask: int | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        wait: bool = True,
    ) -> LoggedProcess:
        log_path = os.path.join(self.dir, f"serve-{len(self.children)}.log")
        identity = ("--node-id", node_id) if node_id else ()
        command = [PYTHON, NODEFLOW, "--db", db or self.db, "serve", *identity, *options]
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=cwd or self.dir,
                env=env or child_env(),
                preexec_fn=with_umask(umask),
                text=True,
            )
        self.children.append(process)
        node = LoggedProcess(process, log_path)
        if wait:
            self.wait_ready(node)
        return node

    def wait_ready(self, node: LoggedProcess, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while READY not in node.text():
            if node.process.poll() is not None or time.monotonic() > deadline:
                self.fail(f"the node did not start (exit {node.process.poll()}):\n{node.text()}")
            time.sleep(0.01)

    def port_of(self, node: LoggedProcess) -> tuple[str, int]:
        found = URL_LINE.search(node.text())
        self.assertIsNotNone(found, node.text())
        assert found is not None
        return found[1].strip("[]"), int(found[2])

    def stop(self, node: LoggedProcess) -> int:
        node.process.terminate()
        return node.process.wait(timeout=20)

    def ended(self, node: LoggedProcess, deadline: float | None = None) -> int:
        """The exit status of a node expected to end by itself (a refusal); killed and failed at ``deadline``."""
        try:
            return node.process.wait(timeout=max(0.1, (deadline or time.monotonic() + 10) - time.monotonic()))
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(timeout=10)
            self.fail(f"the node still ran; it should have refused:\n{node.text()}")

    def run_python(self, code: str, *args: str, timeout: float = 15) -> list[str]:
        """Run ``code`` in a child that imports nodeflow (a hang there is killed, not ours); its output lines."""
        try:
            done = subprocess.run(
                [PYTHON, "-c", textwrap.dedent(code), *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.dir,
                env=child_env(PYTHONPATH=str(ROOT)),
            )
        except subprocess.TimeoutExpired:
            self.fail(f"the child still ran after {timeout} s")
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.splitlines()

    def run_cli(
        self,
        *args: str,
        umask: int | None = None,
        db: str | None = None,
        stdin: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, NODEFLOW, "--db", db or self.db, *args],
            capture_output=True,
            text=True,
            timeout=15,
            cwd=self.dir,
            env=env or child_env(),
            preexec_fn=with_umask(umask),
            input=stdin,
        )

    def hold_lock(self, name: str, umask: int | None = None, db: str | None = None) -> subprocess.Popen:
        """``lock NAME -- sh`` that says "held" and keeps the lock until a line comes on its stdin."""
        command = ["lock", name, "--timeout", "20", "--", "sh", "-c", "echo held; read line"]
        holder = subprocess.Popen(
            [PYTHON, NODEFLOW, "--db", db or self.db, *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.dir,
            env=child_env(),
            preexec_fn=with_umask(umask),
        )
        self.children.append(holder)
        return holder

    def let_go(self, holder: subprocess.Popen) -> None:
        _, err = holder.communicate("\n", timeout=20)
        self.assertEqual(holder.returncode, 0, f"the lock holder failed: {err}")

    def create_cluster(self, db: str | None = None) -> None:
        nodeflow.connect(db or self.db).close()


# 1. Private files --------------------------------------------------------------------------------


class PrivateFiles(SecurityTestCase):
    """What a node, a lock and a send leave on disk gives group and others nothing at all."""

    def check_private(self, umask: int, first: str) -> None:
        name = "report-42"
        lock_file = os.path.join(self.lock_dir, "locks", nodeflow.lock_file_name(name))
        holder = None
        if first == "lock":  # the lock command creates the database, then a node joins
            holder = self.hold_lock(name, umask)
            self.read_line(holder, "held")
        node = self.serve(umask=umask)
        if holder is None:
            holder = self.hold_lock(name, umask)
            self.read_line(holder, "held")
        sent = self.run_cli("send", "mail", json.dumps({"to": "a@b.c"}), umask=umask)
        self.assertEqual(sent.returncode, 0, sent.stderr)

        socket_path = os.path.join(self.lock_dir, "nodes", "n1.sock")
        expected = [
            self.db, self.db + "-wal", self.db + "-shm", self.lock_dir, os.path.join(self.lock_dir, "locks"),
            os.path.join(self.lock_dir, "nodes"), socket_path, os.path.join(self.lock_dir, "nodes", "n1.lock"),
            os.path.join(self.lock_dir, "scheduler.lock"), lock_file,
        ]  # fmt: skip
        for path in expected:
            self.assertTrue(os.path.lexists(path), f"{path} should exist while the node runs and the lock is held")
        self.assertTrue(stat.S_ISSOCK(os.lstat(socket_path).st_mode), "n1.sock is the node's socket")
        checked = [self.db, self.db + "-wal", self.db + "-shm", self.lock_dir, *tree(self.lock_dir)]
        for path in checked:
            with contextlib.suppress(FileNotFoundError):  # a file that came and went (a temporary name)
                info = os.lstat(path)
                mode = stat.S_IMODE(info.st_mode)
                self.assertEqual(mode & 0o077, 0, f"{path} has mode {mode:o}: group or others may use it")
                self.assertFalse(stat.S_ISLNK(info.st_mode), f"{path} is a symbolic link")
                self.assertEqual(info.st_uid, os.geteuid(), f"{path} belongs to uid {info.st_uid}")
                if stat.S_ISDIR(info.st_mode):
                    self.assertEqual(mode, 0o700, f"the folder {path} has mode {mode:o}, not 700")
        self.let_go(holder)
        self.assertEqual(self.stop(node), 0, node.text())

    def test_files_are_private_with_the_usual_umask(self) -> None:
        self.check_private(0o022, first="serve")

    def test_files_are_private_with_umask_000_when_the_node_creates_the_cluster(self) -> None:
        self.check_private(0o000, first="serve")

    def test_files_are_private_with_umask_000_when_a_lock_command_creates_the_cluster(self) -> None:
        self.check_private(0o000, first="lock")


# 2. Lock folders that others can write or own -------------------------------------------------------


class UnsafeLockFolders(SecurityTestCase):
    """PATH.d and its folders must be this user's and writable by nobody else; else: a clear refusal."""

    def assert_refused(self, needle: str, folder: str, what: str) -> None:
        with self.assertRaises(nodeflow.StoreError, msg=what) as caught, nodeflow.connect(self.db) as nf:
            nf.lock("probe", timeout=1).release()
        message = str(caught.exception)
        self.assertIn(needle, message, what)
        self.assertIn(folder, message, f"{what}: the message names the folder")

    def test_a_lock_folder_others_can_write_is_refused(self) -> None:
        self.create_cluster()
        for folder in (self.lock_dir, os.path.join(self.lock_dir, "locks")):
            for mode in (0o777, 0o770, 0o730, 0o702, 0o720):
                with self.subTest(folder=folder, mode=oct(mode)):
                    os.chmod(folder, mode)
                    try:
                        self.assert_refused("can be written by other users", folder, f"{folder} mode {mode:o}")
                    finally:
                        os.chmod(folder, 0o700)
        with nodeflow.connect(self.db) as nf:  # mode 700 again: fine
            nf.lock("probe", timeout=1).release()

    def test_the_command_line_refuses_with_a_clear_message_and_writes_nothing(self) -> None:
        self.create_cluster()
        os.chmod(self.lock_dir, 0o777)
        before = table_rows(self.db, ("messages", "lock_fences"))
        marker = os.path.join(self.dir, "ran")
        for args in (("lock", "job", "--", "touch", marker), ("send", "mail", "{}")):
            with self.subTest(args=args):
                done = self.run_cli(*args)
                self.assertEqual(done.returncode, 1, done.stderr)
                self.assertIn("can be written by other users", done.stderr)
                self.assertIn(f"chmod 700 {self.lock_dir}", done.stderr, "the message says what to do")
        node = self.serve(wait=False)
        self.assertEqual(self.ended(node), 1, node.text())
        self.assertIn("can be written by other users", node.text())
        self.assertFalse(os.path.exists(marker), "the command ran without its lock")
        self.assertEqual(table_rows(self.db, ("messages", "lock_fences")), before)
        os.chmod(self.lock_dir, 0o700)
        nodes = os.path.join(self.lock_dir, "nodes")
        os.mkdir(nodes, 0o700)
        os.chmod(nodes, 0o777)
        node = self.serve(wait=False)
        self.assertEqual(self.ended(node), 1, node.text())
        self.assertIn(f"lock folder {nodes} can be written by other users", node.text())

    def test_a_lock_folder_that_is_a_symbolic_link_is_refused(self) -> None:
        self.create_cluster()
        for folder in (self.lock_dir, os.path.join(self.lock_dir, "locks")):
            with self.subTest(folder=folder):
                elsewhere = os.path.join(self.dir, "elsewhere")
                os.rename(folder, elsewhere)  # a private folder of ours: only the link is wrong
                os.symlink(elsewhere, folder)
                try:
                    self.assert_refused("is not a directory", folder, f"{folder} as a symbolic link")
                    self.assertTrue(os.path.islink(folder), "the link was left for the operator to look at")
                finally:
                    os.unlink(folder)
                    os.rename(elsewhere, folder)

    @unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0, "needs root to give a folder to uid 65534")
    def test_a_lock_folder_another_user_owns_is_refused(self) -> None:
        self.create_cluster()
        os.mkdir(os.path.join(self.lock_dir, "nodes"), 0o700)
        for folder in (self.lock_dir, os.path.join(self.lock_dir, "locks"), os.path.join(self.lock_dir, "nodes")):
            with self.subTest(folder=folder):
                os.chown(folder, 65534, 65534)
                try:
                    if folder.endswith("nodes"):
                        node = self.serve(wait=False)
                        self.assertEqual(self.ended(node), 1, node.text())
                        self.assertIn(f"lock folder {folder} belongs to another user (uid 65534)", node.text())
                    else:
                        self.assert_refused("belongs to another user (uid 65534)", folder, f"{folder} of uid 65534")
                finally:
                    os.chown(folder, 0, 0)


# 3. Planted links --------------------------------------------------------------------------------


class PlantedLinks(SecurityTestCase):
    """A link planted where nodeflow keeps a lock file or a socket never lets it touch the victim."""

    def setUp(self) -> None:
        super().setUp()
        self.victim = Victim(os.path.join(self.dir, "victim.txt"))
        self.create_cluster()
        self.nodes = os.path.join(self.lock_dir, "nodes")
        os.mkdir(self.nodes, 0o700)

    def test_a_symbolic_link_in_place_of_a_lock_file_is_refused(self) -> None:
        name = "order-42"
        planted = os.path.join(self.lock_dir, "locks", nodeflow.lock_file_name(name))
        os.symlink(self.victim.path, planted)
        self.assertEqual(
            self.run_python(TAKE_LOCK, self.db, name),
            [
                f"blocking: StoreError: lock file {planted} is a symbolic link; someone planted it: remove it",
                f"asyncio: StoreError: lock file {planted} is a symbolic link; someone planted it: remove it",
            ],
        )
        marker = os.path.join(self.dir, "ran")
        done = self.run_cli("lock", name, "--timeout", "1", "--", "touch", marker)
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn(f"lock file {planted} is a symbolic link", done.stderr)
        self.assertFalse(os.path.exists(marker), "the command ran without its lock")
        self.victim.assert_untouched(self, "lock through a planted symbolic link")
        self.assertEqual(os.readlink(planted), self.victim.path, "the planted link is left as it was")

    def test_a_dangling_symbolic_link_does_not_make_its_target(self) -> None:
        name = "order-43"
        target = os.path.join(self.dir, "made-by-nodeflow")
        planted = os.path.join(self.lock_dir, "locks", nodeflow.lock_file_name(name))
        os.symlink(target, planted)
        done = self.run_cli("lock", name, "--timeout", "1", "--", "true")
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn("symbolic link", done.stderr)
        self.assertFalse(os.path.lexists(target), "O_CREAT followed the link and made its target")

    def test_a_hard_link_in_place_of_a_lock_file_is_not_written_through(self) -> None:
        """A lock file that is a hard link to another file would get the holder's note written into it
        (pwrite at offset 0, then ftruncate). open_lock_file refuses a file with st_nlink > 1, as it
        refuses a symbolic link. (Planting needs write access to the folder, which the 0700 check
        denies to others: this is the second line of defence, as O_NOFOLLOW is for symbolic links.)"""
        name = "order-44"
        planted = os.path.join(self.lock_dir, "locks", nodeflow.lock_file_name(name))
        os.link(self.victim.path, planted)
        for line in self.run_python(TAKE_LOCK, self.db, name):  # refused, or taken without writing to the victim
            self.assertTrue(line.endswith(": taken") or planted in line, line)
        self.victim.assert_untouched(self, "a named lock through a planted hard link")

    def test_a_hard_link_in_place_of_a_liveness_lock_is_not_written_through(self) -> None:
        """As above, for the node's liveness lock nodes/ID.lock, into which a node writes its pid."""
        os.link(self.victim.path, os.path.join(self.nodes, "n1.lock"))
        node = self.serve(wait=False)
        deadline = time.monotonic() + 10
        while READY not in node.text() and node.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stop(node)
        self.victim.assert_untouched(self, "a liveness lock through a planted hard link")

    def test_a_symbolic_link_in_place_of_a_liveness_lock_is_refused(self) -> None:
        planted = os.path.join(self.nodes, "n1.lock")
        os.symlink(self.victim.path, planted)
        node = self.serve(wait=False)
        self.assertEqual(self.ended(node), 1, node.text())
        self.assertIn(f"lock file {planted} is a symbolic link", node.text())
        self.assertNotIn("joined", node.text())
        self.victim.assert_untouched(self, "a liveness lock through a planted symbolic link")
        self.assertEqual(os.readlink(planted), self.victim.path)

    def test_a_symbolic_link_in_place_of_a_socket_is_replaced_not_followed(self) -> None:
        planted = os.path.join(self.nodes, "n1.sock")
        os.symlink(self.victim.path, planted)
        node = self.serve()
        self.assertTrue(stat.S_ISSOCK(os.lstat(planted).st_mode), "the node's socket took the link's place")
        self.assertEqual(stat.S_IMODE(os.lstat(planted).st_mode) & 0o077, 0)
        sent = self.run_cli("send", "mail", "{}")  # rings the node's doorbell
        self.assertEqual(sent.returncode, 0, sent.stderr)
        self.victim.assert_untouched(self, "a node bound its socket where a symbolic link was")
        self.assertEqual(self.stop(node), 0, node.text())
        self.victim.assert_untouched(self, "a node left, removing its socket")
        self.assertTrue(os.path.exists(self.victim.path))

    def test_symbolic_links_in_place_of_the_scheduler_and_writer_locks(self) -> None:
        scheduler = os.path.join(self.lock_dir, "scheduler.lock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scheduler)
        os.symlink(self.victim.path, scheduler)
        node = self.serve()
        warning = f"lock file {scheduler} is a symbolic link"
        self.wait_until(lambda: warning in node.text(), 10, "the node's warning about the planted scheduler lock")
        self.assertNotIn("took office", node.text(), "no node may be elected through a planted link")
        self.assertEqual(self.stop(node), 0, node.text())
        self.victim.assert_untouched(self, "the scheduler lock through a planted symbolic link")
        os.unlink(scheduler)
        writer = os.path.join(self.lock_dir, "writer.lock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(writer)
        os.symlink(self.victim.path, writer)
        before = table_rows(self.db, ("messages",))
        done = self.run_cli("send", "mail", "{}")
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn(f"lock file {writer} is a symbolic link", done.stderr)
        self.assertEqual(table_rows(self.db, ("messages",)), before)
        self.victim.assert_untouched(self, "the writer lock through a planted symbolic link")


# 4. HTTP -----------------------------------------------------------------------------------------

TOKEN = "s3cr3t-T0ken_for.tests"


class HttpExposure(SecurityTestCase):
    """Loopback unless told otherwise; beyond it only with a token; the token checked exactly."""

    def test_the_default_listens_on_loopback_only(self) -> None:
        node = self.serve("--http", "127.0.0.1:0")
        host, port = self.port_of(node)
        self.assertEqual(host, "127.0.0.1")
        addresses = listening_addresses(port)
        self.assertTrue(addresses, f"no socket listens on port {port} in /proc/net/tcp")
        for address in addresses:
            self.assertTrue(is_loopback_hex(address), f"port {port} listens on {address}, not loopback")
        outside = non_loopback_address()
        if outside is not None:
            with self.assertRaises(OSError, msg=f"port {port} answers on {outside}"):
                socket.create_connection((outside, port), timeout=2).close()
        status, _, _ = request(port, "GET", "/api/status")
        self.assertEqual(status, 200)
        status, _, body = request(port, "GET", "/api/status", headers={"Host": "attacker.example"})
        self.assertEqual(status, 403, f"a page from a rebound DNS name must not read the API: {body[:200]!r}")
        self.assertEqual(self.stop(node), 0, node.text())

    def test_beyond_loopback_without_a_token_exits_2_and_creates_nothing(self) -> None:
        cases = [
            (("--http", "0.0.0.0:0"), {}),
            (("--http", "[::]:0"), {}),
            (("--http", "example.com:0"), {}),
            (("--http", "0.0.0.0:0", "--http-token", ""), {}),
            (("--http", "0.0.0.0:0"), {"NODEFLOW_HTTP_TOKEN": ""}),
        ]
        nodes = [(options, env, self.serve(*options, wait=False, env=child_env(**env))) for options, env in cases]
        deadline = time.monotonic() + 15
        for options, env, node in nodes:
            with self.subTest(options=options, env=env):
                self.assertEqual(self.ended(node, deadline), 2, node.text())
                lines = node.text().strip().splitlines()
                self.assertEqual(len(lines), 1, lines)
                self.assertIn("--http-token", lines[0])
                self.assertIn("127.0.0.1", lines[0], "the message offers loopback instead")
        self.assertFalse(os.path.exists(self.db), "a refused node created the database")
        self.assertFalse(os.path.exists(self.lock_dir))

    def test_only_the_exact_token_opens_the_api(self) -> None:
        flagged = self.serve("--http", "127.0.0.1:0", "--http-token", TOKEN, wait=False)
        from_env = self.serve("--http", "0.0.0.0:0", node_id="n2", env=child_env(NODEFLOW_HTTP_TOKEN=TOKEN), wait=False)
        self.wait_ready(flagged)
        self.wait_ready(from_env)
        wrong = {
            "no header": {},
            "a wrong token": {"Authorization": "Bearer wrong"},
            "an empty token": {"Authorization": "Bearer "},
            "a prefix of the token": {"Authorization": f"Bearer {TOKEN[:-1]}"},
            "the token and one more character": {"Authorization": f"Bearer {TOKEN}x"},
            "the token in other case": {"Authorization": f"Bearer {TOKEN.upper()}"},
            "the token alone": {"Authorization": TOKEN},
            "the token in another scheme": {"Authorization": f"Basic {TOKEN}"},
            "no space after the scheme": {"Authorization": f"Bearer{TOKEN}"},
            "the token twice": {"Authorization": f"Bearer {TOKEN} {TOKEN}"},
        }
        for node in (flagged, from_env):
            _, port = self.port_of(node)
            for what, headers in wrong.items():
                for method, path, body in (
                    ("GET", "/api/status", None),
                    ("GET", "/metrics", None),
                    (
                        "POST",
                        "/api/definitions",
                        {"id": "x", "start": "a", "activities": {"a": {"type": "log", "message": "hi"}}},
                    ),
                ):
                    with self.subTest(node=node.pid, what=what, path=path):
                        status, answer_headers, answer = request(port, method, path, body, headers)
                        self.assertEqual(status, 401, f"{what}: {answer[:200]!r}")
                        self.assertEqual(answer_headers.get("www-authenticate"), "Bearer")
            status, _, _ = request(port, "GET", "/api/status?token=" + TOKEN)
            self.assertEqual(status, 401, "the token in the query string is no token")
            status, _, answer = request(port, "GET", "/api/status", headers={"Authorization": f"Bearer {TOKEN}"})
            self.assertEqual(status, 200, answer[:200])
            status, _, answer = request(port, "GET", "/api/definitions", headers={"Authorization": f"Bearer {TOKEN}"})
            self.assertEqual(json.loads(answer)["definitions"], [], "a refused POST stored a definition")
        for node in (flagged, from_env):
            self.assertEqual(self.stop(node), 0, node.text())

    def test_the_token_is_compared_in_constant_time(self) -> None:
        """In-process: every request's token goes through hmac.compare_digest, and its answer decides."""
        self.assertIs(nodeflow.hmac, hmac, "nodeflow compares with the standard hmac module")
        calls: list[tuple[Any, Any]] = []
        verdict: list[bool | None] = [None]  # None: the real comparison
        real = hmac.compare_digest

        def recording(a: Any, b: Any) -> bool:
            calls.append((a, b))
            return real(a, b) if verdict[0] is None else verdict[0]

        def as_text(value: Any) -> str:
            return value.decode() if isinstance(value, bytes) else value

        async def scenario() -> dict[str, int]:
            node = nodeflow.Node(self.db, node_id="n1", http="127.0.0.1:0", http_token=TOKEN, out=io.StringIO(),
                                 activities={}, handlers={})  # fmt: skip
            running = asyncio.create_task(node.run())
            try:
                deadline = time.monotonic() + 20
                while node.http is None or node.http.port == 0 or node.runner is None:
                    self.assertFalse(running.done(), "the node ended early")
                    self.assertLess(time.monotonic(), deadline, "the in-process node did not start")
                    await asyncio.sleep(0.01)
                port = node.http.port

                async def status(token: str) -> int:
                    headers = {"Authorization": f"Bearer {token}"}
                    return (await asyncio.to_thread(request, port, "GET", "/api/status", None, headers))[0]

                results = {}
                results["wrong"] = await status("not-the-token")
                results["prefix"] = await status(TOKEN[:5])
                results["right"] = await status(TOKEN)
                verdict[0] = False
                results["right, comparison says no"] = await status(TOKEN)
                verdict[0] = True
                results["wrong, comparison says yes"] = await status("not-the-token")
                verdict[0] = None
                return results
            finally:
                node.request_stop()
                await asyncio.wait_for(running, 30)

        with mock.patch.object(nodeflow.hmac, "compare_digest", recording):
            results = asyncio.run(scenario())
        seen = [(as_text(a), as_text(b)) for a, b in calls]
        self.assertIn(("not-the-token", TOKEN), seen, "a wrong token of another length was not compared")
        self.assertIn((TOKEN[:5], TOKEN), seen, "a prefix was not compared in constant time")
        self.assertIn((TOKEN, TOKEN), seen)
        expected = {"wrong": 401, "prefix": 401, "right": 200, "right, comparison says no": 401,
                    "wrong, comparison says yes": 200}  # fmt: skip
        self.assertEqual(results, expected, "compare_digest alone decides")


# 5. Names cannot escape their folders -----------------------------------------------------------------


class NamesStayInTheirFolders(SecurityTestCase):
    """Lock names become digests in PATH.d/locks; node ids are checked before anything is made."""

    def setUp(self) -> None:
        super().setUp()
        self.root = os.path.join(self.dir, "root")
        os.makedirs(os.path.join(self.root, "a", "b"))
        self.db = os.path.join(self.root, "a", "b", "cluster.db")  # "../../.." from locks/ stays under root

    def test_lock_file_names_are_fixed_length_digests(self) -> None:
        names = [
            "../../etc/passwd", "/abs", "/", ".", "..", "../x", "a/b/c", "~root/.ssh/authorized_keys", " ", "-",
            "name\nwith a newline", "C:\\Windows\\win.ini", "%s%n%x", "*", "é" * 2048,
            "x" * nodeflow.LOCK_NAME_MAX_BYTES, f"{self.dir}/escaped",
        ]  # fmt: skip
        files = set()
        locks = os.path.join(self.lock_dir, "locks")
        for name in names:
            with self.subTest(name=name[:40]):
                self.assertEqual(nodeflow.check_lock_name(name), name)
                file_name = nodeflow.lock_file_name(name)
                self.assertRegex(file_name, DIGEST_NAME)
                self.assertEqual(os.path.dirname(os.path.normpath(os.path.join(locks, file_name))), locks)
                files.add(file_name)
        self.assertEqual(len(files), len(names), "two names share a lock file")
        for bad in ("a\0b", "\0", "", "x" * (nodeflow.LOCK_NAME_MAX_BYTES + 1), "é" * 2049):
            with self.subTest(bad=bad[:20]), self.assertRaises(nodeflow.InvalidInput):
                nodeflow.check_lock_name(bad)
        with nodeflow.connect(self.db) as nf:
            for bad in ("../\0/etc/passwd", ""):
                with self.subTest(bad=bad), self.assertRaises(nodeflow.InvalidInput):
                    nf.lock(bad, timeout=1)

    def test_held_locks_are_files_directly_in_the_locks_folder(self) -> None:
        self.create_cluster()
        before = tree(self.root)
        names = ["../../../escaped", "../x", "/abs-lock-name", f"{self.root}/escaped", "..", "a/b/../../c",
                 "z" * nodeflow.LOCK_NAME_MAX_BYTES]  # fmt: skip
        holders = [self.hold_lock(name) for name in names]
        for holder in holders:
            self.read_line(holder, "held")
        locks = os.path.join(self.lock_dir, "locks")
        self.assertEqual(set(os.listdir(locks)), {nodeflow.lock_file_name(name) for name in names})
        for entry in os.listdir(locks):
            self.assertTrue(stat.S_ISREG(os.lstat(os.path.join(locks, entry)).st_mode))
        made = set(tree(self.root)) - set(before) - {self.db + "-wal", self.db + "-shm"}
        self.assertEqual(
            made,
            {os.path.join(locks, nodeflow.lock_file_name(name)) for name in names},
            "files were made outside PATH.d/locks",
        )
        self.assertFalse(os.path.lexists("/abs-lock-name") or os.path.lexists("/abs-lock-name.lock"))
        for holder in holders:
            self.let_go(holder)
        too_long = self.run_cli("lock", "y" * (nodeflow.LOCK_NAME_MAX_BYTES + 1), "--", "true")
        self.assertEqual(too_long.returncode, 2, too_long.stderr)
        self.assertIn("limit", too_long.stderr)

    def test_bad_node_ids_exit_2_and_make_nothing(self) -> None:
        self.create_cluster()
        before = tree(self.root)
        bad = ["../x", "a/b", ".", "..", "", "/abs", "../../../../escaped", "x" * 129, ".hidden", "-x", "a\nb",
               "n1/../../x", "é", "a b", "a\\b"]  # fmt: skip
        nodes = [(node_id, self.serve(f"--node-id={node_id}", node_id=None, wait=False)) for node_id in bad]
        deadline = time.monotonic() + 15
        for node_id, node in nodes:
            with self.subTest(node_id=node_id):
                self.assertEqual(self.ended(node, deadline), 2, node.text())
                self.assertIn("node id", node.text())
            with self.subTest(node_id=node_id, api="Node"), self.assertRaises(nodeflow.InvalidInput):
                nodeflow.Node(self.db, node_id=node_id, out=io.StringIO())
        self.assertEqual(tree(self.root), before, "a refused node id made or changed files")
        self.assertFalse(os.path.lexists("/abs.lock") or os.path.lexists("/abs.sock"))


# 6. Nothing is evaluated as code ----------------------------------------------------------------------


class NoCodeFromData(SecurityTestCase):
    """Definitions, messages, signals and requests are data to a node: never code it runs."""

    def setUp(self) -> None:
        super().setUp()
        self.marker = os.path.join(self.dir, "pwned")
        self.python = f"__import__('os').system('touch {self.marker}')"
        self.payloads = [
            self.python, f"$(touch {self.marker})", f"`touch {self.marker}`", "{__class__}",
            "{input.__class__.__mro__}", "{0.__class__}", "{input!r}", "{input:>10}", "%(input)s", "{{input}}",
            f"exec(\"open('{self.marker}', 'w')\")",
        ]  # fmt: skip

    def definition(self, workflow_id: str, activities: dict[str, Any], start: str = "a") -> dict[str, Any]:
        return {"id": workflow_id, "start": start, "activities": activities}

    def test_code_shaped_definitions_are_refused_or_inert(self) -> None:
        app = os.path.join(self.dir, "app.py")
        with open(app, "w") as f:
            f.write(
                textwrap.dedent("""
                import nodeflow

                @nodeflow.activity("echo")
                def echo(variables):
                    return {"echoed": variables["input"]}
            """)
            )
        node = self.serve("--app", app, "--http", "127.0.0.1:0")
        _, port = self.port_of(node)
        with nodeflow.connect(self.db) as nf:
            # Refused at define time, by the library, the command line and the API; nothing stored.
            refused = {
                "a conversion": self.definition("r1", {"a": {"type": "log", "message": "{input!r}"}}),
                "a format spec": self.definition("r2", {"a": {"type": "log", "message": "{input:>10}"}}),
                "an index": self.definition("r3", {"a": {"type": "log", "message": "{input[0]}"}}),
                "a call in a template": self.definition(
                    "r4", {"a": {"type": "set", "values": {"x": "{" + self.python + "}"}}}
                ),
                "an attribute chain with a call": self.definition(
                    "r5", {"a": {"type": "log", "message": "{input.__class__()}"}}
                ),
                "an empty placeholder": self.definition("r6", {"a": {"type": "log", "message": "{}"}}),
                "code as a condition's variable": self.definition(
                    "r7",
                    {
                        "a": {
                            "type": "if",
                            "condition": {"var": "__import__('os')", "op": "==", "value": 1},
                            "then": "b",
                        },
                        "b": {"type": "log", "message": "x"},
                    },
                ),
                "code as an operator": self.definition(
                    "r8",
                    {
                        "a": {"type": "if", "condition": {"var": "input.x", "op": "eval", "value": 1}, "then": "b"},
                        "b": {"type": "log", "message": "x"},
                    },
                ),
                "code as a call's function": self.definition(
                    "r9", {"a": {"type": "call", "function": "os.system('id')"}}
                ),
                "a condition's variable given as code": self.definition(
                    "r10",
                    {
                        "a": {
                            "type": "if",
                            "condition": {"var": "input.x", "op": "==", "value": {"var": "input.__class__()"}},
                            "then": "b",
                        },
                        "b": {"type": "log", "message": "x"},
                    },
                ),
                "code as a signal name": self.definition(
                    "r11", {"a": {"type": "signal", "name": "{" + self.python + "}"}}
                ),
            }
            for what, definition in refused.items():
                with self.subTest(refused=what), self.assertRaises(nodeflow.InvalidDefinition):
                    nf.define(definition)
            done = self.run_cli("define", "-", stdin=json.dumps(refused["a conversion"]))
            self.assertEqual(done.returncode, 2, done.stderr)
            self.assertIn("nothing was stored", done.stderr)
            status, _, _ = request(port, "POST", "/api/definitions", refused["a format spec"])
            self.assertEqual(status, 400)
            self.assertEqual(nf.definitions(), [], "a refused definition was stored")

            # Accepted: placeholders that look like Python are variable paths, looked up and not found.
            lookups = ["{__class__}", "{input.__class__.__mro__}", "{0.__class__}", "{input.__init__.__globals__}",
                       "{__builtins__}", "{input.order.__len__}"]  # fmt: skip
            faulted = {}
            for n, template in enumerate(lookups):
                nf.define(self.definition(f"look{n}", {"a": {"type": "log", "message": f"see {template}"}}))
                faulted[nf.start(f"look{n}", {"order": "o-1"})] = template.strip("{}").split(".")
            # ... unless the input has a key of that name: then it is that key's value, as text.
            nf.define(
                self.definition(
                    "dunder",
                    {"a": {"type": "set", "values": {"got": "{input.__class__}", "line": "<{input.__class__}>"}}},
                )
            )
            dunder = nf.start("dunder", {"__class__": "just a key"})

            # Code-shaped text as data: copied, compared and logged as the plain text it is.
            nf.define(
                self.definition(
                    "echo-text",
                    {
                        "a": {"type": "log", "message": "text: {input.text}", "next": "b"},
                        "b": {"type": "set", "values": {"copy": "{input.text}", "line": "[{input.text}]"}, "next": "c"},
                        "c": {
                            "type": "if",
                            "condition": {"var": "input.text", "op": "==", "value": self.python},
                            "then": "yes",
                            "else": "no",
                        },
                        "yes": {"type": "set", "values": {"branch": "then"}},
                        "no": {"type": "set", "values": {"branch": "else"}},
                    },
                )
            )
            texts = {nf.start("echo-text", {"text": payload}): payload for payload in self.payloads}
            status, _, answer = request(
                port, "POST", "/api/instances", {"definition": "echo-text", "input": {"text": self.python}}
            )
            self.assertEqual(status, 201, answer[:200])
            texts[json.loads(answer)["id"]] = self.python

            # A condition whose value looks like code compares text with text.
            nf.define(
                self.definition(
                    "contains",
                    {
                        "a": {
                            "type": "if",
                            "condition": {
                                "any": [
                                    {"var": "input.text", "op": "contains", "value": "__import__"},
                                    {"var": "input.text", "op": "in", "value": [self.python, "exec('x')"]},
                                ]
                            },
                            "then": "yes",
                            "else": "no",
                        },
                        "yes": {"type": "set", "values": {"branch": "then"}},
                        "no": {"type": "set", "values": {"branch": "else"}},
                    },
                )
            )
            contains_yes = nf.start("contains", {"text": "say __import__ please"})
            contains_no = nf.start("contains", {"text": "import os"})

            # Functions are only those registered with @nodeflow.activity: importable names are not.
            functions = ["os:system", "os.system", "builtins:eval", "builtins:exec", "builtins:__import__", "eval",
                         "subprocess:run", "subprocess:call", "posix:system", "importlib:import_module"]  # fmt: skip
            calls = {}
            for n, function in enumerate(functions):
                nf.define(
                    self.definition(f"call{n}", {"a": {"type": "call", "function": function, "retry": {"attempts": 1}}})
                )
                calls[nf.start(f"call{n}", {"cmd": f"touch {self.marker}", "0": self.python})] = function
            nf.define(self.definition("echo-call", {"a": {"type": "call", "function": "echo", "result": "out"}}))
            registered = nf.start("echo-call", {"text": self.python})

            # Signal inputs and names: the input is stored as data, never read as a template.
            nf.define(
                self.definition(
                    "approve",
                    {
                        "ask": {"type": "signal", "name": "go-{input.order}", "next": "done"},
                        "done": {"type": "set", "values": {"by": "{ask.by}", "line": "by {ask.by}"}},
                    },
                    start="ask",
                )
            )
            via_cli = nf.start("approve", {"order": "1"})
            via_api = nf.start("approve", {"order": "2"})
            self.wait_until(
                lambda: nf.instance(via_cli).status == "waiting" and nf.instance(via_api).status == "waiting",
                15,
                "instances waiting for their signals",
            )
            done = self.run_cli("signal", "go-1", "--input", json.dumps({"by": self.python}))
            self.assertEqual(done.returncode, 0, done.stderr)
            status, _, answer = request(port, "POST", "/api/signals/go-2", {"input": {"by": "{__class__}"}})
            self.assertEqual(status, 200, answer[:200])

            # Message bodies, to a queue of the user's and to the node's own workflow queue.
            body = {"text": self.python, "template": "{__class__}", "shell": f"$(touch {self.marker})"}
            done = self.run_cli("send", "inbox", json.dumps(body))
            self.assertEqual(done.returncode, 0, done.stderr)
            received = self.run_cli("receive", "inbox", "--wait", "5")
            self.assertEqual(received.returncode, 0, received.stderr)
            self.assertEqual(json.loads(received.stdout), body, "a message body came back other than it went in")
            for forged in (
                {"start": self.python, "input": {"x": self.python}},
                {"run": self.python, "seq": 1},
                {"start": "echo-text", "input": {"text": "{__class__}"}, "by": self.python},
                [self.python],
            ):
                nf.send(nodeflow.WORKFLOW_QUEUE, forged)

            for instance_id, path in faulted.items():
                ended = nf.wait(instance_id, 15)
                with self.subTest(template=path):
                    self.assertEqual(ended.status, "faulted", ended)
                    self.assertIn(f"no variable {path[0]}", ended.error or "")
            ended = nf.wait(dunder, 15)
            self.assertEqual(ended.status, "completed", ended)
            self.assertEqual((ended.variables["got"], ended.variables["line"]), ("just a key", "<just a key>"))
            for instance_id, payload in texts.items():
                ended = nf.wait(instance_id, 15)
                with self.subTest(text=payload):
                    self.assertEqual(ended.status, "completed", ended)
                    self.assertEqual(ended.variables["copy"], payload)
                    self.assertEqual(ended.variables["line"], f"[{payload}]")
                    self.assertEqual(ended.variables["branch"], "then" if payload == self.python else "else")
                    self.assertEqual(nf.instance(instance_id).journal[0].outcome, f"text: {payload}")
            self.assertEqual(nf.wait(contains_yes, 15).variables.get("branch"), "then")
            self.assertEqual(nf.wait(contains_no, 15).variables.get("branch"), "else")
            for instance_id, function in calls.items():
                ended = nf.wait(instance_id, 15)
                with self.subTest(function=function):
                    self.assertEqual(ended.status, "faulted", ended)
                    self.assertIn(f"no function {function!r}", ended.error or "", "it was resolved, not refused")
            ended = nf.wait(registered, 15)
            self.assertEqual(ended.status, "completed", ended)
            self.assertEqual(ended.variables["out"], {"echoed": {"text": self.python}})
            for instance_id, by in ((via_cli, self.python), (via_api, "{__class__}")):
                ended = nf.wait(instance_id, 15)
                self.assertEqual(ended.status, "completed", ended)
                self.assertEqual((ended.variables["by"], ended.variables["line"]), (by, f"by {by}"))

            def forged_handled() -> bool:
                counts = nf.queues().get(nodeflow.WORKFLOW_QUEUE, {})
                return counts.get("ready", 0) + counts.get("leased", 0) == 0

            self.wait_until(forged_handled, 10, "the forged workflow messages handled or dead-lettered")
            self.assertIsNone(node.process.poll(), f"the node died:\n{node.text()}")
        self.assertFalse(os.path.exists(self.marker), "data was run as code")
        self.assertEqual(self.stop(node), 0, node.text())
        self.assertNotIn("Traceback", node.text())


# 7. --app loads what the operator named, and nothing else -------------------------------------------------


MARKING_MODULE = """
import os
import nodeflow

with open(os.path.join(os.environ["MARKERS"], "imported-" + {label!r}), "a") as marker:
    marker.write("imported\\n")

@nodeflow.activity({function!r})
def function(variables):
    return {{"from": {label!r}}}
"""


class AppLoading(SecurityTestCase):
    """A definition names functions; only the module the operator gives with --app is imported."""

    CASES = ("none", "path", "name")

    def setUp(self) -> None:
        super().setUp()
        self.work = os.path.join(self.dir, "work")  # the nodes' working folder
        self.apps = os.path.join(self.dir, "apps")
        self.pythonpath = os.path.join(self.dir, "pythonpath")
        for folder, label in ((self.work, "work"), (self.dir, "next-to-db"), (self.apps, "apps")):
            os.makedirs(folder, exist_ok=True)
            self.module(folder, "shop", label, "charge")
        os.mkdir(self.pythonpath)  # importable by the node, as any installed module would be
        self.module(self.pythonpath, "evilmod", "evilmod", "run")
        self.module(self.apps, "app", "app", "greet")
        for case in self.CASES:
            os.mkdir(self.markers(case))

    def markers(self, case: str) -> str:
        return os.path.join(self.dir, f"markers-{case}")

    def module(self, folder: str, name: str, label: str, function: str) -> None:
        with open(os.path.join(folder, f"{name}.py"), "w") as f:
            f.write(MARKING_MODULE.format(label=label, function=function))

    def imported(self, case: str) -> dict[str, int]:
        """Which marking modules the node of ``case`` imported, and how many times each."""
        found = {}
        for entry in os.listdir(self.markers(case)):
            with open(os.path.join(self.markers(case), entry)) as f:
                found[entry.removeprefix("imported-")] = f.read().count("imported")
        return found

    def run_case(self, db: str, node: LoggedProcess) -> dict[str, nodeflow.Instance]:
        self.wait_ready(node)
        ended = {}
        with nodeflow.connect(db) as nf:
            started = {}
            for function in ("shop:charge", "evilmod:run", "greet", "charge", "app:greet", "json:dumps"):
                workflow_id = "f-" + re.sub(r"[^a-z]", "-", function)
                call = {"type": "call", "function": function, "retry": {"attempts": 1}}
                nf.define({"id": workflow_id, "start": "a", "activities": {"a": call}})
                started[function] = nf.start(workflow_id, {})
            for function, instance_id in started.items():
                ended[function] = nf.wait(instance_id, 15)
        self.assertEqual(self.stop(node), 0, node.text())
        return ended

    def test_only_the_named_module_is_imported(self) -> None:
        dbs = {case: os.path.join(self.dir, f"{case}.db") for case in self.CASES}
        options = {"none": (), "path": ("--app", os.path.join(self.apps, "app.py")), "name": ("--app", "shop")}
        nodes = {
            case: self.serve(
                *options[case],
                db=dbs[case],
                cwd=self.work,
                wait=False,
                env=child_env(PYTHONPATH=self.pythonpath, MARKERS=self.markers(case)),
            )
            for case in self.CASES
        }
        # No --app: the definition's "shop:charge" finds no function; no shop.py anywhere is imported.
        ended = self.run_case(dbs["none"], nodes["none"])
        for function, instance in ended.items():
            with self.subTest(app=None, function=function):
                self.assertEqual(instance.status, "faulted", instance)
                self.assertIn("no function", instance.error or "")
        self.assertEqual(self.imported("none"), {}, "a node without --app imported a module")
        # --app FILE: that file, once; not the shop.py beside it, not the one in the working folder.
        ended = self.run_case(dbs["path"], nodes["path"])
        self.assertEqual(ended["greet"].status, "completed", ended["greet"])
        self.assertEqual(ended["greet"].variables["a"], {"from": "app"})
        self.assertEqual(ended["app:greet"].status, "completed", ended["app:greet"])
        for function in ("shop:charge", "evilmod:run", "charge", "json:dumps"):
            with self.subTest(app="path", function=function):
                self.assertEqual(ended[function].status, "faulted", ended[function])
                self.assertIn("no function", ended[function].error or "")
        self.assertEqual(self.imported("path"), {"app": 1}, "--app FILE imported more than that file")
        # --app shop: the operator named it: the working folder's shop.py, once, and nothing else.
        ended = self.run_case(dbs["name"], nodes["name"])
        self.assertEqual(ended["shop:charge"].status, "completed", ended["shop:charge"])
        self.assertEqual(ended["shop:charge"].variables["a"], {"from": "work"})
        for function in ("evilmod:run", "json:dumps", "greet"):
            with self.subTest(app="name", function=function):
                self.assertEqual(ended[function].status, "faulted", ended[function])
        self.assertEqual(self.imported("name"), {"work": 1}, "the named module, once, and nothing more")


if __name__ == "__main__":
    unittest.main()
