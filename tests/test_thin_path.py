"""The thin path end to end, through the CLI as a user runs it:
photos -> `taxonedge train` -> `taxonedge convert` (full int8, signed) -> `taxonedge inspect` ->
`taxonedge run` over a real video file -> JSON labels on a real mosquitto broker."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import cv2
import jsonschema
import paho.mqtt.client as paho
import pytest
from taxonedge.edge.kernel.bundle import read_bundle

from .conftest import REPO, run_cli

pytestmark = pytest.mark.slow


class Subscriber:
    def __init__(self, port: int, topic: str):
        self.labels: list[dict] = []
        self.got = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        self.labels.append(json.loads(msg.payload))
        self.got.set()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_video(path, image_paths, frames_each=3):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    for image in image_paths:
        frame = cv2.imread(str(image))
        for _ in range(frames_each):
            writer.write(frame)
    writer.release()
    return path


def test_photos_to_mqtt_label(tmp_path, tiny_tree, tiny_val_tree, broker):
    run_dir, bundle = tmp_path / "run", tmp_path / "tiny.tebundle"
    run_cli(
        "train",
        "--data",
        str(tiny_tree),
        "--val",
        str(tiny_val_tree),
        "--out",
        str(run_dir),
        "--backbone",
        "mobilenet_v2",
        "--alpha",
        "0.35",
        "--input-size",
        "64",
        "--weights",
        "none",
        "--head-epochs",
        "30",
        "--epochs",
        "1",
        "--batch-size",
        "16",
    )
    run_cli("keygen", "--out", str(tmp_path / "build"))
    # --force: a 1-epoch model from random weights may lose more than the gate allows; the gate has its own
    # tests
    run_cli(
        "convert",
        "--run",
        str(run_dir),
        "--out",
        str(bundle),
        "--sign-key",
        str(tmp_path / "build.key"),
        "--calibration-images",
        "32",
        "--force",
        "--version",
        "7",
    )
    shown = run_cli("inspect", str(bundle), "--pubkey", str(tmp_path / "build.pub")).stdout
    assert "signature  valid" in shown and "fully integer" in shown
    taxonomy = read_bundle(bundle).taxonomy
    assert taxonomy.depth == 3 and "Fruit/Avocado" in taxonomy.leaf_labels

    video = write_video(tmp_path / "belt.avi", sorted(tiny_val_tree.rglob("*.jpg"))[:8])
    config = tmp_path / "device.toml"
    config.write_text(f"""
[device]
id = "cam-1"
site = "dc"
line = "l2"
state_dir = "{tmp_path / "state"}"

[model]
bundle = "{bundle}"
public_key = "{tmp_path / "build.pub"}"

[source]
type = "video"
path = "{video}"
pacing = "fast"

[inference]
backend = "auto"

[mqtt]
port = {broker.port}
""")
    run_cli("run", "--config", str(config), "--validate-config")
    sub = Subscriber(broker.port, "taxonedge/dc/l2/cam-1/labels")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "taxonedge", "run", "--config", str(config), "--max-frames", "6"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert sub.got.wait(10), "no label arrived"
    finally:
        sub.close()
    schema = json.loads((REPO / "edge" / "kernel" / "schemas" / "label.schema.json").read_text())
    assert len(sub.labels) == 6
    for label in sub.labels:
        jsonschema.validate(label, schema)
        assert label["device"] == "cam-1" and label["line"] == "l2"
        assert label["model"]["version"] == "7"
        if label["label"] is not None:
            assert label["label"] in taxonomy.by_label
            assert label["path"] == label["label"].split("/")
    assert [m["seq"] for m in sub.labels] == list(range(1, 7))
