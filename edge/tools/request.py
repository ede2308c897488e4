"""One command to one device over MQTT v5 and its one answer: what `taxonedge empty-belt`, `enroll` and
`enrolled` share. The request carries our reply topic and a correlation id (docs/mqtt.md, "Commands")."""

from __future__ import annotations

import json
import queue
import time
import uuid
from typing import Any

from taxonedge.cli import CliError

from ..kernel.protocol import DeviceTopics
from .deploy import Session


def device_target(target: str) -> str:
    """SITE/LINE/DEVICE, or a CliError: these commands go to one device (one camera, one belt)."""
    parts = target.strip("/").split("/")
    if len(parts) == 3 and all(p and not set(p) & set("+#") for p in parts) and parts[0] != "groups":
        return "/".join(parts)
    raise CliError(f"--target {target!r}: expected SITE/LINE/DEVICE (one camera: one belt)")


def send_command(args: Any, target: str, name: str, payload: dict, wait_s: float) -> dict | None:
    """Publish command `name` to `target` and return the device's answer, or None after `wait_s`."""
    session = Session(args)
    try:
        return _request(session, DeviceTopics(f"{args.prefix}/{target}").command(name), payload, wait_s)
    finally:
        session.close()


def _request(session: Session, topic: str, payload: dict, wait_s: float) -> dict | None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    correlation = uuid.uuid4().hex.encode()
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = session.reply_topic
    props.CorrelationData = correlation
    session.publish(topic, json.dumps(payload), properties=props).wait_for_publish(10)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            msg = session.inbox.get(timeout=0.2)
        except queue.Empty:
            continue
        ours = getattr(msg.properties, "CorrelationData", None) == correlation
        if msg.topic == session.reply_topic and ours:
            try:
                answer = json.loads(msg.payload)
            except ValueError:
                continue
            if isinstance(answer, dict):
                return answer
    return None
