"""Drift monitoring: the tracker's window, figures, warning and reset (unit), and a real daemon whose bundle's
calibration figures are far from what its camera shows (real broker, real tiny model)."""

from __future__ import annotations

import json
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import numpy as np
import pytest
from taxonedge.edge.kernel.bundle import read_bundle, write_bundle
from taxonedge.edge.kernel.decode import Decision, Decoder
from taxonedge.edge.kernel.taxonomy import Taxonomy
from taxonedge.edge.service.config import DriftConfig, load_config
from taxonedge.edge.service.daemon import Daemon
from taxonedge.edge.service.drift import DriftTracker, calibration_of
from taxonedge.train.metrics import backoff

from .conftest import TINY_LABELS, free_port, write_image_tree
from .daemonkit import BASE, SCHEMAS, Watcher, validate_device_messages, write_config
from .tinymodels import tiny_bundle_bytes

TAXONOMY = Taxonomy.from_paths(TINY_LABELS, name="tiny")  # depth 3; Fruit/Avocado is a depth-2 leaf
THRESHOLDS = {"depth_1": 0.5, "depth_2": 0.5, "depth_3": 0.5}
DRIFT_SCHEMA = {"$defs": SCHEMAS["stats"]["$defs"], "$ref": "#/$defs/Drift"}


def calibration(unknown: float = 0.02, thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """manifest.metrics as `convert` writes it: every label reaching depth 1 reaches depth 3 here."""
    t = thresholds or THRESHOLDS
    seen = 1.0 - unknown
    depths = {f"depth_{d}": {"threshold": t[f"depth_{d}"], "coverage": seen, "count": 10} for d in (1, 2, 3)}
    decisions = {"accepted": seen, "backed_off": 0.0, "unknown": unknown}
    return {"backoff_deployed": {**depths, "decisions": decisions, "published_precision": 0.97}}


@dataclass
class FakeBundle:
    """What the tracker reads of a bundle: its identity, taxonomy and calibration figures."""

    metrics: dict[str, Any] = field(default_factory=dict)
    sha256: str = "a" * 64
    taxonomy: Taxonomy = TAXONOMY

    @property
    def manifest(self) -> SimpleNamespace:
        return SimpleNamespace(metrics=self.metrics)


def decision(path: str | None) -> Decision:
    """A decision published with `path` ("Fruit/Apple" backs off; None is unknown)."""
    if path is None:
        return Decision("unknown", None, (), ())
    node = TAXONOMY.by_label[path]
    return Decision("accepted" if node.is_leaf else "backed-off", path, node.path, ())


LEAF, PARENT, SHALLOW_LEAF = "Fruit/Apple/Granny-Smith", "Fruit/Apple", "Fruit/Avocado"


def tracker(metrics: dict | None = None, **config: Any) -> DriftTracker:
    drift = DriftTracker(DriftConfig(**{"window": 20, "min_samples": 10, **config}))
    drift.serve(FakeBundle(calibration() if metrics is None else metrics), THRESHOLDS)  # type: ignore[arg-type]
    return drift


def feed(drift: DriftTracker, path: str | None, times: int) -> None:
    for _ in range(times):
        drift.add(decision(path))


# ---- the tracker ------------------------------------------------------------------------------------
def test_figures_count_depth_reached_and_decisions():
    drift = tracker()
    for path in (LEAF, LEAF, PARENT, SHALLOW_LEAF, None):
        drift.add(decision(path))
    report = drift.report(THRESHOLDS)
    assert report["count"] == 5
    assert report["observed"] == {
        "depth_1": 0.8,
        "depth_2": 0.8,
        "depth_3": 0.4,  # the avocado is a leaf at depth 2: it does not reach depth 3
        "accepted": 0.6,
        "backed_off": 0.2,
        "unknown": 0.2,
    }
    assert report["expected"] == {
        "depth_1": 0.98,
        "depth_2": 0.98,
        "depth_3": 0.98,
        "accepted": 0.98,
        "backed_off": 0.0,
        "unknown": 0.02,
    }
    jsonschema.validate(report, DRIFT_SCHEMA)


def test_the_window_rolls_and_keeps_only_the_last_labels():
    drift = tracker(window=10)
    feed(drift, LEAF, 10)
    feed(drift, None, 4)
    report = drift.report(THRESHOLDS)
    assert report["count"] == 10
    assert report["observed"]["unknown"] == 0.4 and report["observed"]["accepted"] == 0.6
    feed(drift, None, 100)
    assert drift.report(THRESHOLDS)["observed"]["unknown"] == 1.0
    assert len(drift._window) == 10  # bounded memory


def test_device_figures_match_the_calibration_on_the_same_outputs():
    """The decoder's decisions fed to the tracker give exactly what train/metrics.py `backoff` records."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(4, 0.6), size=400)
    thresholds = {"depth_1": 0.6, "depth_2": 0.7, "depth_3": 0.8}
    metrics = {"backoff_deployed": backoff(TAXONOMY, probs, np.zeros(400, dtype=int), thresholds)}
    drift = DriftTracker(DriftConfig(window=400, min_samples=400))
    drift.serve(FakeBundle(metrics), thresholds)  # type: ignore[arg-type]
    decoder = Decoder(TAXONOMY, thresholds)
    for row in probs:
        drift.add(decoder.decode(row))
    report = drift.report(thresholds)
    assert report["observed"] == pytest.approx(report["expected"], abs=1e-4)
    assert report["out_of_tolerance"] == [] and report["not_checked"] is None
    assert drift.reason(thresholds) is None


def test_warning_needs_min_samples_and_more_than_the_tolerance():
    drift = tracker(tolerance=0.15)
    feed(drift, None, 9)
    report = drift.report(THRESHOLDS)
    assert report["out_of_tolerance"] == [] and "9 labels in the window" in report["not_checked"]
    assert drift.reason(THRESHOLDS) is None
    drift.add(decision(None))
    reason = drift.reason(THRESHOLDS)
    assert reason == (
        "drift: 100% of labels unknown against 2% at calibration (last 10 labels; also off: depth_1, "
        "depth_2, depth_3, accepted); check the camera and lighting, or recalibrate with taxonedge "
        "evaluate --fit-thresholds"
    )
    # exactly at the tolerance is not over it: 17 % unknown against 2 %
    at_edge = tracker(tolerance=0.15, window=100, min_samples=100)
    feed(at_edge, LEAF, 83)
    feed(at_edge, None, 17)
    assert at_edge.report(THRESHOLDS)["out_of_tolerance"] == []
    at_edge.add(decision(None))  # 18 %: the oldest, a leaf, left the window
    assert "unknown" in at_edge.report(THRESHOLDS)["out_of_tolerance"]


def test_warning_clears_when_the_rates_come_back_past_a_margin():
    drift = tracker(window=200, min_samples=50, tolerance=0.15)
    feed(drift, LEAF, 80)
    feed(drift, None, 20)  # 20 % unknown against 2 %: 0.18 off
    assert drift.reason(THRESHOLDS) is not None
    feed(drift, LEAF, 25)  # 20 of 125, 16 %: 0.14 off, under the tolerance but not yet well back
    assert "unknown" in drift.report(THRESHOLDS)["out_of_tolerance"]
    feed(drift, LEAF, 18)  # 20 of 143, 14 %: 0.12 off, within 80 % of the tolerance
    assert drift.report(THRESHOLDS)["out_of_tolerance"] == []
    assert drift.reason(THRESHOLDS) is None


def test_the_reason_line_changes_only_when_its_figures_move_noticeably():
    drift = tracker(window=100, min_samples=50)
    feed(drift, LEAF, 50)
    feed(drift, None, 50)
    first = drift.reason(THRESHOLDS)
    assert first is not None and "50% of labels unknown" in first
    feed(drift, None, 2)  # 52 %: the same line, so status is not republished for it
    assert drift.reason(THRESHOLDS) == first
    feed(drift, None, 4)  # 56 %
    assert "56% of labels unknown" in drift.reason(THRESHOLDS)


def test_a_new_model_restarts_the_window_with_its_figures_and_the_same_model_keeps_it():
    drift = tracker()
    feed(drift, None, 15)
    assert drift.reason(THRESHOLDS) is not None
    drift.serve(FakeBundle(calibration()), THRESHOLDS)  # type: ignore[arg-type]  # a re-probe: same sha
    assert drift.report(THRESHOLDS)["count"] == 15
    drift.serve(FakeBundle(calibration(unknown=0.9), sha256="b" * 64), THRESHOLDS)  # type: ignore[arg-type]
    report = drift.report(THRESHOLDS)
    assert report["count"] == 0 and report["observed"] == {} and report["expected"]["unknown"] == 0.9
    assert drift.reason(THRESHOLDS) is None
    feed(drift, None, 10)
    assert drift.reason(THRESHOLDS) is None  # 100 % unknown against 90 %: within tolerance


def test_threshold_changes_restart_the_window_and_other_thresholds_are_not_checked():
    drift = tracker()
    feed(drift, None, 15)
    other = {**THRESHOLDS, "depth_2": 0.9}
    report = drift.report(other)
    assert report["count"] == 0
    feed(drift, None, 15)
    report = drift.report(other)
    assert report["count"] == 15 and report["out_of_tolerance"] == []
    assert report["not_checked"] == (
        "thresholds differ from those the calibration figures were measured at: depth_2 0.9 against 0.5"
    )
    assert drift.reason(other) is None


def test_bundles_without_figures_and_checking_off_never_warn():
    for metrics in (
        {},
        {"backoff_deployed": "garbage"},
        {"backoff_deployed": {"depth_1": {"coverage": "x"}}},
    ):
        drift = tracker(metrics)
        feed(drift, None, 20)
        report = drift.report(THRESHOLDS)
        assert report["expected"] is None and report["observed"]["unknown"] == 1.0
        assert report["not_checked"].startswith("the bundle has no calibration figures")
        assert drift.reason(THRESHOLDS) is None
        jsonschema.validate(report, DRIFT_SCHEMA)
    off = tracker(enabled=False)
    feed(off, None, 20)
    report = off.report(THRESHOLDS)
    assert report["count"] == 0 and report["enabled"] is False and off.reason(THRESHOLDS) is None
    jsonschema.validate(report, DRIFT_SCHEMA)


def test_calibration_figures_are_read_defensively():
    metrics = calibration()
    metrics["backoff_deployed"]["depth_2"]["coverage"] = float("nan")
    metrics["backoff_deployed"]["depth_3"]["coverage"] = 1.5
    metrics["backoff_deployed"]["decisions"]["accepted"] = True
    metrics["backoff_deployed"]["depth_x"] = {"coverage": 0.5}
    found = calibration_of(metrics)
    assert found is not None
    assert found.figures == {"depth_1": 0.98, "backed_off": 0.0, "unknown": 0.02}
    assert found.thresholds == THRESHOLDS


def test_concurrent_labels_and_reads_keep_the_counts_consistent():
    drift = tracker(window=50, min_samples=10)
    paths = [LEAF, PARENT, SHALLOW_LEAF, None]

    def label(i: int) -> None:
        for k in range(2000):
            drift.add(decision(paths[(i + k) % 4]))

    threads = [threading.Thread(target=label, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        report = drift.report(THRESHOLDS)
        kinds = report["observed"]
        if kinds:
            assert kinds["accepted"] + kinds["backed_off"] + kinds["unknown"] == pytest.approx(1.0, abs=1e-3)
    for thread in threads:
        thread.join()
    assert drift.report(THRESHOLDS)["count"] == 50
    assert sum(drift._kinds) == 50 and sum(drift._depths) == 50


# ---- a real daemon ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny bundle whose calibration says 90 % unknown, the same model with no calibration figures)."""
    folder = tmp_path_factory.mktemp("drift-bundles")
    plain = read_bundle(tiny_bundle_bytes(thresholds=THRESHOLDS))
    drifting = plain.manifest.model_copy(update={"metrics": calibration(unknown=0.9)})
    write_bundle(folder / "drifting.tebundle", drifting, plain.files)
    (folder / "plain.tebundle").write_bytes(tiny_bundle_bytes(thresholds=THRESHOLDS))
    return folder / "drifting.tebundle", folder / "plain.tebundle"


def messages(watcher: Watcher, kind: str) -> list[dict]:
    return [json.loads(p) for t, p, _ in watcher.snapshot() if t == f"{BASE}/{kind}"]


def drift_reason(watcher: Watcher) -> str | None:
    """The drift line of the device's latest status, if any."""
    statuses = messages(watcher, "status")
    reasons = statuses[-1].get("reasons", []) if statuses else []
    return next((r for r in reasons if r.startswith("drift:")), None)


def test_a_daemon_whose_line_differs_from_its_calibration_says_degraded(tmp_path, broker, bundles):
    drifting, plain = bundles
    images = next(write_image_tree(tmp_path / "tree", TINY_LABELS[:1], per_class=4, seed=9).rglob("*.jpg"))
    source = f'type = "folder"\npath = "{images.parent}"\nloop = true\npacing = "realtime"\nfps = 40'
    extra = f"\n[health]\nprometheus_port = {free_port()}\n\n[drift]\nwindow = 30\nmin_samples = 10\n"
    cfg = write_config(tmp_path / "c.toml", broker, drifting, source, tmp_path / "st", extra)
    watcher = Watcher(broker.port)
    daemon = Daemon(load_config(cfg))
    daemon.start()
    try:
        # the camera shows apples the model knows: nearly no unknown against the 90 % the bundle claims
        assert watcher.wait(lambda: drift_reason(watcher) is not None, 20), daemon.health.state()["drift"]
        reason = drift_reason(watcher)
        assert "labels unknown against 90% at calibration" in reason and "--fit-thresholds" in reason
        state = daemon.health.state()
        assert state["state"] == "degraded" and "unknown" in state["drift"]["out_of_tolerance"]
        assert state["drift"]["expected"]["unknown"] == 0.9 and state["drift"]["count"] >= 10
        assert watcher.wait(
            lambda: any(m["drift"]["out_of_tolerance"] for m in messages(watcher, "stats")), 5
        )
        url = f"http://127.0.0.1:{daemon.health.metrics_port}/metrics"
        metrics = urllib.request.urlopen(url, timeout=5).read().decode()
        assert 'taxonedge_drift_expected{figure="unknown"} 0.9' in metrics
        assert 'taxonedge_drift_observed{figure="depth_3"}' in metrics
        # a switch to the same model without figures: a new window, nothing to compare, the warning clears
        daemon.switch_model(read_bundle(plain)).result(timeout=60)
        assert watcher.wait(lambda: drift_reason(watcher) is None, 10)
        report = daemon.health.state()["drift"]
        assert report["expected"] is None and report["not_checked"].startswith(
            "the bundle has no calibration"
        )
    finally:
        daemon.shutdown()
        watcher.wait(lambda: any(m["final"] for m in messages(watcher, "stats")), 5)
        watcher.close()
    final = messages(watcher, "stats")[-1]
    assert final["final"] is True and final["drift"]["expected"] is None
    validate_device_messages(watcher.snapshot(), BASE)  # every message, stats with drift included
