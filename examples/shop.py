"""The Python side of examples/order.json and examples/nightly.json: functions `call` activities run.

python3 nodeflow.py serve --app examples/shop.py      # in three terminals: a three-node cluster
python3 nodeflow.py define examples/order.json
python3 nodeflow.py start order --input '{"order": 1, "total": 40}' --wait

A function gets a copy of the instance's variables (its input under "input") and returns JSON data,
stored under the activity's id. One that raises is retried with back-off, then the instance faults.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nodeflow

_reservations = itertools.count(1)
_charged = itertools.count(1)


@nodeflow.activity("reserve")
async def reserve(variables: dict) -> dict:
    """An async function: the node runs other steps while it waits (here, for a warehouse)."""
    await asyncio.sleep(0.05)
    return {"reservation": f"R{os.getpid()}-{next(_reservations)}"}


@nodeflow.activity("charge")
def charge(variables: dict) -> dict:
    """A blocking function runs in a thread. While the file provider-down exists (in the node's
    working folder), the payment provider is "down": the call fails, is retried, then faults."""
    if os.path.exists("provider-down"):
        raise ConnectionError("the payment provider is unavailable")
    return {"receipt": f"P{os.getpid()}-{next(_charged)}", "amount": variables["input"]["total"]}


@nodeflow.activity("sales_report")
def sales_report(variables: dict) -> dict:
    """Reads the cluster like any library user would: how many orders are complete so far."""
    with nodeflow.connect(os.environ.get("NODEFLOW_DB")) as nf:
        done = nf.instances(status="completed", definition="order")
    return {"orders": len(done), "pid": os.getpid()}
