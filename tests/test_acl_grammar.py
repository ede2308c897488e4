"""The example broker ACL (systemd/mosquitto/taxonedge.acl) checked against the topic grammar in
edge/kernel/protocol.py: every topic a device publishes or subscribes to is allowed for it, nothing of another
device is, and the operator and consumer accounts get what docs/deploy-device.md says. (The ACL is also
exercised against a real mosquitto in tests/test_broker_security.py; this test catches a topic added to
the grammar and forgotten in the ACL.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from taxonedge.edge.kernel.protocol import (
    DEPLOY_REJECTED,
    DeviceTopics,
    deploy_chunk,
    deploy_chunks,
    group_deploy,
    replies_prefix,
)

from .conftest import REPO

ACL = REPO / "systemd" / "mosquitto" / "taxonedge.acl"
PREFIX = "taxonedge"
DEVICE = DeviceTopics(f"{PREFIX}/hamburg/line-3/sorter-07")
OTHER = DeviceTopics(f"{PREFIX}/hamburg/line-3/sorter-08")


@dataclass(frozen=True)
class Rule:
    user: str | None  # None: a `pattern` line (every user, %u substituted)
    access: str  # read, write or readwrite
    topic_filter: str


def read_acl(path: Path) -> list[Rule]:
    """mosquitto's acl_file: `user NAME` starts a block of `topic` lines; `pattern` lines apply to all."""
    rules, user = [], None
    for line in path.read_text().splitlines():
        words = [] if line.lstrip().startswith("#") else line.split()  # '#' inside a filter is a wildcard
        if not words:
            continue
        kind, rest = words[0], words[1:]
        if kind == "user":
            user = rest[0]
            continue
        access, topic_filter = (rest[0], rest[1]) if len(rest) == 2 else ("readwrite", rest[0])
        rules.append(Rule(None if kind == "pattern" else user, access, topic_filter))
    return rules


def allowed(rules: list[Rule], username: str, access: str, topic: str) -> bool:
    for rule in rules:
        if rule.user not in (None, username) or access not in rule.access:
            continue
        topic_filter = rule.topic_filter.replace("%u", username) if rule.user is None else rule.topic_filter
        if paho.topic_matches_sub(topic_filter, topic):
            return True
    return False


def test_a_device_may_use_every_topic_of_its_own_and_no_other_devices():
    rules, me = read_acl(ACL), "sorter-07"
    writes = [
        DEVICE.labels,
        DEVICE.status,
        DEVICE.stats,
        DEVICE.model,
        DEVICE.deploy_progress("dep-1"),
        DEVICE.deploy_progress(DEPLOY_REJECTED),
        DEVICE.response("state"),
        DEVICE.deploy,
        deploy_chunk(DEVICE.deploy, "dep-1", 0),  # clearing its own retained request
        f"{replies_prefix(PREFIX)}operator/1",
    ]
    reads = [
        DEVICE.command("state"),
        DEVICE.trigger,
        DEVICE.status,
        DEVICE.deploy,
        deploy_chunk(DEVICE.deploy, "dep-1", 3),
        group_deploy(PREFIX, "line-a"),
        deploy_chunk(group_deploy(PREFIX, "line-a"), "dep-2", 0),
    ]
    missing = [f"write {t}" for t in writes if not allowed(rules, me, "write", t)]
    missing += [f"read {t}" for t in reads if not allowed(rules, me, "read", t)]
    assert not missing, "the ACL example denies the device topics it uses:\n" + "\n".join(missing)
    for topic in (OTHER.labels, OTHER.command("pause"), OTHER.trigger, OTHER.deploy):
        assert not allowed(rules, me, "write", topic) and not allowed(rules, me, "read", topic), topic
    assert not allowed(rules, me, "write", group_deploy(PREFIX, "line-a"))  # only operators deploy


def test_the_filters_a_device_subscribes_to_are_readable():
    rules, me = read_acl(ACL), "sorter-07"
    for topic_filter in (
        DEVICE.commands,
        deploy_chunks(DEVICE.deploy),
        deploy_chunks(group_deploy(PREFIX, "g")),
    ):
        concrete = topic_filter.replace("+", "x")
        assert allowed(rules, me, "read", concrete), topic_filter


def test_operator_and_consumer_accounts():
    rules = read_acl(ACL)
    for topic in (DEVICE.command("pause"), DEVICE.deploy, group_deploy(PREFIX, "g"), DEVICE.labels):
        assert allowed(rules, "taxonedge-operator", "write", topic) or topic == DEVICE.labels
        assert allowed(rules, "taxonedge-operator", "read", topic)
    assert allowed(rules, "taxonedge-sorter", "read", OTHER.labels)
    assert allowed(rules, "taxonedge-sorter", "read", f"{replies_prefix(PREFIX)}taxonedge-sorter/1")
    assert not allowed(rules, "taxonedge-sorter", "write", DEVICE.command("pause"))
    assert not allowed(rules, "taxonedge-sorter", "read", DEVICE.command("pause"))
