"""Enrolled products: nearest prototype in the model's embedding space, merged with the trained decision.

An enrolled product is a label path and a few exemplar embeddings (the v3 bundle's `embedding` output of
its photos). Its prototype is the mean of the L2-normalised exemplars, normalised again; a frame matches
the product whose prototype is closest by cosine similarity.

The merge never overrides a confident trained class without evidence: an enrolled product decides only
when its similarity reaches `min_similarity` and beats the similarity to the trained class the model
picked (that class's centroid, from the bundle's calibration images) by `margin`. A frame of a trained
product sits nearer its own centroid than a prototype of something else, so trained classes keep their
labels; a new product sits nearer its own prototype than the centroid of the trained class it resembles.
numpy only: the device runs it per frame.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .decode import Decision, LevelScore
from .taxonomy import Taxonomy, slugify


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


def prototype(exemplars: np.ndarray) -> np.ndarray:
    """One unit vector for a product from its exemplar embeddings (K x D)."""
    return normalise(normalise(exemplars).mean(axis=0))


@dataclass(frozen=True)
class Match:
    label: str  # the enrolled product's label path, "Packages/Milk/New-Brand"
    similarity: float  # cosine to its prototype
    trained_similarity: float | None  # cosine to the centroid of the trained class the model picked


class PrototypeIndex:
    """The enrolled products' prototypes as one matrix, so matching a frame is one matrix-vector product
    (500 products x 1280 features: about 0.1 ms)."""

    def __init__(
        self,
        labels: list[str],
        prototypes: np.ndarray,
        centroids: np.ndarray | None = None,
        min_similarity: float = 0.6,
        margin: float = 0.05,
    ):
        self.labels = list(labels)
        self.prototypes = normalise(prototypes) if len(labels) else np.zeros((0, 1), np.float32)
        self.centroids = normalise(centroids) if centroids is not None else None  # per trained leaf
        self.min_similarity = min_similarity
        self.margin = margin

    def __len__(self) -> int:
        return len(self.labels)

    def match(self, embedding: np.ndarray, trained_leaf: int | None = None) -> Match | None:
        """The enrolled product this embedding is, or None: similarity at least `min_similarity`, and, when
        the model's trained leaf is given and centroids are known, at least `margin` above the similarity
        to that leaf's centroid."""
        if not self.labels:
            return None
        e = normalise(embedding)
        sims = self.prototypes @ e
        best = int(np.argmax(sims))
        similarity = float(sims[best])
        trained = None
        if trained_leaf is not None and self.centroids is not None:
            trained = float(self.centroids[trained_leaf] @ e)
        if similarity < self.min_similarity or (trained is not None and similarity < trained + self.margin):
            return None
        return Match(self.labels[best], round(similarity, 4), None if trained is None else round(trained, 4))


def enrolled_decision(match: Match, taxonomy: Taxonomy, model_decision: Decision) -> Decision:
    """The decision an enrolled product makes: its label, accepted, one level per depth of its path (the
    trained nodes above it keep their ids; the enrolled ones get `enrolled:<path>`), scored by the
    similarity; the model's own top leaves stay as the alternatives."""
    parts = tuple(match.label.split("/"))
    levels = []
    for depth in range(1, len(parts) + 1):
        label = "/".join(parts[:depth])
        node = taxonomy.by_label.get(label)
        name = parts[depth - 1]
        levels.append(
            LevelScore(
                depth,
                node.id if node is not None else f"enrolled:{label}",
                name,
                node.slug if node is not None else slugify(name),
                match.similarity,
                True,
            )
        )
    return replace(
        model_decision,
        decision="accepted",
        label=match.label,
        path=parts,
        levels=tuple(levels),
        reason=None,
        source="enrolled",
        similarity=match.similarity,
    )
