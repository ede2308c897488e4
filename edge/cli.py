"""Device-side subcommands: `run`, `inspect`, `deploy`. Only argparse at import time."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="run the edge daemon: capture, classify, publish labels over MQTT",
        description=(
            "Run the edge daemon from a TOML config: frames from a camera, stream, video file or image "
            "folder are classified with the installed model bundle (Edge TPU or CPU) and each "
            "hierarchical label is published over MQTT. Labels go through a durable outbox, so none is "
            "lost while the broker is away. See examples/config.toml for every key."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", "-c", required=True, metavar="FILE", help="TOML configuration file")
    run.add_argument("--validate-config", action="store_true",
                     help="check the configuration (keys, types, files it names) and exit: 0 if valid")
    run.add_argument("--max-frames", type=int, default=None, metavar="N",
                     help="stop after N classified frames (for demos and tests)")
    run.set_defaults(func=_run)

    inspect = sub.add_parser(
        "inspect",
        help="show and verify a model bundle",
        description=(
            "Verify a model bundle (every file's sha256, the manifest, and with --pubkey the signature) "
            "and print what it holds: model, taxonomy, input and output spec, thresholds, metrics, "
            "operators and tensor types, Edge TPU status. Exits non-zero when the bundle is damaged or "
            "the signature does not verify."
        ),
    )
    inspect.add_argument("bundle", metavar="BUNDLE", help="bundle file (.tebundle)")
    inspect.add_argument("--pubkey", metavar="KEY", help="Ed25519 public key (PEM) the signature must verify against")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=_inspect)


def _run(args: argparse.Namespace) -> int:
    from .daemon import run_command

    return run_command(args)


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_command

    return inspect_command(args)
