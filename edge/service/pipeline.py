"""Frames to results, on the inference thread: take a frame -> preprocess -> the worker -> decode -> publish
(or vote, in item mode).

Continuous mode decodes and preprocesses the next frame while the worker infers the current one, and hands
it over the moment the answer is back, before that answer is decoded and published: the worker waits only
for the pipe, and the frame is taken as late as that allows (fresh, so low latency). `max_in_flight = 2`
also queues it at the worker (a short invoke then never idles for the pipe; up to one invoke more latency
when saturated). Item mode keeps one frame at a time, so that an item never gets more frames than it
votes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernel.bundle import Bundle
from ..kernel.decode import Decision, Decoder
from ..kernel.preprocess import ImageError, preprocess
from ..kernel.protocol import UnknownReason
from .config import Config
from .enrollment import Enrollment
from .infer import WorkerDied, WorkerError
from .noitem import NoItem
from .publish import LabelInput, LabelPublisher
from .serving import Serving
from .source import Capture, Frame
from .trigger import ItemResult, ItemTrigger

log = logging.getLogger(__name__)
_STOP: Any = object()  # `_next_ready` says the loop ends


@dataclass(frozen=True)
class InferenceResult:
    """What result listeners (`Pipeline.listeners`, the updater's health window) get per classified frame."""

    ok: bool
    error: str | None
    latency_s: float  # frame capture to decision
    decision: str | None  # "accepted" | "backed-off" | "unknown" | None when it failed
    model_sha256: str
    invoke_s: float = 0.0
    label: str | None = None


@dataclass(frozen=True)
class _Collected:
    """The worker's answer for the oldest frame in flight: leaf scores (None when it failed) and more."""

    entry: _InFlight
    scores: np.ndarray | None
    invoke_s: float
    error: str | None
    embedding: np.ndarray | None = None


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


class Pipeline:
    """The inference thread's loop. (Over 300 lines: the hand-over timing of one frame at the worker and
    the next one prepared shares its state, in flight, ready, next_at and the moving averages.)"""

    def __init__(
        self,
        config: Config,
        capture: Capture,
        serving: Serving,
        publisher: LabelPublisher,
        trigger: ItemTrigger | None,
        noitem: NoItem,
        enrollment: Enrollment,
        stopping: threading.Event,
        max_frames: int | None = None,
    ):
        self.config = config
        self.capture = capture
        self.serving = serving
        self.publisher = publisher
        self.trigger = trigger
        self.stopping = stopping
        self.max_frames = max_frames
        self.noitem = noitem
        self.enrollment = enrollment
        self.paused = threading.Event()
        self.item_event = threading.Event()  # a trigger came: look for the item's frames now
        self.listeners: list[Callable[[InferenceResult], None]] = []
        self.failed = False
        self.last_frame: Frame | None = None
        self._interval = 1.0 / config.trigger.max_rate_hz
        self._next_at = 0.0  # continuous mode: when the next frame may be taken (max_rate_hz)
        self._invoke_avg = 0.0  # moving average of invoke seconds
        self._prepare_avg = 0.0  # moving average of seconds from asking for a frame to having it preprocessed
        self._last_error: str | None = None
        self.last_progress = time.monotonic()
        self.last_inference_wall: float | None = None
        self.classified = 0
        self.inference_errors = 0
        self.preprocess_errors = 0
        self.invokes: deque[float] = deque(maxlen=2000)
        self.frames_idle = 0  # item mode between items, or paused: frames nobody wanted
        self._idle_mark: int | None = None  # slot.dropped when the current idle spell began

    def run(self) -> None:
        """The inference thread. Ends when stopping, at the end of the source, or at max_frames."""
        try:
            self._serve()
        except Exception:  # noqa: BLE001 - never die silently: stop with an error so systemd restarts us
            log.exception("inference loop failed")
            self.failed = True
            self.stopping.set()
            self.close_items("shutdown")
            self.noitem.cancel("the inference loop failed")
            self.enrollment.cancel_capture("ended: the inference loop failed")

    def _serve(self) -> None:
        trig = self.trigger
        inflight: deque[_InFlight] = deque()
        ready: _Ready | None = None  # the next frame, preprocessed, not yet at the worker
        while True:
            # "auto" follows the invoke time: it changes with a new model or backend
            depth = 1 if trig is not None else self.config.inference.in_flight_limit(self._invoke_avg)
            if not inflight:
                ready = self._next_ready(ready)
                if ready is _STOP:
                    break
                if ready is None:
                    continue
            if ready is not None:
                ready = self._hand_over(ready, inflight, depth)
                if ready is None and not inflight:  # the worker died on it and was replaced
                    continue
            if trig is None and ready is None and self._may_prepare(inflight):
                ready = self._prepare_next(inflight)
                if ready is not None:
                    self._next_at = max(self._next_at + self._interval, time.monotonic())
                    ready = self._hand_over(ready, inflight, depth)  # max_in_flight = 2: queued now
            if inflight:
                answer = self._collect(inflight)
                if ready is not None:
                    ready = self._hand_over(ready, inflight, depth)
                if answer is not None:
                    self._complete(answer)
            if (
                self.max_frames
                and self.classified >= self.max_frames
                and not (trig is not None and trig.busy)
            ):
                break
        while inflight:
            answer = self._collect(inflight)
            if answer is not None:
                self._complete(answer)
        self._drop(ready if ready is not _STOP else None)
        self.close_items("shutdown" if self.stopping.is_set() else "source_ended")
        ended = "the daemon stopped" if self.stopping.is_set() else "the source ended"
        self.noitem.cancel(ended)
        self.enrollment.cancel_capture(f"ended: {ended}")
        self.stopping.set()
        self.item_event.set()

    def _next_ready(self, ready: _Ready | None) -> Any:
        """With nothing at the worker: swap in a new model, honour pause, take the next frame (the item's,
        in item mode). The frame to send, None to look again, or _STOP."""
        trig, slot = self.trigger, self.capture.slot
        busy = trig is not None and trig.busy
        if self.stopping.is_set() and not busy:
            self._drop(ready)
            return _STOP
        if not busy:
            self.serving.maybe_swap()
            self._reembed()
        if self.paused.is_set():
            self._drop(ready)
            self._count_idle(True)
            self.paused_wait()
            return None
        if ready is not None:  # prepared again if a model switch came between
            return ready if ready.bundle is self.serving.bundle else self._prepare(ready.frame, ready.item_id)
        item_id = None
        if trig is not None:
            expired = trig.expire()
            if expired is not None:
                self._publish_item(expired, self.last_frame)
            item_id = trig.want_frame()
            learning = self.noitem.learning  # between items, learn_empty wants frames too
            self._count_idle(item_id is None and not learning)
            if item_id is None and not learning:
                if self.capture.finished.is_set() and slot.take(0) is None:
                    log.info("the source has ended")
                    return _STOP
                self.item_event.wait(0.05)
                self.item_event.clear()
                return None
        else:
            wait = self._next_at - time.monotonic()
            if wait > 0:
                self.stopping.wait(wait)
        frame = slot.take(timeout=0.25)
        if trig is None:
            self._count_idle(False)
        if frame is None:
            if self.capture.finished.is_set():
                log.info("the source has ended")
                return _STOP
            return None
        if item_id is not None and trig is not None and trig.before_trigger(item_id, frame.captured):
            slot.count_dropped()  # the belt before the item: the next frame is the item's
            return None
        self._next_at = time.monotonic() + self._interval
        return self._prepare(frame, item_id)

    def close_items(self, reason: UnknownReason) -> None:
        """Every accepted trigger ends in a label: the item being voted on gets its vote on the frames it
        has, the waiting ones (and any trigger from now on) `unknown` with `reason`."""
        if self.trigger is None:
            return
        for result in self.trigger.close(reason):
            self._publish_item(result, self.last_frame if result.frames else None)

    def _count_idle(self, idle: bool) -> None:
        """Frames the capture slot replaced while no item wanted one are idle frames, not dropped ones."""
        dropped = self.capture.slot.dropped
        if idle and self._idle_mark is None:
            self._idle_mark = dropped
        elif not idle and self._idle_mark is not None:
            self.frames_idle += dropped - self._idle_mark
            self._idle_mark = None

    def frame_counts(self) -> dict[str, int]:
        """The slot's replaced frames, split: idle (nobody wanted one) and dropped (inference was busy)."""
        replaced = self.capture.slot.dropped
        idle = self.frames_idle + (replaced - self._idle_mark if self._idle_mark is not None else 0)
        return {"frames_dropped": max(replaced - idle, 0), "frames_idle": idle}

    # ---- hand-over to the worker -------------------------------------------------------------------
    def _may_send(self, inflight: deque[_InFlight], depth: int) -> bool:
        """Hand the prepared frame over now? Not while paused (it is dropped) or before a model switch
        (it is preprocessed again for the new model)."""
        return len(inflight) < depth and not self.serving.switch_waiting and not self.paused.is_set()

    def _hand_over(self, ready: _Ready, inflight: deque[_InFlight], depth: int) -> _Ready | None:
        """Send `ready` to the worker if it may go now: None once sent, else `ready`, still waiting."""
        if not self._may_send(inflight, depth):
            return ready
        self._send(ready, inflight)
        return None

    def _may_prepare(self, inflight: deque[_InFlight]) -> bool:
        """Take the next frame now, while the worker is busy?"""
        lead = self._invoke_avg * len(inflight)
        return not (
            self.paused.is_set()
            or self.stopping.is_set()
            or self.serving.switch_waiting
            or time.monotonic() < self._next_at - lead
            or (self.max_frames and self.classified + len(inflight) + 1 > self.max_frames)
        )

    def _prepare_next(self, inflight: deque[_InFlight]) -> _Ready | None:
        """The next frame, asked for so that it is decoded and preprocessed just when the worker is free."""
        busy_until = inflight[0].sent + self._invoke_avg * len(inflight)
        # Asked for a little early: a frame 0.5 ms older costs less than a worker idling while it waits.
        wait = busy_until - 1.5 * self._prepare_avg - 0.0005 - time.monotonic()
        if wait > 0 and self.serving.worker.ready(wait):
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
            self.last_frame = frame
        else:
            self.stopping.wait(0.05)

    def _prepare(self, frame: Frame, item_id: str | None) -> _Ready | None:
        """Preprocess `frame` for the active model (None when it cannot be: counted and logged)."""
        self.last_frame = frame
        bundle = self.serving.bundle
        try:
            image = preprocess(frame.image, bundle.manifest.input)
        except ImageError as exc:
            self.preprocess_errors += 1
            log.warning("frame %s: %s", frame.origin, exc)
            return None
        return _Ready(frame, item_id, bundle, self.serving.decoder, image)

    def _send(self, ready: _Ready, inflight: deque[_InFlight]) -> None:
        """Hand a prepared frame to the worker; it joins `inflight` (oldest first)."""
        entry = _InFlight(ready.frame, ready.item_id, ready.bundle, ready.decoder, time.monotonic())
        inflight.append(entry)
        try:
            self.serving.worker.submit(ready.image)
        except WorkerDied as exc:
            self._worker_died(exc, inflight)

    # ---- answers -----------------------------------------------------------------------------------
    def _collect(self, inflight: deque[_InFlight]) -> _Collected | None:
        """Wait for the oldest frame's answer."""
        entry = inflight[0]
        try:
            probs, invoke_s, embedding = self.serving.worker.result()
        except WorkerDied as exc:
            self._worker_died(exc, inflight)
            return None
        except WorkerError as exc:
            inflight.popleft()
            return _Collected(entry, None, 0.0, f"inference failed: {exc}")
        inflight.popleft()
        self._invoke_avg += (0.1 if self._invoke_avg else 1.0) * (invoke_s - self._invoke_avg)
        return _Collected(entry, probs, invoke_s, None, embedding)

    def _complete(self, answer: _Collected) -> None:
        """Decode an answer, tell listeners, publish (or vote)."""
        decision, error = None, answer.error
        if answer.scores is not None:
            try:
                decision = answer.entry.decoder.decode(answer.scores)
            except ValueError as exc:  # NaN or wrong shape: a broken model, not a broken daemon
                error = f"inference failed: {exc}"
        self._done(answer.entry, decision, error, answer.invoke_s, answer.embedding, answer.scores)

    def _worker_died(self, exc: WorkerError, inflight: deque[_InFlight]) -> None:
        """Every frame the dead worker held fails; a new worker takes over."""
        log.error("%s; restarting the inference worker", exc)
        lost = list(inflight)
        inflight.clear()
        for entry in lost:
            self._done(entry, None, str(exc), 0.0)
        self.serving.restart_worker(self.stopping)

    def _done(
        self,
        entry: _InFlight,
        decision: Decision | None,
        error: str | None,
        invoke_s: float,
        embedding: np.ndarray | None = None,
        scores: np.ndarray | None = None,
    ) -> None:
        frame = entry.frame
        if error is not None:
            self.inference_errors += 1
            # a broken model fails every frame: log a new error at once, a repeated one every 100th time
            if error != self._last_error or self.inference_errors % 100 == 0:
                log.warning(
                    "frame %s: %s (%d inference errors so far)", frame.origin, error, self.inference_errors
                )
            self._last_error = error
        now = time.monotonic()
        latency = now - frame.captured
        self.classified += 1
        self.last_inference_wall = time.time()
        self.last_progress = now
        if decision is not None:
            self.invokes.append(invoke_s)
        result = InferenceResult(
            decision is not None,
            error,
            latency,
            decision.decision if decision else None,
            entry.bundle.sha256,
            invoke_s,
            decision.label if decision else None,
        )
        for listener in list(self.listeners):
            try:
                listener(result)
            except Exception:  # noqa: BLE001
                log.exception("result listener failed")
        # Listeners (the updater's health window) judge the model: they saw its own decision above.
        if decision is not None:
            decision = self.noitem.judge(decision, embedding, frame, entry.bundle.sha256)
        if decision is not None and decision.reason != "no_item" and scores is not None:
            decision = self.enrollment.decide(decision, scores, embedding, entry.bundle)
        if self.trigger is not None and entry.item_id is not None:
            self.enrollment.saw(entry.item_id, frame.image, embedding, decision)  # enroll from_belt
            item = self.trigger.add(entry.item_id, decision)
            if item is not None:
                self._publish_item(item, frame)
        elif decision is not None:
            self._publish_frame(
                LabelInput(frame, decision, latency, invoke_s, entry.bundle, self.serving.backend)
            )

    def _publish_frame(self, facts: LabelInput) -> None:
        """Continuous mode: every decision is published, except no-item frames with publish = "none".
        In item mode a frame without an item (learn_empty between items) is never published."""
        no_item = facts.decision.reason == "no_item"
        if no_item and (self.trigger is not None or self.config.no_item.publish == "none"):
            self.noitem.withheld += 1  # counted, so that every classified frame is accounted for
            return
        self.publisher.publish(facts)

    # ---- no item ---------------------------------------------------------------------------------------
    def _reembed(self) -> None:
        """After a model switch (or a start with another model than the stored empty belt's): the empty
        belt's thumbnails through the new model, a few invokes, before any of its frames is compared."""
        bundle = self.serving.bundle
        if self.noitem.needs_embedding(bundle):
            self.noitem.reembed(bundle, lambda image: self._embed(bundle, image))
        # enrolled products: their photos through a new model, and enrollments waiting for the worker
        self.enrollment.serve(bundle, lambda image: self._embed(bundle, image))

    def _embed(self, bundle: Bundle, image: np.ndarray) -> np.ndarray:
        """One image's embedding from the serving worker (nothing is in flight when this runs)."""
        try:
            self.serving.worker.submit(preprocess(image, bundle.manifest.input))
            answer = self.serving.worker.result()
        except WorkerDied:
            self.serving.restart_worker(self.stopping)
            raise
        if answer.embedding is None:
            raise ValueError("the model gave no embedding")
        return answer.embedding

    def _publish_item(self, item: ItemResult, frame: Frame | None) -> None:
        self.publisher.publish_item(item, frame, self.serving.bundle, self.serving.backend)
        self.enrollment.item_done(item)
