"""The host pipeline from images to a signed int8 bundle, timed per phase, with float and int8 accuracy.

    .venv/bin/python bench/bench_pipeline.py [--data LIST_OR_DIR --val LIST_OR_DIR] [--out DIR] [--quick]
                                             [--convert-args="..."] [-- extra `taxonedge train` arguments]

Every phase runs as the user would run it, through the CLI in a subprocess:
1. `taxonedge keygen`, 2. `taxonedge train` (its own timings: image loading, cached features, head,
fine-tuning), 3. `taxonedge convert` (full int8, signed), 4. `taxonedge evaluate --model` (float) and
5. `taxonedge evaluate --bundle` (int8 through LiteRT), both on the images the run held out (its
splits.json: the val set, less the share `--train-on-val` moved into training). Prints the wall time of each
phase, the per-level top-1 of float and int8 side by side, their top-1 agreement, and the bundle size.

Data: the Grocery Store train/val lists from ../shared with the ImageNet weights there (the full recipe,
about 30 min on 2 cores), or with --quick or without ../shared a generated folder tree and a tiny
MobileNetV2 from random weights (about a minute).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from taxonedge.train.metrics import agreement  # noqa: E402

from tests.conftest import GROCERY, TINY_LABELS, WEIGHTS, write_image_tree  # noqa: E402

GROCERY_WEIGHTS = WEIGHTS / "mobilenet_v2_1.0_224_imagenet_no_top.weights.h5"
QUICK_TRAIN_ARGS = [
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
    "3",
    "--unfreeze",
    "20",
    "--batch-size",
    "16",
]


def cli(*args: str) -> float:
    """Run `python -m taxonedge ARGS`, streaming its output; return the wall time in seconds."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "taxonedge", *args])
    if proc.returncode != 0:
        sys.exit(f"taxonedge {args[0]} failed with exit status {proc.returncode}")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="training images (default: Grocery train list, else generated)")
    parser.add_argument("--val", help="validation images (default: Grocery val list, else generated)")
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    parser.add_argument(
        "--quick", action="store_true", help="generated data and a tiny model (about a minute)"
    )
    parser.add_argument(
        "--convert-args",
        default="",
        help='extra arguments for `taxonedge convert`, one string after "=" (the shipped bundle\'s: '
        '--convert-args="--max-drop 2.5 --calibration-shift 1.5 --name grocery-lite0 --version V")',
    )
    parser.add_argument("train_args", nargs="*", help="extra arguments for `taxonedge train` (after --)")
    args = parser.parse_args()

    work = Path(args.out or tempfile.mkdtemp(prefix="bench_pipeline_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.data:
        data, val, train_args = args.data, args.val, []
    elif not args.quick and (GROCERY / "train.txt").exists() and GROCERY_WEIGHTS.exists():
        data, val = str(GROCERY / "train.txt"), str(GROCERY / "val.txt")
        train_args = ["--weights", str(GROCERY_WEIGHTS)]
    else:
        data = str(write_image_tree(work / "data" / "train", TINY_LABELS, per_class=24, seed=1))
        val = str(write_image_tree(work / "data" / "val", TINY_LABELS, per_class=8, seed=2))
        train_args = list(QUICK_TRAIN_ARGS)
    train_args += args.train_args
    run, bundle, key = work / "run", work / "model.tebundle", work / "signing"

    times: dict[str, float] = {}
    times["keygen"] = cli("keygen", "--out", str(key), "--force")
    times["train"] = cli(
        "train", "--data", data, *(["--val", val] if val else []), "--out", str(run), *train_args
    )
    times["convert"] = cli(
        "convert",
        "--run",
        str(run),
        "--out",
        str(bundle),
        "--sign-key",
        f"{key}.key",
        "--edgetpu",
        "skip",
        "--force",
        *shlex.split(args.convert_args),
    )
    eval_data = str(
        run / "splits.json"
    )  # the images the run held out (all of val, less any --train-on-val share)
    times["evaluate float"] = cli(
        "evaluate", "--model", str(run), "--data", eval_data, "--out", str(work / "eval_float")
    )
    times["evaluate int8"] = cli(
        "evaluate", "--bundle", str(bundle), "--data", eval_data, "--out", str(work / "eval_int8")
    )

    train_timings = json.loads((run / "metrics.json").read_text()).get("timings", {})
    fl = json.loads((work / "eval_float" / "metrics.json").read_text())
    q8 = json.loads((work / "eval_int8" / "metrics.json").read_text())
    probs_f = np.load(work / "eval_float" / "predictions.npz")["probs"]
    probs_q = np.load(work / "eval_int8" / "predictions.npz")["probs"]

    print(f"\n=== images -> signed int8 bundle: {data} (val {eval_data}) ===")
    print(f"{'phase':<28}{'wall s':>10}")
    for phase in ("keygen", "train"):
        print(f"{phase:<28}{times[phase]:>10.1f}")
    for key_name, label in (
        ("load_images_s", "  load + decode images"),
        ("features_s", "  frozen features (cache)"),
        ("head_s", "  head on cached features"),
        ("fine_tune_s", "  fine-tune top layers"),
    ):
        if key_name in train_timings:
            print(f"{label:<28}{train_timings[key_name]:>10.1f}")
    for phase in ("convert", "evaluate float", "evaluate int8"):
        print(f"{phase:<28}{times[phase]:>10.1f}")
    images_to_bundle = times["keygen"] + times["train"] + times["convert"]
    print(f"{'images -> signed bundle':<28}{images_to_bundle:>10.1f}   ({images_to_bundle / 60:.1f} min)")

    print(f"\n{'val top-1 (n=' + str(fl['n']) + ')':<28}{'float':>10}{'int8':>10}{'int8-float':>12}")
    for level in fl["accuracy"]:
        f, q = fl["accuracy"][level], q8["accuracy"][level]
        print(f"{level:<28}{100 * f:>9.1f}%{100 * q:>9.1f}%{100 * (q - f):>+11.1f}")
    for level in fl["accuracy_summed"]:
        if level != "leaf":
            f, q = fl["accuracy_summed"][level], q8["accuracy_summed"][level]
            print(f"{level + ' (summed probs)':<28}{100 * f:>9.1f}%{100 * q:>9.1f}%{100 * (q - f):>+11.1f}")
    print(f"{'top-5':<28}{100 * fl['top5']:>9.1f}%{100 * q8['top5']:>9.1f}%")
    print(
        f"{'published-label precision':<28}{_pct(fl['backoff']['published_precision']):>10}"
        f"{_pct(q8['backoff']['published_precision']):>10}"
    )
    print(
        f"top-1 agreement float vs int8: {100 * agreement(probs_f, probs_q):.1f}%   "
        f"bundle: {bundle.stat().st_size / 1e6:.2f} MB   work folder: {work}"
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    main()
