"""Bundle bytes fuzzing: whatever a damaged or hostile bundle holds, the one reader refuses it with a
BundleError (or SigningKeyError) of one line, never another exception; and a real daemon sent such bytes as
a deployment answers `rejected` and keeps labelling."""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from taxonedge.edge.kernel.bundle import (
    CHECKSUMS,
    MANIFEST,
    SIGNATURE,
    BundleError,
    _tar_bytes,
    _untar,
    read_bundle,
)
from taxonedge.edge.kernel.signing import SigningKeyError
from taxonedge.edge.service.config import ModelConfig
from taxonedge.edge.service.slots import read_verified

from .conftest import write_frames_folder
from .daemonkit import DaemonProcess
from .update_host import Observer, signed_bundles, write_config

# FUZZ_EXAMPLES=5000 for a longer hunt; CI runs the default
SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)


def _made() -> dict:
    return signed_bundles()  # made once per process; not a fixture, so hypothesis never prints the bytes


def _members(data: bytes) -> dict[str, bytes]:
    return dict(_untar(data, "bundle", len(data)))


def _with_sums(members: dict[str, bytes]) -> bytes:
    """Re-tar `members` with a SHA256SUMS that matches them: damage that gets past the framing checks."""
    members = {k: v for k, v in members.items() if k != CHECKSUMS}
    sums = "".join(
        f"{hashlib.sha256(members[n]).hexdigest()}  {n}\n" for n in (MANIFEST, SIGNATURE) if n in members
    )
    return _tar_bytes({**members, CHECKSUMS: sums.encode()})


def _refused_in_one_line(data: bytes, public_key) -> None:
    """Both readers either accept `data` or raise BundleError / SigningKeyError with one line."""
    model = ModelConfig(public_key=public_key, require_signature=public_key is not None)
    for read in (
        lambda: read_bundle(data),
        lambda: read_bundle(data, public_key=None, max_bytes=len(data) + 1),
        lambda: read_verified(data, model),
    ):
        try:
            read()
        except (BundleError, SigningKeyError) as exc:
            message = str(exc)
            assert message and "\n" not in message and len(message) < 2000, message
            message.encode("utf-8")  # publishable as a deployment's reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=10**9))
def test_truncated_bundle(cut):
    data = _made()["new"]
    _refused_in_one_line(data[: cut % len(data)], _made()["public_key"])


@SETTINGS
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 7)), min_size=1, max_size=8))
def test_bit_flips(flips):
    data = bytearray(_made()["new"])
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    _refused_in_one_line(bytes(data), _made()["public_key"])


@SETTINGS
@given(
    action=st.sampled_from(["drop", "replace", "add", "rename", "reorder"]),
    which=st.integers(0, 10),
    content=st.binary(max_size=300),
    name=st.text(min_size=1, max_size=30),
)
def test_tar_members_changed(action, which, content, name):
    members = _members(_made()["new"])
    names = list(members)
    target = names[which % len(names)]
    if action == "drop":
        del members[target]
    elif action == "replace":
        members[target] = content
    elif action == "add":
        members[name.replace("/", "_").lstrip(".") or "x"] = content
    elif action == "rename":
        members[name.replace("/", "_").lstrip(".") or "x"] = members.pop(target)
    else:
        members = dict(reversed(list(members.items())))
    try:
        data = _tar_bytes(members)
    except (ValueError, UnicodeError):  # a name tar cannot hold: nothing to read
        return
    _refused_in_one_line(data, _made()["public_key"])
    if action != "reorder":  # and again with checksums that match: the manifest and file checks must hold
        _refused_in_one_line(_with_sums(members), _made()["public_key"])


@SETTINGS
@given(
    path=st.lists(
        st.sampled_from(
            [
                "model",
                "taxonomy",
                "input",
                "output",
                "files",
                "thresholds",
                "nodes",
                "name",
                "version",
                "format_version",
                "leaf_order",
                "num_classes",
                "model.tflite",
                "sha256",
                "size",
                "children",
                "0",
                "height",
                "dtype",
            ]
        ),
        min_size=1,
        max_size=4,
    ),
    value=json_values,
    delete=st.booleans(),
)
def test_manifest_fields_wrong(path, value, delete):
    members = _members(_made()["new"])
    manifest = json.loads(members[MANIFEST])
    node = manifest
    for key in path[:-1]:
        child = (
            node.get(key)
            if isinstance(node, dict)
            else (
                node[int(key)] if key.isdigit() and isinstance(node, list) and int(key) < len(node) else None
            )
        )
        if not isinstance(child, (dict, list)):
            break
        node = child
    last = path[-1]
    if isinstance(node, dict):
        if delete:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and node:
        node[0] = value
    members[MANIFEST] = json.dumps(manifest).encode()
    _refused_in_one_line(
        _with_sums(members), _made()["public_key"]
    )  # signed manifest changed: signature fails
    members.pop(SIGNATURE, None)
    _refused_in_one_line(_with_sums(members), None)  # unsigned: the manifest itself must be checked


@SETTINGS
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.just(b"[" * 100_000),
        st.just(b"\xff\xfe{}"),
        st.just(b'{"a": "\\ud800"}'),
        st.just(b"1" * 5000),
    )
)
def test_manifest_bytes_garbage(raw):
    members = _members(_made()["new"])
    members[MANIFEST] = raw
    members.pop(SIGNATURE, None)
    _refused_in_one_line(_with_sums(members), None)


@SETTINGS
@given(data=st.binary(max_size=3000))
def test_random_bytes(data):
    _refused_in_one_line(data, _made()["public_key"])


@pytest.mark.slow
def test_real_daemon_rejects_garbage_bundles_and_keeps_labelling(tmp_path, broker):
    """Damaged bundles sent as deployments (size and sha256 announced right, so the bytes reach the reader):
    each is answered `rejected` with one line, labels keep flowing from the old model, the daemon lives."""
    made = _made()
    good = made["new"]
    rng = random.Random(16)
    members = _members(good)
    members[MANIFEST] = b"\x80" + members[MANIFEST]
    flipped = bytearray(good)
    for _ in range(5):
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    garbage = {
        "random": rng.randbytes(5000),
        "truncated": good[: len(good) // 2],
        "flipped": bytes(flipped),
        "manifest-not-utf8": _with_sums({k: v for k, v in members.items() if k != SIGNATURE}),
        "zeros": bytes(10240),
    }
    old = tmp_path / "old.tebundle"
    old.write_bytes(made["old"])
    config = write_config(
        tmp_path, broker.port, made["public_key"], old, frames=write_frames_folder(tmp_path)
    )
    observer = Observer(broker.port)
    daemon = DaemonProcess(config)
    try:
        observer.wait_for(lambda: len(observer.labels) > 5, 60)
        old_sha = observer.labels[-1][1]["model"]["sha256"]
        for name, data in garbage.items():
            observer.send(data, f"garbage-{name}", chunk_size=2048)
            result = observer.outcome(f"garbage-{name}", 30)
            assert result["state"] == "rejected", result
            assert result["reason"].startswith("bundle: ") and "\n" not in result["reason"], result["reason"]
            count = len(observer.labels)
            observer.wait_for(lambda c=count: len(observer.labels) > c + 3)  # still labelling ...
            assert observer.labels[-1][1]["model"]["sha256"] == old_sha  # ... with the old model
        assert daemon.proc.poll() is None
    finally:
        observer.close()
        assert daemon.terminate() == 0, daemon.log[-3000:]
    assert "Traceback" not in daemon.log, daemon.log[-3000:]
