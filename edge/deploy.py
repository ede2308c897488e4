"""`taxonedge deploy`: push a model bundle to devices over MQTT and follow each device to its outcome.

A target is the topic path under the prefix: `SITE/LINE/DEVICE` for one device, `groups/NAME` for every
device that lists NAME in `mqtt.groups` (one publish reaches the whole fleet). The command publishes the
request and the chunks (QoS 1), answers devices that ask for missing chunks (a transfer resumes after a
reconnect), shows each device's state live, and exits 0 only when every device committed.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from taxonedge.cli import CliError

from .bundle import BundleError, read_bundle
from .update import FINAL

DEFAULT_CHUNK = 256 * 1024
EXIT_FAILED, EXIT_TIMEOUT = 1, 3


def make_request(data: bytes, deployment_id: str, chunk_size: int = DEFAULT_CHUNK, url: str | None = None) -> dict:
    request: dict[str, Any] = {"id": deployment_id, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if url is not None:
        request["url"] = url
    else:
        request.update(chunk_size=chunk_size, chunks=math.ceil(len(data) / chunk_size))
    return request


def deploy_topic(prefix: str, target: str) -> str:
    return f"{prefix}/{target}/deploy" if target.startswith("groups/") else f"{prefix}/{target}/model/deploy"


def chunk_topic(deploy_topic_: str, deployment_id: str, index: int) -> str:
    return f"{deploy_topic_}/{deployment_id}/chunk/{index}"


def chunk(data: bytes, chunk_size: int, index: int) -> bytes:
    return data[index * chunk_size:(index + 1) * chunk_size]


def parse_target(target: str) -> str:
    parts = target.strip("/").split("/")
    shape_ok = (len(parts) == 2 and parts[0] == "groups") or len(parts) == 3
    if shape_ok and all(p and not set(p) & set("+#") for p in parts):
        return "/".join(parts)
    raise CliError(f"--target {target!r}: expected SITE/LINE/DEVICE or groups/NAME")


def deploy_command(args: Any) -> int:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from tqdm import tqdm

    targets = [parse_target(t) for t in args.target]
    path = Path(args.bundle)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror or exc}") from None
    public_key = None
    if args.pubkey:
        from .signing import SigningKeyError, load_public_key

        try:
            public_key = load_public_key(args.pubkey)
        except SigningKeyError as exc:
            raise CliError(str(exc)) from None
    try:
        bundle = read_bundle(data, public_key=public_key, max_bytes=max(len(data), 1))
    except BundleError as exc:
        raise CliError(f"not deploying: {exc}") from None
    if bundle.signature is None:
        print("warning: the bundle is unsigned; devices with model.require_signature (the default) reject it",
              file=sys.stderr)
    # The default id is the bundle's hash: deploying the same bundle again is a no-op on devices that had
    # it; pass --id to try again after a rejection.
    deployment_id = args.id or f"{bundle.name}-{bundle.version}-{bundle.sha256[:12]}".replace("/", "-")
    request = make_request(data, deployment_id, args.chunk_size, args.url)
    chunks = request.get("chunks", 0)

    host, port = args.broker
    client_id = f"taxonedge-deploy-{uuid.uuid4().hex[:8]}"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if args.username:
        client.username_pw_set(args.username, password_from_args(args))
    if args.ca_file:
        client.tls_set(ca_certs=args.ca_file)
    inbox: queue.Queue = queue.Queue()
    connected = queue.Queue()
    response_topic = f"{args.prefix}/deploy/responses/{client_id}"
    subscriptions = [response_topic] + [
        f"{args.prefix}/{'+/+/+' if t.startswith('groups/') else t}/model/deploy/{deployment_id}" for t in targets]

    def on_connect(c, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            connected.put(str(reason_code))
            return
        for topic in subscriptions:
            c.subscribe(topic, qos=1)
        connected.put(None)

    client.on_connect = on_connect
    client.on_message = lambda c, u, msg: inbox.put(msg)
    try:
        client.connect(host, port)
    except OSError as exc:
        raise CliError(f"cannot connect to the broker {host}:{port}: {exc}", EXIT_FAILED) from None
    client.loop_start()
    try:
        error = connected.get(timeout=10)
        if error:
            raise CliError(f"the broker {host}:{port} refused the connection: {error}", EXIT_FAILED)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = response_topic
        props.CorrelationData = deployment_id.encode()
        deploy_topics = [deploy_topic(args.prefix, t) for t in targets]
        for topic in deploy_topics:
            client.publish(topic, json.dumps(request), qos=1, properties=props).wait_for_publish(10)
        if chunks:
            with tqdm(total=len(data), unit="B", unit_scale=True, desc="upload", file=sys.stderr) as bar:
                for i in range(chunks):
                    piece = chunk(data, args.chunk_size, i)
                    infos = [client.publish(chunk_topic(t, deployment_id, i), piece, qos=1) for t in deploy_topics]
                    for info in infos:
                        info.wait_for_publish(30)
                    bar.update(len(piece))
        return _follow(client, inbox, targets, deployment_id, data, args, deploy_topics)
    finally:
        client.loop_stop()
        client.disconnect()


def _follow(client: Any, inbox: queue.Queue, targets: list[str], deployment_id: str, data: bytes, args: Any,
            deploy_topics: list[str]) -> int:
    """Show each device's progress until all are final (or --timeout); resend chunks devices ask for."""
    from tqdm import tqdm

    prefix = args.prefix
    expected = {f"{prefix}/{t}" for t in targets if not t.startswith("groups/")}
    groups = [t for t in targets if t.startswith("groups/")]
    states: dict[str, dict] = {}
    deadline = time.monotonic() + args.timeout
    last_new = time.monotonic()
    while time.monotonic() < deadline:
        try:
            msg = inbox.get(timeout=0.2)
        except queue.Empty:
            msg = None
        if msg is not None:
            try:
                payload = json.loads(msg.payload)
            except ValueError:
                continue
            device = payload.get("device")
            if payload.get("id") not in (deployment_id, None) or not device:
                continue
            old = states.get(device, {})
            if device not in states:
                last_new = time.monotonic()
            if old.get("state") in FINAL and payload.get("state") not in FINAL:
                continue  # a late progress message after the outcome (two routes: topic + response topic)
            states[device] = payload
            if payload.get("missing"):
                for i in payload["missing"]:
                    for topic in deploy_topics:
                        client.publish(chunk_topic(topic, deployment_id, i), chunk(data, args.chunk_size, i), qos=1)
            if (old.get("state"), old.get("received")) != (payload.get("state"), payload.get("received")):
                tqdm.write(_line(device, payload, prefix), file=sys.stderr)
        finished = all(states.get(d, {}).get("state") in FINAL for d in expected) and all(
            s.get("state") in FINAL for s in states.values())
        enough = len(states) >= len(expected) + (args.expect if groups else 0)
        settled = not groups or time.monotonic() - last_new > 2.0
        if finished and enough and settled:
            break
    else:
        pending = sorted((expected - set(states)) | {d for d, s in states.items() if s.get("state") not in FINAL})
        _summary(states, prefix)
        for device in pending:
            print(f"{_short(device, prefix)}: no outcome within {args.timeout:g} s "
                  f"(last state: {states.get(device, {}).get('state', 'no answer')})", file=sys.stderr)
        if groups and len(states) < args.expect:
            print(f"{len(states)} device(s) answered, --expect {args.expect}", file=sys.stderr)
        return EXIT_TIMEOUT
    _summary(states, prefix)
    return 0 if all(s.get("state") == "committed" for s in states.values()) else EXIT_FAILED


def _short(device: str, prefix: str) -> str:
    return device[len(prefix) + 1:] if device.startswith(prefix + "/") else device


def _line(device: str, payload: dict, prefix: str) -> str:
    state = payload.get("state")
    extra = ""
    if state == "receiving":
        extra = f" {payload.get('received')}/{payload.get('chunks')} chunks"
        if payload.get("missing"):
            extra += f", resending {len(payload['missing'])}"
    if payload.get("reason"):
        extra += f": {payload['reason']}"
    if payload.get("repeat"):
        extra += " (repeated deployment id: recorded outcome)"
    return f"{_short(device, prefix):<32} {state}{extra}"


def _summary(states: dict[str, dict], prefix: str) -> None:
    for device, payload in sorted(states.items()):
        print(_line(device, payload, prefix))


def password_from_args(args: Any) -> str | None:
    """The broker password of an operator command, from --password-file or --password-env (never argv)."""
    import os

    if args.password_file:
        try:
            return Path(args.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CliError(f"--password-file {args.password_file}: cannot read: {exc.strerror or exc}") from None
    if args.password_env:
        if args.password_env not in os.environ:
            raise CliError(f"--password-env: environment variable {args.password_env} is not set")
        return os.environ[args.password_env]
    return None
