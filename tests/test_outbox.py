"""The sqlite outbox: order, acknowledgement, bounds, expiry, and survival across a reopen."""

from __future__ import annotations

import sqlite3
import time

from taxonedge.edge.service.outbox import Outbox


def test_pending_in_order_and_ack_removes(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    stored = [box.put("t", f"m{i}".encode(), expiry_s=60 if i == 0 else None) for i in range(5)]
    ids = [m.id for m in stored]
    assert ids == sorted(ids)
    assert stored[1].payload == b"m1" and stored[1].expires_at is None
    assert stored[0].expires_at == box.pending()[0].expires_at  # put returns the row as pending reads it
    assert [m.payload for m in box.pending()] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    box.ack(ids[1])
    assert [m.payload for m in box.pending()] == [b"m0", b"m2", b"m3", b"m4"]
    assert [m.payload for m in box.pending(after_id=ids[2], limit=1)] == [b"m3"]
    assert box.depth() == 4


def test_survives_reopen_like_a_restart(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    for i in range(3):
        box.put("labels", f"{i}".encode())
    box.ack(box.pending()[0].id)
    del box  # no close: as after SIGKILL, only what sqlite committed counts
    again = Outbox(tmp_path / "o.sqlite")
    assert [m.payload for m in again.pending()] == [b"1", b"2"]
    assert again.depth() == 2
    mode = sqlite3.connect(tmp_path / "o.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_full_outbox_evicts_oldest_and_counts(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_messages=10)
    for i in range(13):
        box.put("t", str(i).encode())
    assert box.depth() == 10
    assert [m.payload for m in box.pending()][0] == b"3"
    assert box.counter("evicted") == 3


def test_expired_messages_are_not_replayed(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    box.put("t", b"short", expiry_s=0.05)
    box.put("t", b"long", expiry_s=60)
    box.put("t", b"forever")
    time.sleep(0.1)
    pending = box.pending()
    assert [m.payload for m in pending] == [b"long", b"forever"]
    assert box.counter("expired") == 1
    assert 58 <= pending[0].remaining_s() <= 60
    assert pending[1].remaining_s() is None


def test_rows_in_flight_are_not_swept_as_expired(tmp_path):
    """A row handed to the broker (id <= after_id) may still get its PUBACK: delivered, not expired. The
    sweep leaves it; an ack or, after a reconnect, `expire` settles it."""
    box = Outbox(tmp_path / "o.sqlite")
    ids = [box.put("t", f"{i}".encode(), expiry_s=0.05).id for i in range(3)]
    time.sleep(0.1)
    assert box.pending(after_id=ids[1]) == []  # the third, not in flight, is swept
    assert box.counter("expired") == 1 and box.depth() == 2
    box.ack(ids[0])  # its PUBACK came late: delivered
    assert box.expire(ids[1]) == 1  # the connection dropped first: expired
    assert box.counter("expired") == 2 and box.depth() == 0


def test_a_message_expiring_between_sweeps_is_still_never_returned(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    box.put("t", b"soon", expiry_s=0.2)
    box.put("t", b"stays")
    assert [m.payload for m in box.pending()] == [b"soon", b"stays"]  # this call swept expired rows
    time.sleep(0.3)
    assert [m.payload for m in box.pending()] == [b"stays"]  # swept at most once a second, filtered always


def test_acks_in_one_call_survive_a_reopen(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    ids = [box.put("t", str(i).encode()).id for i in range(600)]
    box.ack(*ids[:550])  # more than one chunk
    box.ack()  # nothing to do
    assert box.depth() == 50
    box.close()
    again = Outbox(tmp_path / "o.sqlite")
    assert again.depth() == 50
    assert [m.payload for m in again.pending(limit=1000)] == [str(i).encode() for i in range(550, 600)]


def test_checkpoints_are_left_to_checkpoint_not_to_a_labels_commit(tmp_path):
    """sqlite checkpoints the WAL on the commit that crosses 1000 pages (milliseconds, with an fsync, on
    the label path); the outbox leaves that to checkpoint(), called from another thread. Afterwards the
    database file alone holds every row."""
    box = Outbox(tmp_path / "o.sqlite")
    for i in range(1200):
        box.put("t", b"%04d" % i + b"x" * 900)
    wal_frames, copied = box.checkpoint()
    assert wal_frames > 1000  # no commit checkpointed (that would have started the WAL over)
    assert copied == wal_frames
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "o.sqlite").write_bytes((tmp_path / "o.sqlite").read_bytes())  # without the WAL
    db = sqlite3.connect(tmp_path / "copy" / "o.sqlite")
    assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 1200
    db.close()
    box.close()
    assert box.checkpoint() == (0, 0)  # after close: nothing, no error (the health thread may be late)


def test_expire_deletes_rows_and_counts_them_once(tmp_path):
    """Rows in flight when the connection dropped are expired by id: deleted, counted with the ones pending()
    drops, never counted twice (a row pending() already swept, or an id not stored)."""
    box = Outbox(tmp_path / "o.sqlite")
    rows = [box.put("t", str(i).encode(), expiry_s=0.05 if i == 0 else 60) for i in range(4)]
    time.sleep(0.1)
    assert [m.payload for m in box.pending()] == [b"1", b"2", b"3"]  # swept row 0: expired = 1
    assert box.expire(rows[0].id, rows[1].id, rows[2].id, 10_000) == 2
    assert box.expire() == 0
    assert box.counter("expired") == 3
    assert box.depth() == 1
    assert [m.payload for m in box.pending()] == [b"3"]
    box.close()
    again = Outbox(tmp_path / "o.sqlite")  # committed, counter included
    assert again.depth() == 1 and again.counter("expired") == 3
