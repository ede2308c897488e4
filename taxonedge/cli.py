"""The `taxonedge` command. Each stage registers its subcommands from a light `cli` module; the heavy
libraries (TensorFlow, OpenCV, paho) are imported only inside the subcommand that needs them, so
`taxonedge --help` and the device commands work without TensorFlow installed."""

from __future__ import annotations

import argparse
import logging
import sys

from taxonedge import __version__


class CliError(Exception):
    """A failure to report as one clear line (no traceback) with a non-zero exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def precision_arg(text: str) -> float:
    """argparse type for a target precision (train, convert, evaluate): a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a precision between 0 and 1, such as 0.98")
    return value


THRESHOLD_RULE_CHOICES = ("published", "per_depth")  # train/calibrate.py THRESHOLD_RULES


def add_threshold_rule_arg(parser: argparse.ArgumentParser) -> None:
    """`--threshold-rule` (convert, evaluate --fit-thresholds): what the target precision applies to."""
    parser.add_argument(
        "--threshold-rule",
        choices=THRESHOLD_RULE_CHOICES,
        default="published",
        help="published (default): the labels as the device publishes them, each at the depth where it "
        "stops, reach the target precision together, telling as much about the items as that allows (a "
        "label counts log(leaves / its leaves): a leaf the most, a broad top level little). per_depth: each "
        "depth's labels reach it separately, so the labels that stop above a leaf (the unsure ones) can "
        "fall short of it (docs/trust.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    from taxonedge.convert import cli as convert_cli
    from taxonedge.edge.tools import cli as edge_cli
    from taxonedge.train import cli as train_cli

    parser = argparse.ArgumentParser(
        prog="taxonedge",
        description=(
            "Hierarchical product classification for sorting lines. Host stage: train, evaluate, convert, "
            "keygen. Device stage: run, inspect, deploy. `taxonedge COMMAND --help` explains each one."
        ),
    )
    parser.add_argument("--version", action="version", version=f"taxonedge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train_cli.register(sub)
    convert_cli.register(sub)
    edge_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"taxonedge {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
