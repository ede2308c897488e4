"""Device-side subcommands: `run`, `inspect`, `deploy`, `sign`, `listen`, `empty-belt`, `enroll`,
`enrolled`. Only argparse at import time."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """The device-stage subcommands (over 80 lines: argparse declarations, one parser after another)."""
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
    run.add_argument("--config", "-c", metavar="FILE", help="TOML configuration file (required)")
    run.add_argument(
        "--validate-config",
        nargs="?",
        const=True,
        default=None,
        metavar="FILE",
        help="check the configuration (keys, types, files it names) and exit: 0 if valid. "
        "FILE, or the --config file when FILE is left out",
    )
    run.add_argument(
        "--max-frames",
        type=int,
        default=None,
        metavar="N",
        help="stop after N classified frames (for demos and tests)",
    )
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
    inspect.add_argument(
        "--pubkey", metavar="KEY", help="Ed25519 public key (PEM) the signature must verify against"
    )
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=_inspect)

    deploy = sub.add_parser(
        "deploy",
        help="push a model bundle to devices over MQTT and follow them to commit or rollback",
        description=(
            "Publish a model bundle to one device or a fleet group and show each device's progress live: "
            "received, verifying, staged, warming, self_test, switched, committed -- or rejected / "
            "rolled_back with the reason. Devices verify the signature, self-test the model while the old "
            "one keeps serving, switch between items and roll back by themselves if the new model fails "
            "its health window. The request and its chunks are retained on the broker: a device that is off "
            "runs the deployment when it connects (--no-wait returns at once; --pending lists what waits and "
            "each device's outcome; --cancel withdraws it). Targets: SITE/LINE/DEVICE or groups/NAME "
            "(devices listing NAME in mqtt.groups). Topics and payloads: docs/deploy.md.\n\n"
            "exit status:\n"
            "  0  every device committed and serves the bundle (--no-wait: published; --pending, --cancel: "
            "done)\n"
            "  1  a device rejected the bundle, rolled it back, or answered a repeated --id with an outcome\n"
            "     that leaves another model serving; or the broker refused or could not be reached\n"
            "  2  bad arguments or a bundle not worth sending (unreadable, damaged, --pubkey mismatch):\n"
            "     nothing was sent\n"
            "  3  --timeout passed without every device's outcome (the request stays retained)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    deploy.add_argument("bundle", nargs="?", metavar="BUNDLE", help="signed bundle file (.tebundle)")
    deploy.add_argument(
        "--broker",
        required=True,
        type=_broker,
        metavar="HOST[:PORT]",
        help="MQTT broker (port 1883 by default)",
    )
    deploy.add_argument(
        "--target",
        "-t",
        action="append",
        metavar="SITE/LINE/DEVICE|groups/NAME",
        help="device or fleet group; repeat for several (with --pending: default all)",
    )
    deploy.add_argument("--prefix", default="taxonedge", help="topic prefix the devices use (mqtt.prefix)")
    deploy.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="give up after S seconds without every device's outcome (default 300)",
    )
    deploy.add_argument(
        "--id",
        metavar="ID",
        help="deployment id (default: from the bundle's name, version and hash: a device that "
        "committed it and still serves it answers with that outcome, one serving another "
        "model runs it again); use a new one to retry after a rejection. With --cancel: "
        "withdraw only this id",
    )
    deploy.add_argument(
        "--url",
        metavar="URL",
        help="have devices fetch the bundle from this file:// or https:// URL instead of "
        "sending it over MQTT",
    )
    deploy.add_argument(
        "--chunk-size",
        type=int,
        default=256 * 1024,
        metavar="BYTES",
        help="MQTT chunk size (default 256 KiB)",
    )
    deploy.add_argument(
        "--expect",
        type=int,
        default=1,
        metavar="N",
        help="for groups: wait for at least N devices to answer (default 1)",
    )
    deploy.add_argument(
        "--no-wait",
        action="store_true",
        help="publish (retained) and exit 0 saying where it is pending; do not follow devices",
    )
    deploy.add_argument(
        "--pending",
        action="store_true",
        help="list the retained deployments of --target (default: all) and each device's outcome",
    )
    deploy.add_argument(
        "--cancel",
        action="store_true",
        help="withdraw the retained deployment of each --target (devices that started it finish)",
    )
    deploy.add_argument("--pubkey", metavar="KEY", help="check the bundle's signature locally before sending")
    deploy.add_argument("--username", help="broker user name")
    deploy.add_argument("--password-file", metavar="FILE", help="file holding the broker password")
    deploy.add_argument(
        "--password-env", metavar="VAR", help="environment variable holding the broker password"
    )
    deploy.add_argument("--ca-file", metavar="FILE", help="CA certificate for a TLS broker")
    deploy.set_defaults(func=_deploy)

    sign = sub.add_parser(
        "sign",
        help="re-sign a model bundle with your own key (e.g. the demo bundle)",
        description=(
            "Verify a bundle (every file's sha256; with --pubkey its current signature too) and write a copy "
            "signed with your Ed25519 private key from `taxonedge keygen`; devices whose model.public_key is "
            "the matching public key accept it. --version records a new model version in the manifest, so "
            "the same model can be rolled out as a release of its own. Exits 2 on a damaged bundle or an "
            "unusable key."
        ),
    )
    sign.add_argument("bundle", metavar="BUNDLE", help="bundle file (.tebundle)")
    sign.add_argument(
        "--key", required=True, metavar="KEY", help="Ed25519 private key (PEM) from `taxonedge keygen`"
    )
    sign.add_argument("--out", required=True, metavar="FILE", help="where to write the signed bundle")
    sign.add_argument(
        "--version", dest="model_version", metavar="V", help="set the model version in the manifest"
    )
    sign.add_argument(
        "--pubkey", metavar="KEY", help="require the bundle's current signature to verify against KEY"
    )
    sign.set_defaults(func=_sign)

    listen = sub.add_parser(
        "listen",
        help="print a device's labels live, as a logistics system receives them",
        description=(
            "Subscribe to a device's labels and status and print one readable line per label "
            "(Fruit > Apple > Granny-Smith, the decision and the per-level scores); --json prints the raw "
            "messages. '+' in --site/--line/--device listens to many devices."
        ),
    )
    listen.add_argument(
        "--broker",
        type=_broker,
        default=("127.0.0.1", 1883),
        metavar="HOST[:PORT]",
        help="MQTT broker (default 127.0.0.1:1883)",
    )
    listen.add_argument("--prefix", default="taxonedge", help="topic prefix (mqtt.prefix)")
    listen.add_argument("--site", default="+", help="site (default: all)")
    listen.add_argument("--line", default="+", help="line (default: all)")
    listen.add_argument("--device", default="+", help="device (default: all)")
    listen.add_argument("--topic", action="append", metavar="FILTER", help="subscribe to this filter instead")
    listen.add_argument("--json", action="store_true", help="print raw JSON messages, one per line")
    listen.add_argument(
        "--count", type=int, metavar="N", help="exit 0 after N labels (non-zero if fewer by --timeout)"
    )
    listen.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds")
    listen.add_argument("--username", help="broker user name")
    listen.add_argument("--password-file", metavar="FILE", help="file holding the broker password")
    listen.add_argument(
        "--password-env", metavar="VAR", help="environment variable holding the broker password"
    )
    listen.add_argument("--ca-file", metavar="FILE", help="CA certificate for a TLS broker")
    listen.set_defaults(func=_listen)
    _register_empty_belt(sub)
    _register_enroll(sub)


def _device_command_args(parser: argparse.ArgumentParser) -> None:
    """Broker, device and answer options of the commands that ask one device something."""
    parser.add_argument(
        "--broker",
        required=True,
        type=_broker,
        metavar="HOST[:PORT]",
        help="MQTT broker (port 1883 by default)",
    )
    parser.add_argument("--target", "-t", required=True, metavar="SITE/LINE/DEVICE", help="the device")
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="wait this long for the answer"
    )
    parser.add_argument("--json", action="store_true", help="print the device's answer as JSON")
    parser.add_argument("--prefix", default="taxonedge", help="topic prefix the devices use (mqtt.prefix)")
    parser.add_argument("--username", help="broker user name")
    parser.add_argument("--password-file", metavar="FILE", help="file holding the broker password")
    parser.add_argument(
        "--password-env", metavar="VAR", help="environment variable holding the broker password"
    )
    parser.add_argument("--ca-file", metavar="FILE", help="CA certificate for a TLS broker")


def _register_enroll(sub: argparse._SubParsersAction) -> None:
    enroll = sub.add_parser(
        "enroll",
        help="add a product to a running device from a few photos: no retraining, no redeploy",
        description=(
            "Enroll a product the model was not trained on: the device embeds the photos with its model "
            "(a format v3 bundle) and from then on labels a frame with --label when it is close to them, "
            "and closer to them than to the trained class the model picked (source enrolled in the label). "
            "The label goes under an existing branch (Packages/Milk/New-Brand) or starts a new one; it may "
            "not be a trained class or branch. 5 or more photos from the line work best. In force when the "
            "command returns; kept across restarts and model updates (a new model embeds the photos "
            "again). --from-belt N instead of photos: the next N items triggered on the line (trigger.mode "
            "= item) are the product, one frame of each is kept; they are labelled as usual meanwhile. "
            "--cancel ends such a capture.\n\n"
            "exit status: 0 enrolled; 1 the device refused (the reason is printed); 2 bad arguments or an "
            "unreadable photo (nothing sent); 3 no answer in time"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _device_command_args(enroll)
    enroll.add_argument("--label", "-l", metavar="A/B/C", help="the product's label path")
    enroll.add_argument("photos", nargs="*", metavar="PHOTO", help="JPEG or PNG photos of the product")
    enroll.add_argument(
        "--from-belt",
        type=int,
        metavar="N",
        help="no photos: the next N triggered items on the belt are the product (item mode, 1-32)",
    )
    enroll.add_argument(
        "--belt-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="with --from-belt: give up when the N items have not come within S seconds (default 300)",
    )
    enroll.add_argument("--cancel", action="store_true", help="end the device's belt enrollment now")
    enroll.set_defaults(func=_enroll)
    enrolled = sub.add_parser(
        "enrolled",
        help="list, rename, remove or export a device's enrolled products",
        description=(
            "list: the enrolled products. rename --label OLD --to NEW, remove --label L: change them (in "
            "force at once). export --out DIR [--label L]: their photos in the training data layout "
            "(DIR/<label path>/*.jpg), for the next `taxonedge train` to include."
        ),
    )
    _device_command_args(enrolled)
    enrolled.add_argument("action", choices=("list", "rename", "remove", "export"))
    enrolled.add_argument("--label", "-l", metavar="A/B/C")
    enrolled.add_argument("--to", metavar="A/B/C", help="the new label (rename)")
    enrolled.add_argument("--out", metavar="DIR", help="folder to write the photos to (export)")
    enrolled.set_defaults(func=_enrolled)


def _register_empty_belt(sub: argparse._SubParsersAction) -> None:
    belt = sub.add_parser(
        "empty-belt",
        help="teach a device its empty belt: frames without a product publish no product label",
        description=(
            "Send a device the learn_empty command: for --seconds it captures the belt, which must stay "
            "empty, and from then on a frame that looks like it is published as unknown with reason "
            "no_item (or not at all: [no_item] publish in the device config), never as a product. Needs a "
            "model with an embedding output (bundle format v3); the device keeps the reference across "
            "restarts and model switches. --forget drops it. Prints the frames captured, the similarity "
            "threshold derived from them and their spread (docs/mqtt.md, 'No item').\n\n"
            "exit status: 0 learned (or forgot); 1 the device refused or failed, or the broker could not be "
            "reached; 2 bad arguments; 3 no answer in time"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _device_command_args(belt)
    belt.add_argument(
        "--seconds", type=float, default=60.0, metavar="S", help="how long to capture (1-600, default 60)"
    )
    belt.add_argument("--forget", action="store_true", help="drop the device's empty belt instead")
    belt.set_defaults(func=_empty_belt)


def _run(args: argparse.Namespace) -> int:
    from taxonedge.cli import CliError

    # `run --validate-config FILE` and `run --config FILE --validate-config` say the same thing
    if isinstance(args.validate_config, str):
        if args.config and args.config != args.validate_config:
            raise CliError(
                f"--config {args.config} and --validate-config {args.validate_config} name two "
                "files: give one"
            )
        args.config, args.validate_config = args.validate_config, True
    if not args.config:
        raise CliError("--config FILE is required (see examples/config.toml for every key)")
    from ..service.config import ConfigError, load_config
    from ..service.daemon import Daemon, StartupError, validate

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc), 2) from None
    if args.validate_config:
        problems = validate(config)
        if problems:
            raise CliError("\n".join(problems), 2)
        print(
            f"{args.config}: valid ({config.source.type} source, {config.trigger.mode} trigger, "
            f"{config.inference.backend} backend, MQTT {config.mqtt.host}:{config.mqtt.port})"
        )
        return 0
    try:
        return Daemon(config, max_frames=args.max_frames).run()
    except StartupError as exc:
        raise CliError(str(exc), exc.code) from None


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_command

    return inspect_command(args)


def _deploy(args: argparse.Namespace) -> int:
    from .deploy import deploy_command

    return deploy_command(args)


def _sign(args: argparse.Namespace) -> int:
    from .deploy import sign_command

    return sign_command(args)


def _broker(value: str) -> tuple[str, int]:
    from .listen import parse_broker

    return parse_broker(value)


def _enroll(args: argparse.Namespace) -> int:
    from .enroll import enroll_command

    return enroll_command(args)


def _enrolled(args: argparse.Namespace) -> int:
    from .enroll import enrolled_command

    return enrolled_command(args)


def _empty_belt(args: argparse.Namespace) -> int:
    from .emptybelt import empty_belt_command

    return empty_belt_command(args)


def _listen(args: argparse.Namespace) -> int:
    from .listen import listen_command

    return listen_command(args)
