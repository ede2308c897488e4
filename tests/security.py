"""Test helpers for a secured broker: an openssl PKI, mosquitto password and ACL files, a TLS listener.

Everything is real: certificates come from the openssl command line, passwords are hashed by
`mosquitto_passwd`, and the broker is conftest's `Broker` (Debian's mosquitto) with the TLS listener,
`password_file` and `acl_file` in its configuration. The ACL is the one shipped for fleets,
systemd/mosquitto/taxonedge.acl, so the tests check what devices get in production.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from .conftest import REPO, Broker, free_port

FLEET_ACL = REPO / "systemd" / "mosquitto" / "taxonedge.acl"
OPERATOR = "taxonedge-operator"


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr}")


@dataclass
class Pki:
    """A CA with a server certificate for 127.0.0.1/localhost and client certificates (CN = device id)."""

    dir: Path
    name: str = "fleet"

    @property
    def ca_cert(self) -> Path:
        return self.dir / f"{self.name}-ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / f"{self.name}-ca.key"

    def create(self) -> Pki:
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            self.ca_key.name,
            "-out",
            self.ca_cert.name,
            "-days",
            "2",
            "-subj",
            f"/CN=taxonedge test {self.name} CA",
            cwd=self.dir,
        )
        return self

    def issue(self, name: str, common_name: str, server: bool = False) -> tuple[Path, Path]:
        """A key and a certificate signed by this CA: (cert, key)."""
        key, csr, cert = (self.dir / f"{self.name}-{name}.{ext}" for ext in ("key", "csr", "crt"))
        ext = ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"] if server else []
        _openssl(
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key.name,
            "-out",
            csr.name,
            "-subj",
            f"/CN={common_name}",
            *ext,
            cwd=self.dir,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            csr.name,
            "-CA",
            self.ca_cert.name,
            "-CAkey",
            self.ca_key.name,
            "-CAcreateserial",
            "-days",
            "2",
            "-copy_extensions",
            "copy",
            "-out",
            cert.name,
            cwd=self.dir,
        )
        return cert, key


def world_readable_dir(prefix: str) -> Path:
    """A directory user 'mosquitto' can read (pytest's tmp dirs sit under a 0700 parent)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def make_readable(directory: Path) -> None:
    # mosquitto started as root drops to user 'mosquitto' before it reads certificates, passwords, ACL.
    for path in directory.iterdir():
        path.chmod(0o644)


def write_passwords(path: Path, users: dict[str, str]) -> Path:
    """A mosquitto password_file with hashed passwords, made by mosquitto_passwd itself."""
    exe = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(exe).exists():
        pytest.skip("mosquitto_passwd is missing (apt-get install mosquitto)")
    path.unlink(missing_ok=True)
    path.touch()
    for user, password in users.items():
        subprocess.run([exe, "-b", str(path), user, password], check=True, capture_output=True, timeout=30)
    path.chmod(0o644)
    return path


@dataclass
class SecureBroker:
    """mosquitto with one TLS listener, password_file and the fleet acl_file; anonymous clients refused."""

    dir: Path
    pki: Pki
    passwords: dict[str, str]
    require_certificate: bool = True
    port: int = field(default_factory=free_port)
    broker: Broker | None = None

    @property
    def password_file(self) -> Path:
        return self.dir / "passwd"

    def config(self) -> str:
        server_cert, server_key = (self.pki.dir / f"{self.pki.name}-server.{ext}" for ext in ("crt", "key"))
        return (
            "per_listener_settings false\n"
            "allow_anonymous false\n"
            f"password_file {self.password_file}\n"
            f"acl_file {self.dir / FLEET_ACL.name}\n"
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {self.pki.ca_cert}\n"
            f"certfile {server_cert}\n"
            f"keyfile {server_key}\n"
            "tls_version tlsv1.2\n"
            f"require_certificate {'true' if self.require_certificate else 'false'}\n"
            "log_type all\n"
            f"log_dest file {self.dir / 'broker.log'}\n"
        )

    def start(self) -> SecureBroker:
        write_passwords(self.password_file, self.passwords)
        shutil.copyfile(FLEET_ACL, self.dir / FLEET_ACL.name)
        make_readable(self.dir)
        (self.dir / "broker.log").touch(mode=0o666)
        (self.dir / "broker.log").chmod(0o666)
        self.broker = Broker(port=self.port, workdir=self.dir, extra_config=self.config())
        self.broker.start()
        return self

    def reload(self, passwords: dict[str, str]) -> None:
        """Rewrite the password file and make mosquitto re-read it (SIGHUP), as `systemctl reload` does."""
        self.passwords = passwords
        write_passwords(self.password_file, passwords)
        assert self.broker and self.broker.process
        self.broker.process.send_signal(1)

    def log(self) -> str:
        path = self.dir / "broker.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.broker:
            self.broker.stop()


def make_fleet_pki(directory: Path) -> tuple[Pki, Pki]:
    """The fleet CA (server cert, a client cert per test device) and an unrelated 'rogue' CA."""
    fleet = Pki(directory).create()
    fleet.issue("server", "localhost", server=True)
    for device in ("d1", "d2", OPERATOR):
        fleet.issue(device, device)
    rogue = Pki(directory, name="rogue").create()
    rogue.issue("d1", "d1")
    rogue.issue("server", "localhost", server=True)
    make_readable(directory)
    return fleet, rogue


def tls_client(
    pki: Pki,
    username: str | None,
    password: str | None,
    *,
    ca: Path | None = None,
    cert: str | None = None,
    client_id: str | None = None,
) -> paho.Client:
    """A paho MQTT v5 client with TLS; `cert` names the certificate (e.g. 'd1') issued by `pki`."""
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=client_id or f"test-{username}-{os.getpid()}",
        protocol=paho.MQTTv5,
    )
    certfile = keyfile = None
    if cert is not None:
        certfile, keyfile = str(pki.dir / f"{pki.name}-{cert}.crt"), str(pki.dir / f"{pki.name}-{cert}.key")
    client.tls_set(ca_certs=str(ca or pki.ca_cert), certfile=certfile, keyfile=keyfile)
    if username is not None:
        client.username_pw_set(username, password)
    return client


@dataclass
class Outcome:
    connected: bool
    reason: str  # CONNACK reason, or the exception that stopped the connection


def try_connect(client: paho.Client, port: int, timeout: float = 5.0) -> Outcome:
    """Connect and wait for CONNACK (or the TLS/socket failure); disconnects again on success."""
    done = threading.Event()
    result: dict[str, Outcome] = {}

    def on_connect(c, userdata, flags, reason, properties) -> None:
        result["o"] = Outcome(not reason.is_failure, str(reason))
        done.set()

    def on_disconnect(c, userdata, flags, reason, properties) -> None:
        result.setdefault("o", Outcome(False, f"disconnected: {reason}"))
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except (OSError, ssl.SSLError) as exc:
        return Outcome(False, f"{type(exc).__name__}: {exc}")
    client.loop_start()
    try:
        if not done.wait(timeout):
            return Outcome(False, "no CONNACK")
        return result["o"]
    finally:
        client.disconnect()
        client.loop_stop()


# ---- the unit's process sandbox, applied without systemd ---------------------------------------------
# No systemd runs in this container, so `systemctl start` cannot show that the daemon survives the unit's
# hardening. These helpers apply the same kernel mechanisms systemd uses, read from the unit file itself:
# SystemCallFilter= (seccomp, refused calls fail with SystemCallErrorNumber=), RestrictAddressFamilies=
# (seccomp on socket()), MemoryDenyWriteExecute= (the kernel's PR_SET_MDWE), NoNewPrivileges= and an empty
# CapabilityBoundingSet=. Then the real daemon is exec'ed inside it.


def unit_values(unit_text: str, key: str) -> list[str]:
    out = []
    for line in unit_text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name == key and not line.lstrip().startswith("#"):
            out.append(value.strip())
    return out


def expand_syscall_group(name: str, seen: set[str] | None = None) -> set[str]:
    """The system calls in a systemd group like @system-service, nested groups included."""
    seen = set() if seen is None else seen
    if not name.startswith("@"):
        return {name}
    if name in seen:
        return set()
    seen.add(name)
    proc = subprocess.run(
        ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True, timeout=30
    )
    calls: set[str] = set()
    for line in proc.stdout.splitlines()[1:]:
        item = line.strip()
        if item and not item.startswith("#"):
            calls |= expand_syscall_group(item, seen)
    return calls


def unit_sandbox_spec(unit_text: str) -> dict:
    """What to apply, from the unit's own lines: allowed syscalls, socket families, errno, MDWE."""
    allow: set[str] = set()
    for value in unit_values(unit_text, "SystemCallFilter"):
        deny = value.startswith("~")
        names = set().union(*(expand_syscall_group(n) for n in value.lstrip("~").split()))
        allow = allow - names if deny else allow | names
    families = [n for v in unit_values(unit_text, "RestrictAddressFamilies") for n in v.split()]
    errno_name = (unit_values(unit_text, "SystemCallErrorNumber") or ["EPERM"])[-1]
    return {
        "allow": sorted(allow),
        "families": families,
        "errno": errno_name,
        "mdwe": unit_values(unit_text, "MemoryDenyWriteExecute") == ["yes"],
    }


SANDBOX_LAUNCHER = r"""
import ctypes, errno, json, mmap, os, socket, sys
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
def mount(src, target, flags):
    if libc.mount(src and src.encode(), target.encode(), None, flags, None) != 0:
        sys.exit(f"sandbox: mount {target}: {os.strerror(ctypes.get_errno())}")
if spec.get("writable"):
    # ProtectSystem=strict: in a private mount namespace the root file system is read-only and only the
    # state directory (and the private tmp) stay writable.
    if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        sys.exit(f"sandbox: unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
    mount(None, "/", MS_REC | MS_PRIVATE)
    for path in spec["writable"]:
        mount(path, path, MS_BIND)
    mount(None, "/", MS_REMOUNT | MS_BIND | MS_RDONLY)
# CapabilityBoundingSet= (empty): once the bound set is empty, execve leaves no capability even to uid 0.
cap = 0
while libc.prctl(24, cap, 0, 0, 0) == 0:  # PR_CAPBSET_DROP
    cap += 1
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
if spec["mdwe"] and libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit("sandbox: this kernel has no PR_SET_MDWE (Linux >= 6.3)")

class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
seccomp.seccomp_init.restype = ctypes.c_void_p
seccomp.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.c_void_p]
seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
ALLOW, EQ = 0x7FFF0000, 4
def ERRNO(e):
    return 0x00050000 | e
ctx = seccomp.seccomp_init(ERRNO(getattr(errno, spec["errno"])))
for name in spec["allow"]:
    nr = seccomp.seccomp_syscall_resolve_name(name.encode())
    if nr >= 0 and name != "socket":
        assert seccomp.seccomp_rule_add_array(ctx, ALLOW, nr, 0, None) == 0, name
nr = seccomp.seccomp_syscall_resolve_name(b"socket")
families = [getattr(socket, f) for f in spec["families"]]
for fam in families:
    cmp = Cmp(0, EQ, fam, 0)
    assert seccomp.seccomp_rule_add_array(ctx, ALLOW, nr, 1, ctypes.byref(cmp)) == 0
# Other families get the default errno (systemd answers EAFNOSUPPORT; libseccomp cannot say "none of").
assert seccomp.seccomp_load(ctx) == 0, "seccomp_load failed"

# Show that the sandbox bites before handing over to the daemon.
def refused(what, fn):
    try:
        fn()
    except OSError as exc:
        print(f"sandbox: {what} refused ({errno.errorcode.get(exc.errno, exc.errno)})", flush=True)
    else:
        print(f"sandbox: {what} ALLOWED", flush=True)
refused("sched_setaffinity (@resources)", lambda: os.sched_setaffinity(0, os.sched_getaffinity(0)))
refused("AF_PACKET socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
refused("sethostname (@privileged)", lambda: socket.sethostname("x"))
if spec.get("writable"):
    refused("writing outside the state directory", lambda: open(spec["read_only_probe"], "w"))
if spec["mdwe"]:
    refused("W+X memory", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC))
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def sandboxed_command(
    unit_text: str, argv: list[str], writable: list[Path] | None = None, read_only_probe: Path | None = None
) -> list[str]:
    """`python -c LAUNCHER SPEC ARGV...`: applies the unit's sandbox, then execs `python ARGV...`.

    With `writable` (the state directory and a stand-in for PrivateTmp=, which the caller passes as
    $TMPDIR), everything else is read-only as under ProtectSystem=strict; `read_only_probe` is a file the
    launcher tries to create to show that. This needs root (a private mount namespace).
    """
    spec = unit_sandbox_spec(unit_text)
    if writable:
        spec |= {"writable": [str(p) for p in writable], "read_only_probe": str(read_only_probe)}
    return [sys.executable, "-c", SANDBOX_LAUNCHER, json.dumps(spec), *argv]
