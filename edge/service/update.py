"""Model updates on the device: receive, verify, stage, warm up, self-test, switch, health window, commit.

A deployment is one request on `<base>/model/deploy` (or a fleet group's `<prefix>/groups/<g>/deploy`):

    {"id": "...", "size": N, "sha256": "...", "chunk_size": C, "chunks": K, "nonce": "...", "issued": "..."}
    then K chunks, QoS 1, on <deploy topic>/<id>/chunk/<i> (raw bytes)
    -- or --  {"id", "size", "sha256", "url": "file://|https://", "nonce", "issued"}

Its progress goes to `<base>/model/deploy/<id>` (retained) and to the MQTT v5 response topic, as states
received -> verifying -> staged -> warming -> self_test -> switched -> committed, or rejected / rolled_back
with a reason; while chunks arrive, "receiving" messages carry the count and, after a stall, the missing
chunk numbers for the operator to send again (that is how a transfer resumes after a reconnect). A request
that cannot be read is answered on `<base>/model/deploy/rejected` (retained). docs/deploy.md has it all.

`taxonedge deploy` publishes requests and chunks retained, so a device that is off gets them when it
connects. The nonce (one per `taxonedge deploy` run) tells such a replay from a new request: a replay of a
request this device already handled is skipped; a new request with a known id is answered with its
recorded outcome (`repeat`), except that one recorded `committed` whose bundle no longer serves runs again
(an operator going back to an earlier release gets it). After its outcome the device clears its own
retained request and chunks. A deployment that was accepted is recorded in `<state_dir>/models/
deploying.json` until its outcome, so one a restart cut short is reported (`rejected`, "interrupted: ...").

The old model keeps serving until the daemon swaps in the new one between items; the checks and the
self-test (in a worker process of its own) are in edge/service/vetting.py, the intake of chunks in
edge/service/transfer.py. Bundles dropped into `model.watch_dir` go through the same steps (DropFolder).
Plugged into the daemon with `attach(daemon)` / `detach(daemon)` through the typed seam `UpdaterHost`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..kernel.bundle import Bundle, utc_now
from ..kernel.files import atomic_write
from ..kernel.protocol import (
    DEPLOY_REJECTED,
    FINAL_STATES,
    DeployState,
    DeviceTopics,
    deploy_chunks,
    group_deploy,
    replies_prefix,
    response_topic_problem,
)
from . import vetting
from .config import Config, UpdateConfig
from .osthread import start_thread
from .pipeline import InferenceResult
from .slots import Slots, read_verified
from .transfer import Transfer
from .vetting import Failed

log = logging.getLogger(__name__)

# The states a deployment is recorded at in deploying.json; "receiving" is progress, never a step recorded.
STATES = tuple(state for state in get_args(DeployState) if state != "receiving")
FINAL = FINAL_STATES
# Test hook: pause after reporting this state (env "STATE" or "STATE:SECONDS") so a test can SIGKILL there.
PAUSE_ENV = "TAXONEDGE_UPDATE_PAUSE_AT"
HISTORY_LIMIT = 200
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")


class DeployRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=ID_PATTERN.pattern)
    size: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    chunk_size: int | None = Field(None, ge=1)
    chunks: int | None = Field(None, ge=1)
    url: str | None = None
    # One per `taxonedge deploy` run: a retained request replayed at (re)connect carries the nonce of the run
    # that published it, so the device tells a replay it already handled from a new request.
    nonce: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    issued: str | None = Field(None, max_length=40)  # when the operator sent it (UTC, for `deploy --pending`)

    @model_validator(mode="after")
    def _one_transport(self) -> DeployRequest:
        if self.id == DEPLOY_REJECTED:
            raise ValueError(
                f"id '{DEPLOY_REJECTED}' is reserved (the topic of unreadable requests' answers)"
            )
        if self.url is not None:
            if not self.url.startswith(("file://", "https://")):
                raise ValueError("url must start with file:// or https://")
            return self
        if self.chunk_size is None or self.chunks is None:
            raise ValueError("give either url, or chunk_size and chunks")
        if self.chunks != math.ceil(self.size / self.chunk_size):
            raise ValueError(
                f"chunks={self.chunks} does not match size {self.size} / chunk_size {self.chunk_size}"
            )
        return self


@dataclass
class Deployment:
    request: DeployRequest
    topic: str  # the deploy topic it came on; chunks come on <topic>/<id>/chunk/<i>
    response_topic: str | None = None
    correlation: bytes | None = None
    source_file: Path | None = None  # a bundle dropped into the watch directory
    transfer: Transfer | None = None  # a bundle sent in chunks, while they arrive
    state: str = "receiving"

    @property
    def id(self) -> str:
        return self.request.id


class History:
    """Outcomes of finished deployments (id -> state, reason, sha256), kept across restarts."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.items: dict[str, dict] = json.loads(path.read_bytes())
        except (OSError, ValueError):
            self.items = {}

    def get(self, deployment_id: str) -> dict | None:
        return self.items.get(deployment_id)

    def record(self, deployment_id: str, outcome: dict) -> None:
        self.items[deployment_id] = outcome
        while len(self.items) > HISTORY_LIMIT:
            self.items.pop(next(iter(self.items)))
        atomic_write(self.path, json.dumps(self.items, indent=1).encode())


class InProgress:
    """The accepted deployment that has no outcome yet, on disk: a restart finds the one it cut short."""

    def __init__(self, path: Path):
        self.path = path

    def save(self, dep: Deployment, state: str) -> None:
        record = {
            "id": dep.id,
            "state": state,
            "time": utc_now(),
            "sha256": dep.request.sha256,
            "nonce": dep.request.nonce,
            "topic": dep.topic,
            "response_topic": dep.response_topic,
            "correlation": dep.correlation.hex() if dep.correlation is not None else None,
        }
        atomic_write(self.path, json.dumps(record).encode())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def take(self) -> dict | None:
        try:
            record = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # only disk damage gets here (writes are atomic)
            log.error("%s is unreadable (%s): an interrupted deployment may go unreported", self.path, exc)
            record = None
        self.clear()
        return record if isinstance(record, dict) and isinstance(record.get("id"), str) else None


class UpdaterHost(Protocol):
    """What the updater may use of the daemon (edge/service/daemon.py implements it; tests/update_host.py
    too)."""

    config: Config
    topic_base: str

    @property
    def active_bundle(self) -> Bundle: ...

    def publish(
        self, topic: str, payload: Any, qos: int = 1, retain: bool = False, properties: Any = None
    ) -> None: ...

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes, Any], None]) -> None: ...

    def add_result_listener(self, callback: Callable[[InferenceResult], None]) -> None: ...

    def switch_model(self, bundle: Bundle) -> Future: ...


class HealthWindow:
    """Collects the first `size` inference results of the new model and judges them against the old one's."""

    def __init__(self, sha256: str, size: int):
        self.sha256, self.size = sha256, size
        self.results: list[InferenceResult] = []
        self.done = threading.Event()

    def add(self, result: InferenceResult) -> None:
        if len(self.results) < self.size:
            self.results.append(result)
            if len(self.results) >= self.size:
                self.done.set()

    def verdict(self, baseline: list[InferenceResult], cfg: UpdateConfig) -> str | None:
        """None when healthy, else the reason."""
        results = self.results
        if len(results) < self.size:
            return (
                f"health window incomplete: {len(results)} of {self.size} inferences in "
                f"{cfg.health_timeout_s:g} s"
            )
        failed = [r for r in results if not r.ok]
        if failed:
            return f"health window: {len(failed)} of {len(results)} inferences failed ({failed[0].error})"
        # Medians: a slower model moves the median; one scheduling hiccup on a busy board does not.
        median = float(np.median([r.latency_s for r in results]))
        budget = cfg.latency_budget_s
        if budget is None and len(baseline) >= 5:
            old_median = float(np.median([r.latency_s for r in baseline]))
            budget = cfg.latency_factor * old_median + cfg.latency_slack_s
        if budget is not None and median > budget:
            return (
                f"health window: median latency {median * 1000:.1f} ms is over the budget of "
                f"{budget * 1000:.1f} ms"
            )
        if len(baseline) >= 5:
            old = _unknown_rate(baseline)
            new = _unknown_rate(results)
            if new - old > cfg.max_unknown_rate_increase:
                return (
                    f"health window: unknown rate rose from {old:.0%} to {new:.0%} "
                    f"(allowed rise {cfg.max_unknown_rate_increase:.0%})"
                )
        return None


def _unknown_rate(results: list[InferenceResult]) -> float:
    decided = [r for r in results if r.ok]
    return sum(r.decision == "unknown" for r in decided) / max(len(decided), 1)


class Updater:
    """The deployment state machine for one daemon. One deployment runs at a time, on its own thread.
    (Over 300 lines: request intake, the worker and the outcome reports share one lock and one current
    deployment; the checks live in vetting.py, chunk intake in transfer.py, local drops in DropFolder.)"""

    def __init__(self, daemon: UpdaterHost):
        self.daemon = daemon
        self.config = daemon.config
        self.cfg = self.config.model.update
        self.base = daemon.topic_base
        self.slots = Slots(self.config.device.state_dir)
        self.slots.dir.mkdir(parents=True, exist_ok=True)
        self.incoming = self.slots.dir / "incoming"
        self.history = History(self.slots.dir / "deployments.json")
        self.in_progress = InProgress(self.slots.dir / "deploying.json")
        prefix = self.config.mqtt.prefix
        self.topics = DeviceTopics(self.base)
        self.deploy_topics = [self.topics.deploy] + [group_deploy(prefix, g) for g in self.config.mqtt.groups]
        self.current: Deployment | None = None
        self._lock = threading.RLock()  # _report (which may release `current`) runs under it from submit
        self._jobs: queue.Queue[Deployment | None] = queue.Queue()
        self.stopping = threading.Event()
        self._baseline: deque = deque(maxlen=100)
        self._window: HealthWindow | None = None
        self._threads: list[threading.Thread] = []
        # deploy topic -> id of the last readable request seen on it: the device clears its own retained
        # request only while no newer one has come
        self._latest: dict[str, str] = {}

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        Transfer.clear(self.incoming)  # partial transfers of a previous process
        self.daemon.add_result_listener(self._on_result)
        # Before subscribing: a retained request replayed at connect then finds its outcome in the history.
        self._report_interrupted()
        _maybe_pause("attaching")  # (tests: a slow start-up must not lose a request)
        for topic in self.deploy_topics:
            self.daemon.subscribe(topic, self._on_request)
            self.daemon.subscribe(deploy_chunks(topic), self._on_chunk)
        self.spawn(self._worker, "update-worker")
        if self.config.model.watch_dir is not None:
            self.spawn(DropFolder(self).run, "update-watch")

    def _report_interrupted(self) -> None:
        """Report the deployment the last process did not finish: a trial start-up rolled back, or one the
        process died in before its switch (or between commit and its report)."""
        trial = self.slots.take_interrupted()
        record = self.in_progress.take() or {}
        if trial and trial.get("id"):
            same = record.get("id") == trial["id"]
            self._finish_interrupted(record if same else {"id": trial["id"]}, "rolled_back", trial["reason"])
            if same:
                return
        if not record:
            return
        active = self.daemon.active_bundle
        if active is not None and active.sha256 == record.get("sha256"):
            self._finish_interrupted(
                record,
                "committed",
                None,
                model=active.describe(),
                detail="the daemon restarted after the switch; this model serves",
            )
        else:
            self._finish_interrupted(
                record,
                "rejected",
                (
                    f"interrupted: the daemon stopped while the deployment was at '{record.get('state')}'; "
                    "the old model serves: deploy again"
                ),
            )

    def _finish_interrupted(self, record: dict, state: str, reason: str | None, **details: Any) -> None:
        now = utc_now()
        nonce = record.get("nonce")
        self.history.record(
            record["id"],
            {"state": state, "reason": reason, "time": now, "sha256": record.get("sha256"), "nonce": nonce},
        )
        payload = {"id": record["id"], "device": self.base, "state": state, "time": now, **details}
        if reason:
            payload["reason"] = reason
        if nonce:
            payload["nonce"] = nonce
        log.warning("deployment %s: %s%s", record["id"], state, f" ({reason})" if reason else "")
        self._send(self.topics.deploy_progress(record["id"]), payload, None, retain=True)
        response_topic = self._reply_topic(record.get("response_topic"))
        if response_topic:
            correlation = record.get("correlation")
            self._send(response_topic, payload, bytes.fromhex(correlation) if correlation else None)

    def stop(self) -> None:
        self.stopping.set()
        self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=5)

    def spawn(self, target: Any, name: str) -> None:
        self._threads.append(start_thread(target, name))

    # ---- MQTT handlers (control thread: quick, never block) -------------------------------------------
    def _on_request(self, topic: str, payload: bytes, properties: Any) -> None:
        if not payload.strip():  # a retained request being cleared (by a device or `deploy --cancel`)
            return
        response_topic = self._reply_topic(getattr(properties, "ResponseTopic", None))
        correlation = getattr(properties, "CorrelationData", None) if properties is not None else None
        try:
            request = DeployRequest.model_validate(json.loads(payload.decode("utf-8")))
        except (ValueError, RecursionError) as exc:  # ValidationError and UnicodeDecodeError are ValueErrors
            self._reject_unreadable(topic, payload, _why(exc), response_topic, correlation)
            return
        self._latest[topic] = request.id
        self.submit(Deployment(request, topic, response_topic, correlation))

    def _reject_unreadable(
        self, topic: str, payload: bytes, why: str, response_topic: str | None, correlation: bytes | None
    ) -> None:
        """Answer a request that cannot be run: on `<base>/model/deploy/rejected` (retained, for whoever
        sent it without a response topic) and on its response topic."""
        reason = _clean(f"malformed deploy request on {topic}: {why}")
        log.warning("%s", reason)
        answer = {
            "id": _id_of(payload),
            "device": self.base,
            "state": "rejected",
            "time": utc_now(),
            "reason": reason,
        }
        self._send(self.topics.deploy_progress(DEPLOY_REJECTED), answer, None, retain=True)
        if response_topic:
            self._send(response_topic, answer, correlation)

    def _reply_topic(self, topic: Any) -> str | None:
        """The request's response topic, or None when answers must not go there (protocol.py's rule, the
        same as for commands); progress still goes to the deployment's own topic."""
        if not topic or not isinstance(topic, str):
            return None
        problem = response_topic_problem(topic, self.base, self.config.mqtt.prefix)
        if problem:
            log.warning(
                "deploy request's response topic %r refused: %s (use %s...)",
                topic,
                problem,
                replies_prefix(self.config.mqtt.prefix),
            )
            return None
        return topic

    def submit(self, dep: Deployment) -> bool:
        """Queue a deployment unless it is a repeat or another one is running. True when queued."""
        done = self.history.get(dep.id)
        with self._lock:
            if done is not None and dep.request.nonce is not None and done.get("nonce") == dep.request.nonce:
                # the retained request this device handled, replayed at (re)connect: nothing to do or say
                log.info("deployment %s: retained request already handled (%s)", dep.id, done["state"])
                self._clear_request(dep)
                return False
            serving = self.daemon.active_bundle
            rerun = (
                done is not None
                and done["state"] == "committed"
                and (serving is None or done.get("sha256") != serving.sha256)
            )
            if rerun:  # committed once, but another model serves now: the operator wants this one back
                log.info("deployment %s committed before but does not serve now: running it again", dep.id)
            elif done is not None:
                log.info(
                    "deployment %s was already done (%s): answering with its outcome", dep.id, done["state"]
                )
                details = {"model": serving.describe()} if done["state"] == "committed" and serving else {}
                self._report(dep, done["state"], reason=done.get("reason"), repeat=True, **details)
                return False
            if self.current is not None:
                if self.current.id == dep.id:  # a resent request of the running deployment
                    self._report(self.current, self.current.state, repeat=True)
                else:
                    self._report(
                        dep,
                        "rejected",
                        reason=f"busy: deployment {self.current.id} is in progress",
                        record=False,
                    )
                return False
            if dep.request.size > self.config.model.max_bundle_bytes:
                self._report(
                    dep,
                    "rejected",
                    reason=(
                        f"size: {dep.request.size} bytes is over model.max_bundle_bytes "
                        f"({self.config.model.max_bundle_bytes})"
                    ),
                )
                return False
            if dep.request.chunks is not None:
                dep.transfer = Transfer(self.incoming, dep.topic, dep.request)
            self.current = dep
            if dep.source_file is None:  # a dropped file is simply taken again after a restart
                self.in_progress.save(dep, "receiving")
        self._jobs.put(dep)
        return True

    def _on_chunk(self, topic: str, payload: bytes, properties: Any) -> None:
        dep = self.current
        progress = dep.transfer.take(topic, payload) if dep is not None and dep.transfer is not None else None
        if progress is not None:
            self._report(dep, "receiving", record=False, **progress)

    def _on_result(self, result: InferenceResult) -> None:
        window = self._window
        if window is not None and result.model_sha256 == window.sha256:
            window.add(result)
        else:
            self._baseline.append(result)

    # ---- the state machine ---------------------------------------------------------------------------
    def _worker(self) -> None:
        while not self.stopping.is_set():
            dep = self._jobs.get()
            if dep is None:
                return
            try:
                self._run(dep)
            except Failed as exc:
                log.warning("deployment %s %s: %s", dep.id, exc.state, exc.reason)
                self._report(dep, exc.state, reason=exc.reason)
            except Exception as exc:  # a bug must not leave the device half-switched or the worker dead
                log.exception("deployment %s failed", dep.id)
                self._report(dep, "rejected", reason=f"internal error: {type(exc).__name__}: {exc}")
            finally:
                if dep.transfer is not None:
                    dep.transfer.close()
                self._window = None
                with self._lock:
                    if self.current is dep:  # a finished one's outcome already let the next one in
                        self.current = None

    def _run(self, dep: Deployment) -> None:
        data = self._receive(dep)
        self._report(dep, "received", size=len(data))
        self._report(dep, "verifying")
        bundle = vetting.verify(
            data, dep.request.size, dep.request.sha256, self.config, self.daemon.active_bundle
        )
        active = self.daemon.active_bundle
        if active is not None and bundle.sha256 == active.sha256:
            self._report(dep, "committed", model=bundle.describe(), detail="this model is already serving")
            return
        slot, path = self.slots.stage(data)
        bundle = read_verified(path, self.config.model)  # from the slot, as the daemon will read it
        self._report(dep, "staged", slot=slot)
        vetting.self_test(bundle, self.config, lambda state, **details: self._report(dep, state, **details))
        previous = self.daemon.active_bundle
        self.slots.begin_trial(slot, dep.id)
        self._window = HealthWindow(bundle.sha256, self.cfg.health_window)
        baseline = list(self._baseline)
        try:
            self.daemon.switch_model(bundle).result(timeout=self.cfg.switch_timeout_s)
        except Exception as exc:
            self.slots.rollback()
            raise Failed("rejected", f"the daemon could not switch to the new model: {exc}") from exc
        self._report(dep, "switched", slot=slot, model=bundle.describe())
        reason = self._health(baseline)
        if reason is None:
            self.slots.commit()
            self._report(dep, "committed", slot=slot, model=bundle.describe())
            return
        self._window = None
        try:
            self.daemon.switch_model(previous).result(timeout=self.cfg.switch_timeout_s)
        except Exception as exc:  # the slot state still names the old model: a restart runs it
            log.error("switching back to %s failed: %s", previous.describe() if previous else None, exc)
            reason += f"; switching back failed ({exc}), the old model serves after a restart"
        self.slots.rollback()
        raise Failed("rolled_back", reason)

    def _receive(self, dep: Deployment) -> bytes:
        if dep.source_file is not None:
            return dep.source_file.read_bytes()
        if dep.request.url is not None:
            return vetting.fetch(dep.request.url, self.config.model.max_bundle_bytes, self.cfg)
        ask = functools.partial(self._report, dep, "receiving", record=False)  # for the missing chunks
        return dep.transfer.wait(self.stopping, self.cfg, ask)

    def _health(self, baseline: list[InferenceResult]) -> str | None:
        window = self._window
        if window is None or window.size == 0:
            return None
        window.done.wait(self.cfg.health_timeout_s)
        return window.verdict(baseline, self.cfg)

    # ---- reporting -----------------------------------------------------------------------------------
    def _report(
        self,
        dep: Deployment,
        state: str,
        reason: str | None = None,
        record: bool = True,
        repeat: bool = False,
        **details: Any,
    ) -> None:
        dep.state = state
        payload = {"id": dep.id, "device": self.base, "state": state, "time": utc_now(), **details}
        if reason:
            payload["reason"] = reason
        if repeat:
            payload["repeat"] = True
        if dep.request.nonce:  # which request this answers (`taxonedge deploy` filters on it)
            payload["nonce"] = dep.request.nonce
        if state in FINAL and record and not repeat:
            self.history.record(
                dep.id,
                {
                    "state": state,
                    "reason": reason,
                    "time": payload["time"],
                    "sha256": dep.request.sha256,
                    "nonce": dep.request.nonce,
                },
            )
        if dep is self.current and not repeat and dep.source_file is None:
            if state in FINAL:
                self.in_progress.clear()
            elif state in STATES:
                self.in_progress.save(dep, state)
        if state in FINAL and not repeat:
            if dep.transfer is not None:  # before the outcome goes out: whoever reads it finds no partial
                dep.transfer.close()  # file, and a late chunk finds the transfer closed
            with self._lock:  # before the outcome goes out: whoever acts on it may deploy again at once
                if self.current is dep:
                    self.current = None
        log.info("deployment %s: %s%s", dep.id, state, f" ({reason})" if reason else "")
        self._send(self.topics.deploy_progress(dep.id), payload, None, retain=state in FINAL)
        if dep.response_topic:
            self._send(dep.response_topic, payload, dep.correlation)
        if state in FINAL:
            if record or repeat:  # handled: not a busy refusal, which stays pending for a later try
                self._clear_request(dep)
            return
        if state != "receiving":
            _maybe_pause(state)

    def _clear_request(self, dep: Deployment) -> None:
        """Clear this device's own retained request and chunks once handled, unless a newer request came."""
        topic = dep.topic
        if topic != self.deploy_topics[0] or self._latest.get(topic) != dep.id:
            return  # groups stay retained (every member needs them); a newer request is not ours to clear
        del self._latest[topic]
        self._send(topic, b"", None, retain=True)
        for i in range(dep.request.chunks or 0):
            self._send(f"{topic}/{dep.id}/chunk/{i}", b"", None, retain=True)

    def _send(
        self, topic: str, payload: dict | bytes, correlation: bytes | None, retain: bool = False
    ) -> None:
        properties = None
        if correlation is not None:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation
        try:
            self.daemon.publish(topic, payload, qos=1, retain=retain, properties=properties)
        except Exception as exc:  # reporting must not break the deployment itself
            log.warning("cannot publish deployment progress on %s: %s", topic, exc)


class DropFolder:
    """Bundles dropped into `model.watch_dir` go through the same steps as a deployment over MQTT: once a
    file stops changing it is submitted, then moved to installed/ or rejected/ with its reason."""

    def __init__(self, updater: Updater):
        self.updater = updater
        self.following: set[Path] = set()  # taken, not yet filed away: not to be taken again meanwhile

    def run(self) -> None:
        folder = Path(self.updater.config.model.watch_dir)
        seen: dict[Path, tuple[int, int]] = {}
        while not self.updater.stopping.wait(self.updater.cfg.watch_interval_s):
            try:
                candidates = sorted(folder.glob("*.tebundle"))
            except OSError as exc:
                log.warning("model.watch_dir %s: %s", folder, exc)
                continue
            for path in candidates:
                try:
                    stat = path.stat()
                except OSError:
                    continue
                signature = (stat.st_size, stat.st_mtime_ns)
                if seen.get(path) != signature:  # still being copied in: wait for it to settle
                    seen[path] = signature
                    continue
                if self.updater.current is None and path not in self.following:
                    seen.pop(path, None)
                    self.take(path)

    def take(self, path: Path) -> None:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        request = DeployRequest(
            id=f"local-{digest[:16]}", size=max(len(data), 1), sha256=digest, url=path.resolve().as_uri()
        )
        dep = Deployment(request, topic="watch_dir", source_file=path)
        if not self.updater.submit(dep):  # seen before (its recorded outcome decides where it goes), or busy
            done = self.updater.history.get(dep.id) or {
                "state": "rejected",
                "reason": "busy with another deployment",
            }
            self._file_away(path, done["state"], done.get("reason"))
            return

        # The worker reads the file; once it is done, move the file out of the way with its outcome.
        def follow() -> None:
            try:
                while self.updater.current is dep:
                    time.sleep(0.2)
                outcome = self.updater.history.get(dep.id) or {"state": "rejected", "reason": "unknown"}
                self._file_away(path, outcome["state"], outcome.get("reason"))
            finally:
                self.following.discard(path)

        self.following.add(path)
        self.updater.spawn(follow, f"update-watch-{dep.id}")

    @staticmethod
    def _file_away(path: Path, state: str, reason: str | None) -> None:
        target = path.parent / ("installed" if state == "committed" else "rejected")
        target.mkdir(exist_ok=True)
        os.replace(path, target / path.name)
        if reason:  # written whole or not at all: whoever watches the folder never reads it half-written
            atomic_write(target / f"{path.name}.reason.txt", (reason + "\n").encode())


def _why(exc: BaseException) -> str:
    """One line on what is wrong with a request."""
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 JSON"
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        return (
            f"{loc}: {err['msg'].removeprefix('Value error, ')} (see docs/deploy.md for the request fields)"
        )
    first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return f"not JSON: {first}" if isinstance(exc, json.JSONDecodeError) else first


def _clean(text: str) -> str:
    """Text safe to publish as UTF-8 (a key from a request may hold a lone surrogate escape)."""
    return text.encode("utf-8", "replace").decode("utf-8")[:500]


def _id_of(payload: bytes) -> str | None:
    """The id of an unreadable request when it has a usable one, so the sender can match the answer."""
    try:
        value = json.loads(payload.decode("utf-8")).get("id")
    except (ValueError, RecursionError, AttributeError):
        return None
    return value if isinstance(value, str) and ID_PATTERN.fullmatch(value) else None


def _maybe_pause(state: str) -> None:
    value = os.environ.get(PAUSE_ENV)
    if not value:
        return
    name, _, seconds = value.partition(":")
    if name == state:
        log.warning("%s=%s: pausing after %s", PAUSE_ENV, value, state)
        time.sleep(float(seconds or 60))


_UPDATERS: dict[int, Updater] = {}


def attach(daemon: UpdaterHost) -> Updater:
    """Start taking model deployments for `daemon` (called by the daemon before it connects: the deploy
    topics are subscribed with its own, and what start-up reports waits in paho's queue)."""
    updater = Updater(daemon)
    _UPDATERS[id(daemon)] = updater
    updater.start()
    return updater


def detach(daemon: UpdaterHost) -> None:
    updater = _UPDATERS.pop(id(daemon), None)
    if updater is not None:
        updater.stop()
