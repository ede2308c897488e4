"""The wire contract (edge/kernel/protocol.py): generated schemas, input parsing that never raises past one
line, and labels that fit their schema for every output a real uint8 model can give."""

from __future__ import annotations

import json
import sys

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from taxonedge.edge.kernel import protocol
from taxonedge.edge.kernel.decode import Decoder, decision_fields
from taxonedge.edge.kernel.preprocess import preprocess
from taxonedge.edge.kernel.protocol import (
    PayloadError,
    check_text,
    json_bytes,
    parse_json_object,
    response_topic_problem,
)
from taxonedge.edge.kernel.runtime import Classifier
from taxonedge.edge.kernel.taxonomy import Taxonomy
from taxonedge.edge.service.trigger import ItemTrigger, vote

from .conftest import GROCERY, REPO, TINY_LABELS, class_image, needs_shared
from .tinymodels import tiny_bundle_bytes

TAX = Taxonomy.from_paths(TINY_LABELS)
BASE = "taxonedge/s/l/d"


def schema(name: str) -> dict:
    return json.loads((REPO / "edge" / "kernel" / "schemas" / f"{name}.schema.json").read_text())


def label_of(decision, reason=None) -> dict:
    """A complete label around a decision, as the daemon builds it."""
    return {
        "schema": protocol.LABEL_SCHEMA,
        "msg_id": "0" * 32,
        "boot_id": "b",
        "seq": 1,
        "device": "d",
        "site": "s",
        "line": "l",
        "timestamp": "2026-12-04T10:00:00.000Z",
        "item_id": None,
        **decision_fields(decision, reason),
        "vote": None,
        "model": {"name": "m", "version": "1", "sha256": "a" * 64},
        "backend": "cpu",
        "latency_ms": 1.0,
        "inference_ms": 1.0,
    }


def test_committed_schemas_are_the_generated_ones(tmp_path):
    """edge/kernel/schemas/ is generated from the TypedDicts: `python -m taxonedge.edge.kernel.protocol`
    rewrites it."""
    written = protocol.write_schemas(tmp_path)
    assert {p.name for p in written} == {
        p.name for p in (REPO / "edge" / "kernel" / "schemas").glob("*.schema.json")
    }
    for path in written:
        committed = REPO / "edge" / "kernel" / "schemas" / path.name
        assert json.loads(committed.read_text()) == json.loads(path.read_text()), (
            f"{committed} is stale: run `{sys.executable} -m taxonedge.edge.kernel.protocol`"
        )
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


def test_unknown_labels_say_why_and_fit_the_schema():
    decision = Decoder(TAX, {"depth_1": 0.99}).decode(np.array([0.5, 0.2, 0.2, 0.1]))
    label = label_of(decision)
    assert label["decision"] == "unknown" and label["reason"] == "low_confidence"
    jsonschema.validate(label, schema("label"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**label, "reason": "because"}, schema("label"))


def test_parent_scores_of_dequantized_uint8_leaves_stay_probabilities():
    """Two uint8 leaves under one parent can sum to 257/256 (the fault: score 1.003906 > maximum 1)."""
    leaves = np.array([255, 2, 0, 0], dtype=np.uint8).astype(np.float64) / 256
    decision = Decoder(TAX, {}).decode(leaves)
    assert all(0.0 <= lv.score <= 1.0 for lv in decision.levels)
    jsonschema.validate(label_of(decision), schema("label"))
    item = ItemTrigger(TAX, 2, 0.6, 5)
    item.trigger("a")
    item.want_frame()
    item.add("a", decision)
    result = item.add("a", decision)
    assert result.decision.levels[0].score <= 1.0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 255), min_size=4, max_size=4),
    st.floats(1 / 512, 1 / 128),
    st.sampled_from([{}, {"depth_1": 0.5, "depth_2": 0.7, "depth_3": 0.9}, {"depth_1": 1.0}]),
)
def test_every_uint8_output_decodes_to_a_label_that_fits_the_schema(values, scale, thresholds):
    decision = Decoder(TAX, thresholds).decode(np.array(values, dtype=np.float64) * scale)
    jsonschema.validate(label_of(decision), schema("label"))
    voted, _ = vote([decision, decision, None], TAX, 0.6)
    jsonschema.validate(label_of(voted, "low_confidence"), schema("label"))


@pytest.mark.slow
def test_labels_from_a_real_int8_model_fit_the_schema(tmp_path):
    """Real outputs: the tiny int8 model over generated images, including off-distribution noise."""
    from taxonedge.edge.kernel.bundle import read_bundle

    bundle = read_bundle(tiny_bundle_bytes())
    clf = Classifier(bundle)
    decoder = Decoder(bundle.taxonomy, bundle.manifest.thresholds)
    rng = np.random.default_rng(0)
    images = [class_image(i % 4, rng) for i in range(40)] + [
        rng.integers(0, 256, (64, 64, 3), np.uint8) for _ in range(20)
    ]
    for image in images:
        decision = decoder.decode(clf.probabilities(preprocess(image, bundle.manifest.input)))
        jsonschema.validate(label_of(decision), schema("label"))


@pytest.mark.slow
@needs_shared(GROCERY, REPO / "examples" / "models" / "grocery" / "grocery.tebundle")
def test_labels_of_the_shipped_grocery_model_on_store_photos_fit_the_schema():
    import cv2
    from taxonedge.edge.kernel.bundle import read_bundle

    bundle = read_bundle(REPO / "examples" / "models" / "grocery" / "grocery.tebundle")
    clf = Classifier(bundle)
    decoder = Decoder(bundle.taxonomy, bundle.manifest.thresholds)
    photos = sorted((GROCERY / "val").rglob("*.jpg"))[:300]
    assert photos
    top_sums = []
    for path in photos:
        probs = clf.probabilities(preprocess(cv2.imread(str(path)), bundle.manifest.input))
        top_sums.append(float(np.sum(probs)))
        jsonschema.validate(label_of(decoder.decode(probs)), schema("label"))
    assert max(top_sums) > 0.99  # the model's real outputs, not an empty run


# ---- inputs -----------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=50).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        st.sampled_from(
            [
                b'{"id": "x\\ud800"}',
                b'{"\\udfff": 1}',
                b"1e999999",
                b"NaN",
                b'{"a": NaN}',
                b"9" * 5000,
                b'{"a": ' + b"9" * 5000 + b"}",
                b"\xef\xbb\xbf{}",
                b"{}" * 3,
            ]
        ),
    )
)
def test_parse_json_object_raises_nothing_but_payload_error(payload):
    try:
        value = parse_json_object(payload, 16 * 1024)
    except PayloadError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 300
        json_bytes({"error": str(exc)})  # the answer carrying the error always serialises
    else:
        assert isinstance(value, dict)
        json_bytes(value)


def test_parse_json_object_names_each_problem():
    cases = {
        b"\xff": "not UTF-8",
        b"[1]": "JSON object",
        b"{": "not JSON",
        b"[" * 5000: "nested too deeply",
        b'{"id": "x\\ud800"}': "lone surrogate",
        b"x" * 20000: "limit",
    }
    for payload, words in cases.items():
        with pytest.raises(PayloadError, match=words):
            parse_json_object(payload, 16 * 1024)


def test_ids_are_printable_strings_or_integers():
    assert check_text("A-1234", "item_id") == "A-1234" and check_text(42, "item_id") == "42"
    for bad in (True, None, 1.5, [], {}, "", "x" * 129, "a\nb", "x\ud800"):
        with pytest.raises(PayloadError):
            check_text(bad, "item_id")


def test_json_bytes_never_raises_on_text():
    assert json.loads(json_bytes({"id": "x\ud800"})) == {"id": "x\ud800"}
    assert json_bytes({"a": "é"}) == '{"a":"é"}'.encode()


def test_response_topics_never_reach_the_devices_own_topics():
    for own in (
        f"{BASE}/labels",
        f"{BASE}/status",
        f"{BASE}/cmd/pause",
        f"{BASE}/trigger",
        BASE,
        "taxonedge/groups/g/deploy",
        "$SYS/x",
        "a/+/b",
        "a/#",
        "",
    ):
        assert response_topic_problem(own, BASE, "taxonedge"), own
    for fine in ("taxonedge/replies/me", "replies/me", "taxonedge/s/l/d2/labels-not-mine"):
        assert response_topic_problem(fine, BASE, "taxonedge") is None, fine


def test_message_kind_by_topic():
    assert protocol.message_kind(f"{BASE}/labels", BASE) == "label"
    assert protocol.message_kind(f"{BASE}/model/deploy/abc", BASE) == "deploy-progress"
    assert protocol.message_kind(f"{BASE}/cmd/state/response", BASE) == "command-answer"
    assert protocol.message_kind(f"{BASE}/trigger", BASE) is None
