"""The label taxonomy: a tree of uneven depth whose leaves are the model's classes.

One type for every stage. A taxonomy is built from a folder tree of images, from an explicit YAML/JSON
file, or from a bundle manifest (`Taxonomy.from_dict`). Everything else is derived from the tree and never
stored twice: the leaf order (the model's output order), the per-depth node lists, the leaf-to-node
matrices that turn leaf probabilities into per-depth probabilities, and a content hash.

A leaf shallower than a depth "counts as itself" at that depth: `Fruit/Avocado` (depth 2) is its own node
at depth 3, so every leaf has exactly one node at every depth and per-depth metrics stay comparable.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

# MQTT topic levels must not contain these (wildcards, separator, NUL); slugs avoid them by construction.
_MQTT_UNSAFE = re.compile(r"[/+#\x00]")
_SLUG_DROP = re.compile(r"[^a-z0-9_-]+")


class TaxonomyError(ValueError):
    """A taxonomy that cannot be used: the message names the node and what to change."""


def slugify(name: str) -> str:
    """A lower-case ASCII name safe as an MQTT topic level and a file name: `Granny Smith` ->
    `granny-smith`."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = _SLUG_DROP.sub("-", ascii_name.lower()).strip("-")
    return re.sub(r"-{2,}", "-", slug)


@dataclass
class Node:
    """One node of the tree. `path` is the tuple of names from the top level down to this node."""

    name: str
    display: str
    slug: str
    id: str
    path: tuple[str, ...]
    children: list[Node] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.path)

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def label(self) -> str:
        """The label path as people read it: `Fruit/Apple/Granny-Smith`."""
        return "/".join(self.path)

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()


class Taxonomy:
    """A validated label tree. Build with `from_folder`, `from_file`, `from_paths` or `from_dict`."""

    def __init__(self, roots: Sequence[Node], name: str = "taxonomy"):
        if not roots:
            raise TaxonomyError("the taxonomy is empty: it needs at least one label")
        self.name = name
        self.roots = list(roots)
        self._check()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_paths(cls, label_paths: Iterable[Sequence[str] | str], name: str = "taxonomy") -> Taxonomy:
        """Build from leaf label paths (`"Fruit/Apple/Granny-Smith"` or a tuple of names).

        A path that is a prefix of another is an error: a folder that directly holds images is a leaf,
        and a leaf cannot also have children (move its images into a subfolder).
        """
        tree: dict = {}
        leaves: set[tuple[str, ...]] = set()
        for raw in label_paths:
            parts = tuple(p for p in (raw.split("/") if isinstance(raw, str) else raw))
            if not parts or any(p == "" for p in parts):
                raise TaxonomyError(f"label path {raw!r} has an empty name")
            leaves.add(parts)
            level = tree
            for part in parts:
                level = level.setdefault(part, {})
        for leaf in leaves:
            level = tree
            for part in leaf:
                level = level[part]
            if level:
                child = next(iter(sorted(level)))
                raise TaxonomyError(
                    f"'{'/'.join(leaf)}' is a leaf (it holds images) and also has children such as "
                    f"'{child}': move its images into a subfolder of their own"
                )

        def build(sub: dict, prefix: tuple[str, ...]) -> list[Node]:
            return [
                _make_node(key, prefix + (key,), children=build(sub[key], prefix + (key,)))
                for key in sorted(sub)
            ]

        return cls(build(tree, ()), name=name)

    @classmethod
    def from_folder(cls, root: str | Path, name: str | None = None) -> Taxonomy:
        """Every folder under `root` that directly holds images is a leaf; its relative path is its label.

        Folders with neither images nor image-holding subfolders are reported, since a class with no
        examples cannot be trained.
        """
        root = Path(root)
        if not root.is_dir():
            raise TaxonomyError(f"{root} is not a folder of images")
        leaf_dirs: list[tuple[str, ...]] = []
        empty: list[str] = []
        for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
            has_images = any(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.iterdir() if f.is_file())
            has_subdirs = any(f.is_dir() for f in folder.iterdir())
            if has_images:
                leaf_dirs.append(folder.relative_to(root).parts)
            elif not has_subdirs:
                empty.append(str(folder.relative_to(root)))
        if empty:
            raise TaxonomyError(
                f"leaf folders without images under {root}: {', '.join(empty[:5])}"
                + (f" (and {len(empty) - 5} more)" if len(empty) > 5 else "")
                + "; add images or remove the folders"
            )
        if not leaf_dirs:
            raise TaxonomyError(f"no images under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        return cls.from_paths(leaf_dirs, name=name or root.name)

    @classmethod
    def from_dict(cls, data: dict) -> Taxonomy:
        """Inverse of `to_dict`: `{"name": ..., "nodes": [{"name", "display"?, "id"?, "children"?}]}`."""
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
            raise TaxonomyError("a taxonomy file needs a top-level 'nodes' list")

        def build(items: list, prefix: tuple[str, ...]) -> list[Node]:
            nodes = []
            for item in items:
                if isinstance(item, str):
                    item = {"name": item}
                if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                    where = "/".join(prefix) or "top level"
                    raise TaxonomyError(f"under {where}: each node needs a 'name' string, got {item!r}")
                unknown = set(item) - {"name", "display", "id", "slug", "children"}
                if unknown:
                    raise TaxonomyError(
                        f"node '{'/'.join(prefix + (item['name'],))}': unknown keys {sorted(unknown)}"
                    )
                path = prefix + (item["name"],)
                children = build(item.get("children") or [], path)
                nodes.append(
                    _make_node(
                        item["name"],
                        path,
                        display=item.get("display"),
                        id=item.get("id"),
                        slug=item.get("slug"),
                        children=children,
                    )
                )
            return nodes

        return cls(build(data["nodes"], ()), name=str(data.get("name", "taxonomy")))

    @classmethod
    def from_file(cls, path: str | Path) -> Taxonomy:
        """Read a YAML or JSON taxonomy file (see `to_dict` for the layout)."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() in {".yaml", ".yml"}:
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # yaml and json raise different types; both mean "not parseable"
            raise TaxonomyError(f"{path}: cannot parse taxonomy file: {exc}") from exc
        try:
            return cls.from_dict(data)
        except TaxonomyError as exc:
            raise TaxonomyError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict:
        def dump(node: Node) -> dict:
            item: dict = {"name": node.name, "display": node.display, "slug": node.slug, "id": node.id}
            if node.children:
                item["children"] = [dump(c) for c in node.children]
            return item

        return {"name": self.name, "nodes": [dump(r) for r in self.roots]}

    # ---- checks -------------------------------------------------------------------------------
    def _check(self) -> None:
        ids: dict[str, str] = {}

        def check_siblings(nodes: list[Node], where: str) -> None:
            names: set[str] = set()
            slugs: dict[str, str] = {}
            for node in nodes:
                if node.name in names:
                    raise TaxonomyError(f"duplicate sibling '{node.name}' under {where}")
                names.add(node.name)
                if not node.slug:
                    raise TaxonomyError(
                        f"'{node.label}' has no usable slug (its name has no letters or digits): "
                        "give it an explicit 'slug'"
                    )
                if _MQTT_UNSAFE.search(node.slug):
                    raise TaxonomyError(f"slug '{node.slug}' of '{node.label}' is unsafe in an MQTT topic")
                if node.slug in slugs:
                    raise TaxonomyError(
                        f"siblings '{slugs[node.slug]}' and '{node.name}' under {where} have the same "
                        f"slug '{node.slug}': rename one or give it an explicit 'slug'"
                    )
                slugs[node.slug] = node.name
                if node.id in ids:
                    raise TaxonomyError(f"id '{node.id}' used by both '{ids[node.id]}' and '{node.label}'")
                ids[node.id] = node.label
                check_siblings(node.children, f"'{node.label}'")

        check_siblings(self.roots, "the top level")

    # ---- derived views ------------------------------------------------------------------------
    def nodes(self) -> Iterator[Node]:
        for root in self.roots:
            yield from root.walk()

    @cached_property
    def leaves(self) -> list[Node]:
        """The model's output order: depth-first, siblings sorted as stored."""
        return [n for n in self.nodes() if n.is_leaf]

    @cached_property
    def leaf_labels(self) -> list[str]:
        return [leaf.label for leaf in self.leaves]

    @cached_property
    def by_label(self) -> dict[str, Node]:
        return {n.label: n for n in self.nodes()}

    @property
    def num_leaves(self) -> int:
        return len(self.leaves)

    @cached_property
    def depth(self) -> int:
        return max(leaf.depth for leaf in self.leaves)

    def leaf_index(self, label: str | Sequence[str]) -> int:
        key = label if isinstance(label, str) else "/".join(label)
        try:
            return self._leaf_index[key]
        except KeyError:
            raise TaxonomyError(f"'{key}' is not a leaf of taxonomy '{self.name}'") from None

    @cached_property
    def _leaf_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.leaf_labels)}

    def level_nodes(self, depth: int) -> list[Node]:
        """The nodes that stand at `depth` (1-based): real nodes there, plus shallower leaves as
        themselves."""
        return self._levels[depth - 1][0]

    def level_matrix(self, depth: int) -> np.ndarray:
        """(num_leaves, len(level_nodes(depth))) 0/1 matrix: leaf probabilities @ M = per-depth
        probabilities."""
        return self._levels[depth - 1][1]

    def level_index(self, depth: int) -> np.ndarray:
        """For each leaf, the index of its node in `level_nodes(depth)`."""
        return self._levels[depth - 1][2]

    @cached_property
    def _levels(self) -> list[tuple[list[Node], np.ndarray, np.ndarray]]:
        levels = []
        for depth in range(1, self.depth + 1):
            nodes: list[Node] = []
            position: dict[str, int] = {}
            index = np.zeros(self.num_leaves, dtype=np.int64)
            for i, leaf in enumerate(self.leaves):
                node = self.ancestor(leaf, depth)
                if node.label not in position:
                    position[node.label] = len(nodes)
                    nodes.append(node)
                index[i] = position[node.label]
            matrix = np.zeros((self.num_leaves, len(nodes)), dtype=np.float32)
            matrix[np.arange(self.num_leaves), index] = 1.0
            matrix.setflags(write=False)
            index.setflags(write=False)
            levels.append((nodes, matrix, index))
        return levels

    def ancestor(self, node: Node, depth: int) -> Node:
        """The ancestor of `node` at `depth`, or the node itself when it is not that deep."""
        if depth >= node.depth:
            return node
        return self.by_label["/".join(node.path[:depth])]

    @cached_property
    def hash(self) -> str:
        """sha256 of the canonical tree (names, ids, slugs, order): equal hashes mean interchangeable
        models."""
        canonical = json.dumps(
            self.to_dict()["nodes"], sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def summary(self) -> str:
        counts = ", ".join(f"depth {d}: {len(self.level_nodes(d))}" for d in range(1, self.depth + 1))
        return f"{self.name}: {self.num_leaves} leaves, max depth {self.depth} ({counts})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Taxonomy) and self.hash == other.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def __repr__(self) -> str:
        return f"Taxonomy({self.summary()})"


def _make_node(
    name: str,
    path: tuple[str, ...],
    display: str | None = None,
    id: str | None = None,
    slug: str | None = None,
    children: list[Node] | None = None,
) -> Node:
    if not isinstance(name, str) or not name.strip():
        raise TaxonomyError(f"empty node name under '{'/'.join(path[:-1]) or 'the top level'}'")
    if any(ord(ch) < 32 for ch in name):
        raise TaxonomyError(f"node name {name!r} contains control characters")
    if "/" in name:
        raise TaxonomyError(f"node name '{name}' contains '/', which separates label path levels")
    node_slug = slug if slug is not None else slugify(name)
    # Without an explicit stable id the id is the slug path, which is stable as long as names are.
    parent_slug_path = [slugify(p) for p in path[:-1]]
    node_id = str(id) if id is not None else "/".join([*parent_slug_path, node_slug])
    return Node(
        name=name,
        display=display or name.replace("-", " ").replace("_", " "),
        slug=node_slug,
        id=node_id,
        path=path,
        children=children or [],
    )
