"""Enrolled products: the prototype match and its merge rule, and the durable store on the device."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from taxonedge.edge.kernel.prototypes import (
    EmbeddingSpace,
    PrototypeIndex,
    fit_whitening,
    normalise,
    overlaps,
    prototype,
)
from taxonedge.edge.kernel.taxonomy import Taxonomy
from taxonedge.edge.service.enrolled import EnrolledStore, EnrollError, check_label

from .conftest import TINY_LABELS

TAX = Taxonomy.from_paths(TINY_LABELS)
RNG = np.random.default_rng(0)
DIM = 16


def near(center: np.ndarray, n: int, spread: float = 0.1) -> np.ndarray:
    return center + spread * RNG.normal(size=(n, DIM))


def test_a_frame_matches_the_nearest_prototype_only_when_close_and_nearer_than_its_trained_class():
    a, b, trained = (normalise(RNG.normal(size=DIM)) for _ in range(3))
    centroids = np.stack([trained, -trained, trained, trained])
    index = PrototypeIndex(
        ["New/A", "New/B"],
        np.stack([prototype(near(a, 5)), prototype(near(b, 5))]),
        EmbeddingSpace(None, centroids),  # a bundle without whitening: raw cosine, as before
        min_similarity=0.6,
        margin=0.05,
    )
    match = index.match(a + 0.05 * RNG.normal(size=DIM), leaf_scores=np.eye(4)[0])
    assert match is not None and match.label == "New/A" and match.similarity > 0.9
    assert (
        index.match(normalise(RNG.normal(size=DIM)), leaf_scores=np.eye(4)[0]) is None
    )  # far from every product
    # a frame of the trained class itself: closer to its centroid than to any prototype -> the model decides
    assert index.match(trained + 0.3 * a, leaf_scores=np.eye(4)[0]) is None
    assert PrototypeIndex([], np.zeros((0, DIM))).match(a) is None


def test_an_enrolled_product_must_beat_every_trained_class_the_model_ranks_near_the_top():
    # a frame of trained class 2 that the model ranked second, after class 0, and that resembles an
    # enrolled product: beating class 0's centroid is not enough, class 2's is nearer
    x, y, z, w = np.eye(DIM)[:4]
    centroids = np.stack([z, w, x, -x])
    product = normalise(x + 0.6 * y)
    frame = x + 0.2 * y
    scores = np.array([3.0, 0.5, 2.5, 0.1])  # logits: class 0 first, class 2 second

    def index(rivals: int) -> PrototypeIndex:
        space = EmbeddingSpace(None, centroids)
        return PrototypeIndex(["New/A"], product[None], space, min_similarity=0.2, margin=0.02, rivals=rivals)

    assert index(1).match(frame, scores) is not None  # only the model's first pick: the product steals it
    assert index(2).match(frame, scores) is None  # its own class, ranked second, is nearer
    # a new product's frame beats all of them and is matched either way
    match = index(2).match(product + 0.05 * y, scores)
    assert (
        match is not None
        and match.trained_similarity is not None
        and match.similarity > match.trained_similarity
    )


def test_the_whitening_makes_the_within_class_spread_isotropic():
    # classes that vary mostly along a few shared directions (pose, light): the whitened residuals have
    # about the same variance in every direction
    dim, classes, per_class = 24, 12, 40
    rng = np.random.default_rng(1)
    strong = np.linalg.qr(rng.normal(size=(dim, 3)))[0]
    means = 3 * rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    spread = rng.normal(size=(len(labels), 3)) * [2.0, 1.5, 1.0] @ strong.T + 0.1 * rng.normal(
        size=(len(labels), dim)
    )
    vectors = means[labels] + 0.1 * spread
    whitening = fit_whitening(vectors, labels, rank=8, shrinkage=0.01)
    assert whitening is not None and whitening.basis.shape == (dim, 8)

    def within_variances(z: np.ndarray) -> np.ndarray:
        residuals = z - np.stack([z[labels == c].mean(axis=0) for c in range(classes)])[labels]
        return np.linalg.eigvalsh(residuals.T @ residuals / len(z))

    before = within_variances(normalise(vectors))
    after = within_variances(whitening.apply(vectors))
    assert before[-1] / np.median(before) > 50  # a few directions dominate
    assert after[-1] / np.median(after) < 5  # whitened: none stands out (sampling noise spreads them)
    np.testing.assert_allclose(np.linalg.norm(whitening.apply(vectors), axis=1), 1.0, atol=1e-5)
    # one image per class measures no spread: no whitening, the bundle keeps raw cosine
    assert fit_whitening(vectors[::per_class], labels[::per_class]) is None


def test_in_the_whitened_space_a_new_product_wins_against_the_trained_class_it_resembles():
    # a trained class and a new product that differ along a direction the trained photos hardly vary in,
    # while every class varies a lot along a shared nuisance direction: raw cosine sees the nuisance,
    # the whitened space the difference
    dim, rng = 16, np.random.default_rng(2)
    base, nuisance, detail = np.eye(dim)[0], np.eye(dim)[1], np.eye(dim)[2]
    others = [normalise(rng.normal(size=dim)) for _ in range(3)]

    def photos(center: np.ndarray, n: int) -> np.ndarray:
        return center + 0.5 * rng.normal(size=(n, 1)) * nuisance + 0.01 * rng.normal(size=(n, dim))

    trained, new = base, base + 0.12 * detail
    train = np.concatenate([photos(c, 30) for c in [trained, *others]])
    labels = np.repeat(np.arange(4), 30)
    whitening = fit_whitening(train, labels)
    assert whitening is not None
    raw, white = EmbeddingSpace(None, np.stack([prototype(train[labels == c]) for c in range(4)])), None
    white = EmbeddingSpace(
        whitening, np.stack([EmbeddingSpace(whitening).prototype(train[labels == c]) for c in range(4)])
    )
    exemplars, frames = photos(new, 5), photos(new, 50)

    def recognised(space: EmbeddingSpace) -> float:
        index = PrototypeIndex(["New/A"], space.prototype(exemplars)[None], space, 0.0, 0.0)
        return np.mean([index.match(f, leaf_scores=np.eye(4)[0]) is not None for f in frames])

    assert recognised(white) > 0.9 and recognised(white) > recognised(raw) + 0.3


def test_products_the_model_does_not_tell_apart_are_named_with_what_they_look_like():
    a, b, trained = (normalise(RNG.normal(size=DIM)) for _ in range(3))
    centroids = np.stack(
        [trained, -trained, normalise(RNG.normal(size=DIM)), normalise(RNG.normal(size=DIM))]
    )
    space, leaves = EmbeddingSpace(None, centroids), TAX.leaf_labels
    # two distinct products, each far from every trained leaf: nothing to report
    assert overlaps({"New/A": near(a, 5), "New/B": near(b, 5)}, space, leaves) == []
    # the same photos under two names: both reported, each naming the other
    twin = near(a, 5)
    problems = overlaps({"New/A": twin, "New/Twin": twin.copy(), "New/B": near(b, 5)}, space, leaves)
    assert len(problems) == 2 and "New/A and New/Twin look the same" in problems[0], problems
    # a product whose photos sit on a trained leaf's centroid: named with that leaf; one photo is enough
    problems = overlaps({"New/C": near(trained, 3, 0.02), "New/D": near(b, 1)}, space, leaves)
    assert problems == [problems[0]] and f"the trained {leaves[0]}" in problems[0], problems


@pytest.mark.parametrize(
    ("label", "why"),
    [
        ("Fruit/Apple/Granny-Smith", "trained class"),
        ("Fruit/Apple", "trained branch"),
        ("Fruit/Avocado/Hass", "is a trained product, not a branch"),
        ("", "a path like"),
        ("Fruit//X", "non-empty names"),
        (3, "a path like"),
    ],
)
def test_labels_that_collide_with_or_break_the_taxonomy_are_refused(label, why):
    with pytest.raises(EnrollError, match=why):
        check_label(label, TAX)


def test_new_branches_and_new_products_under_a_trained_branch_are_allowed():
    assert check_label(" Fruit / Apple / Red-Delicious ", TAX) == "Fruit/Apple/Red-Delicious"
    assert check_label("Packages/Milk/New-Brand", TAX) == "Packages/Milk/New-Brand"


def test_store_adds_lists_renames_removes_and_refuses_without_half_storing(tmp_path: Path):
    store = EnrolledStore(tmp_path / "enrolled.db")
    vectors = near(normalise(RNG.normal(size=DIM)), 3)
    store.add("New/A", [b"jpeg1", b"jpeg2", b"jpeg3"], vectors, "model-1", "photos")
    with pytest.raises(EnrollError, match="already enrolled"):
        store.add("New/A", [b"x"], vectors[:1], "model-1", "photos")
    with pytest.raises(EnrollError, match="at least one readable photo"):
        store.add("New/B", [], np.zeros((0, DIM)), "model-1", "photos")
    with pytest.raises(
        np.exceptions.AxisError
    ):  # a failure inside the transaction leaves nothing of New/C behind
        store.add("New/C", [b"a", b"b"], [vectors[0], None], "model-1", "photos")  # type: ignore[arg-type]
    assert [(p.label, p.exemplars, p.source) for p in store.products()] == [("New/A", 3, "photos")]
    store.rename("New/A", "New/A2")
    with pytest.raises(EnrollError, match="not enrolled"):
        store.rename("New/A", "New/X")
    assert len(store.index("model-1", None, 0.5, 0.0)) == 1 and store.index(
        "model-1", None, 0.5, 0.0
    ).labels == ["New/A2"]
    store.remove("New/A2")
    assert store.products() == [] and store.thumbnails() == []
    with pytest.raises(EnrollError, match="not enrolled"):
        store.remove("New/A2")


def test_a_new_model_embeds_the_thumbnails_again_and_the_old_vectors_stay_for_a_rollback(tmp_path: Path):
    store = EnrolledStore(tmp_path / "enrolled.db")
    old = near(normalise(RNG.normal(size=DIM)), 2)
    store.add("New/A", [b"j1", b"j2"], old, "model-1", "photos")
    new_vector = normalise(RNG.normal(size=DIM))
    seen = []
    assert store.reembed("model-2", lambda jpeg: seen.append(jpeg) or new_vector) == 2
    assert seen == [b"j1", b"j2"] and store.reembed("model-2", lambda jpeg: new_vector) == 0
    np.testing.assert_allclose(store.index("model-2", None, 0, 0).prototypes[0], new_vector, atol=1e-6)
    np.testing.assert_allclose(store.index("model-1", None, 0, 0).prototypes[0], prototype(old), atol=1e-6)


def test_an_enrollment_survives_kill_9(tmp_path: Path):
    db = tmp_path / "enrolled.db"
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np
        from taxonedge.edge.service.enrolled import EnrolledStore
        store = EnrolledStore(__import__("pathlib").Path({str(db)!r}))
        store.add("New/A", [b"jpeg"], np.ones((1, 4), np.float32), "m", "photos")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ}, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert [p.label for p in EnrolledStore(db).products()] == ["New/A"]


def _photo(index: int, seed: int) -> bytes:
    import cv2

    from .conftest import class_image

    ok, data = cv2.imencode(".jpg", class_image(index, np.random.default_rng(seed), 64))
    assert ok
    return data.tobytes()


@pytest.mark.parametrize("whitening", [True, False])
def test_enrollment_from_photos_decides_for_the_new_product_and_leaves_trained_ones_alone(
    tmp_path: Path, whitening: bool
):
    """A real tiny v3 bundle: a product drawn unlike any trained class (palette 5) is enrolled from five
    photos, then new photos of it get its label (source enrolled) while photos of the trained classes keep
    the model's decisions. In the bundle's whitened space with the [enroll] defaults, and in a bundle
    from before the whitening by raw cosine with the values that suit it (0.6, 0.05), as before."""
    from taxonedge.edge.kernel.bundle import read_bundle
    from taxonedge.edge.kernel.decode import Decoder
    from taxonedge.edge.kernel.preprocess import preprocess
    from taxonedge.edge.kernel.runtime import Classifier
    from taxonedge.edge.service.enrollment import Enrollment, decode_photo

    from .tinymodels import tiny_bundle_bytes

    bundle = read_bundle(tiny_bundle_bytes(whitening=whitening))
    classifier = Classifier(bundle)
    decoder = Decoder(bundle.taxonomy, kind="leaf_logits")

    def embed(image: np.ndarray) -> np.ndarray:
        return classifier.outputs(preprocess(image, bundle.manifest.input))[1]

    space = bundle.embedding_space()
    if whitening:
        assert space is not None and space.whitening is not None
        enrollment = Enrollment(tmp_path)  # the [enroll] defaults
    else:
        assert space is not None and space.whitening is None and space.centroids is not None
        np.testing.assert_array_equal(space.centroids, bundle.centroids())
        enrollment = Enrollment(tmp_path, min_similarity=0.6, margin=0.05)
    future = enrollment.submit("Fruit/Apple/Red-Delicious", [_photo(5, seed) for seed in range(5)])
    enrollment.serve(bundle, embed)
    assert future.result(timeout=1) == {"label": "Fruit/Apple/Red-Delicious", "photos": 5, "products": 1}

    def decide(photo: bytes):
        image = decode_photo(photo, 0)
        scores, embedding = classifier.outputs(preprocess(image, bundle.manifest.input))
        return enrollment.decide(decoder.decode(scores), scores, embedding, bundle)

    new = [decide(_photo(5, seed)) for seed in range(100, 110)]
    assert sum(d.source == "enrolled" and d.label == "Fruit/Apple/Red-Delicious" for d in new) >= 8
    enrolled = next(d for d in new if d.source == "enrolled")
    assert enrolled.decision == "accepted" and [lv.depth for lv in enrolled.levels] == [1, 2, 3]
    assert enrolled.levels[-1].id == "enrolled:Fruit/Apple/Red-Delicious"
    trained = [decide(_photo(i, seed)) for i in range(4) for seed in range(200, 205)]
    assert sum(d.source == "model" for d in trained) >= 19

    # bad input: unreadable photos, a trained label, a bundle without an embedding; nothing half-stored
    for label, photos, why in (
        ("New/X", [_photo(5, 1), b"not an image"], "photo 2: not a readable"),
        ("Fruit/Avocado", [_photo(5, 1)], "trained class"),
    ):
        future = enrollment.submit(label, photos)
        enrollment.serve(bundle, embed)
        with pytest.raises(EnrollError, match=why):
            future.result(timeout=1)
    v2 = read_bundle(tiny_bundle_bytes(outputs="probabilities"))
    future = enrollment.submit("New/Y", [_photo(5, 1)])
    enrollment.serve(v2, embed)
    with pytest.raises(EnrollError, match="no embedding output"):
        future.result(timeout=1)
    assert [p.label for p in enrollment.store.products()] == ["Fruit/Apple/Red-Delicious"]


def test_a_belt_item_keeps_its_most_typical_frame_never_an_empty_one():
    from taxonedge.edge.service.enrollment import _Seen, exemplar_frame

    centre = normalise(RNG.normal(size=DIM))
    images = [np.full((4, 4, 3), i, np.uint8) for i in range(4)]
    seen = [
        _Seen(images[0], centre + 0.5 * normalise(RNG.normal(size=DIM)), False),  # entering the view
        _Seen(images[1], centre, False),  # in full view
        _Seen(images[2], centre, True),  # the empty belt: never kept, however typical
        _Seen(images[3], centre + 0.5 * normalise(RNG.normal(size=DIM)), False),  # leaving
    ]
    assert exemplar_frame(seen) is images[1]
    assert exemplar_frame([_Seen(images[2], centre, True)]) is None
    assert exemplar_frame([_Seen(i, None, False) for i in images[:3]]) is images[1]  # the middle one


def test_an_item_voted_to_an_enrolled_product_is_accepted_as_enrolled():
    from taxonedge.edge.kernel.decode import Decision, LevelScore
    from taxonedge.edge.service.trigger import vote

    def frame(path: str, similarity: float | None) -> Decision:
        parts = tuple(path.split("/"))
        levels = tuple(
            LevelScore(d + 1, f"enrolled:{'/'.join(parts[: d + 1])}", p, p.lower(), 0.9, True)
            for d, p in enumerate(parts)
        )
        source = "enrolled" if similarity is not None else "model"
        return Decision("accepted", path, parts, levels, source=source, similarity=similarity)

    decision, agreeing = vote([frame("New/Box/A", 0.8), frame("New/Box/A", 0.9)], TAX, 0.6)
    assert (decision.decision, decision.label, decision.source, agreeing) == (
        "accepted",
        "New/Box/A",
        "enrolled",
        2,
    )
    assert decision.similarity == pytest.approx(0.85)
    # two enrolled products that share a new branch: the item backs off to the branch, as the model's would
    decision, _ = vote([frame("New/Box/A", 0.8), frame("New/Box/B", 0.9)], TAX, 0.6)
    assert (decision.decision, decision.label, decision.source) == ("backed-off", "New/Box", "model")
