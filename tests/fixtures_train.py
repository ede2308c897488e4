"""A trained run directory, made once per test session through the real CLI.

Import the fixture where it is needed: `from tests.fixtures_train import tiny_run  # noqa: F401`.
MobileNetV2 alpha 0.35 at 64 px from random weights (BatchNorm statistics set from the data), head on
cached features plus 2 fine-tuning epochs with the auxiliary parent head: about 20 s on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import run_cli

TINY_TRAIN_ARGS = (
    "--backbone",
    "mobilenet_v2",
    "--alpha",
    "0.35",
    "--input-size",
    "64",
    "--weights",
    "none",
    "--head-epochs",
    "40",
    "--head-lr",
    "0.01",
    "--epochs",
    "2",
    "--unfreeze",
    "20",
    "--aux-parent",
    "0.5",
    "--batch-size",
    "16",
    "--seed",
    "1",
)


def train_cli(data: Path, val: Path, out: Path, *args: str) -> Path:
    """`taxonedge train --data DATA --val VAL --out OUT ARGS...`; returns OUT."""
    run_cli("train", "--data", str(data), "--val", str(val), "--out", str(out), *args)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_tree: Path, tiny_val_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN_DIR of `taxonedge train` on the tiny uneven-depth tree, validated on the tiny val tree."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    return train_cli(tiny_tree, tiny_val_tree, out, *TINY_TRAIN_ARGS, "--taxonomy-name", "tiny-goods")
