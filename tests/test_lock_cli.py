"""``nodeflow.py lock NAME -- CMD`` and ``status``: exit statuses, signals, time-outs, bad input.

Every test runs the real command line in real processes; signals are sent with ``kill()`` to the
``lock`` process itself, and what is asserted is what the command, the exit status, the marker
files and ``status --json`` show afterwards. Every wait is bounded; nothing asserts speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import unittest

from tests.support import NODEFLOW, PYTHON, ClusterTestCase, alive, blocked_flock_waiters, tree_snapshot

# A command that announces itself, then waits (at most 30 s) for a file named "release" in its folder.
WAIT_FOR_RELEASE = """
import os, sys, time
print("running", os.getpid(), os.environ.get("NODEFLOW_LOCK"), os.environ.get("NODEFLOW_FENCE"), flush=True)
deadline = time.monotonic() + 30
while not os.path.exists("release") and time.monotonic() < deadline:
    time.sleep(0.02)
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""

# A command that traps SIGTERM, SIGINT and SIGHUP: it writes the signal's name to a marker file and exits
# with the code it was given.
TRAPPER = """
import os, signal, sys, time
marker, code = sys.argv[1], int(sys.argv[2])
def caught(signo, frame):
    with open(marker, "w") as f:
        f.write(signal.Signals(signo).name)
    os._exit(code)
signal.signal(signal.SIGTERM, caught)
signal.signal(signal.SIGINT, caught)
signal.signal(signal.SIGHUP, caught)
print("ready", os.getpid(), flush=True)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    time.sleep(0.02)
os._exit(99)
"""


class LockCliTestCase(ClusterTestCase):
    def lock(self, name: str, *command: str, timeout: str | None = None) -> subprocess.CompletedProcess:
        options = ["--timeout", timeout] if timeout is not None else []
        return self.cli("lock", name, *options, "--", *command)

    def start_holding(self, name: str, code: int = 0) -> tuple[subprocess.Popen, int, int]:
        """A ``lock`` process running WAIT_FOR_RELEASE: (lock process, command pid, fence)."""
        holder = self.spawn_cli("lock", name, "--", PYTHON, "-c", WAIT_FOR_RELEASE, str(code))
        words = self.read_line(holder, "running").split()
        return holder, int(words[1]), int(words[-1])

    def release(self, holder: subprocess.Popen) -> tuple[int, str, str]:
        open(os.path.join(self.dir, "release"), "w").close()
        result = self.finish(holder)
        os.unlink(os.path.join(self.dir, "release"))
        return result

    def status_locks(self) -> list[dict]:
        result = self.cli("status", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout)["locks"]

    def assert_one_line_error(self, result: subprocess.CompletedProcess, code: int) -> None:
        self.assertEqual(result.returncode, code, f"stderr: {result.stderr!r}")
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, f"expected a one-line error, got {result.stderr!r}")
        self.assertTrue(lines[0].startswith("nodeflow:"), lines[0])


class ExitStatus(LockCliTestCase):
    def test_exit_status_is_the_commands(self) -> None:
        for code in (0, 3, 42):
            with self.subTest(code=code):
                result = self.lock("job", "sh", "-c", f"exit {code}")
                self.assertEqual(result.returncode, code, result.stderr)
        self.assertEqual(self.status_locks(), [])

    def test_command_killed_by_a_signal_gives_128_plus_n(self) -> None:
        for signo in (signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1):
            with self.subTest(signal=signo.name):
                result = self.lock("job", PYTHON, "-c", f"import os; os.kill(os.getpid(), {int(signo)})")
                self.assertEqual(result.returncode, 128 + signo, result.stderr)
        self.assertEqual(self.status_locks(), [])

    def test_command_not_found_gives_127_and_frees_the_lock(self) -> None:
        for command in ("nodeflow-test-no-such-command", os.path.join(self.dir, "missing", "cmd")):
            with self.subTest(command=command):
                result = self.lock("job", command, "arg")
                self.assertEqual(result.returncode, 127, result.stderr)
                self.assertIn("not found", result.stderr)
                self.assertTrue(result.stderr.startswith("nodeflow:"), result.stderr)
        self.assertEqual(self.status_locks(), [])
        self.assertEqual(self.lock("job", "true", timeout="0").returncode, 0)

    def test_command_sees_the_lock_name_and_increasing_fences(self) -> None:
        name = "job ключ/1"
        fences = []
        for _ in range(3):
            result = self.lock(name, "sh", "-c", 'printf "%s|%s\\n" "$NODEFLOW_LOCK" "$NODEFLOW_FENCE"')
            self.assertEqual(result.returncode, 0, result.stderr)
            seen_name, fence = result.stdout.strip().rsplit("|", 1)
            self.assertEqual(seen_name, name)
            fences.append(int(fence))
        self.assertEqual(fences, sorted(set(fences)), f"fences must strictly increase: {fences}")

    def test_command_arguments_and_options_after_the_separator_are_passed_unchanged(self) -> None:
        args = ["--timeout", "x", "--", "--db", "lock", "é ö"]
        result = self.lock("job", PYTHON, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *args)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), args)


class Signals(LockCliTestCase):
    def test_sigterm_sigint_and_sighup_are_forwarded_to_the_command(self) -> None:
        for signo, code in ((signal.SIGTERM, 7), (signal.SIGINT, 9), (signal.SIGHUP, 11)):
            with self.subTest(signal=signo.name):
                marker = os.path.join(self.dir, f"marker-{signo.name}")
                runner = self.spawn_cli("lock", "sig", "--", PYTHON, "-c", TRAPPER, marker, str(code))
                command = int(self.read_line(runner, "ready").split()[1])
                os.kill(runner.pid, signo)
                rc, _, err = self.finish(runner)
                self.assertEqual(rc, code, f"the lock process must exit with the command's status: {err}")
                with open(marker) as f:
                    self.assertEqual(f.read(), signo.name)
                self.assertFalse(alive(command))
        self.assertEqual(self.status_locks(), [])

    def test_sigterm_is_forwarded_to_a_shell_script_that_traps_it(self) -> None:
        marker = os.path.join(self.dir, "marker")
        script = (
            f"trap 'echo TERM > {marker}; exit 5' TERM; echo ready; i=0; "
            "while [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; exit 99"
        )
        runner = self.spawn_cli("lock", "sh-sig", "--", "sh", "-c", script)
        self.read_line(runner, "ready")
        os.kill(runner.pid, signal.SIGTERM)
        rc, _, err = self.finish(runner)
        self.assertEqual(rc, 5, err)
        with open(marker) as f:
            self.assertEqual(f.read().strip(), "TERM")

    def test_command_dies_with_a_sigkilled_lock_process_and_the_lock_is_free(self) -> None:
        runner = self.spawn_cli("lock", "orphan", "--", PYTHON, "-c", WAIT_FOR_RELEASE)
        command = int(self.read_line(runner, "running").split()[1])
        self.extra_pids.append(command)
        self.assertTrue(alive(command))
        runner.kill()
        runner.wait(timeout=10)
        self.wait_until(lambda: not alive(command), 10, "the command died with its lock process")
        self.assertEqual(self.status_locks(), [])
        self.assertEqual(self.lock("orphan", "true", timeout="0").returncode, 0)


class Timeouts(LockCliTestCase):
    def test_timeout_exits_1_naming_the_holder(self) -> None:
        holder, _, _ = self.start_holding("busy")
        ran = os.path.join(self.dir, "ran")
        for timeout in ("0.5", "300ms", "0"):
            with self.subTest(timeout=timeout):
                result = self.lock("busy", "touch", ran, timeout=timeout)
                self.assert_one_line_error(result, 1)
                self.assertIn(str(holder.pid), result.stderr, "the message must name the holder's pid")
                self.assertIn("busy", result.stderr)
                self.assertFalse(os.path.exists(ran), "the command must not run without the lock")
        rc, _, err = self.release(holder)
        self.assertEqual(rc, 0, err)
        self.assertEqual(self.lock("busy", "touch", ran, timeout="0").returncode, 0)
        self.assertTrue(os.path.exists(ran))

    def test_a_waiting_lock_runs_the_command_once_the_holder_ends(self) -> None:
        holder, _, first = self.start_holding("queue")
        waiter = self.spawn_cli("lock", "queue", "--timeout", "20", "--", "sh", "-c", 'echo "fence $NODEFLOW_FENCE"')
        self.wait_until(lambda: waiter.pid in blocked_flock_waiters(), 20, "the second lock is waiting")
        rc, _, err = self.release(holder)
        self.assertEqual(rc, 0, err)
        rc, out, err = self.finish(waiter)
        self.assertEqual(rc, 0, err)
        self.assertGreater(int(out.split()[1]), first)


class Status(LockCliTestCase):
    def test_status_lists_a_held_lock_then_none(self) -> None:
        holder, _, fence = self.start_holding("shown/lock")
        result = self.cli("status", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        report = json.loads(result.stdout)
        for key in ("nodes", "scheduler", "queues", "locks"):
            self.assertIn(key, report)
        self.assertEqual(len(report["locks"]), 1, report)
        entry = report["locks"][0]
        self.assertEqual((entry["name"], entry["fence"], entry["pid"]), ("shown/lock", fence, holder.pid))
        self.assertIsInstance(entry["holder"], str)
        self.assertIn(str(holder.pid), entry["holder"])

        human = self.cli("status")
        self.assertEqual(human.returncode, 0, human.stderr)
        self.assertIn("shown/lock", human.stdout)
        self.assertIn(str(holder.pid), human.stdout)
        self.assertIn(str(fence), human.stdout)

        rc, _, err = self.release(holder)
        self.assertEqual(rc, 0, err)
        self.assertEqual(self.status_locks(), [])
        self.assertNotIn("shown/lock", self.cli("status").stdout)


class BadInput(LockCliTestCase):
    def raw(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, NODEFLOW, *args], capture_output=True, text=True, timeout=60, cwd=self.dir, env=dict(os.environ)
        )

    def test_bad_input_exits_2_with_one_line_and_changes_nothing(self) -> None:
        self.assertEqual(self.lock("setup", "true").returncode, 0)
        before = tree_snapshot(self.db)
        self.assertIsNotNone(before[""])
        lock_dir = self.db + ".d"
        entries_before = sorted(os.listdir(lock_dir)), sorted(os.listdir(os.path.join(lock_dir, "locks")))
        ran = os.path.join(self.dir, "ran")
        cases: dict[str, list[str]] = {
            "no separator or command": ["lock", "n"],
            "separator but no command": ["lock", "n", "--"],
            "no name": ["lock", "--", "touch", ran],
            "empty name": ["lock", "", "--", "touch", ran],
            "name of 4097 bytes": ["lock", "x" * 4097, "--", "touch", ran],
            "unknown option": ["lock", "n", "--bogus", "--", "touch", ran],
            "unknown global option": ["--bogus", "lock", "n", "--", "touch", ran],
            "missing timeout value": ["lock", "n", "--timeout", "--", "touch", ran],
            "status unknown option": ["status", "--bogus"],
            "unknown command": ["frobnicate"],
        }
        for value in ("abc", "-1", "1x", "nan", "30s1m", ""):
            cases[f"timeout {value!r}"] = ["lock", "n", "--timeout", value, "--", "touch", ran]
        for what, args in cases.items():
            with self.subTest(what):
                result = self.cli(*args)
                self.assert_one_line_error(result, 2)
                self.assertEqual(result.stdout, "")
                self.assertFalse(os.path.exists(ran), "the command must not run on bad input")
                self.assertEqual(tree_snapshot(self.db), before, "bad input changed the database")
                after = sorted(os.listdir(lock_dir)), sorted(os.listdir(os.path.join(lock_dir, "locks")))
                self.assertEqual(after, entries_before)

    def test_db_that_is_a_directory_or_in_a_missing_folder(self) -> None:
        folder = os.path.join(self.dir, "a-folder")
        os.mkdir(folder)
        missing = os.path.join(self.dir, "missing", "x.db")
        ran = os.path.join(self.dir, "ran")
        for what, db in (("a directory", folder), ("a missing folder", missing)):
            for verb in (["lock", "n", "--", "touch", ran], ["status"], ["status", "--json"]):
                with self.subTest(db=what, verb=verb[0]):
                    result = self.raw("--db", db, *verb)
                    self.assert_one_line_error(result, 2)
                    self.assertFalse(os.path.exists(ran))
        self.assertEqual(os.listdir(folder), [], "nothing may be created inside the directory")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "missing")), "the missing folder must stay missing")
        self.assertEqual(sorted(os.listdir(self.dir)), ["a-folder"])

    def test_status_on_a_missing_database_exits_1_and_creates_nothing(self) -> None:
        for args in (["status"], ["status", "--json"]):
            with self.subTest(args=args):
                result = self.cli(*args)
                self.assert_one_line_error(result, 1)
                self.assertEqual(result.stdout, "")
                self.assertEqual(os.listdir(self.dir), [], "status must not create a database")
        env_db = subprocess.run(
            [PYTHON, NODEFLOW, "status"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.dir,
            env=dict(os.environ, NODEFLOW_DB=self.db),
        )
        self.assert_one_line_error(env_db, 1)
        self.assertEqual(os.listdir(self.dir), [])


if __name__ == "__main__":
    unittest.main()
