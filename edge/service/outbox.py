"""The durable label outbox: sqlite3 in WAL mode, one row per label until the broker acknowledged it.

paho's own queue drops the newest message when full and forgets everything on exit, so every label is
written here first and deleted only on PUBACK. After a reconnect or a restart the rows are replayed in
insertion order; rows past their expiry are deleted instead of replayed (a late sort decision is worse
than none). The table is bounded: when full, the oldest row is evicted and counted.

WAL with synchronous=NORMAL survives a killed process (the case that matters: SIGKILL, OOM, watchdog)
without an fsync per label; only a power cut can lose the last few commits.

Checkpoints (copying the WAL back into the database file, with an fsync) are not left to the commits:
sqlite runs one on the commit that crosses 1000 WAL pages, every ~400 labels, and that commit took 3-5 ms
here instead of 0.02 (far more on an SD card), holding up the label, or the acks and with them the next
label. `checkpoint()` does it from another thread on its own connection, which never blocks the writer;
the writer still checkpoints itself past WAL_SAFETY_PAGES, should nobody call `checkpoint()`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

WAL_SAFETY_PAGES = 5000  # about 20 MB of WAL


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    expires_at: float | None  # wall-clock (time.time()) seconds, None: never

    def remaining_s(self, now: float | None = None) -> int | None:
        """Seconds left before expiry (at least 1), for the MQTT v5 Message Expiry Interval."""
        if self.expires_at is None:
            return None
        return max(1, int(round(self.expires_at - (now or time.time()))))


class Outbox:
    """Thread-safe: the inference side `put`s, the MQTT side reads `pending` and `ack`s."""

    def __init__(self, path: str | Path, max_messages: int = 100_000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_messages = max_messages
        self._lock = threading.Lock()
        self._db = self._connect()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_SAFETY_PAGES}")
        self._checkpointer: sqlite3.Connection | None = self._connect()  # None once closed
        self._checkpoint_lock = threading.Lock()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
            "payload BLOB NOT NULL, qos INTEGER NOT NULL, expires_at REAL, created_at REAL NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
        )
        self._depth = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self._expired_at = 0.0  # when expired rows were last deleted

    def put(self, topic: str, payload: bytes, qos: int = 1, expiry_s: float | None = None) -> OutboxMessage:
        """Store one message; returns it with its id (ids grow: they are the replay order)."""
        now = time.time()
        expires_at = now + expiry_s if expiry_s else None
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._depth >= self.max_messages:
                    excess = self._depth - self.max_messages + 1
                    self._db.execute(
                        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)",
                        (excess,),
                    )
                    self._bump("evicted", excess)
                    self._depth -= excess
                cur = self._db.execute(
                    "INSERT INTO outbox (topic, payload, qos, expires_at, created_at) VALUES (?, ?, ?, ?, ?)",
                    (topic, payload, qos, expires_at, now),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._depth += 1
            return OutboxMessage(int(cur.lastrowid), topic, payload, qos, expires_at)

    def pending(self, after_id: int = 0, limit: int = 100) -> list[OutboxMessage]:
        """Unacknowledged messages with id > after_id, oldest first. Expired ones are deleted, not returned.

        Rows up to after_id are in flight (handed to the broker, no PUBACK yet): they are left alone, since
        their PUBACK may still come (delivered, not expired); `expire` settles them after a reconnect."""
        now = time.time()
        with self._lock:
            if now - self._expired_at >= 1.0:  # a write transaction: once a second, not once per label
                self._expired_at = now
                cur = self._db.execute(
                    "DELETE FROM outbox WHERE id > ? AND expires_at IS NOT NULL AND expires_at < ?",
                    (after_id, now),
                )
                if cur.rowcount > 0:
                    self._bump("expired", cur.rowcount)
                    self._depth -= cur.rowcount
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, expires_at FROM outbox WHERE id > ? "
                "AND (expires_at IS NULL OR expires_at >= ?) ORDER BY id LIMIT ?",
                (after_id, now, limit),
            ).fetchall()
        return [OutboxMessage(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in rows]

    def ack(self, *message_ids: int) -> None:
        """The broker has these messages: remove them (one transaction for all, not one per label)."""
        if not message_ids:
            return
        with self._lock:
            self._depth -= self._delete(message_ids)

    def expire(self, *message_ids: int) -> int:
        """These rows expired unacknowledged (in flight when the connection dropped, so pending() no longer
        hands them out): delete them, counted as 'expired' like the ones pending() drops. Rows already gone
        (swept by pending(), or acked) are not counted again. Returns how many were deleted."""
        if not message_ids:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the rows and their count change together, or neither
            try:
                deleted = self._delete(message_ids)
                if deleted:
                    self._bump("expired", deleted)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._depth -= deleted
        return deleted

    def _delete(self, message_ids: tuple[int, ...]) -> int:
        """Delete rows by id (under _lock), 500 per statement (sqlite's bound-variable limit); how many
        were."""
        deleted = 0
        for start in range(0, len(message_ids), 500):
            chunk = message_ids[start : start + 500]
            deleted += self._db.execute(
                f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})", chunk
            ).rowcount
        return deleted

    def depth(self) -> int:
        return self._depth

    def counter(self, name: str) -> int:
        """'evicted' (dropped because the outbox was full) or 'expired' (dropped unsent), since creation."""
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def checkpoint(self) -> tuple[int, int]:
        """Copy the WAL into the database file, from the calling thread, without waiting for or blocking
        the writer (PASSIVE). Returns (frames in the WAL, frames copied); (0, 0) once closed."""
        with self._checkpoint_lock:
            if self._checkpointer is None:
                return 0, 0
            _, wal_frames, copied = self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return wal_frames, copied

    def close(self) -> None:
        with self._checkpoint_lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
            self._checkpointer = None
            with self._lock:
                self._db.close()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)

    def _bump(self, name: str, n: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, n),
        )
