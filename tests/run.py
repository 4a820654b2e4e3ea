"""Run the test modules in three unittest processes at once (`make test`), then print each one's output.

Most tests wait on real processes, timers and kernel locks rather than on the CPU: on a 2-core
machine (measured 2026-11-23) the suite took 342 s in one process, 181 s in two and 135 s in three,
using about 63% of the two cores. The groups are balanced by the seconds each module took in a
sequential run on 2026-12-07 (a module not listed counts as 10 s).
`NODEFLOW_TEST_JOBS=1` runs everything in one process, as `python3 -m unittest discover` would.
"""

from __future__ import annotations

import os
import py_compile
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECONDS = {
    "test_hostile": 82, "test_chaos": 68, "test_serve": 63, "test_bus": 58, "test_faults": 54, "test_locks": 42,
    "test_workflows": 34, "test_lock_cli": 25, "test_signals": 20, "test_demo": 19, "test_security": 19,
    "test_store": 17, "test_http": 16, "test_workflow_cluster": 13, "test_bad_input": 11, "test_cluster": 9,
    "test_dashboard": 5, "test_cron": 4, "test_settings": 1, "test_readme": 1,
    "test_workflow_children": 35, "test_workflow_runtime": 30, "test_workflow_branches": 26,
    "test_dashboard_actions": 15,
}  # fmt: skip
GROUP_TIMEOUT = 900.0  # a group still running after this is killed and counted as failed


def groups(modules: list[str], jobs: int) -> list[list[str]]:
    """Longest first, each into the group with the least so far."""
    loads: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(jobs)]
    for module in sorted(modules, key=lambda name: -SECONDS.get(name, 10)):
        seconds, members = min(loads, key=lambda load: load[0])
        loads.remove((seconds, members))
        loads.append((seconds + SECONDS.get(module, 10), [*members, module]))
    return [members for _, members in loads if members]


def compile_nodeflow() -> None:
    """Write nodeflow.py's bytecode to __pycache__ once, as its first import would where bytecode is written.

    Hundreds of the tests' child processes ``import nodeflow``; where PYTHONDONTWRITEBYTECODE is set,
    each compiled its 11,000 lines again, 0.13 s of CPU apiece on a machine whose two cores the
    suite keeps busy (test_locks alone: 29 s of CPU without the file, 18 s with it). Python checks
    the file against the source's size and mtime before using it: an edited nodeflow.py is compiled
    afresh. (``python3 nodeflow.py ...`` runs the script itself, which Python always compiles.)
    """
    py_compile.compile(str(ROOT / "nodeflow.py"), doraise=True)


def main() -> int:
    modules = sorted(path.stem for path in (ROOT / "tests").glob("test_*.py"))
    compile_nodeflow()
    jobs = max(1, int(os.environ.get("NODEFLOW_TEST_JOBS", "3")))
    started = time.monotonic()
    runs = []
    for members in groups(modules, jobs):
        log = tempfile.TemporaryFile()  # noqa: SIM115 - read after the process ends, closed with the run
        command = [sys.executable, "-m", "unittest", "-v", *(f"tests.{module}" for module in members)]
        runs.append((members, log, subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)))
    def stop_children(signum: int, _frame: object) -> None:  # SIGTERM to make: no orphaned test processes
        for _, _, process in runs:
            process.terminate()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop_children)
    failed = False
    for members, log, process in runs:
        try:
            code = process.wait(max(1.0, started + GROUP_TIMEOUT - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
            log.write(f"\n{' '.join(members)}: still running after {GROUP_TIMEOUT:.0f} s; killed\n".encode())
        log.seek(0)
        sys.stdout.write(f"\n===== {', '.join(members)}: exit {code} =====\n")
        sys.stdout.write(log.read().decode("utf-8", "replace"))
        log.close()
        failed = failed or code != 0
    print(f"\n{'FAILED' if failed else 'OK'}: {len(modules)} modules in {len(runs)} processes, "
          f"{time.monotonic() - started:.0f} s")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
