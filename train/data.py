"""Labelled image sets for training and evaluation: a folder tree or a Grocery-Store-style list file.

One loader for `taxonedge train` and `taxonedge evaluate`:

- a folder tree: every folder that directly holds images is a leaf, its relative path is the label;
- a run directory's `splits.json`: the images that run validated on (its "val" list), so that a model is
  evaluated on exactly the images its run held out;
- a list file of `path, fine_id, coarse_id` lines (paths relative to the list file's folder), optionally
  with a `classes.csv` beside it. A line's class is its fine id; folders are only where the file is. The
  label of an id is decided once: the hierarchy classes.csv gives it (its iconic image path,
  `/iconic-images-and-descriptions/Fruit/Apple/Golden-Delicious/x.jpg` -> `Fruit/Apple/Golden-Delicious`);
  without one, the folder path of the id's first line without the split folder
  (`train/Vegetables/Asparagus/x.jpg` -> `Vegetables/Asparagus`, a depth-2 leaf); for an image directly in
  the split folder, `Coarse/Fine` from classes.csv (`Fine` when both are equal). Lines whose folder
  disagrees with their id's label are labelled by the id: Grocery's test split keeps Brown-Cap-Mushroom
  in `Vegetables/Mushroom/`, train and val in `Vegetables/`, and classes.csv says
  `Vegetables/Mushroom/Brown-Cap-Mushroom`, so all three splits read as that (3-level) leaf.

A model trained before (on `Vegetables/Brown-Cap-Mushroom`) is still evaluated on them: `model_leaves` takes
a label that is not a leaf of the model but whose class name (last component) names exactly one leaf as
that leaf. Training builds its taxonomy from its own samples and does not use it.

Images are decoded with the shared `load_image`; unreadable ones are reported by path and skipped.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from taxonedge.edge.kernel.preprocess import ImageError, InputSpec, load_image
from taxonedge.edge.kernel.taxonomy import IMAGE_SUFFIXES, Taxonomy, TaxonomyError

from .rundir import RunDirError, read_splits

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data set that cannot be used; the message names the file (and line) and what to fix."""


@dataclass(frozen=True)
class Sample:
    path: str  # absolute
    label: str  # "Fruit/Apple/Granny-Smith"


def read_samples(source: str | Path) -> list[Sample]:
    """All labelled images of a folder tree or list file, in a stable order."""
    source = Path(source)
    if source.is_dir():
        return _folder_samples(source)
    if source.is_file() and source.name == "splits.json":
        return _run_val_samples(source)
    if source.is_file():
        return _list_samples(source)
    raise DataError(f"{source}: no such folder or list file")


def _folder_samples(root: Path) -> list[Sample]:
    samples = [
        Sample(str(path.resolve()), "/".join(path.parent.relative_to(root).parts))
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and path.parent != root
    ]
    if not samples:
        raise DataError(f"{root}: no images in subfolders (expected ROOT/Label/Sub-label/image.jpg)")
    return samples


def _run_val_samples(splits_file: Path) -> list[Sample]:
    try:
        samples = [Sample(path, label) for path, label in read_splits(splits_file).val]
    except RunDirError as exc:
        raise DataError(str(exc)) from None
    if not samples:
        raise DataError(f"{splits_file}: the 'val' list is empty")
    return samples


@dataclass(frozen=True)
class _ClassRow:
    fine: str
    coarse: str
    label: str | None  # the hierarchy the iconic image path gives, None without one


def _read_classes(path: Path) -> dict[int, _ClassRow]:
    """classes.csv (`name, id, coarse name, coarse id[, iconic image path, ...]`) -> {fine id: row}."""
    rows: dict[int, _ClassRow] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for line_no, row in enumerate(csv.reader(fh), start=1):
            if line_no == 1 or not row:
                continue  # header
            try:
                fine_id, fine, coarse = int(row[1]), row[0].strip(), row[2].strip()
            except (IndexError, ValueError):
                raise DataError(
                    f"{path}:{line_no}: expected 'name, id, coarse name, coarse id, ...'"
                ) from None
            # /iconic-images-and-descriptions/Fruit/Apple/Golden-Delicious/Golden-Delicious_Iconic.jpg
            iconic = row[4].strip().lstrip("/") if len(row) > 4 else ""
            folders = PurePosixPath(iconic).parent.parts[1:] if iconic else ()
            rows[fine_id] = _ClassRow(fine, coarse, "/".join(folders) or None)
    return rows


def _list_samples(list_file: Path) -> list[Sample]:
    base = list_file.parent
    classes_csv = base / "classes.csv"
    classes = _read_classes(classes_csv) if classes_csv.exists() else {}
    samples: list[Sample] = []
    label_of_id: dict[int, str] = {}
    told: set[tuple[int, str]] = set()
    for line_no, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        try:
            rel, fine_id = fields[0], int(fields[1])
        except (IndexError, ValueError):
            raise DataError(
                f"{list_file}:{line_no}: expected 'path, fine_id, coarse_id', got {line!r}"
            ) from None
        folder = "/".join(Path(rel).parent.parts[1:])
        if fine_id not in label_of_id:
            row = classes.get(fine_id)
            if row is not None and row.label:
                label_of_id[fine_id] = row.label
            elif folder:
                label_of_id[fine_id] = folder
            elif row is not None:
                label_of_id[fine_id] = row.fine if row.fine == row.coarse else f"{row.coarse}/{row.fine}"
            else:
                raise DataError(
                    f"{list_file}:{line_no}: '{rel}' is not in a class folder and class {fine_id} is not "
                    f"in {classes_csv}: put images in SPLIT/Label/... folders or add classes.csv"
                )
        label = label_of_id[fine_id]
        # an absolute path's folder carries the dataset's location before the label: only its tail counts
        if folder and not (folder == label or folder.endswith("/" + label)) and (fine_id, folder) not in told:
            told.add((fine_id, folder))
            log.info("%s: class id %d in folder '%s' is '%s'", list_file.name, fine_id, folder, label)
        samples.append(Sample(str((base / rel).resolve()), label))
    if not samples:
        raise DataError(f"{list_file}: no image lines")
    return samples


def taxonomy_from_samples(samples: list[Sample], name: str) -> Taxonomy:
    try:
        return Taxonomy.from_paths(sorted({s.label for s in samples}), name=name)
    except TaxonomyError as exc:
        raise DataError(str(exc)) from None


def leaf_indices(taxonomy: Taxonomy, samples: list[Sample], where: str) -> np.ndarray:
    """Each sample's leaf index; labels the taxonomy does not have are an error listing them."""
    unknown = sorted({s.label for s in samples} - set(taxonomy.leaf_labels))
    if unknown:
        raise DataError(_not_leaves(where, unknown))
    return np.array([taxonomy.leaf_index(s.label) for s in samples], dtype=np.int64)


def model_leaves(
    taxonomy: Taxonomy, samples: list[Sample], where: str, novel: list[Sample] | None = None
) -> list[Sample]:
    """The samples with their labels as leaves of a model's taxonomy, for evaluation: a label that is not a
    leaf but whose class name (last component) is the last component of exactly one leaf is taken as that
    leaf (logged once per label): a model trained on `Vegetables/Brown-Cap-Mushroom` is evaluated on data
    that has it as `Vegetables/Mushroom/Brown-Cap-Mushroom`. Other labels are an error listing them, or,
    when a `novel` list is given, products the model does not know: their samples go there."""
    leaves = set(taxonomy.leaf_labels)
    by_name: dict[str, list[str]] = defaultdict(list)
    for leaf in taxonomy.leaf_labels:
        by_name[leaf.rsplit("/", 1)[-1]].append(leaf)
    as_leaf: dict[str, str] = {}
    unknown: list[str] = []
    for label in sorted({s.label for s in samples} - leaves):
        named = by_name.get(label.rsplit("/", 1)[-1], [])
        if len(named) == 1:
            as_leaf[label] = named[0]
            log.info("'%s' evaluated as the model's '%s' (same class name)", label, named[0])
        else:
            unknown.append(
                label if not named else f"{label} (the name of {len(named)} leaves: {', '.join(named)})"
            )
    if unknown and novel is None:
        raise DataError(_not_leaves(where, unknown))
    if novel is not None:
        novel.extend(s for s in samples if s.label not in leaves and s.label not in as_leaf)
    return [
        Sample(s.path, as_leaf.get(s.label, s.label))
        for s in samples
        if s.label in leaves or s.label in as_leaf
    ]


def _not_leaves(where: str, labels: list[str]) -> str:
    return (
        f"{where}: {len(labels)} label(s) are not leaves of the model's taxonomy: "
        f"{', '.join(labels[:5])}" + (" ..." if len(labels) > 5 else "")
    )


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(rest, held out): `fraction` of each label held out (at least 1 when the label has 2 or more
    images)."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_label[sample.label].append(sample)
    rest: list[Sample] = []
    held: list[Sample] = []
    for label in sorted(by_label):
        group = by_label[label]
        order = rng.permutation(len(group))
        n_held = min(len(group) - 1, max(1, int(round(len(group) * fraction)))) if len(group) > 1 else 0
        held.extend(group[i] for i in sorted(order[:n_held]))
        rest.extend(group[i] for i in sorted(order[n_held:]))
    return rest, held


def load_images(
    samples: list[Sample], spec: InputSpec, desc: str = "images"
) -> tuple[np.ndarray, list[Sample], list[str]]:
    """(images NxHxWx3 in spec.dtype, the samples that loaded, error lines for the ones that did not).

    A corrupt or unreadable image is logged with its path and skipped: a long run never dies of one file.
    """
    from tqdm import tqdm

    images: list[np.ndarray] = []
    kept: list[Sample] = []
    errors: list[str] = []
    for sample in tqdm(samples, desc=f"loading {desc}", unit="img", leave=False):
        try:
            images.append(load_image(sample.path, spec))
            kept.append(sample)
        except ImageError as exc:
            log.warning("skipping unreadable image: %s", exc)
            errors.append(str(exc))
    if not images:
        raise DataError(f"none of the {len(samples)} {desc} could be read (first error: {errors[:1]})")
    return np.stack(images), kept, errors
