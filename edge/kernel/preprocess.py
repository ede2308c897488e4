"""The one preprocessing function: training, calibration, evaluation and the device all call `preprocess`.

Keeping it in one place (OpenCV + numpy, no TensorFlow) means the numbers cannot drift apart between the
host and the device. The model takes raw uint8 RGB at its input size; scaling to the backbone's range
happens inside the model (a Rescaling layer), so nothing here depends on the backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class ImageError(ValueError):
    """An image that cannot be decoded or is not a usable frame."""


class InputSpec(BaseModel):
    """How a frame becomes the model's input tensor. Stored in every bundle manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    height: int = Field(224, ge=8, le=4096)
    width: int = Field(224, ge=8, le=4096)
    channels: Literal[3] = 3
    color_order: Literal["RGB"] = "RGB"
    dtype: Literal["uint8", "int8", "float32"] = "uint8"  # float32: unquantized CPU models
    # The input tensor's quantization (real = scale * (q - zero_point)), as the converter reports it. Our
    # models rescale inside, so their real input is the raw pixel: uint8 1.0/0, int8 1.0/-128. Recorded
    # so a device can refuse a model it cannot feed; preprocessing itself only depends on `dtype`.
    scale: float = 1.0
    zero_point: int = 0
    # Keep the central `crop_fraction` of the shorter side (1.0: whole frame, squashed to the aspect ratio).
    crop: Literal["center", "none"] = "center"
    crop_fraction: float = Field(0.875, gt=0.0, le=1.0)
    resize: Literal["area", "linear"] = "area"


_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """JPEG/PNG bytes -> HxWx3 BGR uint8 (OpenCV's order). Raises ImageError when not decodable."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buf.size == 0:
        raise ImageError("empty image data")
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError("not a decodable image (corrupt or unsupported format)")
    return image


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> HxWx3 BGR uint8. Raises ImageError naming the file when it is unreadable or
    corrupt."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return decode_image(data)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None


def preprocess(frame_bgr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A BGR uint8 frame (as OpenCV gives it) -> the model input, HxWx3 in `spec.dtype`, no batch axis."""
    if not isinstance(frame_bgr, np.ndarray) or frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3:
        shape = getattr(frame_bgr, "shape", None)
        raise ImageError(f"expected an HxWx3 colour frame, got shape {shape}")
    if frame_bgr.dtype != np.uint8:
        raise ImageError(f"expected a uint8 frame, got {frame_bgr.dtype}")
    h, w = frame_bgr.shape[:2]
    if h < 2 or w < 2:
        raise ImageError(f"frame of {w}x{h} pixels is too small")
    if spec.crop == "center":
        side = max(1, int(round(min(h, w) * spec.crop_fraction)))
        top, left = (h - side) // 2, (w - side) // 2
        frame_bgr = frame_bgr[top : top + side, left : left + side]
    resized = cv2.resize(frame_bgr, (spec.width, spec.height), interpolation=_INTERPOLATION[spec.resize])
    rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
    if spec.dtype == "uint8":
        return rgb
    if spec.dtype == "float32":
        return rgb.astype(np.float32)
    # int8 input: the same pixels shifted into -128..127 (scale 1, zero point -128).
    return (rgb.astype(np.int16) - 128).astype(np.int8)


def margin_spec(spec: InputSpec) -> InputSpec:
    """The spec training loads the images its random crops come from: `spec` without the crop fraction
    (the whole centred square), at the size where the central `crop_fraction` is `spec`'s size, so the
    crops can reach the margin the device cuts away. For a spec without a crop, the spec itself.

    Training resamples its crops of this image bilinearly (`train.trainer.augment_batch`, and
    `center_view` for `spec`'s own crop), where `preprocess` resizes by `spec.resize` (area) from the full
    frame: for the device's crop they differ by 1.35 (224 px) to 2.0 (288 px) levels of 255 per pixel on
    average on Grocery photos (`tests/test_train_data.py` measures it).
    """
    if spec.crop != "center" or spec.crop_fraction == 1.0:
        return spec
    size = {
        "height": int(round(spec.height / spec.crop_fraction)),
        "width": int(round(spec.width / spec.crop_fraction)),
    }
    return InputSpec.model_validate({**spec.model_dump(), **size, "crop_fraction": 1.0})


def load_image(path: str | Path, spec: InputSpec) -> np.ndarray:
    """read_image + preprocess: what training, calibration and evaluation call for an image file."""
    return preprocess(read_image(path), spec)


def shrink(image: np.ndarray, short_side: int) -> np.ndarray:
    """`image` scaled down (INTER_AREA) so that its short side is at most `short_side`; as it is otherwise."""
    scale = short_side / min(image.shape[:2])
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
