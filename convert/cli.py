"""Host-side subcommands `convert` and `keygen`. Only argparse at import time."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser(
        "convert",
        help="quantize a trained run to a full-int8 model bundle",
        description="Quantize a trained run to full int8 TFLite and package a signed model bundle.",
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
    keygen.add_argument("--out", "-o", required=True, metavar="PREFIX",
                        help="writes PREFIX.key (private, mode 0600) and PREFIX.pub (public)")
    keygen.add_argument("--force", action="store_true", help="overwrite existing key files")
    keygen.set_defaults(func=_keygen)


def _convert(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _keygen(args: argparse.Namespace) -> int:
    from taxonedge.cli import CliError
    from taxonedge.edge.signing import SigningKeyError, generate_keypair, key_id, load_public_key

    private, public = f"{args.out}.key", f"{args.out}.pub"
    try:
        generate_keypair(private, public, overwrite=args.force)
    except SigningKeyError as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {private} (private, keep it secret) and {public} (key id {key_id(load_public_key(public))})")
    return 0
