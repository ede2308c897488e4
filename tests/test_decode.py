"""Hierarchical decision with back-off to a parent label."""

from __future__ import annotations

import numpy as np
import pytest
from taxonedge.edge.kernel.decode import Decoder
from taxonedge.edge.kernel.taxonomy import Taxonomy

from .conftest import TINY_LABELS

TAX = Taxonomy.from_paths(TINY_LABELS)
# leaf order: Fruit/Apple/Granny-Smith, Fruit/Apple/Pink-Lady, Fruit/Avocado, Vegetables/Carrot
THRESHOLDS = {"depth_1": 0.8, "depth_2": 0.7, "depth_3": 0.6}


def probs(*values):
    return np.array(values, dtype=np.float32)


def test_confident_leaf_is_accepted():
    d = Decoder(TAX, THRESHOLDS).decode(probs(0.9, 0.05, 0.03, 0.02))
    assert d.decision == "accepted"
    assert d.label == "Fruit/Apple/Granny-Smith"
    assert [lv.score for lv in d.levels] == pytest.approx([0.98, 0.95, 0.9], abs=1e-6)
    assert d.top_k[0] == ("Fruit/Apple/Granny-Smith", pytest.approx(0.9))


def test_unsure_variety_backs_off_to_parent():
    d = Decoder(TAX, THRESHOLDS).decode(probs(0.45, 0.45, 0.05, 0.05))
    assert d.decision == "backed-off"
    assert d.label == "Fruit/Apple"
    assert d.levels[-1].passed is False and d.levels[-1].depth == 3


def test_shallow_leaf_is_accepted_at_its_own_depth():
    d = Decoder(TAX, THRESHOLDS).decode(probs(0.05, 0.05, 0.85, 0.05))
    assert d.decision == "accepted" and d.label == "Fruit/Avocado" and len(d.levels) == 2


def test_unknown_when_top_level_fails():
    d = Decoder(TAX, THRESHOLDS).decode(probs(0.25, 0.2, 0.1, 0.45))
    assert d.decision == "unknown" and d.label is None and d.path == ()
    assert d.levels[0].name == "Fruit" and d.levels[0].score == pytest.approx(0.55)


def test_no_thresholds_always_reaches_a_leaf():
    d = Decoder(TAX, {}).decode(probs(0.3, 0.2, 0.1, 0.4))
    # greedy by summed probability: Fruit (0.6) beats Vegetables (0.4) although Carrot is the argmax leaf
    assert d.decision == "accepted" and d.label == "Fruit/Apple/Granny-Smith"


def test_bad_probabilities_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        Decoder(TAX).decode(probs(np.nan, 0.2, 0.1, 0.4))
    with pytest.raises(ValueError, match="expected 4"):
        Decoder(TAX).decode(probs(0.5, 0.5))
