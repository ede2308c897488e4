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


def test_logits_are_decoded_as_their_softmax_in_float():
    logits = np.array([6.0, 3.0, 1.0, -2.0], dtype=np.float32)
    from_logits = Decoder(TAX, THRESHOLDS, kind="leaf_logits").decode(logits)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    from_probs = Decoder(TAX, THRESHOLDS).decode(expected)
    assert from_logits.label == from_probs.label == "Fruit/Apple/Granny-Smith"
    assert [lv.score for lv in from_logits.levels] == pytest.approx([lv.score for lv in from_probs.levels])
    assert from_logits.open_set_score == pytest.approx(6.0)
    assert from_probs.open_set_score is None


def test_logits_keep_ranking_where_uint8_probabilities_saturate():
    """Two confident answers, one far surer than the other: as uint8 probabilities (1/256 steps) both read
    255/256, as logits they stay apart, so a threshold between them exists."""
    sure, less_sure = np.array([12.0, 0.0, 0.0, 0.0]), np.array([7.0, 0.0, 0.0, 0.0])
    decoder = Decoder(TAX, kind="leaf_logits")
    scores = [decoder.decode(x).levels[-1].score for x in (sure, less_sure)]
    assert scores[0] > scores[1] > 0.99
    saturated = [min(round(s * 256), 255) / 256 for s in scores]
    assert saturated[0] == saturated[1]


def test_unfamiliar_input_is_unknown_even_when_its_softmax_is_confident():
    decoder = Decoder(TAX, THRESHOLDS, kind="leaf_logits", open_set_threshold=4.0)
    # one leaf ahead of the others, but no logit lights up: the softmax is sure, the model is not
    flat = np.array([2.5, -3.0, -3.0, -3.0])
    d = decoder.decode(flat)
    assert d.levels[0].score > 0.99
    assert d.decision == "unknown" and d.label is None and d.reason == "unfamiliar"
    familiar = decoder.decode(np.array([8.0, 1.0, 0.0, 0.0]))
    assert familiar.decision == "accepted" and familiar.reason is None
    low = Decoder(TAX, {"depth_1": 0.9}, kind="leaf_logits", open_set_threshold=1.0).decode(
        np.array([5.0, 5.0, 5.0, 5.0])
    )
    assert low.decision == "unknown" and low.reason == "low_confidence"


def test_label_fields_say_why_unknown_and_carry_the_open_set_score():
    from taxonedge.edge.kernel.decode import decision_fields

    decoder = Decoder(TAX, THRESHOLDS, kind="leaf_logits", open_set_threshold=4.0)
    fields = decision_fields(decoder.decode(np.array([2.5, -3.0, -3.0, -3.0])))
    assert fields["decision"] == "unknown" and fields["reason"] == "unfamiliar"
    assert fields["open_set_score"] == pytest.approx(2.5)
    assert "open_set_score" not in decision_fields(Decoder(TAX).decode(probs(0.9, 0.05, 0.03, 0.02)))


def test_an_open_set_threshold_needs_logits():
    with pytest.raises(ValueError, match="needs a model with leaf logits"):
        Decoder(TAX, kind="leaf_probabilities", open_set_threshold=1.0)
