"""Drift on the device: are the labels still what the bundle's calibration said they would be?

`convert` records in the bundle's manifest (metrics["backoff_deployed"], train/metrics.py `backoff`) what
the deployed thresholds did on the validation images: the share whose published label reached each depth
(`depth_N.coverage`) and the shares of accepted, backed-off and unknown decisions. On a line the same
figures over the last `window` labels should stay near those. When one moves more than `tolerance` away (a
dirty lens, new lighting, new products, a camera that moved), `status` turns degraded with one line saying
which, until the figures come back.

The tracker is fed on the frame path (LabelPublisher.publish, once per label): a bounded deque and a few
counters under a lock, O(1). The health thread and the `state` command read it (`report`, `reason`).
"""

from __future__ import annotations

import math
import re
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..kernel.bundle import Bundle
from ..kernel.decode import Decision
from ..kernel.protocol import Drift
from .config import DriftConfig

KINDS = ("accepted", "backed_off", "unknown")  # the figures' names; the decision spells "backed-off"
_KIND_INDEX = {"accepted": 0, "backed-off": 1, "unknown": 2}
_TIE_ORDER = (
    "unknown",
    "accepted",
    "backed_off",
)  # which figure the reason names when several are as far off
_DEPTH_KEY = re.compile(r"depth_([1-9][0-9]*)")
# A flagged figure clears only once back within this share of the tolerance: a rate hovering at the edge
# would otherwise flip the retained status between online and degraded every few labels.
CLEAR_FRACTION = 0.8
# The reason line's figures are refreshed when they move this much: `status` is republished whenever its
# reasons change, and a live percentage would change it with nearly every label.
LINE_STEP = 0.05
REMEDY = "check the camera and lighting, or recalibrate with taxonedge evaluate --fit-thresholds"


@dataclass(frozen=True)
class Calibration:
    """A bundle's expected figures and the thresholds they were measured at (empty: not recorded)."""

    figures: dict[str, float]
    thresholds: dict[str, float]


def calibration_of(metrics: Mapping[str, Any]) -> Calibration | None:
    """The expected figures from a manifest's metrics; None when it has none (older or tiny bundles).
    Read defensively: a value that is not a share in [0, 1] is left out, never trusted."""
    block = metrics.get("backoff_deployed")
    if not isinstance(block, Mapping):
        return None
    figures: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    depth_keys = [k for k in block if isinstance(k, str) and _DEPTH_KEY.fullmatch(k)]
    for key in sorted(depth_keys, key=lambda k: int(k[6:])):
        row = block[key]
        if isinstance(row, Mapping):
            _put_share(figures, key, row.get("coverage"))
            _put_share(thresholds, key, row.get("threshold"))
    decisions = block.get("decisions")
    if isinstance(decisions, Mapping):
        for kind in KINDS:
            _put_share(figures, kind, decisions.get(kind))
    return Calibration(figures, thresholds) if figures else None


def _put_share(into: dict[str, float], key: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
        into[key] = float(value)  # NaN fails the comparison above


def figure_text(figure: str, share: float) -> str:
    """`31% of labels unknown`: what a figure means, in words."""
    if figure == "unknown":
        return f"{share:.0%} of labels unknown"
    if figure == "accepted":
        return f"{share:.0%} of labels accepted (down to a leaf)"
    if figure == "backed_off":
        return f"{share:.0%} of labels backed off to a parent"
    return f"{share:.0%} of labels reach depth {figure[6:]}"


class DriftTracker:
    """The last `window` labels' decisions and depths, against the serving bundle's calibration."""

    def __init__(self, config: DriftConfig):
        self.config = config
        self._lock = threading.Lock()
        self._window: deque[tuple[int, int]] = deque()  # (decision index, depth reached) per label
        self._kinds = [0, 0, 0]  # labels in the window per decision (KINDS order)
        self._depths = [0]  # labels in the window per depth reached exactly (0: unknown)
        self._model: str | None = None  # the serving bundle's sha256
        self._calibration: Calibration | None = None
        self._thresholds: dict[str, float] = {}  # the thresholds the window's labels were decided with
        self._flagged: set[str] = set()
        self._line: tuple[str, float, tuple[str, ...], str] | None = None  # figure, share, flagged, text

    # ---- fed by the daemon -------------------------------------------------------------------------
    def serve(self, bundle: Bundle, thresholds: dict[str, float]) -> None:
        """The model now serving. A new one starts the window again with its own calibration figures; the
        same one (an Edge TPU re-probe swaps the worker, not the model) keeps the window."""
        with self._lock:
            if bundle.sha256 == self._model:
                return
            self._model = bundle.sha256
            self._calibration = calibration_of(bundle.manifest.metrics)
            self._depths = [0] * (bundle.taxonomy.depth + 1)
            self._thresholds = dict(thresholds)
            self._clear()

    def add(self, decision: Decision) -> None:
        """One published label (the frame path: O(1))."""
        if not self.config.enabled:
            return
        kind = _KIND_INDEX[decision.decision]
        with self._lock:
            depth = min(len(decision.path), len(self._depths) - 1)
            window = self._window
            if len(window) >= self.config.window:
                old_kind, old_depth = window.popleft()
                self._kinds[old_kind] -= 1
                self._depths[old_depth] -= 1
            window.append((kind, depth))
            self._kinds[kind] += 1
            self._depths[depth] += 1

    def _clear(self) -> None:
        self._window.clear()
        self._kinds = [0, 0, 0]
        self._depths = [0] * len(self._depths)
        self._flagged.clear()
        self._line = None

    # ---- read by the health thread and the `state` command -------------------------------------------
    def report(self, thresholds: dict[str, float]) -> Drift:
        """The figures over the window beside the expected ones. `thresholds`: those deciding now; a change
        (set_thresholds) starts the window again, as labels decided with others say nothing about these."""
        with self._lock:
            if thresholds != self._thresholds:
                self._thresholds = dict(thresholds)
                self._clear()
            observed = self._observed()
            expected = dict(self._calibration.figures) if self._calibration else None
            not_checked = self._not_checked(len(self._window))
            self._flagged = self._out_of_tolerance(observed, expected) if not_checked is None else set()
            cfg = self.config
            return {
                "enabled": cfg.enabled,
                "window": cfg.window,
                "count": len(self._window),
                "min_samples": cfg.min_samples,
                "tolerance": cfg.tolerance,
                "observed": {k: round(v, 4) for k, v in observed.items()},
                "expected": expected,
                "out_of_tolerance": [k for k in observed if k in self._flagged],
                "not_checked": not_checked,
            }

    def reason(self, thresholds: dict[str, float]) -> str | None:
        """The one status line while a figure is out of tolerance, else None."""
        report = self.report(thresholds)
        flagged, observed, expected = report["out_of_tolerance"], report["observed"], report["expected"]
        with self._lock:
            if not flagged or expected is None:
                self._line = None
                return None
            # the decisions before the depths on a tie: unknown is always exactly as far off as depth_1
            ranked = sorted(
                flagged, key=lambda k: _TIE_ORDER.index(k) if k in _TIE_ORDER else len(_TIE_ORDER)
            )
            worst = max(ranked, key=lambda k: round(abs(observed[k] - expected[k]), 3))
            line = self._line
            stale = (
                line is None
                or (line[0], line[2]) != (worst, tuple(flagged))
                or abs(observed[worst] - line[1]) >= LINE_STEP
            )
            if stale:
                text = self._line_text(worst, observed[worst], expected[worst], flagged, report["count"])
                self._line = (worst, observed[worst], tuple(flagged), text)
            return self._line[3]  # type: ignore[index]

    def _observed(self) -> dict[str, float]:
        """depth_N (labels reaching at least depth N), then the decision shares; {} for an empty window."""
        n = len(self._window)
        if not n:
            return {}
        figures: dict[str, float] = {}
        reached = n - self._depths[0]
        for depth in range(1, len(self._depths)):
            figures[f"depth_{depth}"] = reached / n
            reached -= self._depths[depth]
        figures.update({kind: count / n for kind, count in zip(KINDS, self._kinds, strict=True)})
        return figures

    def _not_checked(self, count: int) -> str | None:
        if not self.config.enabled:
            return "drift checking is off ([drift] enabled = false)"
        if self._calibration is None:
            return "the bundle has no calibration figures (manifest metrics.backoff_deployed)"
        differ = [
            f"{key} {self._thresholds.get(key, 0.0):g} against {value:g}"
            for key, value in self._calibration.thresholds.items()
            if not math.isclose(self._thresholds.get(key, 0.0), value, abs_tol=1e-6)
        ]
        if differ:
            return (
                f"thresholds differ from those the calibration figures were measured at: {', '.join(differ)}"
            )
        if count < self.config.min_samples:
            return f"{count} labels in the window, too few until {self.config.min_samples}"
        return None

    def _out_of_tolerance(self, observed: dict[str, float], expected: dict[str, float] | None) -> set[str]:
        """The figures off by more than the tolerance; one already flagged stays so until well back."""
        flagged = set()
        for key, share in observed.items():
            if expected is None or key not in expected:
                continue
            limit = self.config.tolerance * (CLEAR_FRACTION if key in self._flagged else 1.0)
            if abs(share - expected[key]) > limit + 1e-9:
                flagged.add(key)
        return flagged

    @staticmethod
    def _line_text(figure: str, observed: float, expected: float, flagged: list[str], count: int) -> str:
        others = [k for k in flagged if k != figure]
        also = f"; also off: {', '.join(others)}" if others else ""
        return (
            f"drift: {figure_text(figure, observed)} against {expected:.0%} at calibration "
            f"(last {count} labels{also}); {REMEDY}"
        )
