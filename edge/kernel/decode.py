"""Leaf scores -> a hierarchical label with back-off, or `unknown` with a reason.

A v3 bundle's model gives leaf logits: they become probabilities here, in float (`leaf_probabilities`),
and their maximum is the open-set score. A product the model does not know tends to light no logit up,
even when the softmax still puts most of its mass on one leaf: below the bundle's open-set threshold the
label is `unknown`, reason `unfamiliar`, whatever the probabilities say.

Parents' probabilities are the sums of their children's (consistent by construction). Walking down from
the top level, each step takes the most probable child and keeps it only when its probability passes that
depth's threshold; the label is the deepest node kept. `accepted` means a leaf was reached, `backed-off`
a parent was published instead, `unknown` that not even the top level passed.

A level counts only when every level above it passed, also when thresholds do not rise with depth: the
calibration (train/calibrate.py) picks each depth's threshold on the images that reached that depth, so a
threshold means "given its parent passed", and the evaluation's back-off figures use the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .taxonomy import Node, Taxonomy

DecisionKind = Literal["accepted", "backed-off", "unknown"]
OutputKind = Literal["leaf_probabilities", "leaf_logits"]


@dataclass(frozen=True)
class LevelScore:
    depth: int
    id: str
    name: str
    slug: str
    score: float
    passed: bool


@dataclass(frozen=True)
class Decision:
    decision: DecisionKind
    label: str | None  # "Fruit/Apple" or None when unknown
    path: tuple[str, ...]
    levels: tuple[LevelScore, ...]  # the most probable node at each depth down the chosen path
    top_k: tuple[tuple[str, float], ...] = field(default=())  # leaf alternatives
    reason: str | None = None  # why unknown: low_confidence (no level passed) or unfamiliar (open set)
    open_set_score: float | None = None  # the max leaf logit, for a model that has logits
    source: Literal["model", "enrolled"] = "model"  # who decided: the trained classes or an enrolled product
    similarity: float | None = None  # an enrolled product's cosine similarity to its prototype


def decision_fields(decision: Decision, reason: str | None = None) -> dict:
    """The decision's part of a label message (protocol.Label): label, path, levels, decision, reason, top_k.
    `reason` says why an unknown is unknown (`low_confidence` when the caller knows nothing more)."""
    fields: dict = {
        "label": decision.label,
        "path": list(decision.path),
        "levels": [
            {"depth": lv.depth, "id": lv.id, "name": lv.name, "score": lv.score, "passed": lv.passed}
            for lv in decision.levels
        ],
        "decision": decision.decision,
        "top_k": [{"label": label, "score": score} for label, score in decision.top_k],
    }
    if decision.open_set_score is not None:
        fields["open_set_score"] = decision.open_set_score
    if decision.source == "enrolled":
        fields["source"] = "enrolled"
        fields["similarity"] = decision.similarity
    if decision.decision == "unknown":
        fields["reason"] = reason or decision.reason or "low_confidence"
    return fields


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits along the last axis, in float64 (stable: the maximum subtracted first)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def leaf_probabilities(scores: np.ndarray, kind: OutputKind) -> np.ndarray:
    """The model's dequantized leaf output as probabilities: a softmax for logits, as they are otherwise."""
    return softmax(scores) if kind == "leaf_logits" else np.asarray(scores, dtype=np.float64)


def thresholds_for(taxonomy: Taxonomy, thresholds: dict[str, float] | None) -> list[float]:
    """Per-depth thresholds as a list (index 0 = depth 1); a missing depth accepts anything (0.0)."""
    thresholds = thresholds or {}
    return [float(thresholds.get(f"depth_{d}", 0.0)) for d in range(1, taxonomy.depth + 1)]


class Decoder:
    """Precomputes per-node leaf index sets once, so decoding a frame is a few small numpy sums.

    `kind` is what the model outputs (the manifest's output.kind); `open_set_threshold` the bundle's
    max-logit threshold (None: no open-set check)."""

    def __init__(
        self,
        taxonomy: Taxonomy,
        thresholds: dict[str, float] | None = None,
        top_k: int = 3,
        kind: OutputKind = "leaf_probabilities",
        open_set_threshold: float | None = None,
    ):
        if open_set_threshold is not None and kind != "leaf_logits":
            raise ValueError("an open-set threshold needs a model with leaf logits")
        self.taxonomy = taxonomy
        self.thresholds = thresholds_for(taxonomy, thresholds)
        self.top_k = top_k
        self.kind = kind
        self.open_set_threshold = open_set_threshold
        index = {leaf.label: i for i, leaf in enumerate(taxonomy.leaves)}
        self._leaves_under: dict[str, np.ndarray] = {}
        for node in taxonomy.nodes():
            self._leaves_under[node.label] = np.array(
                [index[leaf.label] for leaf in node.walk() if leaf.is_leaf], dtype=np.int64
            )
        # Per parent (None: the top level): the leaves below it and which child each falls under, so one
        # np.bincount scores all siblings at once (a flat 1001-class taxonomy: 0.05 ms instead of 4 ms).
        self._groups: dict[str | None, tuple[np.ndarray, np.ndarray]] = {}
        for parent, children in [(None, taxonomy.roots)] + [(n.label, n.children) for n in taxonomy.nodes()]:
            if children:
                leaves = [self._leaves_under[c.label] for c in children]
                self._groups[parent] = (
                    np.concatenate(leaves),
                    np.repeat(np.arange(len(children)), [len(x) for x in leaves]),
                )

    def decode(self, scores: np.ndarray) -> Decision:
        """Decide on one frame's dequantized leaf output (probabilities or logits, as `kind` says)."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (self.taxonomy.num_leaves,):
            raise ValueError(f"expected {self.taxonomy.num_leaves} leaf scores, got shape {scores.shape}")
        if not np.all(np.isfinite(scores)):
            raise ValueError("leaf scores contain NaN or infinity")
        probs = leaf_probabilities(scores, self.kind)
        open_set = round(float(scores.max()), 4) if self.kind == "leaf_logits" else None
        unfamiliar = self.open_set_threshold is not None and float(scores.max()) < self.open_set_threshold
        levels: list[LevelScore] = []
        kept: list[Node] = []
        candidates = self.taxonomy.roots
        parent: str | None = None
        while candidates:
            leaves, child_of_leaf = self._groups[parent]
            scores = np.bincount(child_of_leaf, weights=probs[leaves], minlength=len(candidates))
            best = int(np.argmax(scores))
            node = candidates[best]
            # Dequantized uint8 leaves can sum past 1 (up to 257/256): a score is a probability, clamped.
            score = min(max(float(scores[best]), 0.0), 1.0)
            passed = score >= self.thresholds[node.depth - 1] and not unfamiliar
            levels.append(LevelScore(node.depth, node.id, node.name, node.slug, round(score, 6), passed))
            if not passed:
                break
            kept.append(node)
            candidates, parent = node.children, node.label
        if not kept:
            kind: DecisionKind = "unknown"
        elif kept[-1].is_leaf:
            kind = "accepted"
        else:
            kind = "backed-off"
        order = np.argsort(-probs)[: self.top_k]
        top = tuple(
            (self.taxonomy.leaves[i].label, round(min(max(float(probs[i]), 0.0), 1.0), 6)) for i in order
        )
        return Decision(
            decision=kind,
            label=kept[-1].label if kept else None,
            path=kept[-1].path if kept else (),
            levels=tuple(levels),
            top_k=top,
            reason=None if kept else ("unfamiliar" if unfamiliar else "low_confidence"),
            open_set_score=open_set,
        )
