"""Host-side subcommands `train` and `evaluate`. Only argparse at import time: TensorFlow is imported
inside the command."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="fine-tune an ImageNet backbone on a label taxonomy",
        description="Fine-tune an ImageNet-pretrained backbone on images organised by a label taxonomy.",
    )
    train.set_defaults(func=_train)
    evaluate = sub.add_parser(
        "evaluate",
        help="per-level accuracy and reports for a run or a bundle",
        description="Evaluate a trained run (Keras) or a bundle (int8 through LiteRT) per taxonomy level.",
    )
    evaluate.set_defaults(func=_evaluate)


def _train(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _evaluate(args: argparse.Namespace) -> int:
    raise NotImplementedError
