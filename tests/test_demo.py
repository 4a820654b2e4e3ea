"""The teaching demos: each runs real nodes twice, its piece off and then on, and the counts it
measured must show the failure and then the fix (demo X --json)."""

from __future__ import annotations

import json
import time

from tests.support import ClusterTestCase


class Demos(ClusterTestCase):
    def demo(self, scenario: str) -> dict:
        started = time.monotonic()
        done = self.cli("demo", scenario, "--json", timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertLess(time.monotonic() - started, 30, f"demo {scenario} should take about 20 s at most")
        report = json.loads(done.stdout)
        self.assertEqual(report["demo"], scenario)
        return report

    def test_locks_without_the_lock_updates_are_lost_with_it_none(self) -> None:
        report = self.demo("locks")
        off, on = report["off"], report["on"]
        self.assertGreater(off["lost"], 0, off)
        self.assertEqual(off["counter"] + off["lost"], off["expected"])
        self.assertEqual((on["counter"], on["lost"], on["fences_in_turn"]), (on["expected"], 0, True), on)

    def test_timers_without_the_election_every_node_fires_with_it_once(self) -> None:
        report = self.demo("timers")
        off, on = report["off"], report["on"]
        self.assertGreater(off["duplicates"], 0, off)
        self.assertEqual((on["fired"], on["duplicates"]), (on["timers"], 0), on)

    def test_cache_without_signals_nodes_run_a_stale_version_with_them_never(self) -> None:
        report = self.demo("cache")
        off, on = report["off"], report["on"]
        self.assertGreater(off["stale"], 0, off)
        self.assertGreaterEqual(on["started"], 30, on)
        self.assertEqual(on["stale"], 0, on)

    def test_failover_without_liveness_locks_work_waits_for_leases_with_them_moves_at_once(self) -> None:
        report = self.demo("failover")
        off, on = report["off"], report["on"]
        self.assertGreater(off["held"], 0, off)
        self.assertGreaterEqual(off["seconds"], off["lease"] * 0.9, off)
        self.assertGreater(on["held"], 0, on)
        self.assertLess(on["seconds"], 1.0, on)
