"""The daemon end to end: `python -m taxonedge run` as a real subprocess, real mosquitto, real tiny models."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import jsonschema
import pytest

from .conftest import TINY_LABELS, write_frames_folder
from .daemonkit import BASE, DaemonProcess, Recorder, labels_of, write_config
from .tinymodels import write_tiny_bundle

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[1] / "edge" / "kernel" / "schemas" / "label.schema.json").read_text()
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.tebundle")


@pytest.fixture
def images(tmp_path) -> Path:
    """A flat folder of 12 JPEGs (3 per class) in class order."""
    return write_frames_folder(tmp_path, per_class=3, seed=5)


@pytest.fixture
def recorder(broker):
    rec = Recorder(broker.port)
    assert rec.wait(lambda r: r.client.is_connected(), 5)
    time.sleep(0.2)
    yield rec
    rec.close()


def test_labels_follow_the_schema_and_status_says_degraded_without_edgetpu(
    tmp_path, broker, bundle, images, recorder
):
    (images / "006b.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")  # a corrupt JPEG among good ones
    cfg = write_config(
        tmp_path / "c.toml", broker, bundle, f'type = "folder"\npath = "{images}"', tmp_path / "st"
    )
    daemon = DaemonProcess(cfg)
    assert daemon.wait(60) == 0, daemon.log
    assert recorder.wait(lambda r: len(labels_of(r)) >= 12, 5)
    labels = labels_of(recorder)
    assert len(labels) == 12
    for label in labels:
        jsonschema.validate(label, SCHEMA)
    assert [lb["seq"] for lb in labels] == list(range(1, 13))
    assert len({lb["msg_id"] for lb in labels}) == 12
    assert {lb["backend"] for lb in labels} == {"cpu"}
    # the tiny model learned the classes: most labels name the class the image was drawn for
    expected = [TINY_LABELS[i // 3] for i in range(12)]
    assert sum(lb["label"] == want for lb, want in zip(labels, expected, strict=True)) >= 10
    assert "006b.jpg" in daemon.log
    statuses = recorder.on("status")
    assert statuses[0]["state"] == "degraded"
    assert "libedgetpu" in statuses[0]["reasons"][0]
    assert statuses[-1]["state"] == "offline" and statuses[-1]["reason"] == "stopped"
    model = recorder.on("model")[0]
    assert model["name"] == "tiny" and len(model["sha256"]) == 64


@pytest.mark.parametrize("how", ["terminate", "kill"])
def test_broker_restart_mid_stream_loses_nothing_and_keeps_order(
    tmp_path, broker, bundle, images, recorder, how
):
    source = f'type = "folder"\npath = "{images}"\nloop = true\npacing = "realtime"\nfps = 40'
    cfg = write_config(tmp_path / "c.toml", broker, bundle, source, tmp_path / "st")
    cfg.write_text(cfg.read_text().replace("warmup_runs = 1", "warmup_runs = 1\nmax_in_flight = 2"))
    daemon = DaemonProcess(cfg)
    assert recorder.wait(lambda r: len(labels_of(r)) >= 20, 30), daemon.log
    if how == "terminate":
        broker.stop()  # SIGTERM: mosquitto sends its clients a DISCONNECT
    else:
        broker.kill()  # SIGKILL: none, the connection just drops
    time.sleep(2.0)  # labels keep being produced into the outbox meanwhile
    broker.start()
    assert recorder.wait(lambda r: r.client.is_connected(), 10)
    time.sleep(3.0)
    assert daemon.terminate() == 0, daemon.log
    labels = labels_of(recorder)
    first_seen = {}
    for label in labels:
        first_seen.setdefault(label["seq"], label)
    seqs = list(first_seen)
    assert seqs == sorted(seqs), "labels arrived out of order"
    assert seqs == list(range(1, max(seqs) + 1)), f"missing seqs: {set(range(1, max(seqs) + 1)) - set(seqs)}"
    assert max(seqs) >= 100  # ~40 fps for > 5 s, including the outage
    assert "disconnected" in daemon.log


def test_sigkill_then_restart_delivers_the_outbox(tmp_path, broker, bundle, images):
    broker.stop()
    state = tmp_path / "st"
    source = f'type = "folder"\npath = "{images}"\nloop = true\npacing = "realtime"\nfps = 40'
    cfg = write_config(tmp_path / "c.toml", broker, bundle, source, state)
    daemon = DaemonProcess(cfg)
    db = state / "outbox.sqlite"
    deadline = time.monotonic() + 30
    held: list[str] = []
    while time.monotonic() < deadline and len(held) < 20:
        time.sleep(0.3)
        if db.exists():
            try:
                with sqlite3.connect(db) as con:
                    held = [
                        json.loads(p)["msg_id"]
                        for (p,) in con.execute("SELECT payload FROM outbox ORDER BY id")
                    ]
            except sqlite3.OperationalError:  # the daemon is still creating the table
                continue
    assert len(held) >= 20, daemon.log
    daemon.kill()
    with sqlite3.connect(db) as con:
        held = [json.loads(p)["msg_id"] for (p,) in con.execute("SELECT payload FROM outbox ORDER BY id")]
    broker.start()
    rec = Recorder(broker.port)
    assert rec.wait(lambda r: r.client.is_connected(), 5)
    time.sleep(0.2)
    restarted = DaemonProcess(cfg)
    try:
        assert rec.wait(lambda r: {lb["msg_id"] for lb in labels_of(r)} >= set(held), 30), restarted.log
        replayed = [lb["msg_id"] for lb in labels_of(rec) if lb["msg_id"] in set(held)]
        assert replayed[: len(held)] == held  # replayed first, in the original order
    finally:
        assert restarted.terminate() == 0
        rec.close()


def test_config_typo_names_key_and_line(tmp_path, broker, bundle, images):
    cfg = write_config(
        tmp_path / "c.toml", broker, bundle, f'type = "folder"\npath = "{images}"', tmp_path / "st"
    )
    text = cfg.read_text().replace("will_delay_s = 0", "will_delay = 0")
    cfg.write_text(text)
    line = text.splitlines().index("will_delay = 0") + 1
    from .conftest import run_cli

    proc = run_cli("run", "--validate-config", "--config", str(cfg), check=False)
    assert proc.returncode == 2
    assert f"c.toml:{line}: mqtt.will_delay: unknown key" in proc.stderr
    cfg.write_text(text.replace("will_delay = 0", "will_delay_s = 0"))
    ok = run_cli("run", "--validate-config", "--config", str(cfg), check=False)
    assert ok.returncode == 0 and "valid" in ok.stdout


def test_validate_config_takes_the_file_itself(tmp_path, broker, bundle, images):
    """`run --validate-config FILE`, the issue's spelling, is the same check as with --config FILE."""
    cfg = write_config(
        tmp_path / "c.toml", broker, bundle, f'type = "folder"\npath = "{images}"', tmp_path / "st"
    )
    from .conftest import run_cli

    ok = run_cli("run", "--validate-config", str(cfg), check=False)
    assert ok.returncode == 0 and f"{cfg}: valid" in ok.stdout
    cfg.write_text(cfg.read_text().replace("will_delay_s = 0", "will_delay = 0"))
    bad = run_cli("run", "--validate-config", str(cfg), check=False)
    assert bad.returncode == 2 and "mqtt.will_delay: unknown key" in bad.stderr
    both = run_cli(
        "run", "--config", str(tmp_path / "other.toml"), "--validate-config", str(cfg), check=False
    )
    assert both.returncode == 2 and "give one" in both.stderr
    missing = run_cli("run", check=False)
    assert missing.returncode == 2 and "--config FILE is required" in missing.stderr


def test_validate_config_checks_the_files_it_names(tmp_path, broker, images):
    cfg = write_config(
        tmp_path / "c.toml",
        broker,
        tmp_path / "missing.tebundle",
        f'type = "folder"\npath = "{images}"',
        tmp_path / "st",
    )
    from .conftest import run_cli

    proc = run_cli("run", "--validate-config", "--config", str(cfg), check=False)
    assert proc.returncode == 2
    assert "model.bundle" in proc.stderr and "missing.tebundle" in proc.stderr


def test_strict_edgetpu_backend_fails_clearly(tmp_path, broker, bundle, images):
    cfg = write_config(
        tmp_path / "c.toml", broker, bundle, f'type = "folder"\npath = "{images}"', tmp_path / "st"
    )
    cfg.write_text(cfg.read_text().replace('backend = "auto"', 'backend = "edgetpu"'))
    daemon = DaemonProcess(cfg)
    assert daemon.wait(60) == 3
    assert "libedgetpu.so.1" in daemon.log and 'backend = "auto"' in daemon.log


def test_worker_abort_restarts_the_worker_not_the_daemon(tmp_path, broker, bundle, images, recorder):
    # unpaced and unthrottled: two frames are at the worker when it dies
    source = f'type = "folder"\npath = "{images}"\nloop = true\npacing = "fast"'
    cfg = write_config(
        tmp_path / "c.toml", broker, bundle, source, tmp_path / "st", "\n[trigger]\nmax_rate_hz = 10000\n"
    )
    cfg.write_text(cfg.read_text().replace("warmup_runs = 1", "warmup_runs = 1\nmax_in_flight = 2"))
    # test-only hook: the worker calls os.abort() on its 5th invoke, as libedgetpu does on a USB error
    daemon = DaemonProcess(cfg, env={"TAXONEDGE_TEST_WORKER_ABORT_AT": "5"})
    assert recorder.wait(lambda r: len(labels_of(r)) >= 12, 40), daemon.log
    assert daemon.proc.poll() is None
    assert daemon.terminate() == 0
    assert "inference worker died" in daemon.log and "restarted on cpu" in daemon.log
    seqs = [lb["seq"] for lb in labels_of(recorder)]
    assert seqs == list(range(1, len(seqs) + 1))


def test_hung_invoke_is_detected_and_worker_restarted(tmp_path, broker, bundle, images, recorder):
    source = f'type = "folder"\npath = "{images}"\nloop = true\npacing = "realtime"\nfps = 40'
    cfg = write_config(tmp_path / "c.toml", broker, bundle, source, tmp_path / "st")
    cfg.write_text(cfg.read_text().replace("warmup_runs = 1", "warmup_runs = 1\ninvoke_timeout_s = 0.5"))
    daemon = DaemonProcess(cfg, env={"TAXONEDGE_TEST_WORKER_HANG_AT": "4"})
    assert recorder.wait(lambda r: len(labels_of(r)) >= 7, 40), daemon.log
    assert daemon.terminate() == 0
    assert "hung" in daemon.log and "restarted" in daemon.log


def test_sigterm_publishes_offline_and_exits_zero(tmp_path, broker, bundle, images, recorder):
    source = f'type = "folder"\npath = "{images}"\nloop = true\npacing = "realtime"\nfps = 20'
    cfg = write_config(tmp_path / "c.toml", broker, bundle, source, tmp_path / "st")
    daemon = DaemonProcess(cfg)
    assert recorder.wait(lambda r: len(labels_of(r)) >= 3 and r.on("stats"), 30), daemon.log
    assert not any(s["final"] for s in recorder.on("stats"))
    assert daemon.terminate() == 0
    stats = recorder.on("stats")[-1]
    for key in (
        "fps",
        "latency_ms_p50",
        "latency_ms_p99",
        "backend",
        "outbox_depth",
        "last_frame_time",
        "last_inference_time",
    ):
        assert key in stats
    # the final stats close the run's figures, and arrive before offline
    order = [(t.rsplit("/", 1)[1], p) for t, p, _ in recorder.messages if t.endswith(("/stats", "/status"))]
    assert [name for name, _ in order[-2:]] == ["stats", "status"]
    assert stats["final"] is True and stats["labels"] == len(labels_of(recorder))
    # capture to decision, then capture to handed to the broker: later, and measured on every live label
    assert 0 < stats["latency_ms_p50"] < stats["publish_latency_ms_p50"] < 1000
    assert stats["publish_latency_ms_p99"] >= stats["publish_latency_ms_p50"]
    status = recorder.on("status")[-1]
    assert status["state"] == "offline"
    # the retained status a newcomer sees is offline too
    late = Recorder(broker.port, topics=(f"{BASE}/status",))
    try:
        assert late.wait(lambda r: r.on("status"), 5)
        assert late.on("status")[-1]["state"] == "offline"
    finally:
        late.close()


def test_max_frames_stops_after_n(tmp_path, broker, bundle, images, recorder):
    source = f'type = "folder"\npath = "{images}"\nloop = true\npacing = "realtime"\nfps = 40'
    cfg = write_config(tmp_path / "c.toml", broker, bundle, source, tmp_path / "st")
    daemon = DaemonProcess(cfg, "--max-frames", "5")
    assert daemon.wait(60) == 0, daemon.log
    assert recorder.wait(lambda r: len(labels_of(r)) >= 5, 5)
    time.sleep(0.3)
    assert [lb["seq"] for lb in labels_of(recorder)] == [1, 2, 3, 4, 5]


def test_sigterm_finishes_the_item_in_flight(tmp_path, broker, bundle, images, recorder):
    source = f'type = "folder"\npath = "{images}"\nloop = true\npacing = "realtime"\nfps = 20'
    extra = '\n[trigger]\nmode = "item"\nframes_per_item = 20\nitem_timeout_s = 10\n'
    cfg = write_config(tmp_path / "c.toml", broker, bundle, source, tmp_path / "st", extra)
    daemon = DaemonProcess(cfg)
    assert recorder.wait(lambda r: r.on("status"), 30), daemon.log
    recorder.client.publish(f"{BASE}/trigger", b'{"item_id": "last-box"}', qos=1).wait_for_publish(5)
    time.sleep(0.3)  # the vote has started: 20 frames at 20 fps take about a second
    assert daemon.terminate() == 0, daemon.log
    assert recorder.wait(lambda r: labels_of(r), 5)
    (label,) = labels_of(recorder)
    assert label["item_id"] == "last-box" and label["vote"]["frames"] == 20
    assert recorder.on("status")[-1]["state"] == "offline"
