"""A training run directory: the one writer (`taxonedge train`) and the one reader (`convert`, `evaluate`,
the QAT child). Both use the file names and the models below, so what is written is what is read.

    RUN/model.keras         the trained model, temperature folded in (saved by Keras: `model_path`)
    RUN/taxonomy.json       the label tree (`Taxonomy.to_dict`)
    RUN/input_spec.json     the `InputSpec` every bundle made from the run carries
    RUN/config.json         the training configuration (`TrainConfig`; read back as a plain dict, since a
                            run written by other code may name any backbone or leave keys out)
    RUN/calibration.json    `Calibration`: temperature, per-depth thresholds, their two-fold check
    RUN/splits.json         `Splits`: which images trained and which validated
    RUN/metrics.json        the final model's validation metrics (not needed to convert)

The reader checks everything before any heavy work and names the file of each problem, so a bad run fails
in a second, not after a conversion. The Keras model itself is checked when it is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from taxonedge.edge.kernel.files import atomic_write
from taxonedge.edge.kernel.preprocess import InputSpec
from taxonedge.edge.kernel.taxonomy import Taxonomy, TaxonomyError
from taxonedge.edge.kernel.thresholds import Thresholds, check_thresholds

from .calibrate import DEFAULT_TARGET_PRECISION

MODEL_FILE = "model.keras"
TAXONOMY_FILE = "taxonomy.json"
INPUT_SPEC_FILE = "input_spec.json"
CONFIG_FILE = "config.json"
CALIBRATION_FILE = "calibration.json"
SPLITS_FILE = "splits.json"
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"  # the best epoch's weights during fine-tuning
LOGS_DIR = "logs"  # TensorBoard
REQUIRED = (MODEL_FILE, TAXONOMY_FILE, INPUT_SPEC_FILE, CONFIG_FILE, CALIBRATION_FILE, SPLITS_FILE)


class RunDirError(ValueError):
    """A run directory that cannot be used; the message names the file and what is wrong."""


class Calibration(BaseModel):
    """calibration.json. Threshold keys are checked against the run's taxonomy when the run is read."""

    model_config = ConfigDict(extra="ignore", strict=True)

    temperature: float = Field(1.0, gt=0.0)
    thresholds: Thresholds = {}
    # What the thresholds were chosen to reach; convert re-chooses them on the int8 model's outputs.
    target_precision: float = Field(DEFAULT_TARGET_PRECISION, gt=0.0, le=1.0)
    # what the target applies to (train/calibrate.py THRESHOLD_RULES); runs before it was recorded: per depth
    rule: Literal["published", "per_depth"] = "per_depth"
    two_fold_check: dict[str, Any] = {}


class Splits(BaseModel):
    """splits.json: [image path, leaf label] pairs of the images that trained and that validated."""

    model_config = ConfigDict(extra="ignore")

    train: list[tuple[str, str]] = []
    val: list[tuple[str, str]] = []
    val_source: str = ""  # "separate", "holdout", ...
    skipped: list[str] = []  # images that could not be read, with the reason


@dataclass
class Run:
    path: Path
    taxonomy: Taxonomy
    input_spec: InputSpec
    config: dict[str, Any]
    calibration: Calibration
    train: list[tuple[str, int]]  # (image path, leaf index)
    val: list[tuple[str, int]]

    @property
    def model_path(self) -> Path:
        return model_path(self.path)

    @property
    def backbone(self) -> str:
        return str(self.config.get("backbone", "unknown"))

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    @property
    def thresholds(self) -> dict[str, float]:
        return self.calibration.thresholds

    @property
    def target_precision(self) -> float:
        return self.calibration.target_precision


# ---- writing -----------------------------------------------------------------------------------------
def write_json(path: Path, obj: Any) -> None:
    """The JSON of every run file: indented UTF-8, written atomically."""
    atomic_write(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def model_path(run: Path) -> Path:
    return Path(run) / MODEL_FILE


def write_setup(run: Path, taxonomy: Taxonomy, spec: InputSpec, config: BaseModel, splits: Splits) -> None:
    """What a run knows before training starts: taxonomy, input spec, configuration and splits."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / TAXONOMY_FILE, taxonomy.to_dict())
    write_json(run / INPUT_SPEC_FILE, spec.model_dump())
    write_json(run / CONFIG_FILE, config.model_dump())
    write_json(run / SPLITS_FILE, splits.model_dump(mode="json"))


def write_calibration(run: Path, calibration: Calibration) -> None:
    write_json(Path(run) / CALIBRATION_FILE, calibration.model_dump(mode="json"))


def write_metrics(run: Path, metrics: dict[str, Any]) -> None:
    write_json(Path(run) / METRICS_FILE, metrics)


# ---- reading -----------------------------------------------------------------------------------------
def load_run(path: str | Path) -> Run:
    """Read and check a complete run (what `convert` needs); RunDirError names the file of any problem."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: not a directory (pass the folder `taxonedge train --out` wrote)")
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise RunDirError(
            f"{path}: incomplete run directory, missing {', '.join(missing)} "
            "(was `taxonedge train` interrupted?)"
        )
    taxonomy, spec = read_taxonomy(path), read_input_spec(path)
    config = _json(path / CONFIG_FILE)
    if not isinstance(config, dict):
        raise RunDirError(f"{path / CONFIG_FILE}: expected a JSON object")
    calibration = read_calibration(path, taxonomy)
    splits = read_splits(path / SPLITS_FILE)
    train = _leaf_pairs(splits.train, "train", taxonomy, path / SPLITS_FILE)
    val = _leaf_pairs(splits.val, "val", taxonomy, path / SPLITS_FILE)
    if not train:
        raise RunDirError(f"{path / SPLITS_FILE}: the train list is empty (calibration images come from it)")
    if not val:
        raise RunDirError(f"{path / SPLITS_FILE}: the val list is empty (the accuracy gate needs it)")
    return Run(path, taxonomy, spec, config, calibration, train, val)


def read_meta(path: str | Path) -> tuple[Taxonomy, InputSpec, dict[str, float]]:
    """What evaluating a run's model needs: taxonomy, input spec and thresholds (none without
    calibration.json)."""
    path = Path(path)
    taxonomy, spec = read_taxonomy(path), read_input_spec(path)
    calibrated = (path / CALIBRATION_FILE).is_file()
    return taxonomy, spec, read_calibration(path, taxonomy).thresholds if calibrated else {}


def read_taxonomy(run: Path) -> Taxonomy:
    file = Path(run) / TAXONOMY_FILE
    try:
        return Taxonomy.from_dict(_json(file))
    except TaxonomyError as exc:
        raise RunDirError(f"{file}: {exc}") from None


def read_input_spec(run: Path) -> InputSpec:
    file = Path(run) / INPUT_SPEC_FILE
    try:
        return InputSpec.model_validate(_json(file))
    except ValidationError as exc:
        raise RunDirError(f"{file}: {_first(exc)}") from None


def read_calibration(run: Path, taxonomy: Taxonomy) -> Calibration:
    """calibration.json, its threshold keys checked against `taxonomy`'s depth."""
    file = Path(run) / CALIBRATION_FILE
    data = _json(file)
    try:
        calibration = Calibration.model_validate(data)
        check_thresholds(calibration.thresholds, taxonomy.depth)
    except ValidationError as exc:
        raise RunDirError(f"{file}: {_first(exc)}") from None
    except ValueError as exc:
        raise RunDirError(f"{file}: {exc}") from None
    return calibration


def read_splits(file: Path) -> Splits:
    """A run's splits.json (`file` may have been copied elsewhere: `evaluate --data RUN/splits.json`)."""
    try:
        return Splits.model_validate(_json(file))
    except ValidationError as exc:
        raise RunDirError(
            f"{file}: {_first(exc)} (a run's splits.json has 'train' and 'val' "
            "lists of [image_path, leaf_label])"
        ) from None


def _leaf_pairs(
    items: list[tuple[str, str]], key: str, taxonomy: Taxonomy, file: Path
) -> list[tuple[str, int]]:
    out = []
    for i, (image, label) in enumerate(items):
        try:
            out.append((image, taxonomy.leaf_index(label)))
        except TaxonomyError:
            raise RunDirError(
                f"{file}: {key}[{i}] has label '{label}', which is not a leaf of the run's {TAXONOMY_FILE}"
            ) from None
    return out


def _json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunDirError(
            f"{file}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{file}: cannot read: {exc}") from None


def _first(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
    return f"{where or '(top level)'}: {err['msg']}"
