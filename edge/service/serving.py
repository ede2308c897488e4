"""The model that serves: its bundle, the inference worker process running it, and its decoder.

A model switch loads and warms the new bundle in a second worker while the old one serves; the pipeline
swaps them between frames (`maybe_swap`). A worker that dies is replaced (`restart_worker`). On the CPU
because `auto` found no Edge TPU, `maybe_reprobe` looks for one now and then and switches to it.
Threshold overrides (the `set_thresholds` command) live here because a decoder is rebuilt on every swap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from ..kernel import backends
from ..kernel.bundle import Bundle
from ..kernel.decode import Decoder
from .config import Config
from .infer import InferenceWorker, WorkerError, WorkerInfo
from .osthread import start_thread

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    worker: InferenceWorker
    bundle: Bundle
    future: Future | None  # None for an Edge TPU re-probe


class Serving:
    def __init__(self, config: Config):
        self.config = config
        self.bundle: Bundle
        self.worker: InferenceWorker
        self.decoder: Decoder
        self.overrides: dict[str, float] = dict(config.model.thresholds)
        self._pending: _Pending | None = None
        self._swap_lock = threading.Lock()
        self.restarting = False
        self.worker_restarts = 0
        self.reprobes = 0
        self.probing = False
        self._probe_due = 0.0
        self.on_swap: list[Callable[[Bundle], None]] = []  # called on the pipeline's thread after a swap

    def start(self, bundle: Bundle) -> None:
        """The first worker (WorkerError when it cannot start)."""
        self.worker = self.new_worker(bundle)
        self.bundle = bundle
        self.decoder = self.make_decoder(bundle)
        self._probe_due = time.monotonic() + self.config.inference.reprobe_interval_s

    @property
    def info(self) -> WorkerInfo | None:
        return self.worker.info

    @property
    def backend(self) -> str:
        info = self.worker.info
        return info.backend if info else "unknown"

    @property
    def switch_waiting(self) -> bool:
        """A new worker is ready to take over: frames wait for the swap rather than go to the old one."""
        return self._pending is not None

    def new_worker(self, bundle: Bundle, backend: str | None = None) -> InferenceWorker:
        inf = self.config.inference
        worker = InferenceWorker(
            bundle,
            backend=backend or inf.backend,
            device=inf.edgetpu_device,
            num_threads=inf.interpreter_threads(),
            warmup_runs=inf.warmup_runs,
            invoke_timeout_s=inf.invoke_timeout_s,
        )
        worker.start()
        return worker

    def make_decoder(self, bundle: Bundle) -> Decoder:
        thresholds = {**bundle.manifest.thresholds, **self.overrides}
        open_set = bundle.manifest.open_set
        return Decoder(
            bundle.taxonomy,
            thresholds,
            self.config.model.top_k,
            kind=bundle.manifest.output.kind,
            open_set_threshold=open_set.threshold if open_set is not None else None,
        )

    def thresholds(self) -> dict[str, float]:
        return {f"depth_{i + 1}": t for i, t in enumerate(self.decoder.thresholds)}

    def set_thresholds(self, values: dict[str, float | None]) -> dict[str, float]:
        """Override per-depth thresholds until restart (None resets one to the bundle's); already checked."""
        for key, value in values.items():
            if value is None:
                self.overrides.pop(key, None)
            else:
                self.overrides[key] = float(value)
        self.decoder = self.make_decoder(self.bundle)
        return self.thresholds()

    # ---- switching -------------------------------------------------------------------------------------
    def switch_model(self, bundle: Bundle) -> Future:
        """Load and warm `bundle` in a new worker while the old one serves; swapped between items."""
        future: Future = Future()

        def prepare() -> None:
            try:
                worker = self.new_worker(bundle)
            except WorkerError as exc:
                future.set_exception(exc)
                return
            self._set_pending(_Pending(worker, bundle, future))

        start_thread(prepare, "switch-model")
        return future

    def _set_pending(self, pending: _Pending) -> None:
        with self._swap_lock:
            old, self._pending = self._pending, pending
        if old is not None:
            old.worker.stop()
            if old.future is not None and not old.future.done():
                old.future.set_exception(RuntimeError("superseded by a newer switch_model call"))

    def maybe_swap(self) -> bool:
        """Swap in a prepared worker, if any (the pipeline calls this between frames). True when swapped."""
        if self._pending is None:
            return False
        with self._swap_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return False
        old = self.worker
        self.worker, self.bundle = pending.worker, pending.bundle
        self.decoder = self.make_decoder(pending.bundle)
        start_thread(old.stop, "old-worker-stop")
        log.info(
            "now serving %s %s (%s) on %s",
            pending.bundle.name,
            pending.bundle.version,
            pending.bundle.sha256[:12],
            self.backend,
        )
        for callback in self.on_swap:
            callback(pending.bundle)
        if pending.future is not None:
            pending.future.set_result(pending.bundle)
        return True

    def restart_worker(self, stopping: threading.Event) -> None:
        """A new worker for the serving bundle after one died, retried with backoff until it starts."""
        backoff = 0.5
        self.worker.stop()
        self.restarting = True
        while True:
            try:
                self.worker = self.new_worker(self.bundle)
                self.worker_restarts += 1
                self.restarting = False
                log.warning("inference worker restarted on %s", self.backend)
                return
            except WorkerError as exc:
                log.error("inference worker restart failed: %s; retrying in %.1f s", exc, backoff)
                if stopping.wait(backoff):
                    raise RuntimeError("stopping while the inference worker could not be restarted") from exc
                backoff = min(backoff * 2, 30.0)

    def maybe_reprobe(self) -> None:
        """On the CPU because auto found no accelerator: try again now and then, in a separate worker, when
        one shows (plugged in since; edge/backends: `present`, which loads nothing)."""
        info = self.worker.info
        if (
            self.config.inference.backend != "auto"
            or info is None
            or info.backend != "cpu"
            or self.probing
            or not any(
                b.accelerator and self.bundle.has_artifact(b.artifact) for b in backends.registry().values()
            )
            or time.monotonic() < self._probe_due
        ):
            return  # a bundle without an Edge TPU model runs on the CPU whatever is plugged in
        self.reprobes += 1
        self._probe_due = time.monotonic() + self.config.inference.reprobe_interval_s
        if not backends.accelerator_present(
            self.config.inference.edgetpu_device, set(self.bundle.manifest.artifact_files())
        ):
            log.log(
                logging.INFO if self.reprobes == 1 else logging.DEBUG,
                "accelerator re-probe: none present (e.g. no /dev/apex_*, no Coral USB id); "
                "looking again every %.0f s",
                self.config.inference.reprobe_interval_s,
            )
            return
        self.probing = True
        bundle = self.bundle

        def probe() -> None:
            try:
                worker = self.new_worker(bundle, backend="auto")
                if worker.info is None or worker.info.backend == "cpu":
                    worker.stop()
                    raise WorkerError(worker.info.degraded_reason if worker.info else "no answer")
            except WorkerError as exc:
                log.info("accelerator re-probe: still unavailable (%s)", exc)
            else:
                log.warning("%s found on re-probe: switching from the CPU", worker.info.backend)
                self._set_pending(_Pending(worker, bundle, None))
            finally:
                self.probing = False

        start_thread(probe, "edgetpu-probe")

    def stop(self) -> None:
        self.worker.stop()
        with self._swap_lock:
            if self._pending is not None:
                self._pending.worker.stop()
