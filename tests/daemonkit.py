"""Helpers for the daemon tests: a config writer, an MQTT recorder and a daemon subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

DEVICE = "dev1"
BASE = f"taxonedge/plant/line1/{DEVICE}"
REPLIES = "taxonedge/replies/tests"  # answers never go under the device's own BASE (protocol.py)


def write_config(
    path: Path, broker: Any, bundle: Path, source: str, state_dir: Path, extra: str = ""
) -> Path:
    """A daemon config: `source` is the TOML body of the [source] table; `extra` more tables."""
    path.write_text(f"""
[device]
id = "{DEVICE}"
site = "plant"
line = "line1"
state_dir = "{state_dir}"

[model]
bundle = "{bundle}"
require_signature = false

[source]
{source}

[inference]
backend = "auto"
warmup_runs = 1

[mqtt]
host = "127.0.0.1"
port = {broker.port}
will_delay_s = 0
stats_interval_s = 1
{extra}
""")
    return path


class Recorder:
    """Subscribes to the device's topics and records every message (topic, payload dict or bytes, props)."""

    def __init__(self, port: int, topics: tuple[str, ...] = (f"{BASE}/#", REPLIES)):
        self.messages: list[tuple[str, Any, Any]] = []
        self._cond = threading.Condition()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"rec-{time.monotonic_ns()}", protocol=paho.MQTTv5
        )
        self.topics = topics
        self.client.on_connect = lambda c, u, f, rc, p: [c.subscribe(t, qos=1) for t in self.topics]
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()
        self.subscribed.wait(5)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            payload = json.loads(msg.payload)
        except (ValueError, RecursionError):  # the requests the tests send are recorded too, garbage included
            payload = msg.payload
        with self._cond:
            self.messages.append((msg.topic, payload, msg.properties))
            self._cond.notify_all()

    def on(self, suffix: str) -> list[Any]:
        with self._cond:
            return [p for t, p, _ in self.messages if t == f"{BASE}/{suffix}"]

    def wait(self, predicate: Any, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def request(self, name: str, payload: bytes, correlation: bytes = b"c1") -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = REPLIES
        props.CorrelationData = correlation
        self.client.publish(f"{BASE}/cmd/{name}", payload, qos=1, properties=props).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class DaemonProcess:
    """`python -m taxonedge run --config FILE` as a real subprocess; its log goes to a file."""

    def __init__(self, config: Path, *args: str, env: dict | None = None):
        self.log_path = config.with_suffix(f".{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - stays open while the daemon runs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taxonedge", "run", "--config", str(config), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @contextlib.contextmanager
    def explains_failures(self, tail: int = 4000):
        """An assertion failing inside carries the daemon's own account (for failures seen only in CI)."""
        try:
            yield
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- the daemon's log ---\n{self.log[-tail:]}") from None

    def terminate(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                f"daemon did not exit within {timeout} s; log:\n{self.log[-3000:]}"
            ) from None
        finally:
            self._log.close()


def labels_of(recorder: Recorder) -> list[dict]:
    return [p for p in recorder.on("labels") if isinstance(p, dict)]


class Watcher:
    """Every message on the broker (`#`), in arrival order, raw."""

    def __init__(self, port: int):
        self.messages: list[tuple[str, bytes, Properties | None]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"watcher-{time.monotonic_ns()}", protocol=paho.MQTTv5
        )
        ready = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("#", qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(5)

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, getattr(msg, "properties", None)))

    def snapshot(self) -> list[tuple[str, bytes, Properties | None]]:
        with self._lock:
            return list(self.messages)

    def wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


SCHEMAS = {
    name: json.loads(
        (
            Path(__file__).resolve().parents[1] / "edge" / "kernel" / "schemas" / f"{name}.schema.json"
        ).read_text()
    )
    for name in ("label", "status", "stats", "model", "command-answer", "deploy-progress")
}


def validate_device_messages(
    messages: list[tuple[str, bytes, Any]], base: str, replies: str | None = None
) -> list[dict]:
    """Every message a device published under `base` (and its answers on `replies`) against the schema
    generated from edge/kernel/protocol.py; returns the labels."""
    import jsonschema
    from taxonedge.edge.kernel.protocol import message_kind

    labels = []
    for topic, payload, _ in messages:
        kind = message_kind(topic, base)
        if topic == replies:
            kind = "command-answer" if "command" in json.loads(payload) else "deploy-progress"
        if kind is None:
            continue
        document = json.loads(payload)  # every message the device publishes is UTF-8 JSON
        jsonschema.validate(document, SCHEMAS[kind])
        if kind == "label":
            labels.append(document)
    return labels


def validate_recorded(recorder: Recorder, base: str) -> list[dict]:
    """`validate_device_messages` on what a Recorder kept (its JSON payloads encoded back to bytes)."""
    messages = [(t, json.dumps(m).encode() if isinstance(m, dict) else m, p) for t, m, p in recorder.messages]
    return validate_device_messages(messages, base, replies=REPLIES)
