"""The daemon survives the unit's hardening: the real `taxonedge run` inside the same kernel sandbox.

No systemd runs here, so the sandbox is applied by tests/security.py from the unit file's own lines
(SystemCallFilter=, SystemCallErrorNumber=, RestrictAddressFamilies=, MemoryDenyWriteExecute=,
NoNewPrivileges=, empty CapabilityBoundingSet=) with seccomp and prctl, the mechanisms systemd uses. The
daemon gets a notify socket as systemd would give it and must report READY=1 and WATCHDOG=1, publish labels
(its inference worker is a child process, sandboxed too) and stop cleanly on SIGTERM.
ProtectSystem=strict is emulated (when run as root) by a private mount namespace in which everything but
the state directory and a private tmp ($TMPDIR) is read-only. Not covered: User= (this venv's Python lives
under /root), ProtectHome=, the real PrivateTmp= and DevicePolicy=.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import write_frames_folder
from .daemonkit import Recorder, labels_of, write_config
from .security import sandboxed_command
from .test_systemd import UNIT
from .tinymodels import write_tiny_bundle

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None
    or ctypes.util.find_library("seccomp") is None
    or tuple(int(p) for p in platform.release().split(".")[:2] if p.isdigit()) < (6, 3),
    reason="needs systemd-analyze, libseccomp and Linux >= 6.3 (PR_SET_MDWE) to apply the unit's sandbox",
)


class NotifySocket:
    """The AF_UNIX datagram socket systemd passes as $NOTIFY_SOCKET; records every line it receives."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tx-notify-")  # short: socket paths are limited to 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.lines: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.lines.extend(data.decode().splitlines())

    def wait_for(self, line: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if line in self.lines:
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    n = NotifySocket()
    yield n
    n.close()


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def test_daemon_runs_notifies_and_stops_cleanly_inside_the_units_sandbox(
    tmp_path: Path, broker, notify
) -> None:
    bundle = write_tiny_bundle(tmp_path / "tiny.tebundle")
    frames = write_frames_folder(tmp_path, per_class=2)
    source = f'type = "folder"\npath = "{frames}"\nloop = true\npacing = "realtime"\nfps = 20'
    config = write_config(tmp_path / "config.toml", broker, bundle, source, tmp_path / "state")
    recorder = Recorder(broker.port)
    log_path = tmp_path / "daemon.log"
    state, private_tmp = tmp_path / "state", tmp_path / "private-tmp"
    state.mkdir()
    private_tmp.mkdir()
    writable = [state, private_tmp] if os.geteuid() == 0 else None  # a mount namespace needs root
    command = sandboxed_command(
        UNIT.read_text(),
        ["-m", "taxonedge", "run", "--config", str(config)],
        writable=writable,
        read_only_probe=tmp_path / "written-outside-state",
    )
    env = {
        **os.environ,
        "NOTIFY_SOCKET": notify.path,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TMPDIR": str(private_tmp),
    }
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        assert notify.wait_for("READY=1", 60), log_path.read_text()[-3000:]
        # The sandbox is really in force on the daemon's process (the launcher exec'ed into it).
        status = proc_status(daemon.pid)
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1", status
        assert status["CapEff"] == status["CapBnd"] == "0000000000000000", status
        log_text = log_path.read_text()
        probes = [
            "sched_setaffinity (@resources) refused",
            "AF_PACKET socket refused",
            "sethostname (@privileged) refused",
            "W+X memory refused",
        ]
        if writable:
            probes.append("writing outside the state directory refused (EROFS)")
        for probe in probes:
            assert probe in log_text, log_text[:2000]
        assert recorder.wait(lambda r: len(labels_of(r)) >= 10, 30), log_path.read_text()[-3000:]
        assert notify.wait_for("WATCHDOG=1", 30), notify.lines
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, log_path.read_text()[-3000:]
        assert "STOPPING=1" in notify.lines
        print(
            f"sandboxed daemon: {len(labels_of(recorder))} labels, notify lines: "
            f"{sorted({line.split('=')[0] for line in notify.lines})}"
        )
        # Nothing was refused while it worked (a refused call would show up as an EPERM error in the log).
        assert "Operation not permitted" not in log_path.read_text(), log_path.read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        recorder.close()


def test_ctypes_callbacks_work_under_memory_deny_write_execute() -> None:
    # LiteRT's load_delegate hands libedgetpu a ctypes callback (its error reporter). libffi must build
    # that closure without writable+executable memory, or MemoryDenyWriteExecute= would break the Edge TPU.
    code = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None)\n"
        "CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))\n"
        "values = (ctypes.c_int * 5)(5, 1, 4, 2, 3)\n"
        "libc.qsort(values, 5, ctypes.sizeof(ctypes.c_int), CMP(lambda a, b: a[0] - b[0]))\n"
        "print('sorted', list(values))\n"
    )
    proc = subprocess.run(
        sandboxed_command(UNIT.read_text(), ["-c", code]), capture_output=True, text=True, timeout=60
    )
    assert "W+X memory refused" in proc.stdout  # the sandbox is on ...
    assert proc.returncode == 0 and "sorted [1, 2, 3, 4, 5]" in proc.stdout, (
        proc.stdout + proc.stderr
    )  # ... and it works
