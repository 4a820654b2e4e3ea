"""The dashboard's actions in a real headless browser (Debian's chromium), driven over the DevTools protocol.

One real ``serve --http 127.0.0.1:0`` node on a fresh database; Chromium loads its page, and the test
speaks the Chrome DevTools Protocol to it over a WebSocket written here with the standard library.
Clicks are real mouse events at the element's centre (Input.dispatchMouseEvent), so a button that is
hidden or covered cannot be clicked. Every outcome is checked in the database, not only in the DOM:

- an instance waiting for a signal, opened from the instance list: the first click on "Cancel
  instance" only arms it (nothing is cancelled), the second cancels it (journal: a ``cancel`` row
  saying "dashboard"), and the panel then offers no cancel;
- a faulted instance shows "Retry"; a click runs its call again (it succeeds the second time) and
  the instance completes;
- a signal nobody waits for shows in "Kept signals" with the count, and leaves once an instance
  takes it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
import unittest
import urllib.parse
import urllib.request
from typing import Any

import nodeflow
from tests.support import NODEFLOW, PYTHON, ClusterTestCase
from tests.test_dashboard import CHROMIUM, CHROMIUM_FLAGS

URL_LINE = re.compile(r"dashboard and API at http://127\.0\.0\.1:(\d+)/")
READY = re.compile(r" running workflows ")
DEVTOOLS_LINE = re.compile(r"DevTools listening on (ws://127\.0\.0\.1:(\d+)/\S+)")
WAIT = 20.0  # the bound on every wait for the node, the browser or the page

# "flaky" fails the first time it runs and succeeds after: a retry of its faulted instance completes it.
APP = """
import nodeflow

runs = []

@nodeflow.activity("flaky")
def flaky(variables):
    runs.append(1)
    if len(runs) == 1:
        raise RuntimeError("the first run fails")
    return {"runs": len(runs)}
"""
WAITER = {
    "id": "waiter",
    "start": "ask",
    "activities": {
        "ask": {"type": "signal", "name": "go-{input.n}", "next": "done"},
        "done": {"type": "log", "message": "went"},
    },
}
FLAKY = {
    "id": "flaky",
    "start": "charge",
    "activities": {"charge": {"type": "call", "function": "flaky", "result": "charged", "retry": {"attempts": 1}}},
}

# What the side panel shows, read in one go.
PANEL = """(() => {
 const $ = (id) => document.getElementById(id), seen = (e) => !!e && e.checkVisibility();
 const meta = {}, dts = [...$('panel-meta').querySelectorAll('dt')];
 dts.forEach((dt) => { meta[dt.textContent] = dt.nextElementSibling ? dt.nextElementSibling.textContent : null; });
 return {open: seen($('panel')), instance: $('panel').dataset.instance || null, status: meta.status || null,
  cancel: seen($('panel-cancel')), cancelText: $('panel-cancel').textContent, retry: seen($('panel-retry')),
  error: $('panel-err').textContent, rows: $('panel-journal').tBodies[0].rows.length};
})()"""
KEPT = """(() => {
 const $ = (id) => document.getElementById(id), seen = (e) => !!e && e.checkVisibility();
 return {count: $('kept-count').textContent, empty: seen($('kept-empty')),
  rows: [...$('kept').tBodies[0].rows].map((tr) => [tr.dataset.kept, tr.cells[0].textContent, seen(tr)])};
})()"""


class DevToolsError(Exception):
    pass


class WebSocket:
    """A minimal RFC 6455 client: the opening handshake, masked text frames out, text frames in."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, timeout: float = 10) -> None:
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        if status.split()[1:2] != ["101"] or headers.get("sec-websocket-accept") != accept:
            raise DevToolsError(f"WebSocket handshake refused: {status!r} {headers}")

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise DevToolsError("the browser closed the WebSocket")
        return data

    def _exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self._recv()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    @staticmethod
    def _mask(mask: bytes, payload: bytes) -> bytes:
        n = len(payload)
        return (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")

    def send_frame(self, opcode: int, payload: bytes) -> None:
        n, mask = len(payload), os.urandom(4)
        if n < 126:
            length = bytes([0x80 | n])
        elif n < 1 << 16:
            length = bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            length = bytes([0x80 | 127]) + struct.pack("!Q", n)
        self.sock.sendall(bytes([0x80 | opcode]) + length + mask + self._mask(mask, payload))

    def send(self, text: str) -> None:
        self.send_frame(0x1, text.encode("utf-8"))

    def recv(self, timeout: float) -> str:
        """The next whole text message (fragments joined; pings answered)."""
        self.sock.settimeout(max(timeout, 0.05))
        parts: list[bytes] = []
        while True:
            first, second = self._exactly(2)
            opcode, n = first & 0x0F, second & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._exactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._exactly(8))[0]
            mask = self._exactly(4) if second & 0x80 else None
            payload = self._exactly(n)
            if mask:
                payload = self._mask(mask, payload)
            if opcode == 0x8:
                raise DevToolsError(f"the browser closed the WebSocket: {payload[2:]!r}")
            if opcode == 0x9:
                self.send_frame(0xA, payload)
            elif opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if first & 0x80:
                    return b"".join(parts).decode("utf-8")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send_frame(0x8, struct.pack("!H", 1000))
        self.sock.close()


class DevTools:
    """Commands to one page target; the events that arrive meanwhile are kept in ``events``."""

    def __init__(self, ws_url: str) -> None:
        self.ws = WebSocket(ws_url)
        self.last_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout: float = 10, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        ident = self.last_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(deadline - time.monotonic()))
            if message.get("id") == ident:
                if "error" in message:
                    raise DevToolsError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise DevToolsError(
                f"{expression[:80]!r} threw: {details.get('exception', {}).get('description', details)}"
            )
        return result["result"].get("value")

    def page_errors(self) -> list[str]:
        """Uncaught exceptions and console.error calls in the page so far."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append(details.get("exception", {}).get("description") or details.get("text", "?"))
            elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in params.get("args", [])))
        return found

    def close(self) -> None:
        self.ws.close()


@unittest.skipUnless(CHROMIUM, "chromium is not installed (.ci/run installs Debian's package)")
class DashboardActionsInABrowser(ClusterTestCase):
    """Each test: a fresh database, one serve node with the dashboard, one headless Chromium on it."""

    def setUp(self) -> None:
        super().setUp()
        self.node: subprocess.Popen | None = None
        self.browser: subprocess.Popen | None = None
        self.devtools: DevTools | None = None
        self.nf: nodeflow.Cluster | None = None
        try:
            self.start()
        except BaseException:
            self.stop()
            super().tearDown()
            raise

    def tearDown(self) -> None:
        try:
            self.stop()
        finally:
            super().tearDown()

    # The node and the browser -------------------------------------------------------------------

    def start(self) -> None:
        for definition in (WAITER, FLAKY):
            path = os.path.join(self.dir, f"{definition['id']}.json")
            with open(path, "w") as file:
                json.dump(definition, file)
            done = self.cli("define", path)
            self.assertEqual(done.returncode, 0, done.stderr)
        app = os.path.join(self.dir, "app.py")
        with open(app, "w") as file:
            file.write(APP)
        self.node_log = os.path.join(self.dir, "serve-n1.log")
        with open(self.node_log, "w") as log:
            self.node = subprocess.Popen(
                [PYTHON, NODEFLOW, "--db", self.db, "serve", "--node-id", "n1", "--app", app,
                 "--http", "127.0.0.1:0"],
                stdout=subprocess.DEVNULL, stderr=log, cwd=self.dir, start_new_session=True,
            )  # fmt: skip
        found = self.wait_for(lambda: self.line_of(self.node, self.node_log, URL_LINE, READY), "the node to serve")
        self.url = f"http://127.0.0.1:{found[1]}/"
        self.nf = nodeflow.connect(self.db)

        self.profile = os.path.join(self.dir, "chromium-profile")
        os.makedirs(self.profile)
        self.browser_log = os.path.join(self.dir, "chromium.log")
        with open(self.browser_log, "w") as log:
            self.browser = subprocess.Popen(
                [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
                 "--window-size=1280,900", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=log, cwd=self.dir, start_new_session=True,
                env=dict(os.environ, TMPDIR=self.dir),  # its scratch files go with the test's folder
            )  # fmt: skip
        listening = self.wait_for(
            lambda: self.line_of(self.browser, self.browser_log, DEVTOOLS_LINE), "Chromium's DevTools line"
        )
        port = int(listening[2])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            pages = [target for target in json.load(answer) if target.get("type") == "page"]
        if not pages:  # no tab yet: open one
            request = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
            with urllib.request.urlopen(request, timeout=10) as answer:
                pages = [json.load(answer)]
        self.devtools = DevTools(pages[0]["webSocketDebuggerUrl"])
        self.devtools.call("Runtime.enable")

    def stop(self) -> None:
        if self.devtools is not None:
            with contextlib.suppress(OSError, DevToolsError):
                self.devtools.close()
        if self.nf is not None:
            self.nf.close()
        for process in (self.browser, self.node):
            if process is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the browser's renderers and helpers too
            process.wait(timeout=10)
        profile = getattr(self, "profile", None)
        if profile:  # a Chromium helper that left the process group
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as file:
                        if profile.encode() in file.read():
                            os.kill(int(pid), signal.SIGKILL)

    def line_of(self, process: subprocess.Popen, log: str, line: re.Pattern, *also: re.Pattern) -> re.Match | None:
        """``line`` in the log of a child once it and ``also`` are there; a child that ended fails the test."""
        text = self.read(log)
        if process.poll() is not None:
            self.fail(f"{process.args[0]} ended (exit {process.returncode}) before it was ready:\n{text[-3000:]}")
        found = line.search(text)
        return found if found and all(pattern.search(text) for pattern in also) else None

    @staticmethod
    def read(path: str) -> str:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read()

    def context(self) -> str:
        """The end of the node's log and the page's errors, for a failure message."""
        lines = self.read(self.node_log).splitlines()[-25:] if os.path.exists(self.node_log) else []
        errors = self.devtools.page_errors() if self.devtools else []
        return "\n--- node log (end):\n" + "\n".join(lines) + f"\n--- page errors: {errors}"

    def wait_for(self, probe, what: str, timeout: float = WAIT) -> Any:
        """Poll ``probe`` until it returns something true (returned); fail after ``timeout`` s."""
        deadline, last, error = time.monotonic() + timeout, None, None
        while True:
            try:
                last = probe()
                if last:
                    return last
            except DevToolsError as problem:  # e.g. the page navigating away under an evaluation
                error = problem
            if time.monotonic() > deadline:
                node_log = self.context() if getattr(self, "node_log", None) else ""
                self.fail(f"{what}: not within {timeout} s; last seen {last!r}, last error {error}{node_log}")
            time.sleep(0.05)

    # The page -----------------------------------------------------------------------------------

    def open_dashboard(self) -> None:
        assert self.devtools is not None
        self.devtools.call("Page.navigate", url=self.url)
        self.wait_for(
            lambda: self.devtools.js(
                "location.href === " + json.dumps(self.url) + " && document.readyState === 'complete' && "
                "document.getElementById('served-by').textContent === 'n1'"
            ),
            "the dashboard to load and show its node",
        )

    def click(self, selector: str) -> None:
        """A real left click at the centre of the element, which must be visible and on top there."""
        assert self.devtools is not None
        spot = self.devtools.js(
            "(() => {const e = document.querySelector(" + json.dumps(selector) + "); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(),"
            " x = r.left + r.width / 2, y = r.top + r.height / 2, at = document.elementFromPoint(x, y);"
            " return {x, y, visible: e.checkVisibility(), hit: !!at && e.contains(at),"
            " at: at ? at.outerHTML.slice(0, 160) : null};})()"
        )
        self.assertIsNotNone(spot, f"no element {selector} to click")
        self.assertTrue(spot["visible"] and spot["hit"], f"{selector} cannot be clicked: {spot}")
        for kind, button in (("mouseMoved", "none"), ("mousePressed", "left"), ("mouseReleased", "left")):
            self.devtools.call(
                "Input.dispatchMouseEvent", type=kind, x=spot["x"], y=spot["y"], button=button, clickCount=1
            )

    def panel(self) -> dict[str, Any]:
        assert self.devtools is not None
        return self.devtools.js(PANEL)

    def open_panel(self, instance: str, status: str) -> dict[str, Any]:
        """Click the instance in the list; the panel it opens, once it shows ``status``."""
        row = f'#instances li[data-instance="{instance}"]'
        self.wait_for(
            lambda: (
                self.devtools.js(f"(e => e && e.dataset.status)(document.querySelector({json.dumps(row)}))") == status
            ),
            f"instance {instance} listed as {status}",
        )
        self.click(row)
        return self.wait_for(
            lambda: (p := self.panel())["open"] and p["instance"] == instance and p["status"] == status and p,
            f"the panel of {instance} showing it {status}",
        )

    def assert_no_page_errors(self) -> None:
        assert self.devtools is not None
        self.assertEqual(self.devtools.page_errors(), [], "the page threw or logged errors")

    # The database -------------------------------------------------------------------------------

    def start_instance(self, definition: str, data: dict[str, Any]) -> str:
        done = self.cli("start", definition, "--input", json.dumps(data))
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.strip()

    def instance(self, instance: str) -> nodeflow.Instance:
        assert self.nf is not None
        return self.nf.instance(instance)

    # The tests ----------------------------------------------------------------------------------

    def test_cancel_asks_for_a_second_click_then_cancels_the_waiting_instance(self) -> None:
        waiting = self.start_instance("waiter", {"n": 1})
        self.wait_for(lambda: self.instance(waiting).status == "waiting", f"{waiting} waiting for go-1")
        self.open_dashboard()
        shown = self.open_panel(waiting, "waiting")
        self.assertTrue(shown["cancel"], f"a waiting instance offers Cancel: {shown}")
        self.assertFalse(shown["retry"], f"a waiting instance offers no Retry: {shown}")
        self.assertEqual(shown["cancelText"], "Cancel instance")

        self.click("#panel-cancel")

        def armed_not_sent() -> dict[str, Any] | None:
            self.assertEqual(self.instance(waiting).status, "waiting", "one click on Cancel must not cancel")
            shown = self.panel()
            return shown if shown["cancelText"].startswith("Click again to cancel") else None

        armed = self.wait_for(armed_not_sent, "the first click to arm Cancel")
        self.assertIn(waiting[-6:], armed["cancelText"], "the armed button names the instance")
        time.sleep(1.2)  # more than one poll of the page: a first click must have sent nothing
        self.assertEqual(self.instance(waiting).status, "waiting", "one click must not cancel")
        self.assertTrue(self.panel()["cancelText"].startswith("Click again"), "still armed (5 s) after 1.2 s")

        self.click("#panel-cancel")
        self.wait_for(lambda: self.instance(waiting).status == "cancelled", f"{waiting} cancelled in the database")
        found = self.instance(waiting)
        last = found.journal[-1]
        self.assertEqual(last.type, "cancel", found.journal)
        self.assertIn("dashboard", last.outcome, found.journal)
        self.assertIsNotNone(found.ended)
        after = self.wait_for(
            lambda: (p := self.panel())["status"] == "cancelled" and p, "the panel to show the instance cancelled"
        )
        self.assertFalse(after["cancel"], f"a cancelled instance offers no Cancel: {after}")
        self.assertFalse(after["retry"], f"a cancelled instance offers no Retry: {after}")
        self.assertEqual(after["error"], "", after)
        self.assertEqual(after["rows"], len(found.journal), f"the panel's journal has every step: {after}")
        self.assert_no_page_errors()

    def test_retry_runs_a_faulted_instance_again(self) -> None:
        broken = self.start_instance("flaky", {})
        self.wait_for(lambda: self.instance(broken).status == "faulted", f"{broken} faulted at its first call")
        before = self.instance(broken)
        self.assertEqual(len(before.journal), 1, before.journal)
        self.assertIn("faulted", before.journal[0].outcome)
        self.open_dashboard()
        shown = self.open_panel(broken, "faulted")
        self.assertTrue(shown["retry"], f"a faulted instance offers Retry: {shown}")
        self.assertTrue(shown["cancel"], f"a faulted instance has not ended: it offers Cancel: {shown}")

        self.click("#panel-retry")
        self.wait_for(lambda: self.instance(broken).status == "completed", f"{broken} run again and completed")
        after = self.instance(broken)
        self.assertEqual(after.variables.get("charged"), {"runs": 2}, "the call ran a second time")
        self.assertEqual(
            [(e.step, e.activity, e.type) for e in after.journal], [(0, "charge", "call"), (1, "charge", "call")]
        )
        self.assertNotIn("fault", after.journal[1].outcome)
        self.assertIsNone(after.error)
        panel = self.wait_for(
            lambda: (p := self.panel())["status"] == "completed" and p, "the panel to show the instance completed"
        )
        self.assertFalse(panel["retry"], f"a completed instance offers no Retry: {panel}")
        self.assertFalse(panel["cancel"], f"a completed instance offers no Cancel: {panel}")
        self.assertEqual(panel["error"], "", panel)
        self.assert_no_page_errors()

    def test_a_signal_nobody_waits_for_is_listed_as_kept_until_an_instance_takes_it(self) -> None:
        assert self.devtools is not None
        self.open_dashboard()
        empty = self.wait_for(lambda: (k := self.devtools.js(KEPT))["empty"] and k, "the empty kept-signals note")
        self.assertEqual(empty, {"count": "", "empty": True, "rows": []})

        sent = self.cli("signal", "go-7", "--json")
        self.assertEqual(sent.returncode, 0, sent.stderr)
        self.assertTrue(json.loads(sent.stdout)["kept"], sent.stdout)
        kept = self.wait_for(lambda: (k := self.devtools.js(KEPT))["rows"] and k, "the kept signal listed")
        self.assertEqual(kept, {"count": "(1)", "empty": False, "rows": [["go-7", "go-7", True]]})

        taker = self.start_instance("waiter", {"n": 7})  # waits for go-7: takes the kept signal at once
        self.wait_for(lambda: self.instance(taker).status == "completed", f"{taker} completed with the kept signal")
        gone = self.wait_for(lambda: (k := self.devtools.js(KEPT))["empty"] and k, "the kept signal to leave the list")
        self.assertEqual(gone, {"count": "", "empty": True, "rows": []})
        self.assert_no_page_errors()


if __name__ == "__main__":
    unittest.main()
