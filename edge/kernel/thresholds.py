"""Per-depth back-off thresholds, `{"depth_1": 0.9, "depth_2": 0.8, ...}`: the one definition of a valid set.

The decoder (`decode.py`) walks down from the top level while the most probable child's probability passes
its depth's threshold. Thresholds are chosen on the host (`train/calibrate.py`), stored in a run's
calibration.json and a bundle's manifest, and overridden in the device config; all of them are checked here.
A depth without a key has no threshold (0.0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator

_KEY = re.compile(r"depth_([1-9][0-9]*)")


def threshold_key(depth: int) -> str:
    """The key of depth `depth` (1 = the top level): "depth_1"."""
    return f"depth_{depth}"


def check_thresholds(values: Any, max_depth: int | None = None) -> dict[str, float]:
    """`values` as a dict of floats, or ValueError saying what is wrong.

    Keys are depth_1, depth_2, ... (up to depth_`max_depth` when given, e.g. the taxonomy's depth); values
    are numbers in [0, 1] (not booleans, not NaN).
    """
    if not isinstance(values, Mapping):
        raise ValueError('thresholds must be an object like {"depth_1": 0.9}')
    out: dict[str, float] = {}
    limit = f"depth_{max_depth}" if max_depth else "depth_N"
    for key, value in values.items():
        match = _KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None or (max_depth is not None and int(match.group(1)) > max_depth):
            raise ValueError(f"threshold key {key!r} is not one of depth_1..{limit}")
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if number is None or math.isnan(number) or not 0.0 <= number <= 1.0:
            raise ValueError(f"threshold {key}={value!r} is not a number in [0, 1]")
        out[key] = float(number)
    return out


# For pydantic models: a dict[str, float] (pydantic's own coercion first) that `check_thresholds` accepts.
Thresholds = Annotated[dict[str, float], AfterValidator(check_thresholds)]
