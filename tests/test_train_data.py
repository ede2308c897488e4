"""Data loading: folder trees, Grocery-format list files, stratified hold-out, corrupt images."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from taxonedge.edge.kernel.preprocess import InputSpec, margin_spec
from taxonedge.train.data import (
    DataError,
    Sample,
    leaf_indices,
    load_images,
    model_leaves,
    read_samples,
    stratified_split,
    taxonomy_from_samples,
)

from .conftest import GROCERY, REPO, TINY_LABELS, needs_shared, write_image_tree

GROCERY_BUNDLE = REPO / "examples" / "models" / "grocery" / "grocery.tebundle"


def test_folder_tree_gives_uneven_taxonomy(tiny_tree: Path) -> None:
    samples = read_samples(tiny_tree)
    tax = taxonomy_from_samples(samples, "tiny")
    assert tax.leaf_labels == sorted(TINY_LABELS)
    assert tax.depth == 3 and len(tax.level_nodes(2)) == 3
    assert Counter(s.label for s in samples) == {label: 16 for label in TINY_LABELS}
    assert all(Path(s.path).is_absolute() and Path(s.path).exists() for s in samples)


def _grocery_like(root: Path) -> Path:
    """A miniature of the Grocery Store layout: SPLIT/Top/Coarse/Fine/x.jpg, list file, classes.csv."""
    write_image_tree(
        root / "train",
        ["Fruit/Apple/Golden-Delicious", "Fruit/Apple/Pink-Lady", "Vegetables/Asparagus"],
        per_class=3,
    )
    lines = []
    for fine_id, (rel, coarse_id) in enumerate(
        [("Fruit/Apple/Golden-Delicious", 0), ("Fruit/Apple/Pink-Lady", 0), ("Vegetables/Asparagus", 1)]
    ):
        lines += [f"train/{rel}/{k:03d}.jpg, {fine_id}, {coarse_id}" for k in range(3)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "classes.csv").write_text(
        "Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int)\n"
        "Golden-Delicious,0,Apple,0\nPink-Lady,1,Apple,0\nAsparagus,2,Asparagus,1\n"
    )
    return root / "train.txt"


def test_list_file_labels_come_from_folders(tmp_path: Path) -> None:
    samples = read_samples(_grocery_like(tmp_path))
    tax = taxonomy_from_samples(samples, "g")
    assert tax.leaf_labels == [
        "Fruit/Apple/Golden-Delicious",
        "Fruit/Apple/Pink-Lady",
        "Vegetables/Asparagus",
    ]
    assert tax.by_label["Vegetables/Asparagus"].depth == 2
    assert samples[0].path == str((tmp_path / "train/Fruit/Apple/Golden-Delicious/000.jpg").resolve())


def test_list_file_errors_name_the_line(tmp_path: Path) -> None:
    list_file = _grocery_like(tmp_path)
    text = list_file.read_text()
    list_file.write_text(text + "just-a-path.jpg\n")
    with pytest.raises(DataError, match=r"train\.txt:10: expected 'path, fine_id, coarse_id'"):
        read_samples(list_file)
    with pytest.raises(DataError, match="no such folder or list file"):
        read_samples(tmp_path / "missing.txt")


def test_list_file_without_class_folders_uses_classes_csv(tmp_path: Path) -> None:
    _grocery_like(tmp_path)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat.txt").write_text("flat/a.jpg, 1, 0\nflat/b.jpg, 2, 1\n")
    samples = read_samples(tmp_path / "flat.txt")
    assert [s.label for s in samples] == ["Apple/Pink-Lady", "Asparagus"]


def _disagreeing_list(root: Path, iconic: bool) -> Path:
    """A list file whose folders disagree with its ids: id 0 under two folders, id 2 (Mushroom) in a folder
    that differs from the iconic path of classes.csv, as Grocery's test split has it."""
    write_image_tree(root / "test", ["Fruit/Apple/Golden-Delicious", "Fruit/Apple/Pink-Lady"], per_class=2)
    write_image_tree(root / "test", ["Vegetables/Mushroom/Brown-Cap-Mushroom"], per_class=2)
    (root / "test.txt").write_text(
        "test/Fruit/Apple/Golden-Delicious/000.jpg, 0, 0\n"
        "test/Fruit/Apple/Pink-Lady/000.jpg, 0, 0\n"  # a Golden-Delicious that sits with the Pink-Ladies
        "test/Fruit/Apple/Pink-Lady/001.jpg, 1, 0\n"
        "test/Vegetables/Mushroom/Brown-Cap-Mushroom/000.jpg, 2, 1\n"
        "test/Vegetables/Mushroom/Brown-Cap-Mushroom/001.jpg, 2, 1\n"
    )
    icon = "/iconic-images-and-descriptions"
    (root / "classes.csv").write_text(
        "Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),"
        "Iconic Image Path (str),Product Description Path (str)\n"
        + (
            f"Golden-Delicious,0,Apple,0,{icon}/Fruit/Apple/Golden-Delicious/Golden-Delicious_Iconic.jpg,\n"
            f"Pink-Lady,1,Apple,0,{icon}/Fruit/Apple/Pink-Lady/Pink-Lady_Iconic.jpg,\n"
            f"Brown-Cap-Mushroom,2,Mushroom,1,{icon}/Vegetables/Brown-Cap-Mushroom/Iconic.jpg,\n"
            if iconic
            else "Golden-Delicious,0,Apple,0\nPink-Lady,1,Apple,0\nBrown-Cap-Mushroom,2,Mushroom,1\n"
        )
    )
    return root / "test.txt"


def test_list_file_labels_are_the_class_ids_not_the_folders(tmp_path: Path) -> None:
    samples = read_samples(_disagreeing_list(tmp_path, iconic=True))
    assert [s.label for s in samples] == [
        "Fruit/Apple/Golden-Delicious",
        "Fruit/Apple/Golden-Delicious",
        "Fruit/Apple/Pink-Lady",
        "Vegetables/Brown-Cap-Mushroom",  # classes.csv's hierarchy, not the folder
        "Vegetables/Brown-Cap-Mushroom",
    ]
    assert samples[1].path == str((tmp_path / "test/Fruit/Apple/Pink-Lady/000.jpg").resolve())
    assert [len(images) for images in load_images(samples, InputSpec(height=16, width=16))[:2]] == [5, 5]


def test_list_file_with_absolute_paths_names_only_the_folders_that_disagree(tmp_path: Path, caplog) -> None:
    # as bench/leave_classes_out.py writes lists: absolute paths, the dataset's location before the label
    listed = _disagreeing_list(tmp_path, iconic=True)
    lines = [line.split(", ", 1) for line in listed.read_text().splitlines()]
    listed.write_text("".join(f"{(tmp_path / rel).resolve()}, {rest}\n" for rel, rest in lines))
    with caplog.at_level(logging.INFO, logger="taxonedge.train.data"):
        samples = read_samples(listed)
    assert [s.label for s in samples][:3] == ["Fruit/Apple/Golden-Delicious"] * 2 + ["Fruit/Apple/Pink-Lady"]
    told = [r.getMessage() for r in caplog.records if "in folder" in r.getMessage()]
    assert len(told) == 2, told  # the Golden-Delicious among the Pink-Ladies, and the Mushroom folder
    assert any("Pink-Lady' is 'Fruit/Apple/Golden-Delicious'" in m for m in told)
    assert any("Mushroom/Brown-Cap-Mushroom' is 'Vegetables/Brown-Cap-Mushroom'" in m for m in told)


def test_list_file_without_a_hierarchy_in_classes_csv_takes_the_first_folder(tmp_path: Path) -> None:
    list_file = _disagreeing_list(tmp_path, iconic=False)
    assert [s.label for s in read_samples(list_file)] == [
        "Fruit/Apple/Golden-Delicious",
        "Fruit/Apple/Golden-Delicious",
        "Fruit/Apple/Pink-Lady",
        "Vegetables/Mushroom/Brown-Cap-Mushroom",
        "Vegetables/Mushroom/Brown-Cap-Mushroom",
    ]
    (tmp_path / "classes.csv").unlink()
    assert [s.label for s in read_samples(list_file)][:2] == ["Fruit/Apple/Golden-Delicious"] * 2


def test_evaluation_takes_a_unique_class_name_as_the_models_leaf(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = taxonomy_from_samples(
        [Sample("x", label) for label in ["Fruit/Apple/Golden-Delicious", "Vegetables/Brown-Cap-Mushroom"]],
        "trained-from-folders",
    )
    data = read_samples(_disagreeing_list(tmp_path, iconic=False))
    data = [s for s in data if s.label != "Fruit/Apple/Pink-Lady"]
    with pytest.raises(DataError, match="Vegetables/Mushroom/Brown-Cap-Mushroom"):
        leaf_indices(model, data, "test.txt")  # training's mapping stays exact
    with caplog.at_level("INFO", logger="taxonedge.train.data"):
        mapped = model_leaves(model, data, "test.txt")
    assert [s.label for s in mapped] == ["Fruit/Apple/Golden-Delicious"] * 2 + [
        "Vegetables/Brown-Cap-Mushroom"
    ] * 2
    assert [s.path for s in mapped] == [s.path for s in data]
    assert list(leaf_indices(model, mapped, "test.txt")) == [0, 0, 1, 1]
    assert [r.getMessage() for r in caplog.records if "same class name" in r.getMessage()] == [
        "'Vegetables/Mushroom/Brown-Cap-Mushroom' evaluated as the model's "
        "'Vegetables/Brown-Cap-Mushroom' (same class name)"
    ]


def test_ambiguous_or_unknown_class_names_are_still_refused(tmp_path: Path) -> None:
    model = taxonomy_from_samples(
        [Sample("x", label) for label in ["Fruit/Apple/Red", "Fruit/Pepper/Red", "Vegetables/Carrot"]], "m"
    )
    for label in ("Fruit/Red", "Fruit/Kiwi"):
        with pytest.raises(DataError, match=rf"1 label\(s\) are not leaves of the model's taxonomy: {label}"):
            model_leaves(model, [Sample("a.jpg", "Vegetables/Carrot"), Sample("b.jpg", label)], "d")
    with pytest.raises(DataError, match="the name of 2 leaves: Fruit/Apple/Red, Fruit/Pepper/Red"):
        model_leaves(model, [Sample("b.jpg", "Fruit/Red")], "d")


def test_stratified_split_is_seeded_disjoint_and_covers_every_class(tiny_tree: Path) -> None:
    samples = read_samples(tiny_tree)
    rest, held = stratified_split(samples, 0.25, seed=3)
    assert Counter(s.label for s in held) == {label: 4 for label in TINY_LABELS}
    assert not {s.path for s in rest} & {s.path for s in held}
    assert len(rest) + len(held) == len(samples)
    assert stratified_split(samples, 0.25, seed=3) == (rest, held)
    assert stratified_split(samples, 0.25, seed=4)[1] != held


def test_corrupt_images_are_reported_and_skipped(tmp_path: Path) -> None:
    root = write_image_tree(tmp_path / "d", TINY_LABELS[:2], per_class=3)
    bad = root / TINY_LABELS[0] / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    samples = read_samples(root)
    images, kept, errors = load_images(samples, InputSpec(height=32, width=32))
    assert images.shape == (6, 32, 32, 3) and len(kept) == 6
    assert len(errors) == 1 and str(bad) in errors[0]


def test_labels_outside_the_taxonomy_are_listed(tiny_tree: Path, tmp_path: Path) -> None:
    tax = taxonomy_from_samples(read_samples(tiny_tree), "tiny")
    other = read_samples(write_image_tree(tmp_path / "o", ["Fruit/Kiwi"], per_class=1))
    with pytest.raises(DataError, match="Fruit/Kiwi"):
        leaf_indices(tax, other, "o")


@needs_shared(GROCERY / "train.txt")
def test_grocery_lists_give_the_published_hierarchy() -> None:
    train = read_samples(GROCERY / "train.txt")
    val = read_samples(GROCERY / "val.txt")
    tax = taxonomy_from_samples(train, "grocery")
    assert tax.num_leaves == 81 and len(tax.level_nodes(1)) == 3 and len(tax.level_nodes(2)) == 43
    assert len(train) == 2640 and len(val) == 296
    assert len(set(leaf_indices(tax, val, "val"))) == 60  # val has 60 of the 81 classes
    # classes.csv's hierarchy, though train/ and val/ keep these images in Vegetables/Brown-Cap-Mushroom/
    mushroom = "Vegetables/Mushroom/Brown-Cap-Mushroom"
    assert mushroom in tax.leaf_labels and "Vegetables/Brown-Cap-Mushroom" not in tax.leaf_labels
    assert {s.label for s in val if "Brown-Cap-Mushroom" in s.path} == {mushroom}
    assert len({s.label for s in val}) == 60


@needs_shared(GROCERY / "val.txt", GROCERY_BUNDLE)
def test_grocery_val_list_evaluates_against_the_shipped_bundle() -> None:
    """The shipped bundle (2.0.0 on) has classes.csv's hierarchy, whatever folders val.txt's files sit in."""
    from taxonedge.edge.kernel.bundle import read_bundle

    taxonomy = read_bundle(GROCERY_BUNDLE).taxonomy
    assert "Vegetables/Mushroom/Brown-Cap-Mushroom" in taxonomy.leaf_labels
    val = model_leaves(taxonomy, read_samples(GROCERY / "val.txt"), "val.txt")
    assert len(set(leaf_indices(taxonomy, val, "val.txt"))) == 60


def _device_and_training_views(paths: list[Path], size: int) -> tuple[np.ndarray, np.ndarray]:
    """The device's preprocessing of each image, and training's view of it: `center_view` of the image loaded
    with the margin, as phase 1 trains on it."""
    from taxonedge.train.trainer import center_view

    spec = InputSpec(height=size, width=size)
    samples = [Sample(str(p), "x") for p in paths]
    margin, _, _ = load_images(samples, margin_spec(spec))
    device, _, _ = load_images(samples, spec)
    assert margin.shape[1:] == (round(size / spec.crop_fraction),) * 2 + (3,)
    return device.astype(np.float32), np.clip(np.round(center_view(margin, spec)), 0, 255)


def test_training_view_is_the_device_crop(tiny_tree: Path) -> None:
    device, training = _device_and_training_views(sorted(tiny_tree.rglob("*.jpg"))[:4], 64)
    assert device.shape == training.shape == (4, 64, 64, 3)
    assert np.abs(training - device).mean() < 3.0
    assert margin_spec(InputSpec(crop="none")) == InputSpec(crop="none")


@needs_shared(GROCERY)
def test_bilinear_training_view_against_the_device_area_resize() -> None:
    """Training resamples crops of the margin image bilinearly; the device resizes by area from the full
    photo. Measured here for the crop the device takes, on real Grocery photos (figures in the docstrings of
    `trainer.center_view` and `preprocess.margin_spec`)."""
    photos = sorted((GROCERY / "train").rglob("*.jpg"))[::400][:6]
    assert photos
    for size in (224, 288):
        device, training = _device_and_training_views(photos, size)
        diff = np.abs(training - device)
        print(
            f"{size} px: bilinear training view vs device area resize: max {diff.max():.0f}, "
            f"mean {diff.mean():.2f}, 99th percentile {np.percentile(diff, 99):.0f} levels of 255"
        )
        assert diff.mean() < 3.0 and np.percentile(diff, 99) < 25
