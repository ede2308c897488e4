"""Benchmark of `taxonedge convert`: our int8 MobileNetV2 1.0/224 against Google's reference int8 model.

Measured side by side in one run, on the same interpreter (LiteRT, the device's) with the same thread count,
interleaved invoke by invoke so that load from other processes hits both alike:
  - median invoke latency of each and the ratio ours / reference (target <= 0.6),
  - our file size (target <= 3 MB with the 81-class Grocery head),
  - conversion wall time,
  - with --run RUN_DIR (a trained Grocery run): float vs int8 accuracy per taxonomy level on its val split,
    through the full `taxonedge convert` path (gate included).
Without --run it builds an untrained 81-class head on the ImageNet MobileNetV2 from ../shared/weights and
calibrates on Grocery training images (latency, size and conversion time only).

    .venv/bin/python bench/bench_convert.py [--run RUN_DIR [--qat yes]] [--threads 1] [--runs 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference" / "mobilenet_v2_1.0_224_quant.tflite"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet_no_top.weights.h5"
GROCERY_TRAIN = SHARED / "data" / "grocery" / "dataset" / "train.txt"
TARGET_RATIO, TARGET_MB = 0.6, 3.0


def untrained_grocery_model(calibration_images: int) -> tuple[bytes, float, str]:
    """(int8 model, conversion seconds, what was converted) for an 81-class head on the ImageNet backbone."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from taxonedge.convert.quantize import stratified, to_tflite
    from taxonedge.edge.kernel.preprocess import InputSpec
    from taxonedge.train.data import load_images, read_samples, taxonomy_from_samples
    from taxonedge.train.model import build_classifier

    samples = read_samples(GROCERY_TRAIN)
    taxonomy = taxonomy_from_samples(samples, "grocery")
    config = {"backbone": "mobilenet_v2", "alpha": 1.0, "input_size": 224, "weights": str(WEIGHTS)}
    model = build_classifier(config, taxonomy.num_leaves, keras, pretrained=True)
    items = stratified([(s.path, taxonomy.leaf_index(s.label)) for s in samples], calibration_images)
    picked = {path for path, _ in items}
    images, _, _ = load_images([s for s in samples if s.path in picked], InputSpec(), "calibration images")
    start = time.perf_counter()
    tflite = to_tflite(model, keras, "int8", images)
    what = (
        f"untrained {taxonomy.num_leaves}-class head on ImageNet MobileNetV2 1.0/224, "
        f"{len(images)} calibration images"
    )
    return tflite, time.perf_counter() - start, what


def converted_run(run: Path, calibration_images: int, qat: str) -> tuple[bytes, float, str, dict]:
    from taxonedge.convert.converter import Options, convert
    from taxonedge.edge.kernel.bundle import read_bundle

    with tempfile.TemporaryDirectory() as tmp:
        result = convert(
            Options(
                run=run,
                out=Path(tmp) / "bench.tebundle",
                calibration_images=calibration_images,
                force=True,
                edgetpu="skip",
                qat=qat,
            )
        )
        model = read_bundle(result.path).model_bytes()
    qat_words = " quantization-aware" if result.manifest.quantization.qat else " post-training"
    return (
        model,
        result.timings["convert_s"] + result.timings.get("qat_s", 0.0),
        f"run {run},{qat_words} int8 ({result.timings['total_s']:.0f} s end to end)",
        result.gate,
    )


def interleaved_latency(models: dict[str, bytes], threads: int, runs: int) -> dict[str, list[float]]:
    from taxonedge.edge.kernel.runtime import make_interpreter

    interpreters = {name: make_interpreter(data, num_threads=threads) for name, data in models.items()}
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for i in range(runs + 20):
        for name in names if i % 2 == 0 else names[::-1]:  # alternate who goes first
            interpreter = interpreters[name]
            detail = interpreter.get_input_details()[0]
            interpreter.set_tensor(detail["index"], rng.integers(0, 256, detail["shape"], dtype=np.uint8))
            start = time.perf_counter()
            interpreter.invoke()
            if i >= 20:  # warm-up excluded
                times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, help="a trained Grocery run directory (adds accuracy per level)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument(
        "--qat", choices=("no", "yes", "auto"), default="no", help="with --run: as `convert --qat`"
    )
    args = parser.parse_args(argv)
    if not REFERENCE.exists():
        print(f"needs {REFERENCE}", file=sys.stderr)
        return 2
    gate = None
    if args.run:
        ours, convert_s, what, gate = converted_run(args.run, args.calibration_images, args.qat)
    else:
        ours, convert_s, what = untrained_grocery_model(args.calibration_images)
    times = interleaved_latency({"ours": ours, "reference": REFERENCE.read_bytes()}, args.threads, args.runs)
    ours_ms = statistics.median(times["ours"]) * 1e3
    ref_ms = statistics.median(times["reference"]) * 1e3
    ratio = ours_ms / ref_ms
    size_mb = len(ours) / 1e6
    print(f"model:       {what}")
    print(f"interpreter: LiteRT, {args.threads} thread(s), {args.runs} interleaved invokes each")
    print(
        f"latency:     ours {ours_ms:.2f} ms, reference {ref_ms:.2f} ms (median); ratio ours/reference "
        f"{ratio:.2f} (target <= {TARGET_RATIO}) {'OK' if ratio <= TARGET_RATIO else 'OVER'}"
    )
    print(
        f"size:        ours {size_mb:.2f} MB (target <= {TARGET_MB} MB) "
        f"{'OK' if size_mb <= TARGET_MB else 'OVER'}; "
        f"reference {REFERENCE.stat().st_size / 1e6:.2f} MB (1001 classes)"
    )
    print(f"conversion:  {convert_s:.1f} s wall")
    if gate:
        print(
            f"accuracy:    {'level':<9} {'float':>7} {'int8':>7} {'drop':>6}  (val, "
            f"n={gate['metrics']['float']['n']})"
        )
        for level, row in gate["metrics"]["per_level"].items():
            print(
                f"             {level:<9} {row['float'] * 100:6.1f}% {row['int8'] * 100:6.1f}% "
                f"{row['drop_points']:+6.2f}"
            )
        print(
            f"             top-1 agreement {gate['agreement'] * 100:.1f}%; gate "
            f"{'passed' if gate['passed'] else 'FAILED'}"
        )
    else:
        print("accuracy:    not measured (pass --run RUN_DIR of a trained Grocery run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
