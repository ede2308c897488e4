"""Read and check a run directory written by `taxonedge train`, before any heavy work starts.

Every problem found is reported with the file it is in, so a bad run fails in a second, not after a
conversion. The Keras model itself is checked later, against the taxonomy, when it is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from taxonedge.edge.preprocess import InputSpec
from taxonedge.edge.taxonomy import Taxonomy, TaxonomyError

MODEL_FILE = "model.keras"
REQUIRED = (MODEL_FILE, "taxonomy.json", "input_spec.json", "config.json", "calibration.json", "splits.json")


class RunDirError(ValueError):
    """A run directory that cannot be converted; the message names the file and what is wrong."""


@dataclass
class Run:
    path: Path
    taxonomy: Taxonomy
    input_spec: InputSpec
    config: dict[str, Any]
    temperature: float
    thresholds: dict[str, float]
    train: list[tuple[str, int]]  # (image path, leaf index)
    val: list[tuple[str, int]]
    target_precision: float = 0.98  # what the thresholds were chosen to reach; convert re-chooses on int8

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def backbone(self) -> str:
        return str(self.config.get("backbone", "unknown"))


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: not a directory (pass the folder `taxonedge train --out` wrote)")
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise RunDirError(f"{path}: incomplete run directory, missing {', '.join(missing)} "
                          "(was `taxonedge train` interrupted?)")
    try:
        taxonomy = Taxonomy.from_dict(_json(path / "taxonomy.json"))
    except TaxonomyError as exc:
        raise RunDirError(f"{path / 'taxonomy.json'}: {exc}") from None
    try:
        spec = InputSpec.model_validate(_json(path / "input_spec.json"))
    except ValidationError as exc:
        raise RunDirError(f"{path / 'input_spec.json'}: {_first(exc)}") from None
    config = _json(path / "config.json")
    if not isinstance(config, dict):
        raise RunDirError(f"{path / 'config.json'}: expected a JSON object")
    temperature, thresholds, target_precision = _calibration(path / "calibration.json", taxonomy)
    splits = _json(path / "splits.json")
    if not isinstance(splits, dict):
        raise RunDirError(f"{path / 'splits.json'}: expected an object with 'train' and 'val' lists")
    train = _split(splits, "train", taxonomy, path / "splits.json")
    val = _split(splits, "val", taxonomy, path / "splits.json")
    if not train:
        raise RunDirError(f"{path / 'splits.json'}: the train list is empty (calibration images come from it)")
    if not val:
        raise RunDirError(f"{path / 'splits.json'}: the val list is empty (the accuracy gate needs it)")
    return Run(path, taxonomy, spec, config, temperature, thresholds, train, val, target_precision)


def _json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{file}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{file}: cannot read: {exc}") from None


def _calibration(file: Path, taxonomy: Taxonomy) -> tuple[float, dict[str, float], float]:
    data = _json(file)
    if not isinstance(data, dict):
        raise RunDirError(f"{file}: expected an object with 'temperature' and 'thresholds'")
    temperature = data.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise RunDirError(f"{file}: temperature must be a positive number, got {temperature!r}")
    thresholds = data.get("thresholds", {})
    if not isinstance(thresholds, dict):
        raise RunDirError(f"{file}: thresholds must be an object like {{\"depth_1\": 0.9}}")
    for key, value in thresholds.items():
        depth = key.removeprefix("depth_")
        if not depth.isdigit() or not 1 <= int(depth) <= taxonomy.depth:
            raise RunDirError(f"{file}: threshold key '{key}' is not depth_1..depth_{taxonomy.depth}")
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise RunDirError(f"{file}: threshold {key}={value!r} is not a number in [0, 1]")
    target = data.get("target_precision", 0.98)
    if not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
        raise RunDirError(f"{file}: target_precision must be a number in (0, 1], got {target!r}")
    return float(temperature), {k: float(v) for k, v in thresholds.items()}, float(target)


def _split(splits: dict, key: str, taxonomy: Taxonomy, file: Path) -> list[tuple[str, int]]:
    items = splits.get(key)
    if not isinstance(items, list):
        raise RunDirError(f"{file}: '{key}' must be a list of [image_path, leaf_label] pairs")
    out = []
    for i, item in enumerate(items):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise RunDirError(f"{file}: {key}[{i}] is {item!r}, expected [image_path, leaf_label]")
        try:
            out.append((item[0], taxonomy.leaf_index(item[1])))
        except TaxonomyError:
            raise RunDirError(f"{file}: {key}[{i}] has label '{item[1]}', which is not a leaf of the run's "
                              "taxonomy.json") from None
    return out


def _first(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
