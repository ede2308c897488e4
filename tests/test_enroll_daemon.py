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
from taxonedge.edge.kernel.bundle import read_bundle
from taxonedge.edge.service.config import load_config
from taxonedge.edge.service.daemon import Daemon

from .conftest import TINY_LABELS, class_image
from .daemonkit import BASE, REPLIES, Recorder, labels_of, validate_recorded, write_config
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
        rec.request("enroll", json.dumps({"label": "New/Y", "from_belt": 3}).encode(), b"e5")
        assert rec.wait(lambda r: len([m for t, m, _ in r.messages if t == REPLIES]) >= 5)
        errors = {p.CorrelationData: m["error"] for t, m, p in rec.messages if t == REPLIES and not m["ok"]}
        assert "base64" in errors[b"e1"] and "photos" in errors[b"e2"]
        assert "one of list" in errors[b"e3"] and "not enrolled" in errors[b"e4"]
        assert "from_belt needs trigger.mode = item (it is continuous)" in errors[b"e5"]

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


# ---- enrolling from the belt (item mode) ----------------------------------------------------------------
ITEM_MODE = '\n[trigger]\nmode = "item"\nframes_per_item = 3\nitem_timeout_s = 5\n'


@pytest.fixture
def new_product_video(tmp_path) -> Path:
    """A belt camera's video of the new product passing, a different placement in every frame."""
    path = tmp_path / "belt.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 64))
    rng = np.random.default_rng(21)
    for _ in range(60):
        writer.write(class_image(NEW_INDEX, rng, 64))
    writer.release()
    return path


def start_items(tmp_path: Path, broker, bundle: Path, video: Path, extra: str = "") -> Daemon:
    source = f'type = "video"\npath = "{video}"\nloop = true\npacing = "realtime"'
    cfg = write_config(
        tmp_path / f"c{time.monotonic_ns()}.toml",
        broker,
        bundle,
        source,
        tmp_path / "state",
        ITEM_MODE + extra,
    )
    daemon = Daemon(load_config(cfg))
    daemon.start()
    assert daemon.link.connected.wait(10)
    return daemon


def answers(rec: Recorder) -> dict[bytes, dict]:
    return {p.CorrelationData: m for t, m, p in rec.messages if t == REPLIES}


def trigger_items(rec: Recorder, prefix: str, count: int) -> None:
    """The photo eye: one trigger per item, each once the previous item's label is out."""
    for i in range(count):
        done = len(labels_of(rec))
        rec.client.publish(f"{BASE}/trigger", f"{prefix}-{i}".encode(), qos=1).wait_for_publish(5)
        assert rec.wait(lambda r, done=done: len(labels_of(r)) > done, 10)


def test_enroll_from_the_next_items_on_the_belt(tmp_path, broker, new_product_video):
    bundle = write_tiny_bundle(tmp_path / "tiny.tebundle")
    rec = Recorder(broker.port)
    daemon = start_items(tmp_path, broker, bundle, new_product_video)
    store = daemon.pipeline.enrollment.store
    try:
        bad = {
            b"b0": {"label": "New/Belt", "from_belt": 0},
            b"b1": {"label": "New/Belt", "from_belt": 33},
            b"b2": {"label": "New/Belt", "from_belt": True},
            b"b3": {"label": "New/Belt", "from_belt": 2, "photos": []},
            b"b4": {"label": "New/Belt", "from_belt": 2, "timeout_s": 0},
            b"b5": {"label": TINY_LABELS[0], "from_belt": 2},
            b"b6": {"cancel": True},
            b"b7": {"cancel": True, "label": "New/Belt"},
            b"b8": {"label": "New/Belt", "photos": [], "timeout_s": 5},
            b"b9": {"cancel": 1},
        }
        for corr, payload in bad.items():
            rec.request("enroll", json.dumps(payload).encode(), corr)
        assert rec.wait(lambda r: set(bad) <= set(answers(r)))
        got = answers(rec)
        assert not any(got[c]["ok"] for c in bad), got
        assert "1 to 32" in got[b"b0"]["error"] and "1 to 32" in got[b"b2"]["error"]
        assert "not both" in got[b"b3"]["error"] and "timeout_s" in got[b"b4"]["error"]
        assert "trained class" in got[b"b5"]["error"] and "no belt enrollment" in got[b"b6"]["error"]
        assert "alone" in got[b"b7"]["error"] and "goes with from_belt" in got[b"b8"]["error"]
        assert "alone" in got[b"b9"]["error"]

        # a capture that gets no items times out; one cancelled ends at once: both store nothing
        rec.request(
            "enroll", json.dumps({"label": "New/Late", "from_belt": 1, "timeout_s": 1}).encode(), b"t"
        )
        assert rec.wait(lambda r: b"t" in answers(r), 10)
        assert "timed out after 0 of 1 items" in answers(rec)[b"t"]["error"]
        rec.request("enroll", json.dumps({"label": "New/Gone", "from_belt": 2}).encode(), b"c")
        assert rec.wait(lambda r: daemon.health.state()["enrolled"]["capture"] is not None, 5)
        rec.request("enroll", json.dumps({"label": "New/Other", "from_belt": 2}).encode(), b"busy")
        rec.request("enroll", b'{"cancel": true}', b"cancel")
        assert rec.wait(lambda r: {b"c", b"busy", b"cancel"} <= set(answers(r)), 10)
        got = answers(rec)
        assert "under way" in got[b"busy"]["error"] and got[b"cancel"]["ok"], got
        assert "cancelled by command after 0 of 2 items" in got[b"c"]["error"]
        assert store.products() == [] and daemon.health.state()["enrolled"]["capture"] is None

        # an item triggered before the command (waiting while the line is paused) is not one of the next N
        rec.request("pause", b"{}", b"pause")
        rec.client.publish(f"{BASE}/trigger", b"early", qos=1).wait_for_publish(5)
        # the operator's command, then three items of the new product pass the photo eye
        tool = cli_async(broker, "enroll", "--label", NEW, "--from-belt", "3", "--belt-timeout", "60")
        assert rec.wait(lambda r: daemon.health.state()["enrolled"]["capture"] is not None, 10)
        rec.request("resume", b"{}", b"resume")
        assert rec.wait(lambda r: [lb["item_id"] for lb in labels_of(r)] == ["early"], 10)
        started = time.monotonic()
        trigger_items(rec, "belt", 3)
        last_item = time.monotonic()
        assert rec.wait(lambda r: daemon.health.state()["enrolled"]["products"] == 1, 10)
        answered = time.monotonic()  # in force: the device answers the command now
        out, err = tool.communicate(timeout=60)
        assert tool.returncode == 0, err
        assert f"enrolled {NEW} from 3 items on the belt" in out and "item belt-2:" in out, out
        [product] = store.products()
        assert (product.label, product.exemplars, product.source) == (NEW, 3, "belt")
        # every item was labelled as usual while it was captured: one label each, none enrolled yet
        captured = labels_of(rec)
        assert [lb["item_id"] for lb in captured] == ["early", "belt-0", "belt-1", "belt-2"]
        assert not any(lb.get("source") == "enrolled" for lb in captured)
        assert "item early" not in out

        # from now on the product is recognised on the belt
        next_trigger = time.monotonic()
        trigger_items(rec, "next", 1)
        first = time.monotonic()
        trigger_items(rec, "more", 2)
        after = labels_of(rec)[4:]
        assert all(lb["label"] == NEW and lb["source"] == "enrolled" for lb in after), after
        print(
            f"enroll --from-belt 3: 3 items labelled {last_item - started:.2f} s after the first trigger; in "
            f"force {answered - last_item:.2f} s after the last label; the next item's trigger to its "
            f"enrolled label {first - next_trigger:.2f} s"
        )
        assert daemon.health.state()["enrolled"]["products"] == 1
    finally:
        rec.close()
        daemon.shutdown()
    validate_recorded(rec, daemon.topic_base)


def cli_async(broker, *args: str) -> subprocess.Popen:
    command = [*args[:1], "--broker", f"127.0.0.1:{broker.port}", "--target", TARGET, *args[1:]]
    return subprocess.Popen(
        [sys.executable, "-m", "taxonedge", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ---- model updates keep enrollments ----------------------------------------------------------------------
TWIN = "Fruit/Apple/Red-Twin"  # enrolled from the very same photos as NEW: no model tells the two apart


def deploy(broker, bundle: Path) -> subprocess.CompletedProcess:
    """`taxonedge deploy` through the broker: the device's real update path (verify, self-test, switch,
    health window, commit or roll back)."""
    return subprocess.run(
        [sys.executable, "-m", "taxonedge", "deploy", str(bundle), "--broker", f"127.0.0.1:{broker.port}"]
        + ["--target", TARGET, "--timeout", "90"],
        capture_output=True,
        text=True,
        timeout=150,
    )


def vectors(store, model: str) -> dict[int, bytes]:
    """Every exemplar's stored embedding under `model`."""
    rows = store._db.execute("SELECT exemplar, vector FROM embedding WHERE model = ?", (model,)).fetchall()
    return dict(rows)


def enrolled_labels_of(rec: Recorder, sha256: str, start: int) -> list[dict]:
    return [
        lb
        for lb in labels_of(rec)[start:]
        if lb["model"]["sha256"] == sha256 and lb.get("source") == "enrolled"
    ]


@pytest.mark.slow
def test_model_updates_keep_enrolled_products_and_a_rollback_their_old_vectors(tmp_path, broker, line):
    a = write_tiny_bundle(tmp_path / "a.tebundle")
    b = write_tiny_bundle(tmp_path / "b.tebundle", seed=1, version="2")
    # a model whose every decision is unknown: its health window fails and the device rolls it back
    bad = write_tiny_bundle(tmp_path / "bad.tebundle", seed=2, version="3", thresholds={"depth_1": 1.0})
    sha = {name: read_bundle(path.read_bytes()).sha256 for name, path in [("a", a), ("b", b), ("bad", bad)]}
    rec = Recorder(broker.port)
    daemon = start(tmp_path, broker, a, line)
    store = daemon.pipeline.enrollment.store
    try:
        assert rec.wait(lambda r: len(labels_of(r)) >= 5)
        shots = photos(tmp_path / "p", NEW_INDEX, 5, 7)
        for label in (NEW, TWIN):
            proc = cli(broker, "enroll", "--label", label, *shots)
            assert proc.returncode == 0, proc.stderr
        problems = daemon.health.state()["enrolled"]["problems"]
        assert len(problems) == 2 and "look the same to this model" in problems[0], problems

        proc = deploy(broker, b)
        assert proc.returncode == 0 and "committed" in proc.stdout, proc.stdout + proc.stderr
        # the new model embedded every stored thumbnail before its first frame; the old vectors stay
        assert store.missing(sha["b"]) == [] and len(vectors(store, sha["a"])) == 10
        count = len(labels_of(rec))
        assert rec.wait(lambda r: len(enrolled_labels_of(r, sha["b"], count)) >= 3), "not recognised by b"
        assert all(lb["label"] in (NEW, TWIN) for lb in enrolled_labels_of(rec, sha["b"], count))
        # the products the new model does not tell apart are reported in stats
        assert rec.wait(
            lambda r: any(
                s["enrolled"]["problems"] and s["model"]["sha256"] == sha["b"]
                for s in r.on("stats")
                if isinstance(s, dict) and "enrolled" in s
            )
        )
        before = vectors(store, sha["b"])

        proc = deploy(broker, bad)
        assert proc.returncode == 1 and "rolled_back" in proc.stdout, proc.stdout + proc.stderr
        assert daemon.serving.bundle.sha256 == sha["b"]
        # the bad model had its own vectors made; b's were not touched, and serve again at once
        assert len(vectors(store, sha["bad"])) == 10 and vectors(store, sha["b"]) == before
        count = len(labels_of(rec))
        assert rec.wait(lambda r: len(enrolled_labels_of(r, sha["b"], count)) >= 3), "lost after rollback"
    finally:
        rec.close()
        daemon.shutdown()
    validate_recorded(rec, daemon.topic_base)


def test_a_model_without_embedding_or_enrollment_off_refuses_at_once(tmp_path, broker, new_product_video):
    v2 = write_tiny_bundle(tmp_path / "v2.tebundle", outputs="probabilities")
    shots = photos(tmp_path / "p", NEW_INDEX, 2, 3)
    for extra, words in [
        ("", "has no embedding output"),
        ("\n[enroll]\nenabled = false\n", "enrollment is off"),
    ]:
        rec = Recorder(broker.port)
        daemon = start_items(tmp_path, broker, v2, new_product_video, extra)
        try:
            rec.request("enroll", json.dumps({"label": NEW, "from_belt": 2}).encode(), b"belt")
            proc = cli(broker, "enroll", "--label", NEW, *shots)
            assert proc.returncode == 1 and words in proc.stderr, proc.stderr
            assert rec.wait(lambda r: b"belt" in answers(r), 10)
            assert words in answers(rec)[b"belt"]["error"]
            assert daemon.health.state()["enrolled"]["capture"] is None
            assert daemon.pipeline.enrollment.store.products() == []
        finally:
            rec.close()
            daemon.shutdown()
