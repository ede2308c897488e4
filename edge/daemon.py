"""The edge daemon: `taxonedge run --config FILE`.

Data flow, each stage a small module joined by bounded hand-offs:

    Capture thread (source.py) -> LatestFrame (one slot, newest wins)
    -> inference thread: preprocess -> InferenceWorker child process (infer.py) -> Decoder (decode.py)
       -> [ItemTrigger vote (trigger.py)] -> label -> Outbox (sqlite WAL, outbox.py)
    -> MQTT sender thread (mqtt.py) -> broker; rows leave the outbox on PUBACK

Control sits beside that flow: incoming MQTT messages (commands, item triggers, plugin topics) go through
a bounded queue to one control thread; a health thread checks the source for stalls, re-probes the Edge
TPU, publishes status and stats, feeds the systemd watchdog and the optional Prometheus endpoint.
Model updates (edge/update.py, a plugin) use the seam below: publish, subscribe, switch_model, ...
"""

from __future__ import annotations

import base64
import contextlib
import gc
import logging
import queue
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from taxonedge import __version__
from taxonedge.cli import CliError

from . import update
from .bundle import Bundle, BundleError, atomic_write
from .config import Config, ConfigError, load_config
from .decode import Decision, Decoder, decision_fields
from .infer import InferenceWorker, WorkerDied, WorkerError, WorkerInfo
from .mqtt import MqttLink, client_id_for
from .notify import sd_notify
from .osthread import start_thread
from .outbox import Outbox
from .preprocess import ImageError, preprocess
from .protocol import (
    LABEL_SCHEMA,
    Label,
    PayloadError,
    UnknownReason,
    check_text,
    json_bytes,
    parse_json_object,
    replies_prefix,
    response_topic_problem,
)
from .runtime import edgetpu_devices
from .signing import SigningKeyError, load_public_key
from .slots import read_verified, startup_bundle
from .source import Capture, Frame
from .trigger import ItemResult, ItemTrigger

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 16 * 1024
MAX_SNAPSHOTS = 20
FLUSH_TIMEOUT_S = 5.0


class CommandError(PayloadError):
    """A command that cannot be carried out; the text goes back in the response."""


@dataclass(frozen=True)
class InferenceResult:
    """What `add_result_listener` callbacks receive, once per classified frame."""

    ok: bool
    error: str | None
    latency_s: float  # frame capture to decision
    decision: str | None  # "accepted" | "backed-off" | "unknown" | None when it failed
    model_sha256: str
    invoke_s: float = 0.0
    label: str | None = None


@dataclass(frozen=True)
class _Ready:
    """A frame preprocessed for `bundle`, waiting to go to the worker."""

    frame: Frame
    item_id: str | None
    bundle: Bundle
    decoder: Decoder
    image: np.ndarray


@dataclass(frozen=True)
class _InFlight:
    """A frame at the worker, with the model and decoder it was sent to (a switch may happen meanwhile)."""

    frame: Frame
    item_id: str | None
    bundle: Bundle
    decoder: Decoder
    sent: float  # time.monotonic() when it went to the worker


@dataclass
class _Pending:
    worker: InferenceWorker
    bundle: Bundle
    future: Future | None  # None for an Edge TPU re-probe


def _ms_percentiles(seconds: deque[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds, rounded to microseconds; (0, 0) before the first value."""
    if not seconds:
        return 0.0, 0.0
    p50, p99 = np.percentile(np.array(seconds) * 1000, [50, 99])
    return round(float(p50), 3), round(float(p99), 3)


def utc_ms(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Daemon:
    def __init__(self, config: Config, max_frames: int | None = None):
        self.config = config
        self.topic_base = config.topic_base
        self.boot_id = uuid.uuid4().hex[:12]
        self.max_frames = max_frames
        self.stopping = threading.Event()
        self.done = threading.Event()
        self.paused = threading.Event()
        self._seq = 0
        self._label_lock = threading.Lock()  # seq order = outbox order, whichever thread publishes
        self._listeners: list[Callable[[InferenceResult], None]] = []
        self._subscriptions: list[tuple[str, Callable[[str, bytes, Any], None]]] = []
        self._control: queue.Queue[tuple[str, bytes, Any]] = queue.Queue(maxsize=1000)
        self._pending: _Pending | None = None
        self._swap_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._threshold_overrides = dict(config.model.thresholds)
        self._last_frame: Frame | None = None
        self._last_status: tuple | None = None
        self._item_event = threading.Event()
        # counters and recent timings for stats
        self.classified = 0
        self.labels = 0
        self.inference_errors = 0
        self.preprocess_errors = 0
        self.worker_restarts = 0
        self.control_dropped = 0
        self.triggers = 0
        self.triggers_refused = 0
        self.frames_idle = 0  # item mode between items, or paused: frames nobody wanted
        self._idle_mark: int | None = None  # slot.dropped when the current idle spell began
        self.startup_problems: list[str] = []  # e.g. an installed model that did not verify; until a switch
        self.commands = 0
        self.reprobes = 0
        self._stats_mark = (0, time.monotonic())  # frames classified and the time at the last stats message
        self.latencies: deque[float] = deque(maxlen=2000)  # capture to decision
        self.publish_latencies: deque[float] = deque(maxlen=2000)  # capture to handed to the broker
        self.invokes: deque[float] = deque(maxlen=2000)
        self.last_inference_wall: float | None = None
        self._invoke_avg = 0.0  # moving average of invoke seconds
        self._prepare_avg = 0.0  # moving average of seconds from asking for a frame to having it preprocessed
        self._restarting = False
        self.failed = False
        self._last_error: str | None = None
        self._last_progress = time.monotonic()
        self._probe_due = 0.0
        self._probing = False
        self._status_recheck = 0.0  # time.monotonic() when to publish status again after a (re)connect
        self.outbox: Outbox
        self.link: MqttLink
        self.capture: Capture
        self.trigger: ItemTrigger | None = None
        self._worker: InferenceWorker
        self._bundle: Bundle
        self._decoder: Decoder
        self._plugin: Any = None
        self.metrics_port: int | None = None

    # ---- the seam for control-plane plugins (edge/update.py) ---------------------------------------
    @property
    def active_bundle(self) -> Bundle:
        return self._bundle

    @property
    def worker_info(self) -> WorkerInfo | None:
        return self._worker.info

    def publish(self, topic: str, payload: dict | bytes, qos: int = 1, retain: bool = False,
                properties: Any = None) -> None:
        """A control-plane message (status, responses, deployment progress); labels use the outbox."""
        self.link.publish(topic, json_bytes(payload), qos=qos, retain=retain, properties=properties)

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes, Any], None]) -> None:
        """`handler(topic, payload, properties)` runs on the control thread; redone after every reconnect."""
        self._subscriptions.append((topic_filter, handler))
        if hasattr(self, "link"):
            self.link.subscribe(topic_filter)

    def add_result_listener(self, callback: Callable[[InferenceResult], None]) -> None:
        self._listeners.append(callback)

    def switch_model(self, bundle: Bundle) -> Future:
        """Load and warm `bundle` in a new worker while the old one serves; swap between items."""
        future: Future = Future()

        def prepare() -> None:
            try:
                worker = self._new_worker(bundle)
            except WorkerError as exc:
                future.set_exception(exc)
                return
            self._set_pending(_Pending(worker, bundle, future))

        start_thread(prepare, "switch-model")
        return future

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        bundle = self._initial_bundle()
        self.outbox = Outbox(cfg.outbox_path, cfg.outbox.max_messages)
        try:
            self._worker = self._new_worker(bundle)
        except WorkerError as exc:
            hint = " (set inference.backend = \"auto\" to fall back to the CPU)" if cfg.inference.backend == "edgetpu" else ""
            raise CliError(f"{exc}{hint}", 3) from None
        self._bundle = bundle
        self._decoder = self._make_decoder(bundle)
        info = self._worker.info
        log.info("model %s %s (%s) on %s via %s, warm-up %.0f ms", bundle.name, bundle.version, bundle.sha256[:12],
                 info.backend, info.runtime, info.warmup_s * 1000)
        if info.degraded_reason:
            log.warning("%s", info.degraded_reason)
        self._probe_due = time.monotonic() + cfg.inference.reprobe_interval_s
        if cfg.trigger.mode == "item":
            self.trigger = ItemTrigger(bundle.taxonomy, cfg.trigger.frames_per_item, cfg.trigger.vote_agreement,
                                       cfg.trigger.item_timeout_s, cfg.trigger.max_waiting)
        self.capture = Capture(cfg.source, cfg.capture)
        # What start-up loaded (modules, config, bundle, taxonomy) lives as long as the process: frozen out
        # of the garbage collector, a full collection while serving walks only what serving allocated
        # (measured here: 20 ms with the GIL held, every thread stalled, against 0.8 ms).
        gc.collect()
        gc.freeze()
        will = json_bytes({"state": "offline", "reason": "connection lost", "boot_id": self.boot_id,
                           "device": cfg.device.id})
        self.link = MqttLink(cfg.mqtt, client_id_for(cfg.mqtt, cfg.device.id), self.outbox,
                             f"{self.topic_base}/status", will, self._on_connected, self._on_message)
        self.capture.start()
        self.link.start()
        for name, target in (("inference", self._inference_loop), ("control", self._control_loop),
                             ("health", self._health_loop)):
            self._threads.append(start_thread(target, name))
        self._start_metrics()
        # Plugins attach once MQTT is up (subscriptions are redone on every reconnect anyway), but a
        # broker that is down must not hold up labels: they wait in the outbox.
        self.link.connected.wait(2.0)
        self._attach_plugin()
        sd_notify("READY=1", f"STATUS={self._status_line()}")

    def request_stop(self, *_: Any) -> None:
        self.stopping.set()
        self._item_event.set()

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT (or the source ends, or --max-frames), then shut down cleanly."""
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.start()  # a SIGTERM during start-up is honoured right after it
        try:
            while not self.stopping.wait(0.5):
                pass
        finally:
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 1 if self.failed else 0

    def shutdown(self) -> None:
        """Finish the item in flight, flush the outbox, publish offline, stop everything."""
        self.stopping.set()
        sd_notify("STOPPING=1")
        inference = self._threads[0] if self._threads else None
        if inference is not None:
            inference.join(timeout=self.config.trigger.item_timeout_s + self.config.inference.invoke_timeout_s + 2)
        self.capture.stop()
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while self.outbox.depth() and self.link.connected.is_set() and time.monotonic() < deadline:
            self.link.notify_outbox()
            time.sleep(0.02)
        if self.outbox.depth():
            log.warning("%d labels stay in the outbox %s; they are sent on the next start",
                        self.outbox.depth(), self.outbox.path)
        self._detach_plugin()
        if self.link.connected.is_set():
            self._publish_stats(final=True)
            reason = "failed" if self.failed else "stopped"
            info = self.link.client.publish(f"{self.topic_base}/status", json_bytes(
                {"state": "offline", "reason": reason, "boot_id": self.boot_id, "device": self.config.device.id}),
                qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2.0)
        self.done.set()
        if len(self._threads) > 1:
            self._threads[1].join(timeout=2)  # the control thread may still be storing a label
        gc.unfreeze()  # for a daemon run inside another program (the tests): its heap is collectable again
        self.link.stop()
        self._worker.stop()
        with self._swap_lock:
            if self._pending is not None:
                self._pending.worker.stop()
        self.outbox.close()
        log.info("stopped: %d frames classified, %d labels", self.classified, self.labels)

    # ---- start-up helpers -----------------------------------------------------------------------------
    def _initial_bundle(self) -> Bundle:
        key_problem = public_key_problem(self.config)
        if key_problem:
            raise CliError(key_problem, 2)
        path = startup_bundle(self.config, self.startup_problems) or self.config.model.bundle
        for problem in self.startup_problems:
            log.error("%s", problem)
        if path is None:
            raise CliError("no model: set model.bundle in the config (or deploy one)", 2)
        try:
            return read_verified(Path(path), self.config.model)
        except (BundleError, ValueError) as exc:
            raise CliError(f"model.bundle: {exc}", 2) from None

    def _new_worker(self, bundle: Bundle, backend: str | None = None) -> InferenceWorker:
        inf = self.config.inference
        worker = InferenceWorker(bundle, backend=backend or inf.backend, device=inf.edgetpu_device,
                                 num_threads=inf.interpreter_threads(), warmup_runs=inf.warmup_runs,
                                 invoke_timeout_s=inf.invoke_timeout_s)
        worker.start()
        return worker

    def _make_decoder(self, bundle: Bundle) -> Decoder:
        thresholds = {**bundle.manifest.thresholds, **self._threshold_overrides}
        return Decoder(bundle.taxonomy, thresholds, self.config.model.top_k)

    def _attach_plugin(self) -> None:
        try:
            update.attach(self)
            self._plugin = update
        except Exception:  # noqa: BLE001 - a broken plugin must not stop labels
            log.exception("the model-update plugin failed to attach; running without it")

    def _detach_plugin(self) -> None:
        if self._plugin is not None:
            try:
                self._plugin.detach(self)
            except Exception:  # noqa: BLE001
                log.exception("the model-update plugin failed to detach")

    # ---- inference thread ---------------------------------------------------------------------------
    def _inference_loop(self) -> None:
        try:
            self._serve()
        except Exception:  # noqa: BLE001 - never die silently: stop with an error so systemd restarts us
            log.exception("inference loop failed")
            self.failed = True
            self.request_stop()
            self._close_items("shutdown")

    def _serve(self) -> None:
        trig = self.trigger
        interval = 1.0 / self.config.trigger.max_rate_hz
        next_at = 0.0
        slot = self.capture.slot
        # Continuous mode decodes and preprocesses the next frame while the worker infers the current one,
        # and hands it over the moment the answer is back, before that answer is decoded and published: the
        # worker waits only for the pipe, and the frame is taken as late as that allows (fresh, so low
        # latency). inference.max_in_flight = 2 also queues it at the worker (so that a short invoke does
        # not idle for the pipe; up to one invoke more latency when saturated). Item mode keeps one frame
        # at a time, so that an item never gets more frames than it votes on.
        inflight: deque[_InFlight] = deque()
        ready: _Ready | None = None  # the next frame, preprocessed, not yet at the worker
        while True:
            # "auto" follows the invoke time: it changes with a new model or backend
            depth = 1 if trig is not None else self.config.inference.in_flight_limit(self._invoke_avg)
            if not inflight:
                busy = trig is not None and trig.busy
                if self.stopping.is_set() and not busy:
                    break
                if not busy:
                    self._maybe_swap()
                if self.paused.is_set():
                    self._drop(ready)
                    ready = None
                    self._count_idle(True)
                    self.paused_wait()
                    continue
                if ready is not None and ready.bundle is not self._bundle:  # a model switch came between
                    ready = self._prepare(ready.frame, ready.item_id)
                if ready is None:
                    item_id = None
                    if trig is not None:
                        expired = trig.expire()
                        if expired is not None:
                            self._publish_item(expired, self._last_frame)
                        item_id = trig.want_frame()
                        self._count_idle(item_id is None)
                        if item_id is None:
                            if self.capture.finished.is_set() and self.capture.slot.take(0) is None:
                                log.info("the source has ended")
                                break
                            self._item_event.wait(0.05)
                            self._item_event.clear()
                            continue
                    else:
                        wait = next_at - time.monotonic()
                        if wait > 0:
                            self.stopping.wait(wait)
                    frame = slot.take(timeout=0.25)
                    if trig is None:
                        self._count_idle(False)
                    if frame is None:
                        if self.capture.finished.is_set():
                            log.info("the source has ended")
                            break
                        continue
                    if item_id is not None and trig.before_trigger(item_id, frame.captured):
                        slot.count_dropped()  # the belt before the item: the next frame is the item's
                        continue
                    next_at = time.monotonic() + interval
                    ready = self._prepare(frame, item_id)
                    if ready is None:
                        continue
            if ready is not None:
                ready = self._hand_over(ready, inflight, depth)
                if ready is None and not inflight:  # the worker died on it and was replaced
                    continue
            if trig is None and ready is None and self._may_prepare(inflight, next_at):
                ready = self._prepare_next(inflight)
                if ready is not None:
                    next_at = max(next_at + interval, time.monotonic())
                    ready = self._hand_over(ready, inflight, depth)  # max_in_flight = 2: queued now
            if inflight:
                answer = self._collect(inflight)
                if ready is not None:
                    ready = self._hand_over(ready, inflight, depth)
                if answer is not None:
                    self._complete(*answer)
            if self.max_frames and self.classified >= self.max_frames and not (trig is not None and trig.busy):
                break
        while inflight:
            answer = self._collect(inflight)
            if answer is not None:
                self._complete(*answer)
        self._drop(ready)
        self._close_items("shutdown" if self.stopping.is_set() else "source_ended")
        self.request_stop()

    def _close_items(self, reason: UnknownReason) -> None:
        """Every accepted trigger ends in a label: the item being voted on gets its vote on the frames it
        has, the waiting ones (and any trigger from now on) `unknown` with `reason`."""
        if self.trigger is None:
            return
        for result in self.trigger.close(reason):
            self._publish_item(result, self._last_frame if result.frames else None)

    def _count_idle(self, idle: bool) -> None:
        """Frames the capture slot replaced while no item wanted one are idle frames, not dropped ones."""
        dropped = self.capture.slot.dropped
        if idle and self._idle_mark is None:
            self._idle_mark = dropped
        elif not idle and self._idle_mark is not None:
            self.frames_idle += dropped - self._idle_mark
            self._idle_mark = None

    def _may_send(self, inflight: deque[_InFlight], depth: int) -> bool:
        """Hand the prepared frame over now? Not while paused (it is dropped) or before a model switch
        (it is preprocessed again for the new model)."""
        return len(inflight) < depth and self._pending is None and not self.paused.is_set()

    def _hand_over(self, ready: _Ready, inflight: deque[_InFlight], depth: int) -> _Ready | None:
        """Send `ready` to the worker if it may go now: None once sent, else `ready`, still waiting."""
        if not self._may_send(inflight, depth):
            return ready
        self._send(ready, inflight)
        return None

    def _may_prepare(self, inflight: deque[_InFlight], next_at: float) -> bool:
        """Take the next frame now, while the worker is busy?"""
        lead = self._invoke_avg * len(inflight)
        return not (self.paused.is_set() or self.stopping.is_set() or self._pending is not None
                    or time.monotonic() < next_at - lead
                    or (self.max_frames and self.classified + len(inflight) + 1 > self.max_frames))

    def _prepare_next(self, inflight: deque[_InFlight]) -> _Ready | None:
        """The next frame, asked for so that it is decoded and preprocessed just when the worker is free."""
        busy_until = inflight[0].sent + self._invoke_avg * len(inflight)
        # Asked for a little early: a frame 0.5 ms older costs less than a worker idling while it waits.
        wait = busy_until - 1.5 * self._prepare_avg - 0.0005 - time.monotonic()
        if wait > 0 and self._worker.ready(wait):
            busy_until = 0.0  # the answer is already back: do not hold it up waiting for a frame
        slot = self.capture.slot
        slot.request()
        start = time.monotonic()
        timeout = max(0.0, busy_until - start)
        if not self.capture.reader.live:
            # A file decodes on request: wait past the answer by at most one prepare time (a little idle
            # worker, never a stale answer). A live source's frame comes when it comes: never wait past it.
            timeout += max(self._prepare_avg, 0.001)
        frame = slot.take(timeout=timeout)
        if frame is None:  # not in time: the answer goes first, the frame is taken afterwards
            return None
        ready = self._prepare(frame, None)
        self._prepare_avg += 0.1 * (time.monotonic() - start - self._prepare_avg)
        return ready

    def _drop(self, ready: _Ready | None) -> None:
        """A prepared frame that will not be classified (paused or stopping) counts as dropped."""
        if ready is not None:
            self.capture.slot.count_dropped()  # under the slot's lock: the capture thread counts there too

    def paused_wait(self) -> None:
        """Paused: keep the newest live frame for snapshots, leave an unpaced file where it is."""
        frame = self.capture.slot.take(timeout=0.05) if self.capture.reader.live else None
        if frame is not None:
            self._last_frame = frame
        else:
            self.stopping.wait(0.05)

    def _prepare(self, frame: Frame, item_id: str | None) -> _Ready | None:
        """Preprocess `frame` for the active model (None when it cannot be: counted and logged)."""
        self._last_frame = frame
        bundle = self._bundle
        try:
            image = preprocess(frame.image, bundle.manifest.input)
        except ImageError as exc:
            self.preprocess_errors += 1
            log.warning("frame %s: %s", frame.origin, exc)
            return None
        return _Ready(frame, item_id, bundle, self._decoder, image)

    def _send(self, ready: _Ready, inflight: deque[_InFlight]) -> None:
        """Hand a prepared frame to the worker; it joins `inflight` (oldest first)."""
        entry = _InFlight(ready.frame, ready.item_id, ready.bundle, ready.decoder, time.monotonic())
        inflight.append(entry)
        try:
            self._worker.submit(ready.image)
        except WorkerDied as exc:
            self._worker_died(exc, inflight)

    def _collect(self, inflight: deque[_InFlight]) -> tuple[_InFlight, np.ndarray | None, float, str | None] | None:
        """Wait for the oldest frame's answer: (entry, leaf probabilities or None, invoke s, error)."""
        entry = inflight[0]
        try:
            probs, invoke_s = self._worker.result()
        except WorkerDied as exc:
            self._worker_died(exc, inflight)
            return None
        except WorkerError as exc:
            inflight.popleft()
            return entry, None, 0.0, f"inference failed: {exc}"
        inflight.popleft()
        self._invoke_avg += (0.1 if self._invoke_avg else 1.0) * (invoke_s - self._invoke_avg)
        return entry, probs, invoke_s, None

    def _complete(self, entry: _InFlight, probs: np.ndarray | None, invoke_s: float, error: str | None) -> None:
        """Decode an answer, tell listeners, publish (or vote)."""
        decision = None
        if probs is not None:
            try:
                decision = entry.decoder.decode(probs)
            except ValueError as exc:  # NaN or wrong shape: a broken model, not a broken daemon
                error = f"inference failed: {exc}"
        self._done(entry, decision, error, invoke_s)

    def _worker_died(self, exc: WorkerError, inflight: deque[_InFlight]) -> None:
        """Every frame the dead worker held fails; a new worker takes over."""
        log.error("%s; restarting the inference worker", exc)
        lost = list(inflight)
        inflight.clear()
        for entry in lost:
            self._done(entry, None, str(exc), 0.0)
        self._restart_worker()

    def _done(self, entry: _InFlight, decision: Decision | None, error: str | None, invoke_s: float) -> None:
        frame = entry.frame
        if error is not None:
            self.inference_errors += 1
            # a broken model fails every frame: log a new error at once, a repeated one every 100th time
            if error != self._last_error or self.inference_errors % 100 == 0:
                log.warning("frame %s: %s (%d inference errors so far)", frame.origin, error, self.inference_errors)
            self._last_error = error
        now = time.monotonic()
        latency = now - frame.captured
        self.classified += 1
        self.last_inference_wall = time.time()
        self._last_progress = now
        if decision is not None:
            self.invokes.append(invoke_s)
        result = InferenceResult(decision is not None, error, latency, decision.decision if decision else None,
                                 entry.bundle.sha256, invoke_s, decision.label if decision else None)
        for listener in list(self._listeners):
            try:
                listener(result)
            except Exception:  # noqa: BLE001
                log.exception("result listener failed")
        if self.trigger is not None and entry.item_id is not None:
            item = self.trigger.add(entry.item_id, decision)
            if item is not None:
                self._publish_item(item, frame)
        elif decision is not None:
            self._publish_label(frame, decision, latency, invoke_s, bundle=entry.bundle)

    def _restart_worker(self) -> None:
        backoff = 0.5
        self._worker.stop()
        self._restarting = True
        while True:
            try:
                self._worker = self._new_worker(self._bundle)
                self.worker_restarts += 1
                self._restarting = False
                info = self._worker.info
                log.warning("inference worker restarted on %s", info.backend if info else "?")
                return
            except WorkerError as exc:
                log.error("inference worker restart failed: %s; retrying in %.1f s", exc, backoff)
                if self.stopping.wait(backoff):
                    raise RuntimeError("stopping while the inference worker could not be restarted") from exc
                backoff = min(backoff * 2, 30.0)

    def _set_pending(self, pending: _Pending) -> None:
        with self._swap_lock:
            old, self._pending = self._pending, pending
        if old is not None:
            old.worker.stop()
            if old.future is not None and not old.future.done():
                old.future.set_exception(RuntimeError("superseded by a newer switch_model call"))

    def _maybe_swap(self) -> None:
        if self._pending is None:
            return
        with self._swap_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        old = self._worker
        self._worker, self._bundle = pending.worker, pending.bundle
        self.startup_problems.clear()  # they were about the model that served until now
        self._decoder = self._make_decoder(pending.bundle)
        if self.trigger is not None:
            self.trigger.taxonomy = pending.bundle.taxonomy
        start_thread(old.stop, "old-worker-stop")
        info = self._worker.info
        log.info("now serving %s %s (%s) on %s", pending.bundle.name, pending.bundle.version,
                 pending.bundle.sha256[:12], info.backend if info else "?")
        self._publish_model()
        if pending.future is not None:
            pending.future.set_result(pending.bundle)

    # ---- labels -------------------------------------------------------------------------------------
    def label_payload(self, frame: Frame | None, decision: Decision, latency_s: float, invoke_s: float,
                      item: ItemResult | None = None, bundle: Bundle | None = None) -> Label:
        """The label message (protocol.Label); takes the next seq, so call it under `_label_lock`."""
        self._seq += 1
        bundle, dev = bundle or self._bundle, self.config.device
        info = self._worker.info
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
            **decision_fields(decision, item.reason if item else None),  # type: ignore[typeddict-item]
            "vote": ({"frames": item.frames, "agreeing": item.agreeing, "agreement": round(item.agreement, 4)}
                     if item else None),
            "model": {"name": bundle.name, "version": bundle.version, "sha256": bundle.sha256},
            "backend": info.backend if info else "unknown",
            "latency_ms": round(max(latency_s, 0.0) * 1000, 3),
            "inference_ms": round(invoke_s * 1000, 3),
        }

    def _publish_label(self, frame: Frame | None, decision: Decision, latency_s: float, invoke_s: float,
                       item: ItemResult | None = None, bundle: Bundle | None = None) -> None:
        with self._label_lock:  # the control thread publishes too (overflowed items)
            payload = self.label_payload(frame, decision, latency_s, invoke_s, item, bundle)
            message = self.outbox.put(f"{self.topic_base}/labels", json_bytes(payload), qos=1,
                                      expiry_s=self.config.mqtt.label_expiry_s)
            self.labels += 1
        published = self.link.notify_outbox(message)
        self.latencies.append(latency_s)
        if published and frame is not None:
            # Labels sent live only: one that waited out an outage shows in the outbox depth instead.
            self.publish_latencies.append(time.monotonic() - frame.captured)

    def _publish_item(self, item: ItemResult, frame: Frame | None) -> None:
        latency = time.monotonic() - frame.captured if frame else 0.0
        self._publish_label(frame, item.decision, latency, 0.0, item)

    # ---- MQTT control -------------------------------------------------------------------------------
    def _on_connected(self) -> None:
        client = self.link.client
        client.subscribe(f"{self.topic_base}/cmd/+", qos=1)
        client.subscribe(f"{self.topic_base}/trigger", qos=1)
        for topic_filter, _ in self._subscriptions:
            client.subscribe(topic_filter, qos=1)
        client.subscribe(f"{self.topic_base}/status", qos=1)
        self._last_status = None
        self._publish_status(force=True)
        self._publish_model()
        # The will of a previous process of this device (crashed, restarted by systemd within the will delay)
        # may arrive after our `online`: `_on_status` answers one it sees, and this re-assertion covers a
        # broker ACL that does not let the device read its own status.
        self._status_recheck = time.monotonic() + self.config.mqtt.will_delay_s + 1.0

    def _on_message(self, topic: str, payload: bytes, properties: Any) -> None:
        try:
            self._control.put_nowait((topic, payload, properties))
        except queue.Full:
            self.control_dropped += 1

    def _control_loop(self) -> None:
        import paho.mqtt.client as paho

        cmd_prefix = f"{self.topic_base}/cmd/"
        while not self.done.is_set():
            try:
                topic, payload, props = self._control.get(timeout=0.2)
            except queue.Empty:
                continue
            plugin = [h for f, h in self._subscriptions if paho.topic_matches_sub(f, topic)]
            try:
                if topic == f"{self.topic_base}/trigger":
                    self._on_trigger(payload)
                elif topic == f"{self.topic_base}/status":
                    self._on_status(payload)
                elif topic.startswith(cmd_prefix) and not plugin:
                    self._on_command(topic, topic[len(cmd_prefix):], payload, props)
            except Exception:  # noqa: BLE001 - a bad message never kills the daemon
                log.exception("handling a message on %s failed", topic)
            for handler in plugin:
                try:
                    handler(topic, payload, props)
                except Exception:  # noqa: BLE001
                    log.exception("subscription handler for %s failed", topic)

    def _on_status(self, payload: bytes) -> None:
        """Our own retained status as the broker has it: another boot's `offline` (its last will, delayed)
        must not stay there while this process runs."""
        try:
            status = parse_json_object(payload, MAX_COMMAND_BYTES)
        except PayloadError:
            status = {}
        if status.get("boot_id") != self.boot_id and not self.done.is_set() and not self.stopping.is_set():
            log.info("the broker holds a status of another boot (%s, %s): publishing ours again",
                     status.get("boot_id"), status.get("state"))
            self._publish_status(force=True)

    def _on_trigger(self, payload: bytes) -> None:
        """An item id, as `{"item_id": "A-1234"}` or the plain id; an id is a string of printable text
        (1-128 characters) or an integer. Refused ones are counted and logged: they get no label."""
        if self.trigger is None:
            self._refuse_trigger(f"trigger.mode is {self.config.trigger.mode}, not item")
            return
        try:
            text = payload.decode("utf-8").strip() if len(payload) <= MAX_COMMAND_BYTES else ""
            if text.startswith("{"):
                data = parse_json_object(payload, MAX_COMMAND_BYTES)
                if "item_id" not in data:
                    raise PayloadError('no "item_id" key')
                if set(data) - {"item_id"}:
                    raise PayloadError(f"unknown keys {sorted(data.keys() - {'item_id'})}")
                item_id = check_text(data["item_id"], "item_id")
            else:
                item_id = check_text(text, "item_id")
        except (PayloadError, UnicodeDecodeError) as exc:
            self._refuse_trigger(f'{exc}: send {{"item_id": "..."}} or the plain id')
            return
        self.triggers += 1
        overflow = self.trigger.trigger(item_id)
        if overflow is not None:
            log.warning("item %r: more than trigger.max_waiting = %d items waiting: labelled unknown (%s)",
                        overflow.item_id, self.config.trigger.max_waiting, overflow.reason)
            self._publish_item(overflow, None)
        self._item_event.set()

    def _refuse_trigger(self, why: str) -> None:
        self.triggers_refused += 1
        level = logging.WARNING if self.triggers_refused <= 10 or self.triggers_refused % 1000 == 0 else logging.DEBUG
        log.log(level, "trigger message refused (%s); %d refused so far", why, self.triggers_refused)

    def _on_command(self, topic: str, name: str, payload: bytes, props: Any) -> None:
        """Every command gets exactly one answer (protocol.CommandAnswer): on the request's response topic
        when that is allowed (protocol.response_topic_problem), else on `<topic>/response`."""
        self.commands += 1
        response_topic = f"{topic}/response"
        correlation = None
        problems = []
        if props is not None:
            candidate = getattr(props, "ResponseTopic", None)
            if isinstance(candidate, str) and candidate:
                problem = response_topic_problem(candidate, self.topic_base, self.config.mqtt.prefix)
                if problem is None:
                    response_topic = candidate
                else:
                    problems.append(f"response topic {candidate!r} refused: {problem}; use one under "
                                    f"{replies_prefix(self.config.mqtt.prefix)}")
            correlation = getattr(props, "CorrelationData", None)
        request_id = None
        try:
            args = parse_json_object(payload, MAX_COMMAND_BYTES)
            if "id" in args:
                request_id = check_text(args.pop("id"), "id")
            handler = self._commands().get(name)
            if handler is None:
                raise CommandError(f"unknown command {name!r}; known: {', '.join(sorted(self._commands()))}")
            if problems:
                raise CommandError(problems[0])
            response: dict = {"ok": True, "command": name, "result": handler(args)}
        except PayloadError as exc:
            response = {"ok": False, "command": name, "error": str(exc)}
        if request_id is not None:
            response["id"] = request_id
        properties = None
        if correlation is not None and self.link.v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation
        self.publish(response_topic, response, qos=1, properties=properties)

    def _commands(self) -> dict[str, Callable[[dict], Any]]:
        return {"pause": self._cmd_pause, "resume": self._cmd_resume, "set_thresholds": self._cmd_thresholds,
                "snapshot": self._cmd_snapshot, "state": self._cmd_state}

    @staticmethod
    def _no_args(args: dict, allowed: tuple[str, ...] = ()) -> None:
        unknown = sorted(set(args) - set(allowed))
        if unknown:
            what = f"it takes {', '.join(allowed)}" if allowed else "it takes no arguments"
            raise CommandError(f"unknown keys {unknown}: {what} (besides id)")

    def _cmd_state(self, args: dict) -> dict:
        self._no_args(args)
        return dict(self.state())

    def _cmd_pause(self, args: dict) -> dict:
        self._no_args(args)
        self.paused.set()
        self._publish_status()
        return {"paused": True}

    def _cmd_resume(self, args: dict) -> dict:
        self._no_args(args)
        self.paused.clear()
        self._publish_status()
        return {"paused": False}

    def _cmd_thresholds(self, args: dict) -> dict:
        """{"depth_1": 0.8, ...}: override per-depth thresholds until restart (null resets one)."""
        values = args["thresholds"] if set(args) == {"thresholds"} else args
        depth = self._bundle.taxonomy.depth
        usage = (f'send {{"depth_1": 0.8, ...}}: keys depth_1..depth_{depth}, values between 0 and 1, '
                 "null resets one")
        if not isinstance(values, dict) or not values:
            raise CommandError(usage)
        keys = {f"depth_{d}" for d in range(1, depth + 1)}
        for key, value in values.items():
            ok_value = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                         and 0.0 <= value <= 1.0)
            if key not in keys or not ok_value:
                raise CommandError(f"{key} = {value!r}: {usage}")
        for key, value in values.items():
            if value is None:
                self._threshold_overrides.pop(key, None)
            else:
                self._threshold_overrides[key] = float(value)
        self._decoder = self._make_decoder(self._bundle)
        return {"thresholds": {f"depth_{i + 1}": t for i, t in enumerate(self._decoder.thresholds)}}

    def _cmd_snapshot(self, args: dict) -> dict:
        import cv2

        self._no_args(args, ("inline",))
        frame = self._last_frame
        if frame is None:
            raise CommandError("no frame captured yet")
        ok, jpeg = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            raise CommandError("the frame could not be encoded")
        data = jpeg.tobytes()
        path = self.config.device.state_dir / "snapshots" / f"snapshot-{utc_ms(frame.wall).replace(':', '')}.jpg"
        atomic_write(path, data)
        for old in sorted(path.parent.glob("snapshot-*.jpg"))[:-MAX_SNAPSHOTS]:  # bounded, oldest go first
            old.unlink(missing_ok=True)
        result = {"path": str(path), "bytes": len(data), "frame": frame.origin, "captured_at": utc_ms(frame.wall)}
        if args.get("inline") is True:
            result["jpeg_base64"] = base64.b64encode(data).decode("ascii")
        return result

    # ---- status, stats, health ---------------------------------------------------------------------------
    def state_reasons(self) -> list[str]:
        reasons = list(self.startup_problems)
        info = self._worker.info
        if info and info.degraded_reason:
            reasons.append(info.degraded_reason)
        if self.capture.state in ("reconnecting", "stalled"):
            reasons.append(f"source {self.capture.state}: {self.capture.last_error or 'no frames'}")
        if self._restarting:
            reasons.append("inference worker restarting")
        if self.paused.is_set():
            reasons.append("paused by command")
        return reasons

    def status_state(self) -> str:
        return "degraded" if self.state_reasons() else "online"

    def _publish_status(self, force: bool = False) -> None:
        info = self._worker.info
        key = (self.status_state(), tuple(self.state_reasons()), info.backend if info else None)
        if not force and key == self._last_status:
            return
        self._last_status = key
        self.publish(f"{self.topic_base}/status", {
            "state": key[0], "reasons": list(key[1]), "boot_id": self.boot_id, "device": self.config.device.id,
            "backend": key[2], "runtime": info.runtime if info else None, "version": __version__,
            "since": utc_ms(time.time())}, qos=1, retain=True)

    def _publish_model(self) -> None:
        bundle = self._bundle
        info = self._worker.info
        self.publish(f"{self.topic_base}/model", {
            **bundle.describe(), "signature": bundle.signature_status, "backend": info.backend if info else None,
            "since": utc_ms(time.time())}, qos=1, retain=True)

    def state(self) -> dict:
        """Everything an operator wants at a glance: the `state` command, stats and metrics use it."""
        info = self._worker.info
        lat, pub, inv = (_ms_percentiles(x) for x in (self.latencies, self.publish_latencies, self.invokes))
        return {
            "state": self.status_state(), "reasons": self.state_reasons(), "boot_id": self.boot_id,
            "paused": self.paused.is_set(), "backend": info.backend if info else None,
            "runtime": info.runtime if info else None, "model": self._bundle.describe(),
            "thresholds": {f"depth_{i + 1}": t for i, t in enumerate(self._decoder.thresholds)},
            "source": self.capture.status(), "frames_captured": self.capture.frames,
            **self._frame_counts(), "frames_classified": self.classified, "labels": self.labels,
            "latency_ms_p50": lat[0], "latency_ms_p99": lat[1],
            "publish_latency_ms_p50": pub[0], "publish_latency_ms_p99": pub[1],
            "invoke_ms_p50": inv[0],
            "inference_errors": self.inference_errors, "preprocess_errors": self.preprocess_errors,
            "worker_restarts": self.worker_restarts, "edgetpu_reprobes": self.reprobes,
            "outbox_depth": self.outbox.depth(), "outbox_evicted": self.outbox.counter("evicted"),
            "outbox_expired": self.outbox.counter("expired"), "mqtt_connected": self.link.connected.is_set(),
            "mqtt_error": self.link.last_error, "commands": self.commands, "control_dropped": self.control_dropped,
            "triggers": self.triggers, "triggers_refused": self.triggers_refused,
            "items_waiting": self.trigger.waiting() if self.trigger else 0,
            "items_timed_out": self.trigger.timed_out if self.trigger else 0,
            "items_overflowed": self.trigger.overflowed if self.trigger else 0,
            "last_frame_time": utc_ms(self.capture.last_frame_wall) if self.capture.last_frame_wall else None,
            "last_inference_time": utc_ms(self.last_inference_wall) if self.last_inference_wall else None,
        }

    def _frame_counts(self) -> dict[str, int]:
        """The slot's replaced frames, split: idle (nobody wanted one) and dropped (inference was busy)."""
        replaced = self.capture.slot.dropped
        idle = self.frames_idle + (replaced - self._idle_mark if self._idle_mark is not None else 0)
        return {"frames_dropped": max(replaced - idle, 0), "frames_idle": idle}

    def _status_line(self) -> str:
        info = self._worker.info
        return (f"{self.status_state()} on {info.backend if info else '?'}: {self.classified} frames, "
                f"{self.labels} labels, outbox {self.outbox.depth()}")

    def _health_loop(self) -> None:
        stats_every = self.config.mqtt.stats_interval_s
        next_stats = time.monotonic() + stats_every
        while not self.stopping.wait(1.0):
            try:
                self.capture.check_stall()
                if self._status_recheck and time.monotonic() >= self._status_recheck:
                    self._status_recheck = 0.0
                    self._publish_status(force=True)
                self._publish_status()
                self._maybe_reprobe()
                self._watchdog()
                self.outbox.checkpoint()  # here, not on a label's commit (edge/outbox.py)
                if time.monotonic() >= next_stats:
                    self._publish_stats()
                    next_stats = time.monotonic() + stats_every
            except Exception:  # noqa: BLE001 - health reporting must not stop the daemon
                log.exception("health check failed")

    def _publish_stats(self, final: bool = False) -> None:
        """fps since the previous stats message. The final one (at shutdown, QoS 1, so that it arrives
        before `offline`) closes the run's figures."""
        now = time.monotonic()
        count, since = self._stats_mark
        self._stats_mark = self.classified, now
        payload = {**self.state(), "fps": round((self.classified - count) / max(now - since, 1e-9), 2),
                   "final": final, "time": utc_ms(time.time())}
        self.publish(f"{self.topic_base}/stats", payload, qos=1 if final else 0)

    def _watchdog(self) -> None:
        """WATCHDOG=1 only while frames arrive and inference keeps up (or is idle by design)."""
        timeout = self.config.health.progress_timeout_s
        now = time.time()
        frames_ok = self.capture.last_frame_wall is not None and now - self.capture.last_frame_wall < timeout
        idle = self.paused.is_set() or (self.trigger is not None and not self.trigger.busy)
        infer_ok = idle or time.monotonic() - self._last_progress < timeout
        lines = [f"STATUS={self._status_line()}"]
        if frames_ok and infer_ok:
            lines.append("WATCHDOG=1")
        sd_notify(*lines)

    def _maybe_reprobe(self) -> None:
        """On the CPU because auto found no Edge TPU: try again now and then, in a separate worker, when the
        kernel shows an accelerator (plugged in since)."""
        info = self._worker.info
        if (self.config.inference.backend != "auto" or info is None or info.backend != "cpu" or self._probing
                or not self._bundle.has_edgetpu_model or time.monotonic() < self._probe_due):
            return  # a bundle without an Edge TPU model runs on the CPU whatever is plugged in
        self.reprobes += 1
        self._probe_due = time.monotonic() + self.config.inference.reprobe_interval_s
        if not edgetpu_devices(self.config.inference.edgetpu_device):
            log.log(logging.INFO if self.reprobes == 1 else logging.DEBUG,
                    "Edge TPU re-probe: no Edge TPU device present (no /dev/apex_*, no Coral USB id); "
                    "looking again every %.0f s", self.config.inference.reprobe_interval_s)
            return
        self._probing = True
        bundle = self._bundle

        def probe() -> None:
            try:
                worker = self._new_worker(bundle, backend="edgetpu")
            except WorkerError as exc:
                log.info("Edge TPU re-probe: still unavailable (%s)", exc)
            else:
                log.warning("Edge TPU found on re-probe: switching from the CPU")
                self._set_pending(_Pending(worker, bundle, None))
            finally:
                self._probing = False

        start_thread(probe, "edgetpu-probe")

    def _start_metrics(self) -> None:
        port = self.config.health.prometheus_port
        if port is None:
            return
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import GaugeMetricFamily

        daemon = self

        class _Collector:
            def collect(self):  # noqa: ANN202 - prometheus_client protocol
                for key, value in daemon.state().items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        yield GaugeMetricFamily(f"taxonedge_{key}", key.replace("_", " "), value=value)
                    elif isinstance(value, bool):
                        yield GaugeMetricFamily(f"taxonedge_{key}", key.replace("_", " "), value=int(value))
                source = daemon.capture.status()
                for key in ("frames", "dropped", "reconnects", "stalls", "corrupt"):
                    yield GaugeMetricFamily(f"taxonedge_source_{key}", f"source {key}", value=source[key])

        registry = CollectorRegistry()
        registry.register(_Collector())
        server, _ = start_http_server(port, addr=self.config.health.prometheus_host, registry=registry)
        self.metrics_port = server.server_port


def public_key_problem(config: Config) -> str | None:
    """model.public_key's own problem, named as such (not as a problem of model.bundle)."""
    key = config.model.public_key
    if key is None:
        return None
    if not Path(key).is_file():
        return (f"model.public_key: {key} does not exist (the fleet's public key, made with "
                "`taxonedge keygen`; the demo's is examples/models/grocery/taxonedge-demo.pub)")
    try:
        load_public_key(key)
    except SigningKeyError as exc:
        return f"model.public_key: {exc}"
    return None


def validate(config: Config) -> list[str]:
    """Problems with the files and secrets a config names (the schema itself is checked by load_config)."""
    problems = []
    key_problem = public_key_problem(config)
    if key_problem:
        problems.append(key_problem)
    elif config.model.bundle is not None:
        try:
            read_verified(config.model.bundle, config.model)
        except (BundleError, ValueError) as exc:
            problems.append(f"model.bundle: {exc}")
    try:
        config.mqtt.password()
    except ConfigError as exc:
        problems.append(str(exc))
    if config.mqtt.tls is not None:
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(config.mqtt.tls, key)
            if path is not None and not path.is_file():
                problems.append(f"mqtt.tls.{key}: {path} does not exist")
    source_path = getattr(config.source, "path", None)
    if source_path is not None and not source_path.exists():
        problems.append(f"source.path: {source_path} does not exist (the daemon would keep retrying)")
    return problems


def run_command(args: Any) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    if args.validate_config:
        problems = validate(config)
        if problems:
            raise CliError("\n".join(problems), 2)
        print(f"{args.config}: valid ({config.source.type} source, {config.trigger.mode} trigger, "
              f"{config.inference.backend} backend, MQTT {config.mqtt.host}:{config.mqtt.port})")
        return 0
    return Daemon(config, max_frames=args.max_frames).run()
