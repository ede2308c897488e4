"""How the device is doing, told to whoever watches: the retained `status` and `model`, periodic `stats`,
the `state` command's answer, the systemd watchdog and the optional Prometheus endpoint.

The health thread also does the periodic chores that must not sit on the frame path: stall checks of the
source, Edge TPU re-probes, outbox checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from taxonedge import __version__

from ..kernel.protocol import DeviceState, DeviceTopics, Drift, ModelStatus, Stats, Status
from .config import Config
from .control import Control
from .drift import DriftTracker
from .mqtt import MqttLink
from .notify import sd_notify
from .outbox import Outbox
from .pipeline import Pipeline
from .publish import LabelPublisher, ms_percentiles, utc_ms
from .serving import Serving
from .source import Capture

log = logging.getLogger(__name__)


class Health:
    def __init__(
        self,
        config: Config,
        boot_id: str,
        capture: Capture,
        serving: Serving,
        pipeline: Pipeline,
        publisher: LabelPublisher,
        outbox: Outbox,
        publish: Callable[..., None],
        drift: DriftTracker,
    ):
        self.config = config
        self.topics = DeviceTopics(config.topic_base)
        self.boot_id = boot_id
        self.capture = capture
        self.serving = serving
        self.pipeline = pipeline
        self.publisher = publisher
        self.outbox = outbox
        self.publish = publish  # (topic, payload, qos=, retain=, properties=)
        self.drift = drift
        self.link: MqttLink | None = None
        self.control: Control | None = None
        self.startup_problems: list[str] = []  # e.g. an installed model that did not verify; until a switch
        self._last_status: tuple | None = None
        self._status_recheck = 0.0  # time.monotonic() when to publish status again after a (re)connect
        self._stats_mark = (0, time.monotonic())  # frames classified and the time at the last stats message
        self.metrics_port: int | None = None

    # ---- status and model --------------------------------------------------------------------------
    def reasons(self) -> list[str]:
        reasons = list(self.startup_problems)
        info = self.serving.info
        if info and info.degraded_reason:
            reasons.append(info.degraded_reason)
        if self.capture.state in ("reconnecting", "stalled"):
            reasons.append(f"source {self.capture.state}: {self.capture.last_error or 'no frames'}")
        if self.serving.restarting:
            reasons.append("inference worker restarting")
        if self.pipeline.paused.is_set():
            reasons.append("paused by command")
        drift = self.drift.reason(self.serving.thresholds())
        if drift:
            reasons.append(drift)
        no_item = self.pipeline.noitem.reason()
        if no_item:
            reasons.append(no_item)
        return reasons

    def status_state(self) -> str:
        return "degraded" if self.reasons() else "online"

    def publish_status(self, force: bool = False) -> None:
        info = self.serving.info
        key = (self.status_state(), tuple(self.reasons()), info.backend if info else None)
        if not force and key == self._last_status:
            return
        self._last_status = key
        status: Status = {
            "state": key[0],
            "reasons": list(key[1]),
            "boot_id": self.boot_id,  # type: ignore[typeddict-item]
            "device": self.config.device.id,
            "backend": key[2],
            "runtime": info.runtime if info else None,
            "version": __version__,
            "since": utc_ms(time.time()),
        }
        self.publish(self.topics.status, status, qos=1, retain=True)

    def publish_model(self) -> None:
        bundle = self.serving.bundle
        info = self.serving.info
        model: ModelStatus = {
            **bundle.describe(),
            "signature": bundle.signature_status,  # type: ignore[typeddict-item]
            "backend": info.backend if info else None,
            "since": utc_ms(time.time()),
        }
        self.publish(self.topics.model, model, qos=1, retain=True)

    def connected(self) -> None:
        """After every (re)connect: status and model again. The will of a previous process of this device
        (crashed, restarted by systemd within the will delay) may arrive after our `online`: the control
        thread answers one it sees (our own status topic), and a re-assertion after the will delay covers a
        broker ACL that does not let the device read its own status."""
        self._last_status = None
        self.publish_status(force=True)
        self.publish_model()
        self._status_recheck = time.monotonic() + self.config.mqtt.will_delay_s + 1.0

    # ---- state and stats ---------------------------------------------------------------------------
    def state(self) -> DeviceState:
        """Everything an operator wants at a glance: the `state` command, stats and metrics use it."""
        info, pipe, pub, trig = self.serving.info, self.pipeline, self.publisher, self.pipeline.trigger
        lat, sent, inv = (ms_percentiles(x) for x in (pub.latencies, pub.publish_latencies, pipe.invokes))
        control, link = self.control, self.link
        return {  # type: ignore[typeddict-item]
            "state": self.status_state(),
            "reasons": self.reasons(),
            "boot_id": self.boot_id,
            "paused": pipe.paused.is_set(),
            "backend": info.backend if info else None,
            "runtime": info.runtime if info else None,
            "model": self.serving.bundle.describe(),
            "thresholds": self.serving.thresholds(),
            "source": self.capture.status(),
            "frames_captured": self.capture.frames,
            **pipe.frame_counts(),
            "frames_classified": pipe.classified,
            "labels": pub.labels,
            "latency_ms_p50": lat[0],
            "latency_ms_p99": lat[1],
            "publish_latency_ms_p50": sent[0],
            "publish_latency_ms_p99": sent[1],
            "invoke_ms_p50": inv[0],
            "inference_errors": pipe.inference_errors,
            "preprocess_errors": pipe.preprocess_errors,
            "worker_restarts": self.serving.worker_restarts,
            "edgetpu_reprobes": self.serving.reprobes,
            "outbox_depth": self.outbox.depth(),
            "outbox_evicted": self.outbox.counter("evicted"),
            "outbox_expired": self.outbox.counter("expired"),
            "mqtt_connected": bool(link and link.connected.is_set()),
            "mqtt_error": link.last_error if link else None,
            "commands": control.commands if control else 0,
            "control_dropped": control.control_dropped if control else 0,
            "triggers": control.triggers if control else 0,
            "triggers_refused": control.triggers_refused if control else 0,
            "items_waiting": trig.waiting() if trig else 0,
            "items_timed_out": trig.timed_out if trig else 0,
            "items_overflowed": trig.overflowed if trig else 0,
            "last_frame_time": utc_ms(self.capture.last_frame_wall) if self.capture.last_frame_wall else None,
            "last_inference_time": utc_ms(pipe.last_inference_wall) if pipe.last_inference_wall else None,
            "drift": self.drift.report(self.serving.thresholds()),
            "no_item_frames": pipe.noitem.frames,
            "no_item_withheld": pipe.noitem.withheld,
            "no_item": pipe.noitem.report(),
            "enrolled": pipe.enrollment.report(),
        }

    def publish_stats(self, final: bool = False) -> None:
        """fps since the previous stats message. The final one (at shutdown, QoS 1, so that it arrives
        before `offline`) closes the run's figures."""
        now = time.monotonic()
        count, since = self._stats_mark
        classified = self.pipeline.classified
        self._stats_mark = classified, now
        stats: Stats = {
            **self.state(),
            "fps": round((classified - count) / max(now - since, 1e-9), 2),
            "final": final,
            "time": utc_ms(time.time()),
        }
        self.publish(self.topics.stats, stats, qos=1 if final else 0)

    def status_line(self) -> str:
        return (
            f"{self.status_state()} on {self.serving.backend}: {self.pipeline.classified} frames, "
            f"{self.publisher.labels} labels, outbox {self.outbox.depth()}"
        )

    # ---- the health thread -------------------------------------------------------------------------
    def run(self) -> None:
        stats_every = self.config.mqtt.stats_interval_s
        next_stats = time.monotonic() + stats_every
        while not self.pipeline.stopping.wait(1.0):
            try:
                self.capture.check_stall()
                self.pipeline.noitem.expire()  # a learn_empty whose frames stopped coming gets its answer
                if self._status_recheck and time.monotonic() >= self._status_recheck:
                    self._status_recheck = 0.0
                    self.publish_status(force=True)
                self.publish_status()
                self.serving.maybe_reprobe()
                self.watchdog()
                self.outbox.checkpoint()  # here, not on a label's commit (edge/service/outbox.py)
                if time.monotonic() >= next_stats:
                    self.publish_stats()
                    next_stats = time.monotonic() + stats_every
            except Exception:  # noqa: BLE001 - health reporting must not stop the daemon
                log.exception("health check failed")

    def watchdog(self) -> None:
        """WATCHDOG=1 only while frames arrive and inference keeps up (or is idle by design)."""
        timeout = self.config.health.progress_timeout_s
        now = time.time()
        last_frame = self.capture.last_frame_wall
        frames_ok = last_frame is not None and now - last_frame < timeout
        trig = self.pipeline.trigger
        idle = self.pipeline.paused.is_set() or (trig is not None and not trig.busy)
        infer_ok = idle or time.monotonic() - self.pipeline.last_progress < timeout
        lines = [f"STATUS={self.status_line()}"]
        if frames_ok and infer_ok:
            lines.append("WATCHDOG=1")
        sd_notify(*lines)

    def start_metrics(self) -> None:
        port = self.config.health.prometheus_port
        if port is None:
            return
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import GaugeMetricFamily

        health = self

        class _Collector:
            def collect(self):  # noqa: ANN202 - prometheus_client protocol
                for key, value in health.state().items():
                    if isinstance(value, bool):
                        yield GaugeMetricFamily(f"taxonedge_{key}", key.replace("_", " "), value=int(value))
                    elif isinstance(value, (int, float)):
                        yield GaugeMetricFamily(f"taxonedge_{key}", key.replace("_", " "), value=value)
                source = health.capture.status()
                for key in ("frames", "dropped", "reconnects", "stalls", "corrupt"):
                    yield GaugeMetricFamily(f"taxonedge_source_{key}", f"source {key}", value=source[key])
                yield from drift_metrics(health.drift.report(health.serving.thresholds()), GaugeMetricFamily)

        registry = CollectorRegistry()
        registry.register(_Collector())
        server, _ = start_http_server(port, addr=self.config.health.prometheus_host, registry=registry)
        self.metrics_port = server.server_port


def drift_metrics(report: Drift, gauge: type) -> Iterator[Any]:
    """The drift figures as labelled gauges (`figure="unknown"`), observed and expected side by side."""
    yield gauge("taxonedge_drift_count", "labels in the drift window", value=report["count"])
    yield gauge(
        "taxonedge_drift_out_of_tolerance",
        "drift figures out of tolerance",
        value=len(report["out_of_tolerance"]),
    )
    for name, figures in (("observed", report["observed"]), ("expected", report["expected"] or {})):
        family = gauge(
            f"taxonedge_drift_{name}", f"{name} share of labels per drift figure", labels=["figure"]
        )
        for figure, share in figures.items():
            family.add_metric([figure], share)
        yield family
