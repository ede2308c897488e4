"""A small host for the update plugin that implements the daemon's control-plane seam for real.

It runs a real `Classifier` on generated class images in a loop, decodes with the real `Decoder`, publishes
each label on `<base>/labels` through a real paho client (MQTT v5), calls result listeners, and swaps models
between items in `switch_model`, exactly as the seam in edge/service/daemon.py describes. It lets the update
state machine be tested on its own; the end-to-end tests run the real daemon.

Also runnable as a process (`python -m tests.update_host CONFIG`) for the SIGKILL recovery tests: it starts
from `slots.startup_bundle(config)` like the daemon does, and publishes the serving model on `<base>/model`.
"""

from __future__ import annotations

import functools
import json
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from taxonedge.edge.kernel.bundle import Bundle
from taxonedge.edge.kernel.decode import Decoder
from taxonedge.edge.kernel.preprocess import preprocess
from taxonedge.edge.kernel.runtime import Classifier
from taxonedge.edge.service.config import Config, load_config
from taxonedge.edge.service.slots import read_verified, startup_bundle

from .conftest import class_image


@dataclass
class Result:
    ok: bool
    error: str | None
    latency_s: float
    decision: str | None
    model_sha256: str


class SeamHost:
    def __init__(self, config: Config, bundle: Bundle, frame_interval_s: float = 0.01):
        self.config = config
        self.topic_base = config.topic_base
        self.active_bundle = bundle
        self._clf = Classifier(bundle)
        self._decoder = Decoder(bundle.taxonomy, bundle.manifest.thresholds)
        self._pending: tuple[Classifier, Decoder, Future] | None = None
        self._handlers: list[tuple[str, Callable]] = []
        self._listeners: list[Callable] = []
        self._control: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._interval = frame_interval_s
        self.seq = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, msg: self._control.put(msg)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect(config.mqtt.host, config.mqtt.port)
        self.client.loop_start()
        self._threads = [
            threading.Thread(target=f, daemon=True) for f in (self._control_loop, self._infer_loop)
        ]
        for t in self._threads:
            t.start()
        self._publish_model()

    # ---- the seam ------------------------------------------------------------------------------------
    def publish(self, topic: str, payload: dict | bytes, qos: int = 1, retain: bool = False, properties=None):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(topic, data, qos=qos, retain=retain, properties=properties)

    def subscribe(self, topic_filter: str, handler: Callable) -> None:
        self._handlers.append((topic_filter, handler))
        self.client.subscribe(topic_filter, qos=1)

    def add_result_listener(self, callback: Callable) -> None:
        self._listeners.append(callback)

    def switch_model(self, bundle: Bundle) -> Future:
        future: Future = Future()
        try:
            clf = Classifier(bundle)
            clf.raw(np.zeros(clf.input_shape, np.dtype(bundle.manifest.input.dtype)))  # warm up
        except Exception as exc:
            future.set_exception(exc)
            return future
        self._pending = (clf, Decoder(bundle.taxonomy, bundle.manifest.thresholds), future)
        return future

    # ---- internals -----------------------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        for topic_filter, _ in self._handlers:
            client.subscribe(topic_filter, qos=1)

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._control.get(timeout=0.1)
            except queue.Empty:
                continue
            for topic_filter, handler in self._handlers:
                if mqtt.topic_matches_sub(topic_filter, msg.topic):
                    try:
                        handler(msg.topic, msg.payload, getattr(msg, "properties", None))
                    except Exception as exc:  # like the daemon: logged, never fatal
                        print(f"handler for {topic_filter} raised {exc!r}", file=sys.stderr)

    def _infer_loop(self) -> None:
        rng = np.random.default_rng(0)
        n = len(self.active_bundle.taxonomy.leaf_labels)
        while not self._stop.is_set():
            if self._pending is not None:  # swap between items, never inside one
                self._clf, self._decoder, future = self._pending
                self._pending = None
                self.active_bundle = self._clf.bundle
                self._publish_model()
                future.set_result(self.active_bundle)
            clf, decoder = self._clf, self._decoder
            image = preprocess(class_image(self.seq % n, rng, 64), clf.bundle.manifest.input)
            start = time.perf_counter()
            try:
                probs = clf.probabilities(image.astype(np.dtype(clf.bundle.manifest.input.dtype)))
                if not np.all(np.isfinite(probs)):
                    raise ValueError("non-finite output")
                decision = decoder.decode(probs)
                result = Result(True, None, time.perf_counter() - start, decision.decision, clf.bundle.sha256)
                label = {"seq": self.seq, "label": decision.label, "model": {"sha256": clf.bundle.sha256}}
                self.client.publish(f"{self.topic_base}/labels", json.dumps(label), qos=0)
            except Exception as exc:
                result = Result(False, str(exc), time.perf_counter() - start, None, clf.bundle.sha256)
            self.seq += 1
            for listener in self._listeners:
                listener(result)
            time.sleep(self._interval)

    def _publish_model(self) -> None:
        self.publish(f"{self.topic_base}/model", self.active_bundle.describe(), retain=True)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        self.client.loop_stop()
        self.client.disconnect()


def main(config_path: str) -> None:
    from taxonedge.edge.service import update

    config = load_config(config_path)
    path = startup_bundle(config) or config.model.bundle
    host = SeamHost(config, read_verified(path, config.model))
    update.attach(host)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1])


# ---- bundles and configs for the update tests ------------------------------------------------------------
def write_config(
    folder: Path,
    port: int,
    public_key: Path | None,
    bundle: Path,
    groups: tuple[str, ...] = (),
    watch_dir: Path | None = None,
    frames: Path | None = None,
    **update: object,
) -> Path:
    """A daemon config for the update tests: state in `folder/state`, fast timeouts, a small health window."""
    settings = {
        "health_window": 8,
        "health_timeout_s": 20,
        "chunk_timeout_s": 0.5,
        "chunk_retries": 1,
        "watch_interval_s": 0.2,
        **update,
    }
    model = [f'bundle = "{bundle}"']
    model.append(f'public_key = "{public_key}"' if public_key else "require_signature = false")
    if watch_dir:
        model.append(f'watch_dir = "{watch_dir}"')
    lines = [
        "[device]",
        'id = "dev1"',
        'site = "s1"',
        'line = "l1"',
        f'state_dir = "{folder / "state"}"',
        "[model]",
        *model,
        "[model.update]",
        *(f"{k} = {json.dumps(v)}" for k, v in settings.items()),
        # `frames`: a JPEG folder the real daemon loops over at 25 frames/s
        "[source]",
        'type = "folder"',
        f'path = "{frames or folder}"',
        "loop = true",
        'pacing = "realtime"',
        "fps = 25",
        "[inference]",
        "warmup_runs = 1",
        "[mqtt]",
        f"port = {port}",
        f"groups = {json.dumps(list(groups))}",
        "will_delay_s = 0",
    ]
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def rebuilt(
    data: bytes,
    sign_key,
    *,
    model: bytes | None = None,
    input_size: int | None = None,
    golden_outputs=None,
    version: str | None = None,
    edgetpu: bytes | None = None,
    **manifest_fields: object,
) -> bytes:
    """A bundle like `data` with its model, input size, golden outputs, version or Edge TPU model replaced,
    correctly
    re-manifested and signed: what a careless (not malicious) operator could ship."""
    import io
    import tempfile

    from taxonedge.edge.kernel.bundle import (
        GOLDEN,
        MODEL,
        MODEL_EDGETPU,
        build_manifest,
        read_bundle,
        write_bundle,
    )
    from taxonedge.edge.kernel.preprocess import InputSpec

    old = read_bundle(data)
    files = dict(old.files)
    if model is not None:
        files[MODEL] = model
    if edgetpu is not None:
        files[MODEL_EDGETPU] = edgetpu
    if golden_outputs is not None:
        inputs, _ = old.golden()
        buf = io.BytesIO()
        np.savez(buf, inputs=inputs, outputs=golden_outputs)
        files[GOLDEN] = buf.getvalue()
    m = old.manifest
    spec = (
        m.input
        if input_size is None
        else InputSpec(**{**m.input.model_dump(), "height": input_size, "width": input_size})
    )
    info = m.model.model_copy(update={"version": version}) if version else m.model
    manifest = build_manifest(
        model=info,
        taxonomy=old.taxonomy,
        input_spec=spec,
        output=m.output.model_dump(),
        files=files,
        **{"thresholds": m.thresholds, "golden": m.golden, "quantization": m.quantization, **manifest_fields},
    )
    with tempfile.TemporaryDirectory() as tmp:
        return write_bundle(Path(tmp) / "b.tebundle", manifest, files, sign_key=sign_key).read_bytes()


class Observer:
    """A real MQTT client that watches a device: label arrival times, deployment progress, the model topic;
    and sends deployments (request + chunks) the way `taxonedge deploy` does, with optional faults."""

    def __init__(self, port: int, base: str = "taxonedge/s1/l1/dev1"):
        self.base = base
        self.labels: list[tuple[float, dict]] = []
        self.progress: dict[str, list[dict]] = {}
        self.model: dict | None = None
        self.responses: list[tuple[dict, bytes | None]] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        topics = (f"{base}/labels", f"{base}/model", f"{base}/model/deploy/+", "ops/responses")
        self.client.on_connect = lambda c, u, f, rc, p: [c.subscribe(t, qos=1) for t in topics]
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        time.sleep(0.3)  # let the subscriptions land before anything is sent

    def _on_message(self, client, userdata, msg) -> None:
        payload = json.loads(msg.payload)
        with self._cond:
            if msg.topic.endswith("/labels"):
                self.labels.append((time.monotonic(), payload))
            elif msg.topic.endswith("/model"):
                self.model = payload
            elif msg.topic == "ops/responses":
                self.responses.append((payload, getattr(msg.properties, "CorrelationData", None)))
            else:
                payload["_at"] = time.monotonic()  # arrival time, for phase timings
                self.progress.setdefault(payload["id"], []).append(payload)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], object], timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; progress so far: {self.progress}")
                self._cond.wait(left)

    def states(self, deployment_id: str) -> list[str]:
        return [p["state"] for p in self.progress.get(deployment_id, [])]

    def outcome(self, deployment_id: str, timeout: float = 30.0, after: int = 0) -> dict:
        from taxonedge.edge.service.update import FINAL

        def final():
            found = [p for p in self.progress.get(deployment_id, [])[after:] if p["state"] in FINAL]
            return found[-1] if found else None

        return self.wait_for(final, timeout)

    def send(
        self,
        data: bytes,
        deployment_id: str,
        chunk_size: int = 4096,
        skip: set[int] = frozenset(),
        topic: str | None = None,
        **override,
    ) -> dict:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        from taxonedge.edge.tools.deploy import make_request

        request = {**make_request(data, deployment_id, chunk_size), **override}
        topic = topic or f"{self.base}/model/deploy"
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "ops/responses"
        props.CorrelationData = deployment_id.encode()
        self.client.publish(topic, json.dumps(request), qos=1, properties=props).wait_for_publish(5)
        if "url" not in request:
            self.send_chunks(
                data, deployment_id, [i for i in range(request["chunks"]) if i not in skip], chunk_size, topic
            )
        return request

    def send_chunks(
        self, data: bytes, deployment_id: str, indices, chunk_size: int = 4096, topic: str | None = None
    ) -> None:
        from taxonedge.edge.kernel.protocol import deploy_chunk
        from taxonedge.edge.tools.deploy import chunk

        topic = topic or f"{self.base}/model/deploy"
        for i in indices:
            self.client.publish(deploy_chunk(topic, deployment_id, i), chunk(data, chunk_size, i), qos=1)

    def longest_label_gap(self, start: float, end: float) -> float:
        times = [t for t, _ in self.labels if start <= t <= end]
        return max((b - a for a, b in zip(times[:-1], times[1:], strict=True)), default=float("inf"))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@functools.cache
def signed_bundles() -> dict:
    """Operator keys and the test bundles, made once per process (the models take seconds to train)."""
    import tempfile

    from taxonedge.edge.kernel.signing import generate_keypair, load_private_key

    from .tinymodels import tiny_bundle_bytes

    folder = Path(tempfile.mkdtemp(prefix="taxonedge-keys-"))
    generate_keypair(folder / "op.key", folder / "op.pub")
    key = load_private_key(folder / "op.key")
    return {
        "public_key": folder / "op.pub",
        "key": key,
        "old": tiny_bundle_bytes(seed=0, version="1", sign_key=key),
        "new": tiny_bundle_bytes(seed=1, version="2", sign_key=key),
        "unsigned": tiny_bundle_bytes(seed=1, version="2"),
        # everything decodes as "unknown": passes the self-test, fails the health window's unknown rate
        "all_unknown": tiny_bundle_bytes(seed=1, version="3", thresholds={"depth_1": 1.0}, sign_key=key),
    }
