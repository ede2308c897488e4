"""`taxonedge listen`: print labels and device status live, as a logistics system receives them.

A small subscriber for demos, commissioning and debugging: one readable line per label
(`Fruit > Apple > Granny-Smith`, the decision and per-level scores), or the raw JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any, TextIO

from ..kernel.protocol import DeviceTopics, device_base

ARROW = " > "


def parse_broker(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":") if ":" in value else (value, "", "1883")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not HOST or HOST:PORT") from None


def format_label(msg: dict[str, Any]) -> str:
    """One line for a label message (schema taxonedge.label/1)."""
    clock = str(msg.get("timestamp", ""))[11:23]
    where = "/".join(str(msg.get(k, "?")) for k in ("site", "line", "device"))
    label = ARROW.join(msg.get("path") or []) or "unknown"
    if msg.get("reason") == "no_item":  # the empty belt: worth telling apart from an unsure product
        label = "(no item)"
    elif msg.get("decision") == "unknown" and msg.get("reason"):
        label = f"unknown ({msg['reason']})"
    elif msg.get("source") == "enrolled":  # decided by a product enrolled on the device, not the model
        label += f" [enrolled {msg.get('similarity', 0):.2f}]"
    scores = " / ".join(
        f"{lv.get('score', 0):.2f}" + ("" if lv.get("passed") else "✗") for lv in msg.get("levels", [])
    )
    parts = [
        f"{clock}  {where}  #{msg.get('seq', '?'):<5} {label:<42} {msg.get('decision', '?'):<10} ({scores})"
    ]
    if msg.get("item_id") is not None:
        vote = msg.get("vote") or {}
        parts.append(
            f"item {msg['item_id']}" + (f" {vote.get('agreeing')}/{vote.get('frames')} agree" if vote else "")
        )
    if msg.get("latency_ms") is not None:
        parts.append(f"{msg['latency_ms']:.1f} ms")
    return "  ".join(parts)


def listen(
    host: str,
    port: int,
    topics: list[str],
    as_json: bool = False,
    count: int | None = None,
    timeout: float | None = None,
    out: TextIO = sys.stdout,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
) -> int:
    """Subscribe and print until `count` labels arrived, `timeout` seconds passed, or Ctrl-C."""
    import paho.mqtt.client as mqtt

    done = threading.Event()
    seen = 0

    def on_connect(client, userdata, flags, reason_code, properties):  # noqa: ANN001 - paho callback
        if reason_code.is_failure:
            print(f"broker {host}:{port} refused the connection: {reason_code}", file=sys.stderr)
            return
        for topic in topics:
            client.subscribe(topic, qos=1)

    def on_message(client, userdata, message):  # noqa: ANN001 - paho callback
        nonlocal seen
        if done.is_set():  # --count reached: paho's thread delivers until loop_stop(), print no more
            return
        try:
            msg = json.loads(message.payload)
        except (ValueError, UnicodeDecodeError):
            print(f"{message.topic}: {message.payload[:200]!r} (not JSON)", file=out, flush=True)
            return
        if as_json:
            print(json.dumps({"topic": message.topic, "payload": msg}), file=out, flush=True)
        elif message.topic.endswith("/labels"):
            print(format_label(msg), file=out, flush=True)
        elif message.topic.endswith("/status"):
            state = msg.get("state", msg) if isinstance(msg, dict) else msg
            print(f"-- {message.topic.rsplit('/', 1)[0]} is {state}", file=out, flush=True)
        if message.topic.endswith("/labels"):
            seen += 1
            if count is not None and seen >= count:
                done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if username:
        client.username_pw_set(username, password)
    if ca_file:
        client.tls_set(ca_certs=ca_file)
    client.on_connect, client.on_message = on_connect, on_message
    client.connect_async(host, port)
    client.loop_start()
    try:
        done.wait(timeout)
    except KeyboardInterrupt:
        pass
    finally:
        client.loop_stop()
        client.disconnect()
    return 0 if count is None or seen >= count else 1


def listen_command(args: argparse.Namespace) -> int:
    host, port = args.broker
    device = DeviceTopics(device_base(args.prefix, args.site, args.line, args.device))
    topics = args.topic or [device.labels, device.status]
    from .deploy import password_from_args

    password = password_from_args(args)
    started = time.monotonic()
    code = listen(
        host,
        port,
        topics,
        as_json=args.json,
        count=args.count,
        timeout=args.timeout,
        username=args.username,
        password=password,
        ca_file=args.ca_file,
    )
    if code and args.count is not None:
        print(
            f"taxonedge listen: fewer than {args.count} labels in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
        )
    return code
