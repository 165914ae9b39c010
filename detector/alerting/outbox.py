"""A durable outbox: deliveries wait in SQLite until their sender confirms them, across restarts.

A sender asks for what is ``due``, tries each delivery, and reports ``delivered`` or ``failed``.
A failure is retried after an exponential backoff with full jitter, at least as late as the
receiver asked (``Retry-After``); after ``max_attempts`` failures the delivery is dead-lettered
with its last error. Deliveries of one non-empty ``group`` (per channel) go out strictly in
insertion order: only the oldest pending one of a group is ever due, so a later one waits until
the earlier one is delivered or dead-lettered. Delivery is at least once (a crash between sending
and ``delivered`` sends again), so receivers drop repeats by ``delivery_id``.

One process should drain a channel at a time: ``due`` hands out deliveries without a lease.

>>> now = [1000.0]
>>> box = Outbox(":memory:", base_delay=2.0, rng=random.Random(7), clock=lambda: now[0])
>>> box.put("c1:ops", "webhook", "https://ops.example/hook", {"n": 1}, group="ops|team:search")
True
>>> box.put("c1:ops", "webhook", "https://ops.example/hook", {"n": 1})  # known id: ignored
False
>>> box.put("c2:ops", "webhook", "https://ops.example/hook", {"n": 2}, group="ops|team:search")
True
>>> [d.delivery_id for d in box.due("webhook")]  # c2 waits for c1
['c1:ops']
>>> box.failed("c1:ops", "HTTP 503", retry_after=30.0)
True
>>> box.due("webhook"), box.next_due_in("webhook")
([], 30.0)
>>> now[0] += 30.0
>>> box.delivered("c1:ops", {"status": 200})
>>> [d.delivery_id for d in box.due("webhook")], box.result("c1:ops")
(['c2:ops'], {'status': 200})
>>> box.close()
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order
    delivery_id     TEXT NOT NULL UNIQUE,
    channel         TEXT NOT NULL,
    target          TEXT NOT NULL,
    grp             TEXT NOT NULL,
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_at REAL NOT NULL,
    created_at      REAL NOT NULL,
    finished_at     REAL,
    last_error      TEXT,
    result          TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (channel, state, grp, seq);
"""

_COLUMNS = "delivery_id, channel, target, grp, payload, attempts, next_attempt_at, created_at"

# Pending deliveries of a channel that may be tried: ungrouped ones, and the oldest pending one of each group.
_ELIGIBLE = f"""
SELECT {_COLUMNS} FROM outbox AS o
WHERE o.channel = ? AND o.state = '{PENDING}'
  AND (o.grp = '' OR o.seq = (SELECT MIN(h.seq) FROM outbox AS h
                              WHERE h.channel = o.channel AND h.grp = o.grp AND h.state = '{PENDING}'))
"""

_IN_CHANNEL = "? IN (channel, '')"  # bound to a channel name, or to '' for every channel


@dataclass(frozen=True)
class Delivery:
    """One message for one receiver, as the outbox holds it."""

    delivery_id: str  # idempotency key
    channel: str  # "webhook", "slack", ...
    target: str  # URL, Slack channel id, ...
    group: str  # deliveries of one group go out strictly in insertion order; "" = no order
    payload: dict[str, Any]
    attempts: int  # failed attempts so far
    next_attempt_at: float  # clock seconds
    created_at: float


def _delivery(row: tuple[Any, ...]) -> Delivery:
    delivery_id, channel, target, group, payload, attempts, next_attempt_at, created_at = row
    return Delivery(delivery_id, channel, target, group, json.loads(payload), attempts, next_attempt_at, created_at)


class Outbox:
    """Deliveries in one SQLite file (WAL mode); ``":memory:"`` for tests.

    The n-th failed attempt waits a uniformly random time in ``[0, min(max_delay, base_delay * 2**(n-1))]``
    (full jitter), and at least ``retry_after`` when the receiver gave one. Safe to share between the
    threads of one process.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_attempts: int = 12,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_attempts < 1 or base_delay < 0 or max_delay < base_delay:
            raise ValueError("need max_attempts >= 1 and 0 <= base_delay <= max_delay")
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._rng = rng or random.Random()
        self._clock = clock
        self._lock = threading.Lock()
        # Autocommit; multi-statement changes take an explicit write transaction (_write).
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a put that returned survives a power cut
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def put(self, delivery_id: str, channel: str, target: str, payload: dict[str, Any], group: str = "") -> bool:
        """Store a delivery, due now; False (and nothing changes) when the id is already known in any state."""
        now = self._clock()
        with self._write() as db:
            cursor = db.execute(
                f"INSERT INTO outbox ({_COLUMNS}, state) VALUES (?, ?, ?, ?, ?, 0, ?, ?, '{PENDING}')"
                " ON CONFLICT (delivery_id) DO NOTHING",
                (delivery_id, channel, target, group, json.dumps(payload), now, now),
            )
            return cursor.rowcount == 1

    def due(self, channel: str, limit: int = 100) -> list[Delivery]:
        """Pending deliveries whose time has come, in insertion order, at most one per non-empty group."""
        now = self._clock()
        rows = self._query(f"{_ELIGIBLE} AND o.next_attempt_at <= ? ORDER BY o.seq LIMIT ?", channel, now, limit)
        return [_delivery(row) for row in rows]

    def delivered(self, delivery_id: str, result: dict[str, Any] | None = None) -> None:
        """Mark a delivery done (a late success also lifts it out of the dead letters) and keep ``result``."""
        with self._write() as db:
            cursor = db.execute(
                f"UPDATE outbox SET state = '{DELIVERED}', finished_at = ?, result = ? WHERE delivery_id = ?",
                (self._clock(), None if result is None else json.dumps(result), delivery_id),
            )
            if cursor.rowcount == 0:
                raise KeyError(delivery_id)

    def failed(self, delivery_id: str, error: str, retry_after: float | None = None) -> bool:
        """Record a failed attempt: True when it will be retried, False when it is dead-lettered (or not pending)."""
        now = self._clock()
        with self._write() as db:
            row = db.execute("SELECT state, attempts FROM outbox WHERE delivery_id = ?", (delivery_id,)).fetchone()
            if row is None:
                raise KeyError(delivery_id)
            state, attempts = row[0], row[1] + 1
            if state != PENDING:
                return False
            if attempts >= self.max_attempts:
                db.execute(
                    f"UPDATE outbox SET state = '{DEAD}', attempts = ?, last_error = ?, finished_at = ?"
                    " WHERE delivery_id = ?",
                    (attempts, error, now, delivery_id),
                )
                return False
            delay = self._rng.uniform(0.0, min(self.max_delay, self.base_delay * 2.0 ** (attempts - 1)))
            if retry_after is not None:
                delay = max(delay, retry_after)
            db.execute(
                "UPDATE outbox SET attempts = ?, last_error = ?, next_attempt_at = ? WHERE delivery_id = ?",
                (attempts, error, now + delay, delivery_id),
            )
            return True

    def give_up(self, delivery_id: str, error: str) -> None:
        """Dead-letter a pending delivery now, for an error no retry can fix (e.g. its receiver was removed)."""
        with self._write() as db:
            db.execute(
                f"UPDATE outbox SET state = '{DEAD}', last_error = ?, finished_at = ?"
                f" WHERE delivery_id = ? AND state = '{PENDING}'",
                (error, self._clock(), delivery_id),
            )

    def result(self, delivery_id: str) -> dict[str, Any] | None:
        """What ``delivered`` stored; None when nothing was (or the delivery is unknown)."""
        rows = self._query("SELECT result FROM outbox WHERE delivery_id = ?", delivery_id)
        return json.loads(rows[0][0]) if rows and rows[0][0] is not None else None

    def dead_letters(self, channel: str | None = None) -> list[tuple[Delivery, str]]:
        """Dead-lettered deliveries with their last error, oldest first."""
        sql = f"SELECT {_COLUMNS}, last_error FROM outbox WHERE state = '{DEAD}' AND {_IN_CHANNEL} ORDER BY seq"
        rows = self._query(sql, channel or "")
        return [(_delivery(row[:-1]), row[-1]) for row in rows]

    def has_group(self, channel: str, group: str) -> bool:
        """Whether anything of ``group`` (an incident) was ever stored for ``channel`` (and not pruned)."""
        return bool(self._query("SELECT 1 FROM outbox WHERE channel = ? AND grp = ? LIMIT 1", channel, group))

    def pending_count(self, channel: str | None = None) -> int:
        sql = f"SELECT COUNT(*) FROM outbox WHERE state = '{PENDING}' AND {_IN_CHANNEL}"
        rows = self._query(sql, channel or "")
        return int(rows[0][0])

    def next_due_in(self, channel: str) -> float | None:
        """Seconds until ``due(channel)`` has something (0 if now), None if nothing is pending.

        Counts only what ``due`` may return, so a group waiting on its head does not look due.
        """
        rows = self._query(f"SELECT MIN(next_attempt_at) FROM ({_ELIGIBLE})", channel)
        if rows[0][0] is None:
            return None
        return max(0.0, float(rows[0][0]) - self._clock())

    def prune(self, finished_before: float) -> int:
        """Forget delivered and dead-lettered deliveries finished before this clock time; their ids become new again."""
        with self._write() as db:
            cursor = db.execute(
                f"DELETE FROM outbox WHERE state != '{PENDING}' AND finished_at < ?", (finished_before,)
            )
            return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
