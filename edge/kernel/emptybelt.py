"""The empty-belt decision, shared by the device (edge/service/noitem.py keeps the reference, its storage and
its threads) and the host (`taxonedge evaluate --belt`), so that both call a frame empty by the same rule.

The reference is the L2-normalised mean of the normalised embeddings of frames captured while the belt was
empty; a frame is empty when the cosine similarity of its embedding to that mean is at least the threshold.
The threshold comes from the captured frames only: the lowest similarity of a captured frame to the mean,
less a margin, never below a floor (a belt that varies that much would make every frame look empty).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Defaults of `[no_item] margin` and `min_similarity` (edge/service/config.py NoItemConfig refers to these).
MARGIN = 0.1
MIN_SIMILARITY = 0.8
MIN_FRAMES = 10  # fewer captured frames say too little about the belt
MAX_STORED = 512  # embeddings kept (evenly spaced): a minute of a 30 fps camera would be 1800


def unit(vector: np.ndarray) -> np.ndarray:
    """`vector` scaled to length 1 (float32); a zero vector stays zero (similar to nothing)."""
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """(n, d) embeddings, each row scaled to length 1."""
    return np.stack([unit(e) for e in embeddings])


def centroid_of(embeddings: np.ndarray) -> np.ndarray:
    """The L2-normalised mean of the normalised embeddings."""
    return unit(np.mean(unit_rows(embeddings), axis=0))


def similarities_to(centroid: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """Each embedding's cosine similarity to `centroid` (a unit vector)."""
    return unit_rows(embeddings) @ centroid


def threshold_of(similarities: np.ndarray, margin: float, floor: float) -> float:
    """From the captures only: the least similar captured frame, less the margin, at least `floor`."""
    return max(float(np.min(similarities)) - margin, floor)


def evenly(items: list, count: int) -> list:
    """At most `count` of `items`, evenly spaced, first and last included."""
    if len(items) <= count:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count).round()]


@dataclass(frozen=True)
class EmptyBelt:
    """The learned empty belt: what a frame's embedding is compared with. Immutable, replaced whole."""

    centroid: np.ndarray  # unit vector
    threshold: float

    @classmethod
    def learned(
        cls, captured: list[np.ndarray], margin: float = MARGIN, min_similarity: float = MIN_SIMILARITY
    ) -> EmptyBelt:
        """From the embeddings of the frames captured while the belt was empty, as learn_empty keeps them
        (at most MAX_STORED, evenly spaced)."""
        kept = np.stack(evenly(list(captured), MAX_STORED))
        centroid = centroid_of(kept)
        return cls(centroid, threshold_of(similarities_to(centroid, kept), margin, min_similarity))

    def similarity(self, embedding: np.ndarray) -> float:
        return float(unit(embedding) @ self.centroid)

    def empty(self, embedding: np.ndarray) -> bool:
        return self.similarity(embedding) >= self.threshold
