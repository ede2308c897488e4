"""`taxonedge deploy`: push a model bundle to devices over MQTT and follow each device to its outcome.

A target is the topic path under the prefix: `SITE/LINE/DEVICE` for one device, `groups/NAME` for every
device that lists NAME in `mqtt.groups` (one publish reaches the whole fleet). The command publishes the
request and the chunks (QoS 1, retained: a device that is off gets them when it connects, and it clears its
own once handled), answers devices that ask for missing chunks, shows each device's state live, and exits 0
only when every device committed and serves the bundle. `--no-wait` returns once published; `--pending`
lists what is retained and each device's outcome; `--cancel` withdraws a retained request.
Topics and payloads: docs/deploy.md.
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

from ..kernel.bundle import BundleError, read_bundle, utc_now
from ..kernel.protocol import FINAL_STATES as FINAL
from ..kernel.protocol import DeviceTopics, deploy_chunk, group_deploy, replies_prefix

DEFAULT_CHUNK = 256 * 1024
# 0: every device committed and serves the bundle (or --no-wait / --pending / --cancel did their part);
# 2 (CliError's default): bad arguments or a bundle not worth sending, nothing was sent.
EXIT_FAILED, EXIT_TIMEOUT = 1, 3


def make_request(
    data: bytes, deployment_id: str, chunk_size: int = DEFAULT_CHUNK, url: str | None = None
) -> dict:
    request: dict[str, Any] = {
        "id": deployment_id,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    if url is not None:
        request["url"] = url
    else:
        request.update(chunk_size=chunk_size, chunks=math.ceil(len(data) / chunk_size))
    return request


def deploy_topic(prefix: str, target: str) -> str:
    """The deployment topic of a target: SITE/LINE/DEVICE or groups/NAME."""
    if target.startswith("groups/"):
        return group_deploy(prefix, target.split("/", 1)[1])
    return DeviceTopics(f"{prefix}/{target}").deploy


def chunk(data: bytes, chunk_size: int, index: int) -> bytes:
    return data[index * chunk_size : (index + 1) * chunk_size]


def parse_target(target: str) -> str:
    parts = target.strip("/").split("/")
    shape_ok = (len(parts) == 2 and parts[0] == "groups") or len(parts) == 3
    if shape_ok and all(p and not set(p) & set("+#") for p in parts):
        return "/".join(parts)
    raise CliError(f"--target {target!r}: expected SITE/LINE/DEVICE or groups/NAME")


class Session:
    """One MQTT v5 connection of an operator command: its reply topic, an inbox, subscriptions that are
    redone after a reconnect, and `sync()` to collect the retained messages of new subscriptions."""

    def __init__(self, args: Any):
        import paho.mqtt.client as mqtt

        host, port = args.broker
        self.client_id = f"taxonedge-deploy-{uuid.uuid4().hex[:8]}"
        self.reply_topic = f"{replies_prefix(args.prefix)}{self.client_id}"
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        if args.username:
            self.client.username_pw_set(args.username, password_from_args(args))
        if args.ca_file:
            self.client.tls_set(ca_certs=args.ca_file)
        self.inbox: queue.Queue = queue.Queue()
        self.filters = [self.reply_topic]
        connected: queue.Queue = queue.Queue()

        def on_connect(c, userdata, flags, reason_code, properties):
            if reason_code.is_failure:
                connected.put(str(reason_code))
                return
            for topic in self.filters:
                c.subscribe(topic, qos=1)
            connected.put(None)

        self.client.on_connect = on_connect
        self.client.on_message = lambda c, u, msg: self.inbox.put(msg)
        try:
            self.client.connect(host, port)
        except OSError as exc:
            raise CliError(f"cannot connect to the broker {host}:{port}: {exc}", EXIT_FAILED) from None
        self.client.loop_start()
        try:
            error = connected.get(timeout=10)
        except queue.Empty:
            error = "no answer within 10 s"
        if error:
            self.close()
            raise CliError(f"the broker {host}:{port} refused the connection: {error}", EXIT_FAILED)

    def subscribe(self, topics: list[str]) -> None:
        self.filters += topics
        for topic in topics:
            self.client.subscribe(topic, qos=1)

    def sync(self, timeout: float = 5.0) -> list[Any]:
        """The messages that arrived until a marker sent now comes back: retained messages of the
        subscriptions made before it (the broker sends them before anything published later)."""
        marker = uuid.uuid4().hex.encode()
        self.client.publish(self.reply_topic, marker, qos=1)
        messages, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg.topic == self.reply_topic and msg.payload == marker:
                break
            messages.append(msg)
        return messages

    def publish(self, topic: str, payload: bytes | str, retain: bool = False, properties: Any = None) -> Any:
        return self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def deploy_command(args: Any) -> int:
    """`taxonedge deploy`. (Over 80 lines: check the arguments and bundle, connect, publish the request
    and chunks retained, follow the devices: the order of one command.)"""
    if args.pending:
        return pending_command(args)
    if args.cancel:
        return cancel_command(args)
    if not args.bundle:
        raise CliError("give the BUNDLE to deploy (or --pending / --cancel)")
    if not args.target:
        raise CliError("give at least one --target SITE/LINE/DEVICE or groups/NAME")
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
        from ..kernel.signing import SigningKeyError, load_public_key

        try:
            public_key = load_public_key(args.pubkey)
        except SigningKeyError as exc:
            raise CliError(str(exc)) from None
    try:
        bundle = read_bundle(data, public_key=public_key, max_bytes=max(len(data), 1))
    except BundleError as exc:
        raise CliError(f"not deploying: {exc}") from None
    if bundle.signature is None:
        print(
            "warning: the bundle is unsigned; devices with model.require_signature (the default) reject it",
            file=sys.stderr,
        )
    # The default id is the bundle's hash: a device that has this bundle committed and serving answers with
    # that outcome (repeat); pass --id to try again after a rejection.
    deployment_id = args.id or f"{bundle.name}-{bundle.version}-{bundle.sha256[:12]}".replace("/", "-")
    request = make_request(data, deployment_id, args.chunk_size, args.url)
    request.update(nonce=uuid.uuid4().hex, issued=utc_now())
    chunks = request.get("chunks", 0)

    session = Session(args)
    try:
        deploy_topics = [deploy_topic(args.prefix, t) for t in targets]
        # What is pending there now: a newer request replaces it, and its chunks go (they would be sent to
        # every device that connects, for ever)
        session.subscribe(deploy_topics)
        previous = _requests(session.sync(), deploy_topics)
        for topic in deploy_topics:
            session.client.unsubscribe(topic)
            session.filters.remove(topic)
        session.subscribe(
            [
                DeviceTopics(f"{args.prefix}/{'+/+/+' if t.startswith('groups/') else t}").deploy_progress(
                    deployment_id
                )
                for t in targets
            ]
        )
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = session.reply_topic
        props.CorrelationData = deployment_id.encode()
        for topic in deploy_topics:
            old = previous.get(topic)
            keep = chunks if old and old.get("id") == deployment_id else 0
            if old:
                _clear_chunks(session, topic, old, keep)
            # Retained: a device that is off (or reconnecting) gets the request and the chunks when it
            # connects
            session.publish(topic, json.dumps(request), retain=True, properties=props).wait_for_publish(10)
        if chunks:
            with tqdm(total=len(data), unit="B", unit_scale=True, desc="upload", file=sys.stderr) as bar:
                for i in range(chunks):
                    piece = chunk(data, args.chunk_size, i)
                    infos = [
                        session.publish(deploy_chunk(t, deployment_id, i), piece, retain=True)
                        for t in deploy_topics
                    ]
                    for info in infos:
                        info.wait_for_publish(30)
                    bar.update(len(piece))
        if args.no_wait:
            print(
                f"{deployment_id}: pending on {_count(targets)} (retained: each device runs it when it "
                f"connects; `taxonedge deploy --pending` shows outcomes, `--cancel` withdraws it)"
            )
            return 0
        return _follow(session, targets, request, data, bundle.sha256, args, deploy_topics)
    finally:
        session.close()


def _count(targets: list[str]) -> str:
    devices = sum(not t.startswith("groups/") for t in targets)
    groups = [t for t in targets if t.startswith("groups/")]
    words = [f"{devices} device{'s' * (devices != 1)}"] if devices else []
    if groups:
        words.append(f"the devices of {', '.join(groups)}")
    return " and ".join(words)


def _requests(messages: list[Any], topics: list[str]) -> dict[str, dict]:
    """Retained deploy requests by topic, from `messages` (anything unreadable is left out)."""
    found = {}
    for msg in messages:
        if msg.topic in topics and msg.payload:
            payload = _json(msg.payload)
            if isinstance(payload, dict) and isinstance(payload.get("id"), str):
                found[msg.topic] = payload
    return found


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return None


def _clear_chunks(session: Session, topic: str, request: dict, keep: int = 0) -> None:
    """Remove the retained chunks of `request` on `topic` from index `keep` on."""
    count = request.get("chunks")
    if isinstance(count, int) and 0 < count <= 100_000:
        for i in range(keep, count):
            session.publish(deploy_chunk(topic, request["id"], i), b"", retain=True)


def _follow(
    session: Session,
    targets: list[str],
    request: dict,
    data: bytes,
    sha256: str,
    args: Any,
    deploy_topics: list[str],
) -> int:
    """Show each device's progress until all are final (or --timeout); resend chunks devices ask for."""
    from tqdm import tqdm

    prefix, deployment_id, nonce = args.prefix, request["id"], request["nonce"]
    expected = {f"{prefix}/{t}" for t in targets if not t.startswith("groups/")}
    groups = [t for t in targets if t.startswith("groups/")]
    states: dict[str, dict] = {}
    deadline = time.monotonic() + args.timeout
    last_new = time.monotonic()
    while time.monotonic() < deadline:
        try:
            msg = session.inbox.get(timeout=0.2)
        except queue.Empty:
            msg = None
        payload = _json(msg.payload) if msg is not None else None
        if isinstance(payload, dict) and _answers(payload, deployment_id, nonce):
            device = payload["device"]
            old = states.get(device, {})
            if device not in states:
                last_new = time.monotonic()
            if old.get("state") in FINAL and payload.get("state") not in FINAL:
                continue  # a late progress message after the outcome (two routes: topic + response topic)
            states[device] = payload
            if isinstance(payload.get("missing"), list):
                for i in payload["missing"]:
                    if isinstance(i, int) and 0 <= i < request.get("chunks", 0):
                        for topic in deploy_topics:
                            session.publish(
                                deploy_chunk(topic, deployment_id, i),
                                chunk(data, args.chunk_size, i),
                                retain=True,
                            )
            if (old.get("state"), old.get("received")) != (payload.get("state"), payload.get("received")):
                tqdm.write(_line(device, payload, prefix), file=sys.stderr)
        finished = all(states.get(d, {}).get("state") in FINAL for d in expected) and all(
            s.get("state") in FINAL for s in states.values()
        )
        enough = len(states) >= len(expected) + (args.expect if groups else 0)
        settled = not groups or time.monotonic() - last_new > 2.0
        if finished and enough and settled:
            break
    else:
        pending = sorted(
            (expected - set(states)) | {d for d, s in states.items() if s.get("state") not in FINAL}
        )
        _summary(states, prefix, sha256)
        for device in pending:
            print(
                f"{_short(device, prefix)}: no outcome within {args.timeout:g} s "
                f"(last state: {states.get(device, {}).get('state', 'no answer')}); the request stays "
                "retained and runs when the device connects (`taxonedge deploy --pending` shows it, "
                "`--cancel` withdraws it)",
                file=sys.stderr,
            )
        if groups and len(states) < args.expect:
            print(f"{len(states)} device(s) answered, --expect {args.expect}", file=sys.stderr)
        return EXIT_TIMEOUT
    _summary(states, prefix, sha256)
    return 0 if all(_serves(s, sha256) for s in states.values()) else EXIT_FAILED


def _answers(payload: dict, deployment_id: str, nonce: str) -> bool:
    """A device's progress on this request: its id, and its nonce when the device sends one (an outcome
    retained from an earlier run of the same id has another)."""
    return (
        payload.get("id") == deployment_id
        and isinstance(payload.get("device"), str)
        and payload.get("nonce", nonce) == nonce
    )


def _serves(payload: dict, sha256: str) -> bool:
    """Committed, and the model the device names is this bundle (a repeated id may not be)."""
    model = payload.get("model")
    return payload.get("state") == "committed" and isinstance(model, dict) and model.get("sha256") == sha256


def pending_command(args: Any) -> int:
    """`deploy --pending`: the retained requests (per device and per group) and each device's outcome."""
    prefix = args.prefix
    targets = [parse_target(t) for t in args.target or []]
    every_device = DeviceTopics(f"{prefix}/+/+/+")
    topics = [deploy_topic(prefix, t) for t in targets] or [every_device.deploy, group_deploy(prefix, "+")]
    session = Session(args)
    try:
        session.subscribe([*topics, every_device.deploy_progress("+")])
        messages = session.sync()
    finally:
        session.close()
    import paho.mqtt.client as mqtt

    requests = {
        m.topic: _json(m.payload)
        for m in messages
        if m.payload and any(mqtt.topic_matches_sub(t, m.topic) for t in topics)
    }
    outcomes = [
        p
        for m in messages
        if not any(mqtt.topic_matches_sub(t, m.topic) for t in topics)
        and isinstance(p := _json(m.payload), dict)
    ]
    shown = 0
    for topic, request in sorted(requests.items()):
        if not isinstance(request, dict) or not isinstance(request.get("id"), str):
            continue
        shown += 1
        target = topic[len(prefix) + 1 :].removesuffix("/model/deploy").removesuffix("/deploy")
        print(f"{target}: {request['id']} pending (issued {request.get('issued', '?')})")
        answers = [p for p in outcomes if _answers(p, request["id"], request.get("nonce") or "")]
        if not target.startswith("groups/") and not answers:
            print(f"  {target:<32} no answer yet (off, or not connected since)")
        for payload in sorted(answers, key=lambda p: p["device"]):
            print("  " + _line(payload["device"], payload, prefix))
    if not shown:
        print("no pending deployments" + (f" for {', '.join(targets)}" if targets else ""))
    return 0


def cancel_command(args: Any) -> int:
    """`deploy --cancel`: withdraw the retained request (and its chunks) of each --target."""
    if not args.target:
        raise CliError("--cancel needs --target SITE/LINE/DEVICE or groups/NAME (the deploy to withdraw)")
    targets = [parse_target(t) for t in args.target]
    topics = [deploy_topic(args.prefix, t) for t in targets]
    session = Session(args)
    code = 0
    try:
        session.subscribe(topics)
        found = _requests(session.sync(), topics)
        for target, topic in zip(targets, topics, strict=True):
            request = found.get(topic)
            if request is None:
                print(f"{target}: nothing pending")
            elif args.id and request["id"] != args.id:
                print(f"{target}: the pending deployment is {request['id']}, not --id {args.id}: left alone")
                code = EXIT_FAILED
            else:
                _clear_chunks(session, topic, request)
                session.publish(topic, b"", retain=True).wait_for_publish(10)
                print(f"{target}: withdrew {request['id']} (a device that has started it still finishes it)")
    finally:
        session.close()
    return code


def _short(device: str, prefix: str) -> str:
    return device[len(prefix) + 1 :] if device.startswith(prefix + "/") else device


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
        extra += " (repeat: this device handled this deployment id before; its recorded outcome)"
    return f"{_short(device, prefix):<32} {state}{extra}"


def _summary(states: dict[str, dict], prefix: str, sha256: str) -> None:
    for device, payload in sorted(states.items()):
        line = _line(device, payload, prefix)
        if payload.get("state") == "committed" and not _serves(payload, sha256):
            model = payload.get("model") if isinstance(payload.get("model"), dict) else {}
            line += (
                f"; but it serves {model.get('name', '?')} {model.get('version', '?')} "
                f"({str(model.get('sha256', '?'))[:12]}), not this bundle: deploy with a new --id"
            )
        print(line)


def sign_command(args: Any) -> int:
    """`taxonedge sign`: a verified copy of a bundle, signed with the operator's key."""
    from ..kernel.bundle import resign_bundle
    from ..kernel.signing import SigningKeyError, key_id, load_private_key, load_public_key

    try:
        key = load_private_key(args.key)
        public_key = load_public_key(args.pubkey) if args.pubkey else None
    except SigningKeyError as exc:
        raise CliError(str(exc)) from None
    version = args.model_version
    if version is not None and (not version.strip() or len(version) > 64 or not version.isprintable()):
        raise CliError(f"--version {version!r}: give a version such as 1.3.2")
    if Path(args.out).resolve() == Path(args.bundle).resolve():
        raise CliError(f"--out {args.out} is the bundle itself: write the signed copy elsewhere")
    try:
        bundle = resign_bundle(args.bundle, args.out, key, public_key=public_key, version=args.model_version)
    except BundleError as exc:
        raise CliError(f"not signing: {exc}") from None
    except OSError as exc:
        raise CliError(f"--out {args.out}: cannot write: {exc.strerror or exc}") from None
    print(
        f"{args.out}: {bundle.name} {bundle.version}, signed by key {key_id(key.public_key())}, "
        f"sha256 {bundle.sha256[:12]}; devices need its public key as model.public_key"
    )
    return 0


def password_from_args(args: Any) -> str | None:
    """The broker password of an operator command, from --password-file or --password-env (never argv)."""
    import os

    if args.password_file:
        try:
            return Path(args.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CliError(
                f"--password-file {args.password_file}: cannot read: {exc.strerror or exc}"
            ) from None
    if args.password_env:
        if args.password_env not in os.environ:
            raise CliError(f"--password-env: environment variable {args.password_env} is not set")
        return os.environ[args.password_env]
    return None
