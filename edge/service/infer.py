"""Inference in a supervised child process, so that a native abort or a hung invoke costs a restart of
the worker, never the daemon.

libedgetpu aborts its process on USB transfer errors, and a wedged accelerator can block `invoke()`
forever: both would take the whole daemon (and its outbox, MQTT session and status) with them if the
interpreter lived in the daemon. The worker is a `spawn`ed process holding one `Classifier`; the
daemon writes each preprocessed image into a buffer shared with the worker, sends the buffer's slot number
over a pipe and waits at most `invoke_timeout_s` for each answer. (Pickling a 150-250 KB image through a
64 KB pipe took three wake-ups of each side per frame: 0.3-0.6 ms of latency and CPU on a small board.)

Backends (edge/kernel/backends/): a named one must open, else the worker fails to start; `auto` tries the
accelerators, then falls back to the CPU and says so (`degraded` with the reason). Warm-up runs happen in
the worker before it reports ready, so the first real frame is not the slow one.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:  # the spawned worker imports this module: no pydantic, OpenCV or cryptography there
    from ..kernel.bundle import Bundle
    from ..kernel.runtime import InterpreterModel

log = logging.getLogger(__name__)

# Test-only fault injection (read in the worker): abort or hang on the Nth invoke, as a failing USB
# accelerator would. Never set in production; documented so nobody wonders what they are.
ABORT_AT_ENV = "TAXONEDGE_TEST_WORKER_ABORT_AT"
HANG_AT_ENV = "TAXONEDGE_TEST_WORKER_HANG_AT"


class Answer(NamedTuple):
    """The worker's answer for one image."""

    scores: np.ndarray  # the leaf output, dequantized (raw tensor for a raw request)
    invoke_s: float
    embedding: np.ndarray | None  # the embedding output (v3 bundles), else None


class WorkerError(RuntimeError):
    """The worker could not start, died, hung, or failed one inference. `cause` names the exception the
    worker caught (e.g. "BackendUnavailable", "ModelError") and `detail` its text, when there was one."""

    def __init__(self, message: str, cause: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.cause, self.detail = cause, detail


class WorkerDied(WorkerError):
    """The worker process is gone or hung and must be replaced."""


@dataclass(frozen=True)
class WorkerInfo:
    backend: str  # "edgetpu" or "cpu"
    runtime: str  # "ai_edge_litert" or "tflite_runtime"
    degraded_reason: str | None  # why auto did not get the Edge TPU
    warmup_s: float


def _slot_bytes(model: InterpreterModel) -> int:
    """Bytes of one input image (HxWx3 in the model's input dtype): one slot of the shared buffer."""
    return model.height * model.width * 3 * np.dtype(model.dtype).itemsize


def _slot_views(buffer: Any, model: InterpreterModel, slots: int) -> list[np.ndarray]:
    """The shared buffer as `slots` input images, daemon and worker alike."""
    shape, size = (model.height, model.width, 3), _slot_bytes(model)
    return [
        np.frombuffer(
            buffer, dtype=model.dtype, count=size // np.dtype(model.dtype).itemsize, offset=i * size
        ).reshape(shape)
        for i in range(slots)
    ]


def _worker_main(
    conn: Any,
    model: InterpreterModel,
    backend: str,
    device: str | None,
    num_threads: int | None,
    warmup_runs: int,
    buffer: Any | None,
    slots: int,
) -> None:
    """The child: load, warm up, answer ('ready', info), then for each message (a slot number of the shared
    buffer, or an image sent whole) answer ('ok', probabilities, invoke s) or ('error', text, s) until EOF.
    A ('raw', image) message is answered with the raw output tensor instead (the update's self-test)."""
    from ..kernel.backends import BackendUnavailable, open_classifier
    from ..kernel.runtime import ModelError, interpreter_module, quiet_failed_delegate
    from .osthread import name_this_thread

    name_this_thread("infer-worker")
    sys.unraisablehook = quiet_failed_delegate
    abort_at = int(os.environ.get(ABORT_AT_ENV, "0") or 0)
    hang_at = int(os.environ.get(HANG_AT_ENV, "0") or 0)
    try:
        _, runtime = interpreter_module()
        classifier, used, degraded = open_classifier(model, backend, num_threads, device)
        golden = model.golden_inputs
        start = time.perf_counter()
        for i in range(warmup_runs):
            if golden is not None:
                image = golden[i % len(golden)].astype(classifier._input["dtype"])
            else:
                image = np.zeros((model.height, model.width, 3), dtype=classifier._input["dtype"])
            classifier.outputs(image)
        conn.send(("ready", WorkerInfo(used, runtime, degraded, time.perf_counter() - start)))
    except (BackendUnavailable, ModelError, ImportError, OSError, ValueError, RuntimeError) as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    images = _slot_views(buffer, model, slots) if buffer is not None else []
    count = 0
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        if isinstance(message, tuple):  # ("raw", image): the output tensor as the model gives it
            try:
                conn.send(("ok", classifier.raw(message[1]), 0.0, classifier.raw_embedding()))
            except (ModelError, ValueError, RuntimeError) as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}", 0.0))
            continue
        image = images[message] if isinstance(message, int) else message
        count += 1
        if abort_at and count >= abort_at:
            os.abort()
        if hang_at and count >= hang_at:
            time.sleep(3600)
        t0 = time.perf_counter()
        try:
            scores, embedding = classifier.outputs(image)
            conn.send(("ok", scores, time.perf_counter() - t0, embedding))
        except (ValueError, RuntimeError) as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}", time.perf_counter() - t0))


class InferenceWorker:
    """One child process serving one bundle. `start()` blocks until it is warm (or raises WorkerError).

    Up to `slots` images may be submitted before their answers are collected: each has its own slot of
    the shared buffer, reused only after its answer came back.
    """

    def __init__(
        self,
        bundle: Bundle,
        backend: str = "auto",
        device: str | None = None,
        num_threads: int | None = None,
        warmup_runs: int = 3,
        invoke_timeout_s: float = 5.0,
        start_timeout_s: float = 120.0,
        slots: int = 2,
    ):
        self.bundle = bundle
        self.backend = backend
        self.device = device
        self.num_threads = num_threads
        self.warmup_runs = warmup_runs
        self.invoke_timeout_s = invoke_timeout_s
        self.start_timeout_s = start_timeout_s
        self.info: WorkerInfo | None = None
        self._process: Any = None
        self._conn: Any = None
        self._in_flight = 0
        self.slots = slots
        self._images: list[np.ndarray] = []
        self._next_slot = 0

    def start(self) -> WorkerInfo:
        from ..kernel.runtime import InterpreterModel

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        model = InterpreterModel.of(self.bundle)
        # Shared memory the spawned child inherits (no name to leak or clean up): freed with both processes.
        try:
            buffer = ctx.RawArray("B", _slot_bytes(model) * self.slots)
            self._images = _slot_views(buffer, model, self.slots)
        except OSError as exc:  # no usable /dev/shm (some containers): slower, but it works
            log.warning("no shared memory for the inference worker (%s): images go through the pipe", exc)
            buffer, self._images = None, []
        self._next_slot = 0
        self._process = ctx.Process(
            target=_worker_main,
            name="taxonedge-infer",
            daemon=True,
            args=(
                child,
                model,
                self.backend,
                self.device,
                self.num_threads,
                self.warmup_runs,
                buffer,
                self.slots,
            ),
        )
        self._process.start()
        child.close()
        self._conn = parent
        if not parent.poll(self.start_timeout_s):
            self.stop()
            raise WorkerError(f"inference worker did not become ready within {self.start_timeout_s:.0f} s")
        try:
            message = parent.recv()
        except (EOFError, OSError):
            code = self._process.exitcode
            self.stop()
            raise WorkerError(f"inference worker died while loading the model (exit code {code})") from None
        if message[0] != "ready":
            self.stop()
            cause, _, detail = message[1].partition(": ")
            raise WorkerError(
                f"inference worker could not load {self.bundle.name} {self.bundle.version}: {message[1]}",
                cause,
                detail,
            )
        self.info = message[1]
        return self.info

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def submit(self, image: np.ndarray) -> None:
        """Send one preprocessed image; answers come back in order from `result()`."""
        if self._in_flight >= self.slots:
            raise RuntimeError(f"{self._in_flight} images already at the worker: collect a result first")
        slot = self._images[self._next_slot] if self._images else None
        if slot is not None and image.shape == slot.shape and image.dtype == slot.dtype:
            slot[...] = image
            message: Any = self._next_slot
            self._next_slot = (self._next_slot + 1) % self.slots
        else:
            message = image  # not the model's input shape: sent whole, so the worker reports what is wrong
        try:
            self._conn.send(message)
        except (OSError, ValueError, BrokenPipeError, AttributeError) as exc:
            raise WorkerDied(f"inference worker is gone ({exc})") from None
        self._in_flight += 1

    def ready(self, timeout: float = 0.0) -> bool:
        """True when an answer is waiting (or the worker died): `result()` will not block."""
        try:
            return bool(self._conn.poll(timeout))
        except (OSError, EOFError):
            return True

    def result(self) -> Answer:
        """The answer for the oldest submitted image: leaf scores, invoke seconds, embedding.

        Raises WorkerDied when the worker exited or did not answer within invoke_timeout_s (then it is
        killed), WorkerError when it answered with an error for this image.
        """
        try:
            if not self._conn.poll(self.invoke_timeout_s):
                self.stop()
                raise WorkerDied(
                    f"inference did not answer within {self.invoke_timeout_s:.1f} s (hung): worker killed"
                )
            message = self._conn.recv()
        except (EOFError, OSError):
            code = self._process.exitcode if self._process is not None else None
            if self._process is not None:
                self._process.join(1)
                code = self._process.exitcode
            self.stop()
            raise WorkerDied(f"inference worker died (exit code {code})") from None
        self._in_flight -= 1
        if message[0] == "ok":
            return Answer(message[1], message[2], message[3] if len(message) > 3 else None)
        raise WorkerError(message[1])

    def raw(self, image: np.ndarray) -> Answer:
        """The raw output tensors for one input image, nothing else in flight (the update's self-test)."""
        if self._in_flight:
            raise RuntimeError("raw() while images are in flight")
        try:
            self._conn.send(("raw", image))
        except (OSError, ValueError, AttributeError) as exc:
            raise WorkerDied(f"inference worker is gone ({exc})") from None
        self._in_flight += 1
        return self.result()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def stop(self) -> None:
        """End the worker: a polite EOF first, then terminate, then kill."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        self._in_flight = 0
        self._images = []
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
            conn.close()
        if process is not None:
            process.join(1)
            if process.is_alive():
                process.terminate()
                process.join(2)
            if process.is_alive():
                process.kill()
                process.join(2)
