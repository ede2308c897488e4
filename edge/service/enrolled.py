"""Products enrolled on the device: durable prototype memory in the state directory (sqlite3, one
transaction per change, so an enrollment is all there or not at all, also after kill -9 or power loss).

Per product: its label path, when and how it was enrolled, its exemplars as small JPEG thumbnails (so a new
model can embed them again) and, per model (bundle sha256), the exemplars' embeddings. Keeping embeddings
per model is what makes a rollback free: the old model's vectors are still there.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..kernel.prototypes import RIVALS, EmbeddingSpace, PrototypeIndex, normalise, overlaps
from ..kernel.taxonomy import Taxonomy

SCHEMA = """
CREATE TABLE IF NOT EXISTS product (
    label TEXT PRIMARY KEY,
    created REAL NOT NULL,
    source TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS exemplar (
    id INTEGER PRIMARY KEY,
    label TEXT NOT NULL REFERENCES product(label) ON DELETE CASCADE ON UPDATE CASCADE,
    thumbnail BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS embedding (
    exemplar INTEGER NOT NULL REFERENCES exemplar(id) ON DELETE CASCADE,
    model TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (exemplar, model)
);
"""


class EnrollError(ValueError):
    """An enrollment refused; the message is one line saying why and what to do."""


@dataclass(frozen=True)
class Product:
    label: str
    exemplars: int
    created: float
    source: str  # "photos" | "belt"


def check_label(label: object, taxonomy: Taxonomy) -> str:
    """`label` as a path the enrolled product may have: not a trained class, not a trained inner node, not
    under a trained leaf (a leaf cannot get children without retraining)."""
    if not isinstance(label, str) or not label.strip():
        raise EnrollError('label: a path like "Packages/Milk/New-Brand" is needed')
    parts = [p.strip() for p in label.split("/")]
    if any(not p or len(p) > 64 for p in parts) or len(parts) > 8:
        raise EnrollError(f"label {label!r}: 1 to 8 non-empty names of up to 64 characters, joined by '/'")
    label = "/".join(parts)
    node = taxonomy.by_label.get(label)
    if node is not None:
        kind = "class" if node.is_leaf else "branch"
        raise EnrollError(f"label {label!r} is a trained {kind} of the model: enroll a new product name")
    for depth in range(1, len(parts)):
        parent = taxonomy.by_label.get("/".join(parts[:depth]))
        if parent is not None and parent.is_leaf:
            raise EnrollError(
                f"label {label!r}: {parent.label!r} is a trained product, not a branch; enroll beside it"
            )
    return label


class EnrolledStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # rare writes: each enrollment survives power loss
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(
        self, label: str, thumbnails: list[bytes], embeddings: np.ndarray, model: str, source: str
    ) -> None:
        """One product with its exemplars and their embeddings under `model`, in one transaction."""
        if len(thumbnails) != len(embeddings) or not thumbnails:
            raise EnrollError("enrollment needs at least one readable photo")
        with self._lock, self._transaction():
            if self._db.execute("SELECT 1 FROM product WHERE label = ?", (label,)).fetchone():
                raise EnrollError(f"label {label!r} is already enrolled: remove or rename it first")
            self._db.execute(
                "INSERT INTO product (label, created, source) VALUES (?, ?, ?)", (label, time.time(), source)
            )
            for thumbnail, vector in zip(thumbnails, embeddings, strict=True):
                cursor = self._db.execute(
                    "INSERT INTO exemplar (label, thumbnail) VALUES (?, ?)", (label, thumbnail)
                )
                self._db.execute(
                    "INSERT INTO embedding (exemplar, model, vector) VALUES (?, ?, ?)",
                    (cursor.lastrowid, model, _blob(vector)),
                )

    def remove(self, label: str) -> None:
        with self._lock, self._transaction():
            if self._db.execute("DELETE FROM product WHERE label = ?", (label,)).rowcount == 0:
                raise EnrollError(f"label {label!r} is not enrolled")

    def rename(self, label: str, new_label: str) -> None:
        with self._lock, self._transaction():
            if self._db.execute("SELECT 1 FROM product WHERE label = ?", (new_label,)).fetchone():
                raise EnrollError(f"label {new_label!r} is already enrolled")
            if (
                self._db.execute("UPDATE product SET label = ? WHERE label = ?", (new_label, label)).rowcount
                == 0
            ):
                raise EnrollError(f"label {label!r} is not enrolled")

    def products(self) -> list[Product]:
        with self._lock:
            rows = self._db.execute(
                "SELECT p.label, COUNT(e.id), p.created, p.source FROM product p "
                "LEFT JOIN exemplar e ON e.label = p.label GROUP BY p.label ORDER BY p.label"
            ).fetchall()
        return [Product(*row) for row in rows]

    def thumbnails(self, label: str | None = None) -> list[tuple[int, str, bytes]]:
        """(exemplar id, label, JPEG) of every exemplar, or of one product's."""
        query = "SELECT id, label, thumbnail FROM exemplar" + (" WHERE label = ?" if label else "")
        with self._lock:
            return self._db.execute(query + " ORDER BY id", (label,) if label else ()).fetchall()

    def missing(self, model: str) -> list[tuple[int, str, bytes]]:
        """The exemplars that have no embedding under `model` yet (a new model: embed them again)."""
        with self._lock:
            return self._db.execute(
                "SELECT id, label, thumbnail FROM exemplar WHERE id NOT IN "
                "(SELECT exemplar FROM embedding WHERE model = ?) ORDER BY id",
                (model,),
            ).fetchall()

    def add_embeddings(self, model: str, vectors: dict[int, np.ndarray]) -> None:
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO embedding (exemplar, model, vector) VALUES (?, ?, ?)",
                [(i, model, _blob(v)) for i, v in vectors.items()],
            )

    def reembed(self, model: str, embed: Callable[[bytes], np.ndarray]) -> int:
        """Embed every exemplar the model `model` has not seen (with `embed`: JPEG -> vector); returns how
        many. Older models' vectors stay, for a rollback."""
        missing = self.missing(model)
        if missing:
            self.add_embeddings(model, {i: embed(jpeg) for i, _, jpeg in missing})
        return len(missing)

    def index(
        self,
        model: str,
        space: EmbeddingSpace | None,
        min_similarity: float,
        margin: float,
        rivals: int = RIVALS,
    ) -> PrototypeIndex:
        """The enrolled products' prototypes under `model`, made in its embedding `space` (the bundle's;
        None: raw cosine), ready to match frames."""
        space = space if space is not None else EmbeddingSpace()
        by_label = self.exemplars(model)
        labels = sorted(by_label)
        protos = (
            np.stack([space.prototype(by_label[label]) for label in labels]) if labels else np.zeros((0, 1))
        )
        return PrototypeIndex(labels, protos, space, min_similarity, margin, rivals)

    def separation(
        self, model: str, space: EmbeddingSpace | None = None, leaf_labels: list[str] | None = None
    ) -> list[str]:
        """Products that `model` does not tell apart from another enrolled product or a trained leaf, in
        its embedding `space` (`prototypes.overlaps`)."""
        return overlaps(self.exemplars(model), space if space is not None else EmbeddingSpace(), leaf_labels)

    def exemplars(self, model: str) -> dict[str, np.ndarray]:
        """Label -> its exemplars' embeddings under `model` (K x D)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT e.label, m.vector FROM embedding m JOIN exemplar e ON e.id = m.exemplar "
                "WHERE m.model = ? ORDER BY e.label, e.id",
                (model,),
            ).fetchall()
        by_label: dict[str, list[np.ndarray]] = {}
        for label, blob in rows:
            by_label.setdefault(label, []).append(np.frombuffer(blob, dtype=np.float32))
        return {label: np.stack(vectors) for label, vectors in by_label.items()}

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(normalise(vector), dtype=np.float32).tobytes()
