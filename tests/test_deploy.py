"""`taxonedge deploy` as a user runs it: clear errors before anything is sent, a fleet group by URL."""

from __future__ import annotations

import pytest
from taxonedge.edge.kernel.signing import generate_keypair
from taxonedge.edge.service import update
from taxonedge.edge.service.config import load_config
from taxonedge.edge.service.slots import read_verified

from .conftest import free_port, run_cli
from .update_host import SeamHost, signed_bundles, write_config


@pytest.fixture
def bundle_file(tmp_path):
    path = tmp_path / "new.tebundle"
    path.write_bytes(signed_bundles()["new"])
    return path


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["--target", "s1/l1"], 2, "expected SITE/LINE/DEVICE or groups/NAME"),
        (["--target", "s1/+/dev1"], 2, "expected SITE/LINE/DEVICE or groups/NAME"),
        (["--target", "s1/l1/dev1", "--broker", "127.0.0.1:PORT"], 1, "cannot connect to the broker"),
    ],
)
def test_bad_arguments_fail_clearly(bundle_file, args, code, words):
    args = [a.replace("PORT", str(free_port())) for a in args]
    if "--broker" not in args:
        args += ["--broker", "127.0.0.1:1"]
    proc = run_cli("deploy", str(bundle_file), *args, check=False, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert words in proc.stderr


def test_damaged_or_foreign_bundle_is_not_sent(tmp_path, bundle_file):
    damaged = tmp_path / "damaged.tebundle"
    data = bytearray(bundle_file.read_bytes())
    data[-2000] ^= 0x01
    damaged.write_bytes(bytes(data))
    proc = run_cli("deploy", str(damaged), "--broker", "127.0.0.1:1", "--target", "a/b/c", check=False)
    assert proc.returncode == 2 and "not deploying" in proc.stderr
    generate_keypair(tmp_path / "x.key", tmp_path / "x.pub")
    proc = run_cli(
        "deploy",
        str(bundle_file),
        "--broker",
        "127.0.0.1:1",
        "--target",
        "a/b/c",
        "--pubkey",
        str(tmp_path / "x.pub"),
        check=False,
    )
    assert proc.returncode == 2 and "does not verify" in proc.stderr
    proc = run_cli(
        "deploy",
        str(tmp_path / "missing.tebundle"),
        "--broker",
        "127.0.0.1:1",
        "--target",
        "a/b/c",
        check=False,
    )
    assert proc.returncode == 2 and "cannot read" in proc.stderr


@pytest.mark.slow
def test_group_deployment_by_url(tmp_path, broker, bundle_file):
    made = signed_bundles()
    old = tmp_path / "old.tebundle"
    old.write_bytes(made["old"])
    config = load_config(write_config(tmp_path, broker.port, made["public_key"], old, groups=("line-a",)))
    host = SeamHost(config, read_verified(old, config.model))
    update.attach(host)
    try:
        proc = run_cli(
            "deploy",
            str(bundle_file),
            "--broker",
            f"127.0.0.1:{broker.port}",
            "--target",
            "groups/line-a",
            "--url",
            bundle_file.as_uri(),
            "--pubkey",
            str(made["public_key"]),
            "--timeout",
            "60",
            check=False,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "s1/l1/dev1" in proc.stdout and "committed" in proc.stdout
        assert host.active_bundle.sha256 == read_verified(bundle_file, config.model).sha256
    finally:
        update.detach(host)
        host.close()
