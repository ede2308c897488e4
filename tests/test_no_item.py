"""No item (edge/service/noitem.py): the empty-belt detector on its own, then a real daemon on a real broker
with a real tiny v3 bundle that learns the empty belt from a looping image folder and keeps product labels
off the empty frames of a video, across restarts, model switches and both publish settings."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from taxonedge.edge.kernel.bundle import read_bundle
from taxonedge.edge.kernel.decode import Decision, Decoder
from taxonedge.edge.kernel.taxonomy import Taxonomy
from taxonedge.edge.service.config import NoItemConfig, load_config
from taxonedge.edge.service.daemon import Daemon
from taxonedge.edge.service.noitem import (
    REFERENCE_FILE,
    LearnError,
    NoItem,
    Reference,
    ReferenceError,
    decode_reference,
    encode_reference,
    unit,
)
from taxonedge.edge.service.source import Frame
from taxonedge.edge.service.trigger import ItemTrigger
from taxonedge.edge.tools.listen import format_label

from .conftest import TINY_LABELS, class_image, run_cli
from .daemonkit import REPLIES, Recorder, labels_of, validate_recorded, write_config
from .tinymodels import write_tiny_bundle

TAX = Taxonomy.from_paths(TINY_LABELS)
DIM = 16
APPLE = Decoder(TAX).decode(np.array([1.0, 0.0, 0.0, 0.0]))  # Fruit/Apple/Granny-Smith, with its levels


@dataclass
class FakeBundle:
    """What the detector reads of a bundle."""

    sha256: str
    embedding_size: int | None = DIM
    name: str = "fake"
    version: str = "1"
    taxonomy: Taxonomy = TAX

    @property
    def manifest(self) -> SimpleNamespace:
        spec = SimpleNamespace(size=self.embedding_size) if self.embedding_size else None
        return SimpleNamespace(embedding=spec)


A, B = FakeBundle("a" * 64), FakeBundle("b" * 64)
RNG = np.random.default_rng(0)
BELT = np.abs(RNG.normal(1.0, 0.2, DIM)).astype(np.float32)  # the empty belt's features


def empty(rng: np.random.Generator, noise: float = 0.02) -> np.ndarray:
    return np.abs(BELT + rng.normal(0, noise, DIM)).astype(np.float32)


def product(rng: np.random.Generator) -> np.ndarray:
    """A product lights up a few features of its own (similarity to the belt about 0.5)."""
    return (rng.random(DIM) * (rng.random(DIM) < 0.3) * 3 + 0.01).astype(np.float32)


def frame(captured: float | None = None) -> Frame:
    image = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    now = time.monotonic() if captured is None else captured
    return Frame(image, 0, now, time.time(), "test")


def learned(tmp_path: Path, count: int = 40, config: NoItemConfig | None = None, bundle=A) -> NoItem:
    """A detector that learned `count` empty frames for `bundle`."""
    detector = NoItem(config or NoItemConfig(), tmp_path)
    detector.serve(bundle)
    future = detector.learn(1.0)
    rng = np.random.default_rng(2)
    for _ in range(count):
        assert detector.judge(APPLE, empty(rng), frame(), bundle.sha256).reason == "no_item"
    detector.judge(APPLE, empty(rng), frame(time.monotonic() + 5), bundle.sha256)  # past the end: done
    assert future.done()
    return detector


# ---- the detector ---------------------------------------------------------------------------------
def test_threshold_comes_from_the_captured_empty_frames_only(tmp_path):
    config = NoItemConfig(margin=0.03, min_similarity=0.5)
    detector = NoItem(config, tmp_path)
    detector.serve(A)
    future = detector.learn(1.0)
    rng = np.random.default_rng(3)
    captured = [empty(rng) for _ in range(30)]
    for e in captured:
        detector.judge(APPLE, e, frame(), A.sha256)
    detector.judge(APPLE, product(rng), frame(time.monotonic() + 5), A.sha256)  # after the end: not used
    result = future.result(0)
    rows = np.stack([unit(e) for e in captured])
    sims = rows @ unit(rows.mean(axis=0))
    assert result["frames"] == 30 and result["thumbnails"] >= 1
    assert result["threshold"] == pytest.approx(sims.min() - 0.03, abs=2e-3)  # float16 storage
    assert result["similarity"]["min"] == pytest.approx(sims.min(), abs=2e-3)
    assert result["below_threshold"] == 0
    report = detector.report()
    assert report["active"] and report["not_active"] is None and report["reference"]["frames"] == 30
    # the floor clamps a threshold from a belt that varies too much, and the answer says so
    varied = learned(tmp_path / "v", config=NoItemConfig(margin=0.0, min_similarity=0.9999))
    assert varied.report()["reference"]["threshold"] == 0.9999


def test_a_frame_close_to_the_empty_belt_is_no_item_a_product_is_not(tmp_path):
    detector = learned(tmp_path)
    rng = np.random.default_rng(4)
    frames_before = detector.frames
    for _ in range(50):
        no_item = detector.judge(APPLE, empty(rng), frame(), A.sha256)
        assert no_item.decision == "unknown" and no_item.reason == "no_item" and no_item.label is None
        assert detector.judge(APPLE, product(rng), frame(), A.sha256) is APPLE
    assert detector.frames == frames_before + 50
    # another model's embedding is never compared with this model's reference
    assert detector.judge(APPLE, empty(rng), frame(), B.sha256) is APPLE
    assert detector.judge(APPLE, None, frame(), A.sha256) is APPLE  # no embedding: no comparison


def test_background_label_is_no_item_at_and_under_the_node(tmp_path):
    detector = NoItem(NoItemConfig(background_label="Fruit/Apple"), tmp_path)
    detector.serve(A)
    pink = Decision("accepted", "Fruit/Apple/Pink-Lady", ("Fruit", "Apple", "Pink-Lady"), (), ())
    apple = Decision("backed-off", "Fruit/Apple", ("Fruit", "Apple"), (), ())
    avocado = Decision("accepted", "Fruit/Avocado", ("Fruit", "Avocado"), (), ())
    assert detector.judge(pink, None, frame(), A.sha256).reason == "no_item"
    assert detector.judge(apple, None, frame(), A.sha256).reason == "no_item"
    assert detector.judge(avocado, None, frame(), A.sha256) is avocado
    assert detector.reason() is None
    unknown_node = NoItem(NoItemConfig(background_label="Background"), tmp_path)
    unknown_node.serve(A)
    assert "'Background' is not a label" in unknown_node.reason()


def test_reference_round_trip_and_restart(tmp_path):
    detector = learned(tmp_path)
    data = (tmp_path / REFERENCE_FILE).read_bytes()
    ref = decode_reference(data)
    assert ref.bundle_sha256 == A.sha256 and ref.embeddings.shape == (40, DIM)
    assert all(t[:2] == b"\xff\xd8" for t in ref.thumbnails)
    again = decode_reference(encode_reference(ref))
    assert np.array_equal(again.embeddings, ref.embeddings) and again.thumbnails == ref.thumbnails
    restarted = NoItem(NoItemConfig(), tmp_path)
    restarted.load()
    restarted.serve(A)
    assert restarted.report()["reference"] == detector.report()["reference"]
    assert restarted.judge(APPLE, empty(np.random.default_rng(5)), frame(), A.sha256).reason == "no_item"


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],
        lambda data: b"not a zip at all",
        lambda data: b"",
        lambda data: encode_reference(Reference(np.full((3, DIM), np.nan, np.float32), (), "a" * 64, "")),
    ],
)
def test_a_damaged_reference_is_reported_and_ignored(tmp_path, damage):
    learned(tmp_path)
    path = tmp_path / REFERENCE_FILE
    path.write_bytes(damage(path.read_bytes()))
    detector = NoItem(NoItemConfig(), tmp_path)
    detector.load()  # never raises
    detector.serve(A)
    assert "damaged" in detector.reason() and "learn_empty" in detector.reason()
    assert detector.report()["active"] is False and detector.report()["reference"] is None
    assert detector.judge(APPLE, empty(np.random.default_rng(6)), frame(), A.sha256) is APPLE
    # learning again replaces it and clears the reason
    again = learned(tmp_path)
    assert again.reason() is None and again.report()["active"]
    with pytest.raises(ReferenceError):
        decode_reference(b"PK\x03\x04garbage")


def test_a_model_switch_re_embeds_the_thumbnails_and_stores_them(tmp_path):
    detector = learned(tmp_path)
    assert not detector.needs_embedding(A)
    detector.serve(B)
    assert detector.report()["active"] is False and detector.needs_embedding(B)
    assert "re-embedded" in detector.report()["not_active"]
    calls = []

    def embed(image: np.ndarray) -> np.ndarray:  # model B sees the empty belt as something else entirely
        calls.append(image.shape)
        return np.abs(empty(np.random.default_rng(len(calls))) * -1 + 3)

    detector.reembed(B, embed)
    assert 1 <= len(calls) <= 16 and calls[0] == (48, 64, 3)
    assert detector.report()["active"] and detector.report()["reference"]["bundle_sha256"] == B.sha256
    assert decode_reference((tmp_path / REFERENCE_FILE).read_bytes()).bundle_sha256 == B.sha256
    belt_b = np.abs(empty(np.random.default_rng(99)) * -1 + 3)
    assert detector.judge(APPLE, belt_b, frame(), B.sha256).reason == "no_item"
    # a model without an embedding output: detection off, with the reason in status
    v2 = FakeBundle("c" * 64, embedding_size=None, name="old", version="7")
    detector.serve(v2)
    assert not detector.needs_embedding(v2)
    assert "old 7 has no embedding output" in detector.reason()
    with pytest.raises(LearnError, match="no embedding output"):
        detector.learn(5)


def test_a_failed_re_embedding_is_reported_and_not_retried(tmp_path):
    detector = learned(tmp_path)
    detector.serve(B)

    def broken(image: np.ndarray) -> np.ndarray:
        raise RuntimeError("inference worker died")

    detector.reembed(B, broken)
    assert "re-embedding" in detector.reason() and not detector.needs_embedding(B)
    assert detector.judge(APPLE, empty(np.random.default_rng(7)), frame(), B.sha256) is APPLE


def test_learning_needs_frames_and_ends_once(tmp_path):
    detector = NoItem(NoItemConfig(), tmp_path)
    detector.serve(A)
    future = detector.learn(1.0)
    with pytest.raises(LearnError, match="already running"):
        detector.learn(1.0)
    assert detector.report()["learning"]["frames"] == 0
    for _ in range(3):
        detector.judge(APPLE, empty(RNG), frame(), A.sha256)
    detector._learning.until = time.monotonic() - 3  # its frames stopped coming: the health thread ends it
    detector.expire()
    with pytest.raises(LearnError, match="only 3 frames"):
        future.result(0)
    assert detector.report()["reference"] is None and not (tmp_path / REFERENCE_FILE).exists()
    stopped = detector.learn(1.0)
    detector.cancel("the daemon stopped")
    with pytest.raises(LearnError, match="the daemon stopped"):
        stopped.result(0)
    switched = detector.learn(1.0)
    detector.serve(B)  # embeddings of two models never mix
    with pytest.raises(LearnError, match="the model changed"):
        switched.result(0)
    off = NoItem(NoItemConfig(enabled=False), tmp_path)
    off.serve(A)
    with pytest.raises(LearnError, match="enabled = false"):
        off.learn(1.0)
    assert off.judge(APPLE, empty(RNG), frame(), A.sha256) is APPLE


def test_forget_drops_the_reference_and_its_file(tmp_path):
    detector = learned(tmp_path)
    assert detector.forget() == {"forgotten": True}
    assert not (tmp_path / REFERENCE_FILE).exists() and detector.report()["reference"] is None
    assert detector.judge(APPLE, empty(RNG), frame(), A.sha256) is APPLE
    assert detector.forget() == {"forgotten": False}


def test_an_item_whose_frames_are_mostly_no_item_says_no_item():
    no_item = Decision("unknown", None, (), (), (), reason="no_item")
    trigger = ItemTrigger(TAX, 5, 0.6, 5.0)
    trigger.trigger("box-1")
    assert trigger.want_frame() == "box-1"
    results = [trigger.add("box-1", d) for d in (no_item, no_item, no_item, APPLE, APPLE)]
    assert results[-1].decision.decision == "unknown" and results[-1].reason == "no_item"
    trigger.trigger("box-2")
    trigger.want_frame()
    results = [trigger.add("box-2", d) for d in (no_item, no_item, APPLE, APPLE, APPLE)]
    assert results[-1].decision.label == APPLE.label  # an item always gets its label


def test_listen_tells_no_item_apart():
    line = format_label({"path": [], "decision": "unknown", "reason": "no_item", "levels": [], "seq": 3})
    assert "(no item)" in line and "unknown" in line


def test_empty_belt_refuses_bad_arguments_before_connecting():
    for args, words in (
        (["--seconds", "0"], "from 1 to 600"),
        (["--seconds", "601"], "from 1 to 600"),
        (["--target", "groups/line-3"], "SITE/LINE/DEVICE"),
        (["--target", "plant/+/dev1"], "SITE/LINE/DEVICE"),
    ):
        argv = ["empty-belt", "--broker", "127.0.0.1:1", "--target", TARGET, *args]
        proc = run_cli(*argv, check=False, timeout=60)
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr)
    proc = run_cli("empty-belt", "--broker", "127.0.0.1:1", "--target", TARGET, check=False, timeout=60)
    assert proc.returncode == 1 and "cannot connect" in proc.stderr


# ---- a real daemon --------------------------------------------------------------------------------
EMPTY_RUN, PRODUCT_RUN = 6, 4
TARGET = "plant/line1/dev1"


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "taxonedge", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def belt_image(rng: np.random.Generator) -> np.ndarray:
    """The tiny classes' background without a product: the empty belt."""
    return rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("bundles")
    return write_tiny_bundle(folder / "a.tebundle"), write_tiny_bundle(
        folder / "b.tebundle", seed=1, version="2"
    )


@pytest.fixture
def empty_belt(tmp_path) -> Path:
    import cv2

    folder = tmp_path / "empty"
    folder.mkdir()
    rng = np.random.default_rng(11)
    for i in range(12):
        cv2.imwrite(str(folder / f"{i:03d}.jpg"), belt_image(rng))
    return folder


@pytest.fixture
def line_video(tmp_path) -> tuple[Path, list[bool]]:
    """A belt video: runs of empty belt between products of every class; and per frame: a product?"""
    import cv2

    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 20, (64, 64))
    rng = np.random.default_rng(12)
    truth: list[bool] = []
    for k in range(2 * len(TINY_LABELS)):
        for _ in range(EMPTY_RUN):
            writer.write(belt_image(rng))
            truth.append(False)
        for _ in range(PRODUCT_RUN):
            writer.write(class_image(k % len(TINY_LABELS), rng))
            truth.append(True)
    writer.release()
    return path, truth


def answers(rec: Recorder) -> dict[bytes, dict]:
    return {getattr(p, "CorrelationData", None): m for t, m, p in rec.messages if t == REPLIES}


def run_daemon(tmp_path: Path, broker, bundle: Path, source: str, no_item: str) -> Daemon:
    extra = f"\n[no_item]\nmargin = 0.02\n{no_item}\n"
    cfg = write_config(
        tmp_path / f"c{time.monotonic_ns()}.toml", broker, bundle, source, tmp_path / "st", extra
    )
    daemon = Daemon(load_config(cfg))
    daemon.start()
    assert daemon.link.connected.wait(10)
    return daemon


def learn_from_the_empty_belt(tmp_path: Path, broker, bundles, empty_belt: Path) -> dict:
    """A daemon on the looping empty belt: bad requests refused, learn_empty answered, then no product."""
    rec = Recorder(broker.port)
    source = f'type = "folder"\npath = "{empty_belt}"\nloop = true\npacing = "realtime"\nfps = 30'
    daemon = run_daemon(tmp_path, broker, bundles[0], source, "")
    try:
        assert rec.wait(lambda r: len(labels_of(r)) >= 2)
        bad = {
            b"b1": b"{}",
            b"b2": b'{"seconds": 0}',
            b"b3": b'{"seconds": "30"}',
            b"b4": b'{"seconds": true}',
            b"b5": b'{"seconds": 601}',
            b"b6": b'{"seconds": 5, "colour": "grey"}',
            b"b7": b"[1]",
        }
        for corr, payload in bad.items():
            rec.request("learn_empty", payload, corr)
        rec.request("forget_empty", b'{"now": true}', b"b8")
        # the operator's command, as a subprocess: it sends learn_empty and waits for the answer
        tool = cli(
            "empty-belt", "--broker", f"127.0.0.1:{broker.port}", "--target", TARGET, "--seconds", "1.5"
        )
        assert rec.wait(lambda r: daemon.noitem.learning, 10)
        rec.request("learn_empty", b'{"seconds": 1.5}', b"again")
        out, err = tool.communicate(timeout=30)
        assert tool.returncode == 0, err
        got = answers(rec)
        for corr in [*bad, b"b8"]:
            assert got[corr]["ok"] is False, got[corr]
        assert "seconds" in got[b"b1"]["error"] and "unknown keys" in got[b"b6"]["error"]
        assert "already running" in got[b"again"]["error"]
        assert "learned the empty belt from" in out and "threshold" in out, out
        learn = daemon.health.state()["no_item"]["reference"]
        assert learn["frames"] >= 10 and -1 <= learn["threshold"] <= 1
        # from now on the empty belt is no item: published as such (publish = "event"), never a product
        count = len(labels_of(rec))
        assert rec.wait(lambda r: len(labels_of(r)) >= count + 5)
        assert all(lb["reason"] == "no_item" and lb["label"] is None for lb in labels_of(rec)[count:])
        # a model switch: the thumbnails are re-embedded with the new model before its first frame
        new = read_bundle(bundles[1])
        daemon.switch_model(new).result(60)
        count = len(labels_of(rec))
        assert rec.wait(lambda r: len(labels_of(r)) >= count + 5)
        state = daemon.health.state()
        assert state["no_item"]["active"] and state["no_item"]["reference"]["bundle_sha256"] == new.sha256
        after = [lb for lb in labels_of(rec)[count:] if lb["model"]["sha256"] == new.sha256]
        assert after and all(lb["reason"] == "no_item" for lb in after)
        assert not any(lb.get("reason") == "no_item" for lb in labels_of(rec)[:2])  # before learning
        assert state["no_item_frames"] >= 10 and state["no_item_withheld"] == 0
    finally:
        rec.close()
        daemon.shutdown()
    validate_recorded(rec, daemon.topic_base)
    return learn


def classify_the_line(
    tmp_path: Path, broker, bundle: Path, video: Path, no_item: str, forget: bool = False
) -> tuple[list, dict]:
    """A daemon started afresh on the line video (every frame classified, in order): labels, final state.
    `forget`: then `taxonedge empty-belt --forget`, which the control thread still answers."""
    rec = Recorder(broker.port)
    source = f'type = "video"\npath = "{video}"\npacing = "fast"'
    daemon = run_daemon(tmp_path, broker, bundle, source, no_item)
    try:
        daemon.threads[0].join(60)  # the inference thread ends with the video
        assert not daemon.threads[0].is_alive()
        state = daemon.health.state()
        assert rec.wait(lambda r: len(labels_of(r)) >= state["labels"])
        if forget:
            tool = cli("empty-belt", "--broker", f"127.0.0.1:{broker.port}", "--target", TARGET, "--forget")
            out, err = tool.communicate(timeout=30)
            assert tool.returncode == 0 and "forgot its empty belt" in out, (out, err)
            assert daemon.health.state()["no_item"]["reference"] is None
            assert not (tmp_path / "st" / REFERENCE_FILE).exists()
        return labels_of(rec), state
    finally:
        rec.close()
        daemon.shutdown()


def test_a_daemon_learns_the_empty_belt_and_keeps_product_labels_off_it(
    tmp_path, broker, bundles, empty_belt, line_video
):
    learn_from_the_empty_belt(tmp_path, broker, bundles, empty_belt)
    video, truth = line_video
    # restarted on the first model: the stored reference (re-embedded for the second) is re-embedded again
    labels, state = classify_the_line(tmp_path, broker, bundles[0], video, 'publish = "event"')
    assert state["no_item"]["active"], state["no_item"]
    assert state["no_item"]["reference"]["bundle_sha256"] == read_bundle(bundles[0]).sha256
    assert len(labels) == len(truth) == state["frames_classified"]
    on_empty = [lb for lb, is_product in zip(labels, truth, strict=True) if not is_product]
    on_products = [lb for lb, is_product in zip(labels, truth, strict=True) if is_product]
    assert all(lb["label"] is None and lb["reason"] == "no_item" for lb in on_empty)
    assert not any(lb.get("reason") == "no_item" for lb in on_products)
    assert sum(lb["label"] is not None for lb in on_products) >= 0.9 * len(on_products)
    assert state["no_item_frames"] == len(on_empty) and state["no_item_withheld"] == 0

    labels, state = classify_the_line(tmp_path, broker, bundles[0], video, 'publish = "none"', forget=True)
    assert len(labels) == sum(truth) and not any(lb.get("reason") == "no_item" for lb in labels)
    # every classified frame is accounted for: published, or counted as withheld
    assert state["labels"] + state["no_item_withheld"] == state["frames_classified"] == len(truth)
    assert state["no_item_withheld"] == len(truth) - sum(truth)
