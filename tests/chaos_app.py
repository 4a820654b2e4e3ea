"""The ``serve --app`` module of the chaos run (tests/chaos.py): what the nodes do, recorded where the checker looks.

Every effect is written to the cluster's own database (tables of the chaos run, which nodeflow ignores),
so that the checker can count them after the run:

- queue handlers (``chaos.jobs``, ``chaos.timers``, ``chaos.cron``) record a receipt in
  ``chaos_received`` in the same transaction as the ack (``ack(message, also=...)``), then return
  ``nodeflow.SETTLED``: a receipt exists exactly when the message was acked. A receipt written twice
  for one key counts up instead of failing, so that the checker sees it;
- the ``effect`` activity function (the workflows' ``call`` steps) records its run in
  ``chaos_effects`` keyed by ``nodeflow.current_call().key``: a call runs at least once, and a burst
  lost to a crash runs it again under the same key (``runs`` counts the runs).

The database path comes from ``$CHAOS_DB`` (the runner sets it for every node).
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nodeflow

_handle: nodeflow.Cluster | None = None
_handle_mutex = threading.Lock()


def cluster() -> nodeflow.Cluster:
    """This process's own handle on the cluster, opened on first use (a passing handle, not the node's)."""
    global _handle
    with _handle_mutex:
        if _handle is None:
            _handle = nodeflow.connect(os.environ["CHAOS_DB"])
        return _handle


def _pause() -> None:
    """A little work: widens the window in which a kill or a stop lands in the middle of it."""
    time.sleep(random.uniform(0.005, 0.04))


def _receipt(message: nodeflow.Message, key: str) -> object:
    """Ack ``message`` and record its receipt under ``key`` in one transaction."""

    def record(conn: Any) -> None:
        conn.execute(
            "INSERT INTO chaos_received (key, queue, message, node, at, count, again) VALUES (?, ?, ?, ?, ?, 1, '[]') "
            "ON CONFLICT (key) DO UPDATE SET count = count + 1, "
            "again = json_insert(again, '$[#]', json_array(excluded.message, excluded.node, excluded.at))",
            (key, message.queue, message.id, message.owner, time.time()),
        )

    try:
        cluster().ack(message, also=record)
    except nodeflow.LeaseLost:
        pass  # our lease ran out (a stop, a slow disk): the message went to another node, whose ack counts
    return nodeflow.SETTLED


@nodeflow.handler("chaos.jobs")
def job(message: nodeflow.Message) -> object:
    """{"id": ..., "fail": K}: fails on purpose on its first K deliveries (K >= 5: a dead letter)."""
    body = message.body
    _pause()
    if message.attempts <= int(body.get("fail", 0)):
        raise RuntimeError(f"job {body['id']} fails on purpose (delivery {message.attempts})")
    return _receipt(message, f"job:{body['id']}")


@nodeflow.handler("chaos.timers")
def timer(message: nodeflow.Message) -> object:
    """{"timer": NAME}: sent once by a one-shot timer."""
    _pause()
    return _receipt(message, f"timer:{message.body['timer']}")


@nodeflow.handler("chaos.cron")
def cron(message: nodeflow.Message) -> object:
    """{"cron": NAME}: sent once per cron slot; each firing is its own message."""
    _pause()
    return _receipt(message, f"cron:{message.body['cron']}:{message.id}")


@nodeflow.activity("effect")
def effect(variables: dict[str, Any]) -> dict[str, Any]:
    """A call with an outside effect, recorded under the call's idempotency key.

    With ``input.flaky`` the first try of the ``charge`` step fails (the instance retries it after
    a second); the failure is remembered in ``chaos_flaky`` so that the next try succeeds.
    """
    call = nodeflow.current_call()
    nf = cluster()
    if variables["input"].get("flaky") and call.activity == "charge":
        first = nf.committer.submit(
            lambda conn: conn.execute(
                "INSERT OR IGNORE INTO chaos_flaky (key, at) VALUES (?, ?)", (call.instance, time.time())
            ).rowcount
        )
        if first:
            raise ConnectionError(f"{call.instance} {call.activity} fails on purpose (first try)")
    time.sleep(random.uniform(0.02, 0.15))  # a call takes a while: a kill or a stop can land in it

    def record(conn: Any) -> None:
        conn.execute(
            "INSERT INTO chaos_effects (key, instance, activity, step, fence, node, first_at, runs, again) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 1, '[]') "
            "ON CONFLICT (key) DO UPDATE SET runs = runs + 1, "
            "again = json_insert(again, '$[#]', json_array(excluded.node, excluded.fence, excluded.first_at))",
            (call.key, call.instance, call.activity, call.step, call.fence, call.node, time.time()),
        )

    nf.committer.submit(record)
    return {"key": call.key, "node": call.node, "fence": call.fence}
