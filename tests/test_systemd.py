"""The systemd unit, the Coral udev rule and the install script, checked with the real tools.

`systemd-analyze verify` and `systemd-analyze security --offline=true` read the unit file itself (no running
systemd is needed for either); `udevadm test` parses the udev rule inside a private mount namespace; the
install script runs against a temporary root and its result is inspected file by file.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from taxonedge.edge.service.config import HealthConfig, load_config

from .conftest import REPO, run_cli

SYSTEMD = REPO / "systemd"
UNIT = SYSTEMD / "taxonedge.service"
RULES = SYSTEMD / "99-coral-edgetpu.rules"
INSTALL = SYSTEMD / "install.sh"
EXPOSURE_LIMIT = 2.5  # systemd-analyze calls <= 2.5 "OK" (and lower "SAFE")

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing (apt-get install systemd)"
)
needs_sysusers = pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemctl") is None,
    reason="systemd-sysusers/systemctl are missing (apt-get install systemd)",
)


def unit_directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; repeated keys stay separate as in systemd."""
    out, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(text: str, key: str) -> list[str]:
    return [v for _, k, v in unit_directives(text) if k == key]


def runnable_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at an executable that exists here (verify checks that it does)."""
    exe = tmp_path / "bin" / "taxonedge"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    text = UNIT.read_text() if text is None else text
    path = tmp_path / "taxonedge.service"
    path.write_text(text.replace("/opt/taxonedge/bin/taxonedge", str(exe)))
    return path


# ---- the unit -----------------------------------------------------------------------------------------


def test_unit_has_what_the_daemon_and_the_issue_need() -> None:
    text = UNIT.read_text()
    d = {(s, k): v for s, k, v in unit_directives(text)}
    assert d[("Service", "Type")] == "notify" and d[("Service", "NotifyAccess")] == "main"
    # The daemon stops feeding the watchdog after health.progress_timeout_s without progress; the kill
    # comes later, so a slow frame never restarts it.
    assert int(d[("Service", "WatchdogSec")]) >= 2 * HealthConfig().progress_timeout_s
    assert d[("Service", "Restart")] == "on-failure"
    assert int(d[("Unit", "StartLimitBurst")]) > 0 and int(d[("Unit", "StartLimitIntervalSec")]) > 0
    assert d[("Service", "User")] == "taxonedge"
    assert set(d[("Service", "SupplementaryGroups")].split()) == {"video", "plugdev"}
    assert (
        d[("Service", "StateDirectory")] == "taxonedge"
        and d[("Service", "ConfigurationDirectory")] == "taxonedge"
    )
    assert d[("Service", "ProtectSystem")] == "strict" and d[("Service", "CapabilityBoundingSet")] == ""
    assert d[("Service", "DevicePolicy")] == "closed"
    allowed = values(text, "DeviceAllow")
    assert {"char-video4linux rw", "char-usb_device rw", "/dev/apex_0 rw"} <= set(allowed)
    assert "@system-service" in values(text, "SystemCallFilter")
    # The credential name is what config.example.toml's mqtt.password_file names.
    assert "mqtt-password:/etc/taxonedge/mqtt-password" in values(text, "LoadCredential")
    example = load_config(SYSTEMD / "config.example.toml")
    assert str(example.mqtt.password_file) == "mqtt-password"
    assert str(example.device.state_dir) == "/var/lib/" + d[("Service", "StateDirectory")]
    # ExecStart runs the daemon with the config the install script puts in the ConfigurationDirectory.
    assert d[("Service", "ExecStart")].endswith("run --config /etc/taxonedge/config.toml")


@needs_analyze
def test_systemd_analyze_verify_passes_without_a_single_warning(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(runnable_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    # verify only warns (exit 0) about unknown keys or bad values: any output at all is a finding.
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


@needs_analyze
def test_systemd_analyze_verify_catches_a_misspelt_directive(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict")
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(runnable_unit(tmp_path, broken))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ProtectSytem" in proc.stdout + proc.stderr


def security_exposure(unit: Path) -> float:
    """The overall exposure `systemd-analyze security --offline=true` gives the unit file (0 best, 10
    worst)."""
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0 and "offline" in proc.stderr.lower():
        pytest.skip(
            f"this systemd-analyze cannot score a unit file offline (systemd >= 250 can), and no "
            f"systemd runs in this container to score the installed unit: {proc.stderr.strip()}"
        )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", proc.stdout)
    assert match, f"no exposure in the output:\n{proc.stdout}\n{proc.stderr}"
    return float(match.group(1))


@needs_analyze
def test_security_exposure_is_ok_or_better(tmp_path: Path) -> None:
    unit = runnable_unit(tmp_path)
    exposure = security_exposure(unit)
    print(
        f"systemd-analyze security --offline=true taxonedge.service: exposure {exposure} (limit "
        f"{EXPOSURE_LIMIT})"
    )
    assert exposure <= EXPOSURE_LIMIT
    # The same verdict through systemd-analyze's own gate (its threshold is in tenths).
    gate = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            f"--threshold={int(EXPOSURE_LIMIT * 10)}",
            str(unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gate.returncode == 0


@needs_analyze
def test_security_check_tells_an_unhardened_unit_apart(tmp_path: Path) -> None:
    # Only [Unit], the service basics and [Install]: what a first draft of the unit would be.
    text = UNIT.read_text()
    bare = "\n".join(
        line
        for line in text.splitlines()
        if line.startswith(("[", "Description=", "Type=", "ExecStart=", "WantedBy="))
    )
    exposure = security_exposure(runnable_unit(tmp_path, bare))
    assert exposure > 9.0 > EXPOSURE_LIMIT


def test_a_config_error_exits_with_the_status_the_unit_does_not_restart(tmp_path: Path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text((SYSTEMD / "config.example.toml").read_text().replace("port = 8883", "portt = 8883"))
    proc = run_cli("run", "--config", str(bad), check=False, timeout=120)
    assert str(proc.returncode) in values(UNIT.read_text(), "RestartPreventExitStatus")
    assert "portt" in proc.stderr


# ---- the udev rule ------------------------------------------------------------------------------------


def udev_rules(text: str) -> list[dict[str, str]]:
    rules = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            pairs = re.findall(r'([A-Z]+(?:\{[^}]*\})?)\s*(==|!=|\+=|:=|=)\s*"([^"]*)"', line)
            rules.append({key + ("" if op in ("==", "!=") else op): value for key, op, value in pairs})
    return rules


def test_udev_rule_covers_both_coral_usb_ids_and_the_pcie_device() -> None:
    rules = udev_rules(RULES.read_text())
    usb = {(r["ATTR{idVendor}"], r["ATTR{idProduct}"]) for r in rules if r.get("SUBSYSTEM") == "usb"}
    assert usb == {("1a6e", "089a"), ("18d1", "9302")}  # before and after the firmware upload
    assert any(r.get("SUBSYSTEM") == "apex" and r.get("KERNEL", "").startswith("apex_") for r in rules)
    # Every rule grants a group the service joins, and no one else.
    groups = set(values(UNIT.read_text(), "SupplementaryGroups")[0].split())
    for r in rules:
        assert r["GROUP="] in groups and r["MODE="] == "0660"


needs_udevadm = pytest.mark.skipif(
    shutil.which("udevadm") is None or shutil.which("unshare") is None,
    reason="udevadm is missing (apt-get install udev)",
)


def udevadm_parse(tmp_path: Path, rules_text: str) -> str:
    """udevadm's own parser on the rule file, in a private mount namespace so /etc and /run stay as they
    are."""
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    (rules_dir / RULES.name).write_text(rules_text)
    script = (
        f"mount --bind {rules_dir} /etc/udev/rules.d && mkdir -p /run/udev && "
        "mount -t tmpfs tmpfs /run/udev && udevadm test /sys/class/net/lo"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )
    if "Reading rules file: /etc/udev/rules.d/" not in proc.stdout + proc.stderr:
        pytest.skip(
            f"cannot run udevadm test in a private mount namespace here: {proc.stderr.strip()[-300:]}"
        )
    return "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if RULES.name + ":" in line)


@needs_udevadm
def test_udevadm_parses_the_rule_without_complaint(tmp_path: Path) -> None:
    assert udevadm_parse(tmp_path, RULES.read_text()) == ""


@needs_udevadm
def test_udevadm_check_reports_a_broken_rule(tmp_path: Path) -> None:
    broken = RULES.read_text().replace('ATTR{idProduct}=="9302"', 'ATRR{idProduct}=="9302"')
    assert "Invalid key" in udevadm_parse(tmp_path, broken)


# ---- the install script -------------------------------------------------------------------------------


def install(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(INSTALL), "--root", str(root), *args], capture_output=True, text=True, timeout=120
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root with type, mode, owner and content (or link target): a comparable snapshot."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            what = ("link", os.readlink(path))
        elif path.is_dir():
            what = ("dir",)
        else:
            what = ("file", path.read_bytes())
        out[str(path.relative_to(root))] = (*what, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return out


def passwd_entry(root: Path, name: str, db: str = "passwd") -> list[str] | None:
    path = root / "etc" / db
    for line in path.read_text().splitlines() if path.exists() else []:
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


@pytest.fixture
def exe_root(tmp_path: Path) -> Path:
    """A target root where the daemon's executable exists (as pip would put it there)."""
    root = tmp_path / "root"
    exe = root / "usr/local/bin/taxonedge"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return root


@needs_sysusers
def test_install_into_a_root_produces_user_dirs_config_unit_rule_and_enables(exe_root: Path) -> None:
    root = exe_root
    proc = install(root, "--exec", "/usr/local/bin/taxonedge")
    assert "warning" not in proc.stdout
    user = passwd_entry(root, "taxonedge")
    assert user is not None and user[5] == "/var/lib/taxonedge" and user[6].endswith("nologin")
    uid, gid = int(user[2]), int(user[3])
    assert passwd_entry(root, "plugdev", "group") is not None  # the udev rule's group exists

    def mode_owner(rel: str) -> tuple[int, int, int]:
        st = (root / rel).stat()
        return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid

    as_root = os.geteuid() == 0  # ownership is only set by a root run; modes always
    expected = {
        "etc/taxonedge": (0o750, 0, gid),
        "etc/taxonedge/tls": (0o750, 0, gid),
        "etc/taxonedge/config.toml": (0o640, 0, gid),
        "etc/taxonedge/mqtt-password": (0o600, 0, 0),
        "var/lib/taxonedge": (0o750, uid, gid),
        "etc/systemd/system/taxonedge.service": (0o644, 0, 0),
        "etc/udev/rules.d/99-coral-edgetpu.rules": (0o644, 0, 0),
        "usr/lib/sysusers.d/taxonedge.conf": (0o644, 0, 0),
    }
    for rel, want in expected.items():
        got = mode_owner(rel)
        assert (got if as_root else got[0]) == (want if as_root else want[0]), rel

    # The unit is ours, with ExecStart pointing at --exec; nothing else changed.
    unit = (root / "etc/systemd/system/taxonedge.service").read_text()
    assert unit == UNIT.read_text().replace("/opt/taxonedge/bin/taxonedge", "/usr/local/bin/taxonedge")
    assert (root / "etc/udev/rules.d/99-coral-edgetpu.rules").read_bytes() == RULES.read_bytes()
    link = root / "etc/systemd/system/multi-user.target.wants/taxonedge.service"
    assert os.readlink(link) == "/etc/systemd/system/taxonedge.service"
    # The config is the commented example and it is valid as installed.
    installed = root / "etc/taxonedge/config.toml"
    assert installed.read_text() == (SYSTEMD / "config.example.toml").read_text()
    assert load_config(installed).topic_base == "taxonedge/site/line/sorter-01"
    assert (root / "etc/taxonedge/mqtt-password").read_text() == ""


@needs_analyze
@needs_sysusers
def test_installed_unit_verifies(exe_root: Path) -> None:
    install(exe_root, "--exec", "/usr/local/bin/taxonedge")
    # The installed ExecStart names the path inside the root; verify looks it up on this machine.
    text = (exe_root / "etc/systemd/system/taxonedge.service").read_text()
    unit = exe_root / "verify" / "taxonedge.service"
    unit.parent.mkdir()
    unit.write_text(text.replace("/usr/local/bin/taxonedge", str(exe_root / "usr/local/bin/taxonedge")))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


@needs_sysusers
def test_install_again_changes_nothing_and_keeps_the_operators_files(exe_root: Path) -> None:
    root = exe_root
    install(root)
    config = root / "etc/taxonedge/config.toml"
    password = root / "etc/taxonedge/mqtt-password"
    config.write_text(config.read_text().replace('id = "sorter-01"', 'id = "line7-cam2"'))
    password.write_text("s3cret\n")
    before = tree(root)
    proc = install(root)
    assert "kept existing" in proc.stdout
    after = tree(root)
    # sysusers rewrites passwd/group backups ("passwd-") on every run; everything else is byte-identical.
    changed = {
        p for p in before.keys() | after.keys() if before.get(p) != after.get(p) and not p.endswith("-")
    }
    assert changed == set()
    assert load_config(config).device.id == "line7-cam2" and password.read_text() == "s3cret\n"


@needs_sysusers
def test_uninstall_keeps_config_and_state_and_purge_removes_them(exe_root: Path) -> None:
    root = exe_root
    install(root)
    (root / "var/lib/taxonedge/outbox.sqlite").write_bytes(b"labels not yet delivered")
    install(root, "--uninstall")
    for rel in (
        "etc/systemd/system/taxonedge.service",
        "etc/udev/rules.d/99-coral-edgetpu.rules",
        "usr/lib/sysusers.d/taxonedge.conf",
        "etc/systemd/system/multi-user.target.wants/taxonedge.service",
    ):
        assert not (root / rel).exists() and not (root / rel).is_symlink(), rel
    assert (root / "etc/taxonedge/config.toml").exists()
    assert (root / "var/lib/taxonedge/outbox.sqlite").read_bytes() == b"labels not yet delivered"
    assert passwd_entry(root, "taxonedge") is not None

    install(root)  # back again, same user
    assert (root / "etc/systemd/system/multi-user.target.wants/taxonedge.service").is_symlink()

    install(root, "--uninstall", "--purge")
    assert not (root / "etc/taxonedge").exists() and not (root / "var/lib/taxonedge").exists()
    assert passwd_entry(root, "taxonedge") is None and passwd_entry(root, "taxonedge", "group") is None
    assert passwd_entry(root, "plugdev", "group") is not None  # shared group, not ours to delete
    assert install(root, "--uninstall", "--purge").returncode == 0  # nothing left: still fine


def test_install_refuses_bad_options_with_a_clear_message(tmp_path: Path) -> None:
    cases = [
        (["--bogus"], "unknown option '--bogus'"),
        (["--purge"], "--purge only goes with --uninstall"),
        (["--start"], "--start needs the live system"),
        (["--exec", "taxonedge"], "--exec must be an absolute path"),
        (["--config-example", str(tmp_path / "missing.toml")], "config example"),
    ]
    for args, message in cases:
        proc = install(tmp_path, *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "etc").exists()  # nothing was half-installed
    proc = subprocess.run([str(INSTALL), "--root", str(tmp_path / "nope")], capture_output=True, text=True)
    assert proc.returncode != 0 and "is not a directory" in proc.stderr
    assert "--uninstall" in subprocess.run([str(INSTALL), "--help"], capture_output=True, text=True).stdout


def readable_copy(systemd_dir: Path) -> Path:
    """A copy of the systemd/ folder in a fresh 0755 temp dir, for running install.sh as another user.

    The checkout may sit where only its owner can enter (a 0700 home directory, pytest's own tmp dirs), so
    a script run from there as user 65534 fails with "Permission denied" before it starts.
    """
    stage = Path(tempfile.mkdtemp(prefix="taxonedge-systemd-"))
    stage.chmod(0o755)
    copy = stage / "systemd"
    shutil.copytree(systemd_dir, copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    return copy


def private_checkout(tmp_path: Path) -> Path:
    """systemd/ as it lies in a checkout cloned into a directory only its owner can enter (mode 0700)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    home.chmod(0o700)
    shutil.copytree(SYSTEMD, home / "taxonedge" / "systemd")
    return home / "taxonedge" / "systemd"


needs_nobody = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="runs the script as an unprivileged user, which needs root and setpriv",
)
AS_NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


@needs_sysusers
@needs_nobody
@pytest.mark.parametrize("where", ["checkout", "private checkout"])
def test_install_without_root_builds_an_image_tree_owned_by_the_caller(tmp_path: Path, where: str) -> None:
    # CI builds images unprivileged: everything but ownership (and deleting the user) must work.
    systemd_dir = SYSTEMD if where == "checkout" else private_checkout(tmp_path)
    script = readable_copy(systemd_dir) / "install.sh"
    root = Path(tempfile.mkdtemp(prefix="taxonedge-root-"))
    try:
        root.chmod(0o755)
        os.chown(root, 65534, 65534)
        as_nobody = [*AS_NOBODY, str(script), "--root", str(root)]
        proc = subprocess.run(as_nobody, capture_output=True, text=True, timeout=120, cwd="/")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        password = (root / "etc/taxonedge/mqtt-password").stat()
        assert stat.S_IMODE(password.st_mode) == 0o600 and password.st_uid == 65534
        assert stat.S_IMODE((root / "etc/taxonedge/config.toml").stat().st_mode) == 0o640
        assert passwd_entry(root, "taxonedge") is not None
        proc = subprocess.run(
            [*as_nobody, "--uninstall", "--purge"], capture_output=True, text=True, timeout=120, cwd="/"
        )
        assert proc.returncode == 0 and "deleting it needs root" in proc.stdout, proc.stdout + proc.stderr
        assert (
            not (root / "etc/taxonedge").exists()
            and not (root / "etc/systemd/system/taxonedge.service").exists()
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(script.parent.parent, ignore_errors=True)


@needs_nobody
def test_a_private_checkout_is_what_user_65534_cannot_reach(tmp_path: Path) -> None:
    """Why the test above runs a copy: from a 0700 directory the script does not even start."""
    script = private_checkout(tmp_path) / "install.sh"
    proc = subprocess.run(
        [*AS_NOBODY, str(script), "--help"], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc.stdout + proc.stderr
