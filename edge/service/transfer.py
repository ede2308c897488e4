"""A deployment's bundle arriving in chunks over MQTT (the chunked transport of edge/service/update.py).

Chunk i comes on `<deploy topic>/<id>/chunk/<i>` (raw bytes, QoS 1) and is written in place into
`<state_dir>/models/incoming/<id>.part`, sized up front. When no chunk has come for `chunk_timeout_s`, the
missing chunk numbers go out as "receiving" progress for the operator to send again (that is how a transfer
resumes after a reconnect); after `chunk_retries` such requests the stream counts as truncated.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import UpdateConfig
from .vetting import Failed

if TYPE_CHECKING:
    from .update import DeployRequest

log = logging.getLogger(__name__)


class Transfer:
    """One deployment's chunks, written into its partial file. `lock` orders each chunk's write against
    `close`: a chunk that comes after the transfer closed writes nothing."""

    def __init__(self, folder: Path, topic: str, request: DeployRequest):  # a request with chunks
        self.id = request.id
        self.size, self.chunk_size, self.chunks = request.size, request.chunk_size, request.chunks
        self.chunk_topic = f"{topic}/{request.id}/chunk"
        self.part = folder / f"{request.id}.part"
        self.received: set[int] = set()
        self.last_chunk = time.monotonic()
        self.complete = threading.Event()
        self.lock = threading.Lock()
        with open(self.part, "wb") as fh:
            fh.truncate(self.size)

    @staticmethod
    def clear(folder: Path) -> None:
        """Start `folder` empty: the partial files of a previous process cannot be resumed."""
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)

    def missing(self) -> list[int]:
        return [i for i in range(self.chunks) if i not in self.received]

    def progress(self, **extra: Any) -> dict[str, Any]:
        """The details of a "receiving" progress message."""
        return {"received": len(self.received), "chunks": self.chunks, **extra}

    def take(self, topic: str, payload: bytes) -> dict[str, Any] | None:
        """Write one chunk if it is one of this transfer's. Returns the progress to report when one more
        tenth of the chunks is in, else None (also once the last chunk completes the transfer)."""
        head, _, number = topic.rpartition("/")
        if not payload or head != self.chunk_topic:  # an empty payload: a retained chunk being cleared
            return None
        try:
            index = int(number)
        except ValueError:
            return None
        size = min(self.chunk_size, self.size - index * self.chunk_size) if 0 <= index < self.chunks else -1
        if len(payload) != size:
            log.warning(
                "deployment %s: chunk %s has %d bytes, expected %d: ignored",
                self.id,
                number,
                len(payload),
                size,
            )
            return None
        with self.lock:
            if index in self.received or self.complete.is_set():
                return None
            with open(self.part, "r+b") as fh:
                fh.seek(index * self.chunk_size)
                fh.write(payload)
            self.received.add(index)
            self.last_chunk = time.monotonic()
            count = len(self.received)
        if count == self.chunks:
            self.complete.set()
        elif count % max(1, self.chunks // 10) == 0:
            return self.progress(received=count)
        return None

    def wait(self, stopping: threading.Event, cfg: UpdateConfig, ask: Callable[..., None]) -> bytes:
        """The bundle, once every chunk is in. After `cfg.chunk_timeout_s` without a chunk, `ask(**progress)`
        for the missing ones, at most `cfg.chunk_retries` times; Failed when the stream stays truncated or
        the daemon stops."""
        asked = 0
        while not self.complete.wait(0.2):
            if stopping.is_set():
                raise Failed("rejected", "the daemon is shutting down")
            if time.monotonic() - self.last_chunk < cfg.chunk_timeout_s:
                continue
            missing = self.missing()
            if asked >= cfg.chunk_retries:
                raise Failed(
                    "rejected",
                    (
                        f"truncated chunk stream: {len(self.received)} of {self.chunks} chunks received, "
                        f"none for {cfg.chunk_timeout_s:g} s after {asked} requests for the missing ones"
                    ),
                )
            asked += 1
            self.last_chunk = time.monotonic()
            ask(**self.progress(missing=missing[:1000]))
        return self.part.read_bytes()

    def close(self) -> None:
        """Remove the partial file; a chunk that comes later finds the transfer closed."""
        with self.lock:
            self.complete.set()
            self.part.unlink(missing_ok=True)
