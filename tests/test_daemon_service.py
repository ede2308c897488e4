"""Service integration: systemd notify, broker refusals reported with a fix, the example config."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from taxonedge.edge.service.config import load_config

from .conftest import REPO, TINY_LABELS, Broker, free_port, write_image_tree
from .daemonkit import DaemonProcess, Recorder, labels_of, write_config
from .tinymodels import write_tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.tebundle")


@pytest.fixture
def live_source(tmp_path) -> str:
    tree = write_image_tree(tmp_path / "tree", TINY_LABELS[:1], per_class=3, seed=3)
    folder = next(p for p in tree.rglob("*.jpg")).parent
    return f'type = "folder"\npath = "{folder}"\nloop = true\npacing = "realtime"\nfps = 20'


def test_example_config_is_valid():
    config = load_config(REPO / "examples" / "config.toml")
    # every key at its default: site and line as written, the device id the host name
    assert config.topic_base == f"taxonedge/site/line/{config.device.id}" and config.device.id
    assert config.inference.backend == "auto"


def test_systemd_ready_watchdog_status_and_stopping(tmp_path, broker, bundle, live_source):
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.5)
    cfg = write_config(tmp_path / "c.toml", broker, bundle, live_source, tmp_path / "st")
    daemon = DaemonProcess(cfg, env={"NOTIFY_SOCKET": str(notify_path)})
    received: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and not any("WATCHDOG=1" in m for m in received):
            with contextlib.suppress(TimeoutError):
                received.append(sock.recv(4096).decode())
        assert daemon.terminate() == 0, daemon.log
        while True:
            try:
                received.append(sock.recv(4096).decode())
            except (TimeoutError, OSError):
                break
    finally:
        sock.close()
    text = "\n".join(received)
    assert received[0].startswith("READY=1")
    assert "WATCHDOG=1" in text and "STATUS=degraded on cpu" in text
    assert received[-1] == "STOPPING=1"


def test_the_source_vanishes_and_comes_back_and_status_says_so(tmp_path, broker, bundle):
    """A camera unplugged and plugged back, as a folder source that goes away and returns: the daemon keeps
    running, its status says the source is reconnecting and why, then labels flow again, seq unbroken."""
    tree = write_image_tree(tmp_path / "tree", TINY_LABELS[:1], per_class=3, seed=3)
    folder = next(p for p in tree.rglob("*.jpg")).parent
    source = f'type = "folder"\npath = "{folder}"\nloop = true\npacing = "realtime"\nfps = 20'
    cfg = write_config(tmp_path / "c.toml", broker, bundle, source, tmp_path / "st")
    rec = Recorder(broker.port)
    daemon = DaemonProcess(cfg)
    try:
        assert rec.wait(lambda r: len(labels_of(r)) >= 5, 30), daemon.log
        folder.rename(tmp_path / "away")
        assert rec.wait(
            lambda r: any(
                s.get("reasons") and any("source reconnecting" in x for x in s["reasons"])
                for s in r.on("status")
            ),
            15,
        ), daemon.log
        status = next(
            s for s in rec.on("status") if any("source reconnecting" in x for x in s.get("reasons", []))
        )
        assert status["state"] == "degraded" and any(str(folder) in x for x in status["reasons"])
        seen = len(labels_of(rec))
        (tmp_path / "away").rename(folder)
        assert rec.wait(lambda r: len(labels_of(r)) >= seen + 5, 30), daemon.log
        assert rec.wait(
            lambda r: not any("source" in x for x in r.on("status")[-1]["reasons"]), 10
        )  # cleared
        assert rec.wait(
            lambda r: any(s.get("source", {}).get("reconnects", 0) >= 1 for s in r.on("stats")), 15
        )
    finally:
        rec.close()
        assert daemon.terminate() == 0, daemon.log
    seqs = [lb["seq"] for lb in labels_of(rec)]
    assert seqs == list(range(1, len(seqs) + 1))


def test_no_broker_is_reported_and_retried_while_labels_wait(tmp_path, bundle, live_source):
    port = free_port()
    fake = Broker(port=port, workdir=tmp_path / "late")
    fake.workdir.mkdir()
    cfg = write_config(tmp_path / "c.toml", fake, bundle, live_source, tmp_path / "st")
    daemon = DaemonProcess(cfg)
    time.sleep(4)
    fake.start()
    try:
        rec = Recorder(port)
        assert rec.wait(lambda r: len(labels_of(r)) >= 3, 60), daemon.log
        rec.close()
        assert daemon.terminate() == 0
    finally:
        fake.stop()
    log = daemon.log
    assert f"nothing listens on 127.0.0.1:{port} (connection refused)" in log, log
    assert log.count("nothing listens") <= 2, log  # said once (again only after another error), not per retry
    assert "MQTT connected" in log


def test_wrong_password_is_reported_with_what_to_fix(tmp_path, bundle, live_source):
    # mosquitto reads the password file after dropping to user 'mosquitto': pytest's tmp dirs are 0700
    work = Path(tempfile.mkdtemp(prefix="taxonedge-secure-"))
    os.chmod(work, 0o755)
    passwd = work / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "sorter", "right-secret"], check=True)
    os.chmod(passwd, 0o644)
    port = free_port()
    secured = Broker(
        port=port,
        workdir=work,
        extra_config=f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n",
    )
    secured.start()
    try:
        cfg = write_config(
            tmp_path / "c.toml",
            secured,
            bundle,
            live_source,
            tmp_path / "st",
            'username = "sorter"\npassword_env = "TEST_MQTT_PASSWORD"\n',
        )
        daemon = DaemonProcess(cfg, env={"TEST_MQTT_PASSWORD": "wrong"})
        time.sleep(4)
        assert daemon.proc.poll() is None  # keeps running and retrying
        assert daemon.terminate() == 0
        # mosquitto 2.0 answers a wrong password with "Not authorized" under v5
        assert (
            "refused the connection: Not authorized: the broker refuses this client: check mqtt.username"
            in daemon.log
        )
        assert daemon.log.count("refused the connection") == 1  # one line, then quiet retries
        good = DaemonProcess(cfg, env={"TEST_MQTT_PASSWORD": "right-secret"})
        time.sleep(3)
        assert good.terminate() == 0
        assert "MQTT connected" in good.log and "refused" not in good.log
    finally:
        secured.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_edgetpu_is_reprobed_while_on_cpu(tmp_path, broker, live_source):
    bundle = write_tiny_bundle(tmp_path / "tpu.tebundle", edgetpu_model=True)  # re-probed: it could use one
    cfg = write_config(tmp_path / "c.toml", broker, bundle, live_source, tmp_path / "st")
    cfg.write_text(cfg.read_text().replace('backend = "auto"', 'backend = "auto"\nreprobe_interval_s = 1'))
    rec = Recorder(broker.port)
    daemon = DaemonProcess(cfg)
    try:
        assert rec.wait(lambda r: any(s.get("edgetpu_reprobes", 0) >= 2 for s in r.on("stats")), 30), (
            daemon.log
        )
        assert rec.on("stats")[-1]["backend"] == "cpu"
    finally:
        rec.close()
        assert daemon.terminate() == 0
    # no accelerator on a test machine: each re-probe looks at the kernel's devices, spawns no worker
    assert "accelerator re-probe: none present" in daemon.log
    assert "still unavailable" not in daemon.log
