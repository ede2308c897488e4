"""Fuzz every topic a device reads, against a real daemon subprocess on a real mosquitto.

Generated payloads (bytes, bad UTF-8, lone surrogates, deep nesting, huge, wrong types, unknown keys) go to
`trigger`, every `cmd/<name>` (known and unknown names), the deployment request and chunk topics and a
fleet group's deployment topic, with response topics that are allowed, and ones that are the device's
own. `enroll` gets each belt-enrollment payload once (`BELT`: from_belt, timeout_s, cancel) before the
drawn ones, and every enroll is followed by a cancel, so that a capture waiting for items never outlives its
example. Afterwards: the daemon still runs, labels and enrolls a product from the belt; every command got
exactly one answer, and every deployment request with an allowed response topic one at least; each
accepted trigger ended in exactly one label; every message on the device's topics validates against the
schema generated from edge/kernel/protocol.py; nothing but labels is on `labels`, nothing but status on
`status`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .conftest import TINY_LABELS, class_image, write_image_tree
from .daemonkit import BASE, REPLIES, DaemonProcess, Watcher, validate_device_messages, write_config
from .tinymodels import write_tiny_bundle

GROUP_DEPLOY = "taxonedge/groups/fuzz/deploy"
COMMANDS = [
    "state",
    "pause",
    "resume",
    "set_thresholds",
    "snapshot",
    "learn_empty",
    "forget_empty",
    "enroll",
    "enrolled",
]
# a real photo (a tiny class image as JPEG) for enroll payloads that get as far as the model
_PHOTO = base64.b64encode(
    cv2.imencode(".jpg", class_image(5, np.random.default_rng(0), 32))[1].tobytes()
).decode()

# enroll from the belt: sent to cmd/enroll each once, and drawn among the payloads for every topic
BELT = [
    json.dumps({"label": "Fuzz/Belt", "from_belt": 1, "timeout_s": 1}).encode(),  # times out
    json.dumps({"label": "Fuzz/Belt", "from_belt": 2}).encode(),  # waits for items: cancelled by the fuzz
    json.dumps({"label": "Fuzz/Belt", "from_belt": 2, "photos": [_PHOTO]}).encode(),  # both
    json.dumps({"label": "Fuzz/Belt", "from_belt": 33}).encode(),
    json.dumps({"label": "Fuzz/Belt", "from_belt": 1.5}).encode(),
    json.dumps({"label": "Fuzz/Belt", "from_belt": "2"}).encode(),
    json.dumps({"label": "Fruit/Avocado", "from_belt": 1}).encode(),  # a trained class
    json.dumps({"label": "Fuzz/Photos", "photos": [_PHOTO], "timeout_s": 5}).encode(),
    b'{"label": "Fuzz/Belt", "from_belt": 1, "timeout_s": 1e999}',
    b'{"label": "Fuzz/Belt", "from_belt": 1, "timeout_s": -1}',
    b'{"cancel": true}',
    b'{"cancel": false, "from_belt": 1}',
]

_json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=12,
)
PAYLOADS = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),  # lone surrogates as raw bytes
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(
            [
                "id",
                "item_id",
                "depth_1",
                "depth_3",
                "depth_01",
                "inline",
                "size",
                "sha256",
                "chunks",
                "chunk_size",
                "url",
                "thresholds",
                "label",
                "photos",
                "action",
                "to",
                "from_belt",
                "timeout_s",
                "cancel",
                "x\\ud800",
            ]
        ),
        _json_values,
        max_size=4,
    ).map(lambda d: json.dumps(d).encode()),
    st.sampled_from(
        [
            b'{"item_id": "x\\ud800"}',
            json.dumps({"label": "Fuzz/New", "photos": [_PHOTO, _PHOTO]}).encode(),
            json.dumps({"label": "Fuzz/New", "photos": ["aGVsbG8="]}).encode(),  # base64, not an image
            json.dumps({"label": "Fruit/Avocado", "photos": [_PHOTO]}).encode(),  # a trained class
            json.dumps({"label": "Fuzz/Big", "photos": [_PHOTO] * 40}).encode(),  # too many photos
            *BELT,
            b'{"action": "list"}',
            b'{"action": "export"}',
            b'{"action": "rename", "label": "Fuzz/New", "to": "Fuzz/Renamed"}',
            b'{"action": "remove", "label": "Fuzz/Renamed"}',
            b'{"seconds": 1}',  # learn_empty: a real capture, answered within the wait (no fuzzed seconds)
            b'{"seconds": 1e999}',
            b'{"seconds": "1"}',
            b'{"id": "x\\ud800"}',
            b'{"\\ud800": 1}',
            b'{"item_id": true}',
            b'{"item_id": 12}',
            b'{"item_id": ""}',
            b"\xff\xfe",
            b"[" * 1000 + b"]" * 1000,
            b'{"a":' * 1000 + b"1" + b"}" * 1000,
            b"9" * 5000,
            b"x" * 20000,
            b"{" * 20000,
            b"",
            b'{"id": "d1", "size": 0, "sha256": "00", "chunks": 1, "chunk_size": 1}',
            b'{"id": "d2", "size": 10, "sha256": "' + b"a" * 64 + b'", "chunk_size": 4, "chunks": 3}',
            b'{"id": "d3", "size": 10, "sha256": "' + b"a" * 64 + b'", "url": "file:///etc/passwd"}',
        ]
    ),
)
NAMES = st.one_of(
    st.sampled_from(COMMANDS + ["reboot", "deploy"]),
    st.text(
        st.characters(blacklist_characters="/+#\x00", blacklist_categories=("Cs", "Cc")),
        min_size=1,
        max_size=12,
    ),
)
RESPONSE_TOPICS = st.sampled_from(
    [REPLIES, f"{BASE}/labels", f"{BASE}/status", f"{BASE}/cmd/pause", f"{BASE}/trigger", GROUP_DEPLOY, None]
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.tebundle")


@pytest.mark.timeout(600)
def test_no_payload_on_any_topic_stops_the_device_or_goes_unanswered(tmp_path, broker, bundle):
    frames = next(
        p for p in write_image_tree(tmp_path / "tree", TINY_LABELS[:1], per_class=4).rglob("*.jpg")
    ).parent
    source = f'type = "folder"\npath = "{frames}"\nloop = true\npacing = "realtime"\nfps = 60'
    cfg = write_config(
        tmp_path / "c.toml",
        broker,
        bundle,
        source,
        tmp_path / "st",
        '\n[trigger]\nmode = "item"\nframes_per_item = 1\nitem_timeout_s = 1\n',
    )
    cfg.write_text(
        cfg.read_text()
        .replace("stats_interval_s = 1", 'stats_interval_s = 1\ngroups = ["fuzz"]')
        .replace("[inference]", "[model.update]\nchunk_timeout_s = 0.5\nchunk_retries = 1\n\n[inference]")
    )
    watcher = Watcher(broker.port)
    daemon = DaemonProcess(cfg)
    fuzzer = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="fuzzer", protocol=paho.MQTTv5)
    fuzzer.connect("127.0.0.1", broker.port)
    fuzzer.loop_start()
    counter = iter(range(10**6))
    sent = {"triggers": 0, "commands": 0}
    try:
        assert watcher.wait(lambda: any(t == f"{BASE}/status" for t, _, _ in watcher.snapshot()), 60), (
            daemon.log
        )

        def send(topic: str, payload: bytes, response: str | None) -> bytes:
            corr = f"c{next(counter)}".encode()
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = corr
            if response is not None:
                props.ResponseTopic = response
            fuzzer.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)
            return corr

        def answered(corr: bytes, topic: str) -> bool:
            return any(
                getattr(p, "CorrelationData", None) == corr and t == topic for t, _, p in watcher.snapshot()
            )

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(name=NAMES, payload=PAYLOADS, response=RESPONSE_TOPICS)
        def commands(name: str, payload: bytes, response: str | None) -> None:
            corr = send(f"{BASE}/cmd/{name}", payload, response)
            sent["commands"] += 1
            if name == "enroll":  # a belt enrollment it started waits for items: cancel it (answered too)
                cancel = send(f"{BASE}/cmd/enroll", b'{"cancel": true}', REPLIES)
                sent["commands"] += 1
                assert watcher.wait(lambda: answered(cancel, REPLIES), 10), "no answer to the cancel"
            where = response if response == REPLIES else f"{BASE}/cmd/{name}/response"
            assert watcher.wait(lambda: answered(corr, where), 10), (
                f"no answer to cmd/{name} {payload[:80]!r}"
            )

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(payload=PAYLOADS)
        def triggers(payload: bytes) -> None:
            send(f"{BASE}/trigger", payload, None)
            sent["triggers"] += 1

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(
            payload=PAYLOADS, response=RESPONSE_TOPICS, where=st.sampled_from(["device", "group", "chunk"])
        )
        def deployments(payload: bytes, response: str | None, where: str) -> None:
            topic = {
                "device": f"{BASE}/model/deploy",
                "group": GROUP_DEPLOY,
                "chunk": f"{BASE}/model/deploy/d2/chunk/0",
            }[where]
            corr = send(topic, payload, response)
            # An empty payload on a deploy topic clears a retained request (`deploy --cancel`): not a request.
            if response == REPLIES and where != "chunk" and payload.strip():
                assert watcher.wait(lambda: answered(corr, REPLIES), 10), f"no answer to {payload[:80]!r}"

        for payload in BELT:
            commands.hypothesis.inner_test(name="enroll", payload=payload, response=REPLIES)
        commands()
        triggers()
        deployments()
        # Clean up what the fuzz may have set, then the device must still label.
        send(f"{BASE}/cmd/resume", b"", REPLIES)
        send(f"{BASE}/cmd/set_thresholds", b'{"depth_1": null, "depth_2": null, "depth_3": null}', REPLIES)
        # after all that, a belt enrollment still works: the next two items are the product
        belt = send(f"{BASE}/cmd/enroll", b'{"label": "Fuzz/From-Belt", "from_belt": 2}', REPLIES)
        sent["commands"] += 1
        for i in range(3):
            fuzzer.publish(f"{BASE}/trigger", f"final-{i}".encode(), qos=1).wait_for_publish(5)
        sent["triggers"] += 3
        assert watcher.wait(lambda: answered(belt, REPLIES), 30), daemon.log
        answer = next(
            json.loads(p)
            for t, p, props in watcher.snapshot()
            if t == REPLIES and getattr(props, "CorrelationData", None) == belt
        )
        assert answer["ok"] and answer["result"]["photos"] == 2, answer

        def final_labels() -> int:
            return sum(t == f"{BASE}/labels" and b'"final-' in p for t, p, _ in watcher.snapshot())

        assert watcher.wait(lambda: final_labels() == 3, 30), daemon.log
        assert daemon.proc.poll() is None, daemon.log
        assert daemon.terminate(60) == 0, daemon.log
        assert watcher.wait(
            lambda: any(t == f"{BASE}/stats" and b'"final":true' in p for t, p, _ in watcher.snapshot()), 10
        )
    finally:
        fuzzer.loop_stop()
        fuzzer.disconnect()
        watcher.close()
        if daemon.proc.poll() is None:
            daemon.kill()

    messages = watcher.snapshot()
    labels = validate_device_messages(messages, BASE, replies=REPLIES)
    final = [json.loads(p) for t, p, _ in messages if t == f"{BASE}/stats" and b'"final":true' in p][-1]
    assert final["triggers"] + final["triggers_refused"] == sent["triggers"]
    assert len(labels) == final["triggers"], "an accepted trigger without its label (or a label twice)"
    assert final["commands"] == sent["commands"] + 2
    assert "Traceback" not in daemon.log, daemon.log[-3000:]
