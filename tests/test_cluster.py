"""The `cluster` command: N real serve processes, a node SIGKILLed and restarted, Ctrl-C stops all.

Covered with a real `cluster` process and its real children:
- it starts three nodes, prints where the dashboard is, and each node answers on its HTTP port;
- work started on the cluster is shared by the nodes (the journal names more than one);
- a node SIGKILLed is restarted under the same id with --restart, with a new pid, and the others
  mark the old one gone;
- SIGINT (Ctrl-C) stops every node gracefully: cluster exits 0 and no child is left;
- its output is plain (no colour codes) when it is not a terminal;
- bad options exit 2 with one line, and start nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import nodeflow
from tests.support import NODEFLOW, PYTHON, ClusterTestCase, alive


class ClusterCommand(ClusterTestCase):
    def start_cluster(self, *options: str) -> tuple[subprocess.Popen, str]:
        log = os.path.join(self.dir, "cluster.log")
        with open(log, "wb") as out:
            child = subprocess.Popen(
                [PYTHON, NODEFLOW, "--db", self.db, "cluster", *options],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        self.children.append(child)
        self.wait_until(lambda: "Ctrl-C stops every node" in self.text(log), 30, "the cluster to come up")
        return child, log

    @staticmethod
    def text(path: str) -> str:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def node_pids(self) -> dict[str, int]:
        with nodeflow.connect(self.db) as nf:
            return {node["id"]: node["pid"] for node in nf.nodes() if node["state"] == "running"}

    def test_three_nodes_share_work_a_killed_node_comes_back_and_ctrl_c_stops_all(self) -> None:
        cluster, log = self.start_cluster("--http-port", "0", "--restart", "--grace", "3s")
        output = self.text(log)
        self.assertNotIn("\033[", output, "colour codes in output that is not a terminal")
        urls = dict(re.findall(r"(n\d) (http://127\.0\.0\.1:\d+/)", output.split("dashboard at", 1)[1]))
        self.assertEqual(sorted(urls), ["n1", "n2", "n3"], output)
        for node, url in urls.items():
            with urllib.request.urlopen(url + "api/status", timeout=5) as answer:
                self.assertEqual(json.load(answer)["node"], node)

        pids = self.node_pids()
        self.assertEqual(sorted(pids), ["n1", "n2", "n3"])
        with nodeflow.connect(self.db) as nf:
            self.assertIsNotNone(nf.scheduler())
            ids = [nf.start("example", {"n": n}) for n in range(12)]  # the example cluster defined
            for instance_id in ids:
                self.assertEqual(nf.wait(instance_id, 30).status, "completed")
            workers = {entry.node for instance_id in ids for entry in nf.instance(instance_id).journal}
        self.assertGreater(len(workers), 1, f"all the work ran on {workers}")

        os.kill(pids["n2"], signal.SIGKILL)
        self.wait_until(lambda: self.node_pids().get("n2") not in (None, pids["n2"]), 20, "n2 restarted")
        self.assertIn("cluster: node n2 exited with status -9", self.text(log))
        self.assertIn("cluster: restarting node n2", self.text(log))
        self.assertRegex(self.text(log), rf"node n2 \(pid {pids['n2']}\) is gone")

        children = set(self.node_pids().values())
        cluster.send_signal(signal.SIGINT)
        self.assertEqual(cluster.wait(30), 0, self.text(log)[-3000:])
        self.assertIn("cluster: stopping every node", self.text(log))
        for pid in children:
            self.wait_until(lambda pid=pid: not alive(pid), 10, f"node pid {pid} gone")
        with nodeflow.connect(self.db) as nf:
            self.assertEqual({node["state"] for node in nf.nodes()}, {"stopped"})

    def test_a_killed_cluster_takes_its_nodes_with_it(self) -> None:
        cluster, _ = self.start_cluster("--http-port", "0", "--nodes", "2")
        children = set(self.node_pids().values())
        self.assertEqual(len(children), 2)
        cluster.kill()
        cluster.wait(10)
        for pid in children:
            self.wait_until(lambda pid=pid: not alive(pid), 20, f"node pid {pid} gone after its cluster was killed")

    def test_bad_options_exit_2_and_start_nothing(self) -> None:
        for options, expected in (
            (["--nodes", "0"], "--nodes must be from 1 to 32"),
            (["--nodes", "3", "--replicas", "3"], "at least one node must be able to schedule"),
            (["--nodes", "two"], "--nodes must be a whole number"),
            (["--http-port", "65535"], "--http-port must leave room"),
            (["--grace", "soon"], "--grace"),
        ):
            with self.subTest(options=options):
                started = time.monotonic()
                result = self.cli("cluster", *options, timeout=20)
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertIn(expected, result.stderr)
                self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
                self.assertLess(time.monotonic() - started, 10)
        self.assertFalse(os.path.exists(self.db), "a refused cluster created the database")
