"""`taxonedge listen`: what an integrator sees, from a real broker."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import paho.mqtt.client as paho
from taxonedge.edge.tools.listen import format_label

LABEL = {
    "schema": "taxonedge.label/1",
    "seq": 12,
    "site": "dc",
    "line": "l1",
    "device": "cam",
    "timestamp": "2026-11-29T20:57:24.533Z",
    "item_id": "A-1",
    "vote": {"frames": 5, "agreeing": 4, "agreement": 0.8},
    "path": ["Fruit", "Apple"],
    "decision": "backed-off",
    "latency_ms": 7.25,
    "levels": [
        {"depth": 1, "score": 0.99, "passed": True},
        {"depth": 2, "score": 0.97, "passed": True},
        {"depth": 3, "score": 0.61, "passed": False},
    ],
}


def test_format_label_reads_like_the_hierarchy():
    line = format_label(LABEL)
    assert line.startswith("20:57:24.533  dc/l1/cam  #12")
    assert "Fruit > Apple" in line and "backed-off" in line
    assert "(0.99 / 0.97 / 0.61✗)" in line and "item A-1 4/5 agree" in line and "7.2 ms" in line
    unknown = format_label({**LABEL, "path": [], "decision": "unknown", "item_id": None})
    assert " unknown " in unknown and "item" not in unknown
    unfamiliar = format_label({**LABEL, "path": [], "decision": "unknown", "reason": "unfamiliar"})
    assert "unknown (unfamiliar)" in unfamiliar
    path = ["Packages", "Milk", "New-Brand"]
    enrolled = format_label(
        {**LABEL, "path": path, "decision": "accepted", "source": "enrolled", "similarity": 0.43}
    )
    assert "Packages > Milk > New-Brand [enrolled 0.43]" in enrolled
    assert "[enrolled" not in line


def test_listen_prints_labels_from_a_real_broker(broker):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "taxonedge",
            "listen",
            "--broker",
            f"127.0.0.1:{broker.port}",
            "--count",
            "2",
            "--timeout",
            "30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        deadline = time.monotonic() + 20
        seq = 0
        while proc.poll() is None and time.monotonic() < deadline:  # until the listener has subscribed
            seq += 1
            pub.publish(
                "taxonedge/dc/l1/cam/labels", json.dumps({**LABEL, "seq": seq}), qos=1
            ).wait_for_publish(5)
            pub.publish("taxonedge/dc/l1/cam/labels", b"not json", qos=1).wait_for_publish(5)
            time.sleep(0.2)
        out, err = proc.communicate(timeout=30)
    finally:
        pub.loop_stop()
        pub.disconnect()
    assert proc.returncode == 0, err
    lines = [line for line in out.splitlines() if "Fruit > Apple" in line]
    assert len(lines) == 2 and "(not JSON)" in out
