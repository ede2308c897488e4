"""Enrolled products: nearest prototype in the model's embedding space, merged with the trained decision.

An enrolled product is a label path and a few exemplar embeddings (the v3 bundle's `embedding` output of
its photos). Its prototype is the mean of the L2-normalised exemplars, normalised again; a frame matches
the product whose prototype is closest by cosine similarity.

The merge never overrides a trained class without evidence: an enrolled product decides only when its
similarity reaches `min_similarity` and beats by `margin` the similarity to every trained class the model
ranks among its top `rivals` (those classes' centroids, from the bundle's training images). A frame of a
trained product sits nearer its own centroid than a prototype of something else, also where the model
ranked its class second, so trained classes keep their labels; a new product sits nearer its own
prototype than the centroids of the trained classes it resembles.
Matching happens in the bundle's whitened embedding space when it has one (`EmbeddingSpace`, from the
converter's training images): raw cosine similarity is dominated by the few directions in which
photos of one product vary most (pose, light, background), so a new product looks as close to the
trained class it resembles as to its own few exemplars. Dividing those directions out by the trained
classes' within-class spread lets the directions that tell products apart decide (leave-classes-out:
docs/benchmarks.md "Enrolled products"). Bundles without it match by raw cosine.
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


# Rank of the whitening's explicit part and its shrinkage towards the identity (convert stores it). Leaving
# 10 classes out, rank 256 kept the figures of full whitening; 128 traced about the same trade-off, a
# little lower where it costs the trained classes least (docs/benchmarks.md); 0.3 instead of 0.1 shrinkage
# changed little.
WHITENING_RANK = 256
WHITENING_SHRINKAGE = 0.1
# Defaults of `[enroll] min_similarity`, `margin` and `rivals` in the whitened space (edge/service/config.py
# EnrollConfig refers to these); measured in docs/benchmarks.md "Enrolled products": leaving 10 classes out
# of the Lite0 288 recipe, 5 photos each, 78 % of the enrolled products' images right for 0.6 points of
# the trained classes', whose published labels stay 98.1 % right (10 other classes left out: 76.9 %, 0.1
# points, 98.5 %). Beating only the model's top class (rivals 1) cost the trained classes' labels their
# precision target (97.7 % at margin 0.03).
MIN_SIMILARITY = 0.2
MARGIN = 0.02
RIVALS = 5


@dataclass(frozen=True)
class Whitening:
    """A low-rank whitening of unit embeddings: x = e - mean; the `basis` directions (D x r, orthonormal)
    scaled by `scales`, the rest of the space by `residual` (both 1/sqrt of a within-class variance)."""

    mean: np.ndarray  # (D,)
    basis: np.ndarray  # (D, r)
    scales: np.ndarray  # (r,)
    residual: float

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        x = normalise(vectors) - self.mean
        p = x @ self.basis
        # residual * (x - basis basis^T x) + basis diag(scales) basis^T x, in one pass
        return normalise(self.residual * x + (p * (self.scales - self.residual)) @ self.basis.T)


@dataclass(frozen=True)
class EmbeddingSpace:
    """Where enrolled products are matched: the bundle's whitening (None: raw cosine) and the trained
    leaves' centroids in that space (None: the similarity rule only)."""

    whitening: Whitening | None = None
    centroids: np.ndarray | None = None  # (leaves x D), unit rows

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """Embeddings (N x D or D) as unit vectors of this space."""
        return normalise(vectors) if self.whitening is None else self.whitening.apply(vectors)

    def prototype(self, exemplars: np.ndarray) -> np.ndarray:
        """One unit vector of this space for a product (or a trained leaf) from its embeddings (K x D)."""
        return normalise(self.project(exemplars).mean(axis=0))

    def similarities(self, vectors: np.ndarray) -> np.ndarray:
        """Cosine of embeddings (N x D or D) to each trained leaf's centroid in this space (N x L or L)."""
        if self.centroids is None:
            raise ValueError("this embedding space has no centroids")
        return self.project(vectors) @ self.centroids.T


def centroid_scores(
    logits: np.ndarray,
    embeddings: np.ndarray,
    weight: float,
    space: EmbeddingSpace | None,
    temperature: float = 1.0,
) -> np.ndarray:
    """The leaf scores a bundle with a centroid term decides on (N x L or L): (its logits + `weight` x each
    leaf's centroid similarity in `space`) / `temperature`. The same sum on the device (runtime), at
    convert (thresholds, open set) and in evaluation, so the figures cannot drift apart."""
    if space is None:
        raise ValueError("a centroid term needs the bundle's embedding space")
    return ((logits + weight * space.similarities(embeddings)) / temperature).astype(np.float32)


def fit_whitening(
    vectors: np.ndarray,
    labels: np.ndarray,
    rank: int = WHITENING_RANK,
    shrinkage: float = WHITENING_SHRINKAGE,
) -> Whitening | None:
    """The whitening of the within-class covariance of these embeddings (host side, at convert): S pooled
    over the classes' residuals, shrunk towards its mean variance (few images per class leave most of S
    unmeasured), its top `rank` eigenvectors kept and the rest of the space at their mean variance. None
    when no class has two images (nothing to measure)."""
    x = normalise(vectors).astype(np.float64)
    labels = np.asarray(labels)
    mean = x.mean(axis=0)
    residuals = x.copy()
    for label in np.unique(labels):
        rows = labels == label
        residuals[rows] -= x[rows].mean(axis=0)
    cov = residuals.T @ residuals / len(x)
    dim = cov.shape[0]
    average = float(np.trace(cov)) / dim
    if average <= 1e-12:
        return None
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = np.maximum(eigenvalues[order], 0.0), eigenvectors[:, order]
    rank = min(rank, dim)
    rest = float(eigenvalues[rank:].mean()) if rank < dim else 0.0
    kept = (1 - shrinkage) * eigenvalues[:rank] + shrinkage * average
    residual = (1 - shrinkage) * rest + shrinkage * average
    return Whitening(
        mean=mean.astype(np.float32),
        basis=eigenvectors[:, :rank].astype(np.float32),
        scales=(1.0 / np.sqrt(kept)).astype(np.float32),
        residual=float(1.0 / np.sqrt(residual)),
    )


@dataclass(frozen=True)
class Match:
    label: str  # the enrolled product's label path, "Packages/Milk/New-Brand"
    similarity: float  # cosine to its prototype
    trained_similarity: float | None  # cosine to the nearest centroid of the model's top trained classes


class PrototypeIndex:
    """The enrolled products' prototypes as one matrix, so matching a frame is one matrix-vector product
    (500 products x 1280 features: about 0.1 ms; whitening the frame first adds two D x r products)."""

    def __init__(
        self,
        labels: list[str],
        prototypes: np.ndarray,
        space: EmbeddingSpace | None = None,
        min_similarity: float = MIN_SIMILARITY,
        margin: float = MARGIN,
        rivals: int = RIVALS,
    ):
        self.labels = list(labels)
        self.prototypes = normalise(prototypes) if len(labels) else np.zeros((0, 1), np.float32)
        self.space = space if space is not None else EmbeddingSpace()
        self.min_similarity = min_similarity
        self.margin = margin
        self.rivals = rivals

    def __len__(self) -> int:
        return len(self.labels)

    def match(self, embedding: np.ndarray, leaf_scores: np.ndarray | None = None) -> Match | None:
        """The enrolled product this embedding is, or None: similarity at least `min_similarity`, and, when
        the model's leaf scores (logits or probabilities) are given and centroids are known, at least
        `margin` above the similarity to the nearest centroid of the `rivals` leaves the model ranks
        highest (all in the index's space; the prototypes were made in it)."""
        if not self.labels:
            return None
        e = self.space.project(embedding)
        sims = self.prototypes @ e
        best = int(np.argmax(sims))
        similarity = float(sims[best])
        trained = None
        centroids = self.space.centroids
        if leaf_scores is not None and centroids is not None:
            top = np.argsort(-np.asarray(leaf_scores, dtype=np.float32).ravel())[: self.rivals]
            trained = float(np.max(centroids[top] @ e))
        if similarity < self.min_similarity or (trained is not None and similarity < trained + self.margin):
            return None
        return Match(self.labels[best], round(similarity, 4), None if trained is None else round(trained, 4))


def overlaps(
    exemplars: dict[str, np.ndarray], space: EmbeddingSpace, leaf_labels: list[str] | None = None
) -> list[str]:
    """Enrolled products this model does not tell apart: those whose exemplars (K x D each) are on average
    at least as close to another product's prototype, or to a trained leaf's centroid, as to their own
    (the prototype of their other exemplars when there are several, so a product is not judged by itself).
    One line per product, naming what it is confused with."""
    labels = sorted(exemplars)
    projected = {label: space.project(np.atleast_2d(exemplars[label])) for label in labels}
    protos = {label: normalise(v.mean(axis=0)) for label, v in projected.items()}
    centroids = space.centroids if space.centroids is not None and leaf_labels else None
    problems = []
    for label in labels:
        v = projected[label]
        if len(v) > 1:  # leave one out: each exemplar against the prototype of the others
            others = normalise((v.sum(axis=0, keepdims=True) - v) / (len(v) - 1))
            own = float(np.mean(np.sum(v * others, axis=1)))
        else:
            own = float(v[0] @ protos[label])
        rivals = [(float(np.mean(v @ protos[o])), o) for o in labels if o != label]
        if centroids is not None:
            sims = (v @ centroids.T).mean(axis=0)
            best = int(np.argmax(sims))
            rivals.append((float(sims[best]), f"the trained {leaf_labels[best]}"))
        if rivals:
            similarity, rival = max(rivals)
            if similarity >= own:
                problems.append(
                    f"{label} and {rival} look the same to this model (its photos match {rival} "
                    f"{similarity:.3f}, their own prototype {own:.3f}): enroll clearer photos or remove one"
                )
    return problems


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
