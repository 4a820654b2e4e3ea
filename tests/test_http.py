"""Section 11, HTTP, against real ``serve --http`` processes: every route, refusals, robustness, tokens.

Every node is a real ``python3 nodeflow.py serve --http 127.0.0.1:0 --app app.py`` process whose
log (stderr) goes to a file; port 0 takes a free port, read from the node's log line
"dashboard and API at http://HOST:PORT/". The tests talk to it as any client would: through
http.client, or through a raw socket where a client must misbehave (no Content-Length, a chunked
body, a huge head, silence). A node takes a good part of a second to start, so each class starts
its node once (setUpClass) and its tests share it; they use their own definitions, instances and
signal names, so they do not depend on one another's order.

Covered:

- Every route with a good request: ``/api/status`` (the object ``status --json`` prints, plus
  "node"), ``/api/nodes``, ``/api/queues``, ``/api/locks``, ``/api/timers``, ``/api/journal``,
  definitions (POST: 201 and ``changed`` true, again: 200 and false; GET one: the stored JSON),
  instances (POST, GET with ?status ?definition ?limit, GET one with variables and journal,
  retry of a faulted one), signals (a waiting instance resumed), ``/`` (HTML) and ``/metrics``
  (the Prometheus text format 0.0.4, checked line by line; counters that moved after work; the
  instances gauge equal to the API's count). Where a CLI command prints the same object
  (``show --json``, ``instances --json``, ``definitions --json``), the API's answer is equal to it.
- Refused requests: each with its status code and a JSON ``{"error": ...}`` body, and nothing
  written (every table but the node's heartbeat compared, read-only, before and after).
- Robustness: a silent client does not stall the others and is cut off (408) after the read
  timeout; a head over 16 KiB gets 431; keep-alive and pipelining; 50 concurrent requests.
- Tokens: ``--http 0.0.0.0:0`` without a token refuses to start (exit 2, one line, nothing
  created); with ``--http-token`` the API and /metrics want ``Authorization: Bearer``, the page
  does not; ``NODEFLOW_HTTP_TOKEN`` does the same and also allows binding beyond loopback.
- SIGTERM with a kept-alive connection open: the node stops cleanly (exit 0, "stopped").

Some tests here expose bugs (named in their docstrings) and fail until they are fixed.
"""

from __future__ import annotations

import datetime
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import nodeflow
from tests.support import NODEFLOW, PYTHON, ClusterTestCase, LoggedProcess, table_rows

# The nodes' --app: "flaky" fails the first time it runs for a key, and succeeds after (a retry).
APP = """
import nodeflow

tries = {}

@nodeflow.activity("flaky")
def flaky(variables):
    key = variables["input"]["key"]
    tries[key] = tries.get(key, 0) + 1
    if tries[key] == 1:
        raise RuntimeError("the first try for %s fails" % key)
    return {"tries": tries[key]}
"""

GREET = {
    "id": "greet",
    "name": "Greeting",
    "start": "hello",
    "activities": {
        "hello": {"type": "log", "message": "hello {input.name}", "next": "note"},
        "note": {"type": "set", "values": {"greeted": "{input.name}"}},
    },
}
APPROVAL = {
    "id": "approval",
    "start": "ask",
    "activities": {
        "ask": {"type": "signal", "name": "approve-{input.order}", "next": "done"},
        "done": {"type": "log", "message": "approved by {ask.by}"},
    },
}
FLAKY = {
    "id": "flaky",
    "start": "charge",
    "activities": {"charge": {"type": "call", "function": "flaky", "retry": {"attempts": 1}}},
}

URL_LINE = re.compile(r"dashboard and API at http://(\[[^\]]+\]|[^:/]+):(\d+)/")
READY = re.compile(r" running workflows ")
# Every table a request could write to; "nodes" (heartbeats), "election" and "instruction_cursors"
# change on their own while a node runs.
WATCHED_TABLES = (
    "definitions", "instances", "journal", "messages", "dead_letters", "instructions", "timers",
    "signal_triggers", "lock_fences", "meta",
)  # fmt: skip
INSTANCE_KEYS = {"id", "definition", "version", "status"}
JOURNAL_KEYS = {"activity", "node", "fence", "started", "ended", "outcome"}


# A node, and talking to it ---------------------------------------------------------------------


class HttpNode(LoggedProcess):
    """One ``serve --http`` process, the file its log goes to, and the port it took."""

    def __init__(self, process: subprocess.Popen[str], node_id: str, log_path: str) -> None:
        super().__init__(process, log_path)
        self.node_id = node_id
        self.host, self.port = "", 0

    def tail(self, lines: int = 30) -> str:
        try:
            found = self.text().splitlines()
        except FileNotFoundError:
            found = ["(log gone)"]
        state = "running" if self.process.poll() is None else f"exited {self.process.returncode}"
        return "\n".join([f"--- {self.node_id} (pid {self.pid}, {state}): last {lines} lines", *found[-lines:]])


def start_node(folder: str, db: str, node_id: str, *options: str, env: dict[str, str] | None = None) -> HttpNode:
    """Start ``serve --http 127.0.0.1:0`` (or the --http in ``options``); returns once it serves and runs workflows."""
    app = os.path.join(folder, "app.py")
    if not os.path.exists(app):
        with open(app, "w") as f:
            f.write(APP)
    if "--http" not in options:
        options = ("--http", "127.0.0.1:0", *options)
    log_path = os.path.join(folder, f"serve-{node_id}.log")
    command = [PYTHON, NODEFLOW, "--db", db, "serve", "--node-id", node_id, "--app", app, *options]
    with open(log_path, "w") as log:  # the child has its own copy of the descriptor
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=log, cwd=folder, text=True, env=env or child_env()
        )
    node = HttpNode(process, node_id, log_path)
    deadline = time.monotonic() + 20
    while True:
        text = node.text()
        found = URL_LINE.search(text)
        if found and READY.search(text):
            node.host, node.port = found[1].strip("[]"), int(found[2])
            return node
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait(timeout=10)
            raise AssertionError(f"node {node_id} did not start serving HTTP:\n{node.tail()}")
        time.sleep(0.01)


def stop_node(node: HttpNode) -> None:
    if node.process.poll() is None:
        node.process.kill()
    node.process.wait(timeout=10)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a node: this one, without a token unless one is given here."""
    env = {key: value for key, value in os.environ.items() if key != "NODEFLOW_HTTP_TOKEN"}
    return {**env, **extra}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    token: str | None = None,
    timeout: float = 10,
) -> Answer:
    """One request on a connection of its own; ``body`` is JSON data, or bytes sent as they are."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        sent = dict(headers or {})
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        if body is not None or method == "POST":  # every POST says it is JSON, an empty one too
            sent.setdefault("Content-Type", "application/json")
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def exchange(port: int, data: bytes, timeout: float = 5) -> tuple[bytes, str]:
    """Send raw bytes, read until the server closes; the bytes read and how it ended (eof, timeout, reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_to_end(sock, timeout)


def read_to_end(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), "timeout"
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return b"".join(chunks), "timeout"
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        if not data:
            return b"".join(chunks), "eof"
        chunks.append(data)


def parse_answers(raw: bytes) -> list[Answer]:
    """The responses in ``raw``, one after another (each with a Content-Length, as this server sends)."""
    answers = []
    while raw:
        head, separator, rest = raw.partition(b"\r\n\r\n")
        if not separator:
            raise AssertionError(f"an incomplete response head: {raw[:300]!r}")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, _ = status_line.split(" ", 2)
        if version != "HTTP/1.1":
            raise AssertionError(f"not an HTTP/1.1 status line: {status_line!r}")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        if len(rest) < length:
            raise AssertionError(f"a body shorter than its Content-Length {length}: {rest[:300]!r}")
        answers.append(Answer(int(status), headers, rest[:length]))
        raw = rest[length:]
    return answers


# The Prometheus text format 0.0.4 ----------------------------------------------------------------

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(rf"^({METRIC_NAME})(?:\{{((?:{LABEL})(?:,{LABEL})*,?)?\}})? (\S+)(?: -?\d+)?$")
KINDS = ("counter", "gauge", "summary", "histogram", "untyped")


@dataclass
class Family:
    kind: str
    help: str
    samples: list[tuple[str, dict[str, str], float]]  # (sample name, labels, value)


def parse_metrics(test: unittest.TestCase, text: str) -> dict[str, Family]:
    """Families by name; fails ``test`` on any line the format does not allow or the contract forbids:
    every family has one ``# HELP nodeflow_...`` and then one ``# TYPE`` before its samples, and its
    samples follow them together; every value is a float."""
    test.assertTrue(text.endswith("\n"), "the text ends with a line feed")
    families: dict[str, Family] = {}
    current: str | None = None
    helped: dict[str, str] = {}
    for number, line in enumerate(text.split("\n")[:-1], 1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP ") :].partition(" ")
            test.assertRegex(name, r"^nodeflow_[a-z0-9_]+$", where)
            test.assertNotIn(name, helped, f"a second HELP; {where}")
            test.assertTrue(help_text.strip(), f"a HELP with no text; {where}")
            helped[name] = help_text
            current = None
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE ") :].partition(" ")
            test.assertIn(name, helped, f"TYPE before (or without) its HELP; {where}")
            test.assertNotIn(name, families, f"a second TYPE; {where}")
            test.assertIn(kind, KINDS, where)
            families[name] = Family(kind, helped[name], [])
            current = name
        elif line.startswith("#") or not line.strip():
            continue  # a comment, or an empty line: both allowed
        else:
            found = SAMPLE.match(line)
            test.assertIsNotNone(found, f"not a sample line; {where}")
            assert found is not None
            name, label_text, value_text = found[1], found[2] or "", found[3]
            test.assertTrue(name.startswith("nodeflow_"), where)
            family = name
            if current is not None and families[current].kind in ("summary", "histogram"):
                for suffix in ("_sum", "_count", "_bucket"):
                    if name == current + suffix:
                        family = current
            test.assertEqual(family, current, f"a sample outside its family's HELP and TYPE; {where}")
            try:
                value = float(value_text)
            except ValueError:
                test.fail(f"the value is not a float; {where}")
            labels = {
                key: raw.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
                for key, raw in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', label_text)
            }
            families[family].samples.append((name, labels, value))
    test.assertEqual(set(helped), set(families), "every HELP has its TYPE")
    return families


def sample(families: dict[str, Family], name: str, **labels: str) -> float:
    """The value of the one sample of ``name`` whose labels include ``labels``."""
    found = [
        value
        for family in families.values()
        for sample_name, have, value in family.samples
        if sample_name == name and labels.items() <= have.items()
    ]
    if len(found) != 1:
        raise AssertionError(f"{len(found)} samples {name}{labels}; expected one")
    return found[0]


# The base: one node per class ---------------------------------------------------------------------


class HttpTestCase(ClusterTestCase):
    """ClusterTestCase plus one ``serve --http`` node for the whole class, with a passing handle ``nf``."""

    NODE_OPTIONS: ClassVar[tuple[str, ...]] = ()
    home: ClassVar[str]
    node_db: ClassVar[str]
    node: ClassVar[HttpNode]
    port: ClassVar[int]
    nf: ClassVar[nodeflow.Cluster]
    token: ClassVar[str | None] = None

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.home = tempfile.mkdtemp(prefix="nodeflow-http-")
        cls.addClassCleanup(shutil.rmtree, cls.home, True)
        cls.node_db = os.path.join(cls.home, "cluster.db")
        cls.node = start_node(cls.home, cls.node_db, "n1", *cls.NODE_OPTIONS)
        cls.addClassCleanup(stop_node, cls.node)
        cls.port = cls.node.port
        cls.nf = nodeflow.connect(cls.node_db)
        cls.addClassCleanup(cls.nf.close)

    def run(self, result: unittest.TestResult | None = None) -> unittest.TestResult | None:
        """On a failure or an error, print the end of the node's log."""
        result = super().run(result)
        if result is not None and any(case is self for case, _ in [*result.failures, *result.errors]):
            node = getattr(type(self), "node", None)
            if node is not None:
                print(f"\n{self.id()} failed; the node's log:\n{node.tail()}", file=sys.stderr, flush=True)
        return result

    def call(self, method: str, path: str, body: Any = None, **options: Any) -> Answer:
        options.setdefault("token", self.token)
        return call(self.port, method, path, body, **options)

    def get(self, path: str, status: int = 200) -> Any:
        """GET ``path``, expecting ``status`` and a JSON answer; the answer's data."""
        answer = self.call("GET", path)
        self.assertEqual(answer.status, status, f"GET {path}: {answer.body[:500]!r}")
        self.assertEqual(answer.headers["content-type"], "application/json")
        return answer.json()

    def post(self, path: str, body: Any, status: int) -> Any:
        answer = self.call("POST", path, body)
        self.assertEqual(answer.status, status, f"POST {path} {body!r}: {answer.body[:500]!r}")
        self.assertEqual(answer.headers["content-type"], "application/json")
        return answer.json()

    def assert_error(self, answer: Answer, status: int, what: str, mentions: str | None = None) -> dict[str, Any]:
        """``answer`` is ``status`` with a JSON body {"error": text}; returns the body."""
        self.assertEqual(answer.status, status, f"{what}: {answer.body[:500]!r}")
        self.assertEqual(answer.headers.get("content-type"), "application/json", what)
        data = answer.json()
        self.assertIsInstance(data, dict, what)
        self.assertIsInstance(data.get("error"), str, f"{what}: {data}")
        self.assertTrue(data["error"], what)
        if mentions is not None:
            self.assertIn(mentions.lower(), data["error"].lower(), f"{what}: {data}")
        return data

    def node_cli(self, *args: str) -> subprocess.CompletedProcess:
        """Run ``nodeflow.py --db (the node's database) ARGS...``."""
        return subprocess.run(
            [PYTHON, NODEFLOW, "--db", self.node_db, *args], capture_output=True, text=True, timeout=60, cwd=self.home
        )

    def cli_json(self, *args: str) -> Any:
        done = self.node_cli(*args)
        self.assertEqual(done.returncode, 0, done.stderr)
        return json.loads(done.stdout)

    def wait_for_instance(self, instance_id: str, *statuses: str, timeout: float = 15) -> dict[str, Any]:
        """GET /api/instances/ID until its status is one of ``statuses``; the last answer."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.get(f"/api/instances/{instance_id}")
            if found["status"] in statuses:
                return found
            if time.monotonic() > deadline:
                self.fail(f"instance {instance_id} is not {' or '.join(statuses)} within {timeout}s: {found}")
            time.sleep(0.02)

    def settle(self) -> None:
        """Until no instance is running and the workflow queue is empty: nothing writes on its own."""

        def settled() -> bool:
            depth = self.nf.queues().get(nodeflow.WORKFLOW_QUEUE, {})
            busy = any(depth.get(kind) for kind in ("ready", "leased", "delayed"))
            return not busy and not self.nf.instances(status="running")

        self.wait_until(settled, 15, "every instance settled")


# 1 to 3. Every route, refused requests, robustness --------------------------------------------------


class HttpApi(HttpTestCase):
    silent: ClassVar[socket.socket]
    halting: ClassVar[socket.socket]
    silent_since: ClassVar[float]

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        for definition in (GREET, APPROVAL, FLAKY):
            cls.nf.define(definition)
        # A client that connects and says nothing, and one that stops halfway through its head,
        # from the start: test_the_silent_clients_... (last in name order) checks that they were
        # cut off, having waited only what the class's other tests did not take.
        cls.silent = socket.create_connection(("127.0.0.1", cls.port))
        cls.addClassCleanup(cls.silent.close)
        cls.halting = socket.create_connection(("127.0.0.1", cls.port))
        cls.addClassCleanup(cls.halting.close)
        cls.halting.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        cls.silent_since = time.monotonic()

    def start(self, definition: str, data: dict[str, Any]) -> str:
        created = self.post("/api/instances", {"definition": definition, "input": data}, 201)
        self.assertRegex(created["id"], r"^[0-9a-f]{16}$")
        self.assertEqual(created["definition"], definition)
        return str(created["id"])

    # Good requests --------------------------------------------------------------------------

    def test_status_is_the_status_json_object_plus_the_node(self) -> None:
        answer = self.get("/api/status")
        printed = self.cli_json("status", "--json")
        self.assertEqual(set(answer), set(printed) | {"node"})
        self.assertEqual(answer["node"], "n1")
        self.assertEqual(answer["path"], printed["path"])
        self.assertEqual(answer["scheduler"], printed["scheduler"])
        self.assertEqual(answer["scheduler"]["node"], "n1")
        [me] = [node for node in answer["nodes"] if node["id"] == "n1"]
        self.assertLessEqual({"id", "pid", "role", "state", "heartbeat_age"}, set(me))
        self.assertEqual((me["pid"], me["state"], me["role"]), (self.node.pid, "running", "auto"))
        self.assertEqual(set(answer["instances"]), {"running", "waiting", "completed", "faulted", "cancelled"})

    def test_nodes_queues_locks_and_timers(self) -> None:
        nodes = self.get("/api/nodes")["nodes"]
        [me] = [node for node in nodes if node["id"] == "n1"]
        self.assertEqual((me["pid"], me["state"]), (self.node.pid, "running"))

        # A message on a queue no node consumes stays there: the API counts it.
        self.nf.send("http-views", {"n": 1})
        queues = self.get("/api/queues")["queues"]
        self.assertEqual(queues["http-views"], {"ready": 1, "leased": 0, "delayed": 0, "dead": 0})
        self.assertEqual(self.get("/api/status")["queues"]["http-views"], queues["http-views"])

        # A lock this test process holds, with its fence, and gone once released.
        with self.nf.lock("http-views-lock") as held:
            locks = self.get("/api/locks")["locks"]
            [lock] = [lock for lock in locks if lock["name"] == "http-views-lock"]
            self.assertEqual((lock["fence"], lock["pid"]), (held.fence, os.getpid()))
            self.assertIn("holder", lock)
        self.assertNotIn("http-views-lock", [lock["name"] for lock in self.get("/api/locks")["locks"]])

        # Timers, the next due first; ?limit= keeps the first N.
        self.nf.schedule("http-timer-b", "http-views", {"t": "b"}, after="2h")
        self.nf.schedule("http-timer-a", "http-views", {"t": "a"}, cron="0 0 1 1 *", tz="UTC")
        try:
            timers = self.get("/api/timers")["timers"]
            ours = [timer for timer in timers if timer["name"].startswith("http-timer-")]
            listed = {timer["name"]: timer for timer in ours}
            self.assertEqual(listed["http-timer-b"]["queue"], "http-views")
            self.assertEqual((listed["http-timer-b"]["cron"], listed["http-timer-b"]["tz"]), (None, None))
            self.assertEqual((listed["http-timer-a"]["cron"], listed["http-timer-a"]["tz"]), ("0 0 1 1 *", "UTC"))
            self.assertEqual([timer["name"] for timer in ours], ["http-timer-b", "http-timer-a"], "next due first")
            for timer in ours:
                self.assertRegex(timer["next"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")
            self.assertEqual(len(self.get("/api/timers?limit=1")["timers"]), 1)
        finally:
            self.nf.unschedule("http-timer-a")
            self.nf.unschedule("http-timer-b")

    def test_definitions_defined_listed_read_and_defined_again(self) -> None:
        first = {
            "id": "http-def",
            "name": "Defined over HTTP",
            "start": "only",
            "activities": {"only": {"type": "log", "message": "v1"}},
        }
        made = self.post("/api/definitions", first, 201)
        self.assertEqual(
            (made["id"], made["name"], made["version"], made["activities"], made["changed"]),
            ("http-def", "Defined over HTTP", 1, 1, True),
        )
        again = self.post("/api/definitions", first, 200)
        self.assertEqual((again["version"], again["changed"]), (1, False))
        second = {**first, "activities": {"only": {"type": "log", "message": "v2"}}}
        self.assertEqual(self.post("/api/definitions", second, 201)["version"], 2)

        listed = self.get("/api/definitions")
        self.assertEqual(listed, self.cli_json("definitions", "--json"))
        [entry] = [entry for entry in listed["definitions"] if entry["id"] == "http-def"]
        self.assertEqual((entry["version"], entry["name"]), (2, "Defined over HTTP"))
        self.assertEqual(self.get("/api/definitions/http-def"), second)
        self.assertEqual(self.get("/api/definitions/http-def?version=1"), first)
        self.assertEqual(self.get("/api/definitions/greet"), GREET)

    def test_instances_started_shown_listed_and_filtered(self) -> None:
        instance = self.start("greet", {"name": "ada"})
        shown = self.wait_for_instance(instance, "completed")
        self.assertEqual(shown["variables"], {"input": {"name": "ada"}, "greeted": "ada"})
        self.assertEqual([entry["activity"] for entry in shown["journal"]], ["hello", "note"])
        self.assertEqual(shown["journal"][0]["outcome"], "hello ada")
        for entry in shown["journal"]:
            self.assertLessEqual(JOURNAL_KEYS, set(entry))
            self.assertEqual(entry["node"], "n1")
            self.assertIsInstance(entry["fence"], int)
        self.assertEqual(shown, self.cli_json("show", instance, "--json"), "the API's instance is show --json's")

        greeted = [instance] + [self.start("greet", {"name": f"guest {n}"}) for n in range(3)]
        waiting = self.start("approval", {"order": "list-1"})
        self.wait_for_instance(waiting, "waiting")
        for other in greeted:
            self.wait_for_instance(other, "completed")
        self.settle()

        every = self.get("/api/instances")["instances"]
        for entry in every:
            self.assertLessEqual(INSTANCE_KEYS, set(entry))
        self.assertEqual(self.get("/api/instances"), self.cli_json("instances", "--json"))
        by_definition = [entry["id"] for entry in self.get("/api/instances?definition=greet")["instances"]]
        self.assertLessEqual(set(greeted), set(by_definition))
        self.assertNotIn(waiting, by_definition)
        self.assertEqual(by_definition[-4:], greeted, "oldest first")
        newest = self.get("/api/instances?definition=greet&limit=2")["instances"]
        self.assertEqual([entry["id"] for entry in newest], greeted[-2:], "the newest two, oldest first")
        waiters = self.get("/api/instances?status=waiting&definition=approval")["instances"]
        self.assertIn(waiting, [entry["id"] for entry in waiters])
        self.assertEqual({entry["status"] for entry in waiters}, {"waiting"})
        self.assertNotIn(waiting, [e["id"] for e in self.get("/api/instances?status=completed")["instances"]])
        self.post("/api/signals/approve-list-1", {"input": {"by": "test"}}, 200)  # let it end

    def test_journal_lists_the_latest_steps_newest_first(self) -> None:
        instance = self.start("greet", {"name": "journal"})
        self.wait_for_instance(instance, "completed")
        self.settle()
        steps = self.get("/api/journal?limit=2")["journal"]
        self.assertEqual(sorted((step["instance"], step["activity"]) for step in steps),
                         [(instance, "hello"), (instance, "note")])  # fmt: skip
        self.assertEqual([step["ended"] for step in steps], sorted((step["ended"] for step in steps), reverse=True))
        for step in steps:
            self.assertLessEqual(JOURNAL_KEYS | {"instance", "definition", "step", "type"}, set(step))
            self.assertEqual((step["definition"], step["node"]), ("greet", "n1"))
        self.assertLessEqual(len(self.get("/api/journal")["journal"]), 20)

    def test_a_signal_resumes_the_instance_waiting_for_it(self) -> None:
        instance = self.start("approval", {"order": "sig-7"})
        waiting = self.wait_for_instance(instance, "waiting")
        self.assertEqual(waiting["waiting_for"], "approve-sig-7")
        outcome = self.post("/api/signals/approve-sig-7", {"input": {"by": "ann"}}, 200)
        self.assertEqual(outcome, {"resumed": [instance], "started": [], "kept": False, "kept_until": None})
        done = self.wait_for_instance(instance, "completed")
        self.assertEqual(done["variables"]["ask"], {"by": "ann"})
        self.assertEqual(done["journal"][-1]["outcome"], "approved by ann")
        dropped = self.post("/api/signals/approve-sig-7", {"input": {}, "ttl": 0}, 200)
        self.assertEqual(dropped, {"resumed": [], "started": [], "kept": False, "kept_until": None})
        kept = self.post("/api/signals/approve-sig-7", {}, 200)
        self.assertEqual((kept["resumed"], kept["kept"]), ([], True), "input may be left out; kept for an hour")
        kept_until = datetime.datetime.fromisoformat(kept["kept_until"]).timestamp()
        self.assertAlmostEqual(kept_until - time.time(), 3600, delta=60)
        self.assertEqual(self.get("/api/status")["kept_signals"]["count"], 1)
        self.post("/api/signals/approve-sig-7", {"ttl": "soon"}, 400)

    def test_retry_resumes_a_faulted_instance(self) -> None:
        instance = self.start("flaky", {"key": "retry-1"})
        faulted = self.wait_for_instance(instance, "faulted")
        self.assertIn("the first try for retry-1 fails", faulted["error"])
        retried = self.post(f"/api/instances/{instance}/retry", None, 200)
        self.assertEqual((retried["id"], retried["status"]), (instance, "running"))
        done = self.wait_for_instance(instance, "completed")
        self.assertEqual(done["variables"]["charge"], {"tries": 2})
        # A completed instance cannot be retried: 400, and nothing written.
        self.settle()
        before = table_rows(self.node_db, WATCHED_TABLES)
        self.assert_error(self.call("POST", f"/api/instances/{instance}/retry"), 400, "retry a completed instance")
        self.assertEqual(table_rows(self.node_db, WATCHED_TABLES), before)

    def test_the_page_is_html(self) -> None:
        answer = self.call("GET", "/")
        self.assertEqual(answer.status, 200)
        self.assertRegex(answer.headers["content-type"], r"^text/html(;|$)")
        self.assertTrue(answer.body.lstrip().lower().startswith(b"<!doctype html"), answer.body[:100])

    def test_metrics_in_the_prometheus_text_format_count_the_work_done(self) -> None:
        ids = [self.start("greet", {"name": f"metric {n}"}) for n in range(5)]
        for instance in ids:
            self.wait_for_instance(instance, "completed")
        self.settle()
        self.assertEqual(self.call("GET", "/api/no-such-route").status, 404)  # counted as an error below
        answer = self.call("GET", "/metrics")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.headers["content-type"].replace(" ", ""), "text/plain;version=0.0.4;charset=utf-8")
        families = parse_metrics(self, answer.body.decode("utf-8"))
        completed = len(self.get("/api/instances?status=completed")["instances"])

        self.assertEqual(sample(families, "nodeflow_up", node="n1"), 1)
        self.assertEqual(sample(families, "nodeflow_is_scheduler", node="n1"), 1)
        self.assertGreaterEqual(sample(families, "nodeflow_nodes", state="running"), 1)
        self.assertGreaterEqual(sample(families, "nodeflow_scheduler_epoch"), 1)
        for counter in (
            "nodeflow_workflow_steps_total", "nodeflow_workflow_bursts_total", "nodeflow_messages_acked_total",
            "nodeflow_lock_acquisitions_total", "nodeflow_http_requests_total", "nodeflow_http_errors_total",
        ):  # fmt: skip
            self.assertGreater(sample(families, counter, node="n1"), 0, counter)
        self.assertGreaterEqual(sample(families, "nodeflow_workflow_steps_total", node="n1"), 2 * len(ids))
        self.assertEqual(sample(families, "nodeflow_instances", status="completed"), completed)
        self.assertGreaterEqual(completed, len(ids))
        for kind in families.values():
            if kind.kind == "counter":
                for name, _, value in kind.samples:
                    self.assertGreaterEqual(value, 0, name)
            for name, _, value in kind.samples:
                self.assertFalse(math.isnan(value), name)

    # Refused requests ---------------------------------------------------------------------------

    def test_bad_requests_get_their_status_and_a_json_error_and_write_nothing(self) -> None:
        self.settle()
        before = table_rows(self.node_db, WATCHED_TABLES)
        bad_definition = {
            "id": "http-bad",
            "start": "nowhere",
            "version": 3,
            "activities": {"a": {"type": "teleport"}},
        }
        cases: list[tuple[str, str, Any, int, str | None]] = [
            # (method, path, body, status, a word the error mentions)
            ("POST", "/api/definitions", b'{"id": "x",', 400, "JSON"),
            ("POST", "/api/instances", b"\xff\xfe not utf-8", 400, "JSON"),
            ("POST", "/api/definitions", [1, 2], 400, "object"),
            ("POST", "/api/instances", [], 400, None),
            ("POST", "/api/signals/go", "text", 400, None),
            ("POST", "/api/instances", {"definition": 5}, 400, "definition"),
            ("POST", "/api/instances", {"definition": "greet", "input": {}, "extra": 1}, 400, "extra"),
            ("POST", "/api/instances", {"input": {}}, 400, "definition"),
            ("POST", "/api/signals/go", {"input": {}, "extra": 1}, 400, None),
            ("POST", "/api/instances", {"definition": "no-such-workflow"}, 400, "no-such-workflow"),
            ("POST", "/api/instances", {"definition": "bad id!"}, 400, None),
            ("POST", "/api/instances", {"definition": "greet", "input": [1]}, 400, "object"),
            ("POST", "/api/instances", {"definition": "greet", "input": "ada"}, 400, "object"),
            ("POST", "/api/instances", b'{"definition": "greet", "input": {"x": NaN}}', 400, None),
            ("POST", "/api/signals/go", {"input": 5}, 400, "object"),
            ("POST", "/api/definitions", {}, 400, None),
            ("GET", "/api/instances/ffffffffffffffff", None, 404, "no instance"),
            ("POST", "/api/instances/ffffffffffffffff/retry", None, 404, "no instance"),
            ("GET", "/api/definitions/no-such-workflow", None, 404, "no-such-workflow"),
            ("GET", "/api/instances?limit=abc", None, 400, "limit"),
            ("GET", "/api/instances?limit=0", None, 400, "limit"),
            ("GET", "/api/instances?limit=-1", None, 400, "limit"),
            ("GET", "/api/instances?limit=", None, 400, "limit"),
            ("GET", "/api/journal?limit=abc", None, 400, "limit"),
            ("GET", "/api/timers?limit=1.5", None, 400, "limit"),
            ("GET", "/api/definitions/greet?version=abc", None, 400, "version"),
            ("GET", "/api/definitions/greet?version=99", None, 404, "has no version 99"),
            ("GET", "/api/instances?status=sleeping", None, 400, "status"),
            ("GET", "/api/instances?definition=bad%20id", None, 400, None),
            ("GET", "/api/nope", None, 404, None),
            ("GET", "/nope", None, 404, None),
            ("GET", "/api", None, 404, None),
            ("GET", "/api/", None, 404, None),
            ("GET", "/metrics/more", None, 404, None),
            ("GET", "/api/instances/a/b/c", None, 404, None),
            ("POST", "/api/instances/ffffffffffffffff/cancel", None, 404, None),
            ("GET", "/api/signals", None, 404, None),
            ("DELETE", "/api/status", None, 405, "GET"),
            ("POST", "/api/status", None, 405, "GET"),
            ("PUT", "/api/definitions", None, 405, None),
            ("GET", "/api/signals/go", None, 405, "POST"),
            ("GET", "/api/instances/ffffffffffffffff/retry", None, 405, "POST"),
            ("POST", "/api/definitions/greet", None, 405, None),
            ("POST", "/metrics", None, 405, "takes GET"),
        ]
        for method, path, body, status, mentions in cases:
            with self.subTest(method=method, path=path, body=body):
                self.assert_error(self.call(method, path, body), status, f"{method} {path} {body!r}", mentions)

        with self.subTest("a bad definition: every problem listed"):
            data = self.assert_error(self.call("POST", "/api/definitions", bad_definition), 400, "bad definition")
            problems = data.get("problems")
            self.assertIsInstance(problems, list, data)
            self.assertEqual(data["error"], problems[0])
            places = sorted(problem.split(":")[0] for problem in problems)
            self.assertEqual(places, ["activities.a.type", "start", "version"], problems)

        with self.subTest("a body that is not JSON by its Content-Type"):
            answer = self.call("POST", "/api/signals/go", b'{"input": {}}', headers={"Content-Type": "text/plain"})
            self.assert_error(answer, 415, "text/plain body")

        raw_cases = [
            (b"POST /api/definitions HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 411, "Content-Length"),
            (b"POST /api/signals/go HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501, "chunked"),
            (b"POST /api/signals/go HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400, "Content-Length"),
            (b"POST /api/signals/go HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "Content-Length"),
            (b"NONSENSE\r\n\r\n", 400, None),
            (b"GET /api/status HTTP/2.0\r\n\r\n", 400, None),
            (b"GET /api/status HTTP/1.1\r\nno colon here\r\n\r\n", 400, "colon"),
            (b"GET /api/st\xe4tus HTTP/1.1\r\n\r\n", 400, None),
        ]
        for data, status, mentions in raw_cases:
            with self.subTest(raw=data):
                raw, ended = exchange(self.port, data)
                self.assertEqual(ended, "eof", f"the server closes after refusing {data!r}")
                [answer] = parse_answers(raw)
                self.assert_error(answer, status, repr(data), mentions)
                self.assertEqual(answer.headers["connection"], "close")

        with self.subTest("a body over 2 MiB: 413 before it is sent"):
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(  # the head and a beginning of the body, far from all of it
                    b"POST /api/definitions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b'Content-Length: %d\r\n\r\n{"id": ' % (2 * 1024 * 1024 + 1)
                )
                began = time.monotonic()
                raw, ended = read_to_end(sock, 5)
                took = time.monotonic() - began
            [answer] = parse_answers(raw)
            self.assert_error(answer, 413, "Content-Length over 2 MiB", "limit")
            self.assertIn(ended, ("eof", "reset"), "the connection is closed")
            self.assertLess(took, 3, "the answer came without waiting for the body")
        with self.subTest("a body of 2 MiB exactly is read (and refused as a bad definition)"):
            body = b'{"id": "big", "pad": "' + b"x" * (2 * 1024 * 1024 - 24) + b'"}'
            self.assertEqual(len(body), 2 * 1024 * 1024)
            self.assert_error(self.call("POST", "/api/definitions", body), 400, "a 2 MiB definition")

        self.assertEqual(table_rows(self.node_db, WATCHED_TABLES), before, "a refused request wrote to the database")
        self.assertIsNone(self.node.process.poll(), "the node still runs")
        self.assertEqual(self.get("/api/status")["node"], "n1", "and still answers")

    def test_a_definition_with_one_activity_id_twice_is_refused_as_define_refuses_it(self) -> None:
        """BUG: POST /api/definitions parses its body with json.loads, which keeps the last of two
        equal keys: a definition with two activities of one id is stored, silently missing one of
        them, where ``define FILE`` (parse_definition) refuses it naming the id."""
        text = (
            b'{"id": "http-twice", "start": "a", "activities": {'
            b'"a": {"type": "log", "message": "one"}, "a": {"type": "log", "message": "two"}}}'
        )
        path = os.path.join(self.dir, "twice.json")
        with open(path, "wb") as f:
            f.write(text)
        refused = self.node_cli("define", path)
        self.assertEqual(refused.returncode, 2, "define refuses it")
        self.assertIn("activities.a: two activities have this id", refused.stderr)
        self.settle()
        before = table_rows(self.node_db, WATCHED_TABLES)
        data = self.assert_error(self.call("POST", "/api/definitions", text), 400, "two activities named a")
        self.assertIn("activities.a: two activities have this id", data.get("problems", []), data)
        self.assertEqual(table_rows(self.node_db, WATCHED_TABLES), before, "nothing stored")

    def test_limit_written_with_a_digit_int_cannot_read_is_400_not_500(self) -> None:
        """BUG: _whole_query checks ``text.isdigit()``, true for "²" (U+00B2), which int() refuses:
        the ValueError escapes as a 500 "internal error" (and a logged traceback) for bad input."""
        for path in (
            "/api/instances?limit=%C2%B2",
            "/api/journal?limit=%C2%B2",
            "/api/definitions/greet?version=%C2%B9",
        ):
            with self.subTest(path=path):
                self.assert_error(self.call("GET", path), 400, path, "whole number")

    def test_conflicting_content_lengths_are_refused(self) -> None:
        """BUG: of two Content-Length headers the last wins, the other is ignored; RFC 9112 (6.3)
        makes differing values an unrecoverable framing error (400): a proxy in front that reads the
        first would see another request boundary (request smuggling)."""
        body = b'{"input": {}}'
        request = (
            b"POST /api/signals/go HTTP/1.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nContent-Length: 0\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        raw, _ = exchange(self.port, request)
        [answer] = parse_answers(raw)
        self.assert_error(answer, 400, "two Content-Lengths", "Content-Length")

    # Robustness ---------------------------------------------------------------------------------

    def test_a_head_over_16_kib_gets_431(self) -> None:
        cases = {
            "one huge header": b"GET /api/status HTTP/1.1\r\nX-Huge: " + b"a" * 20_000 + b"\r\n\r\n",
            "many headers": b"GET /api/status HTTP/1.1\r\n"
            + b"".join(b"X-Header-%d: %s\r\n" % (n, b"b" * 100) for n in range(200))
            + b"\r\n",
            "a huge path": b"GET /api/status?" + b"q" * 20_000 + b" HTTP/1.1\r\n\r\n",
        }
        for what, data in cases.items():
            with self.subTest(what):
                raw, ended = exchange(self.port, data)
                [answer] = parse_answers(raw)
                self.assert_error(answer, 431, what)
                self.assertEqual(ended, "eof")
        # Just under the limit is fine.
        answer = self.call("GET", "/api/status", headers={"X-Big": "c" * 15_000})
        self.assertEqual(answer.status, 200)
        self.assertEqual(self.get("/api/status")["node"], "n1")

    def test_keep_alive_and_pipelined_requests_share_one_connection(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            answers = []
            connection.connect()
            first_socket = connection.sock
            for path in ("/api/status", "/api/definitions", "/metrics"):
                connection.request("GET", path)
                response = connection.getresponse()
                answers.append((response.status, response.getheader("Connection"), response.read()))
                self.assertIs(connection.sock, first_socket, f"{path}: the same connection")
            self.assertEqual([(status, kept) for status, kept, _ in answers], [(200, "keep-alive")] * 3)
        finally:
            connection.close()

        # Two requests in one write; the second asks to close.
        raw, ended = exchange(
            self.port,
            b"GET /api/nodes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"POST /api/signals/pipelined HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 13\r\nConnection: close\r\n\r\n{"input": {}}',
        )
        self.assertEqual(ended, "eof")
        first, second = parse_answers(raw)
        self.assertEqual((first.status, first.headers["connection"]), (200, "keep-alive"))
        self.assertIn("nodes", first.json())
        self.assertEqual((second.status, second.headers["connection"]), (200, "close"))
        self.assertEqual((second.json()["resumed"], second.json()["started"]), ([], []))

    def test_an_http_1_0_request_without_keep_alive_gets_its_connection_closed(self) -> None:
        """BUG: the server keeps every connection alive unless the client sends "Connection:
        close"; an HTTP/1.0 client (no keep-alive unless asked for, RFC 9112 9.3) that reads to
        the end of the connection waits out the 30 s idle timeout after its answer."""
        raw, ended = exchange(self.port, b"GET /api/status HTTP/1.0\r\n\r\n", timeout=3)
        [answer] = parse_answers(raw)
        self.assertEqual(answer.status, 200)
        self.assertEqual(ended, "eof", "the connection closed after the answer")
        self.assertEqual(answer.headers["connection"], "close")

    def test_fifty_concurrent_requests_are_all_answered(self) -> None:
        count = 50
        paths = ["/api/status", "/api/instances", "/api/definitions", "/metrics", "/api/queues", "/"]
        start = threading.Barrier(count)

        def one(n: int) -> tuple[int, int]:
            start.wait(10)
            if n % 5 == 0:
                return n, call(self.port, "POST", f"/api/signals/http-crowd-{n}", {"input": {"n": n}}).status
            return n, call(self.port, "GET", paths[n % len(paths)]).status

        began = time.monotonic()
        with ThreadPoolExecutor(count) as pool:
            answered = dict(pool.map(one, range(count)))
        took = time.monotonic() - began
        self.assertEqual(answered, {n: 200 for n in range(count)})
        self.assertLess(took, 10, "50 requests answered in good time")
        print(f"\n  {count} concurrent requests answered in {took:.2f}s", file=sys.stderr)

    def test_the_silent_clients_are_cut_off_after_the_read_timeout_and_stall_nobody(self) -> None:
        """Runs last in its class (unittest orders tests by name): the silent connections were
        opened in setUpClass, so only what is left of the read timeout is waited here."""
        with socket.create_connection(("127.0.0.1", self.port)):  # one more that says nothing
            began = time.monotonic()
            self.assertEqual(self.get("/api/status")["node"], "n1")
            self.assertEqual(self.call("GET", "/metrics").status, 200)
            self.assertEqual(self.call("GET", "/").status, 200)
            took = time.monotonic() - began
        self.assertLess(took, 1.0, "answered promptly while three clients say nothing")
        for what, sock in (("a silent client", self.silent), ("half a head, then silence", self.halting)):
            with self.subTest(what):
                left = self.silent_since + nodeflow.HTTP_READ_TIMEOUT + 5 - time.monotonic()
                raw, ended = read_to_end(sock, max(left, 0.5))
                waited = time.monotonic() - self.silent_since
                self.assertIn(ended, ("eof", "reset"), f"{what}: not cut off after {waited:.1f}s")
                self.assertGreaterEqual(waited, nodeflow.HTTP_READ_TIMEOUT - 1, f"{what}: cut off too soon")
                if raw:
                    [answer] = parse_answers(raw)
                    self.assert_error(answer, 408, what)
        self.assertEqual(self.get("/api/status")["node"], "n1")

    # 4. Tokens -------------------------------------------------------------------------------------------

    def test_other_sites_can_neither_post_nor_read_without_a_token(self) -> None:
        before = table_rows(self.node_db, WATCHED_TABLES)
        # What a cross-site form can send: no JSON content type, so refused before anything is done.
        for kind in (None, "application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
            with self.subTest(kind=kind):
                headers = {} if kind is None else {"Content-Type": kind}
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                try:
                    connection.request("POST", "/api/signals/approve-1", body=b"", headers=headers)
                    response = connection.getresponse()
                    answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
                finally:
                    connection.close()
                self.assert_error(answer, 415, f"POST as {kind}", "application/json")
        self.assertEqual(table_rows(self.node_db, WATCHED_TABLES), before)
        # A page reached through a DNS name rebound to 127.0.0.1 says so in its Host header.
        for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example"):
            with self.subTest(host=host):
                answer = call(self.port, "GET", "/api/status", headers={"Host": host})
                self.assert_error(answer, 403, f"Host {host}", "Host")
        for host in (f"127.0.0.1:{self.port}", f"localhost:{self.port}", "localhost"):
            with self.subTest(host=host):
                self.assertEqual(call(self.port, "GET", "/api/status", headers={"Host": host}).status, 200)
        page = call(self.port, "GET", "/")
        self.assertEqual(page.headers.get("x-frame-options"), "DENY", "the dashboard must not be framed elsewhere")


class HttpToken(HttpTestCase):
    NODE_OPTIONS = ("--http-token", "s3cret")

    def test_with_a_token_other_host_names_are_served(self) -> None:
        answer = call(self.port, "GET", "/api/status", headers={"Host": "nodes.example:8080"}, token="s3cret")
        self.assertEqual(answer.status, 200, "a token, not the name, protects a node bound beyond loopback")

    def test_the_api_wants_the_bearer_token(self) -> None:
        self.assertIn("(token required)", self.node.text())
        for what, headers in {
            "no Authorization": {},
            "a wrong token": {"Authorization": "Bearer nope"},
            "the token in another scheme": {"Authorization": "Basic s3cret"},
            "the token alone": {"Authorization": "s3cret"},
            "a token that begins the same": {"Authorization": "Bearer s3cret2"},
        }.items():
            with self.subTest(what):
                answer = call(self.port, "GET", "/api/status", headers=headers)
                self.assert_error(answer, 401, what, "token")
        self.assertEqual(call(self.port, "GET", "/api/status", token="s3cret").status, 200)
        answer = call(self.port, "GET", "/api/status", headers={"Authorization": "bearer s3cret"})
        self.assertEqual(answer.status, 200, "the scheme is case-insensitive")
        self.assertEqual(answer.json()["node"], "n1")

    def test_a_refused_write_writes_nothing(self) -> None:
        before = table_rows(self.node_db, WATCHED_TABLES)
        answer = call(self.port, "POST", "/api/definitions", GREET, token="wrong")
        self.assert_error(answer, 401, "define with a wrong token")
        answer = call(self.port, "POST", "/api/signals/go", {"input": {}})
        self.assert_error(answer, 401, "signal without a token")
        self.assertEqual(table_rows(self.node_db, WATCHED_TABLES), before)
        self.assertEqual(call(self.port, "POST", "/api/definitions", GREET, token="s3cret").status, 201)

    def test_the_page_is_served_without_the_token_and_metrics_want_it(self) -> None:
        page = call(self.port, "GET", "/")
        self.assertEqual(page.status, 200)
        self.assertRegex(page.headers["content-type"], r"^text/html")
        self.assert_error(call(self.port, "GET", "/metrics"), 401, "/metrics without a token")
        self.assert_error(call(self.port, "GET", "/metrics", token="nope"), 401, "/metrics with a wrong token")
        metrics = call(self.port, "GET", "/metrics", token="s3cret")
        self.assertEqual(metrics.status, 200)
        parse_metrics(self, metrics.body.decode("utf-8"))

    def test_the_token_from_the_environment_also_allows_binding_beyond_loopback(self) -> None:
        env = child_env(NODEFLOW_HTTP_TOKEN="from-env")
        node = start_node(self.home, self.node_db, "n2", "--http", "0.0.0.0:0", env=env)
        try:
            self.assertEqual(node.host, "0.0.0.0")
            self.assertIn("(token required)", node.text())
            self.assert_error(call(node.port, "GET", "/api/status"), 401, "no token")
            self.assert_error(call(node.port, "GET", "/api/status", token="s3cret"), 401, "n1's token")
            answer = call(node.port, "GET", "/api/status", token="from-env")
            self.assertEqual(answer.status, 200)
            self.assertEqual(answer.json()["node"], "n2")
            node.process.send_signal(signal.SIGTERM)
            self.assertEqual(node.process.wait(timeout=15), 0)
        finally:
            stop_node(node)


class HttpRefusesToStart(ClusterTestCase):
    def serve(self, *options: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, NODEFLOW, "--db", self.db, "serve", "--node-id", "n1", *options],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=self.dir,
            env=env or child_env(),
        )

    def test_beyond_loopback_without_a_token_exits_2_with_one_line_and_creates_nothing(self) -> None:
        for options in (
            ("--http", "0.0.0.0:0"),
            ("--http", "[::]:0"),
            ("--http", "example.com:0"),
            ("--http", "0.0.0.0:0", "--http-token", ""),
        ):
            with self.subTest(options=options):
                done = self.serve(*options)
                self.assertEqual(done.returncode, 2, done.stderr)
                lines = done.stderr.strip().splitlines()
                self.assertEqual(len(lines), 1, done.stderr)
                self.assertTrue(lines[0].startswith("nodeflow: "), lines[0])
                self.assertIn("--http-token", lines[0])
                self.assertFalse(os.path.exists(self.db), "no database created")

    def test_a_bad_address_is_bad_usage(self) -> None:
        for address in ("nonsense", "127.0.0.1:http", "127.0.0.1:70000", "127.0.0.1:-1"):
            with self.subTest(address=address):
                done = self.serve("--http", address)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
                self.assertIn("--http", done.stderr)
                self.assertFalse(os.path.exists(self.db), "no database created")

    def test_a_port_in_use_is_a_one_line_failure_not_a_traceback(self) -> None:
        """BUG: when the --http port cannot be bound (in use, or an address not on this host), the
        OSError from asyncio.start_server escapes main(): a traceback, and a node that had joined,
        taken office and left its row saying "running" (status shows it "dead")."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            done = self.serve("--http", f"127.0.0.1:{port}")
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        last = done.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("nodeflow: "), last)
        self.assertIn(str(port), last)
        if os.path.exists(self.db):
            status = json.loads(
                subprocess.run(
                    [PYTHON, NODEFLOW, "--db", self.db, "status", "--json"], capture_output=True, text=True, timeout=30
                ).stdout
            )
            self.assertNotIn("dead", [node["state"] for node in status["nodes"]], status["nodes"])

    def test_addresses_and_loopback(self) -> None:
        self.assertEqual(nodeflow.parse_http_address("8080"), ("127.0.0.1", 8080))
        self.assertEqual(nodeflow.parse_http_address("127.0.0.1:0"), ("127.0.0.1", 0))
        self.assertEqual(nodeflow.parse_http_address("[::1]:9000"), ("::1", 9000))
        self.assertEqual(nodeflow.parse_http_address("localhost:80"), ("localhost", 80))
        for bad in ("", "host:", "host:port", "1.2.3.4:65536", "1.2.3.4:-1"):
            with self.subTest(bad=bad), self.assertRaises(nodeflow.InvalidInput):
                nodeflow.parse_http_address(bad)
        for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost"):
            self.assertTrue(nodeflow.is_loopback(host), host)
        for host in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.1", "example.com", "localhost.example.com", ""):
            self.assertFalse(nodeflow.is_loopback(host), host)


# 5. Shutdown ------------------------------------------------------------------------------------------


class HttpShutdown(ClusterTestCase):
    def test_sigterm_with_a_kept_alive_connection_open_stops_cleanly(self) -> None:
        node = start_node(self.dir, self.db, "n1")
        self.children.append(node.process)
        connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
        try:
            connection.request("GET", "/api/status")
            response = connection.getresponse()
            self.assertEqual((response.status, response.getheader("Connection")), (200, "keep-alive"))
            response.read()
            kept = connection.sock
            assert kept is not None
            with socket.create_connection(("127.0.0.1", node.port)) as silent:
                began = time.monotonic()
                node.process.send_signal(signal.SIGTERM)
                self.assertEqual(node.process.wait(timeout=15), 0, node.tail())
                took = time.monotonic() - began
                # The server closed both connections.
                self.assertEqual(read_to_end(kept, 5), (b"", "eof"))
                self.assertIn(read_to_end(silent, 5)[1], ("eof", "reset"))
        finally:
            connection.close()
        text = node.text()
        self.assertRegex(text, r"stopping \(SIGTERM\)")
        self.assertRegex(text, r" stopped\n")
        self.assertNotIn("Traceback", text)
        self.assertLess(took, 10, "it did not wait out its grace or the idle timeout")
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", node.port), timeout=2).close()
        status = json.loads(self.cli("status", "--json").stdout)
        self.assertEqual([(n["id"], n["state"]) for n in status["nodes"]], [("n1", "stopped")])


if __name__ == "__main__":
    unittest.main()
