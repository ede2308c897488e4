"""Faults a user could trigger from outside (issue 16), each against a real daemon subprocess on a real
mosquitto: no message stops the daemon, every accepted trigger ends in a label, every request gets an
answer and no answer lands on the device's own topics, status tells the truth after a crash."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import jsonschema
import paho.mqtt.client as paho
import pytest
from taxonedge.edge.service.config import load_config
from taxonedge.edge.service.daemon import Daemon, StartupError
from taxonedge.edge.service.slots import Slots

from .conftest import REPO, TINY_LABELS, run_cli, write_image_tree
from .daemonkit import BASE, REPLIES, DaemonProcess, Recorder, labels_of, write_config
from .tinymodels import write_tiny_bundle

LABEL_SCHEMA = json.loads((REPO / "edge" / "kernel" / "schemas" / "label.schema.json").read_text())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.tebundle")


@pytest.fixture
def frames(tmp_path) -> Path:
    tree = write_image_tree(tmp_path / "tree", TINY_LABELS[:1], per_class=4, seed=9)
    return next(p for p in tree.rglob("*.jpg")).parent


@pytest.fixture
def recorder(broker):
    rec = Recorder(broker.port)
    assert rec.wait(lambda r: r.client.is_connected(), 5)
    yield rec
    rec.close()


def item_config(tmp_path: Path, broker, bundle: Path, frames: Path, mqtt: str = "", **trigger) -> Path:
    source = f'type = "folder"\npath = "{frames}"\nloop = true\npacing = "realtime"\nfps = 60'
    keys = {"mode": '"item"', "frames_per_item": 2, "item_timeout_s": 2, **trigger}
    cfg = write_config(
        tmp_path / "c.toml",
        broker,
        bundle,
        source,
        tmp_path / "st",
        "\n[trigger]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()),
    )
    if mqtt:
        cfg.write_text(cfg.read_text().replace("will_delay_s = 0\n", mqtt + "\n"))
    return cfg


def publish(port: int, topic: str, payloads: list[bytes]) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    for payload in payloads:
        client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def started(rec: Recorder, daemon: DaemonProcess) -> None:
    assert rec.wait(lambda r: any(s.get("state") in ("online", "degraded") for s in r.on("status")), 60), (
        daemon.log
    )


def answers(rec: Recorder) -> dict[bytes, dict]:
    return {
        getattr(p, "CorrelationData", None): m
        for t, m, p in rec.messages
        if t == REPLIES or t.endswith("/response")
    }


def test_a_lone_surrogate_in_an_id_is_refused_and_the_daemon_keeps_labelling(
    tmp_path, broker, bundle, frames, recorder
):
    daemon = DaemonProcess(item_config(tmp_path, broker, bundle, frames))
    started(recorder, daemon)
    publish(broker.port, f"{BASE}/trigger", [b'{"item_id": "x\\ud800"}', b'{"item_id": true}', b"ok-1"])
    recorder.request("state", b'{"id": "x\\ud800"}', b"s")
    recorder.request("set_thresholds", b'{"\\ud800": 0.5}', b"t")
    assert recorder.wait(lambda r: {b"s", b"t"} <= set(answers(r)), 10), daemon.log
    assert recorder.wait(lambda r: [lb["item_id"] for lb in labels_of(r)] == ["ok-1"], 20), daemon.log
    got = answers(recorder)
    assert got[b"s"]["ok"] is False and "surrogate" in got[b"s"]["error"] and "id" not in got[b"s"]
    assert got[b"t"]["ok"] is False
    recorder.request("state", b"", b"s2")
    assert recorder.wait(lambda r: b"s2" in answers(r), 10)
    state = answers(recorder)[b"s2"]["result"]
    assert state["triggers"] == 1 and state["triggers_refused"] == 2
    assert daemon.proc.poll() is None
    assert daemon.terminate() == 0, daemon.log


def test_every_accepted_trigger_ends_in_one_label_overflow_and_shutdown_included(
    tmp_path, broker, bundle, frames, recorder
):
    daemon = DaemonProcess(
        item_config(tmp_path, broker, bundle, frames, max_waiting=20, item_timeout_s=30, frames_per_item=10)
    )
    started(recorder, daemon)
    ids = [f"item-{i}" for i in range(60)]
    publish(broker.port, f"{BASE}/trigger", [i.encode() for i in ids])
    assert recorder.wait(lambda r: any(lb.get("reason") == "overflow" for lb in labels_of(r)), 20), daemon.log
    assert daemon.terminate(60) == 0, daemon.log  # items still waiting at SIGTERM get `shutdown`
    assert recorder.wait(lambda r: len(labels_of(r)) >= len(ids), 10), daemon.log
    labels = labels_of(recorder)
    assert sorted(lb["item_id"] for lb in labels) == sorted(ids)  # each exactly once
    reasons = {lb.get("reason") for lb in labels}
    assert {"overflow", "shutdown"} <= reasons
    for label in labels:
        jsonschema.validate(label, LABEL_SCHEMA)
    stats = [s for s in recorder.on("stats") if s.get("final")][-1]
    assert stats["items_overflowed"] == sum(lb.get("reason") == "overflow" for lb in labels)
    assert stats["triggers"] == len(ids)


def test_commands_deep_nesting_unknown_keys_and_bad_thresholds_get_an_answer(
    tmp_path, broker, bundle, frames, recorder
):
    daemon = DaemonProcess(item_config(tmp_path, broker, bundle, frames))
    started(recorder, daemon)
    cases = {
        b"deep": ("state", b"[" * 1000 + b"]" * 1000, "nested too deeply"),
        b"deep2": ("state", b'{"a":' * 1000 + b"1" + b"}" * 1000, "nested too deeply"),
        b"d01": ("set_thresholds", b'{"depth_01": 0.99}', "depth_01"),
        b"extra": ("pause", b'{"now": true}', "unknown keys"),
        b"snap": ("snapshot", b'{"inline": true, "size": 3}', "unknown keys"),
    }
    for corr, (name, payload, _) in cases.items():
        recorder.request(name, payload, corr)
    assert recorder.wait(lambda r: set(cases) <= set(answers(r)), 10), daemon.log
    got = answers(recorder)
    for corr, (_, _, words) in cases.items():
        assert got[corr]["ok"] is False and words in got[corr]["error"], got[corr]
    assert "RecursionError" not in daemon.log and "Traceback" not in daemon.log
    assert daemon.terminate() == 0, daemon.log


def test_answers_never_go_to_the_devices_own_topics(tmp_path, broker, bundle, frames, recorder):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    daemon = DaemonProcess(item_config(tmp_path, broker, bundle, frames))
    started(recorder, daemon)
    for i, topic in enumerate(
        [f"{BASE}/labels", f"{BASE}/status", f"{BASE}/cmd/pause", "taxonedge/groups/g/deploy"]
    ):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = topic
        props.CorrelationData = f"own-{i}".encode()
        recorder.client.publish(f"{BASE}/cmd/state", b"{}", qos=1, properties=props).wait_for_publish(5)
    wanted = {f"own-{i}".encode() for i in range(4)}
    assert recorder.wait(lambda r: wanted <= set(answers(r)), 10), daemon.log
    for corr in wanted:
        answer = answers(recorder)[corr]
        assert answer["ok"] is False and "refused" in answer["error"] and "replies/" in answer["error"]
    assert [t for t, _, p in recorder.messages if t == f"{BASE}/cmd/state/response"]
    assert labels_of(recorder) == [] and all(s.get("state") != "paused" for s in recorder.on("status"))
    assert not any(
        isinstance(p, dict) and "ok" in p
        for t, p, _ in recorder.messages
        if t in (f"{BASE}/labels", f"{BASE}/status")
    )
    assert daemon.terminate() == 0, daemon.log


def retained_status(port: int) -> dict:
    rec = Recorder(port, (f"{BASE}/status",))
    try:
        assert rec.wait(lambda r: r.on("status"), 5)
        return rec.on("status")[-1]
    finally:
        rec.close()


def test_retained_status_ends_online_after_a_crash_and_a_quick_restart(tmp_path, broker, bundle, frames):
    cfg = item_config(tmp_path, broker, bundle, frames, mqtt="will_delay_s = 3")
    first = DaemonProcess(cfg)
    assert Recorder(broker.port).wait(lambda r: r.on("status"), 60), first.log
    time.sleep(1.0)
    first.kill()  # as a crash: no DISCONNECT, the broker starts the will delay now
    second = DaemonProcess(cfg)
    rec = Recorder(broker.port)
    try:
        # the first process's will (its boot, offline) comes after the second's online ...
        assert rec.wait(lambda r: any(s.get("reason") == "connection lost" for s in r.on("status")), 15), (
            second.log
        )
        # ... and the second one answers it
        assert rec.wait(lambda r: r.on("status")[-1].get("state") in ("online", "degraded"), 10), second.log
        boot = rec.on("status")[-1]["boot_id"]
        will = next(s for s in rec.on("status") if s.get("reason") == "connection lost")
        assert will["boot_id"] != boot
    finally:
        rec.close()
    time.sleep(2.0)
    status = retained_status(broker.port)
    assert status["state"] in ("online", "degraded") and status["boot_id"] == boot, status
    assert second.proc.poll() is None
    assert second.terminate() == 0, second.log


def test_a_forged_status_is_answered_and_logged_on_one_line(tmp_path, broker, bundle, frames):
    """A retained status of another boot whose fields hold line breaks (anyone who may publish there can put
    them there) is answered with ours and logged escaped, on one line: it cannot forge log lines."""
    forged = {"state": "offline", "boot_id": "x\n2026-01-01 00:00:00,000 ERROR forged line"}
    rec = Recorder(broker.port)
    rec.client.publish(f"{BASE}/status", json.dumps(forged), qos=1, retain=True).wait_for_publish(5)
    daemon = DaemonProcess(item_config(tmp_path, broker, bundle, frames))
    try:
        with daemon.explains_failures():
            assert rec.wait(
                lambda r: any(s.get("state") in ("online", "degraded") for s in r.on("status")), 60
            )
            assert retained_status(broker.port)["boot_id"] != forged["boot_id"]
            assert daemon.terminate() == 0
            assert "another boot ('x\\n2026-01-01 00:00:00,000 ERROR forged line', 'offline')" in daemon.log
            assert not any(line.startswith("2026-01-01") for line in daemon.log.splitlines())
    finally:  # a failed assertion must not leave the daemon running
        daemon.terminate()
        rec.close()


def test_item_mode_labels_say_source_ended_when_a_video_file_ends(tmp_path, broker, bundle, frames, recorder):
    import cv2

    video = tmp_path / "short.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 20, (64, 64))
    for path in sorted(frames.glob("*.jpg")) * 5:
        writer.write(cv2.imread(str(path)))
    writer.release()
    source = f'type = "video"\npath = "{video}"\nloop = false'
    cfg = write_config(
        tmp_path / "v.toml",
        broker,
        bundle,
        source,
        tmp_path / "st",
        '\n[trigger]\nmode = "item"\nframes_per_item = 2\n',
    )
    daemon = DaemonProcess(cfg)
    started(recorder, daemon)
    publish(broker.port, f"{BASE}/trigger", [b"late-1", b"late-2"])
    assert daemon.wait(30) == 0, daemon.log
    assert recorder.wait(lambda r: len(labels_of(r)) >= 2, 10), daemon.log
    labels = {lb["item_id"]: lb for lb in labels_of(recorder)}
    assert set(labels) == {"late-1", "late-2"}
    for label in labels.values():  # voted on frames if it got any, else says why not
        assert label["decision"] != "unknown" or label["reason"] in ("source_ended", "no_frames"), label
    assert any(lb.get("reason") == "source_ended" for lb in labels.values()) or all(
        lb["vote"]["frames"] > 0 for lb in labels.values()
    )


def test_a_corrupt_installed_model_falls_back_and_status_says_degraded(
    tmp_path, broker, bundle, frames, recorder
):
    slots = Slots(tmp_path / "st")
    slots.dir.mkdir(parents=True)
    slots.path("a").write_bytes(bundle.read_bytes()[:-100])  # cut short, as a failing SD card leaves it
    slots.save(slots.state().model_copy(update={"committed": "a"}))
    daemon = DaemonProcess(item_config(tmp_path, broker, bundle, frames))
    assert recorder.wait(lambda r: r.on("status"), 60), daemon.log
    status = recorder.on("status")[0]
    assert status["state"] == "degraded"
    assert any("installed model (slot a) does not verify" in reason for reason in status["reasons"]), status
    assert daemon.terminate() == 0, daemon.log


def test_the_sigterm_handler_takes_no_lock_the_main_thread_may_hold(tmp_path, broker, bundle, frames):
    """A signal handler runs in the main thread between two bytecodes, possibly while that thread holds the
    lock inside `stopping.wait()`. A handler that set an Event took that lock again and hung the daemon's
    shutdown for good (seen once in CI). The handler `run()` installs must take no lock, and the daemon must
    act on it all the same."""
    daemon = Daemon(load_config(item_config(tmp_path, broker, bundle, frames)))
    installed = {}

    def start() -> None:  # stands in for start-up: records the handler run() installed, then fails
        installed["term"] = signal.getsignal(signal.SIGTERM)
        raise StartupError("stop here")

    daemon.start = start
    with pytest.raises(StartupError):
        daemon.run()
    assert signal.getsignal(signal.SIGTERM) is not installed["term"]  # put back even when start-up fails
    with daemon.stopping._cond:  # as the main thread holds it inside Event.wait
        call = threading.Thread(target=installed["term"], args=(signal.SIGTERM, None))
        call.start()
        call.join(2)
        assert not call.is_alive(), "the SIGTERM handler waits for a lock the main thread holds"
    assert daemon.signalled == signal.SIGTERM


def test_a_missing_public_key_is_named_as_such(tmp_path, broker, bundle, frames):
    cfg = item_config(tmp_path, broker, bundle, frames)
    cfg.write_text(
        cfg.read_text().replace(
            "require_signature = false", f'require_signature = true\npublic_key = "{tmp_path}/signing.pub"'
        )
    )
    proc = run_cli("run", "--validate-config", str(cfg), check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr.count("\n") == 1 and "model.public_key" in proc.stderr and "does not exist" in proc.stderr
    )
    assert "model.bundle" not in proc.stderr


def test_item_mode_counts_idle_frames_apart_from_dropped_ones(tmp_path, broker, bundle, frames, recorder):
    daemon = DaemonProcess(item_config(tmp_path, broker, bundle, frames))
    started(recorder, daemon)
    assert recorder.wait(lambda r: any(s["frames_captured"] > 60 for s in r.on("stats")), 20), daemon.log
    stats = recorder.on("stats")[-1]
    assert stats["frames_idle"] > 50 and stats["frames_dropped"] <= 5, stats  # no item yet: nothing dropped
    assert daemon.terminate() == 0, daemon.log
