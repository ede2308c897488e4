"""`taxonedge evaluate --belt`: a real belt video (OpenCV) with its truth JSON, scored with a real tiny v3
bundle, checked against the daemon's own empty-belt detector (edge/service/noitem.py) on the same frames."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from taxonedge.edge.kernel.bundle import read_bundle
from taxonedge.edge.kernel.preprocess import preprocess
from taxonedge.edge.kernel.runtime import Classifier
from taxonedge.edge.service.config import NoItemConfig
from taxonedge.edge.service.noitem import NoItem
from taxonedge.edge.service.source import Frame
from taxonedge.train.evaluate import bundle_decoder

from .conftest import TINY_LABELS, class_image, run_cli
from .test_no_item import belt_image
from .tinymodels import write_tiny_bundle

LEAD_IN, PRODUCT_RUN, GAP, FPS = 12, 4, 5, 10
MARGIN = "0.02"  # the tiny model's 8 features: a product is about 0.93 similar to its belt (default 0.1)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("belt") / "tiny.tebundle")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, dict]:
    """An empty-belt lead-in, then each class twice for PRODUCT_RUN frames with GAP empty frames after it;
    its truth beside it."""
    path = tmp_path_factory.mktemp("clip") / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (64, 64))
    rng = np.random.default_rng(21)
    product: list[str | None] = []
    for _ in range(LEAD_IN):
        writer.write(belt_image(rng))
        product.append(None)
    for k in range(2 * len(TINY_LABELS)):
        for _ in range(PRODUCT_RUN):
            writer.write(class_image(k % len(TINY_LABELS), rng))
            product.append(TINY_LABELS[k % len(TINY_LABELS)])
        for _ in range(GAP):
            writer.write(belt_image(rng))
            product.append(None)
    writer.release()
    truth = {"fps": FPS, "lead_in": LEAD_IN, "product": product}
    write_truth(path, truth)
    return path, truth


def write_truth(clip: Path, truth: dict) -> None:
    clip.with_suffix(".json").write_text(json.dumps(truth))


def evaluate(bundle: Path, clip: Path, out: Path, *extra: str, check: bool = True):
    return run_cli(
        "evaluate", "--bundle", str(bundle), "--belt", str(clip), "--out", str(out), *extra, check=check
    )


def frames_of(clip: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(clip))
    frames = []
    while (got := cap.read())[0]:
        frames.append(got[1])
    return frames


def per_frame(out: Path) -> list[dict]:
    with (out / "frames.csv").open() as f:
        return list(csv.DictReader(f))


def the_daemons_labels(bundle_path: Path, clip: Path, margin: float) -> tuple[float, list[str | None]]:
    """The daemon's NoItem learning the lead-in's embeddings, then judging every later frame as the
    pipeline does (the decoder's decision first): its threshold and the labels it publishes."""
    bundle = read_bundle(bundle_path)
    classifier, decoder = Classifier(bundle), bundle_decoder(bundle)
    outputs = [classifier.outputs(preprocess(f, bundle.manifest.input)) for f in frames_of(clip)]
    detector = NoItem(NoItemConfig(margin=margin), Path("/nonexistent"))
    detector._store = lambda ref: None  # noqa: SLF001 - nothing to keep: only the decision is compared
    detector.serve(bundle)
    learned = detector.learn(60)
    now = time.monotonic()
    image = np.zeros((8, 8, 3), np.uint8)
    for scores, embedding in outputs[:LEAD_IN]:
        detector.judge(decoder.decode(scores), embedding, Frame(image, 0, now, 0.0, "lead-in"), bundle.sha256)
    later = Frame(image, 0, now + 120, 0.0, "later")  # past the learning's end: it finishes on the first
    labels = [detector.judge(decoder.decode(s), e, later, bundle.sha256).label for s, e in outputs[LEAD_IN:]]
    return learned.result(0)["threshold"], labels


def test_a_clip_whose_products_differ_from_the_belt(bundle, clip, tmp_path):
    path, truth = clip
    out = tmp_path / "eval"
    proc = evaluate(bundle, path, out, "--no-item-margin", MARGIN)
    belt = json.loads((out / "metrics.json").read_text())["belt"]
    between, products = belt["between_products"], belt["product"]
    assert between["frames"] == 8 * GAP and products["frames"] == 8 * PRODUCT_RUN
    assert belt["partly_visible"]["frames"] == 0 and belt["learned"]["frames"] == LEAD_IN
    assert between["published_as_product"] == 0.0 and products["still_labelled"] == 1.0
    assert belt["goals"]["met"] and belt["learned"]["margin"] == 0.02
    assert "0.0 % published as a product" in proc.stdout and "100.0 % still labelled" in proc.stdout
    assert "0.0 % published as a product" in (out / "report.md").read_text()
    # frame by frame what the daemon's own detector publishes, learned from the same lead-in
    threshold, labels = the_daemons_labels(bundle, path, 0.02)
    rows = per_frame(out)
    assert belt["learned"]["threshold"] == threshold
    assert [r["published"] or None for r in rows] == labels
    # right: the truth's leaf or a parent on its path, over all product frames
    right = [
        r["published"] != "" and truth["product"][int(r["frame"])].startswith(r["published"])
        for r in rows
        if truth["product"][int(r["frame"])] is not None
    ]
    assert products["labelled_right"] == pytest.approx(sum(right) / len(right))
    assert products["labelled_right"] >= 0.5  # the tiny model tells its classes apart


def test_the_device_defaults_take_the_tiny_products_for_empty_belt(bundle, clip, tmp_path):
    """With the default margin the tiny model's products are as close to the belt as the threshold allows:
    the figure says so, and the goal is not met."""
    path, _ = clip
    out = tmp_path / "eval"
    proc = evaluate(bundle, path, out)
    belt = json.loads((out / "metrics.json").read_text())["belt"]
    threshold, labels = the_daemons_labels(bundle, path, NoItemConfig().margin)
    assert belt["learned"]["threshold"] == threshold and belt["learned"]["margin"] == NoItemConfig().margin
    labelled = [label is not None for label, row in zip(labels, per_frame(out), strict=True) if row["truth"]]
    assert belt["product"]["still_labelled"] < 0.99 and belt["product"]["with_a_label"] == pytest.approx(
        sum(labelled) / len(labelled)
    )
    assert not belt["goals"]["met"] and "empty-belt goals NOT met" in proc.stdout


def test_product_frames_marked_empty_count_as_published_between_products(bundle, clip, tmp_path):
    """The same clip, its truth saying the first product's frames are empty belt and the last product
    frame of every run partly visible (coverage 0.3)."""
    path, truth = clip
    first = truth["product"].index(TINY_LABELS[0])
    wrong = [None if first <= i < first + PRODUCT_RUN else p for i, p in enumerate(truth["product"])]
    coverage = [
        0.0 if p is None else 0.3 if i + 1 == len(wrong) or wrong[i + 1] != p else 1.0
        for i, p in enumerate(wrong)
    ]
    moved = tmp_path / "line.avi"
    moved.write_bytes(path.read_bytes())
    write_truth(moved, {**truth, "product": wrong, "coverage": coverage})
    out = tmp_path / "eval"
    evaluate(bundle, moved, out, "--no-item-margin", MARGIN)
    belt = json.loads((out / "metrics.json").read_text())["belt"]
    rows = per_frame(out)
    published = sum(rows[i - LEAD_IN]["published"] != "" for i in range(first, first + PRODUCT_RUN))
    assert published >= 1
    assert belt["between_products"]["frames"] == 8 * GAP + PRODUCT_RUN
    assert belt["between_products"]["published_as_product"] == pytest.approx(
        published / (8 * GAP + PRODUCT_RUN)
    )
    assert belt["partly_visible"]["frames"] == 7 and belt["product"]["frames"] == 7 * (PRODUCT_RUN - 1)
    assert not belt["goals"]["met"]


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda t: {**t, "lead_in": 5}, "lead_in must be a whole number of frames, at least 10"),
        (lambda t: {**t, "lead_in": True}, "lead_in must be"),
        (lambda t: {**t, "fps": 0}, "fps must be a positive number"),
        (lambda t: {**t, "fps": 25}, "runs at 10 fps, its truth"),
        (lambda t: {k: v for k, v in t.items() if k != "product"}, "no product"),
        (lambda t: {**t, "leadin": 12}, "unknown key(s) leadin"),
        (lambda t: {**t, "product": "Fruit/Avocado"}, "product must be a list"),
        (lambda t: {**t, "product": [*t["product"][:-1], 3]}, "must be a label path or null, not 3"),
        (lambda t: {**t, "product": ["Fruit/Avocado", *t["product"][1:]]}, "inside the lead-in"),
        (lambda t: {**t, "product": t["product"][:-1]}, "describes 83"),
        (lambda t: {**t, "product": [*t["product"], None]}, "describes 85"),
        (
            lambda t: {**t, "product": [*t["product"][:-1], "Fruit/Kiwi"]},
            "not leaves of the model's taxonomy",
        ),
        (lambda t: {**t, "coverage": [0.0] * len(t["product"])}, "coverage is 0 exactly on the empty belt"),
        (lambda t: {**t, "coverage": [0.5]}, "coverage must be a list as long as product"),
        (lambda t: [t], "must be a JSON object"),
        (lambda t: None, "no truth file"),
        (lambda t: "{", "not a readable JSON truth file"),
    ],
)
def test_a_bad_truth_file_is_refused_with_one_line(bundle, clip, tmp_path, change, says):
    path, truth = clip
    moved = tmp_path / "line.avi"
    moved.write_bytes(path.read_bytes())
    bad = change(truth)
    if isinstance(bad, str):
        moved.with_suffix(".json").write_text(bad)
    elif bad is not None:
        write_truth(moved, bad)
    proc = evaluate(bundle, moved, tmp_path / "eval", "--no-item-margin", MARGIN, check=False)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_belt_needs_a_bundle_with_an_embedding(clip, tmp_path):
    path, _ = clip
    v2 = write_tiny_bundle(tmp_path / "v2.tebundle", outputs="probabilities")
    proc = evaluate(v2, path, tmp_path / "eval", check=False)
    assert proc.returncode == 2 and "has no embedding output" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli(
        "evaluate", "--model", str(tmp_path), "--belt", str(path), "--out", str(tmp_path), check=False
    )
    assert proc.returncode == 2 and "pass a --bundle, not --model" in proc.stderr
