"""`taxonedge empty-belt`: teach a device what its empty belt looks like, so that frames without a product
publish no product label (edge/service/noitem.py, docs/mqtt.md "No item").

Sends the device's `learn_empty` command (or `forget_empty` with --forget) over MQTT v5 with a response
topic, waits for the one answer and prints it: the frames captured, the similarity threshold derived from
them and their spread. The operator keeps the belt empty for the whole capture.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from taxonedge.cli import CliError

from .deploy import EXIT_FAILED, EXIT_TIMEOUT
from .request import device_target, send_command


def empty_belt_command(args: Any) -> int:
    """Exit 0 when the device learned (or forgot) the empty belt, 1 when it refused or failed, 3 without
    an answer in time, 2 for bad arguments (nothing sent)."""
    target = device_target(args.target)
    name, payload = ("forget_empty", {}) if args.forget else ("learn_empty", {"seconds": args.seconds})
    if not args.forget and not 1 <= args.seconds <= 600:
        raise CliError(f"--seconds {args.seconds:g}: from 1 to 600")
    if not args.forget:
        print(f"learning the empty belt for {args.seconds:g} s: keep the belt empty ...", file=sys.stderr)
    answer = send_command(args, target, name, payload, args.timeout + (0 if args.forget else args.seconds))
    if answer is None:
        print(
            f"{target}: no answer to {name} within {args.timeout:g} s: is the device running and "
            "connected to this broker?",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    if args.json:
        print(json.dumps(answer))
    elif answer.get("ok"):
        print(_summary(target, answer.get("result") or {}, args.forget))
    if not answer.get("ok"):
        print(f"{target}: {name} refused: {answer.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _summary(target: str, result: dict, forget: bool) -> str:
    if forget:
        had = "forgot its empty belt" if result.get("forgotten") else "had no empty belt to forget"
        return f"{target}: {had}; frames are no longer compared with one"
    sims = result.get("similarity") or {}
    return (
        f"{target}: learned the empty belt from {result.get('frames')} frames "
        f"({result.get('stored')} stored, {result.get('thumbnails')} thumbnails for model switches)\n"
        f"  similarity to the empty belt: min {sims.get('min')}, median {sims.get('median')}, "
        f"max {sims.get('max')}\n"
        f"  threshold {result.get('threshold')}: frames at least this similar publish no product label"
        + (
            f"\n  warning: {result['below_threshold']} captured frames are below it (no_item.min_similarity "
            "clamps it): was the belt empty and steady?"
            if result.get("below_threshold")
            else ""
        )
    )
