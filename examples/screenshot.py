"""Take README's picture of the dashboard: a real three-node cluster running examples/order.json.

python3 examples/screenshot.py examples/dashboard.png      # or: make screenshot

Needs Debian's chromium (.ci/run installs it). The cluster runs in a temporary folder and is
stopped, and the folder removed, when the picture is taken.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NODEFLOW = os.path.join(HERE, "..", "nodeflow.py")
sys.path.insert(0, os.path.join(HERE, ".."))
import nodeflow  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]  # fmt: skip


def output(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def main(target: str) -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("screenshot: chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 1
    folder = tempfile.mkdtemp(prefix="nodeflow-screenshot-")
    db = os.path.join(folder, "nodeflow.db")
    log = open(os.path.join(folder, "cluster.log"), "w+b")  # noqa: SIM115 - read while the cluster runs
    cluster = subprocess.Popen(
        [sys.executable, NODEFLOW, "--db", db, "cluster", "--http-port", "0", "--app", os.path.join(HERE, "shop.py")],
        stdout=log, stderr=subprocess.STDOUT, cwd=folder,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while b"Ctrl-C stops every node" not in output(log.name):
            if time.monotonic() > deadline or cluster.poll() is not None:
                print("screenshot: the cluster did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
        found = re.search(rb"dashboard at (http://\S+)", output(log.name))
        assert found is not None
        url = found.group(1).decode()
        with nodeflow.connect(db) as nf:
            nf.define(output(os.path.join(HERE, "order.json")))
            for order in range(1, 9):
                nf.start("order", {"order": order, "total": 60 * order})  # over 100 waits for approval
            time.sleep(1.0)
            nf.signal("approve-3", {"ok": True, "by": "ann"})
            time.sleep(0.5)
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={folder}/chromium", "--window-size=1300,1250",
             "--virtual-time-budget=3000", f"--screenshot={os.path.abspath(target)}", url],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        print(f"screenshot: {target}")
        return 0
    finally:
        cluster.send_signal(signal.SIGINT)
        cluster.wait(30)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "dashboard.png"))
