"""The ``serve --app`` module of the chaos run (tests/chaos.py): what the nodes do, recorded where the checker looks.

Every effect is written to the cluster's own database (tables of the chaos run, which nodeflow ignores),
so that the checker can count them after the run:

- queue handlers (``chaos.jobs``, ``chaos.timers``, ``chaos.cron``) record a receipt in
  ``chaos_received`` in the same transaction as the ack (``ack(message, also=...)``), then return
  ``nodeflow.SETTLED``: a receipt exists exactly when the message was acked. A receipt written twice
  for one key counts up instead of failing, so that the checker sees it;
- the ``effect`` activity function (the workflows' ``call`` steps: chaos-a, chaos-b, and the child
  and keyed instances of the workflow features) records its run in ``chaos_effects`` keyed by
  ``nodeflow.current_call().key``: a call runs at least once, and a burst lost to a crash runs it
  again under the same key (``runs`` counts the runs); a burst cut short by a cancel (a child
  whose parent was cancelled or timed out) leaves a run that no committed step has. A call on a
  branch of a ``parallel`` or ``for_each`` (chaos-fan, chaos-race, chaos-each, chaos-turn) has
  the branch in its key (``instance:branch:N``) and in its row (``branch``), and returns it.

The hostile mix (tests/chaos.py ``--hostile``) has code here that misbehaves on purpose. Each run of
it first records itself in ``chaos_hostile`` (committed before it misbehaves), so that the checker
can tell its doings from nodeflow's:

- a poison job (``{"poison": true}`` in ``chaos.jobs``) and a ``call`` of an instance whose input says
  ``"hostile": "exit"`` end their process with ``os._exit(3)``, after a line with ``PLANNED_EXIT_MARK``
  on stderr (the node's log): the runner restarts such a node and does not count it as a crash;
- a job with ``"block": SECONDS`` sleeps that long in its handler's thread, then acks: its node
  must not be taken for stalled;
- a message of ``chaos.loop`` (an async handler) sleeps ``"sleep"`` seconds on the node's event loop,
  past the stall limit: its node stalls for real, and its peers hand the message on.

The database path comes from ``$CHAOS_DB`` (the runner sets it for every node).
"""

from __future__ import annotations

import datetime
import os
import random
import sys
import threading
import time
from typing import Any, NoReturn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nodeflow

_handle: nodeflow.Cluster | None = None
_handle_mutex = threading.Lock()

PLANNED_EXIT_CODE = 3  # the exit status of a planned exit (tests/chaos.py has the same two constants)
PLANNED_EXIT_MARK = "CHAOS PLANNED EXIT"


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
    _acked(message, key)
    return nodeflow.SETTLED


def _acked(message: nodeflow.Message, key: str) -> bool:
    """Ack ``message`` with its receipt (see _receipt); whether the ack committed."""

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
        return False  # our lease ran out (a stop, a slow disk): the message went to another node, whose ack counts
    return True


def _hostile(kind: str, key: str, node: str | None, message: nodeflow.Message | None = None) -> int:
    """Record that hostile code of ``kind`` starts now in this process (committed when this returns)."""
    row = (
        kind,
        key,
        message.id if message else None,
        message.attempts if message else None,
        message.refunds if message else None,
        node,
        os.getpid(),
        time.time(),
    )
    return int(cluster().committer.submit(
        lambda conn: conn.execute(
            "INSERT INTO chaos_hostile (kind, key, message, attempt, refunds, node, pid, started) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            row,
        ).lastrowid
    ))  # fmt: skip


def _hostile_done(row: int, outcome: str) -> None:
    cluster().committer.submit(
        lambda conn: conn.execute(
            "UPDATE chaos_hostile SET ended = ?, outcome = ? WHERE id = ?", (time.time(), outcome, row)
        )
    )


def _planned_exit(what: str) -> NoReturn:
    """End this process at once, as a crash in user code would, after saying so in the node's log."""
    stamp = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
    print(f"{stamp} {PLANNED_EXIT_MARK} (pid {os.getpid()}): {what}", file=sys.stderr, flush=True)
    os._exit(PLANNED_EXIT_CODE)


@nodeflow.handler("chaos.jobs")
def job(message: nodeflow.Message) -> object:
    """{"id": ..., "fail": K}: fails on purpose on its first K deliveries (K >= 5: a dead letter).

    {"id": ..., "poison": true}: ends its process (each delivery; it ends a dead letter).
    {"id": ..., "block": S}: blocks its thread S seconds, then acks.
    """
    body = message.body
    if body.get("poison"):
        _hostile("poison", f"job:{body['id']}", message.owner, message)
        _planned_exit(f"poison job {body['id']} (message {message.id}, delivery {message.attempts})")
    if body.get("block"):
        row = _hostile("block-thread", f"job:{body['id']}", message.owner, message)
        time.sleep(float(body["block"]))  # in this handler's own thread: the node's heartbeat goes on
        acked = _acked(message, f"job:{body['id']}")
        _hostile_done(row, "acked" if acked else "lease lost")
        return nodeflow.SETTLED
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


@nodeflow.handler("chaos.loop")
async def loop_blocker(message: nodeflow.Message) -> object:
    """{"id": ..., "sleep": S}: blocks the node's event loop S seconds (past the stall limit), then acks.

    Everything here blocks the loop (the commits too): the node stalls for real, its peers take its
    leases (this message's too) and its office; its ack afterwards fails unless nobody took it.
    """
    body = message.body
    row = _hostile("block-loop", f"loop:{body['id']}", message.owner, message)
    time.sleep(float(body["sleep"]))  # blocking the event loop is the point
    acked = _acked(message, f"loop:{body['id']}")
    _hostile_done(row, "acked" if acked else "lease lost")
    return nodeflow.SETTLED


@nodeflow.activity("effect")
def effect(variables: dict[str, Any]) -> dict[str, Any]:
    """A call with an outside effect, recorded under the call's idempotency key.

    With ``input.flaky`` the first try of the ``charge`` step fails (the instance retries it after
    a second); the failure is remembered in ``chaos_flaky`` so that the next try succeeds. With
    ``input.hostile == "exit"`` the ``charge`` step ends its process, every time: the instance
    faults once its run message has had its deliveries.
    """
    call = nodeflow.current_call()
    nf = cluster()
    if variables["input"].get("hostile") == "exit" and call.activity == "charge":
        _hostile("exit-call", call.instance, call.node)
        _planned_exit(f"instance {call.instance} {call.activity} (fence {call.fence}): the call ends its process")
    if variables["input"].get("flaky") and call.activity == "charge":
        first = nf.committer.submit(
            lambda conn: (
                conn.execute(
                    "INSERT OR IGNORE INTO chaos_flaky (key, at) VALUES (?, ?)", (call.instance, time.time())
                ).rowcount
            )
        )
        if first:
            raise ConnectionError(f"{call.instance} {call.activity} fails on purpose (first try)")
    time.sleep(random.uniform(0.02, 0.15))  # a call takes a while: a kill or a stop can land in it

    def record(conn: Any) -> None:
        conn.execute(
            "INSERT INTO chaos_effects (key, instance, activity, step, fence, node, first_at, runs, again, branch) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 1, '[]', ?) "
            "ON CONFLICT (key) DO UPDATE SET runs = runs + 1, "
            "again = json_insert(again, '$[#]', json_array(excluded.node, excluded.fence, excluded.first_at))",
            (call.key, call.instance, call.activity, call.step, call.fence, call.node, time.time(), call.branch),
        )

    nf.committer.submit(record)
    done = {"key": call.key, "node": call.node, "fence": call.fence}
    return {**done, "branch": call.branch} if call.branch else done
