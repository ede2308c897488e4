"""Host-side subcommands `convert` and `keygen`. Only argparse at import time."""

from __future__ import annotations

import argparse
import math

from taxonedge.cli import add_threshold_rule_arg, precision_arg


def register(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser(
        "convert",
        help="quantize a trained run to a full-int8 model bundle",
        description=(
            "Quantize a run directory written by `taxonedge train` to a TFLite model and package it as a "
            "bundle for devices: full int8 by default (uint8 image input, calibrated on training images "
            "through the shared preprocessing), checked against the float model on the validation images "
            "(the accuracy gate), checked for the Edge TPU (and compiled when edgetpu_compiler is on PATH), "
            "with a golden self-test set inside and an Ed25519 signature with --sign-key. Nothing is written "
            "when a check fails."
        ),
        epilog=(
            "examples:\n"
            "  taxonedge convert --run runs/grocery --out grocery.tebundle --sign-key keys/build.key\n"
            "  taxonedge convert --run runs/grocery --out grocery.tebundle --qat auto --max-drop 0.5\n"
            "  taxonedge convert --run runs/grocery --out cpu.tebundle --mode float16 --edgetpu skip\n"
            "exit status: 0 written, 1 accuracy gate or Edge TPU requirement failed, 2 bad input"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument(
        "--run", required=True, metavar="RUN_DIR", help="run directory from `taxonedge train`"
    )
    convert.add_argument(
        "--out", "-o", required=True, metavar="BUNDLE", help="bundle file to write (.tebundle)"
    )
    convert.add_argument(
        "--mode",
        choices=("int8", "float16", "dynamic"),
        default="int8",
        help="int8: full integer, Edge TPU capable (default); float16 / dynamic: CPU only",
    )
    convert.add_argument(
        "--qat",
        choices=("no", "yes", "auto"),
        default="no",
        help="quantization-aware training (tfmot, separate process): yes = always, auto = only "
        "when post-training int8 misses the gate (default: no)",
    )
    convert.add_argument(
        "--calibration-images",
        type=_positive,
        default=300,
        metavar="N",
        help="training images for int8 calibration, drawn stratified by class (default 300)",
    )
    convert.add_argument(
        "--centroid-images",
        type=_positive,
        default=2000,
        metavar="N",
        help="training images, drawn stratified by class, for the per-class centroids and the whitening "
        "enrolled products are matched in (centroids.npz; default 2000)",
    )
    convert.add_argument(
        "--max-drop",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="largest accuracy loss allowed at any taxonomy level, in percentage points (default 1.0)",
    )
    convert.add_argument(
        "--target-precision",
        type=precision_arg,
        metavar="PRECISION",
        help="precision per level the back-off thresholds are chosen to reach on the int8 "
        "model's validation outputs (default: the run's, from `train --target-precision`)",
    )
    add_threshold_rule_arg(convert)
    convert.add_argument(
        "--outputs",
        choices=("logits", "probabilities"),
        default="logits",
        help="logits: the model outputs leaf logits and its embedding, the device takes the softmax in "
        "float (confidence that still ranks the sure answers, an open-set `unknown`, no-item detection); "
        "a format v3 bundle. probabilities: one uint8 probability output, a v2 bundle for daemons that "
        "read only format v2 (default: logits)",
    )
    convert.add_argument(
        "--open-set-pass-rate",
        type=_open_set_rate,
        default=0.98,
        metavar="SHARE",
        help="share of the validation images of known products the open-set threshold lets through; "
        "the rest, and products the model was never trained on that look as unfamiliar, are published "
        "as `unknown` (reason `unfamiliar`). 1 turns the check off (default 0.98)",
    )
    convert.add_argument(
        "--calibration-shift",
        type=float,
        default=2.0,
        metavar="STRENGTH",
        help="choose the back-off and open-set thresholds on views of the validation images as other "
        "occasions would show them (white balance, exposure, blur, framing) so that they hold on a line "
        "the model has not seen; 0 chooses them on the images as they are (default 2.0, measured on "
        "Grocery: docs/trust.md)",
    )
    convert.add_argument(
        "--calibration-views",
        type=_positive,
        default=8,  # train.calibrate.DEFAULT_VIEWS (not imported here: numpy stays out of --help)
        metavar="N",
        help="views of each validation image the thresholds are chosen on (with --calibration-shift): "
        "the views are drawn at random, and with few of them the thresholds depend on the draw (2 views "
        "an image: 64 to 77 %% of labels reaching depth 2 on Grocery's leave-out proxy by the draw alone, "
        "docs/trust.md); time grows with N",
    )
    convert.add_argument(
        "--centroid-weight",
        type=_non_negative,
        default=0.0,
        metavar="W",
        help="decide on the leaf logits plus W times the cosine of the frame's embedding to each trained "
        "leaf's centroid (the bundle's whitened space, from the training images): a nearest-centroid "
        "vote that holds better on new occasions than the fine-tuned head alone (docs/trust.md); the "
        "thresholds and the open set are chosen on the sum. 0: the logits alone (default 0)",
    )
    convert.add_argument(
        "--force",
        action="store_true",
        help="write the bundle even when the accuracy gate fails, or when no depth-1 threshold reaches "
        "the target precision (the device would then call every product unknown)",
    )
    convert.add_argument(
        "--edgetpu",
        choices=("auto", "require", "skip"),
        default="auto",
        help="auto: compile when edgetpu_compiler is on PATH, else ship the CPU model; "
        "require: fail unless every op maps to the Edge TPU; skip: static check only",
    )
    convert.add_argument(
        "--sign-key", metavar="KEY", help="Ed25519 private key (PEM) from `taxonedge keygen`"
    )
    convert.add_argument("--name", help="model name in the manifest (default: from the run)")
    convert.add_argument(
        "--version", help="model version in the manifest (default: UTC time YYYYMMDD.HHMMSS)"
    )
    convert.add_argument(
        "--qat-epochs",
        type=_positive,
        default=1,
        metavar="N",
        help="fine-tuning epochs for quantization-aware training (default 1)",
    )
    convert.add_argument(
        "--qat-images",
        type=_positive,
        default=1000,
        metavar="N",
        help="training images for quantization-aware training, stratified (default 1000)",
    )
    convert.add_argument(
        "--seed", type=int, default=0, help="seed for the calibration draw and QAT (default 0)"
    )
    convert.set_defaults(func=_convert)
    keygen = sub.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing bundles",
        description=(
            "Make an Ed25519 key pair for signing model bundles. Keep the private key on the build host "
            "(mode 0600); install the public key on devices (model.public_key in their config)."
        ),
    )
    keygen.add_argument(
        "--out",
        "-o",
        required=True,
        metavar="PREFIX",
        help="writes PREFIX.key (private, mode 0600) and PREFIX.pub (public)",
    )
    keygen.add_argument("--force", action="store_true", help="overwrite existing key files")
    keygen.set_defaults(func=_keygen)


def _open_set_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.5 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a share between 0.5 and 1 (e.g. 0.98)")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{value} is not 0 or a positive number")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from taxonedge.edge.kernel.signing import SigningKeyError
    from taxonedge.train.rundir import RunDirError

    from taxonedge.cli import CliError

    from .converter import GateError, Options, convert
    from .edgetpu import EdgeTpuError
    from .qat import QatError
    from .quantize import QuantizationError

    opts = Options(
        run=Path(args.run),
        out=Path(args.out),
        mode=args.mode,
        qat=args.qat,
        calibration_images=args.calibration_images,
        centroid_images=args.centroid_images,
        max_drop=args.max_drop,
        force=args.force,
        target_precision=args.target_precision,
        threshold_rule=args.threshold_rule,
        edgetpu=args.edgetpu,
        name=args.name,
        version=args.version,
        sign_key=Path(args.sign_key) if args.sign_key else None,
        qat_epochs=args.qat_epochs,
        qat_images=args.qat_images,
        seed=args.seed,
        outputs=args.outputs,
        calibration_shift=max(0.0, args.calibration_shift),
        calibration_views=args.calibration_views,
        centroid_weight=args.centroid_weight,
        open_set_pass_rate=None if args.open_set_pass_rate >= 1.0 else args.open_set_pass_rate,
    )
    try:
        result = convert(opts)
    except (GateError, EdgeTpuError, QatError) as exc:
        raise CliError(f"{exc}; no bundle written", code=1) from None
    except (RunDirError, SigningKeyError, QuantizationError, ValueError) as exc:
        raise CliError(f"{exc}; no bundle written", code=2) from None
    m = result.manifest
    print(
        f"wrote {result.path} ({result.path.stat().st_size / 1e6:.2f} MB): {m.model.name} {m.model.version}, "
        f"{m.quantization.mode}{' (quantization-aware)' if m.quantization.qat else ''}, "
        f"{'signed by ' + m.signing_key_id if m.signing_key_id else 'unsigned'}"
    )
    print(result.gate["message"] + (" [FORCED past the gate]" if result.gate.get("forced") else ""))
    print(f"edge tpu: {result.edgetpu['summary']}")
    for warning in result.edgetpu.get("warnings", []):
        print(f"warning: {warning}")
    print("time: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in result.timings.items()))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from taxonedge.edge.kernel.signing import SigningKeyError, generate_keypair, key_id, load_public_key

    from taxonedge.cli import CliError

    private, public = f"{args.out}.key", f"{args.out}.pub"
    try:
        generate_keypair(private, public, overwrite=args.force)
    except SigningKeyError as exc:
        raise CliError(str(exc)) from None
    print(
        f"wrote {private} (private, keep it secret) and {public} (key id {key_id(load_public_key(public))})"
    )
    return 0
