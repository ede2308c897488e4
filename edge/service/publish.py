"""The label sink: each decision becomes a label message (protocol.Label) in the durable outbox, handed to
the MQTT link at once when it is next in line, with its timings kept for stats.

Labels are published from the inference thread and, for items refused at the door (`overflow`), from the
control thread: one lock keeps `seq` in outbox order.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from ..kernel.bundle import Bundle
from ..kernel.decode import Decision, decision_fields
from ..kernel.protocol import LABEL_SCHEMA, DeviceTopics, Label, json_bytes
from .config import Config
from .drift import DriftTracker
from .mqtt import MqttLink
from .outbox import Outbox
from .source import Frame
from .trigger import ItemResult


def utc_ms(wall: float) -> str:
    return (
        datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def ms_percentiles(seconds: deque[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds, rounded to microseconds; (0, 0) before the first value."""
    if not seconds:
        return 0.0, 0.0
    p50, p99 = np.percentile(np.array(seconds) * 1000, [50, 99])
    return round(float(p50), 3), round(float(p99), 3)


@dataclass(frozen=True)
class LabelInput:
    """What a label is made of: the decision (on a frame, or in item mode on an item, whose frame is None
    when it was refused at the door), the model and backend that made it, and its timings."""

    frame: Frame | None
    decision: Decision
    latency_s: float  # capture to decision
    invoke_s: float
    bundle: Bundle
    backend: str
    item: ItemResult | None = None


class LabelPublisher:
    def __init__(self, config: Config, boot_id: str, outbox: Outbox, drift: DriftTracker | None = None):
        self.config = config
        self.boot_id = boot_id
        self.outbox = outbox
        self.drift = drift
        self.link: MqttLink | None = None  # set once the link exists (it needs the outbox first)
        self.topic = DeviceTopics(config.topic_base).labels
        self._seq = 0
        self._lock = threading.Lock()
        self.labels = 0
        self.latencies: deque[float] = deque(maxlen=2000)  # capture to decision
        self.publish_latencies: deque[float] = deque(maxlen=2000)  # capture to handed to the broker

    def message(self, facts: LabelInput) -> Label:
        """The label message; takes the next seq, so call it under the lock."""
        self._seq += 1
        dev = self.config.device
        frame, item, bundle = facts.frame, facts.item, facts.bundle
        return {
            "schema": LABEL_SCHEMA,
            "msg_id": uuid.uuid4().hex,
            "boot_id": self.boot_id,
            "seq": self._seq,
            "device": dev.id,
            "site": dev.site,
            "line": dev.line,
            "timestamp": utc_ms(frame.wall if frame else time.time()),
            "item_id": item.item_id if item else None,
            **decision_fields(facts.decision, item.reason if item else None),  # type: ignore[typeddict-item]
            "vote": (
                {"frames": item.frames, "agreeing": item.agreeing, "agreement": round(item.agreement, 4)}
                if item
                else None
            ),
            "model": {"name": bundle.name, "version": bundle.version, "sha256": bundle.sha256},
            "backend": facts.backend,  # type: ignore[typeddict-item]
            "latency_ms": round(max(facts.latency_s, 0.0) * 1000, 3),
            "inference_ms": round(facts.invoke_s * 1000, 3),
        }

    def publish(self, facts: LabelInput) -> None:
        with self._lock:
            payload = self.message(facts)
            message = self.outbox.put(
                self.topic, json_bytes(payload), qos=1, expiry_s=self.config.mqtt.label_expiry_s
            )
            self.labels += 1
        published = self.link is not None and self.link.notify_outbox(message)
        # An item closed for want of frames (timed out, overflow, shutdown) says nothing about the model, nor
        # does a frame of the empty belt: the calibration figures are of products.
        if (
            self.drift is not None
            and (facts.item is None or facts.item.reason is None)
            and facts.decision.reason != "no_item"
        ):
            self.drift.add(facts.decision)
        self.latencies.append(facts.latency_s)
        if published and facts.frame is not None:
            # Labels sent live only: one that waited out an outage shows in the outbox depth instead.
            self.publish_latencies.append(time.monotonic() - facts.frame.captured)

    def publish_item(self, item: ItemResult, frame: Frame | None, bundle: Bundle, backend: str) -> None:
        latency = time.monotonic() - frame.captured if frame else 0.0
        self.publish(LabelInput(frame, item.decision, latency, 0.0, bundle, backend, item))
