"""Section 2, the Store: file modes, creation races, refusals, filesystem check, writes, fork and close.

Checksums (tree_snapshot) are only taken while no SQLite connection of this process has the file
open: closing a descriptor of our own would drop SQLite's POSIX locks.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import time
import unittest

import nodeflow
from tests.support import NODEFLOW, PYTHON, ClusterTestCase, tree_snapshot

# Written into page 2 of a database to damage it; its first byte is not a valid b-tree page type.
GARBAGE_PAGE = b"garbage!" * 512


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def make_nodeflow_db(path: str, locks: tuple[str, ...] = ()) -> None:
    with nodeflow.connect(path) as nf:
        for name in locks:
            nf.lock(name).release()


def plain_sqlite(path: str, *statements: str) -> list[list[tuple]]:
    """Run statements with Python's sqlite3 only (no nodeflow), then close; returns each one's rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return [conn.execute(sql).fetchall() for sql in statements]
    finally:
        conn.close()


# Makers of files nodeflow must refuse, each leaving every SQLite handle closed. Value: the exception
# expected from connect() and a pattern its message must match.
def make_newer_schema(path: str) -> None:
    make_nodeflow_db(path)
    plain_sqlite(path, f"PRAGMA user_version = {nodeflow.SCHEMA_VERSION + 1}")


def make_text_file(path: str) -> None:
    with open(path, "w", encoding="utf-8") as out:
        out.write("this is a text file, not a database; it is well over a hundred bytes long.\n" * 10)


def make_random_bytes(path: str) -> None:
    with open(path, "wb") as out:
        out.write(bytes((i * 131 + 7) % 251 for i in range(8192)))


def make_empty_file(path: str) -> None:
    open(path, "wb").close()


def make_other_program_db(path: str) -> None:
    plain_sqlite(path, "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)",
                 "INSERT INTO customers (name) VALUES ('ada'), ('grace')")  # fmt: skip


REFUSED_FILES = {
    "newer schema": (make_newer_schema, nodeflow.SchemaTooNew, r"newer"),
    "text file": (make_text_file, (nodeflow.NotADatabase, nodeflow.CorruptDatabase), r"not a.* database|damaged"),
    "random bytes": (make_random_bytes, (nodeflow.NotADatabase, nodeflow.CorruptDatabase), r"not a.* database|damaged"),
    "empty file": (make_empty_file, nodeflow.NotADatabase, r"empty"),
    "another program's database": (make_other_program_db, nodeflow.NotADatabase, r"another program"),
}  # fmt: skip


def corrupt_page_two(path: str) -> None:
    """A nodeflow database with fence rows whose page 2 (the lock_fences table) is overwritten."""
    make_nodeflow_db(path, locks=("a", "b", "c"))
    ((page_size,),) = plain_sqlite(path, "PRAGMA page_size")[0]
    ((root,),) = plain_sqlite(path, "SELECT rootpage FROM sqlite_master WHERE name = 'lock_fences'")[0]
    assert root == 2, f"lock_fences is on page {root}, the test expects page 2"
    assert os.path.getsize(path) >= 2 * page_size and not os.path.exists(path + "-wal")
    with open(path, "r+b") as out:  # every SQLite handle is closed here
        out.seek(page_size)
        out.write((GARBAGE_PAGE * (page_size // len(GARBAGE_PAGE) + 1))[:page_size])


class NewDatabase(ClusterTestCase):
    def test_modes_under_umask_000_and_the_header(self) -> None:
        child = self.spawn_python(
            """
            import json, os, stat, sys
            os.umask(0)
            import nodeflow
            db = os.environ["NODEFLOW_DB"]
            nf = nodeflow.connect(db)
            held = nf.lock("x")  # a write: -wal and -shm exist now
            lock_file = os.path.join(db + ".d", "locks", nodeflow.lock_file_name("x"))
            paths = {"db": db, "wal": db + "-wal", "shm": db + "-shm", "dir": db + ".d",
                     "locks": db + ".d/locks", "lock_file": lock_file}
            print(json.dumps({k: stat.S_IMODE(os.stat(p).st_mode) for k, p in paths.items()}), flush=True)
            sys.stdin.readline()
            held.release()
            nf.close()
            print("closed", flush=True)
            """,
            stdin=subprocess.PIPE,
        )
        modes = json.loads(self.read_line(child, "{"))
        expected = {"db": 0o600, "wal": 0o600, "shm": 0o600, "dir": 0o700, "locks": 0o700, "lock_file": 0o600}
        self.assertEqual({k: oct(v) for k, v in modes.items()}, {k: oct(v) for k, v in expected.items()})
        # The same, seen from another process while the child's connection is open.
        self.assertEqual(mode_of(self.db), 0o600)
        self.assertEqual(mode_of(self.db + "-wal"), 0o600)
        self.assertEqual(mode_of(self.db + "-shm"), 0o600)
        self.assertEqual(mode_of(self.db + ".d"), 0o700)
        child.stdin.write("\n")
        child.stdin.flush()
        self.read_line(child, "closed")
        self.assertEqual(child.wait(timeout=20), 0, child.stderr.read())
        self.assertEqual(mode_of(self.db), 0o600)
        self.assertFalse(os.path.exists(self.db + "-wal"), "the last close should checkpoint and remove the WAL")

        journal, version, application = plain_sqlite(
            self.db, "PRAGMA journal_mode", "PRAGMA user_version", "PRAGMA application_id"
        )
        self.assertEqual(journal, [("wal",)])
        self.assertEqual(version, [(nodeflow.SCHEMA_VERSION,)])
        self.assertEqual(application, [(nodeflow.APPLICATION_ID,)])
        self.assertEqual(plain_sqlite(self.db, "SELECT name, fence FROM lock_fences")[0], [("x", 1)])
        self.assertEqual(os.listdir(self.db + ".d"), ["locks"], "no temporary files are left in PATH.d")

    def test_header_through_the_handle(self) -> None:
        with nodeflow.connect(self.db) as nf:
            journal, version, application = nf.store.read(lambda conn: [
                conn.execute(f"PRAGMA {name}").fetchone()[0] for name in ("journal_mode", "user_version",
                                                                          "application_id")])  # fmt: skip
        self.assertEqual(journal, "wal")
        self.assertEqual(version, nodeflow.SCHEMA_VERSION)
        self.assertEqual(application, nodeflow.APPLICATION_ID)
        self.assertEqual(nf.path, os.path.abspath(self.db))

    def test_many_processes_create_the_same_database_at_once(self) -> None:
        children_per_round = 8
        for round_number in range(3):
            with self.subTest(round=round_number):
                db = os.path.join(self.dir, f"race-{round_number}.db")
                barrier = os.path.join(self.dir, f"go-{round_number}")
                code = """
                    import json, os, sys, time
                    import nodeflow
                    db, barrier = sys.argv[1], sys.argv[2]
                    print("ready", flush=True)
                    deadline = time.monotonic() + 30
                    while not os.path.exists(barrier):
                        if time.monotonic() > deadline:
                            sys.exit("the barrier never opened")
                        time.sleep(0.0002)
                    with nodeflow.connect(db) as nf:
                        with nf.lock("x", timeout=20) as held:
                            fence = held.fence
                        version = nf.store.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0])
                    print(json.dumps({"fence": fence, "version": version}), flush=True)
                """
                children = [self.spawn_python(code, db, barrier) for _ in range(children_per_round)]
                for child in children:
                    self.read_line(child, "ready")
                self.assertFalse(os.path.exists(db))
                open(barrier, "w").close()
                results = []
                for child in children:
                    out, err = child.communicate(timeout=60)
                    self.assertEqual(child.returncode, 0, f"a creating process failed: {err}")
                    results.append(json.loads(out.strip().splitlines()[-1]))
                self.assertEqual(sorted(r["fence"] for r in results), list(range(1, children_per_round + 1)),
                                 "every process must have used one and the same database")  # fmt: skip
                self.assertEqual({r["version"] for r in results}, {nodeflow.SCHEMA_VERSION})
                leftovers = [name for name in os.listdir(db + ".d") if name.startswith("creating-")]
                self.assertEqual(leftovers, [], "temporary databases left behind")
                self.assertEqual(os.listdir(db + ".d"), ["locks"])
                self.assertEqual(mode_of(db), 0o600)
                check, fences = plain_sqlite(db, "PRAGMA integrity_check", "SELECT name, fence FROM lock_fences")
                self.assertEqual(check, [("ok",)])
                self.assertEqual(fences, [("x", children_per_round)])
        names = sorted(name for name in os.listdir(self.dir) if name.startswith("race-"))
        self.assertEqual(names, ["race-0.db", "race-0.db.d", "race-1.db", "race-1.db.d", "race-2.db", "race-2.db.d"])


class RefusedFiles(ClusterTestCase):
    def test_refused_files_are_left_byte_for_byte_untouched(self) -> None:
        for kind, (make, error, pattern) in REFUSED_FILES.items():
            with self.subTest(kind=kind):
                path = os.path.join(self.dir, kind.replace(" ", "-").replace("'", "") + ".db")
                make(path)
                before = tree_snapshot(path)
                self.assertIsNotNone(before[""])
                self.assertIsNone(before["-wal"])
                with self.assertRaises(nodeflow.StoreError) as caught:
                    nodeflow.connect(path)
                self.assertIsInstance(caught.exception, error)
                self.assertRegex(str(caught.exception), pattern)
                self.assertIn(path, str(caught.exception), "the message names the file")
                del caught  # its traceback could keep a half-made handle alive
                self.assertEqual(tree_snapshot(path), before, "a refused file must not change, nor get -wal/-shm")

    def test_newer_schema_is_refused_with_create_false_too(self) -> None:
        make_newer_schema(self.db)
        before = tree_snapshot(self.db)
        with self.assertRaisesRegex(nodeflow.SchemaTooNew, r"newer.*untouched"):
            nodeflow.connect(self.db, create=False)
        self.assertEqual(tree_snapshot(self.db), before)

    def test_corrupt_nodeflow_database_is_not_used(self) -> None:
        corrupt_page_two(self.db)
        before = tree_snapshot(self.db)
        try:
            nf = nodeflow.connect(self.db)
        except nodeflow.StoreError as error:
            self.assertIsInstance(error, nodeflow.CorruptDatabase)
            return
        try:
            with self.assertRaises(nodeflow.CorruptDatabase) as caught:
                nf.lock("x")
            self.assertIsInstance(caught.exception, nodeflow.StoreError)
            self.assertRegex(str(caught.exception), r"damaged|malformed")
            self.assertIsNone(nf.holder("x"), "a failed acquisition must not keep the lock")
            with self.assertRaises(nodeflow.CorruptDatabase):
                nf.lock("a")  # a name whose row is on the damaged page
        finally:
            nf.close()
        self.assertEqual(tree_snapshot(self.db), before, "nodeflow must not write to a damaged database")

    def test_directory_as_database_is_bad_input(self) -> None:
        os.mkdir(self.db)
        with self.assertRaisesRegex(nodeflow.InvalidInput, "directory"):
            nodeflow.connect(self.db)
        self.assertEqual(sorted(os.listdir(self.dir)), ["cluster.db"])
        self.assertEqual(os.listdir(self.db), [])

    def test_missing_folder_is_bad_input(self) -> None:
        path = os.path.join(self.dir, "no-such-folder", "cluster.db")
        with self.assertRaisesRegex(nodeflow.InvalidInput, "does not exist"):
            nodeflow.connect(path)
        self.assertEqual(os.listdir(self.dir), [])

    def test_create_false_on_a_missing_file_creates_nothing(self) -> None:
        with self.assertRaises(nodeflow.StoreError) as caught:
            nodeflow.connect(self.db, create=False)
        self.assertIn(self.db, str(caught.exception))
        self.assertEqual(os.listdir(self.dir), [], "nothing may be created")


class RefusedThroughTheCommandLine(ClusterTestCase):
    def run_cli(self, db: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, NODEFLOW, "--db", db, *args], capture_output=True, text=True,
                              timeout=60, cwd=self.dir)  # fmt: skip

    def assertFailsCleanly(self, result: subprocess.CompletedProcess, code: int) -> str:
        self.assertEqual(result.returncode, code, f"stdout={result.stdout!r} stderr={result.stderr!r}")
        message = result.stderr.strip()
        self.assertNotIn("Traceback", result.stderr)
        self.assertTrue(message.startswith("nodeflow:"), message)
        self.assertNotIn("\n", message, "one line on stderr")
        return message

    def test_refused_files(self) -> None:
        marker = os.path.join(self.dir, "command-ran")
        for kind, (make, _error, pattern) in REFUSED_FILES.items():
            with self.subTest(kind=kind):
                path = os.path.join(self.dir, kind.replace(" ", "-").replace("'", "") + ".db")
                make(path)
                before = tree_snapshot(path)
                for args in (("status",), ("status", "--json"), ("lock", "x", "--", "touch", marker)):
                    result = self.run_cli(path, *args)
                    self.assertRegex(self.assertFailsCleanly(result, 1), pattern)
                    self.assertEqual(result.stdout, "")
                    self.assertFalse(os.path.exists(marker), "the command must not run")
                    self.assertEqual(tree_snapshot(path), before, f"{args} changed the file")

    def test_corrupt_database(self) -> None:
        corrupt_page_two(self.db)
        before = tree_snapshot(self.db)
        marker = os.path.join(self.dir, "command-ran")
        result = self.run_cli(self.db, "lock", "x", "--", "touch", marker)
        self.assertRegex(self.assertFailsCleanly(result, 1), r"damaged|malformed")
        self.assertFalse(os.path.exists(marker))
        result = self.run_cli(self.db, "status")  # reads no damaged page today; must not crash either way
        if result.returncode != 0:
            self.assertFailsCleanly(result, 1)
        self.assertEqual(tree_snapshot(self.db), before)

    def test_bad_paths_are_bad_input(self) -> None:
        folder = os.path.join(self.dir, "a-folder")
        os.mkdir(folder)
        missing = os.path.join(self.dir, "no-such-folder", "cluster.db")
        marker = os.path.join(self.dir, "command-ran")
        for db in (folder, missing):
            for args in (("status",), ("lock", "x", "--", "touch", marker)):
                with self.subTest(db=db, args=args):
                    self.assertFailsCleanly(self.run_cli(db, *args), 2)
                    self.assertFalse(os.path.exists(marker))
        self.assertEqual(sorted(os.listdir(self.dir)), ["a-folder"])
        self.assertEqual(os.listdir(folder), [])

    def test_status_on_a_missing_database_creates_nothing(self) -> None:
        message = self.assertFailsCleanly(self.run_cli(self.db, "status"), 1)
        self.assertIn("no nodeflow database", message)
        self.assertEqual(os.listdir(self.dir), [])

    def test_bad_duration_changes_nothing(self) -> None:
        marker = os.path.join(self.dir, "command-ran")
        message = self.assertFailsCleanly(self.run_cli(self.db, "lock", "x", "--timeout", "30s1m", "--", "touch",
                                                       marker), 2)  # fmt: skip
        self.assertIn("30s1m", message)
        self.assertEqual(os.listdir(self.dir), [], "bad input must not create the database")


class LockFolderSafety(ClusterTestCase):
    def test_lock_folder_writable_by_others_is_refused(self) -> None:
        make_nodeflow_db(self.db)
        for folder in (self.db + ".d", self.db + ".d/locks"):
            for mode in (0o777, 0o770, 0o702):
                with self.subTest(folder=os.path.basename(folder), mode=oct(mode)):
                    os.chmod(folder, mode)
                    try:
                        with self.assertRaises(nodeflow.StoreError) as caught:
                            nodeflow.connect(self.db)
                        self.assertIn("chmod", str(caught.exception))
                        self.assertIn(folder, str(caught.exception))
                        self.assertEqual(mode_of(folder), mode, "nodeflow must refuse, not quietly repair")
                    finally:
                        os.chmod(folder, 0o700)
        with nodeflow.connect(self.db) as nf:  # mode 0700 again: accepted
            self.assertEqual(nf.lock("x").fence, 1)

    def test_refused_lock_folder_leaves_no_connection_open(self) -> None:
        make_nodeflow_db(self.db)
        for folder in (self.db + ".d", self.db + ".d/locks"):
            with self.subTest(folder=os.path.basename(folder)):
                os.chmod(folder, 0o777)
                try:
                    with self.assertRaises(nodeflow.StoreError) as caught:
                        nodeflow.connect(self.db)
                    # The error is still referenced (as by a caller that logs it later): the refused
                    # handle must have closed its SQLite connection, which keeps -wal and -shm open.
                    self.assertIn("chmod", str(caught.exception))
                    self.assertFalse(os.path.exists(self.db + "-wal"), "the refused handle left its connection open")
                    self.assertFalse(os.path.exists(self.db + "-shm"), "the refused handle left its connection open")
                finally:
                    del caught
                    os.chmod(folder, 0o700)

    def test_lock_folder_that_is_a_symlink_is_refused(self) -> None:
        elsewhere = os.path.join(self.dir, "elsewhere")
        os.mkdir(elsewhere, 0o700)
        os.symlink(elsewhere, self.db + ".d")
        with self.assertRaises(nodeflow.StoreError):
            nodeflow.connect(self.db)
        self.assertEqual(os.listdir(elsewhere), [], "nothing may be created through the link")

    def test_planted_symlink_lock_file_is_refused_and_victim_untouched(self) -> None:
        victim = os.path.join(self.dir, "victim.txt")
        with open(victim, "w", encoding="utf-8") as out:
            out.write("precious data\n" * 100)
        os.chmod(victim, 0o644)
        victim_before = (tree_snapshot(victim)[""], os.stat(victim).st_size, mode_of(victim))
        absent = os.path.join(self.dir, "would-be-created")
        make_nodeflow_db(self.db)
        locks = os.path.join(self.db + ".d", "locks")
        os.symlink(victim, os.path.join(locks, nodeflow.lock_file_name("planted")))
        os.symlink(absent, os.path.join(locks, nodeflow.lock_file_name("dangling")))
        # The attempts run in a child, so that a lock that loops on the link fails the test instead of hanging it.
        child = self.spawn_python("""
            import json, os, nodeflow
            attempts = [("planted", {}), ("planted", {"timeout": 1}), ("planted", {"fence": False}),
                        ("dangling", {}), ("dangling", {"timeout": 0})]
            results = []
            with nodeflow.connect(os.environ["NODEFLOW_DB"]) as nf:
                for name, kwargs in attempts:
                    try:
                        nf.lock(name, **kwargs).release()
                        results.append("acquired")
                    except nodeflow.NodeflowError as error:
                        results.append(f"{type(error).__name__}: {error}")
                fences = nf.store.read(lambda conn: conn.execute("SELECT name FROM lock_fences").fetchall())
                other = nf.lock("other").fence
            print(json.dumps({"results": results, "fences": fences, "other": other}))
        """)
        out, err = child.communicate(timeout=30)
        self.assertEqual(child.returncode, 0, err)
        report = json.loads(out)
        self.assertEqual(len(report["results"]), 5)
        for result in report["results"]:
            self.assertRegex(result, r"^StoreError: .*symbolic link")
        self.assertEqual(report["fences"], [], "no fence is taken for a refused lock file")
        self.assertEqual(report["other"], 1, "other locks still work")
        self.assertEqual((tree_snapshot(victim)[""], os.stat(victim).st_size, mode_of(victim)), victim_before)
        self.assertFalse(os.path.exists(absent), "the dangling link's target must not be created")


MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
25 22 0:23 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
36 22 98:0 /mnt1 /R/mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
40 36 0:50 / /R/mnt/parent/share rw,relatime shared:5 - nfs4 server:/export rw,vers=4.2,addr=10.0.0.2
41 22 8:17 / /R/mnt/my\040disk rw,relatime shared:6 - xfs /dev/sdb1 rw,attr2
42 22 8:33 / /R/srv/stack rw,relatime shared:7 - ext4 /dev/sdc1 rw
43 42 0:53 / /R/srv/stack rw,relatime shared:8 - cifs //host/share rw,vers=3.0
44 22 0:54 / /R/back\134slash rw - btrfs /dev/sdd1 rw
45 22 0:55 / /R/tmp rw,nosuid,nodev shared:9 - tmpfs tmpfs rw,size=1024k
"""


class FilesystemCheck(ClusterTestCase):
    def write_mountinfo(self, text: str) -> str:
        path = os.path.join(self.dir, "mountinfo")
        with open(path, "w", encoding="utf-8") as out:
            out.write(text)
        return path

    def setUp(self) -> None:
        super().setUp()
        # A root that does not exist on this machine, so realpath() leaves the test paths alone.
        self.root = "/nodeflow-test-no-such-root"
        self.assertFalse(os.path.exists(self.root))

    def test_longest_mount_point_prefix_wins(self) -> None:
        mountinfo = self.write_mountinfo(MOUNTINFO.replace("/R/", self.root + "/"))
        r = self.root
        cases = {
            f"{r}/mnt/parent/db/cluster.db": "ext3",
            f"{r}/mnt/parent": "ext3",
            f"{r}/mnt/parent/share/cluster.db": "nfs4",
            f"{r}/mnt/parent/share": "nfs4",
            f"{r}/mnt/parent/shared/cluster.db": "ext3",  # a name that only starts like the mount point
            f"{r}/mnt/parentx/cluster.db": "ext4",
            f"{r}/mnt/my disk/cluster.db": "xfs",  # \040 in mountinfo is a space
            f"{r}/mnt/my/cluster.db": "ext4",
            f"{r}/srv/stack/cluster.db": "cifs",  # a later mount over the same point wins
            f"{r}/back\\slash/cluster.db": "btrfs",
            f"{r}/tmp/cluster.db": "tmpfs",
            "/var/lib/cluster.db": "ext4",
        }
        for path, fstype in cases.items():
            with self.subTest(path=path):
                self.assertEqual(nodeflow.filesystem_type(path, mountinfo=mountinfo), fstype)

    def test_mount_order_decides_over_the_same_point(self) -> None:
        r = self.root
        lines = [f"50 22 0:60 / {r}/data rw - nfs server:/a rw", f"51 22 8:1 / {r}/data rw - ext4 /dev/sde1 rw"]
        for ordered, expected in ((lines, "ext4"), (lines[::-1], "nfs")):
            with self.subTest(expected=expected):
                mountinfo = self.write_mountinfo("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n" + "\n".join(ordered) + "\n")
                self.assertEqual(nodeflow.filesystem_type(f"{r}/data/cluster.db", mountinfo=mountinfo), expected)

    def test_symlinked_folder_is_judged_by_its_real_place(self) -> None:
        real = os.path.join(self.dir, "real")
        os.mkdir(real)
        link = os.path.join(self.dir, "link")
        os.symlink(real, link)
        mount_point = os.path.realpath(real).replace(" ", "\\040")
        mountinfo = self.write_mountinfo(f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
                                         f"60 22 0:70 / {mount_point} rw - nfs4 server:/x rw\n")  # fmt: skip
        self.assertEqual(nodeflow.filesystem_type(link, mountinfo=mountinfo), "nfs4")
        with self.assertRaises(nodeflow.UnsupportedFilesystem):
            nodeflow.check_local_filesystem(link, mountinfo=mountinfo)

    def test_network_and_fuse_filesystems_are_refused(self) -> None:
        for fstype in ("nfs", "nfs4", "cifs", "smb3", "fuse.sshfs", "fuse", "9p", "virtiofs"):
            with self.subTest(fstype=fstype):
                mountinfo = self.write_mountinfo(f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
                                                 f"70 22 0:80 / {self.root}/shared rw - {fstype} src rw\n")  # fmt: skip
                with self.assertRaises(nodeflow.UnsupportedFilesystem) as caught:
                    nodeflow.check_local_filesystem(f"{self.root}/shared/apps", mountinfo=mountinfo)
                self.assertIsInstance(caught.exception, nodeflow.StoreError)
                message = str(caught.exception)
                self.assertIn(fstype, message)
                self.assertIn("WAL", message)
                self.assertIn("lock", message)
                self.assertIn("local disk", message)
                self.assertIn("--db", message)

    def test_local_filesystems_pass(self) -> None:
        for fstype in ("ext4", "xfs", "btrfs", "tmpfs", "overlay", "ext3", "zfs"):
            with self.subTest(fstype=fstype):
                mountinfo = self.write_mountinfo(f"22 1 0:1 / / rw - nfs server:/root rw\n"
                                                 f"70 22 0:80 / {self.root}/local rw - {fstype} src rw\n")  # fmt: skip
                nodeflow.check_local_filesystem(f"{self.root}/local/apps", mountinfo=mountinfo)
                with self.assertRaises(nodeflow.UnsupportedFilesystem):  # the same file, outside that mount
                    nodeflow.check_local_filesystem(f"{self.root}/elsewhere", mountinfo=mountinfo)

    def test_no_mountinfo_means_nothing_to_check(self) -> None:
        missing = os.path.join(self.dir, "no-mountinfo")
        self.assertIsNone(nodeflow.filesystem_type(self.dir, mountinfo=missing))
        nodeflow.check_local_filesystem(self.dir, mountinfo=missing)

    def test_this_machines_database_folder_passes(self) -> None:
        fstype = nodeflow.filesystem_type(self.dir)
        self.assertIsNotNone(fstype, "/proc/self/mountinfo should name the test folder's filesystem")
        nodeflow.check_local_filesystem(self.dir)
        with nodeflow.connect(self.db) as nf:
            self.assertEqual(nf.lock("x").fence, 1)


HOLD_WRITE_LOCK = """
    import os, sqlite3, sys, time
    conn = sqlite3.connect(os.environ["NODEFLOW_DB"], isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO lock_fences (name, fence, acquired, pid, node) VALUES ('x', 41, 0, 0, NULL)")
    print("locked", flush=True)
    time.sleep(float(sys.argv[1]))
    conn.execute("COMMIT")
    print("committed", flush=True)
    conn.close()
"""


class Writes(ClusterTestCase):
    def test_write_waits_for_another_writer(self) -> None:
        with nodeflow.connect(self.db) as nf:
            child = self.spawn_python(HOLD_WRITE_LOCK, "1.5")
            self.read_line(child, "locked")
            with nf.lock("x") as held:
                # 42: the fenced write ran after the child's transaction (fence 41) committed.
                self.assertEqual(held.fence, 42)
            out, err = child.communicate(timeout=20)
            self.assertEqual(child.returncode, 0, err)
            self.assertIn("committed", out)
            self.assertEqual(nf.lock("x").fence, 43)

    def test_write_gives_up_with_store_busy(self) -> None:
        make_nodeflow_db(self.db)
        with nodeflow.connect(self.db, settings=nodeflow.Settings(busy_timeout=0.5)) as nf:
            child = self.spawn_python(HOLD_WRITE_LOCK, "5")
            self.read_line(child, "locked")
            started = time.monotonic()
            with self.assertRaises(nodeflow.StoreBusy) as caught:
                nf.lock("x")
            waited = time.monotonic() - started
            self.assertIsNone(child.poll(), "StoreBusy must come while the other writer still holds the database")
            self.assertLess(waited, 4.5, "the busy timeout bounds the wait")
            self.assertIsInstance(caught.exception, nodeflow.StoreError)
            self.assertIn("retry", str(caught.exception))
            self.assertIsNone(nf.holder("x"), "the lock taken before the failed write is released")
            child.kill()
            child.wait(timeout=20)
            # The other writer died without committing; the handle is still good.
            self.assertEqual(nf.lock("x").fence, 1)

    def test_failed_write_rolls_back_and_the_store_stays_usable(self) -> None:
        with nodeflow.connect(self.db) as nf:

            def insert_then_fail(conn: sqlite3.Connection) -> None:
                conn.execute("INSERT INTO lock_fences (name, fence, acquired, pid, node) VALUES ('r', 7, 0, 0, NULL)")
                raise ValueError("work failed")

            with self.assertRaisesRegex(ValueError, "work failed"):
                nf.store.write(insert_then_fail)

            def insert_then_bad_sql(conn: sqlite3.Connection) -> None:
                conn.execute("INSERT INTO lock_fences (name, fence, acquired, pid, node) VALUES ('s', 8, 0, 0, NULL)")
                conn.execute("INSERT INTO no_such_table VALUES (1)")

            with self.assertRaises(nodeflow.StoreError) as caught:
                nf.store.write(insert_then_bad_sql)
            self.assertIn("no_such_table", str(caught.exception))

            count = nf.store.read(lambda conn: conn.execute("SELECT count(*) FROM lock_fences").fetchone()[0])
            self.assertEqual(count, 0, "nothing of a failed write may be committed")
            result = nf.store.write(
                lambda conn: (
                    conn.execute(
                        "INSERT INTO lock_fences (name, fence, acquired, pid, node) VALUES ('t', 9, 0, 0, NULL)"
                    ).rowcount
                )
            )
            self.assertEqual(result, 1, "write returns what the work returned")
            self.assertEqual(nf.lock("x").fence, 1)
            # Another process sees exactly the committed rows.
            child = self.spawn_python("""
                import os, sqlite3
                conn = sqlite3.connect(os.environ["NODEFLOW_DB"])
                print(sorted(name for (name,) in conn.execute("SELECT name FROM lock_fences")))
            """)
            out, err = child.communicate(timeout=20)
            self.assertEqual(child.returncode, 0, err)
            self.assertEqual(out.strip(), "['t', 'x']")


class ForkAndClose(ClusterTestCase):
    def test_handle_is_refused_in_a_forked_child(self) -> None:
        nf = nodeflow.connect(self.db)
        self.addCleanup(nf.close)
        self.assertEqual(nf.lock("x").fence, 1)
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into unittest
            report: dict[str, object] = {}
            try:
                os.close(reader)
                for what, use in (("read", lambda: nf.store.read(lambda c: c.execute("SELECT 1").fetchone())),
                                  ("lock", lambda: nf.lock("y")),
                                  ("write", lambda: nf.store.write(lambda c: None))):  # fmt: skip
                    try:
                        use()
                        report[what] = "no error"
                    except nodeflow.NodeflowError as error:
                        report[what] = f"{type(error).__name__}: {error}"
                nf.close()  # must not close the parent's connection
                with nodeflow.connect(self.db) as own:
                    report["own"] = own.lock("z").fence
            except BaseException as error:
                report["crash"] = repr(error)
            finally:
                os.write(writer, json.dumps(report).encode())
                os._exit(0)
        os.close(writer)
        with os.fdopen(reader, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        report = json.loads(data)
        self.assertNotIn("crash", report)
        for what in ("read", "lock", "write"):
            self.assertRegex(str(report[what]), r"^NodeflowError: .*connect", f"{what} in a forked child")
        self.assertEqual(report["own"], 1, "a child that connects again gets a working handle")
        # The parent's handle is unharmed.
        self.assertEqual(nf.lock("x").fence, 2)
        rows = nf.store.read(lambda c: c.execute("SELECT name, fence FROM lock_fences ORDER BY name").fetchall())
        self.assertEqual(rows, [("x", 2), ("z", 1)])
        self.assertIsNone(nf.holder("y"))
        self.assertEqual(nf.store.read(lambda c: c.execute("PRAGMA integrity_check").fetchone()[0]), "ok")

    def test_closed_handle_refuses_use(self) -> None:
        nf = nodeflow.connect(self.db)
        nf.close()
        for what, use in (("lock", lambda: nf.lock("x")), ("read", lambda: nf.store.read(lambda c: 1)),
                          ("write", lambda: nf.store.write(lambda c: 1))):  # fmt: skip
            with self.subTest(what=what), self.assertRaisesRegex(nodeflow.NodeflowError, "closed"):
                use()
        nf.close()  # closing twice is harmless
        with nodeflow.connect(self.db) as other, other.lock("x", timeout=0) as held:  # the lock was left free
            self.assertEqual(held.fence, 1)

    def test_closed_handle_refuses_unfenced_locks_too(self) -> None:
        nf = nodeflow.connect(self.db)
        nf.close()
        with self.assertRaises(nodeflow.NodeflowError):
            held = nf.lock("x", fence=False)
            held.release()

    def test_context_manager_closes(self) -> None:
        with nodeflow.connect(self.db) as nf:
            nf.lock("x").release()
        with self.assertRaisesRegex(nodeflow.NodeflowError, "closed"):
            nf.store.read(lambda c: 1)


if __name__ == "__main__":
    unittest.main()
