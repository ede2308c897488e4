"""Enrolling a product on a running daemon, end to end: `taxonedge enroll` with photos over a real
mosquitto, labels with source enrolled for the new product, list / rename / export / remove with
`taxonedge enrolled`, bad input refused with one line, and the enrollment kept across a restart."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from taxonedge.edge.service.config import load_config
from taxonedge.edge.service.daemon import Daemon

from .conftest import TINY_LABELS, class_image
from .daemonkit import REPLIES, Recorder, labels_of, validate_recorded, write_config
from .tinymodels import write_tiny_bundle

TARGET = "plant/line1/dev1"
NEW = "Fruit/Apple/Red-Delicious"  # drawn with palette 5: unlike every trained class
NEW_INDEX = 5


def cli(broker, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "taxonedge",
            *args[:1],
            "--broker",
            f"127.0.0.1:{broker.port}",
            "--target",
            TARGET,
            *args[1:],
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def photos(folder: Path, index: int, count: int, seed: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{index}-{i}.jpg"
        cv2.imwrite(str(path), class_image(index, rng, 64))
        paths.append(str(path))
    return paths


def start(tmp_path: Path, broker, bundle: Path, line: Path) -> Daemon:
    source = f'type = "folder"\npath = "{line}"\nloop = true\npacing = "realtime"\nfps = 30'
    cfg = write_config(tmp_path / f"c{time.monotonic_ns()}.toml", broker, bundle, source, tmp_path / "state")
    daemon = Daemon(load_config(cfg))
    daemon.start()
    assert daemon.link.connected.wait(10)
    return daemon


@pytest.fixture
def line(tmp_path) -> Path:
    """The belt: the new product and every trained class, looping."""
    folder = tmp_path / "line"
    for index in [NEW_INDEX, 0, 1, 2, 3] * 2:
        photos(folder, index, 2, seed=100 + index)
    return folder


def test_enroll_from_photos_on_a_running_daemon(tmp_path, broker, line):
    bundle = write_tiny_bundle(tmp_path / "tiny.tebundle")
    rec = Recorder(broker.port)
    daemon = start(tmp_path, broker, bundle, line)
    try:
        assert rec.wait(lambda r: len(labels_of(r)) >= 5)
        assert not any(lb.get("source") == "enrolled" for lb in labels_of(rec))
        # bad input: each refused with one line, nothing stored
        unreadable = tmp_path / "broken.jpg"
        unreadable.write_bytes(b"\xff\xd8 not a jpeg")
        proc = cli(broker, "enroll", "--label", "New/X", str(unreadable))
        assert proc.returncode == 2 and "broken.jpg" in proc.stderr and "nothing was sent" in proc.stderr
        proc = cli(broker, "enroll", "--label", TINY_LABELS[2], *photos(tmp_path / "p0", NEW_INDEX, 2, 1))
        assert proc.returncode == 1 and "trained class" in proc.stderr, proc.stderr
        rec.request("enroll", json.dumps({"label": "New/Y", "photos": ["!!not base64"]}).encode(), b"e1")
        rec.request("enroll", json.dumps({"label": "New/Y"}).encode(), b"e2")
        rec.request("enrolled", json.dumps({"action": "explode"}).encode(), b"e3")
        rec.request("enrolled", json.dumps({"action": "remove", "label": "Nope/Z"}).encode(), b"e4")
        assert rec.wait(lambda r: len([m for t, m, _ in r.messages if t == REPLIES]) >= 4)
        errors = {p.CorrelationData: m["error"] for t, m, p in rec.messages if t == REPLIES and not m["ok"]}
        assert "base64" in errors[b"e1"] and "photos" in errors[b"e2"]
        assert "one of list" in errors[b"e3"] and "not enrolled" in errors[b"e4"]

        started = time.monotonic()
        proc = cli(broker, "enroll", "--label", NEW, *photos(tmp_path / "p1", NEW_INDEX, 5, 7))
        assert proc.returncode == 0, proc.stderr
        assert f"enrolled {NEW} from 5 photos" in proc.stdout
        count = len(labels_of(rec))
        assert rec.wait(lambda r: any(lb.get("source") == "enrolled" for lb in labels_of(r)[count:]))
        print(f"enroll command to the first enrolled label: {time.monotonic() - started:.2f} s")
        assert rec.wait(lambda r: len(labels_of(r)) >= count + 20)
        after = labels_of(rec)[count:]
        enrolled = [lb for lb in after if lb.get("source") == "enrolled"]
        assert all(
            lb["label"] == NEW and lb["decision"] == "accepted" and 0 < lb["similarity"] <= 1
            for lb in enrolled
        )
        # the trained products keep their labels: at most a few frames go to the new product
        assert len(enrolled) <= 0.4 * len(after) + 2, (len(enrolled), len(after))

        listed = cli(broker, "enrolled", "list")
        assert listed.returncode == 0 and NEW in listed.stdout and "5 photos" in listed.stdout
        assert (
            cli(broker, "enrolled", "rename", "--label", NEW, "--to", "Fruit/Apple/Red-Star").returncode == 0
        )
        out = tmp_path / "export"
        proc = cli(broker, "enrolled", "export", "--out", str(out))
        assert proc.returncode == 0 and len(list((out / "Fruit/Apple/Red-Star").glob("*.jpg"))) == 5
        assert daemon.health.state()["enrolled"]["products"] == 1
    finally:
        rec.close()
        daemon.shutdown()
    validate_recorded(rec, daemon.topic_base)
    # a restart keeps it; remove takes it away at once
    daemon = start(tmp_path, broker, bundle, line)
    try:
        assert daemon.pipeline.enrollment.store.products()[0].label == "Fruit/Apple/Red-Star"
        proc = cli(broker, "enrolled", "remove", "--label", "Fruit/Apple/Red-Star")
        assert proc.returncode == 0 and "no enrolled products" in proc.stdout
    finally:
        daemon.shutdown()
