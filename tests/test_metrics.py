"""Hierarchical metrics (numpy only): hand-worked examples, and agreement with the device decoder."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from taxonedge.edge.kernel.decode import Decoder
from taxonedge.edge.kernel.taxonomy import Taxonomy
from taxonedge.train.metrics import agreement, backoff, compute_metrics, greedy_walk

# Leaf order (depth-first, sorted): 0 Fruit/Apple/Granny-Smith, 1 Fruit/Apple/Pink-Lady, 2 Fruit/Avocado,
# 3 Vegetables/Carrot. Uneven depth: Avocado and Carrot are depth-2 leaves.
LABELS = ["Fruit/Apple/Granny-Smith", "Fruit/Apple/Pink-Lady", "Fruit/Avocado", "Vegetables/Carrot"]


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return Taxonomy.from_paths(LABELS, name="t")


def one_hot_probs(pred: list[int], n: int = 4, p: float = 0.7) -> np.ndarray:
    probs = np.full((len(pred), n), (1 - p) / (n - 1))
    probs[np.arange(len(pred)), pred] = p
    return probs


def test_accuracy_per_depth_hand_example(tax: Taxonomy) -> None:
    truth = np.array([0, 0, 2, 3])
    # right leaf; sibling apple (right at depth 1 and 2); Avocado->Granny (right at depth 1 only);
    # Carrot->Avocado (wrong everywhere)
    probs = one_hot_probs([0, 1, 0, 2])
    m = compute_metrics(tax, truth, probs)
    assert list(m["accuracy"]) == ["depth_1", "depth_2", "leaf"]
    assert m["accuracy"] == {"depth_1": 0.75, "depth_2": 0.5, "leaf": 0.25}
    assert m["n"] == 4 and m["top5"] == 1.0
    # severities: sibling 1; Avocado(depth 2) vs Granny(depth 3): max(2,3)-1 = 2; Carrot vs Avocado: 2-0 = 2
    assert m["mistake_severity"]["mistakes"] == 3
    assert m["mistake_severity"]["mean"] == pytest.approx(5 / 3)
    assert m["mistake_severity"]["histogram"] == {"1": 1, "2": 2}
    # ancestor sets (self included): overlaps 3, 2, 1, 0; predicted sizes 3, 3, 3, 2; true sizes 3, 3, 2, 2
    assert m["hierarchical"]["precision"] == pytest.approx(6 / 11)
    assert m["hierarchical"]["recall"] == pytest.approx(6 / 10)


def test_summed_parent_probability_can_beat_argmax_leaf(tax: Taxonomy) -> None:
    # Two apples share 0.6 of the mass but Carrot is the single most probable leaf.
    probs = np.array([[0.3, 0.3, 0.0, 0.4]])
    m = compute_metrics(tax, np.array([0]), probs)
    assert m["accuracy"]["depth_1"] == 0.0 and m["accuracy_summed"]["depth_1"] == 1.0
    assert m["accuracy_summed"]["depth_2"] == 1.0 and m["accuracy"]["leaf"] == 0.0


def test_per_class_and_macro_f1(tax: Taxonomy) -> None:
    truth = np.array([0, 0, 1, 1])
    probs = one_hot_probs([0, 1, 1, 1])
    m = compute_metrics(tax, truth, probs)
    rows = {r["label"]: r for r in m["per_class"]}
    assert rows[LABELS[0]]["precision"] == 1.0 and rows[LABELS[0]]["recall"] == 0.5
    assert rows[LABELS[1]]["precision"] == pytest.approx(2 / 3) and rows[LABELS[1]]["recall"] == 1.0
    assert rows[LABELS[0]]["most_confused_with"] == LABELS[1]
    assert rows[LABELS[3]]["support"] == 0 and rows[LABELS[3]]["recall"] is None
    # macro-F1 over the classes present in the truth only
    f1_a, f1_b = 2 * 0.5 / 1.5, 2 * (2 / 3) / (5 / 3)
    assert m["classes_present"] == 2 and m["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)


def test_backoff_with_thresholds(tax: Taxonomy) -> None:
    truth = np.array([0, 1, 3])
    probs = np.array(
        [
            [0.90, 0.05, 0.03, 0.02],  # confident and right: reaches the leaf
            [0.45, 0.40, 0.10, 0.05],  # Fruit/Apple is sure (0.85), the apple variety is not: backs off
            [0.10, 0.10, 0.30, 0.50],  # Vegetables 0.5 < 0.6: unknown
        ]
    )
    b = backoff(tax, probs, truth, {"depth_1": 0.6, "depth_2": 0.6, "depth_3": 0.6})
    assert b["depth_1"]["count"] == 2 and b["depth_2"]["count"] == 2 and b["depth_3"]["count"] == 1
    assert b["depth_3"]["precision"] == 1.0
    assert b["decisions"] == pytest.approx({"accepted": 1 / 3, "backed_off": 1 / 3, "unknown": 1 / 3})
    assert b["published_precision"] == 1.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.floats(0.01, 1.0), min_size=4, max_size=4), min_size=1, max_size=12),
    st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
)
def test_backoff_matches_device_decoder(rows, ts) -> None:
    tax = Taxonomy.from_paths(LABELS, name="t")
    probs = np.array(rows)
    probs = probs / probs.sum(axis=1, keepdims=True)
    thresholds = {f"depth_{d}": t for d, t in zip((1, 2, 3), ts, strict=True)}
    decoder = Decoder(tax, thresholds)
    nodes, _ = greedy_walk(tax, probs)
    decisions = [decoder.decode(p) for p in probs]
    for i, decision in enumerate(decisions):  # the walk visits the decoder's nodes, threshold or not
        for level in decision.levels:
            assert tax.level_nodes(level.depth)[nodes[i, level.depth - 1]].id == level.id
    truth = np.zeros(len(probs), dtype=int)
    b = backoff(tax, probs, truth, thresholds)
    kinds = [d.decision for d in decisions]
    assert b["decisions"]["accepted"] == pytest.approx(kinds.count("accepted") / len(kinds))
    assert b["decisions"]["unknown"] == pytest.approx(kinds.count("unknown") / len(kinds))
    for d in (1, 2, 3):
        reached = sum(1 for dec in decisions if len(dec.path) >= d)
        assert b[f"depth_{d}"]["count"] == reached


def test_agreement() -> None:
    a = one_hot_probs([0, 1, 2, 3])
    b = one_hot_probs([0, 1, 3, 3])
    assert agreement(a, b) == 0.75
    assert agreement(a, a) == 1.0
    with pytest.raises(ValueError):
        agreement(a, b[:2])


def test_rejects_bad_input(tax: Taxonomy) -> None:
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(tax, np.array([0]), np.array([[np.nan, 0, 0, 1.0]]))
    with pytest.raises(ValueError, match="expected probs"):
        compute_metrics(tax, np.array([0, 1]), one_hot_probs([0]))


def test_metrics_module_imports_no_tensorflow() -> None:
    code = (
        "import sys, taxonedge.train.metrics, taxonedge.train.calibrate; "
        "sys.exit(int(any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
