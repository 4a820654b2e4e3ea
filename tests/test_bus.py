"""Section 5, the Bus: durable queues, leases, dead letters, doorbells and group commit.

Covered, with real child processes, real files and real signals (no mocks):

- 10,000 messages (4,000 outside `make chaos`) through four consumer processes while one of them
  is SIGKILLed and restarted every 0.3-0.5 s: afterwards every message was acked exactly once or
  dead-lettered, none lost.
  Each ack writes a row in the ack's own transaction (``ack(also=...)``), so the database itself
  says how many times each message was acked.
- Poison messages (nacked each time, or killing their consumer each time) end in dead letters after
  ``max_deliveries`` with their last error; dead letters are listed, retried and purged through
  the Python API and the CLI.
- Deduplication keys, delays (and a waiter that wakes when a delay ends), priorities with FIFO order
  within a priority.
- Leases: expiry and redelivery, LeaseLost for the old holder with its ``also`` writes rolled back,
  ``extend``, a SIGSTOPped holder losing its lease, ``release_leases`` for a SIGKILLed holder.
- Transactional ack, also inside a shared (group-committed) transaction.
- Doorbells: a receiver in another process wakes on a send although its poll interval is far longer
  than the bound; with every doorbell socket removed it still gets the message by polling.
- Competing consumers without crashes never share a message; writer processes share the database
  fairly; concurrent coroutines share transactions (group commit).
- CLI send/receive/status/dead-letters, and bad input at the CLI and the Python API: refused with
  InvalidInput (exit 2, one line on stderr) and nothing written.

No timing assertions on speed: a bound is only ever used where the mechanism under test is the one
thing that could explain meeting it (for instance a wake-up well before a wait or poll interval that
would otherwise have to pass), and such bounds are several seconds wide.
Random choices print their seed; set NODEFLOW_TEST_SEED to replay one.
"""

from __future__ import annotations

import asyncio
import glob
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
import unittest
from collections import Counter
from typing import Any

import nodeflow
from tests.support import CHAOS, ClusterTestCase, blocked_flock_waiters, process_state, tree_snapshot

MAX_DELIVERIES = 3
SETTINGS = nodeflow.Settings(max_deliveries=MAX_DELIVERIES)
MIB = 1 << 20

# Receives a batch, says what it got ("got OWNER ID:ATTEMPTS ..."), then on each "ack" line on stdin
# acks the batch with an also() that writes a row in table `side`, saying "acked ID" or "lost ID".
HOLDER = """
    import os, sys, nodeflow
    queue, lease, batch, wait = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"], settings=nodeflow.Settings(max_deliveries=3))
    taken = nf.receive(queue, lease=lease, wait=wait, batch=batch)
    print("got", nf.id, *[f"{m.id}:{m.attempts}" for m in taken], flush=True)
    for line in sys.stdin:
        for m in taken:
            note = lambda conn, m=m: conn.execute("INSERT INTO side (note) VALUES (?)", (f"ack {m.id}",))
            try:
                nf.ack(m, also=note)
                print("acked", m.id, flush=True)
            except nodeflow.LeaseLost:
                print("lost", m.id, flush=True)
"""

# Nacks every delivery of a queue with an error naming the delivery, until the message is dead.
NACKER = """
    import os, sys, nodeflow
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"], settings=nodeflow.Settings(max_deliveries=3))
    while True:
        m = nf.receive(sys.argv[1], lease=30, wait=10)
        if m is None:
            print("empty", flush=True)
            break
        outcome = nf.nack(m, error=f"boom on delivery {m.attempts}")
        print("nacked", m.id, m.attempts, outcome, flush=True)
        if outcome == "dead":
            break
"""

# One consumer of the chaos test. Each ack inserts a row into acked_log in the ack's transaction;
# after the ack commits, the id and body go to this process's own append-only log file.
CHAOS_CONSUMER = """
    import asyncio, json, os, sys, nodeflow
    queue, log_path, stop_path = sys.argv[1], sys.argv[2], sys.argv[3]
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"], settings=nodeflow.Settings(max_deliveries=3))

    def record(m):
        def insert(conn):
            conn.execute(
                "INSERT INTO acked_log (message_id, body, consumer, attempts) VALUES (?, ?, ?, ?)",
                (m.id, json.dumps(m.body, sort_keys=True), nf.id, m.attempts),
            )
        return insert

    async def settle(m, log):
        await asyncio.sleep(0.02)  # the work: a kill now finds the consumer holding leases
        try:
            await nf.aack(m, also=record(m))
        except nodeflow.LeaseLost:
            return
        log.write(f"{m.id} {json.dumps(m.body, sort_keys=True)}\\n")
        log.flush()

    async def main():
        with open(log_path, "a") as log:
            print("ready", nf.id, flush=True)
            while True:
                taken = await nf.areceive(queue, lease=2, wait=0.3, batch=10)
                if not taken and os.path.exists(stop_path):
                    return
                await asyncio.gather(*(settle(m, log) for m in taken))

    asyncio.run(main())
"""

# A consumer without crashes: logs each receipt (before its ack), works 2 ms, acks; long leases.
# A LeaseLost here (no crash, no expiry) would be a bug: it ends the process with an error.
PLAIN_CONSUMER = """
    import os, sys, time, nodeflow
    queue, log_path, stop_path = sys.argv[1], sys.argv[2], sys.argv[3]
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"], settings=nodeflow.Settings(max_deliveries=3))
    print("ready", flush=True)
    with open(log_path, "a") as log:
        while True:
            m = nf.receive(queue, lease=300, wait=0.2)
            if m is None:
                if os.path.exists(stop_path):
                    break
                continue
            log.write(f"{m.id} {m.attempts}\\n")
            log.flush()
            time.sleep(0.002)  # the work: others keep receiving while this message is held
            nf.ack(m)
"""

# Sends as fast as it can for argv[3] seconds after the go file appears; prints how many.
WRITER = """
    import os, sys, time, nodeflow
    name, go, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"])
    nf.send("warm-up", name)  # opens the write connection before the race starts
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit("no start signal within 30 s")
        time.sleep(0.002)
    end = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < end:
        nf.send("fair", {"writer": name, "n": sent})
        sent += 1
    print("sent", sent, flush=True)
"""

# Holds the cluster's writer lock (PATH.d/writer.lock) until a line arrives on stdin.
WRITER_LOCK_HOLDER = """
    import fcntl, os, sys
    fd = os.open(os.environ["NODEFLOW_DB"] + ".d/writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.readline()
"""

# Runs the CLI's main() with argv[1:] plus a message body read from stdin; exits with its status.
CLI_MAIN_WITH_BODY_FROM_STDIN = """
    import os, sys, nodeflow
    body = sys.stdin.read()
    sys.exit(nodeflow.main(["--db", os.environ["NODEFLOW_DB"], *sys.argv[1:], body]))
"""

# Starts its doorbell listener, says so, then waits up to argv[3] s for one message on argv[1].
# Prints what it got and how long the receive took.
WAITING_RECEIVER = """
    import json, os, sys, time, nodeflow
    queue, poll, wait = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"], settings=nodeflow.Settings(poll_interval=poll))
    nf.receive(queue + "-warm-up", wait=0.01)  # a wait > 0 starts the listener and binds the doorbell
    print("listening", nf.id, flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    print("receiving", flush=True)
    m = nf.receive(queue, lease=30, wait=wait)
    took = time.monotonic() - started
    print("result", json.dumps(None if m is None else m.body), repr(took), flush=True)
"""


def seed_for_test() -> int:
    return int(os.environ.get("NODEFLOW_TEST_SEED") or random.randrange(2**32))


class BusTestCase(ClusterTestCase):
    """ClusterTestCase plus an open handle (max_deliveries=3) and a side table for also() writes."""

    def setUp(self) -> None:
        super().setUp()
        self.nf = nodeflow.connect(self.db, settings=SETTINGS)
        self.addCleanup(self.nf.close)
        self.nf.store.write(
            lambda conn: conn.execute("CREATE TABLE IF NOT EXISTS side (id INTEGER PRIMARY KEY, note TEXT NOT NULL)")
        )

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return self.nf.store.read(lambda conn: conn.execute(sql, params).fetchall())

    def side_notes(self) -> list[str]:
        return [row[0] for row in self.query("SELECT note FROM side ORDER BY id")]

    def message_rows(self, queue: str) -> int:
        return self.query("SELECT count(*) FROM messages WHERE queue = ?", queue)[0][0]

    def tell(self, child: subprocess.Popen, line: str = "go") -> None:
        child.stdin.write(line + "\n")
        child.stdin.flush()

    def start_holder(
        self, queue: str, lease: float, batch: int = 1, wait: float = 20
    ) -> tuple[subprocess.Popen, str, list[tuple[int, int]]]:
        """A HOLDER child that has received; its lease owner id and its (id, attempts) pairs."""
        child = self.spawn_python(HOLDER, queue, str(lease), str(batch), str(wait), stdin=subprocess.PIPE)
        words = self.read_line(child, "got ", timeout=wait + 20).split()
        taken = [(int(word.split(":")[0]), int(word.split(":")[1])) for word in words[2:]]
        return child, words[1], taken

    def kill(self, child: subprocess.Popen) -> None:
        child.kill()
        child.wait(timeout=10)


# 1. Crashing consumers ------------------------------------------------------------------------


class ChaosConsumers(BusTestCase):
    MESSAGES = 10_000 if CHAOS else 4_000
    CONSUMERS = 4
    QUEUE = "chaos"

    def test_thousands_of_messages_acked_once_or_dead_while_consumers_are_killed(self) -> None:
        seed = seed_for_test()
        rng = random.Random(seed + 1)
        tag = f"[NODEFLOW_TEST_SEED={seed}]"
        self.nf.store.write(
            lambda conn: conn.execute(
                "CREATE TABLE IF NOT EXISTS acked_log (message_id INTEGER NOT NULL, body TEXT NOT NULL, "
                "consumer TEXT NOT NULL, attempts INTEGER NOT NULL)"
            )
        )
        stop = os.path.join(self.dir, "stop")
        logs: list[str] = []

        def start(slot: int) -> subprocess.Popen:
            log = os.path.join(self.dir, f"consumer-{slot}-{len(logs)}.log")
            logs.append(log)
            return self.spawn_python(CHAOS_CONSUMER, self.QUEUE, log, stop)

        consumers = [start(slot) for slot in range(self.CONSUMERS)]
        for consumer in consumers:
            self.read_line(consumer, "ready")

        # The producer trickles mixed-priority messages in for about 8 s, 250 at a time sent
        # concurrently (so they share transactions), while the consumers are being killed.
        bodies: dict[int, dict[str, int]] = {}
        send_errors: list[BaseException] = []
        priorities = random.Random(seed)

        async def send_all() -> None:
            for first in range(0, self.MESSAGES, 250):
                chunk = [{"n": n, "p": priorities.choice((0, 0, 1, 5, -2))} for n in range(first, first + 250)]
                ids = await asyncio.gather(*(self.nf.asend(self.QUEUE, b, priority=b["p"]) for b in chunk))
                bodies.update(zip(ids, chunk, strict=True))
                await asyncio.sleep(0.2)

        def produce() -> None:
            try:
                asyncio.run(send_all())
            except BaseException as error:
                send_errors.append(error)

        producer = threading.Thread(target=produce, name="producer")
        producer.start()

        # Kill a random consumer every 0.3-0.5 s and start a replacement, for as long as the
        # producer runs or any message is left (so also while killed consumers' leases run out).
        kills = 0
        deadline = time.monotonic() + 45
        while (producer.is_alive() or self.message_rows(self.QUEUE)) and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.3, 0.5))
            slot = rng.randrange(self.CONSUMERS)
            victim = consumers[slot]
            if victim.poll() is not None:
                self.fail(f"{tag} a consumer died on its own: {self.stderr_of(victim)}")
            self.kill(victim)
            kills += 1
            consumers[slot] = start(slot)
        producer.join(30)
        self.assertEqual(send_errors, [], f"{tag} the producer failed")
        self.assertEqual(len(bodies), self.MESSAGES, f"{tag} send returned a duplicate id")
        self.assertEqual(self.message_rows(self.QUEUE), 0, f"{tag} messages left after 45 s of consuming")

        # Drain: no more kills; every consumer must end cleanly once told to stop.
        open(stop, "w").close()
        for consumer in consumers:
            rc, _, err = self.finish(consumer, timeout=30)
            self.assertEqual(rc, 0, f"{tag} consumer failed: {err}")

        acked = self.query("SELECT message_id, body, attempts FROM acked_log")
        acked_count = Counter(row[0] for row in acked)
        twice = sorted(i for i, n in acked_count.items() if n > 1)
        self.assertEqual(twice, [], f"{tag} messages acked more than once")
        dead = {row[0]: row[1] for row in self.query("SELECT id, attempts FROM dead_letters WHERE queue = ?", "chaos")}
        self.assertEqual(set(acked_count) & set(dead), set(), f"{tag} messages both acked and dead")
        lost = set(bodies) - set(acked_count) - set(dead)
        self.assertEqual(lost, set(), f"{tag} {len(lost)} messages lost")
        self.assertEqual(set(acked_count) | set(dead), set(bodies), f"{tag} ids that were never sent")
        for message_id, body, _ in acked:
            self.assertEqual(json.loads(body), bodies[message_id], f"{tag} body of message {message_id} changed")
        for message_id, attempts in dead.items():
            self.assertEqual(attempts, MAX_DELIVERIES, f"{tag} dead letter {message_id} died early")
        self.assertEqual(self.nf.queues().get(self.QUEUE, {}).get("ready", 0), 0)

        # The consumers' own logs: written after each ack committed, so each line is an acked
        # message with its body, and no message appears twice.
        logged: list[int] = []
        for log in logs:
            if not os.path.exists(log):  # killed before it opened its log, so before it took anything
                continue
            with open(log) as f:
                for line in f.read().splitlines():
                    message_id, body = line.split(" ", 1)
                    logged.append(int(message_id))
                    self.assertEqual(json.loads(body), bodies[int(message_id)], f"{tag} log {log}")
        self.assertEqual([i for i, n in Counter(logged).items() if n > 1], [], f"{tag} logged twice")
        self.assertLessEqual(set(logged), set(acked_count), f"{tag} logged but not acked")

        redelivered = sum(1 for _, _, attempts in acked if attempts > 1) + len(dead)
        print(
            f"\n  {tag} kills={kills} acked={len(acked_count)} dead={len(dead)} "
            f"redelivered={redelivered} logged={len(logged)}",
            flush=True,
        )
        self.assertGreaterEqual(kills, 5, f"{tag} too few kills to have tested anything")
        self.assertGreater(redelivered, 0, f"{tag} no kill caught a consumer holding leases")


# 2. Poison messages and dead letters -----------------------------------------------------------


class PoisonMessages(BusTestCase):
    def test_message_nacked_on_every_delivery_dies_after_max_deliveries_with_its_last_error(self) -> None:
        poison = self.nf.send("work", {"poison": True}, priority=4)
        rc, out, err = self.finish(self.spawn_python(NACKER, "work"), timeout=60)
        self.assertEqual(rc, 0, err)
        self.assertEqual(
            out.splitlines(),
            [f"nacked {poison} 1 queued", f"nacked {poison} 2 queued", f"nacked {poison} 3 dead"],
        )
        letters = self.nf.dead_letters("work")
        self.assertEqual([(d.id, d.body, d.attempts, d.priority) for d in letters], [(poison, {"poison": True}, 3, 4)])
        self.assertEqual(letters[0].last_error, "boom on delivery 3")
        self.assertEqual(self.nf.queues()["work"], {"ready": 0, "leased": 0, "delayed": 0, "dead": 1})
        self.assertIsNone(self.nf.receive("work"))

    def test_message_whose_consumer_is_killed_on_every_delivery_dies_after_max_deliveries(self) -> None:
        poison = self.nf.send("work", "kills its consumer")
        owners = []
        # A delivery that ends with its consumer is not counted at first (that consumer may have died
        # of another message it held); after ISOLATE_AFTER_DEATHS of them the message is a suspect,
        # tried alone, and every later death counts: MAX_DELIVERIES counted deliveries in all.
        deliveries = MAX_DELIVERIES + nodeflow.ISOLATE_AFTER_DEATHS
        for delivery in range(1, deliveries + 1):
            # Each child waits for the previous lease (0.5 s) to run out, then gets the message.
            child, owner, taken = self.start_holder("work", lease=0.5)
            self.assertEqual(taken, [(poison, delivery)])
            owners.append(owner)
            self.kill(child)
            if delivery == nodeflow.ISOLATE_AFTER_DEATHS + 1:
                refunds, suspect = self.query("SELECT refunds, suspect FROM messages WHERE id = ?", poison)[0]
                self.assertEqual(
                    (refunds, suspect), (nodeflow.ISOLATE_AFTER_DEATHS, 1), "refunded, then a suspect tried alone"
                )
        # The next receive after the last lease ran out buries the message instead of delivering it.
        child, _, taken = self.start_holder("work", lease=0.5, wait=3)
        self.assertEqual(taken, [])
        self.kill(child)
        letters = self.nf.dead_letters("work")
        self.assertEqual([(d.id, d.body, d.attempts) for d in letters], [(poison, "kills its consumer", deliveries)])
        self.assertIn(f"lease of {owners[-1]} expired after delivery {deliveries}", letters[0].last_error or "")
        self.assertEqual(self.message_rows("work"), 0)

    def make_dead_letters(self, queue: str, bodies: list[Any]) -> list[int]:
        ids = [self.nf.send(queue, body) for body in bodies]
        for _ in range(MAX_DELIVERIES):
            for message in self.nf.receive(queue, batch=len(ids)):
                self.nf.nack(message, error=f"failed {message.body}")
        self.assertEqual([d.id for d in self.nf.dead_letters(queue)], ids)
        return ids

    def test_dead_letters_list_retry_and_purge_through_the_python_api(self) -> None:
        first, second, third = self.make_dead_letters("mail", ["a", "b", "c"])
        self.nf.send("mail", "alive")
        letters = self.nf.dead_letters("mail")
        self.assertEqual(
            [(d.queue, d.body, d.last_error) for d in letters], [("mail", b, f"failed {b}") for b in "abc"]
        )
        self.assertTrue(all(d.died >= d.created for d in letters))
        self.assertEqual(self.nf.dead_letters("other"), [])

        self.assertEqual(self.nf.retry_dead_letters("mail", [second]), 1)
        self.assertEqual([d.id for d in self.nf.dead_letters("mail")], [first, third])
        self.assertEqual(self.nf.queues()["mail"], {"ready": 2, "leased": 0, "delayed": 0, "dead": 2})
        retried = {m.id: m for m in self.nf.receive("mail", batch=10)}
        self.assertEqual(retried[second].attempts, 1, "a retried dead letter starts a fresh delivery count")
        self.assertEqual(retried[second].body, "b")
        for message in retried.values():
            self.nf.ack(message)

        self.assertEqual(self.nf.purge_dead_letters("mail", [third, 999_999]), 1)
        self.assertEqual([d.id for d in self.nf.dead_letters("mail")], [first])
        self.assertEqual(self.nf.retry_dead_letters("mail"), 1)
        self.assertEqual(self.nf.dead_letters("mail"), [])
        self.make_dead_letters("mail2", ["x", "y"])
        self.assertEqual(self.nf.purge_dead_letters("mail2"), 2)
        self.assertEqual(self.nf.dead_letters("mail2"), [])
        self.assertEqual(self.nf.purge_dead_letters("mail2"), 0)

    def test_dead_letters_list_retry_and_purge_through_the_cli(self) -> None:
        first, second, third = self.make_dead_letters("mail", [{"to": "a"}, {"to": "b"}, {"to": "c"}])
        listed = self.cli("dead-letters", "list", "mail", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        report = json.loads(listed.stdout)
        self.assertEqual(report["queue"], "mail")
        self.assertEqual(
            [(e["id"], e["body"], e["attempts"], e["error"]) for e in report["dead_letters"]],
            [(first, {"to": "a"}, 3, "failed {'to': 'a'}"), (second, {"to": "b"}, 3, "failed {'to': 'b'}"),
             (third, {"to": "c"}, 3, "failed {'to': 'c'}")],
        )  # fmt: skip
        self.assertTrue(all(e["died"] for e in report["dead_letters"]))

        only = json.loads(self.cli("dead-letters", "list", "mail", "--id", str(second), "--json").stdout)
        self.assertEqual([e["id"] for e in only["dead_letters"]], [second])
        text = self.cli("dead-letters", "list", "mail")
        self.assertEqual(text.returncode, 0, text.stderr)
        self.assertEqual(
            [line.split("\t")[0] for line in text.stdout.splitlines()], [str(first), str(second), str(third)]
        )
        self.assertIn("3 dead letter(s)", text.stderr)

        retried = self.cli("dead-letters", "retry", "mail", "--id", str(first))
        self.assertEqual((retried.returncode, retried.stdout.split()[0]), (0, "1"), retried.stderr)
        received = self.cli("receive", "mail", "--json")
        self.assertEqual(received.returncode, 0, received.stderr)
        self.assertEqual(
            json.loads(received.stdout), {"id": first, "queue": "mail", "body": {"to": "a"}, "attempts": 1}
        )

        purged = self.cli("dead-letters", "purge", "mail", "--id", str(third))
        self.assertEqual((purged.returncode, purged.stdout.split()[0]), (0, "1"), purged.stderr)
        self.assertEqual([d.id for d in self.nf.dead_letters("mail")], [second])
        purged = self.cli("dead-letters", "purge", "mail")
        self.assertEqual((purged.returncode, purged.stdout.split()[0]), (0, "1"), purged.stderr)
        self.assertEqual(json.loads(self.cli("dead-letters", "list", "mail", "--json").stdout)["dead_letters"], [])
        self.assertEqual(self.message_rows("mail"), 0)

    def test_cli_lists_every_dead_letter_of_a_queue_with_more_than_a_thousand(self) -> None:
        with nodeflow.connect(self.db, settings=nodeflow.Settings(max_deliveries=1)) as nf:

            async def bury_all() -> None:
                await asyncio.gather(*(nf.asend("crowded", n) for n in range(1005)))
                while taken := await nf.areceive("crowded", batch=1000):
                    await asyncio.gather(*(nf.anack(m, error="no") for m in taken))

            asyncio.run(bury_all())
        ids = [row[0] for row in self.query("SELECT id FROM dead_letters WHERE queue = 'crowded' ORDER BY id")]
        self.assertEqual(len(ids), 1005)
        self.assertEqual(self.nf.queues()["crowded"]["dead"], 1005)
        with self.subTest("--id of the last dead letter"):
            only = json.loads(self.run_cli_ok("dead-letters", "list", "crowded", "--id", str(ids[-1]), "--json"))
            self.assertEqual([e["id"] for e in only["dead_letters"]], [ids[-1]])
        with self.subTest("--json lists them all"):
            listed = json.loads(self.run_cli_ok("dead-letters", "list", "crowded", "--json"))
            self.assertEqual([e["id"] for e in listed["dead_letters"]], ids)
        with self.subTest("the text listing counts them all"):
            text = self.cli("dead-letters", "list", "crowded")
            self.assertEqual(len(text.stdout.splitlines()), 1005)
            self.assertIn("1005 dead letter(s)", text.stderr)
        with self.subTest("retry --id of the last dead letter"):
            self.assertEqual(self.run_cli_ok("dead-letters", "retry", "crowded", "--id", str(ids[-1])).split()[0], "1")

    def run_cli_ok(self, *args: str) -> str:
        done = self.cli(*args)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout


# 3. Send options: deduplication keys, delays, priorities ---------------------------------------


class SendOptions(BusTestCase):
    def test_dedup_key_returns_the_first_id_while_queued_and_is_free_again_after_ack(self) -> None:
        first = self.nf.send("jobs", {"v": 1}, key="invoice-7")
        self.assertEqual(self.nf.send("jobs", {"v": 2}, key="invoice-7"), first)
        self.assertEqual(self.message_rows("jobs"), 1, "a duplicate send added a message")
        other_queue = self.nf.send("jobs-2", {"v": 3}, key="invoice-7")
        self.assertNotEqual(other_queue, first, "keys are per queue")
        unkeyed = self.nf.send("jobs", {"v": 4})

        message = self.nf.receive("jobs")
        self.assertEqual((message.id, message.body), (first, {"v": 1}), "the first body is kept")
        self.assertEqual(self.nf.send("jobs", {"v": 5}, key="invoice-7"), first, "still taken while leased")
        self.nf.ack(message)

        again = self.nf.send("jobs", {"v": 6}, key="invoice-7")
        self.assertNotIn(again, (first, other_queue, unkeyed))
        self.assertEqual(self.query("SELECT id, body FROM messages WHERE queue = 'jobs' ORDER BY id"),
                         [(unkeyed, '{"v":4}'), (again, '{"v":6}')])  # fmt: skip

    def test_delayed_message_is_not_received_before_due_and_a_waiter_wakes_for_it(self) -> None:
        # poll_interval 30 s and wait 8 s: only knowing when the delay ends can explain getting the
        # message well before the wait is over.
        with nodeflow.connect(self.db, settings=nodeflow.Settings(poll_interval=30)) as nf:
            sent_at = time.time()
            message_id = nf.send("later", "hello", delay=0.5)
            self.assertIsNone(nf.receive("later"), "received before its delay ended")
            self.assertEqual(nf.queues()["later"]["delayed"], 1)
            started = time.monotonic()
            message = nf.receive("later", wait=8)
            took = time.monotonic() - started
            received_at = time.time()
        self.assertIsNotNone(message, "the delayed message never came")
        self.assertEqual(message.id, message_id)
        self.assertGreaterEqual(received_at, sent_at + 0.5, "received before it was due")
        self.assertLess(took, 6, f"the waiter slept {took:.1f}s: it did not wake when the delay ended")

    def test_duration_strings_delay_too(self) -> None:
        self.nf.send("later", 1, delay="1h")
        self.nf.send("later", 2, delay="250ms")
        self.assertEqual(self.nf.queues()["later"]["delayed"], 2)
        message = self.nf.receive("later", wait=10)
        self.assertEqual(message.body, 2)
        self.assertIsNone(self.nf.receive("later"))

    def test_higher_priority_first_then_first_in_first_out(self) -> None:
        plan = [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1), ("f", 5), ("g", 0), ("h", 2**31 - 1)]
        for body, priority in plan:
            self.nf.send("ordered", body, priority=priority)
        expected = ["h", "b", "d", "f", "a", "c", "g", "e"]
        self.assertEqual([m.body for m in self.nf.receive("ordered", batch=3)], expected[:3])
        received = []
        while (message := self.nf.receive("ordered")) is not None:
            received.append(message.body)
            self.assertEqual(message.priority, dict(plan)[message.body])
        self.assertEqual(received, expected[3:])

    def test_fifo_within_one_priority_over_many_messages(self) -> None:
        sent = [self.nf.send("fifo", n, priority=1) for n in range(200)]
        received = [m.id for m in self.nf.receive("fifo", batch=1000)]
        self.assertEqual(received, sent)


# 4. Leases ---------------------------------------------------------------------------------------


class Leases(BusTestCase):
    def test_expired_lease_redelivers_and_old_holders_ack_raises_lease_lost_rolling_back_also(self) -> None:
        message_id = self.nf.send("work", "job")
        with nodeflow.connect(self.db, settings=SETTINGS) as other:
            first = self.nf.receive("work", lease=0.3)
            self.assertEqual((first.id, first.attempts, first.owner), (message_id, 1, self.nf.id))
            self.assertIsNone(other.receive("work"), "delivered twice while leased")
            second = other.receive("work", lease=30, wait=10)
            self.assertIsNotNone(second, "the message did not come back when its lease ran out")
            self.assertEqual((second.id, second.attempts, second.owner), (message_id, 2, other.id))
            self.assertIn(f"lease of {self.nf.id} expired", second.last_error)

            def note(conn: sqlite3.Connection) -> None:
                conn.execute("INSERT INTO side (note) VALUES ('old holder')")

            with self.assertRaises(nodeflow.LeaseLost):
                self.nf.ack(first, also=note)
            with self.assertRaises(nodeflow.LeaseLost):
                self.nf.nack(first)
            with self.assertRaises(nodeflow.LeaseLost):
                self.nf.extend(first, 60)
            self.assertEqual(self.side_notes(), [], "the old holder's also() writes were committed")
            self.assertEqual(self.nf.queues()["work"]["leased"], 1, "the old holder changed the new lease")
            other.ack(second, also=lambda conn: conn.execute("INSERT INTO side (note) VALUES ('new holder')"))
        self.assertEqual(self.side_notes(), ["new holder"])
        self.assertEqual(self.message_rows("work"), 0)

    def test_extend_keeps_the_message_past_its_first_lease(self) -> None:
        message_id = self.nf.send("work", "long job")
        message = self.nf.receive("work", lease=0.5)
        self.assertEqual(message.id, message_id)
        until = self.nf.extend(message, 60)
        self.assertGreater(until, message.lease_until)
        time.sleep(1.0)  # the first lease has run out by now; the extended one has not
        child, _, taken = self.start_holder("work", lease=30, wait=0)
        self.assertEqual(taken, [], "another process got a message whose lease was extended")
        self.kill(child)
        self.assertEqual(self.nf.queues()["work"]["leased"], 1)
        self.nf.ack(message)  # no LeaseLost: the lease was never lost
        self.assertEqual(self.message_rows("work"), 0)

    def test_sigstopped_consumer_loses_its_lease_to_another_process(self) -> None:
        message_id = self.nf.send("work", "job")
        frozen, frozen_id, taken = self.start_holder("work", lease=1)
        self.assertEqual(taken, [(message_id, 1)])
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            self.wait_until(lambda: process_state(frozen.pid) == "T", 10, "consumer stopped")
            message = self.nf.receive("work", lease=60, wait=20)
            self.assertIsNotNone(message, "the stopped consumer's lease never ran out")
            self.assertEqual((message.id, message.attempts), (message_id, 2))
            self.assertIn(f"lease of {frozen_id} expired", message.last_error)
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        self.tell(frozen, "ack")
        self.assertEqual(self.read_line(frozen, "lost"), f"lost {message_id}")
        self.assertEqual(self.side_notes(), [], "the woken consumer's also() writes were committed")
        self.nf.ack(message)
        self.assertEqual(self.message_rows("work"), 0)

    def test_release_leases_hands_back_a_killed_processes_messages_at_once(self) -> None:
        ids = [self.nf.send("work", n) for n in range(3)]
        spare = self.nf.send("work", "not taken", priority=-1)
        child, owner, taken = self.start_holder("work", lease=600, batch=3)
        self.assertEqual(sorted(taken), [(i, 1) for i in ids])
        self.kill(child)
        # Still leased for ten minutes: only release_leases can hand them back now.
        self.assertEqual([m.id for m in self.nf.receive("work", batch=10)], [spare])
        self.assertEqual(self.nf.release_leases("nobody-at-all"), 0)
        self.assertEqual(self.nf.release_leases(owner), 3)
        again = self.nf.receive("work", batch=10)
        self.assertEqual(sorted((m.id, m.attempts) for m in again), [(i, 2) for i in ids])
        self.assertTrue(all(owner in (m.last_error or "") for m in again))
        self.assertEqual(self.nf.release_leases(owner), 0)


# 5. Transactional ack ---------------------------------------------------------------------------


class TransactionalAck(BusTestCase):
    def test_also_writes_and_the_ack_commit_together(self) -> None:
        self.nf.send("work", {"order": 7})
        message = self.nf.receive("work")

        def record(conn: sqlite3.Connection) -> int:
            return conn.execute("INSERT INTO side (note) VALUES (?)", (f"order {message.body['order']}",)).lastrowid

        row = self.nf.ack(message, also=record)
        self.assertEqual(self.query("SELECT id, note FROM side"), [(row, "order 7")])
        self.assertEqual(self.message_rows("work"), 0)
        # Seen from another process too: both were committed.
        rc, out, err = self.finish(
            self.spawn_python(
                """
                import os, nodeflow
                nf = nodeflow.connect(os.environ["NODEFLOW_DB"])
                rows = nf.store.read(lambda c: c.execute("SELECT count(*) FROM messages").fetchone()[0])
                notes = nf.store.read(lambda c: c.execute("SELECT note FROM side").fetchall())
                print(rows, notes)
                """
            )
        )
        self.assertEqual((rc, out.strip()), (0, "0 [('order 7',)]"), err)

    def test_also_raising_leaves_neither_its_writes_nor_the_ack_and_the_message_stays_leased(self) -> None:
        message_id = self.nf.send("work", "job")
        message = self.nf.receive("work", lease=60)

        def half_done(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO side (note) VALUES ('half')")
            raise RuntimeError("handler failed half-way")

        with self.assertRaisesRegex(RuntimeError, "half-way"):
            self.nf.ack(message, also=half_done)
        self.assertEqual(self.side_notes(), [])
        self.assertEqual(self.nf.queues()["work"], {"ready": 0, "leased": 1, "delayed": 0, "dead": 0})
        child, _, taken = self.start_holder("work", lease=30, wait=0)
        self.assertEqual(taken, [], "the message was handed to another process after a failed ack")
        self.kill(child)
        # A failing SQL statement in also() rolls back the same way.
        with self.assertRaises(nodeflow.StoreError):
            self.nf.ack(message, also=lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)"))
        self.assertEqual(self.message_rows("work"), 1)
        self.nf.ack(message, also=lambda conn: conn.execute("INSERT INTO side (note) VALUES ('whole')"))
        self.assertEqual(self.side_notes(), ["whole"])
        self.assertEqual(self.query("SELECT id FROM messages WHERE id = ?", message_id), [])

    def test_a_failing_also_in_a_shared_transaction_rolls_back_only_its_own_ack(self) -> None:
        for n in range(12):
            self.nf.send("work", n)
        messages = self.nf.receive("work", lease=60, batch=12)
        self.assertEqual(len(messages), 12)
        doomed = messages[5].id

        def note_for(message: nodeflow.Message) -> Any:
            def note(conn: sqlite3.Connection) -> None:
                conn.execute("INSERT INTO side (note) VALUES (?)", (f"ack {message.id}",))
                if message.id == doomed:
                    raise RuntimeError("this one fails")

            return note

        async def ack_all() -> list[Any]:
            return await asyncio.gather(*(self.nf.aack(m, also=note_for(m)) for m in messages), return_exceptions=True)

        # Another process holds the writer lock while the twelve acks queue up, so that they
        # are sure to end up in one transaction once it lets go.
        blocker = self.spawn_python(WRITER_LOCK_HOLDER, stdin=subprocess.PIPE)
        self.read_line(blocker, "held")
        batches, pieces = self.nf.committer.batches, self.nf.committer.pieces
        outcomes: list[Any] = []
        acks = threading.Thread(target=lambda: outcomes.extend(asyncio.run(ack_all())))
        acks.start()
        self.wait_until(lambda: os.getpid() in blocked_flock_waiters(), 20, "committer waiting for the writer lock")
        self.tell(blocker)
        acks.join(30)
        self.assertFalse(acks.is_alive())
        self.assertEqual(self.finish(blocker)[0], 0)

        self.assertEqual(self.nf.committer.pieces - pieces, 12)
        self.assertLess(self.nf.committer.batches - batches, 12, "the acks did not share a transaction")
        failed = [m.id for m, outcome in zip(messages, outcomes, strict=True) if isinstance(outcome, Exception)]
        self.assertEqual(failed, [doomed])
        self.assertEqual(sorted(self.side_notes()), sorted(f"ack {m.id}" for m in messages if m.id != doomed))
        self.assertEqual(self.query("SELECT id FROM messages WHERE queue = 'work'"), [(doomed,)])


# 6. Doorbells -------------------------------------------------------------------------------------


class Doorbells(BusTestCase):
    def start_receiver(self, queue: str, poll: float, wait: float) -> tuple[subprocess.Popen, str]:
        child = self.spawn_python(WAITING_RECEIVER, queue, str(poll), str(wait), stdin=subprocess.PIPE)
        node = self.read_line(child, "listening").split()[1]
        return child, node

    def receive_in_child(
        self, child: subprocess.Popen, queue: str, wait: float, before_send: Any = None
    ) -> tuple[Any, float, int]:
        """Let the child start its receive, send one message; what it got, how long it took, rings sent."""
        self.tell(child)
        self.read_line(child, "receiving")
        time.sleep(0.5)  # it is sleeping in its wait by now, having found the queue empty
        if before_send is not None:
            before_send()
        rings = self.nf.doorbells.rings_sent
        self.nf.send(queue, {"ping": 1})
        rings = self.nf.doorbells.rings_sent - rings
        line = self.read_line(child, "result ", timeout=wait + 20)
        body_json, took = line.removeprefix("result ").rsplit(" ", 1)
        rc, _, err = self.finish(child)
        self.assertEqual(rc, 0, err)
        return json.loads(body_json), float(took), rings

    def test_waiting_receiver_in_another_process_wakes_on_the_doorbell(self) -> None:
        # Polling every 120 s, waiting up to 30 s: without a ring it would not look again before
        # the 30 s are over, so a wake well inside them is the doorbell's doing.
        child, node = self.start_receiver("pings", poll=120, wait=30)
        self.assertTrue(os.path.exists(os.path.join(self.db + ".d", "nodes", f"{node}.sock")))
        body, took, rings = self.receive_in_child(child, "pings", wait=30)
        self.assertEqual(body, {"ping": 1})
        self.assertEqual(rings, 1, "the send did not ring the receiver's doorbell")
        self.assertLess(took, 15, f"woke after {took:.1f}s: the doorbell did not ring")

    def test_the_doorbell_folder_is_listed_again_when_it_changed_and_only_then(self) -> None:
        first, first_node = self.start_receiver("other", poll=120, wait=30)
        time.sleep(0.1)  # past the file system clock's tick: an unchanged mtime can be trusted now
        self.nf.doorbells.ring({"q:nobody"})
        listed = self.nf.doorbells._listed
        self.assertEqual([name for name, _ in listed[2]], [f"{first_node}.sock"])
        self.nf.doorbells.ring({"q:nobody"})
        self.assertIs(self.nf.doorbells._listed, listed, "the unchanged folder was listed again")
        # A receiver that joins now changes the folder: the next send lists it again and rings it.
        second, second_node = self.start_receiver("pings", poll=120, wait=30)
        body, took, rings = self.receive_in_child(second, "pings", wait=30)
        self.assertEqual(body, {"ping": 1})
        self.assertEqual(rings, 2, "the send did not ring both doorbells")
        self.assertIn(f"{second_node}.sock", [name for name, _ in self.nf.doorbells._listed[2]])
        self.assertLess(took, 15, f"woke after {took:.1f}s: the new receiver's doorbell did not ring")
        self.kill(first)

    def test_receiver_without_doorbell_sockets_still_gets_the_message_by_polling(self) -> None:
        nodes = os.path.join(self.db + ".d", "nodes")

        def remove_every_doorbell() -> None:
            sockets = glob.glob(os.path.join(nodes, "*.sock"))
            self.assertTrue(sockets)
            for path in sockets:
                os.unlink(path)

        # The listener binds a new doorbell when it notices its file is gone (once per poll
        # interval). Should it do so between the removal and the send, the ring gets through and
        # proves nothing about polling: then the round is run again.
        for _ in range(3):
            child, _ = self.start_receiver("pings", poll=0.5, wait=30)
            body, took, rings = self.receive_in_child(child, "pings", wait=30, before_send=remove_every_doorbell)
            self.assertEqual(body, {"ping": 1})
            if rings == 0:
                break
        self.assertEqual(rings, 0, "every round's ring reached a doorbell bound again in time")
        self.assertLess(took, 15, f"woke after {took:.1f}s: the receiver did not poll every 0.5 s")


# 7. Competing consumers -------------------------------------------------------------------------------


class CompetingConsumers(BusTestCase):
    def test_three_consumers_share_two_thousand_messages_without_duplicates(self) -> None:
        stop = os.path.join(self.dir, "stop")
        logs = [os.path.join(self.dir, f"consumer-{n}.log") for n in range(3)]
        consumers = [self.spawn_python(PLAIN_CONSUMER, "shared", log, stop) for log in logs]
        for consumer in consumers:
            self.read_line(consumer, "ready")

        # Sent in 20 bursts: the queue runs empty between them, so the consumers often compete
        # for the last ready message while others are still held.
        async def send_all() -> list[int]:
            ids: list[int] = []
            for first in range(0, 2000, 100):
                ids += await asyncio.gather(*(self.nf.asend("shared", n) for n in range(first, first + 100)))
                await asyncio.sleep(0.1)
            return ids

        sent = asyncio.run(send_all())
        self.wait_until(lambda: self.message_rows("shared") == 0, 60, "all 2,000 messages acked")
        open(stop, "w").close()
        for consumer in consumers:
            rc, _, err = self.finish(consumer)
            self.assertEqual(rc, 0, err)
        receipts: list[list[tuple[int, int]]] = []
        for log in logs:
            with open(log) as f:
                receipts.append([(int(line.split()[0]), int(line.split()[1])) for line in f])
        every = [message_id for receipt in receipts for message_id, _ in receipt]
        self.assertEqual(len(every), 2000, f"receipts per consumer: {[len(r) for r in receipts]}")
        self.assertEqual(sorted(every), sorted(sent), "a message was received twice or never")
        self.assertEqual({attempts for receipt in receipts for _, attempts in receipt}, {1})
        print(f"\n  receipts per consumer: {[len(r) for r in receipts]}", flush=True)


# 8. Fair sharing between writer processes -----------------------------------------------------------------


class Fairness(BusTestCase):
    def test_three_writer_processes_each_get_a_fair_share(self) -> None:
        go = os.path.join(self.dir, "go")
        writers = {name: self.spawn_python(WRITER, name, go, "3") for name in ("w1", "w2", "w3")}
        for writer in writers.values():
            self.read_line(writer, "ready")
        open(go, "w").close()
        reported = {
            name: int(self.read_line(writer, "sent", timeout=60).split()[1]) for name, writer in writers.items()
        }
        for writer in writers.values():
            rc, _, err = self.finish(writer)
            self.assertEqual(rc, 0, err)
        stored = dict(
            self.query("SELECT json_extract(body, '$.writer'), count(*) FROM messages WHERE queue = 'fair' GROUP BY 1")
        )
        self.assertEqual(stored, reported, "every send that returned is in the database")
        total = sum(reported.values())
        print(f"\n  sends per writer in 3 s: {reported}", flush=True)
        for name, count in reported.items():
            self.assertGreaterEqual(count, total * 0.2, f"{name} was starved: {reported}")


# 9. Group commit ---------------------------------------------------------------------------------------


class GroupCommit(BusTestCase):
    def test_sixteen_concurrent_async_senders_share_transactions(self) -> None:
        with nodeflow.connect(self.db) as nf:

            async def sender(number: int) -> list[int]:
                return [await nf.asend("grouped", {"sender": number, "n": n}) for n in range(25)]

            async def run() -> list[list[int]]:
                return await asyncio.gather(*(sender(number) for number in range(16)))

            ids = asyncio.run(run())
            batches, pieces = nf.committer.batches, nf.committer.pieces
        self.assertEqual(pieces, 16 * 25)
        self.assertLess(batches, pieces, "every send had a transaction of its own")
        self.assertEqual(len({i for chunk in ids for i in chunk}), 16 * 25)
        bodies = [json.loads(row[0]) for row in self.query("SELECT body FROM messages WHERE queue = 'grouped'")]
        self.assertEqual(sorted((b["sender"], b["n"]) for b in bodies), [(s, n) for s in range(16) for n in range(25)])
        print(f"\n  400 sends in {batches} transactions", flush=True)


# 10. CLI ----------------------------------------------------------------------------------------------------


def one_error_line(test: unittest.TestCase, stderr: str) -> None:
    lines = stderr.splitlines()
    test.assertEqual(len(lines), 1, f"expected one line on stderr, got: {stderr!r}")
    test.assertTrue(lines[0].startswith("nodeflow: "), lines[0])


# Each: arguments after --db, and a word the error line must contain.
BAD_CLI_INPUT: list[tuple[tuple[str, ...], str]] = [
    (("send", "q", "{bad"), "JSON"),
    (("send", "q", "NaN"), "JSON"),
    (("send", "q", "[1, Infinity]"), "JSON"),
    (("send", "q"), "body"),
    (("send", "", "1"), "queue"),
    (("send", "a\tb", "1"), "queue"),
    (("send", "q" * 201, "1"), "queue"),
    (("send", "q", "1", "--delay", "soon"), "--delay"),
    (("send", "q", "1", "--delay", "-1"), "--delay"),
    (("send", "q", "1", "--delay", "30s1m"), "--delay"),
    (("send", "q", "1", "--priority", "high"), "--priority"),
    (("send", "q", "1", "--priority", "1.5"), "--priority"),
    (("send", "q", "1", "--priority", str(2**31)), "priority"),
    (("send", "q", "1", "--key", ""), "key"),
    (("send", "q", "1", "--bogus"), "--bogus"),
    (("receive", ""), "queue"),
    (("receive", "q", "--wait", "forever"), "--wait"),
    (("receive", "q", "--bogus"), "--bogus"),
    (("dead-letters", "list", ""), "queue"),
    (("dead-letters", "resurrect", "q"), "resurrect"),
    (("dead-letters", "retry", "q", "--id", "seven"), "--id"),
    (("status", "--bogus"), "--bogus"),
    (("frobnicate",), "frobnicate"),
]


class Cli(ClusterTestCase):
    def run_ok(self, *args: str) -> str:
        done = self.cli(*args)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def status(self) -> dict[str, Any]:
        return json.loads(self.run_ok("status", "--json"))

    def test_send_receive_and_status_json(self) -> None:
        first = int(self.run_ok("send", "jobs", '{"to": "a@b.c"}', "--priority", "3"))
        later = int(self.run_ok("send", "jobs", "[1, 2]", "--delay", "1h"))
        keyed = int(self.run_ok("send", "jobs", '"x"', "--key", "k1", "--priority", "-1"))
        self.assertEqual(int(self.run_ok("send", "jobs", '"y"', "--key", "k1")), keyed)
        self.assertEqual(len({first, later, keyed}), 3)
        report = self.status()
        self.assertEqual(report["queues"], {"jobs": {"ready": 2, "leased": 0, "delayed": 1, "dead": 0}})
        self.assertEqual((report["nodes"], report["scheduler"], report["locks"]), ([], None, []))
        self.assertIn("queue 'jobs': 2 ready, 0 leased, 1 delayed, 0 dead", self.run_ok("status"))

        received = json.loads(self.run_ok("receive", "jobs", "--json"))
        self.assertEqual(received, {"id": first, "queue": "jobs", "body": {"to": "a@b.c"}, "attempts": 1})
        self.assertEqual(json.loads(self.run_ok("receive", "jobs")), "x")
        self.assertEqual(self.status()["queues"]["jobs"], {"ready": 0, "leased": 0, "delayed": 1, "dead": 0})
        empty = self.cli("receive", "jobs")  # only the delayed one is left
        self.assertEqual((empty.returncode, empty.stdout), (1, ""))
        one_error_line(self, empty.stderr)
        self.assertIn("no message", empty.stderr)

    def test_receive_waits_for_a_send_from_another_process(self) -> None:
        self.run_ok("send", "warm", "0")  # the database must exist: receive never creates it
        waiting = self.spawn_cli("receive", "inbox", "--wait", "30", "--json")
        time.sleep(0.3)
        sent = int(self.run_ok("send", "inbox", '{"n": 1}'))
        rc, out, err = self.finish(waiting, timeout=60)
        self.assertEqual(rc, 0, err)
        self.assertEqual(json.loads(out), {"id": sent, "queue": "inbox", "body": {"n": 1}, "attempts": 1})

    def test_receive_on_an_empty_queue_exits_1_and_writes_nothing(self) -> None:
        self.run_ok("send", "other", "1")
        before = tree_snapshot(self.db)
        done = self.cli("receive", "empty")
        self.assertEqual((done.returncode, done.stdout), (1, ""))
        one_error_line(self, done.stderr)
        self.assertEqual(tree_snapshot(self.db), before)

    def test_receive_and_dead_letters_never_create_the_database(self) -> None:
        for args in (("receive", "q"), ("dead-letters", "list", "q"), ("status",)):
            with self.subTest(args=args):
                done = self.cli(*args)
                self.assertEqual(done.returncode, 1, done.stderr)
                one_error_line(self, done.stderr)
                self.assertFalse(os.path.exists(self.db))

    def assert_refused(self, args: tuple[str, ...], word: str) -> None:
        done = self.cli(*args)
        self.assertEqual(done.returncode, 2, f"stdout={done.stdout!r} stderr={done.stderr[:500]!r}")
        one_error_line(self, done.stderr)
        self.assertIn(word, done.stderr)
        self.assertEqual(done.stdout, "")

    def test_bad_input_exits_2_and_creates_no_database(self) -> None:
        for args, word in BAD_CLI_INPUT:
            with self.subTest(args=[a[:40] for a in args]):
                self.assert_refused(args, word)
                self.assertFalse(os.path.exists(self.db), "bad input created the database")
                self.assertFalse(os.path.exists(self.db + ".d"), "bad input created the lock folder")

    def test_bad_input_exits_2_and_leaves_an_existing_database_unchanged(self) -> None:
        self.run_ok("send", "q", '{"keep": true}')
        before = tree_snapshot(self.db)
        for args, word in BAD_CLI_INPUT:
            with self.subTest(args=[a[:40] for a in args]):
                self.assert_refused(args, word)
                self.assertEqual(tree_snapshot(self.db), before, "bad input changed the database")
        self.assertEqual(self.status()["queues"], {"q": {"ready": 1, "leased": 0, "delayed": 0, "dead": 0}})

    def main_in_child(self, *args: str, body: str) -> tuple[int, str, str]:
        """Run ``main(["--db", DB, *args, BODY])`` in a child, the body coming through a pipe.

        Linux limits one exec argument to 128 KiB (MAX_ARG_STRLEN), so a body over 1 MiB can only
        reach the CLI code this way."""
        child = self.spawn_python(CLI_MAIN_WITH_BODY_FROM_STDIN, *args, stdin=subprocess.PIPE)
        out, err = child.communicate(input=body, timeout=60)
        return child.returncode, out, err

    def test_body_over_one_mib_exits_2_and_writes_nothing(self) -> None:
        too_big = json.dumps("x" * (MIB - 1))  # MiB + 1 bytes of JSON with its quotes
        rc, out, err = self.main_in_child("send", "q", body=too_big)
        self.assertEqual((rc, out), (2, ""), err)
        one_error_line(self, err)
        self.assertIn("limit", err)
        self.assertFalse(os.path.exists(self.db), "a refused send created the database")

        self.run_ok("send", "q", "0")
        before = tree_snapshot(self.db)
        rc, out, err = self.main_in_child("send", "q", body=too_big)
        self.assertEqual((rc, out), (2, ""), err)
        self.assertEqual(tree_snapshot(self.db), before, "a refused send changed the database")

        rc, out, err = self.main_in_child("send", "q", body=json.dumps("x" * (MIB - 2)))  # exactly the limit
        self.assertEqual(rc, 0, err)
        with nodeflow.connect(self.db) as nf:
            self.assertEqual(len(nf.receive("q", batch=2)[1].body), MIB - 2)

    def test_too_long_key_is_refused_before_the_database_is_created(self) -> None:
        self.assert_refused(("send", "q", "1", "--key", "k" * 1025), "key")
        self.assertFalse(os.path.exists(self.db), "a refused send created the database")

    def test_body_or_key_that_cannot_be_stored_is_bad_input(self) -> None:
        cases = [
            # Valid JSON text whose string has no UTF-8 form, so SQLite cannot store it.
            ("lone surrogate in body", ("send", "q", '"\\ud800"'), "body"),
            # A byte that is not UTF-8 reaches Python as a lone surrogate (surrogateescape).
            ("non-UTF-8 key", ("send", "q", "1", "--key", "k\udcff"), "key"),
            # Valid JSON nested deeper than the decoder's recursion limit (100 KB, under the argv limit).
            ("deeply nested body", ("send", "q", "[" * 50_000 + "]" * 50_000), "body"),
        ]
        for name, args, word in cases:
            with self.subTest(name):
                self.assert_refused(args, word)
                self.assertFalse(os.path.exists(self.db), "a refused send created the database")


# 11. Bad input through the Python API -----------------------------------------------------------------------


class ApiBadInput(ClusterTestCase):
    def setUp(self) -> None:
        super().setUp()
        with nodeflow.connect(self.db) as nf:
            self.kept = nf.send("q", {"keep": True})
        self.before = tree_snapshot(self.db)

    def assert_nothing_written(self, nf: nodeflow.Cluster) -> None:
        self.assertEqual(nf.committer.pieces, 0, "bad input reached the committer")
        self.assertEqual(nf.queues(), {"q": {"ready": 1, "leased": 0, "delayed": 0, "dead": 0}})
        nf.close()
        self.assertEqual(tree_snapshot(self.db), self.before, "bad input changed the database")

    def test_bad_send_arguments_raise_invalid_input_and_write_nothing(self) -> None:
        class Opaque:
            pass

        cases: list[tuple[str, dict[str, Any]]] = [
            ("set body", {"body": {1, 2}}),
            ("nan body", {"body": float("nan")}),
            ("infinite body", {"body": [float("inf")]}),
            ("object body", {"body": Opaque()}),
            ("bytes body", {"body": b"bytes"}),
            ("tuple key", {"body": {(1, 2): "x"}}),
            ("nested set", {"body": {"a": [{"b": {3}}]}}),
            ("body over 1 MiB", {"body": "x" * MIB}),
            ("float priority", {"priority": 1.5}),
            ("string priority", {"priority": "3"}),
            ("bool priority", {"priority": True}),
            ("None priority", {"priority": None}),
            ("huge priority", {"priority": 2**31}),
            ("tiny priority", {"priority": -(2**31) - 1}),
            ("negative delay", {"delay": -1}),
            ("negative delay text", {"delay": "-1s"}),
            ("garbage delay", {"delay": "soon"}),
            ("units out of order", {"delay": "30s1m"}),
            ("nan delay", {"delay": float("nan")}),
            ("infinite delay", {"delay": float("inf")}),
            ("bool delay", {"delay": True}),
            ("None delay", {"delay": None}),
            ("list delay", {"delay": [1]}),
            ("empty queue", {"queue": ""}),
            ("None queue", {"queue": None}),
            ("int queue", {"queue": 7}),
            ("newline queue", {"queue": "a\nb"}),
            ("NUL queue", {"queue": "a\x00b"}),
            ("long queue", {"queue": "q" * 201}),
            ("empty key", {"key": ""}),
            ("int key", {"key": 5}),
            ("long key", {"key": "k" * 1025}),
        ]
        nf = nodeflow.connect(self.db)
        for name, change in cases:
            arguments = {"queue": "q", "body": {"ok": 1}, **change}
            with self.subTest(name):
                with self.assertRaises(nodeflow.InvalidInput):
                    nf.send(**arguments)

                async def asend(arguments: dict[str, Any] = arguments) -> None:
                    await nf.asend(**arguments)

                with self.assertRaises(nodeflow.InvalidInput):
                    asyncio.run(asend())
        self.assert_nothing_written(nf)

    def test_bad_receive_arguments_raise_invalid_input_and_write_nothing(self) -> None:
        cases: list[tuple[str, dict[str, Any]]] = [
            ("zero lease", {"lease": 0}),
            ("negative lease", {"lease": -5}),
            ("garbage lease", {"lease": "long"}),
            ("negative wait", {"wait": -1}),
            ("garbage wait", {"wait": "a while"}),
            ("zero batch", {"batch": 0}),
            ("huge batch", {"batch": 1001}),
            ("bool batch", {"batch": True}),
            ("float batch", {"batch": 2.0}),
            ("empty queue", {"queue": ""}),
            ("int queue", {"queue": 3}),
        ]
        nf = nodeflow.connect(self.db)
        for name, change in cases:
            with self.subTest(name), self.assertRaises(nodeflow.InvalidInput):
                nf.receive(**{"queue": "q", **change})
        for bad in ("", None, 7):
            with self.subTest(dead_letters=bad), self.assertRaises(nodeflow.InvalidInput):
                nf.dead_letters(bad)  # type: ignore[arg-type]
        self.assert_nothing_written(nf)

    def test_bad_nack_and_extend_arguments_raise_invalid_input_and_change_nothing(self) -> None:
        with nodeflow.connect(self.db) as nf:
            message = nf.receive("q", lease=60)
            for bad in (-1, "soon", float("nan")):
                with self.subTest(nack_delay=bad), self.assertRaises(nodeflow.InvalidInput):
                    nf.nack(message, delay=bad)
                with self.subTest(extend=bad), self.assertRaises(nodeflow.InvalidInput):
                    nf.extend(message, bad)
            self.assertEqual(nf.queues()["q"], {"ready": 0, "leased": 1, "delayed": 0, "dead": 0})
            nf.ack(message)

    def test_body_or_key_that_cannot_be_stored_raises_invalid_input(self) -> None:
        nested: list[Any] = []
        for _ in range(100_000):
            nested = [nested]
        nf = nodeflow.connect(self.db)
        for name, arguments in (
            ("lone surrogate in body", {"body": "\ud800"}),
            ("lone surrogate in a key of the body", {"body": {"\udcff": 1}}),
            ("lone surrogate in the dedup key", {"body": 1, "key": "\udcff"}),
            ("body nested too deep for JSON", {"body": nested}),
        ):
            with self.subTest(name), self.assertRaises(nodeflow.InvalidInput):
                nf.send("q", **arguments)
        self.assert_nothing_written(nf)


if __name__ == "__main__":
    unittest.main()


# Waits up to argv[1] seconds for a message of queue "q" (poll interval 0.5 s); prints its body.
TURN_WAITER = """
    import json, os, sys, nodeflow
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"], settings=nodeflow.Settings(poll_interval=0.5))
    print("waiting", flush=True)
    message = nf.receive("q", wait=float(sys.argv[1]))
    print("got", json.dumps(None if message is None else message.body), flush=True)
    if message is not None:
        nf.ack(message)
"""


class StoppedWaiter(ClusterTestCase):
    def turn_holder(self) -> int | None:
        """The pid holding queue q's waiting turn (PATH.d/receivers/), from the kernel's lock table."""
        path = os.path.join(self.db + ".d", "receivers", nodeflow.lock_file_name("q"))
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return None
        owners = nodeflow._kernel_flock_owners() or {}
        return owners.get((os.major(info.st_dev), os.minor(info.st_dev), info.st_ino))

    def test_a_stopped_waiting_receiver_does_not_starve_the_other_consumers(self) -> None:
        nf = nodeflow.connect(self.db)
        self.addCleanup(nf.close)
        first = self.spawn_python(TURN_WAITER, "60")
        self.read_line(first, "waiting")
        self.wait_until(lambda: self.turn_holder() == first.pid, 20, "the first receiver holds the turn")
        os.kill(first.pid, signal.SIGSTOP)
        self.addCleanup(lambda: first.poll() is None and os.kill(first.pid, signal.SIGCONT))
        second = self.spawn_python(TURN_WAITER, "20")
        self.read_line(second, "waiting")
        nf.send("q", {"for": "anyone"})
        # Without a bound on waiting for the turn, the second receiver would wait behind the stopped
        # one for all of its 20 s and get nothing.
        got = self.read_line(second, "got", timeout=15)
        self.assertEqual(json.loads(got.split(" ", 1)[1]), {"for": "anyone"})
        self.assertEqual(self.turn_holder(), first.pid, "the stopped receiver still has the turn")


# 13. Several messages a commit: send_many, receive(batch=N, ack=...), ack_many ---------------------------


class Batches(BusTestCase):
    def test_send_many_queues_every_body_in_order_in_one_commit(self) -> None:
        before = self.nf.committer.batches
        ids = self.nf.send_many("work", [{"n": n} for n in range(50)], priority=2)
        self.assertEqual(self.nf.committer.batches, before + 1, "send_many took more than one commit")
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 50)
        taken = self.nf.receive("work", batch=100)
        self.assertEqual([m.id for m in taken], ids, "not delivered in the order sent")
        self.assertEqual([m.body for m in taken], [{"n": n} for n in range(50)])
        self.assertEqual({m.priority for m in taken}, {2})

    def test_send_many_keys_deduplicate_as_send_does(self) -> None:
        first = self.nf.send("work", "a", key="k1")
        ids = self.nf.send_many("work", ["again", "b", "c"], keys=["k1", None, "k2"])
        self.assertEqual(ids[0], first, "a key in use did not return the queued message's id")
        self.assertEqual(self.message_rows("work"), 3)
        self.assertEqual(self.nf.send_many("work", ["d"], keys=["k2"]), [ids[2]])

    def test_send_many_refuses_bad_input_and_queues_none_of_it(self) -> None:
        self.nf.send("work", "kept")
        snapshot = tree_snapshot(self.db)
        too_many = [0] * (nodeflow.SEND_MANY_MAX + 1)
        near_mib = "x" * (MIB - 100)
        cases: list[tuple[str, dict[str, Any]]] = [
            ("one bad body among good ones", {"bodies": [1, 2, {3}]}),
            ("a body over 1 MiB", {"bodies": ["x" * MIB]}),
            ("a dict, not a list", {"bodies": {"a": 1}}),
            ("a string, not a list", {"bodies": "abc"}),
            ("bytes, not a list", {"bodies": bytearray(b"ab")}),
            ("a memoryview, not a list", {"bodies": memoryview(b"ab")}),
            ("an endless generator", {"bodies": itertools.count()}),
            ("endless keys", {"bodies": [1, 2], "keys": itertools.repeat("k")}),
            ("not iterable", {"bodies": 5}),
            ("too many", {"bodies": too_many}),
            ("too many bytes", {"bodies": [near_mib] * 65}),
            ("fewer keys than bodies", {"bodies": [1, 2], "keys": ["a"]}),
            ("a bad key", {"bodies": [1, 2], "keys": ["a", ""]}),
            ("keys as a string", {"bodies": [1, 2], "keys": "ab"}),
            ("a bad delay", {"bodies": [1], "delay": -1}),
            ("a bad priority", {"bodies": [1], "priority": 1.5}),
            ("a bad queue", {"bodies": [1], "queue": ""}),
        ]
        pieces = self.nf.committer.pieces
        for name, change in cases:
            with self.subTest(name), self.assertRaises(nodeflow.InvalidInput) as caught:
                self.nf.send_many(**{"queue": "work", **change})
            self.assertNotIn("\n", str(caught.exception))
        self.assertEqual(self.nf.committer.pieces, pieces, "bad input reached the committer")
        self.assertEqual(tree_snapshot(self.db), snapshot, "bad input changed the database")

    def test_nothing_to_send_or_ack_costs_no_commit(self) -> None:
        before = self.nf.committer.batches
        self.assertEqual(self.nf.send_many("work", []), [])
        self.assertEqual(self.nf.send_many("work", iter(())), [])
        self.assertEqual(self.nf.ack_many([]), [])
        self.assertEqual(self.nf.committer.batches, before)

    def test_ack_many_acks_what_is_still_held_and_returns_the_lost_ones(self) -> None:
        ids = self.nf.send_many("work", list(range(5)))
        taken = self.nf.receive("work", lease=0.3, batch=5)
        self.assertEqual([m.id for m in taken], ids)
        with nodeflow.connect(self.db, settings=SETTINGS) as other:
            time.sleep(0.4)  # every lease has run out; the other handle takes two of them again
            again = other.receive("work", lease=60, batch=2)
            self.assertEqual([m.id for m in again], ids[:2])
            before = self.nf.committer.batches
            lost = self.nf.ack_many(taken)
            self.assertEqual(self.nf.committer.batches, before + 1)
            self.assertEqual([m.id for m in lost], ids[:2], "ack_many did not name the messages it lost")
            self.assertEqual(self.query("SELECT id FROM messages ORDER BY id"), [(i,) for i in ids[:2]])
            self.assertEqual(other.ack_many(again), [])
        self.assertEqual(self.message_rows("work"), 0)

    def test_receive_acks_the_previous_message_in_the_same_commit_as_the_next_claim(self) -> None:
        ids = self.nf.send_many("work", ["a", "b", "c"])
        first = self.nf.receive("work")
        before = self.nf.committer.batches
        second = self.nf.receive("work", ack=first)
        self.assertEqual(self.nf.committer.batches, before + 1, "the ack and the claim took two commits")
        self.assertEqual(second.id, ids[1])
        self.assertEqual(self.query("SELECT id, lease_owner IS NOT NULL FROM messages ORDER BY id"),
                         [(ids[1], 1), (ids[2], 0)])  # fmt: skip
        rest = self.nf.receive("work", batch=5, ack=[second])
        self.assertEqual([m.id for m in rest], [ids[2]])
        self.assertIsNone(self.nf.receive("work", ack=rest))
        self.assertEqual(self.message_rows("work"), 0)

    def test_receive_whose_ack_lost_its_lease_raises_and_neither_acks_nor_claims(self) -> None:
        ids = self.nf.send_many("work", ["a", "b"])
        held = self.nf.receive("work", lease=30)
        short = self.nf.receive("work", lease=0.3)
        with nodeflow.connect(self.db, settings=SETTINGS) as other:
            time.sleep(0.4)
            taken = other.receive("work", lease=60)
            self.assertEqual(taken.id, short.id)
            waiting = other.send("work", "c")
            with self.assertRaises(nodeflow.LeaseLost) as caught:
                self.nf.receive("work", ack=[held, short])
            self.assertIn(f"message {short.id}", str(caught.exception))
            rows = dict(self.query("SELECT id, lease_owner FROM messages"))
            self.assertEqual(rows, {ids[0]: self.nf.id, ids[1]: other.id, waiting: None},
                             "a refused receive acked or claimed something")  # fmt: skip
            self.nf.ack(held)  # it was never acked: its lease is still good
            other.ack(taken)

    def test_an_ack_given_to_a_waiting_receive_is_committed_before_it_waits(self) -> None:
        self.nf.send("work", "only")
        message = self.nf.receive("work")
        outcome: list[Any] = []
        waiter = threading.Thread(target=lambda: outcome.append(self.nf.receive("work", wait=20, ack=message)))
        waiter.start()
        with nodeflow.connect(self.db, settings=SETTINGS) as other:
            self.wait_until(lambda: other.queues().get("work", {}).get("leased", 0) == 0, 10, "ack committed")
            self.assertTrue(waiter.is_alive(), "the receive stopped waiting")
            sent = other.send("work", "next")
        waiter.join(20)
        self.assertEqual([m.id for m in outcome], [sent])

    def test_bad_messages_to_settle_are_refused_before_anything_is_written(self) -> None:
        self.nf.send("work", "x")
        message = self.nf.receive("work")
        snapshot = tree_snapshot(self.db)
        for bad in ("text", 7, [message, "text"], {"id": 1}, [None], [message, message], itertools.repeat(message)):
            with self.subTest(bad=bad):
                with self.assertRaises(nodeflow.InvalidInput):
                    self.nf.ack_many(bad)  # type: ignore[arg-type]
                with self.assertRaises(nodeflow.InvalidInput):
                    self.nf.receive("work", ack=bad)  # type: ignore[arg-type]
        with self.assertRaises(nodeflow.InvalidInput):
            self.nf.ack_many([message] * (nodeflow.SETTLE_MANY_MAX + 1))
        self.assertEqual(tree_snapshot(self.db), snapshot)
        self.nf.ack(message)


# 14. Durability: each operation pays for what its promise needs; what returned survives SIGKILL ------

# Runs random queue operations and prints each one after it returned (the pipe keeps every line
# written before a SIGKILL); before a claim and a settle it says so, so that the one operation a
# kill may cut short is known. max_deliveries is high so that nacks never bury a message.
CRASHER = """
    import os, random, sys, nodeflow
    nf = nodeflow.connect(os.environ["NODEFLOW_DB"], settings=nodeflow.Settings(max_deliveries=10_000))
    rng = random.Random(int(sys.argv[1]))
    say = lambda *words: print(*words, flush=True)
    say("owner", nf.id)
    held, n = [], 0
    while True:
        n += 1
        pick = rng.random()
        if pick < 0.25:
            say("sent", nf.send("d", {"n": n}))
        elif pick < 0.35:
            say("sent", *nf.send_many("d", [{"n": n, "k": k} for k in range(rng.randint(1, 20))]))
        elif pick < 0.55 or not held:
            say("claiming")
            taken = nf.receive("d", lease=600, batch=rng.randint(1, 3))
            held += taken
            say("claimed", *[f"{m.id}:{m.attempts}" for m in taken])
        elif pick < 0.65:
            done = held.pop(0)
            say("claiming")
            say("settling", done.id)
            taken = nf.receive("d", lease=600, batch=1, ack=done)
            say("acked", done.id)
            held += taken
            say("claimed", *[f"{m.id}:{m.attempts}" for m in taken])
        elif pick < 0.8:
            done = held.pop(0)
            say("settling", done.id)
            nf.ack(done)
            say("acked", done.id)
        elif pick < 0.9:
            say("settling", *[m.id for m in held])
            lost = nf.ack_many(held)
            assert not lost, lost
            say("acked", *[m.id for m in held])
            held = []
        else:
            back = held.pop(0)
            say("settling", back.id)
            nf.nack(back)
            say("nacked", back.id, back.attempts)
"""


class Durability(BusTestCase):
    def test_each_operation_commits_as_durably_as_its_promise_needs(self) -> None:
        """Sends and writes of one's own wait for the disk; claims and plain settles do not."""
        levels: list[bool] = []
        syncs: list[int] = []
        write_batch, sync_log = self.nf.store.write_batch, self.nf.store.sync_log

        def recording(works: list[Any], durable: bool = True, **options: Any) -> list[tuple[bool, Any]]:
            levels.append(durable)
            return write_batch(works, durable, **options)

        def counting() -> None:
            syncs.append(1)
            sync_log()

        self.nf.store.write_batch = recording  # type: ignore[method-assign]
        self.nf.store.sync_log = counting  # type: ignore[method-assign]

        def durable_of(operation: Any) -> bool:
            levels.clear()
            syncs.clear()
            operation()
            self.assertEqual(len(levels), 1, "the operation took more than one commit")
            self.assertEqual(len(syncs), int(levels[0]), "a durable commit did not wait for the disk, or another did")
            return levels[0]

        note = lambda conn: conn.execute("INSERT INTO side (note) VALUES ('x')")  # noqa: E731
        self.assertTrue(durable_of(lambda: self.nf.send("d", 1)))
        self.assertTrue(durable_of(lambda: self.nf.send_many("d", [2, 3, 4, 5])))
        first: list[Any] = []
        self.assertFalse(durable_of(lambda: first.append(self.nf.receive("d"))))
        self.assertFalse(durable_of(lambda: self.nf.extend(first[0], 60)))
        self.assertFalse(durable_of(lambda: self.nf.nack(first[0])))
        taken: list[Any] = []
        self.assertFalse(durable_of(lambda: taken.extend(self.nf.receive("d", batch=2))))
        self.assertFalse(durable_of(lambda: self.nf.ack(taken[0])))
        self.assertTrue(durable_of(lambda: self.nf.ack(taken[1], also=note)), "an ack with writes of its own")
        more = self.nf.receive("d", batch=2)
        self.assertFalse(durable_of(lambda: self.nf.receive("d", ack=more[0])))
        self.assertFalse(durable_of(lambda: self.nf.ack_many(more[1:])))
        self.assertTrue(durable_of(lambda: self.nf.trigger("k")))

        # What SQLite is told: a commit under the writer lock never waits for the disk (the durable
        # ones are synced after it), a direct write does.
        level = lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]  # noqa: E731
        self.assertEqual(self.nf.committer.submit(level), 1)  # NORMAL, then sync_log()
        self.assertEqual(self.nf.store.write(level), 2)  # FULL
        with nodeflow.connect(self.db, settings=nodeflow.Settings(synchronous="NORMAL")) as relaxed:
            relaxed.store.sync_log = lambda: self.fail("a NORMAL handle waited for the disk")  # type: ignore[method-assign]
            relaxed.send("d", 6)
            self.assertEqual(relaxed.store.write(level), 1, "a NORMAL handle committed at FULL")

    def test_a_failed_sync_fails_its_writes_and_every_write_after_it(self) -> None:
        """The kernel reports a failed write-back once: a later sync would succeed over the hole."""
        self.nf.send("d", "before")
        real = os.fdatasync
        failures = []

        def failing_once(fd: int) -> None:
            if not failures:
                failures.append(fd)
                raise OSError(5, "Input/output error")
            real(fd)

        os.fdatasync = failing_once  # type: ignore[assignment]
        self.addCleanup(setattr, os, "fdatasync", real)
        with self.assertRaises(nodeflow.StoreError) as caught:
            self.nf.send("d", "lost?")
        self.assertIn("did not confirm", str(caught.exception))
        with self.assertRaises(nodeflow.StoreError):
            self.nf.send("d", "after")  # the sync would succeed now: refused all the same
        with self.assertRaises(nodeflow.StoreError):
            self.nf.receive("d")
        os.fdatasync = real  # type: ignore[assignment]
        with nodeflow.connect(self.db) as fresh:  # a new handle works
            self.assertEqual(fresh.send("d", "new handle") > 0, True)

    def test_a_consumer_of_a_replaced_database_is_told_within_a_second(self) -> None:
        self.nf.send("d", "old file")
        self.assertIsNotNone(self.nf.receive("d"))
        replacement = os.path.join(self.dir, "other.db")
        nodeflow.connect(replacement).close()
        os.replace(replacement, self.db)
        time.sleep(1.1)
        with nodeflow.connect(self.db) as producer:  # the new file's first message rings the old consumer
            threading.Timer(0.3, producer.send, ("d", "new file")).start()
            with self.assertRaises(nodeflow.StoreError) as caught:
                self.nf.receive("d", wait=5)  # claims from the old file when rung: refused
            time.sleep(0.5)
        self.assertIn("replaced", str(caught.exception))

    def test_the_log_descriptor_is_the_wal_of_the_database_and_holds_no_lock(self) -> None:
        self.nf.send("d", 1)  # a durable commit: the -wal is open for sync_log() now
        fd = self.nf.store._log_fd
        self.assertIsNotNone(fd)
        wal = os.stat(self.db + "-wal")
        self.assertEqual((os.fstat(fd).st_dev, os.fstat(fd).st_ino), (wal.st_dev, wal.st_ino))
        # SQLite's POSIX locks are on the database file and the -shm only: closing a descriptor
        # of the -wal can drop none of them.
        held = set()
        with open("/proc/locks", encoding="ascii") as locks:
            for line in locks:
                fields = line.split()
                if fields[1] == "POSIX" and int(fields[4]) == os.getpid():
                    held.add(int(fields[5].split(":")[2]))
        self.assertNotIn(wal.st_ino, held)
        self.nf.close()
        self.assertIsNone(self.nf.store._log_fd)
        with self.assertRaises(OSError):
            os.fstat(fd)  # closed with the handle

    def test_what_an_operation_returned_survives_a_sigkill_of_its_process(self) -> None:
        seed = int(os.environ.get("NODEFLOW_TEST_SEED", random.randrange(1 << 30)))
        print(f"\n  [NODEFLOW_TEST_SEED={seed}]", end=" ", flush=True)
        rng = random.Random(seed)
        sent: set[int] = set()
        acked: set[int] = set()
        for round_ in range(6):
            child = self.spawn_python(CRASHER, str(rng.randrange(1 << 30)))
            owner = self.read_line(child, "owner ").split()[1]
            time.sleep(rng.uniform(0.2, 0.6))
            child.kill()
            output = self.finish(child)[1]
            lines = output.splitlines()[: output.count("\n")]  # a line cut short by the kill said nothing
            self.assertGreater(len(lines), 10, f"round {round_}: the child did too little to test anything")
            leased: dict[int, int] = {}  # what the child holds, as it said: id -> attempts
            handed_back: dict[int, int] = {}
            settling: set[int] = set()  # the settle under way when it was killed: done or not
            claiming = False  # a claim under way when it was killed: it may have taken any ready message
            for line in lines:
                word, *numbers = line.split()
                if word == "claiming":
                    claiming = True
                    continue
                if word == "claimed":
                    claiming = False
                    for pair in numbers:
                        message_id, attempts = (int(x) for x in pair.split(":"))
                        leased[message_id] = attempts
                        handed_back.pop(message_id, None)
                    continue
                values = [int(x) for x in numbers]
                settling = set(values) if word == "settling" else settling - set(values)
                if word == "sent":
                    sent.update(values)
                elif word == "acked":
                    acked.update(values)
                    for message_id in values:
                        leased.pop(message_id, None)
                elif word == "nacked":
                    handed_back[values[0]] = leased.pop(values[0])
            rows = {row[0]: row[1:] for row in self.query("SELECT id, lease_owner, attempts FROM messages")}
            dead = self.query("SELECT id FROM dead_letters")
            self.assertEqual(dead, [])
            self.assertEqual(sent - acked - set(rows) - settling, set(), f"round {round_}: sent messages are missing")
            self.assertEqual(acked & set(rows), set(), f"round {round_}: acked messages are still queued")
            for message_id, attempts in leased.items():
                if message_id in settling and rows.get(message_id, (None, attempts)) in ((None, attempts), None):
                    continue  # the settle cut short by the kill committed (an ack or a nack)
                self.assertEqual(rows[message_id], (owner, attempts), f"round {round_}: claim of {message_id} lost")
            for message_id, attempts in handed_back.items():
                if claiming and rows[message_id] == (owner, attempts + 1):
                    continue  # taken again by the claim the kill cut short
                self.assertEqual(rows[message_id], (None, attempts), f"round {round_}: nack of {message_id} lost")
            acked |= settling - set(rows)  # the settle cut short by the kill was an ack that committed
            self.nf.release_leases(owner)  # the next round's child may take them again
        self.assertGreater(len(acked), 20)
