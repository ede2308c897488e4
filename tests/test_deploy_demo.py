"""The demo's deployment walk-through as a user runs it (`bash examples/demo.sh deploy`): a fresh key, the
shipped Grocery bundle re-signed with it (`taxonedge sign`), a real daemon on a real mosquitto starting on
it, and release 1.3.2 of the same model deployed with `taxonedge deploy` until it serves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
GROCERY = ROOT / "examples/models/grocery"

pytestmark = pytest.mark.slow


def test_sign_rechecks_and_resigns_the_demo_bundle(tmp_path):
    run_cli("keygen", "--out", str(tmp_path / "op"))
    out = tmp_path / "mine.tebundle"
    done = run_cli(
        "sign",
        str(GROCERY / "grocery.tebundle"),
        "--key",
        str(tmp_path / "op.key"),
        "--pubkey",
        str(GROCERY / "taxonedge-demo.pub"),
        "--version",
        "1.3.2",
        "--out",
        str(out),
    )
    assert "1.3.2, signed by key" in done.stdout
    shown = run_cli("inspect", str(out), "--pubkey", str(tmp_path / "op.pub"))
    assert "signature  valid" in shown.stdout and "1.3.2" in shown.stdout
    # the old key no longer verifies it; a wrong --pubkey, a damaged bundle, a bad key: one line, exit 2
    other = run_cli("inspect", str(out), "--pubkey", str(GROCERY / "taxonedge-demo.pub"), check=False)
    assert other.returncode != 0
    damaged = tmp_path / "damaged.tebundle"
    damaged.write_bytes(out.read_bytes()[:-5000])
    for args, words in [
        (["--pubkey", str(tmp_path / "op.pub"), str(GROCERY / "grocery.tebundle")], "does not verify"),
        ([str(damaged)], "not signing: "),
        ([str(out), "--version", ""], "--version '': give a version such as 1.3.2"),
    ]:
        proc = run_cli(
            "sign",
            *args,
            "--key",
            str(tmp_path / "op.key"),
            "--out",
            str(tmp_path / "x.tebundle"),
            check=False,
        )
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = run_cli(
        "sign", str(out), "--key", str(tmp_path / "op.pub"), "--out", str(tmp_path / "y"), check=False
    )
    assert proc.returncode == 2 and "not a readable unencrypted PEM private key" in proc.stderr


def test_demo_deploy_walkthrough_end_to_end():
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("mosquitto is not installed")
    venv = Path(sys.executable).parent.parent  # this checkout is installed there (editable)
    proc = subprocess.run(
        ["bash", str(ROOT / "examples/demo.sh"), "deploy"],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "VENV": str(venv)},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "demo-dc/belt-1/demo-cam          committed" in proc.stdout, out[-4000:]
    assert "grocery-lite0 op-1" in proc.stdout  # the labels after the deployment name the new release
