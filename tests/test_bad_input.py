"""A corpus of bad input: every way in (CLI, HTTP, definitions, database files, the library) refuses it cleanly.

336 inputs in all (the test at the end counts the tables), each checked for three things:
(a) a clear message that names what was wrong (a fragment of it is asserted, never just "non-empty"):
    on the CLI one line on stderr starting with "nodeflow: " (``define`` prints one such line per
    problem and a summary line), nothing on stdout, and no Python traceback anywhere; over HTTP a
    4xx status and a JSON body ``{"error": ...}``;
(b) a non-zero exit: 2 for bad usage or bad input, 1 for a failure such as a database that cannot be
    used (the exit codes README gives);
(c) an unchanged database: for the CLI (no node running) the SHA-256 of the file and its -wal/-shm
    before and after (support.tree_snapshot; this process holds no SQLite connection meanwhile);
    over HTTP, where a node writes heartbeats, the rows of every table a request could write.

What the tables cover:
- CLI_CASES: every verb (status, serve, cluster, schedule add/list/remove, lock, send, receive,
  dead-letters list/retry/purge, define, definitions, start (--key), signal (--ttl), instances, show,
  retry, cancel, prune, demo) with bad options and values: durations ("5x", "-1s", "1e999", a century and more), JSON
  (values nested more than 64 deep among them), queue, lock, timer, signal
  and node names, --at times, cron expressions and zones, --priority, --http addresses, --http
  beyond loopback without a token, --concurrency, unknown definitions, instances and timers. Each
  runs on its own copy of a real database (definitions, an instance, a message, a timer, a dead
  letter), all in parallel; all fail before a daemon would start.
- DEFINITION_CASES: every field of a workflow definition (missing id/start/activities, bad types,
  unknown activity types and fields, dangling next/then/else, unreachable activities, repeated
  keys, bad durations, cron triggers and zones, templates, condition operators, timeouts and
  on_timeout, run activities, too-long names,
  too large, not JSON, not UTF-8, ...), each through ``define FILE`` and through POST /api/definitions.
- HTTP_CASES: every route of one ``serve --http`` node (/, /metrics, /api/status, /api/definitions,
  /api/definitions/ID, /api/instances, /api/instances/ID, /api/instances/ID/retry,
  /api/instances/ID/cancel, /api/signals/NAME), unknown routes, wrong methods, bad JSON, non-object
  JSON, wrong Content-Type, a body over the limit, bad query parameters, unknown ids, and malformed
  requests on a raw socket (a Host header given twice among them).
- DATABASE_CASES: an empty (0-byte) file (refused, not taken for a new database), a truncated
  nodeflow database, a text file, another program's SQLite database, a newer schema, a read-only
  file and folder, a file owned by another user, a directory, a missing folder, a lock folder that
  is a file or is writable by others; each with a reading verb and a writing one.
- LIBRARY_CASES: what the CLI cannot pass: lock names with NUL or a lone surrogate, bodies over the
  max body size setting (the kernel limits one argument to 128 KiB, below the 1 MiB default),
  NaN and Infinity bodies, bad priorities and node ids, through ``nodeflow.connect``.

Running as root: chmod does not stop root, so the read-only cases run the CLI as uid 65534
instead; the case of a file owned by another user needs root (chown) and is skipped without it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
import unittest
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import nodeflow
from tests.support import NODEFLOW, PYTHON, ROOT, ClusterTestCase, table_rows, tree_snapshot

NOBODY = 65534  # the uid (and gid) the read-only cases run as when this process is root
IS_ROOT = os.geteuid() == 0
WORKERS = 3  # CLI processes at once: each is mostly the interpreter starting, CPU-bound on 2 cores

# Every table a bad request could write to; "nodes", "election" and "instruction_cursors" change on
# their own while a node runs (heartbeats, office, cursors).
WATCHED_TABLES = (
    "definitions", "instances", "journal", "messages", "timers", "signal_triggers", "lock_fences",
    "instructions", "dead_letters", "meta",
)  # fmt: skip

GREET = {
    "id": "greet",
    "name": "Greeting",
    "start": "hello",
    "activities": {"hello": {"type": "log", "message": "hello {input.name}"}},
}
APPROVAL = {
    "id": "approval",
    "start": "ask",
    "activities": {
        "ask": {"type": "signal", "name": "approve-{input.order}", "next": "done"},
        "done": {"type": "log", "message": "approved"},
    },
}
# The good definition each bad one is made from: two activities, a then b.
BASE = {
    "id": "bad-input",
    "start": "a",
    "activities": {"a": {"type": "log", "message": "a", "next": "b"}, "b": {"type": "log", "message": "b"}},
}


def child_env() -> dict[str, str]:
    """This environment without the variables that would change what a CLI run refuses."""
    return {key: value for key, value in os.environ.items() if key not in ("NODEFLOW_HTTP_TOKEN", "NODEFLOW_DB")}


def snapshot(path: str) -> Any:
    """What must not change at a --db path: its bytes and its -wal/-shm, or a directory's listing."""
    if os.path.isdir(path):
        return ("directory", sorted(os.listdir(path)))
    return tree_snapshot(path)


def assert_cli_refusal(
    test: unittest.TestCase, done: subprocess.CompletedProcess, code: int, says: str, what: str
) -> None:
    """(a) and (b) for one CLI run: exit ``code``, one line on stderr naming ``says``, no traceback."""
    test.assertNotIn("Traceback", done.stdout + done.stderr, what)
    test.assertEqual(done.returncode, code, f"{what}: {done.stderr!r}")
    test.assertEqual(done.stdout, "", what)
    lines = done.stderr.splitlines()
    test.assertEqual(len(lines), 1, f"{what}: not one line: {done.stderr!r}")
    test.assertTrue(lines[0].startswith("nodeflow: "), f"{what}: {lines[0]!r}")
    test.assertIn(says, lines[0], what)


def assert_define_refusal(test: unittest.TestCase, done: subprocess.CompletedProcess, says: str, what: str) -> None:
    """``define`` names each problem on a line of its own, then a summary line: all start alike."""
    test.assertNotIn("Traceback", done.stdout + done.stderr, what)
    test.assertEqual(done.returncode, 2, f"{what}: {done.stderr!r}")
    test.assertEqual(done.stdout, "", what)
    lines = done.stderr.splitlines()
    test.assertGreaterEqual(len(lines), 2, f"{what}: {done.stderr!r}")
    for line in lines:
        test.assertTrue(line.startswith("nodeflow: define def.json: "), f"{what}: {line!r}")
    test.assertRegex(lines[-1], r": \d+ problems?; nothing was stored$", what)
    test.assertIn(says, "\n".join(lines[:-1]), what)


# Runs a CLI case takes, two ways: ``python3 nodeflow.py`` itself (EntryPoint, a sample of the corpus), and
# main(argv) in a child forked from one process that imported nodeflow once (the whole corpus). A child
# does what the script's last lines do (``sys.exit(main())``) in a process of its own: its exit status,
# its stdout and stderr (an uncaught exception prints its traceback there, exit status 1), its atexit
# handlers. Starting the interpreter and compiling nodeflow.py (0.2 s of CPU) 200 times over would take
# this module well past its time budget on two cores.
FORK_SERVER = r"""
import atexit, gc, json, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import nodeflow
gc.freeze()  # the children share the imported modules' pages instead of copying them as gc walks them

def child(job):
    os.chdir(job["cwd"])
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        opened = os.open(path, flags, 0o666)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin, sys.stdout, sys.stderr = (open(fd, mode, closefd=False) for fd, mode in ((0, "r"), (1, "w"), (2, "w")))
    os.environ.clear()
    os.environ.update(job["env"])
    if job["user"] is not None:
        os.setgroups([])
        os.setgid(job["user"])
        os.setuid(job["user"])
    sys.argv = ["nodeflow.py", *job["argv"]]
    try:
        code = nodeflow.main(job["argv"])  # what the script's `sys.exit(main())` runs
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the traceback the interpreter would print, and its status
        code = 1
    atexit._run_exitfuncs()  # the interpreter's exit, but for freeing every object (30 ms a child)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

jobs = json.load(sys.stdin)
codes = [None] * len(jobs)
waiting, running = list(enumerate(jobs)), {}
while waiting or running:
    while waiting and len(running) < int(sys.argv[2]):
        index, job = waiting.pop(0)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child(job)
        running[pid] = (index, time.monotonic() + 30)
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid:
        codes[running.pop(pid)[0]] = os.waitstatus_to_exitcode(status)
        continue
    for pid, (index, deadline) in running.items():
        if time.monotonic() > deadline:  # a case that was not refused and runs on (a node, say)
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.001)
json.dump(codes, sys.stdout)
"""


@dataclass(frozen=True)
class Job:
    """One CLI run: ``nodeflow.py --db DB ARGS...`` in ``cwd``, as ``user`` when given."""

    db: str
    args: tuple[str, ...]
    cwd: str
    user: int | None = None


@dataclass
class Outcome:
    """One CLI run: what it printed, and the database before and after."""

    done: subprocess.CompletedProcess
    before: Any
    after: Any


def run_forked(jobs: list[Job]) -> list[Outcome]:
    """Every job in a child of one fork server, WORKERS at a time."""
    with tempfile.TemporaryDirectory(prefix="nodeflow-bad-input-out-") as out:
        os.chmod(out, 0o777)  # a child running as nobody writes its stdout here
        specs = [
            {
                "argv": ["--db", job.db, *job.args],
                "cwd": job.cwd,
                "env": child_env(),
                "stdout": os.path.join(out, f"{index}.out"),
                "stderr": os.path.join(out, f"{index}.err"),
                "user": job.user,
            }
            for index, job in enumerate(jobs)
        ]
        befores = [snapshot(job.db) for job in jobs]
        server = subprocess.run(
            [PYTHON, "-c", FORK_SERVER, str(ROOT), str(WORKERS)],
            input=json.dumps(specs),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if server.returncode != 0:
            raise AssertionError(f"the fork server failed: {server.stderr}")
        outcomes = []
        for spec, job, code, before in zip(specs, jobs, json.loads(server.stdout), befores, strict=True):
            with open(spec["stdout"], encoding="utf-8", errors="replace") as stdout:
                printed = stdout.read()
            with open(spec["stderr"], encoding="utf-8", errors="replace") as stderr:
                said = stderr.read()
            done = subprocess.CompletedProcess(spec["argv"], code, printed, said)
            outcomes.append(Outcome(done, before, snapshot(job.db)))
        return outcomes


def run_script(jobs: list[Job]) -> list[Outcome]:
    """Every job as ``python3 nodeflow.py ...``, WORKERS at a time."""

    def run(job: Job) -> Outcome:
        before = snapshot(job.db)
        options: dict[str, Any] = {}
        if job.user is not None:
            options = {"user": job.user, "group": job.user, "extra_groups": []}
        done = subprocess.run(
            [PYTHON, NODEFLOW, "--db", job.db, *job.args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=job.cwd,
            env=child_env(),
            **options,
        )
        return Outcome(done, before, snapshot(job.db))

    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(run, jobs))


# The template database every CLI case gets a copy of ------------------------------------------------

TEMPLATE_HOME = ""
TEMPLATE_DB = ""
TEMPLATE_INSTANCE = ""  # an instance of greet, running (no node has run it)


def setUpModule() -> None:
    global TEMPLATE_HOME, TEMPLATE_DB, TEMPLATE_INSTANCE
    TEMPLATE_HOME = tempfile.mkdtemp(prefix="nodeflow-bad-input-")
    os.chmod(TEMPLATE_HOME, 0o711)  # the cases run as another user (when root) must pass through
    TEMPLATE_DB = os.path.join(TEMPLATE_HOME, "template.db")
    with nodeflow.connect(TEMPLATE_DB) as nf:
        nf.define(GREET)
        nf.define(APPROVAL)
        TEMPLATE_INSTANCE = nf.start("greet", {"name": "ada"})
        nf.send("jobs", {"n": 1})
        nf.schedule("nightly", "jobs", {"n": 2}, cron="0 3 * * *")
        nf.send("doomed", {"n": 3})
        for _ in range(nf.settings.max_deliveries):  # the last nack buries it: a dead letter
            message = nf.receive("doomed", lease=30, wait=0)
            assert message is not None
            nf.nack(message, delay=0)
        assert nf.dead_letters("doomed"), "a dead letter in the template"
    assert tree_snapshot(TEMPLATE_DB)["-wal"] is None, "the template was closed cleanly"


def tearDownModule() -> None:
    shutil.rmtree(TEMPLATE_HOME, ignore_errors=True)


def copy_template(folder: str, name: str = "cluster.db") -> str:
    path = os.path.join(folder, name)
    shutil.copyfile(TEMPLATE_DB, path)
    os.chmod(path, 0o600)
    return path


# 1. The CLI, verb by verb ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cli:
    args: tuple[str, ...]  # "{instance}" stands for the template's instance id
    code: int  # the exit status expected
    says: str  # a fragment of the one line on stderr that names what was wrong


def cli(*args: str, code: int = 2, says: str) -> Cli:
    return Cli(args, code, says)


ADD = ("schedule", "add", "t1", "--queue", "q", "--body", "1")  # a timer with every part but its time
DURATION_WORDS = "is not a duration"

CLI_CASES: dict[str, list[Cli]] = {
    "status": [
        cli("status", "--stall-after", "5x", says="--stall-after: '5x' is not a duration"),
        cli("status", "--stall-after=-1s", says="--stall-after: '-1s' is not a duration"),
        cli("status", "--json", "extra", says="unrecognized arguments: extra"),
    ],
    "serve": [
        cli("serve", "--node-id", "../x", says="node id '../x' is not valid"),
        cli("serve", "--node-id", "", says="node id '' is not valid"),
        cli("serve", "--node-id", "n" * 129, says="is not valid; use 1 to 128 letters"),
        cli("serve", "--node-id", "a b", says="node id 'a b' is not valid"),
        cli("serve", "--concurrency", "abc", says="--concurrency must be a whole number, not 'abc'"),
        cli("serve", "--concurrency", "0", says="concurrency must be a whole number from 1 to 1024, not 0"),
        cli("serve", "--concurrency", "1025", says="from 1 to 1024, not 1025"),
        cli("serve", "--http", "nonsense", says="--http 'nonsense': give HOST:PORT"),
        cli("serve", "--http", "127.0.0.1:70000", says="the port must be from 0 to 65535"),
        cli("serve", "--http", "0.0.0.0:0", says="can be reached from other machines: give --http-token"),
        cli("serve", "--http", "[::]:0", "--http-token", "", says="give --http-token"),
        cli("serve", "--role", "boss", says="invalid choice: 'boss'"),
        cli("serve", "--keep-instances", "forever", says="keep_instances: 'forever' is not a duration"),
        cli("serve", "--keep-faulted=-1d", says="keep_faulted: '-1d' is not a duration"),
        cli("serve", "--grace", "5x", says="grace: '5x' is not a duration"),
        cli("serve", "--heartbeat", "0", says="heartbeat must be more than zero"),
        cli("serve", "--lease=-1s", says="lease: '-1s' is not a duration"),
        cli("serve", "--app", "no_such_app.py", says="--app no_such_app.py: cannot import it"),
    ],
    "cluster": [
        cli("cluster", "--nodes", "0", says="--nodes must be from 1 to 32, not 0"),
        cli("cluster", "--nodes", "three", says="--nodes must be a whole number, not 'three'"),
        cli("cluster", "--replicas", "3", says="--replicas must be from 0 to 2"),
        cli("cluster", "--http-port", "70000", says="--http-port must leave room for 3 ports"),
        cli("cluster", "--grace", "1e999", says="--grace: '1e999' is not a duration"),
        cli("cluster", "--app", "no_such_app.py", says="cannot import it"),
    ],
    "schedule": [
        cli(*ADD, "--cron", "* * *", says="it has 3 fields; expected 5"),
        cli(*ADD, "--cron", "61 * * * *", says="minute 61 is out of range 0-59"),
        cli(*ADD, "--cron", "@reboot", says="@reboot runs once"),
        cli(*ADD, "--cron", "0 3 * * *", "--tz", "Mars/Base", says='unknown time zone "Mars/Base"'),
        cli(*ADD, "--cron", "0 3 * * *", "--tz", "../../etc/passwd", says="unknown time zone"),
        cli(*ADD, "--at", "tomorrow", says="--at: 'tomorrow' is not an ISO 8601 time"),
        cli(*ADD, "--at", "1900-01-01T00:00", says="--at: the time must fall between 1970 and 9999"),
        cli(*ADD, "--after", "5x", says="--after: '5x' is not a duration"),
        cli(*ADD, "--after=-1s", says="--after: '-1s' is not a duration"),
        cli(*ADD, "--after", "1e999", says="--after: '1e999' is not a duration"),
        cli(*ADD, "--after", "999999999999d", says="--after: '999999999999d' is longer than 100 years"),
        cli(*ADD, "--after", "5s", "--at", "2031-01-01T00:00", says="give exactly one of --cron, --at and --after"),
        cli(*ADD, "--after", "5s", "--tz", "UTC", says="--tz goes with --cron"),
        cli(*ADD, says="give exactly one of --cron, --at and --after"),
        cli(
            "schedule", "add", "t1", "--after", "5s", "--queue", "q", "--body", "{bad", says="--body is not valid JSON"
        ),
        cli("schedule", "add", "t1", "--after", "5s", "--queue", "q", "--body", "NaN", says="Out of range float"),
        cli("schedule", "add", "t1", "--after", "5s", "--queue", "", "--body", "1", says="queue name '' must be"),
        cli("schedule", "add", "a\tb", "--after", "5s", "--queue", "q", "--body", "1", says="a timer name is"),
        cli("schedule", "add", "t" * 201, "--after", "5s", "--queue", "q", "--body", "1", says="longer than 200"),
        cli("schedule", "add", "--after", "5s", "--queue", "q", "--body", "1", says="give the timer's name"),
        cli(
            "schedule", "add", "nightly", "--after", "5s", "--queue", "q", "--body", "1", code=1, says="exists already"
        ),
        cli("schedule", "remove", "nosuch", code=1, says="no timer named 'nosuch'"),
        cli("schedule", "remove", "a\nb", says="a timer name is non-empty printable text"),
        cli("schedule", "list", "extra", says="schedule list takes no name"),
        cli("schedule", "bogus", says="invalid choice: 'bogus'"),
    ],
    "lock": [
        cli("lock", "", "--", "true", says="a lock name cannot be empty"),
        cli("lock", "x" * 4097, "--", "true", says="lock name is 4097 bytes long; the limit is 4096"),
        cli("lock", "é" * 2049, "--", "true", says="lock name is 4098 bytes long"),
        cli("lock", "x", "--timeout", "5x", "--", "true", says="lock timeout: '5x' is not a duration"),
        cli("lock", "x", "--timeout=-1s", "--", "true", says="lock timeout: '-1s' is not a duration"),
        cli("lock", "x", says="give the command to run after --"),
    ],
    "send": [
        cli("send", "q", "{bad", says="the message body is not valid JSON"),
        cli("send", "q", "[" * 990 + "]" * 990, says="nests lists and objects more than 64 deep"),
        cli("send", "q", '{"a": ' * 65 + "1" + "}" * 65, says="nests lists and objects more than 64 deep"),
        cli("send", "q", "NaN", says="must be JSON data: Out of range float"),
        cli("send", "q", "[Infinity]", says="must be JSON data: Out of range float"),
        cli("send", "q", "1e999", says="must be JSON data: Out of range float"),
        cli("send", "q", "1", "--delay", "5x", says="--delay: '5x' is not a duration"),
        cli("send", "q", "1", "--delay=-1s", says="--delay: '-1s' is not a duration"),
        cli("send", "q", "1", "--delay", "1e999", says="--delay: '1e999' is not a duration"),
        cli("send", "q", "1", "--delay", "30s1m", says="--delay: '30s1m' is not a duration"),
        cli("send", "q", "1", "--priority", "high", says="--priority must be a whole number, not 'high'"),
        cli("send", "q", "1", "--priority", "99999999999", says="priority must be a whole number"),
        cli("send", "", "1", says="queue name '' must be non-empty printable text"),
        cli("send", "a\nb", "1", says="must be non-empty printable text (no NUL, newline or tab)"),
        cli("send", "q" * 201, "1", says="is longer than 200 bytes"),
        cli("send", "q", "1", "--key", "", says="--key is a non-empty string"),
        cli("send", "q", "1", "--key", "k" * 1025, says="--key is a non-empty string of at most 1024"),
        cli("send", "q", says="the following arguments are required: body"),
    ],
    "receive": [
        cli("receive", "jobs", "--wait", "5x", says="--wait: '5x' is not a duration"),
        cli("receive", "", says="queue name '' must be non-empty"),
        cli("receive", "nothing-here", code=1, says="no message in queue 'nothing-here'"),
    ],
    "dead-letters": [
        cli("dead-letters", "list", "", says="queue name '' must be non-empty"),
        cli("dead-letters", "retry", "doomed", "--id", "abc", says="--id must be a whole number, not 'abc'"),
        cli("dead-letters", "purge", "doomed", "--id", "1.5", says="--id must be a whole number, not '1.5'"),
        cli("dead-letters", "explode", "doomed", says="invalid choice: 'explode'"),
    ],
    "define": [
        cli("define", "no-such-file.json", says="define: cannot read no-such-file.json: No such file"),
        cli("define", ".", says="define: cannot read .: Is a directory"),
    ],
    "definitions": [
        cli("definitions", "extra", says="unrecognized arguments: extra"),
    ],
    "start": [
        cli("start", "nope", says="no workflow definition 'nope'"),
        cli("start", "bad id!", says="the workflow id is 1 to 100 letters"),
        cli("start", "greet", "--input", "[1, 2]", says="--input must be a JSON object"),
        cli("start", "greet", "--input", '{"a": ' + "[" * 64 + "]" * 64 + "}", says="--input nests lists and objects"),
        cli("start", "greet", "--input", '"ada"', says="--input must be a JSON object"),
        cli("start", "greet", "--input", "{bad", says="--input is not valid JSON"),
        cli("start", "greet", "--input", '{"x": NaN}', says="Out of range float"),
        cli("start", "greet", "--wait", "--timeout", "5x", says="--timeout: '5x' is not a duration"),
        cli("start", "greet", "--key", "", says="a start key is printable text of 1 to 200 characters"),
        cli("start", "greet", "--key", "k" * 201, says="a start key is printable text of 1 to 200 characters"),
        cli("start", "greet", "--key", "a\nb", says="a start key is printable text"),
    ],
    "signal": [
        cli("signal", "", says="a signal name is printable text of 1 to 200 bytes"),
        cli("signal", "a\tb", says="a signal name is printable text"),
        cli("signal", "s" * 201, says="a signal name is printable text of 1 to 200 bytes"),
        cli("signal", "go", "--input", "[1]", says="--input must be a JSON object"),
        cli("signal", "go", "--input", '{"a": ' + "[" * 500 + "]" * 500 + "}", says="--input nests lists and objects"),
        cli("signal", "go", "--input", "{bad", says="--input is not valid JSON"),
        cli("signal", "go", "--ttl", "soon", says="--ttl: 'soon' is not a duration"),
        cli("signal", "go", "--ttl=-1s", says="--ttl: '-1s' is not a duration"),
        cli("signal", "go", "--ttl", "101y", says="--ttl: '101y' is not a duration"),
        cli("signal", "go", "--ttl", "36600000d", says="longer than 100 years"),
    ],
    "prune": [
        cli("prune", "--older-than", "a week", says="--older-than: 'a week' is not a duration"),
        cli("prune", "--older-than=-1d", says="--older-than: '-1d' is not a duration"),
        cli("prune", "--faulted-older-than", "x", says="--faulted-older-than: 'x' is not a duration"),
        cli("prune", "extra", says="unrecognized arguments: extra"),
    ],
    "instances": [
        cli("instances", "--status", "sleeping", says="invalid choice: 'sleeping'"),
        cli("instances", "--limit", "abc", says="--limit must be a whole number, not 'abc'"),
        cli("instances", "--limit", "0", says="limit must be a whole number of at least 1"),
        cli("instances", "--definition", "bad id!", says="a workflow id is 1 to 100 letters"),
    ],
    "show": [
        cli("show", "ffffffffffffffff", says="no instance 'ffffffffffffffff'"),
        cli("show", "zz", says="no instance 'zz'"),
        cli("show", "", says="an instance id"),
    ],
    "retry": [
        cli("retry", "ffffffffffffffff", says="no instance 'ffffffffffffffff'"),
        cli("retry", "{instance}", says="only a faulted instance"),
    ],
    "cancel": [
        cli("cancel", "ffffffffffffffff", says="no instance 'ffffffffffffffff'"),
        cli("cancel", says="the following arguments are required: instance"),
        cli("cancel", "{instance}", "--reason", "two\nlines", says="a reason is printable text"),
        cli("cancel", "{instance}", "--reason", "x" * 1001, says="at most 1000 characters"),
    ],
    "demo": [
        cli("demo", "nope", says="invalid choice: 'nope'"),
        cli("demo", says="the following arguments are required: scenario"),
        cli("demo", "locks", "extra", says="unrecognized arguments: extra"),
    ],
    "no verb": [
        cli("frobnicate", says="invalid choice: 'frobnicate'"),
        cli(says="the following arguments are required: COMMAND"),
        cli("status", "--db", says="unrecognized arguments: --db"),
    ],
}


# 2. Workflow definitions, through define FILE and POST /api/definitions ------------------------------


def changed(*edits: tuple[tuple[str, ...], Any]) -> dict[str, Any]:
    """BASE with each (path, value) set; a value of DROP removes the key."""
    data = json.loads(json.dumps(BASE))
    for path, value in edits:
        target = data
        for key in path[:-1]:
            target = target[key]
        if value is DROP:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return data


DROP = object()


def b_is(activity: Any) -> dict[str, Any]:
    """BASE whose activity b (reached from a) is ``activity``."""
    return changed((("activities", "b"), activity))


def condition(test: Any, **exits: str) -> dict[str, Any]:
    return b_is({"type": "if", "condition": test, **(exits or {"then": "a"})})


@dataclass(frozen=True)
class Definition:
    text: str | bytes  # the file's (and the body's) bytes
    says: str  # a fragment of one of the problems listed


def definition(data: Any, says: str) -> Definition:
    return Definition(json.dumps(data), says)


TOO_MANY = {f"a{i}": {"type": "log", "message": "x", "next": f"a{i + 1}"} for i in range(1000)}
TOO_MANY["a1000"] = {"type": "log", "message": "x"}

DEFINITION_CASES: dict[str, Definition] = {
    # The whole, and its top-level fields
    "not an object": definition([1, 2], "definition: must be a JSON object, not a list"),
    "not JSON": Definition('{"id": "w",', "not JSON: Expecting property name enclosed in double quotes at line 1"),
    "empty file": Definition("", "not JSON: Expecting value at line 1 column 1"),
    "not UTF-8": Definition(b'{"id": "caf\xe9"}', "not UTF-8 text (byte 11)"),
    "NaN": Definition(
        '{"id": "w", "start": "a", "activities": {"a": {"type": "timer", "duration": NaN}}}',
        "not JSON data (Out of range float values",
    ),
    "nested too deeply": Definition("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "a value nested 200 deep": definition(
        b_is({"type": "set", "values": {"x": json.loads("[" * 200 + "]" * 200)}}),
        "definition: nests lists and objects more than 128 deep",
    ),
    "a timer of 99999999999d": definition(
        b_is({"type": "timer", "duration": "99999999999d"}), "'99999999999d' is longer than 100 years"
    ),
    "a bidi override in an id": definition(changed((("start",), "a\u202eb")), 'start: no activity named "a\\u202eb"'),
    "too large": definition(changed((("description",), "x" * 300_000)), "bytes of JSON; the most is 262144"),
    "id missing": definition(changed((("id",), DROP)), "id: is missing: give the workflow an id"),
    "id not text": definition(changed((("id",), 5)), "id: the id is 1 to 100 letters"),
    "id ../x": definition(changed((("id",), "../x")), "not '../x'"),
    "id too long": definition(changed((("id",), "w" * 101)), "id: the id is 1 to 100 letters"),
    "id twice": Definition(
        '{"id": "w", "id": "v", "start": "a", "activities": {"a": {"type": "log", "message": "1"}}}',
        "id: given more than once",
    ),
    "name too long": definition(changed((("name",), "n" * 201)), "name: is 201 characters; the most is 200"),
    "name blank": definition(changed((("name",), " ")), "name: must not be empty"),
    "name not text": definition(changed((("name",), 3)), "name: must be text, not a number"),
    "description not text": definition(changed((("description",), [1])), "description: must be text, not a list"),
    "variables not an object": definition(changed((("variables",), [1])), "variables: must be a JSON object"),
    "unknown field": definition(changed((("colour",), "red")), "colour: unknown field"),
    "a version": definition(changed((("version",), 2)), "version: unknown field; versions are numbered by define"),
    "start missing": definition(changed((("start",), DROP)), "start: is missing: name the first activity"),
    "start dangling": definition(changed((("start",), "zz")), 'start: no activity named "zz"'),
    "start not text": definition(changed((("start",), 1)), "start: no activity named 1"),
    "activities missing": definition(changed((("activities",), DROP)), "activities: must be a non-empty object"),
    "activities a list": definition(changed((("activities",), [1])), "activities: must be a non-empty object"),
    "activities empty": definition(changed((("activities",), {})), "activities: must be a non-empty object"),
    "too many activities": definition(
        changed((("start",), "a0"), (("activities",), TOO_MANY)), "activities: 1001 activities; the most is 1000"
    ),
    "an activity id twice": Definition(
        '{"id": "w", "start": "a", "activities": {"a": {"type": "log", "message": "1"}, '
        '"a": {"type": "log", "message": "2"}}}',
        "activities.a: two activities have this id",
    ),
    "a bad activity id": definition(
        changed((("activities", "a", "next"), "b c"), (("activities", "b c"), {"type": "log", "message": "x"})),
        "activities.b c: an activity id is 1 to 100 letters",
    ),
    "unreachable activity": definition(
        changed((("activities", "a", "next"), DROP)), 'activities.b: is unreachable: no path from start "a"'
    ),
    # Activities
    "activity not an object": definition(b_is([1]), "activities.b: must be an object with a type, not a list"),
    "type missing": definition(b_is({"message": "x"}), "activities.b.type: is missing"),
    "unknown type": definition(b_is({"type": "teleport"}), 'activities.b.type: unknown activity type "teleport"'),
    "unknown activity field": definition(
        b_is({"type": "log", "message": "x", "colour": "red"}), "activities.b.colour: unknown field for a log activity"
    ),
    "dangling next": definition(
        b_is({"type": "log", "message": "x", "next": "nowhere"}), 'activities.b.next: no activity named "nowhere"'
    ),
    "next not text": definition(b_is({"type": "log", "message": "x", "next": 5}), "activities.b.next: must be text"),
    "message missing": definition(b_is({"type": "log"}), "activities.b.message: is missing: a log activity needs it"),
    "message not text": definition(b_is({"type": "log", "message": 5}), "activities.b.message: must be text"),
    "template {": definition(b_is({"type": "log", "message": "oops {"}), "unmatched '{' at character 6"),
    "template {a b}": definition(b_is({"type": "log", "message": "{a b}"}), "{a b} is not a variable path"),
    "template too long": definition(
        b_is({"type": "log", "message": "x" * 4097}), "is 4097 characters; the most is 4096"
    ),
    "timer 5x": definition(b_is({"type": "timer", "duration": "5x"}), "activities.b.duration: '5x' is not a duration"),
    "timer -1": definition(b_is({"type": "timer", "duration": -1}), "-1 is not a duration; give zero or more"),
    "timer 1e999": definition(b_is({"type": "timer", "duration": "1e999"}), "'1e999' is not a duration"),
    "timer true": definition(b_is({"type": "timer", "duration": True}), "must be a duration such as"),
    "timer missing": definition(b_is({"type": "timer"}), "activities.b.duration: is missing"),
    "work over an hour": definition(b_is({"type": "work", "duration": "2h"}), "is 7200s; the most is 3600s"),
    "work kind": definition(b_is({"type": "work", "duration": "1s", "kind": "gpu"}), 'not "gpu"'),
    "start_at not a time": definition(b_is({"type": "start_at", "at": "tomorrow"}), "'tomorrow' is not an ISO 8601"),
    "start_at 1900": definition(b_is({"type": "start_at", "at": "1900-01-01T00:00"}), "between 1970 and 9999"),
    "signal without name": definition(b_is({"type": "signal"}), "activities.b.name: is missing"),
    "signal result a.b": definition(
        b_is({"type": "signal", "name": "go", "result": "a.b"}), "activities.b.result: must be a variable name"
    ),
    "call of code": definition(
        b_is({"type": "call", "function": "os.system('x')"}), "activities.b.function: must name a registered function"
    ),
    "call retry 0 attempts": definition(
        b_is({"type": "call", "function": "f", "retry": {"attempts": 0}}),
        "retry.attempts: must be a whole number from 1 to 100",
    ),
    "call retry unknown field": definition(
        b_is({"type": "call", "function": "f", "retry": {"tries": 3}}), "activities.b.retry: must be an object such as"
    ),
    "call retry delay 5x": definition(
        b_is({"type": "call", "function": "f", "retry": {"delay": "5x"}}), "retry.delay: '5x' is not a duration"
    ),
    "fail with next": definition(b_is({"type": "fail", "message": "x", "next": "a"}), "a fail activity ends its"),
    "set of nothing": definition(b_is({"type": "set"}), 'a set activity needs "values" or "add"'),
    "set values a list": definition(b_is({"type": "set", "values": [1]}), "activities.b.values: must be an object"),
    "set a bad name": definition(b_is({"type": "set", "values": {"a b": 1}}), "values.a b: is not a variable name"),
    "add text": definition(b_is({"type": "set", "add": {"n": "1"}}), "activities.b.add.n: must be a number"),
    # Conditions
    "if without exits": definition(
        b_is({"type": "if", "condition": {"var": "input.x", "op": "exists"}}),
        'an if activity needs "then", "else" or "next"',
    ),
    "dangling then": definition(
        condition({"var": "input.x", "op": "exists"}, then="nowhere"), 'activities.b.then: no activity named "nowhere"'
    ),
    "dangling else": definition(
        condition({"var": "input.x", "op": "exists"}, **{"else": "nowhere"}),
        'activities.b.else: no activity named "nowhere"',
    ),
    "operator ~=": definition(condition({"var": "input.x", "op": "~=", "value": 1}), "condition.op: must be one of"),
    "condition field": definition(condition({"var": "input.x", "op": "==", "value": 1, "x": 2}), 'unknown field "x"'),
    "condition var": definition(condition({"var": "in put", "op": "==", "value": 1}), 'not "in put"'),
    "condition no value": definition(condition({"var": "input.x", "op": "=="}), '"==" needs a value'),
    "exists with a value": definition(condition({"var": "input.x", "op": "exists", "value": 1}), '"exists" takes no'),
    "> a list": definition(condition({"var": "input.x", "op": ">", "value": [1]}), '">" compares numbers or text'),
    "all of nothing": definition(condition({"all": []}), "condition.all: must be a non-empty list"),
    "condition a list": definition(condition([1]), "must be a condition object such as"),
    # Triggers
    "triggers an object": definition(changed((("triggers",), {})), "triggers: must be a list, not an object"),
    "trigger type": definition(changed((("triggers",), [{"type": "webhook"}])), 'must be "cron" or "signal"'),
    "cron of 3 fields": definition(
        changed((("triggers",), [{"type": "cron", "cron": "* * *"}])), "triggers[0].cron: bad cron expression"
    ),
    "cron 61": definition(changed((("triggers",), [{"type": "cron", "cron": "61 * * * *"}])), "minute 61 is out of"),
    "cron not text": definition(changed((("triggers",), [{"type": "cron", "cron": 5}])), "triggers[0].cron: must be"),
    "cron zone": definition(
        changed((("triggers",), [{"type": "cron", "cron": "0 3 * * *", "tz": "Mars/Base"}])),
        'triggers[0].tz: unknown time zone "Mars/Base"',
    ),
    "trigger input a list": definition(
        changed((("triggers",), [{"type": "cron", "cron": "@daily", "input": [1]}])),
        "triggers[0].input: must be a JSON object",
    ),
    "trigger field": definition(
        changed((("triggers",), [{"type": "signal", "name": "go", "when": 1}])),
        "triggers[0].when: unknown field for a signal trigger",
    ),
    "signal trigger name": definition(
        changed((("triggers",), [{"type": "signal", "name": ""}])),
        "triggers[0].name: the signal name is printable text",
    ),
    "33 triggers": definition(
        changed((("triggers",), [{"type": "signal", "name": f"s{i}"} for i in range(33)])),
        "triggers: 33 triggers; the most is 32",
    ),
    # Waits that end, and child instances
    "on_timeout alone": definition(
        b_is({"type": "signal", "name": "go", "on_timeout": "a"}), "activities.b.on_timeout: goes with timeout"
    ),
    "a zero timeout": definition(
        b_is({"type": "signal", "name": "go", "timeout": "0s", "on_timeout": "a"}),
        "activities.b.timeout: must be more than zero",
    ),
    "a timeout not a duration": definition(
        b_is({"type": "signal", "name": "go", "timeout": "soon"}), "activities.b.timeout: 'soon' is not a duration"
    ),
    "on_timeout nowhere": definition(
        b_is({"type": "signal", "name": "go", "timeout": "1m", "on_timeout": "zz"}),
        'activities.b.on_timeout: no activity named "zz"',
    ),
    "run without definition": definition(b_is({"type": "run"}), "activities.b.definition: is missing"),
    "run a bad id": definition(
        b_is({"type": "run", "definition": "a b"}), "definition: a workflow id is 1 to 100 letters"
    ),
    "run input a list": definition(
        b_is({"type": "run", "definition": "w", "input": [1]}), "activities.b.input: must be an object of variables"
    ),
    "run a timeout of zero": definition(
        b_is({"type": "run", "definition": "w", "timeout": 0}), "activities.b.timeout: must be more than zero"
    ),
}


# 3. Database files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadFile:
    code: int
    says: str
    needs_root: bool = False  # chown needs root
    as_nobody: bool = False  # run the CLI as uid 65534 when root (who would get past the file mode)


DATABASE_CASES: dict[str, BadFile] = {
    "an empty file (0 bytes)": BadFile(1, "is an empty file, not a nodeflow database"),
    "a nodeflow database cut to half": BadFile(1, "is damaged or not a database"),
    "a text file": BadFile(1, "is not an SQLite database, or its header is damaged"),
    "another program's SQLite database": BadFile(1, "is an SQLite database of another program"),
    "a newer schema": BadFile(1, f"written by a newer nodeflow (schema {nodeflow.SCHEMA_VERSION + 1}; this one"),
    "a read-only file (0400)": BadFile(1, "is read-only for this user", as_nobody=True),
    "a read-only folder": BadFile(1, "is read-only for this user", as_nobody=True),
    "a file owned by another user": BadFile(1, "another user", needs_root=True),
    "another user's file, opened by nobody": BadFile(1, "belongs to another user", needs_root=True, as_nobody=True),
    "a directory": BadFile(2, "is a directory; --db takes the path of the database file"),
    "a folder that does not exist": BadFile(2, "does not exist; create it or choose another --db"),
    "a lock folder that is a file": BadFile(1, "should be nodeflow's lock folder but is not a directory"),
    "a lock folder others can write": BadFile(1, "can be written by other users (mode 777)"),
}
DATABASE_VERBS = (("status",), ("send", "q", "1"))  # one that reads, one that writes


def make_bad_file(kind: str, folder: str) -> str:
    """Build the bad --db of ``kind`` in ``folder``; its path."""
    db = os.path.join(folder, "cluster.db")
    if kind.startswith("an empty file"):
        open(db, "wb").close()
    elif kind.startswith("a nodeflow database cut"):
        copy_template(folder)
        os.truncate(db, os.path.getsize(db) // 2)
    elif kind == "a text file":
        with open(db, "w") as text:
            text.write("id,name\n1,ada\n" * 100)
    elif kind.startswith("another program"):
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        conn.execute("INSERT INTO notes (text) VALUES ('mine')")
        conn.commit()
        conn.close()
    elif kind == "a newer schema":
        copy_template(folder)
        conn = sqlite3.connect(db)
        conn.execute(f"PRAGMA user_version = {nodeflow.SCHEMA_VERSION + 1}")
        conn.close()
    elif kind.startswith("a read-only file"):
        copy_template(folder)
        os.chmod(db, 0o400)
    elif kind == "a read-only folder":
        copy_template(folder)
        os.chmod(folder, 0o555)
    elif kind == "a file owned by another user":
        copy_template(folder)
        os.chown(db, NOBODY, NOBODY)
    elif kind == "another user's file, opened by nobody":
        copy_template(folder)  # this process's, mode 0600, in a folder nobody may write
        os.chown(folder, NOBODY, NOBODY)
    elif kind == "a directory":
        os.mkdir(db)
        open(os.path.join(db, "keep"), "w").close()
    elif kind == "a folder that does not exist":
        db = os.path.join(folder, "missing", "cluster.db")
    elif kind == "a lock folder that is a file":
        copy_template(folder)
        open(db + ".d", "w").close()
    elif kind == "a lock folder others can write":
        copy_template(folder)
        os.mkdir(db + ".d")
        os.chmod(db + ".d", 0o777)
    else:
        raise AssertionError(kind)
    if kind.startswith("a read-only") and IS_ROOT:
        os.chown(folder, NOBODY, NOBODY)  # root passes any file mode: the CLI runs as nobody
        os.chown(db, NOBODY, NOBODY)
    return db


# 4. The library: what the command line cannot pass ----------------------------------------------------


@dataclass(frozen=True)
class Call:
    run: Callable[[nodeflow.Cluster], Any] | None  # on an open handle; None: ``connect`` itself is the call
    says: str
    connect: dict[str, Any] = field(default_factory=dict)  # options for nodeflow.connect


LIBRARY_CASES: dict[str, Call] = {
    "a lock name with NUL": Call(lambda nf: nf.lock("a\0b", timeout=0), "contains a NUL character"),
    "an empty lock name": Call(lambda nf: nf.lock("", timeout=0), "a lock name cannot be empty"),
    "a lock name of 4097 bytes": Call(lambda nf: nf.lock("x" * 4097, timeout=0), "the limit is 4096 bytes"),
    "a lock name with a lone surrogate": Call(lambda nf: nf.lock("\ud800", timeout=0), "is not valid UTF-8 text"),
    "a lock name that is not text": Call(lambda nf: nf.lock(42, timeout=0), "a lock name is a string, not int"),
    "a body over the 1 MiB default": Call(lambda nf: nf.send("q", "x" * (1 << 20)), "the limit is 1048576 bytes"),
    "a body over max_body_bytes=100": Call(
        lambda nf: nf.send("q", {"text": "x" * 100}),
        "the limit is 100 bytes",
        {"settings": nodeflow.Settings(max_body_bytes=100)},
    ),
    "a NaN body": Call(lambda nf: nf.send("q", float("nan")), "Out of range float values are not JSON compliant"),
    "an Infinity body": Call(lambda nf: nf.send("q", {"x": float("inf")}), "Out of range float values"),
    "a body that is not JSON data": Call(lambda nf: nf.send("q", {1, 2}), "a message body must be JSON data"),
    "a body with a lone surrogate": Call(lambda nf: nf.send("q", "\udc80"), "it holds a lone surrogate"),
    "a priority of True": Call(lambda nf: nf.send("q", 1, priority=True), "priority must be a whole number"),
    "a priority of 2**31": Call(lambda nf: nf.send("q", 1, priority=2**31), "priority must be a whole number"),
    "a queue name that is not text": Call(lambda nf: nf.send(None, 1), "a queue name is a string, not NoneType"),
    "a node id ../x": Call(None, "node id '../x' is not valid", {"node": "../x"}),
    "a node id with a newline": Call(None, "is not valid; use 1 to 128 letters", {"node": "n1\n"}),
}


class Library(ClusterTestCase):
    def test_the_library_refuses_what_the_cli_cannot_pass_and_writes_nothing(self) -> None:
        db = copy_template(self.dir)
        for name, case in LIBRARY_CASES.items():
            with self.subTest(name):
                before = tree_snapshot(db)
                with self.assertRaises(nodeflow.InvalidInput) as raised:
                    if case.run is None:
                        nodeflow.connect(db, **case.connect).close()
                    else:
                        with nodeflow.connect(db, **case.connect) as nf:
                            case.run(nf)
                message = str(raised.exception)
                self.assertIn(case.says, message)
                self.assertNotIn("\n", message, "one line")
                self.assertEqual(tree_snapshot(db), before, f"{name}: the database changed")


# The CLI and definition cases, run in parallel once for the class ----------------------------------------


def cli_job(home: str, args: tuple[str, ...]) -> Job:
    """A CLI case on a copy of the template, in a folder of its own."""
    folder = tempfile.mkdtemp(dir=home)
    return Job(copy_template(folder), tuple(arg.replace("{instance}", TEMPLATE_INSTANCE) for arg in args), folder)


def define_job(home: str, text: str | bytes) -> Job:
    """``define def.json`` with ``text`` in def.json, on a copy of the template."""
    job = cli_job(home, ("define", "def.json"))
    with open(os.path.join(job.cwd, "def.json"), "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return job


def database_job(home: str, kind: str, verb: tuple[str, ...]) -> Job:
    """``verb`` on a bad --db of ``kind``; as nobody where root would get past a file mode."""
    folder = tempfile.mkdtemp(dir=home)
    os.chmod(folder, 0o755)
    db = make_bad_file(kind, folder)
    return Job(db, verb, home, NOBODY if DATABASE_CASES[kind].as_nobody and IS_ROOT else None)


class CliCases(ClusterTestCase):
    """Every CLI case (and every definition through ``define``) on its own copy of the template."""

    outcomes: ClassVar[dict[tuple[str, int], Outcome]]
    definition_outcomes: ClassVar[dict[str, Outcome]]
    home: ClassVar[str]

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.home = tempfile.mkdtemp(prefix="nodeflow-bad-cli-")
        cls.addClassCleanup(shutil.rmtree, cls.home, True)
        keys, jobs = [], []
        for verb, cases in CLI_CASES.items():
            for index, case in enumerate(cases):
                keys.append(("cli", verb, index))
                jobs.append(cli_job(cls.home, case.args))
        for name, case in DEFINITION_CASES.items():
            keys.append(("define", name))
            jobs.append(define_job(cls.home, case.text))
        outcomes = dict(zip(keys, run_forked(jobs), strict=True))
        cls.outcomes = {(key[1], key[2]): outcome for key, outcome in outcomes.items() if key[0] == "cli"}
        cls.definition_outcomes = {key[1]: outcome for key, outcome in outcomes.items() if key[0] == "define"}

    def check_verb(self, verb: str) -> None:
        for index, case in enumerate(CLI_CASES[verb]):
            with self.subTest(args=case.args):
                outcome = self.outcomes[(verb, index)]
                assert_cli_refusal(self, outcome.done, case.code, case.says, repr(case.args))
                self.assertEqual(outcome.after, outcome.before, f"{case.args!r}: the database changed")

    def test_status(self) -> None:
        self.check_verb("status")

    def test_serve(self) -> None:
        self.check_verb("serve")

    def test_cluster(self) -> None:
        self.check_verb("cluster")

    def test_schedule(self) -> None:
        self.check_verb("schedule")

    def test_lock(self) -> None:
        self.check_verb("lock")

    def test_send(self) -> None:
        self.check_verb("send")

    def test_receive(self) -> None:
        self.check_verb("receive")

    def test_dead_letters(self) -> None:
        self.check_verb("dead-letters")

    def test_define(self) -> None:
        self.check_verb("define")

    def test_definitions(self) -> None:
        self.check_verb("definitions")

    def test_start(self) -> None:
        self.check_verb("start")

    def test_signal(self) -> None:
        self.check_verb("signal")

    def test_instances(self) -> None:
        self.check_verb("instances")

    def test_show(self) -> None:
        self.check_verb("show")

    def test_retry(self) -> None:
        self.check_verb("retry")

    def test_cancel(self) -> None:
        self.check_verb("cancel")

    def test_prune(self) -> None:
        self.check_verb("prune")

    def test_demo(self) -> None:
        self.check_verb("demo")

    def test_no_verb(self) -> None:
        self.check_verb("no verb")

    def test_every_verb_has_cases(self) -> None:
        verbs = {
            "status", "serve", "cluster", "schedule", "lock", "send", "receive", "dead-letters", "define",
            "definitions", "start", "signal", "instances", "show", "retry", "cancel", "prune", "demo",
        }  # fmt: skip
        self.assertEqual(verbs, {case.args[0] for cases in CLI_CASES.values() for case in cases if case.args} - {
            "frobnicate"})  # fmt: skip
        actions = {case.args[:2] for case in CLI_CASES["schedule"] + CLI_CASES["dead-letters"]}
        for action in ("add", "list", "remove"):
            self.assertIn(("schedule", action), actions)
        for action in ("list", "retry", "purge"):
            self.assertIn(("dead-letters", action), actions)

    def test_definitions_through_define_file(self) -> None:
        for name, case in DEFINITION_CASES.items():
            with self.subTest(name):
                outcome = self.definition_outcomes[name]
                assert_define_refusal(self, outcome.done, case.says, name)
                self.assertEqual(outcome.after, outcome.before, f"define {name}: the database changed")


# The script itself: a sample of the corpus through ``python3 nodeflow.py``, as a user runs it ---------------


class EntryPoint(ClusterTestCase):
    """The first case of each verb, one definition, and each bad database file with ``status``, run as
    ``python3 nodeflow.py``: the script refuses them as main() does in the forked children."""

    def test_the_script_refuses_as_main_does(self) -> None:
        home = tempfile.mkdtemp(prefix="nodeflow-bad-script-", dir=self.dir)
        os.chmod(self.dir, 0o711)
        checks: list[tuple[str, Job, Callable[[Outcome], None]]] = []
        for verb, cases in CLI_CASES.items():
            case = cases[0]
            checks.append((f"{verb}: {case.args}", cli_job(home, case.args), self.refused(case.code, case.says)))
        name, text = next(iter(DEFINITION_CASES.items()))
        checks.append((f"define: {name}", define_job(home, text.text), self.defined(text.says)))
        for kind, bad in DATABASE_CASES.items():
            if (bad.needs_root and not IS_ROOT) or (bad.as_nobody and IS_ROOT):
                continue  # as nobody, the interpreter itself may not be readable (a pyenv under /root)
            checks.append((f"--db {kind}", database_job(home, kind, ("status",)), self.refused(bad.code, bad.says)))
        for (what, _, check), outcome in zip(checks, run_script([job for _, job, _ in checks]), strict=True):
            with self.subTest(what):
                check(outcome)
                self.assertEqual(outcome.after, outcome.before, f"{what}: the database changed")

    def refused(self, code: int, says: str) -> Callable[[Outcome], None]:
        return lambda outcome: assert_cli_refusal(self, outcome.done, code, says, repr(outcome.done.args))

    def defined(self, says: str) -> Callable[[Outcome], None]:
        return lambda outcome: assert_define_refusal(self, outcome.done, says, "define")


# Database files ------------------------------------------------------------------------------------------


class DatabaseFiles(ClusterTestCase):
    outcomes: ClassVar[dict[tuple[str, tuple[str, ...]], Outcome]]
    home: ClassVar[str]

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.home = tempfile.mkdtemp(prefix="nodeflow-bad-db-")
        os.chmod(cls.home, 0o711)  # nobody passes through to its own folder
        cls.addClassCleanup(shutil.rmtree, cls.home, True)
        keys, jobs = [], []
        for kind, case in DATABASE_CASES.items():
            if case.needs_root and not IS_ROOT:
                continue
            for verb in DATABASE_VERBS:
                keys.append((kind, verb))
                jobs.append(database_job(cls.home, kind, verb))
        cls.outcomes = dict(zip(keys, run_forked(jobs), strict=True))
        os.chmod(cls.home, 0o755)
        for folder in os.listdir(cls.home):  # a read-only folder, to be removed
            os.chmod(os.path.join(cls.home, folder), 0o755)

    def check(self, kind: str) -> None:
        case = DATABASE_CASES[kind]
        if case.needs_root and not IS_ROOT:
            self.skipTest("chown to another user needs root")
        for verb in DATABASE_VERBS:
            with self.subTest(kind=kind, verb=verb):
                outcome = self.outcomes[(kind, verb)]
                assert_cli_refusal(self, outcome.done, case.code, case.says, f"{kind}: {verb}")
                self.assertEqual(outcome.after, outcome.before, f"{kind}: {verb} changed the file")

    def test_an_empty_file_is_refused_not_taken_for_a_new_database(self) -> None:
        self.check("an empty file (0 bytes)")

    def test_a_truncated_database(self) -> None:
        self.check("a nodeflow database cut to half")

    def test_a_text_file(self) -> None:
        self.check("a text file")

    def test_another_programs_sqlite_database(self) -> None:
        self.check("another program's SQLite database")

    def test_a_database_from_a_newer_schema_is_left_untouched(self) -> None:
        self.check("a newer schema")

    def test_a_read_only_file(self) -> None:
        self.check("a read-only file (0400)")

    def test_a_read_only_folder(self) -> None:
        self.check("a read-only folder")

    def test_a_file_owned_by_another_user(self) -> None:
        self.check("a file owned by another user")

    def test_another_users_file_opened_by_nobody(self) -> None:
        self.check("another user's file, opened by nobody")

    def test_a_directory(self) -> None:
        self.check("a directory")

    def test_a_folder_that_does_not_exist_is_not_created(self) -> None:
        self.check("a folder that does not exist")

    def test_a_lock_folder_that_is_a_file(self) -> None:
        self.check("a lock folder that is a file")

    def test_a_lock_folder_others_can_write(self) -> None:
        self.check("a lock folder others can write")


# HTTP: one node for every case ---------------------------------------------------------------------------

URL_LINE = re.compile(r"dashboard and API at http://127\.0\.0\.1:(\d+)/")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: Any = None  # JSON data, or bytes sent as they are
    status: int = 400
    says: str = ""  # a fragment of the "error"
    headers: tuple[tuple[str, str], ...] = ()


def req(method: str, path: str, body: Any = None, status: int = 400, says: str = "", **headers: str) -> Request:
    return Request(method, path, body, status, says, tuple((k.replace("_", "-"), v) for k, v in headers.items()))


WAITING = "{waiting}"  # stands for the id of an instance waiting for a signal
BIG_INPUT = {"definition": "greet", "input": {"text": "x" * (1 << 20)}}  # over 1 MiB, under the 2 MiB body limit

HTTP_CASES: dict[str, list[Request]] = {
    "/": [
        req("GET", "/nope", status=404, says="no route '/nope'"),
    ],
    "/metrics": [
        req("GET", "/metrics", status=403, says="is not this node", Host="evil.example"),
        req("GET", "/metrics/more", status=404, says="no route"),
    ],
    "/api/status": [
        req("POST", "/api/status", {}, status=405, says="/api/status takes GET, not POST"),
        req("DELETE", "/api/status", status=405, says="takes GET, not DELETE"),
        req("GET", "/api/status", status=403, says="Host 'evil.example:80' is not this node", Host="evil.example:80"),
    ],
    "/api/definitions": [
        req("PUT", "/api/definitions", {}, status=405, says="takes GET or POST, not PUT"),
        req("POST", "/api/definitions", b'{"id": "x",', says="the body is not JSON"),
        req("POST", "/api/definitions", b"\xff\xfe", says="the body is not JSON"),
        req("POST", "/api/definitions", [1, 2], says="send a JSON object: a workflow definition"),
        req("POST", "/api/definitions", "text", says="send a JSON object"),
        req("POST", "/api/definitions", b"", says="not JSON: Expecting value at line 1 column 1"),
        req("POST", "/api/definitions", BASE, status=415, says="not 'text/plain'", Content_Type="text/plain"),
        req(
            "POST",
            "/api/definitions",
            BASE,
            status=415,
            says="not 'application/x-www-form-urlencoded'",
            Content_Type="application/x-www-form-urlencoded",
        ),
    ],
    "/api/definitions/ID": [
        req("GET", "/api/definitions/greet?version=abc", says="?version= takes a whole number from 1, not 'abc'"),
        req("GET", "/api/definitions/greet?version=0", says="?version= takes a whole number"),
        req("GET", "/api/definitions/greet?version=%C2%B9", says="?version= takes a whole number"),
        req("GET", "/api/definitions/bad%20id", says="not 'bad id'"),
        req("POST", "/api/definitions/greet", {}, status=405, says="takes GET, not POST"),
    ],
    "/api/instances": [
        req("GET", "/api/instances?limit=abc", says="?limit= takes a whole number from 1, not 'abc'"),
        req(
            "POST",
            "/api/instances",
            {"definition": "greet", "input": {"a": json.loads("[" * 300 + "]" * 300)}},
            says="input nests lists and objects more than 64 deep",
        ),
        req("GET", "/api/instances?limit=0", says="?limit= takes a whole number"),
        req("GET", "/api/instances?limit=-1", says="?limit= takes a whole number"),
        req("GET", "/api/instances?limit=1e3", says="?limit= takes a whole number"),
        req("GET", "/api/instances?limit=99999999", says="?limit= takes a whole number"),
        req("GET", "/api/instances?status=sleeping", says="sleeping"),
        req("GET", "/api/instances?definition=bad%20id", says="not 'bad id'"),
        req("DELETE", "/api/instances", status=405, says="takes GET or POST, not DELETE"),
        req("POST", "/api/instances", b"{", says="the body is not JSON"),
        req("POST", "/api/instances", [], says='send a JSON object: {"definition": ID'),
        req(
            "POST",
            "/api/instances",
            {"definition": 5},
            says='send {"definition": ID, "input": {...}, "key": TEXT (optional)}',
        ),
        req("POST", "/api/instances", {"input": {}}, says='send {"definition": ID'),
        req("POST", "/api/instances", {"definition": "greet", "extra": 1}, says="unknown 'extra'"),
        req("POST", "/api/instances", {"definition": "nope"}, says="no workflow definition 'nope'"),
        req("POST", "/api/instances", {"definition": "bad id!"}, says="not 'bad id!'"),
        req("POST", "/api/instances", {"definition": "greet", "input": [1]}, says="input must be a JSON object"),
        req("POST", "/api/instances", {"definition": "greet", "input": "ada"}, says="input must be a JSON object"),
        req("POST", "/api/instances", b'{"definition": "greet", "input": {"x": NaN}}', says="Out of range float"),
        req("POST", "/api/instances", b'{"definition": "greet", "input": {"x": 1e999}}', says="Out of range float"),
        req("POST", "/api/instances", BIG_INPUT, says="the limit is 1048576 bytes"),
        req(
            "POST",
            "/api/instances",
            {"definition": "greet"},
            status=415,
            says="not 'text/plain'",
            Content_Type="text/plain",
        ),
    ],
    "/api/instances/ID": [
        req("GET", "/api/instances/..%2F..%2Fetc", status=404, says="no instance '../../etc'"),
        req("DELETE", f"/api/instances/{WAITING}", status=405, says="takes GET, not DELETE"),
        req("GET", "/api/instances/a/b/c", status=404, says="no route"),
    ],
    "/api/instances/ID/retry": [
        req("POST", f"/api/instances/{WAITING}/retry", {}, says="only a faulted instance"),
        req("GET", f"/api/instances/{WAITING}/retry", status=405, says="takes POST, not GET"),
        req(
            "POST",
            f"/api/instances/{WAITING}/retry",
            {},
            status=415,
            says="not 'text/plain'",
            Content_Type="text/plain",
        ),
        req("POST", f"/api/instances/{WAITING}/resume", {}, status=404, says="no route"),
    ],
    "/api/instances/ID/cancel": [
        req("GET", f"/api/instances/{WAITING}/cancel", status=405, says="takes POST, not GET"),
        req("POST", "/api/instances/ffffffffffffffff/cancel", {}, status=404, says="no instance 'ffffffffffffffff'"),
        req("POST", f"/api/instances/{WAITING}/cancel", {"reason": 5}, says="a reason is printable text"),
        req("POST", f"/api/instances/{WAITING}/cancel", {"reason": "a\u202eb"}, says="a reason is printable text"),
        req("POST", f"/api/instances/{WAITING}/cancel", {"why": "x"}, says='send {"reason": TEXT}'),
        req("POST", f"/api/instances/{WAITING}/cancel", [1], says="send a JSON object"),
        req(
            "POST",
            f"/api/instances/{WAITING}/cancel",
            {},
            status=415,
            says="not 'text/plain'",
            Content_Type="text/plain",
        ),
    ],
    "/api/signals/NAME": [
        req("GET", "/api/signals/go", status=405, says="takes POST, not GET"),
        req("POST", "/api/signals/a%00b", {}, says="a signal name is printable text"),
        req("POST", "/api/signals/a%0Ab", {}, says="a signal name is printable text"),
        req("POST", "/api/signals/" + "s" * 201, {}, says="printable text of 1 to 200 bytes"),
        req("POST", "/api/signals/go", {"input": 5}, says="input must be a JSON object"),
        req(
            "POST",
            "/api/signals/go",
            {"input": {}, "extra": 1},
            says='send {"input": {...}, "ttl": DURATION (optional)}',
        ),
        req("POST", "/api/signals/go", b"[", says="the body is not JSON"),
        req("POST", "/api/signals/go", [1], says='send a JSON object: {"input": {...}, "ttl": DURATION (optional)}'),
        req("POST", "/api/signals/go", {"input": {}}, status=415, says="not 'text/plain'", Content_Type="text/plain"),
        req("POST", "/api/signals", {}, status=404, says="no route '/api/signals'"),
        req("POST", "/api/signals/a/b", {}, status=404, says="no route"),
    ],
    "unknown routes": [
        req("GET", "/api", status=404, says="the API is under /api/"),
        req("GET", "/api/nope", status=404, says="no route '/api/nope'"),
        req("GET", "/favicon.ico", status=404, says="no route"),
    ],
}

# Requests a well-behaved client cannot send: raw bytes on a socket of their own.
RAW_CASES: dict[str, tuple[bytes, int, str]] = {
    "a body over 2 MiB": (
        b"POST /api/definitions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 3145728\r\n\r\n{",
        413, "the body is 3145728 bytes; the limit is 2097152",
    ),
    "no Content-Length": (b"POST /api/definitions HTTP/1.1\r\n\r\n", 411, "send Content-Length"),
    "Content-Length abc": (b"POST /api/signals/go HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400,
                           "Content-Length is not a whole number"),
    "a request line of one word": (b"NONSENSE\r\n\r\n", 400, "a request line is METHOD PATH HTTP/1.1"),
    "HTTP/2.0": (b"GET /api/status HTTP/2.0\r\n\r\n", 400, "only HTTP/1.x is spoken here"),
    "a header without a colon": (b"GET /api/status HTTP/1.1\r\nno colon here\r\n\r\n", 400, "a malformed header"),
    "a folded header": (b"GET /api/status HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 400, "folded header lines"),
    "a head over 16 KiB": (b"GET /api/status HTTP/1.1\r\nX: " + b"x" * 17000 + b"\r\n\r\n", 431, "head"),
    "two Host headers": (b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n", 400,
                         "the Host header is given twice"),
}  # fmt: skip

# Wrong methods on the routes that are not under /api/, and unknown ids in a path: see HttpKnownGaps.
METHOD_CASES = [
    req("POST", "/", {}, status=405, says="GET"),
    req("PUT", "/", {}, status=405, says="GET"),
    req("POST", "/metrics", {}, status=405, says="GET"),
    req("DELETE", "/metrics", status=405, says="GET"),
]
UNKNOWN_ID_CASES = [
    req("GET", "/api/instances/ffffffffffffffff", status=404, says="no instance 'ffffffffffffffff'"),
    req("POST", "/api/instances/ffffffffffffffff/retry", {}, status=404, says="no instance 'ffffffffffffffff'"),
    req("GET", "/api/definitions/no-such-workflow", status=404, says="no-such-workflow"),
]


def request(port: int, case: Request, waiting: str) -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own: status, headers (lower-case names) and body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if case.body is not None else {}
        headers.update(dict(case.headers))
        data = None
        if case.body is not None:
            data = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
        connection.request(case.method, case.path.replace(WAITING, waiting), body=data, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def raw_request(port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


class HttpCases(ClusterTestCase):
    """One ``serve --http 127.0.0.1:0`` node for every HTTP case; rows compared around each one."""

    home: ClassVar[str]
    node_db: ClassVar[str]
    process: ClassVar[subprocess.Popen]
    port: ClassVar[int]
    waiting: ClassVar[str]

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.home = tempfile.mkdtemp(prefix="nodeflow-bad-http-")
        cls.addClassCleanup(shutil.rmtree, cls.home, True)
        cls.node_db = copy_template(cls.home)
        with nodeflow.connect(cls.node_db) as nf:
            cls.waiting = nf.start("approval", {"order": 7})
            nf.unschedule("nightly")  # a cron timer would fire (and write) at 03:00
        log_path = os.path.join(cls.home, "node.log")
        with open(log_path, "w") as log:
            cls.process = subprocess.Popen(
                [PYTHON, NODEFLOW, "--db", cls.node_db, "serve", "--node-id", "n1", "--http", "127.0.0.1:0"],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=cls.home,
                env=child_env(),
            )
        cls.addClassCleanup(cls.stop)
        deadline = time.monotonic() + 20
        while True:
            with open(log_path) as log:
                text = log.read()
            found = URL_LINE.search(text)
            if found and " running workflows " in text:
                cls.port = int(found[1])
                break
            if cls.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the node did not start serving HTTP:\n{text}")
            time.sleep(0.02)
        # Until the node has run both instances as far as they go: then nothing writes on its own.
        deadline = time.monotonic() + 20
        while True:
            rows = table_rows(cls.node_db, ("instances", "messages"))
            statuses = {row[0]: row[3] for row in rows["instances"]}
            queued = [row for row in rows["messages"] if row[1] == nodeflow.WORKFLOW_QUEUE]
            if statuses.get(cls.waiting) == "waiting" and statuses.get(TEMPLATE_INSTANCE) == "completed" and not queued:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the instances did not settle: {statuses}, {queued}")
            time.sleep(0.02)

    @classmethod
    def stop(cls) -> None:
        if cls.process.poll() is None:
            cls.process.kill()
        cls.process.wait(timeout=10)

    def rows(self) -> dict[str, list[tuple]]:
        return table_rows(self.node_db, WATCHED_TABLES)

    def assert_refused(self, case: Request, problems: bool = False) -> None:
        before = self.rows()
        status, headers, body = request(self.port, case, self.waiting)
        what = f"{case.method} {case.path}"
        self.assertEqual(status, case.status, f"{what}: {body[:300]!r}")
        self.assertEqual(headers.get("content-type"), "application/json", what)
        answer = json.loads(body)
        self.assertIsInstance(answer, dict, what)
        self.assertIsInstance(answer.get("error"), str, f"{what}: {answer}")
        if problems:
            self.assertIsInstance(answer.get("problems"), list, f"{what}: {answer}")
            self.assertIn(case.says, "\n".join(answer["problems"]), what)
        else:
            self.assertIn(case.says, answer["error"], what)
        self.assertNotIn("internal error", answer["error"], what)
        self.assertEqual(self.rows(), before, f"{what}: the database changed")

    def check_route(self, route: str) -> None:
        for case in HTTP_CASES[route]:
            with self.subTest(method=case.method, path=case.path[:80], body=repr(case.body)[:80]):
                self.assert_refused(case)

    def test_the_page(self) -> None:
        self.check_route("/")

    def test_metrics(self) -> None:
        self.check_route("/metrics")

    def test_status(self) -> None:
        self.check_route("/api/status")

    def test_definitions(self) -> None:
        self.check_route("/api/definitions")

    def test_one_definition(self) -> None:
        self.check_route("/api/definitions/ID")

    def test_instances(self) -> None:
        self.check_route("/api/instances")

    def test_one_instance(self) -> None:
        self.check_route("/api/instances/ID")

    def test_retry(self) -> None:
        self.check_route("/api/instances/ID/retry")

    def test_cancel(self) -> None:
        self.check_route("/api/instances/ID/cancel")

    def test_signals(self) -> None:
        self.check_route("/api/signals/NAME")

    def test_unknown_routes(self) -> None:
        self.check_route("unknown routes")

    def test_malformed_requests(self) -> None:
        for name, (data, status, says) in RAW_CASES.items():
            with self.subTest(name):
                before = self.rows()
                raw = raw_request(self.port, data)
                head, _, body = raw.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 %d " % status), f"{name}: {raw[:300]!r}")
                self.assertIn(b"\r\ncontent-type: application/json", head.lower(), name)
                self.assertIn(says, json.loads(body)["error"], name)
                self.assertEqual(self.rows(), before, f"{name}: the database changed")

    def test_definitions_through_post(self) -> None:
        for name, case in DEFINITION_CASES.items():
            with self.subTest(name):
                body = case.text if isinstance(case.text, bytes) else case.text.encode()
                whole = name not in ("not JSON", "not UTF-8", "nested too deeply", "not an object")
                # Bodies that are no JSON object are refused before the definition is checked: "error" only.
                says = {
                    "not JSON": "the body is not JSON",
                    "not UTF-8": "the body is not JSON",
                    "nested too deeply": "the body is not JSON",
                    "not an object": "send a JSON object: a workflow definition",
                }.get(name, case.says)
                self.assert_refused(Request("POST", "/api/definitions", body, 400, says), problems=whole)

    def test_wrong_methods_on_the_page_and_metrics_are_405(self) -> None:
        for case in METHOD_CASES:
            with self.subTest(method=case.method, path=case.path):
                self.assert_refused(case)

    def test_an_unknown_id_in_the_path_is_404(self) -> None:
        for case in UNKNOWN_ID_CASES:
            with self.subTest(method=case.method, path=case.path):
                self.assert_refused(case)

    def test_the_node_still_serves(self) -> None:
        self.assertIsNone(self.process.poll())
        status, _, body = request(self.port, Request("GET", "/api/status"), self.waiting)
        self.assertEqual(status, 200, body[:300])
        self.assertEqual(json.loads(body)["node"], "n1")


# The count in the docstring ------------------------------------------------------------------------------

CASE_COUNT = (
    sum(len(cases) for cases in CLI_CASES.values())
    + len(DEFINITION_CASES)
    + sum(len(cases) for cases in HTTP_CASES.values())
    + len(RAW_CASES)
    + len(METHOD_CASES)
    + len(UNKNOWN_ID_CASES)
    + len(DATABASE_CASES)
    + len(LIBRARY_CASES)
)


class Corpus(unittest.TestCase):
    def test_the_docstring_gives_the_number_of_cases(self) -> None:
        self.assertGreaterEqual(CASE_COUNT, 70)
        self.assertIn(f"{CASE_COUNT} inputs in all", __doc__ or "")
