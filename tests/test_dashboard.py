"""The dashboard in a real headless browser (Debian's chromium, which .ci/run installs).

A real `cluster` of three serve processes; Chromium loads the page of one node, runs its script
against the JSON API, and the DOM it renders must show the three nodes and the scheduler, then,
after the scheduler is SIGKILLed, that node dead and its successor in office.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import unittest

import nodeflow
from tests.support import NODEFLOW, PYTHON, ClusterTestCase

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip
CARD = re.compile(r'<article class="node" data-node="([^"]+)" data-state="([^"]+)" data-scheduler="(true|false)"')


@unittest.skipUnless(CHROMIUM, "chromium is not installed (.ci/run installs Debian's package)")
class DashboardInABrowser(ClusterTestCase):
    def render(self, url: str) -> str:
        """The page's DOM after its script has polled the API for a few (virtual) seconds."""
        profile = os.path.join(self.dir, "chromium-profile")
        os.makedirs(profile, exist_ok=True)
        done = subprocess.run(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=4000", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        return done.stdout

    def cards(self, dom: str) -> dict[str, tuple[str, bool]]:
        return {node: (state, scheduler == "true") for node, state, scheduler in CARD.findall(dom)}

    def test_the_page_shows_three_nodes_and_the_scheduler_and_follows_a_failover(self) -> None:
        log = os.path.join(self.dir, "cluster.log")
        with open(log, "wb") as out:
            cluster = subprocess.Popen(
                [PYTHON, NODEFLOW, "--db", self.db, "cluster", "--http-port", "0", "--grace", "2s"],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        self.children.append(cluster)

        def output() -> str:
            with open(log, encoding="utf-8", errors="replace") as handle:
                return handle.read()

        self.wait_until(lambda: "Ctrl-C stops every node" in output(), 30, "the cluster to come up")
        urls = dict(re.findall(r"(n\d) (http://127\.0\.0\.1:\d+/)", output().split("dashboard at", 1)[1]))
        with nodeflow.connect(self.db) as nf:
            self.wait_until(lambda: nf.scheduler() is not None, 20, "a scheduler")
            office = nf.scheduler()
            assert office is not None
            first = office["node"]
        viewer = next(node for node in sorted(urls) if node != first)  # a page served by a node that survives

        dom = self.render(urls[viewer])
        self.assertEqual(
            self.cards(dom),
            {node: ("running", node == first) for node in ("n1", "n2", "n3")},
            "three running nodes, the scheduler marked",
        )
        self.assertRegex(dom, rf'id="scheduler"[^>]*>{first}<')

        os.kill(office["pid"], signal.SIGKILL)
        with nodeflow.connect(self.db) as nf:
            self.wait_until(lambda: (nf.scheduler() or {}).get("node") not in (None, first), 20, "a new scheduler")
            successor = nf.scheduler()["node"]  # type: ignore[index]
            self.wait_until(
                lambda: {n["id"]: n["state"] for n in nf.nodes()}.get(first) == "dead", 20, f"{first} marked dead"
            )
        cards = self.cards(self.render(urls[viewer]))
        self.assertEqual(cards[first], ("dead", False), cards)
        self.assertEqual(cards[successor], ("running", True), cards)
        self.assertEqual(sum(scheduler for _, scheduler in cards.values()), 1, cards)
        cluster.send_signal(signal.SIGINT)
        self.assertEqual(cluster.wait(30), 0, output()[-2000:])
