"""Backbones side by side: int8 size and invoke time of each, against Google's reference int8 MobileNetV2.

For each BACKBONE:SIZE an 81-class head on the ImageNet backbone (weights from ../shared/weights) is
converted to full int8 by the converter's own `to_tflite`, calibrated on Grocery training images; then all
models and the reference are invoked interleaved, invoke by invoke, on one LiteRT interpreter each (the
device's runtime, same thread count), so that load from other processes hits them alike. Accuracy is not
measured here (an untrained head): it comes from `bench/bench_pipeline.py` runs (docs/benchmarks.md).

    .venv/bin/python bench/bench_backbones.py [mobilenet_v2:224 efficientnet_lite0:224 ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_convert import GROCERY_TRAIN, REFERENCE, interleaved_latency  # noqa: E402

WEIGHTS = REPO.parent / "shared" / "weights"
WEIGHT_FILES = {
    "mobilenet_v2": WEIGHTS / "mobilenet_v2_1.0_224_imagenet_no_top.weights.h5",
    **{
        f"efficientnet_lite{i}": WEIGHTS / "efficientnet_lite" / f"efficientnet_lite{i}_imagenet.npz"
        for i in range(3)
    },
}
DEFAULT = (
    "mobilenet_v2:224",
    "mobilenet_v2:288",
    "efficientnet_lite0:224",
    "efficientnet_lite0:260",
    "efficientnet_lite1:240",
    "efficientnet_lite2:260",
)


def int8_model(backbone: str, size: int, calibration_images: int) -> tuple[bytes, float]:
    """(full-int8 TFLite model, conversion seconds) of an untrained 81-class head on the ImageNet backbone."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from taxonedge.convert.quantize import stratified, to_tflite
    from taxonedge.edge.kernel.preprocess import InputSpec
    from taxonedge.train.data import load_images, read_samples, taxonomy_from_samples
    from taxonedge.train.model import build_classifier

    samples = read_samples(GROCERY_TRAIN)
    taxonomy = taxonomy_from_samples(samples, "grocery")
    config = {"backbone": backbone, "input_size": size, "weights": str(WEIGHT_FILES[backbone])}
    model = build_classifier(config, taxonomy.num_leaves, keras, pretrained=True)
    items = stratified([(s.path, taxonomy.leaf_index(s.label)) for s in samples], calibration_images)
    picked = {path for path, _ in items}
    spec = InputSpec(height=size, width=size)
    images, _, _ = load_images([s for s in samples if s.path in picked], spec, "calibration images")
    start = time.perf_counter()
    tflite = to_tflite(model, keras, "int8", images)
    return tflite, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="*", default=list(DEFAULT), help="BACKBONE:SIZE (default: a table)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--calibration-images", type=int, default=100)
    args = parser.parse_args(argv)
    missing = [p for p in (REFERENCE, GROCERY_TRAIN, *WEIGHT_FILES.values()) if not p.exists()]
    if missing:
        print(f"needs {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    from taxonedge.convert.edgetpu import check_model

    models, notes = {}, {}
    for name in args.models:
        backbone, _, size = name.partition(":")
        models[name], seconds = int8_model(backbone, int(size), args.calibration_images)
        static = check_model(models[name])
        notes[name] = (seconds, static["float_tensors"], static["compatible"])
    models["reference"] = REFERENCE.read_bytes()
    times = interleaved_latency(models, args.threads, args.runs)
    ref_ms = statistics.median(times["reference"]) * 1e3
    print(f"\nLiteRT, {args.threads} thread(s), {args.runs} interleaved invokes each; medians")
    print(f"{'model':<24}{'MB':>7}{'invoke ms':>11}{'x ref':>7}{'float tensors':>15}{'Edge TPU ops':>14}")
    for name, data in models.items():
        ms = statistics.median(times[name]) * 1e3
        floats, edgetpu = ("-", "-") if name == "reference" else (notes[name][1], notes[name][2])
        print(f"{name:<24}{len(data) / 1e6:>7.2f}{ms:>11.2f}{ms / ref_ms:>7.2f}{floats!s:>15}{edgetpu!s:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
