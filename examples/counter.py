#!/usr/bin/env python3
"""Why a named lock exists: processes doing read-modify-write on one file, without and with it.

    python3 examples/counter.py [--processes 4] [--rounds 200] [--db PATH]

Each process reads a number from a file, yields for a moment, and writes the number plus one.
Without the lock, two processes read the same value and one increment is lost. With
``nf.lock("counter")`` every increment survives, and each holder gets a fencing token that is
higher than any before it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nodeflow


def increment(counter: str) -> None:
    with open(counter) as f:
        value = int(f.read() or 0)
    time.sleep(0)  # give another process the chance to read the same value
    with open(counter, "w") as f:
        f.write(str(value + 1))


def worker(db: str, counter: str, rounds: int, locked: bool) -> None:
    if not locked:
        for _ in range(rounds):
            increment(counter)
        return
    with nodeflow.connect(db) as nf:
        fences = []
        for _ in range(rounds):
            with nf.lock("counter") as held:
                increment(counter)
                fences.append(held.fence)
        assert fences == sorted(fences), "fences must increase"


def run(db: str, processes: int, rounds: int, locked: bool) -> int:
    counter = db + ".counter"
    with open(counter, "w") as f:
        f.write("0")
    mode = "locked" if locked else "unlocked"
    script = os.path.abspath(__file__)
    children = [
        subprocess.Popen([sys.executable, script, "--worker", mode, "--db", db, "--rounds", str(rounds)])
        for _ in range(processes)
    ]
    for child in children:
        if child.wait(timeout=300) != 0:
            raise SystemExit(f"a worker failed with status {child.returncode}")
    with open(counter) as f:
        return int(f.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--db", default=None, help="cluster database (default: a temporary one)")
    parser.add_argument("--worker", choices=["locked", "unlocked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.db, args.db + ".counter", args.rounds, args.worker == "locked")
        return
    with tempfile.TemporaryDirectory() as folder:
        db = args.db or os.path.join(folder, "counter.db")
        expected = args.processes * args.rounds
        print(f"{args.processes} processes each add 1 to a counter file {args.rounds} times: expect {expected}")
        for locked in (False, True):
            started = time.monotonic()
            total = run(db, args.processes, args.rounds, locked)
            how = "with nf.lock('counter')" if locked else "without a lock        "
            print(
                f"  {how}: counter = {total:6d}, lost updates = {expected - total:6d}"
                f"  ({time.monotonic() - started:.1f}s)"
            )
        with nodeflow.connect(db) as nf, nf.lock("counter") as held:
            print(f"  fencing token of the next holder: {held.fence} (one per acquisition, never reused)")


if __name__ == "__main__":
    main()
