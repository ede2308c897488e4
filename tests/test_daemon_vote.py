"""Item votes: the deepest label path enough frames agree on, backing off to a parent, else unknown."""

from __future__ import annotations

import time

import numpy as np
import pytest
from taxonedge.edge.kernel.decode import Decoder
from taxonedge.edge.kernel.taxonomy import Taxonomy
from taxonedge.edge.service.trigger import ItemTrigger, vote

from .conftest import TINY_LABELS

TAX = Taxonomy.from_paths(TINY_LABELS)
DECODER = Decoder(TAX, {"depth_1": 0.5, "depth_2": 0.5, "depth_3": 0.5})


def decided(label: str, p: float = 0.9):
    probs = np.full(TAX.num_leaves, (1 - p) / (TAX.num_leaves - 1))
    probs[TAX.leaf_index(label)] = p
    return DECODER.decode(probs)


def test_agreeing_frames_give_the_leaf():
    frames = [decided("Fruit/Apple/Granny-Smith")] * 4 + [decided("Vegetables/Carrot")]
    decision, agreeing = vote(frames, TAX, 0.6)
    assert decision.label == "Fruit/Apple/Granny-Smith" and decision.decision == "accepted"
    assert agreeing == 4
    assert [lv.depth for lv in decision.levels] == [1, 2, 3]


def test_disagreement_below_a_parent_backs_off_to_it():
    frames = [decided("Fruit/Apple/Granny-Smith")] * 3 + [decided("Fruit/Apple/Pink-Lady")] * 2
    decision, agreeing = vote(frames, TAX, 0.8)  # 3/5 on the leaf is not enough, 5/5 on Fruit/Apple is
    assert decision.label == "Fruit/Apple" and decision.decision == "backed-off" and agreeing == 5
    assert decision.levels[1].score == pytest.approx(0.9 + 0.1 / 3, abs=1e-5)  # apple = its two leaves


def test_no_agreement_is_unknown_and_failed_frames_count_against():
    frames = [decided("Fruit/Avocado"), decided("Vegetables/Carrot"), None, None]
    decision, _ = vote(frames, TAX, 0.6)
    assert decision.decision == "unknown" and decision.label is None
    decision, agreeing = vote([decided("Fruit/Avocado")] * 2 + [None] * 2, TAX, 0.6)
    assert decision.decision == "unknown"  # 2 of 4 frames: the failed ones are not ignored


def test_trigger_queue_frames_and_timeout():
    trig = ItemTrigger(TAX, frames_per_item=2, agreement=0.6, timeout_s=0.1)
    assert trig.want_frame() is None
    trig.trigger("a")
    trig.trigger("b")
    assert trig.want_frame() == "a" and trig.busy
    assert trig.add("a", decided("Fruit/Avocado")) is None
    result = trig.add("a", decided("Fruit/Avocado"))
    assert result.item_id == "a" and result.frames == 2 and result.agreement == 1.0
    assert trig.want_frame() == "b"
    time.sleep(0.15)
    late = trig.expire()
    assert late.item_id == "b" and late.frames == 0 and late.decision.decision == "unknown"
    assert trig.timed_out == 1 and not trig.busy


def test_frames_from_before_a_trigger_do_not_vote():
    trig = ItemTrigger(TAX, frames_per_item=1, agreement=0.6, timeout_s=5)
    before = time.monotonic()
    time.sleep(0.01)
    trig.trigger("a")
    trig.trigger("b")
    after_b = time.monotonic()
    assert trig.want_frame() == "a"
    assert trig.before_trigger("a", before) and not trig.before_trigger("a", after_b)
    assert not trig.before_trigger("b", before)  # not the item being voted on
    trig.add("a", decided("Fruit/Avocado"))
    # b's trigger came with a's: a frame taken after it (while a was voting) is b's to use
    assert (
        trig.want_frame() == "b"
        and not trig.before_trigger("b", after_b)
        and trig.before_trigger("b", before)
    )
