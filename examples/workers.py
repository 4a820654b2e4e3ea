#!/usr/bin/env python3
"""Competing consumers: several worker processes share one queue, and a killed one loses nothing.

    python3 examples/workers.py [--workers 3] [--jobs 60] [--db PATH]

The script queues the jobs, starts the workers (separate processes), and SIGKILLs the first
worker while it holds a job. That job's lease runs out (3 s here) and another worker does it.
At the end it prints how many jobs each worker did, and checks that every job was done exactly
once: each worker records its job in the same transaction as the ack (``ack(msg, also=...)``).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nodeflow

LEASE = 3.0


def work(db: str, name: str) -> None:
    """One worker: take jobs until none is left, leased ones included (a lease may run out)."""
    with nodeflow.connect(db) as nf:
        while True:
            msg = nf.receive("jobs", lease=LEASE, wait=1.0)
            if msg is None:
                depth = nf.queues().get("jobs", {})
                if not depth.get("ready") and not depth.get("leased") and not depth.get("delayed"):
                    return
                continue
            time.sleep(0.02)  # the job itself
            print(f"{name} took job {msg.body['job']}", flush=True)
            job = msg.body["job"]
            nf.ack(msg, also=lambda conn, job=job: conn.execute("INSERT INTO done VALUES (?, ?)", (job, name)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--db", default=None, help="cluster database (default: a temporary one)")
    args = parser.parse_args()
    db = args.db or os.path.join(tempfile.mkdtemp(prefix="nodeflow-workers-"), "cluster.db")
    with nodeflow.connect(db) as nf:
        nf.store.write(lambda conn: conn.execute("CREATE TABLE IF NOT EXISTS done (job INTEGER PRIMARY KEY, worker)"))
        nf.store.write(lambda conn: conn.execute("DELETE FROM done"))
        for job in range(args.jobs):
            nf.send("jobs", {"job": job})
    print(f"queued {args.jobs} jobs in {db}; starting {args.workers} workers")
    here = os.path.abspath(__file__)
    workers = [
        subprocess.Popen([sys.executable, here, "--worker", db, f"w{i + 1}"], stdout=subprocess.PIPE, text=True)
        for i in range(args.workers)
    ]
    victim = workers[0]
    assert victim.stdout is not None
    victim.stdout.readline()  # it has acked one job and is taking the next
    victim.send_signal(signal.SIGKILL)
    print("killed w1 (SIGKILL) while it held a job; its lease runs out in 3 s and another worker takes it")
    for worker in workers:
        worker.communicate()
    with nodeflow.connect(db) as nf:
        done = nf.store.read(lambda conn: conn.execute("SELECT job, worker FROM done ORDER BY job").fetchall())
        left = nf.queues().get("jobs", {})
    per_worker = collections.Counter(worker for _, worker in done)
    for worker, count in sorted(per_worker.items()):
        print(f"  {worker} did {count} jobs")
    missing = sorted(set(range(args.jobs)) - {job for job, _ in done})
    print(f"{len(done)} of {args.jobs} jobs done exactly once; missing: {missing or 'none'}; queue now: {left}")
    return 0 if not missing else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        work(sys.argv[2], sys.argv[3])
        sys.exit(0)
    sys.exit(main())
