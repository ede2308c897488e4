"""The edge daemon, `taxonedge run --config FILE`: the composition root that builds the stages, starts their
threads and owns the lifecycle. Each stage is a small module with a narrow interface:

    source.Capture (capture thread) -> LatestFrame slot (newest wins)
    -> pipeline.Pipeline (inference thread): preprocess -> infer.InferenceWorker (child process)
       -> decode.Decoder -> [trigger.ItemTrigger vote] -> publish.LabelPublisher
    -> outbox.Outbox (sqlite WAL) -> mqtt.MqttLink (sender thread) -> broker; rows leave on PUBACK

Beside that flow: serving.Serving (the bundle, its worker and decoder; switches, restarts, Edge TPU
re-probes), control.Control (one thread for commands, triggers and plugin topics), health.Health (status,
model, stats, watchdog, metrics, periodic chores). No stage calls back into the daemon. Model updates
(edge/service/update.py) plug in through the seam below, typed as `update.UpdaterHost`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..kernel.bundle import Bundle, BundleError
from ..kernel.protocol import DeviceTopics, Status, json_bytes
from ..kernel.signing import SigningKeyError, load_public_key
from . import update
from .config import Config, ConfigError, one_line
from .control import Control, Handler
from .drift import DriftTracker
from .enrollment import Enrollment
from .health import Health
from .infer import WorkerError, WorkerInfo
from .mqtt import MqttLink, client_id_for
from .noitem import NoItem
from .notify import sd_notify
from .osthread import start_thread
from .outbox import Outbox
from .pipeline import InferenceResult, Pipeline
from .publish import LabelPublisher
from .serving import Serving
from .slots import read_verified, startup_bundle
from .source import Capture
from .trigger import ItemTrigger

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 5.0
SIGNAL_POLL_S = 0.1


class StartupError(Exception):
    """The daemon cannot start: a one-line reason and the exit status the CLI should give."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class Daemon:
    def __init__(self, config: Config, max_frames: int | None = None):
        self.config = config
        self.topic_base = config.topic_base
        self.topics = DeviceTopics(self.topic_base)
        self.boot_id = uuid.uuid4().hex[:12]
        self.max_frames = max_frames
        self.stopping = threading.Event()
        self.signalled: int | None = None  # set by the signal handler, acted on by the main loop
        self.threads: list[threading.Thread] = []
        self.serving = Serving(config)
        self._subscriptions: list[tuple[str, Handler]] = []
        self._listeners: list[Callable[[InferenceResult], None]] = []
        self._plugin: Any = None
        self.outbox: Outbox
        self.link: MqttLink
        self.capture: Capture
        self.publisher: LabelPublisher
        self.drift: DriftTracker
        self.noitem: NoItem
        self.pipeline: Pipeline
        self.control: Control
        self.health: Health

    # ---- the seam for control-plane plugins (edge/service/update.py: UpdaterHost) ----------------------
    @property
    def active_bundle(self) -> Bundle:
        return self.serving.bundle

    @property
    def worker_info(self) -> WorkerInfo | None:
        return self.serving.info

    def publish(
        self, topic: str, payload: Any, qos: int = 1, retain: bool = False, properties: Any = None
    ) -> None:
        """A control-plane message (status, answers, deployment progress); labels go through the outbox."""
        self.link.publish(topic, json_bytes(payload), qos=qos, retain=retain, properties=properties)

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """`handler(topic, payload, properties)` runs on the control thread; redone after every reconnect."""
        self._subscriptions.append((topic_filter, handler))
        if hasattr(self, "link"):
            self.link.subscribe(topic_filter)

    def add_result_listener(self, callback: Callable[[InferenceResult], None]) -> None:
        self._listeners.append(callback)

    def switch_model(self, bundle: Bundle) -> Future:
        """Load and warm `bundle` in a new worker while the old one serves; swapped between items."""
        return self.serving.switch_model(bundle)

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        problems: list[str] = []
        bundle = self._initial_bundle(problems)
        self.outbox = Outbox(cfg.outbox_path, cfg.outbox.max_messages)
        try:
            self.serving.start(bundle)
        except WorkerError as exc:
            hint = (
                ' (set inference.backend = "auto" to fall back to the CPU)'
                if cfg.inference.backend == "edgetpu"
                else ""
            )
            raise StartupError(f"{exc}{hint}", 3) from None
        info = self.serving.info
        log.info(
            "model %s %s (%s) on %s via %s, warm-up %.0f ms",
            bundle.name,
            bundle.version,
            bundle.sha256[:12],
            info.backend,
            info.runtime,
            info.warmup_s * 1000,
        )
        if info.degraded_reason:
            log.warning("%s", info.degraded_reason)
        self._build(bundle, problems)
        # What start-up loaded (modules, config, bundle, taxonomy) lives as long as the process: frozen out
        # of the garbage collector, a full collection while serving walks only what serving allocated
        # (measured here: 20 ms with the GIL held, every thread stalled, against 0.8 ms).
        gc.collect()
        gc.freeze()
        will: Status = {
            "state": "offline",
            "reason": "connection lost",
            "boot_id": self.boot_id,
            "device": cfg.device.id,
        }
        self.link = MqttLink(
            cfg.mqtt,
            client_id_for(cfg.mqtt, cfg.device.id),
            self.outbox,
            self.topics.status,
            json_bytes(will),
            self._on_connected,
            self.control.enqueue,
        )
        self.publisher.link = self.health.link = self.link
        # The plugin attaches before the link connects: its topics are then subscribed in on_connected's
        # one pass, ahead of `online` and the first label, so a device seen online takes deployments
        # (attached after the connection, a slow plugin start-up could lose a request sent meanwhile).
        self._attach_plugin()
        self.capture.start()
        self.link.start()
        for name, target in (
            ("inference", self.pipeline.run),
            ("control", self.control.run),
            ("health", self.health.run),
        ):
            self.threads.append(start_thread(target, name))
        self.health.start_metrics()
        # READY's status line names the connection when the broker answers at once; a broker that is down
        # holds up nothing (labels wait in the outbox).
        self.link.connected.wait(2.0)
        sd_notify("READY=1", f"STATUS={self.health.status_line()}")

    def _build(self, bundle: Bundle, problems: list[str]) -> None:
        """The stages, wired to each other (each gets only the collaborators it uses)."""
        cfg = self.config
        trigger = None
        if cfg.trigger.mode == "item":
            trigger = ItemTrigger(
                bundle.taxonomy,
                cfg.trigger.frames_per_item,
                cfg.trigger.vote_agreement,
                cfg.trigger.item_timeout_s,
                cfg.trigger.max_waiting,
            )
        self.capture = Capture(cfg.source, cfg.capture)
        self.drift = DriftTracker(cfg.drift)
        self.drift.serve(bundle, self.serving.thresholds())
        self.publisher = LabelPublisher(cfg, self.boot_id, self.outbox, self.drift)
        self.noitem = NoItem(cfg.no_item, cfg.device.state_dir)
        self.noitem.load()
        self.noitem.serve(bundle)
        self.enrollment = Enrollment(
            cfg.device.state_dir,
            cfg.enroll.min_similarity,
            cfg.enroll.margin,
            cfg.enroll.min_photos,
            cfg.enroll.rivals,
        )
        self.pipeline = Pipeline(
            cfg,
            self.capture,
            self.serving,
            self.publisher,
            trigger,
            self.noitem,
            self.enrollment,
            self.stopping,
            self.max_frames,
        )
        self.pipeline.listeners = self._listeners
        self.health = Health(
            cfg,
            self.boot_id,
            self.capture,
            self.serving,
            self.pipeline,
            self.publisher,
            self.outbox,
            self.publish,
            self.drift,
        )
        self.health.startup_problems = problems
        self.control = Control(
            cfg,
            self.boot_id,
            self.serving,
            self.pipeline,
            self.publish,
            self.health.state,
            lambda force: self.health.publish_status(force=force),
        )
        self.control.subscriptions = self._subscriptions
        self.health.control = self.control

        def swapped(new: Bundle) -> None:
            problems.clear()  # they were about the model that served until now
            if trigger is not None:
                trigger.taxonomy = new.taxonomy
            self.drift.serve(new, self.serving.thresholds())  # a new model: its own window and figures
            self.noitem.serve(new)  # the pipeline re-embeds the empty belt before the next frame
            self.health.publish_model()

        self.serving.on_swap.append(swapped)

    def request_stop(self, *_: Any) -> None:
        self.stopping.set()
        if hasattr(self, "pipeline"):
            self.pipeline.item_event.set()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Only note it. A handler runs in the main thread between two bytecodes, possibly while that thread
        # holds an Event's internal lock (inside Event.wait): setting an Event from here can deadlock it.
        self.signalled = signum

    def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT (or the source ends, or --max-frames), then shut down cleanly."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()  # a SIGTERM during start-up is honoured right after it
            try:
                while self.signalled is None and not self.stopping.is_set():
                    time.sleep(SIGNAL_POLL_S)  # a signal interrupts it; is_set takes no lock
            finally:
                self.shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 1 if self.pipeline.failed else 0

    def shutdown(self) -> None:
        """Finish the item in flight, flush the outbox, publish offline, stop everything."""
        self.request_stop()
        sd_notify("STOPPING=1")
        if self.threads:
            cfg = self.config
            self.threads[0].join(timeout=cfg.trigger.item_timeout_s + cfg.inference.invoke_timeout_s + 2)
        self.capture.stop()
        self._flush_outbox()
        self._detach_plugin()
        if self.link.connected.is_set():
            self.health.publish_stats(final=True)
            offline: Status = {
                "state": "offline",
                "reason": "failed" if self.pipeline.failed else "stopped",
                "boot_id": self.boot_id,
                "device": self.config.device.id,
            }
            info = self.link.client.publish(self.topics.status, json_bytes(offline), qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2.0)
        self.control.done.set()
        if len(self.threads) > 1:
            self.threads[1].join(timeout=2)  # the control thread may still be storing a label
        gc.unfreeze()  # for a daemon run inside another program (the tests): its heap is collectable again
        self.link.stop()
        self.serving.stop()
        self.outbox.close()
        self.enrollment.close()
        log.info("stopped: %d frames classified, %d labels", self.pipeline.classified, self.publisher.labels)

    def _flush_outbox(self) -> None:
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while self.outbox.depth() and self.link.connected.is_set() and time.monotonic() < deadline:
            self.link.notify_outbox()
            time.sleep(0.02)
        if self.outbox.depth():
            log.warning(
                "%d labels stay in the outbox %s; they are sent on the next start",
                self.outbox.depth(),
                self.outbox.path,
            )

    # ---- helpers --------------------------------------------------------------------------------------
    def _initial_bundle(self, problems: list[str]) -> Bundle:
        key_problem = public_key_problem(self.config)
        if key_problem:
            raise StartupError(key_problem, 2)
        path = startup_bundle(self.config, problems) or self.config.model.bundle
        for problem in problems:
            log.error("%s", problem)
        if path is None:
            raise StartupError("no model: set model.bundle in the config (or deploy one)", 2)
        try:
            return read_verified(Path(path), self.config.model)
        except (BundleError, ValueError) as exc:
            raise StartupError(f"model.bundle: {exc}", 2) from None

    def _on_connected(self) -> None:
        for topic_filter in self.control.topic_filters():
            self.link.client.subscribe(topic_filter, qos=1)
        self.health.connected()

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


def public_key_problem(config: Config) -> str | None:
    """model.public_key's own problem, named as such (not as a problem of model.bundle)."""
    key = config.model.public_key
    if key is None:
        return None
    if not Path(key).is_file():
        return (
            f"model.public_key: {key} does not exist (the fleet's public key, made with "
            "`taxonedge keygen`; the demo's is examples/models/grocery/taxonedge-demo.pub)"
        )
    try:
        load_public_key(key)
    except SigningKeyError as exc:
        return f"model.public_key: {exc}"
    return None


def validate(config: Config) -> list[str]:
    """Problems with the files and secrets a config names (the schema itself is checked by load_config), one
    line each: a path may hold control characters."""
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
    return [one_line(problem) for problem in problems]
