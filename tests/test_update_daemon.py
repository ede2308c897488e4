"""Model updates end to end: the real daemon (`taxonedge run` subprocess), `taxonedge deploy`, real mosquitto.

Includes the power-loss proof: the daemon is SIGKILLed at every step of a deployment and must come back
running a valid model (the old one before the commit, the new one after), never a partial file.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from taxonedge.edge.kernel.bundle import read_bundle
from taxonedge.edge.service.config import load_config
from taxonedge.edge.service.slots import SLOTS, Slots, read_verified
from taxonedge.edge.service.update import FINAL, PAUSE_ENV

from .conftest import write_frames_folder
from .daemonkit import DaemonProcess, Watcher, validate_device_messages
from .update_host import Observer, signed_bundles, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def setup(tmp_path, broker):
    made = signed_bundles()
    frames = write_frames_folder(tmp_path, per_class=3, seed=5)
    old = tmp_path / "old.tebundle"
    old.write_bytes(made["old"])
    for name in ("new", "unsigned", "all_unknown"):
        (tmp_path / f"{name}.tebundle").write_bytes(made[name])
    config = write_config(tmp_path, broker.port, made["public_key"], old, groups=("line-a",), frames=frames)
    observer = Observer(broker.port)
    yield tmp_path, config, observer, made
    observer.close()


def _start(config, observer, expect_sha: str, env: dict | None = None) -> DaemonProcess:
    observer.model = None
    daemon = DaemonProcess(config, env=env)
    try:
        observer.wait_for(lambda: observer.model is not None, 60)
    except AssertionError:
        daemon.kill()
        raise AssertionError(f"the daemon did not publish its model:\n{daemon.log[-3000:]}") from None
    assert observer.model["sha256"] == expect_sha, daemon.log[-3000:]
    # serving (the deploy topics were subscribed before the model message)
    labels = len(observer.labels)
    observer.wait_for(lambda: len(observer.labels) > labels + 5)
    return daemon


def _deploy(broker, bundle, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """`taxonedge deploy BUNDLE ARGS`; BUNDLE None for --pending / --cancel."""
    bundle_arg = [] if bundle is None else [str(bundle)]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "taxonedge",
            "deploy",
            *bundle_arg,
            "--broker",
            f"127.0.0.1:{broker.port}",
            "--timeout",
            "60",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_deploy_command_updates_the_real_daemon_while_labels_flow(setup, broker):
    tmp_path, config, observer, made = setup
    old_sha, new_sha = read_bundle(made["old"]).sha256, read_bundle(made["new"]).sha256
    watcher = Watcher(broker.port)
    daemon = _start(config, observer, old_sha)
    try:
        observer.wait_for(lambda: len(observer.labels) > 10)
        start = time.monotonic()
        done = _deploy(broker, tmp_path / "new.tebundle", "--target", "s1/l1/dev1", "--chunk-size", "8192")
        end = time.monotonic()
        assert done.returncode == 0, done.stdout + done.stderr
        assert "s1/l1/dev1" in done.stdout and "committed" in done.stdout
        for state in ("verifying", "self_test", "switched", "committed"):
            assert state in done.stderr  # the live display showed each step
        observer.wait_for(lambda: observer.labels[-1][1]["model"]["sha256"] == new_sha)
        assert observer.model["sha256"] == new_sha
        gap = observer.longest_label_gap(start, end)
        n = sum(start <= t <= end for t, _ in observer.labels)
        print(
            f"\nreal daemon at 25 frames/s: longest gap between labels during the deployment "
            f"{gap * 1000:.0f} ms ({n} labels in {end - start:.2f} s)"
        )
        assert gap < 1.0
        # the same bundle again through the group topic: same default id, so the recorded outcome, no switch
        again = _deploy(broker, tmp_path / "new.tebundle", "--target", "groups/line-a")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "repeat: this device handled this deployment id before" in again.stdout
        # a model failing its health window is rolled back by the daemon; the command exits 1 with the reason
        bad = _deploy(broker, tmp_path / "all_unknown.tebundle", "--target", "s1/l1/dev1")
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert "rolled_back" in bad.stdout and "unknown rate rose" in bad.stdout
        observer.wait_for(lambda: observer.labels[-1][1]["model"]["sha256"] == new_sha)
        assert observer.model["sha256"] == new_sha
        # unsigned: rejected by the device, reason shown
        unsigned = _deploy(broker, tmp_path / "unsigned.tebundle", "--target", "s1/l1/dev1", "--id", "u1")
        assert unsigned.returncode == 1 and "unsigned" in unsigned.stdout
        # nobody answers: exit 3 naming the device
        lost = _deploy(
            broker, tmp_path / "new.tebundle", "--target", "s1/l1/nobody", "--id", "x", "--timeout", "2"
        )
        assert lost.returncode == 3 and "s1/l1/nobody: no outcome" in lost.stderr
    finally:
        assert daemon.terminate() == 0, daemon.log[-3000:]
        watcher.close()
    # every message the device sent (progress with the CLI's nonce included) fits its generated schema
    progress = [m for m in watcher.snapshot() if "/model/deploy/" in m[0] and "/chunk/" not in m[0]]
    assert any(b'"nonce"' in payload for _, payload, _ in progress)
    validate_device_messages(watcher.snapshot(), "taxonedge/s1/l1/dev1")


STEPS = ["receiving", "received", "verifying", "staged", "warming", "self_test", "switched", "committed"]


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_every_step_recovers_to_a_valid_model(setup, broker, step):
    tmp_path, config_path, observer, made = setup
    # a long chunk timeout: the partial transfer must still be on disk when the kill lands
    config_path = write_config(
        tmp_path,
        broker.port,
        made["public_key"],
        tmp_path / "old.tebundle",
        frames=tmp_path / "frames",
        chunk_timeout_s=30,
    )
    config = load_config(config_path)
    old_sha, new_sha = read_bundle(made["old"]).sha256, read_bundle(made["new"]).sha256
    pause = {} if step in ("receiving", "committed") else {PAUSE_ENV: f"{step}:60"}
    daemon = _start(config_path, observer, old_sha, env=pause)
    try:
        dep = f"kill-{step}"
        # for "receiving", half the chunks never come: the kill lands mid-transfer with a partial file on disk
        skip = set(range(0, 40, 2)) if step == "receiving" else set()
        observer.send(made["new"], dep, chunk_size=2048, skip=skip)
        observer.wait_for(lambda: step in observer.states(dep), 60)
        if step == "receiving":
            assert list((Slots(config.device.state_dir).dir / "incoming").glob("*.part"))
    finally:
        daemon.kill()
    expect = new_sha if step == "committed" else old_sha
    daemon = _start(config_path, observer, expect)  # restarts on a valid model
    try:
        with daemon.explains_failures():
            labels = len(observer.labels)
            observer.wait_for(lambda: len(observer.labels) > labels + 3)
            assert observer.labels[-1][1]["model"]["sha256"] == expect
            slots = Slots(config.device.state_dir)
            assert not list(slots.dir.glob(".*.tmp-*")) and not list((slots.dir / "incoming").iterdir())
            for slot in SLOTS:  # whatever is in a slot is a whole, verifiable bundle
                if slots.path(slot).exists():
                    read_verified(slots.path(slot), config.model)
            if step == "switched":  # the unfinished trial was rolled back and reported
                result = observer.outcome(dep)
                assert (
                    result["state"] == "rolled_back"
                    and "before the new model was committed" in result["reason"]
                )
            if step != "committed":  # and the device takes a deployment again
                observer.send(made["new"], f"{dep}-again", chunk_size=8192)
                again = observer.outcome(f"{dep}-again", 60)
                assert again["state"] == "committed", again["reason"]
                assert observer.model["sha256"] == new_sha
    finally:
        assert daemon.terminate() == 0, daemon.log[-3000:]


def test_a_device_seen_online_takes_a_deployment_at_once(setup, broker):
    """The deploy topics are subscribed before the device says it is online: a request (not retained) sent
    the moment its model message arrives is taken, however long the update plugin's start-up takes (held
    3 s here; attached after the connection, it lost such a request)."""
    tmp_path, config, observer, made = setup
    observer.model = None
    daemon = DaemonProcess(config, env={PAUSE_ENV: "attaching:3"})
    try:
        with daemon.explains_failures():
            observer.wait_for(lambda: observer.model is not None, 60)
            observer.send(made["new"], "at-once", chunk_size=8192)
            result = observer.outcome("at-once", 60)
            assert result["state"] == "committed", result.get("reason")
            assert observer.model["sha256"] == read_bundle(made["new"]).sha256
    finally:
        assert daemon.terminate() == 0, daemon.log[-3000:]


def _deploy_async(broker, bundle, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "taxonedge",
            "deploy",
            str(bundle),
            "--broker",
            f"127.0.0.1:{broker.port}",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_redeploying_an_earlier_release_with_the_cli(setup, broker):
    """B, then A, then B again with the default ids: the device serves B at the end and the CLI says so."""
    tmp_path, config, observer, made = setup
    old_sha, new_sha = read_bundle(made["old"]).sha256, read_bundle(made["new"]).sha256
    daemon = _start(config, observer, old_sha)
    try:
        for path, sha in [("new", new_sha), ("old", old_sha), ("new", new_sha)]:
            done = _deploy(broker, tmp_path / f"{path}.tebundle", "--target", "s1/l1/dev1")
            assert done.returncode == 0, done.stdout + done.stderr
            assert "repeat" not in done.stdout, done.stdout
            observer.wait_for(lambda s=sha: observer.model["sha256"] == s)
        again = _deploy(broker, tmp_path / "new.tebundle", "--target", "s1/l1/dev1")  # serves B: a repeat
        assert again.returncode == 0 and "repeat" in again.stdout, again.stdout + again.stderr
    finally:
        assert daemon.terminate() == 0, daemon.log[-3000:]


def test_deployment_killed_while_verifying_is_reported_after_restart(setup, broker):
    tmp_path, config, observer, made = setup
    old_sha = read_bundle(made["old"]).sha256
    daemon = _start(config, observer, old_sha, env={PAUSE_ENV: "verifying:60"})
    cli = _deploy_async(
        broker, tmp_path / "new.tebundle", "--target", "s1/l1/dev1", "--id", "cut", "--timeout", "120"
    )
    try:
        observer.wait_for(lambda: "verifying" in observer.states("cut"), 60)
        daemon.kill()
        daemon = _start(config, observer, old_sha)
        out, err = cli.communicate(timeout=30)  # promptly, not after --timeout
    finally:
        cli.kill()
        assert daemon.terminate() == 0, daemon.log[-3000:]
    assert cli.returncode == 1, out + err
    assert "rejected: interrupted: the daemon stopped while the deployment was at 'verifying'" in out, out
    assert observer.outcome("cut")["state"] == "rejected"
    assert observer.model["sha256"] == old_sha


def test_deployment_to_an_offline_device_runs_when_it_connects(setup, broker):
    tmp_path, config, observer, made = setup
    new_sha = read_bundle(made["new"]).sha256
    target = ["--target", "s1/l1/dev1"]
    sent = _deploy(broker, tmp_path / "new.tebundle", *target, "--no-wait", "--chunk-size", "8192")
    assert sent.returncode == 0 and "pending on 1 device" in sent.stdout, sent.stdout + sent.stderr
    listed = _deploy(broker, None, "--pending")
    assert listed.returncode == 0, listed.stderr
    assert "s1/l1/dev1: " in listed.stdout and " pending (issued " in listed.stdout, listed.stdout
    assert "no answer yet" in listed.stdout
    # a second device that never comes: its pending deployment is withdrawn
    parked = _deploy(broker, tmp_path / "new.tebundle", "--target", "s1/l1/dev9", "--no-wait")
    assert parked.returncode == 0, parked.stderr
    cancel = _deploy(broker, None, "--cancel", "--target", "s1/l1/dev9")
    assert cancel.returncode == 0 and "withdrew" in cancel.stdout, cancel.stdout + cancel.stderr
    daemon = _start(config, observer, read_bundle(made["old"]).sha256)  # comes online: takes the deployment
    try:
        observer.wait_for(
            lambda: [p for ps in observer.progress.values() for p in ps if p["state"] in FINAL], 60
        )
        assert [p["state"] for ps in observer.progress.values() for p in ps if p["state"] in FINAL] == [
            "committed"
        ]
        assert observer.model["sha256"] == new_sha
        # the device cleared its own retained request: nothing pending any more, anywhere
        for _ in range(20):
            listed = _deploy(broker, None, "--pending")
            if "no pending deployments" in listed.stdout:
                break
            time.sleep(0.5)
        assert "no pending deployments" in listed.stdout, listed.stdout
    finally:
        assert daemon.terminate() == 0, daemon.log[-3000:]
    # restarted: nothing is replayed, the model stays
    daemon = _start(config, observer, new_sha)
    assert daemon.terminate() == 0, daemon.log[-3000:]
