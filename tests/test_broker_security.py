"""Broker security against a real mosquitto: TLS listener, hashed password_file, the fleet acl_file.

A device may publish only under its own `<prefix>/<site>/<line>/<device>/` and read only its own command
and model topics (plus fleet-group deployments); clients without credentials, with a wrong password or
with a certificate the other side does not trust are refused; the daemon's own MQTT link
(`taxonedge.edge.service.mqtt.MqttLink`) connects with TLS and a systemd credential, reports every refusal in
one line saying what to fix, and keeps retrying with backoff until the broker lets it in.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from taxonedge.edge.service.config import MqttConfig, TlsConfig
from taxonedge.edge.service.mqtt import MqttLink
from taxonedge.edge.service.outbox import Outbox

from .security import OPERATOR, Pki, SecureBroker, make_fleet_pki, tls_client, try_connect, world_readable_dir

CONSUMER = "taxonedge-sorter"  # the ACL's logistics consumer account
PASSWORDS = {"d1": "pw-d1-correct", "d2": "pw-d2-correct", OPERATOR: "pw-operator", CONSUMER: "pw-sorter"}
D1 = "taxonedge/s1/l1/d1"
D2 = "taxonedge/s1/l1/d2"


@pytest.fixture(scope="module")
def pkis() -> Iterator[tuple[Pki, Pki]]:
    directory = world_readable_dir("taxonedge-pki-")
    yield make_fleet_pki(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pki(pkis: tuple[Pki, Pki]) -> Pki:
    return pkis[0]


@pytest.fixture
def rogue(pkis: tuple[Pki, Pki]) -> Pki:
    return pkis[1]


def start_broker(pki: Pki, require_certificate: bool = True) -> SecureBroker:
    return SecureBroker(
        world_readable_dir("taxonedge-broker-"), pki, dict(PASSWORDS), require_certificate=require_certificate
    ).start()


@pytest.fixture
def secure_broker(pki: Pki) -> Iterator[SecureBroker]:
    b = start_broker(pki)
    yield b
    b.stop()
    shutil.rmtree(b.dir, ignore_errors=True)


class Session:
    """A connected paho client that records PUBACK/SUBACK reasons and received messages."""

    def __init__(self, client: paho.Client, port: int):
        self.client = client
        self.acks: dict[int, str] = {}
        self.subacks: dict[int, list[str]] = {}
        self.received: list[str] = []
        self.payloads: list[bytes] = []
        self.event = threading.Condition()
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        outcome = try_connect_keep(client, port)
        assert outcome, "the valid client could not connect: the broker setup is broken"

    def _on_publish(self, c, userdata, mid, reason, properties) -> None:
        with self.event:
            self.acks[mid] = str(reason)
            self.event.notify_all()

    def _on_subscribe(self, c, userdata, mid, reasons, properties) -> None:
        with self.event:
            self.subacks[mid] = [str(r) for r in reasons]
            self.event.notify_all()

    def _on_message(self, c, userdata, message) -> None:
        with self.event:
            self.received.append(message.topic)
            self.payloads.append(message.payload)
            self.event.notify_all()

    def wait(self, predicate, timeout: float = 5.0) -> None:
        with self.event:
            assert self.event.wait_for(predicate, timeout), "timed out waiting for the broker"

    def publish(self, topic: str, payload: bytes = b"x") -> str:
        info = self.client.publish(topic, payload, qos=1)
        self.wait(lambda: info.mid in self.acks)
        return self.acks[info.mid]

    def subscribe(self, topic_filter: str) -> str:
        _, mid = self.client.subscribe(topic_filter, qos=1)
        self.wait(lambda: mid in self.subacks)
        return self.subacks[mid][0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def try_connect_keep(client: paho.Client, port: int) -> bool:
    connected = threading.Event()
    client.on_connect = lambda c, u, f, reason, p: connected.set() if not reason.is_failure else None
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    return connected.wait(5)


def session(pki: Pki, broker: SecureBroker, user: str) -> Session:
    return Session(tls_client(pki, user, PASSWORDS[user], cert=user), broker.port)


# ---- the ACL ------------------------------------------------------------------------------------------


def test_device_publishes_only_under_its_own_prefix(pki: Pki, secure_broker: SecureBroker) -> None:
    operator = session(pki, secure_broker, OPERATOR)
    device = session(pki, secure_broker, "d1")
    try:
        assert operator.subscribe("taxonedge/#") == "Granted QoS 1"
        allowed = [f"{D1}/labels", f"{D1}/status", f"{D1}/model/deploy/42", f"{D1}/cmd/ping/response"]
        denied = [
            f"{D2}/labels",
            f"{D2}/cmd/reboot",
            "taxonedge/s1/l1/labels",
            "taxonedge/groups/g1/deploy",
            "taxonedge/d1/labels",
            "elsewhere/d1",
        ]
        for topic in allowed:
            assert device.publish(topic) == "Success", topic
        for topic in denied:
            assert device.publish(topic) == "Not authorized", topic
        marker = f"{D1}/labels/marker"
        device.publish(marker)
        operator.wait(lambda: marker in operator.received)
        assert set(operator.received) == {*allowed, marker}  # nothing denied reached anyone
    finally:
        operator.close()
        device.close()


def test_device_reads_only_its_own_command_and_model_topics(pki: Pki, secure_broker: SecureBroker) -> None:
    operator = session(pki, secure_broker, OPERATOR)
    device = session(pki, secure_broker, "d1")
    try:
        for own in (
            f"{D1}/cmd/#",
            f"{D1}/model/deploy/#",
            f"{D1}/trigger",
            f"{D1}/status",
            "taxonedge/groups/g1/deploy/#",
        ):
            assert device.subscribe(own) == "Granted QoS 1", own
        # mosquitto 2.0 grants any subscription and applies the ACL to each message it would deliver:
        # filters over other devices' topics and the whole tree are accepted, and deliver nothing foreign.
        for foreign in (f"{D2}/cmd/#", f"{D2}/model/#", f"{D2}/labels", "taxonedge/#"):
            device.subscribe(foreign)
        # its own trigger (item mode) and its own status (a restarted daemon corrects a late will) too
        readable = [
            f"{D1}/cmd/ping",
            f"{D1}/model/deploy",
            f"{D1}/model/deploy/chunk/0",
            f"{D1}/trigger",
            f"{D1}/status",
            "taxonedge/groups/g1/deploy",
            "taxonedge/groups/g2/deploy/chunk/3",
        ]
        unreadable = [
            f"{D2}/cmd/ping",
            f"{D2}/model/deploy",
            f"{D2}/labels",
            f"{D1}/labels",
            f"{D2}/trigger",
            f"{D2}/status",
            "taxonedge/s1/l1/d1x/cmd/ping",
            "taxonedge/groups/g1/other",
        ]
        for topic in unreadable + readable:
            assert operator.publish(topic) == "Success", topic
        marker = f"{D1}/cmd/marker"
        operator.publish(marker)
        device.wait(lambda: marker in device.received)
        assert set(device.received) == {*readable, marker}
    finally:
        operator.close()
        device.close()


def test_replies_go_only_under_the_reply_prefix_and_each_account_reads_its_own(
    pki: Pki, secure_broker: SecureBroker
) -> None:
    """Devices answer on <prefix>/replies/<client> (never their own topics, edge/kernel/protocol.py); the ACL
    lets them write there and lets each account read the replies addressed to it, and no one else's."""
    operator = session(pki, secure_broker, OPERATOR)
    consumer = Session(tls_client(pki, CONSUMER, PASSWORDS[CONSUMER], cert="d1"), secure_broker.port)
    device = session(pki, secure_broker, "d1")
    try:
        for who in (operator, consumer):
            assert who.subscribe("taxonedge/replies/#") == "Granted QoS 1"
        to_operator = ["taxonedge/replies/taxonedge-operator", "taxonedge/replies/taxonedge-operator/42"]
        to_consumer = ["taxonedge/replies/taxonedge-sorter", "taxonedge/replies/taxonedge-sorter/ping/7"]
        for topic in to_operator + to_consumer:
            assert device.publish(topic, b'{"ok": true}') == "Success", topic
        for topic in ("taxonedge/replie/x", "replies/taxonedge-operator", "taxonedge/s1/replies/x"):
            assert device.publish(topic) == "Not authorized", topic
        marker = "taxonedge/replies/taxonedge-sorter/marker"
        device.publish(marker)
        consumer.wait(lambda: marker in consumer.received)
        operator.wait(lambda: marker in operator.received)
        assert consumer.received == [*to_consumer, marker]  # not the operator's replies
        assert operator.received == [*to_operator, *to_consumer, marker]  # the operator's account reads all
    finally:
        for who in (operator, consumer, device):
            who.close()


# ---- refusals -----------------------------------------------------------------------------------------


def test_valid_device_connects(pki: Pki, secure_broker: SecureBroker) -> None:
    # The control for the refusals below: the same setup with the right credentials gets in.
    outcome = try_connect(tls_client(pki, "d1", PASSWORDS["d1"], cert="d1"), secure_broker.port)
    assert outcome.connected, outcome.reason


def refused_client(case: str, pki: Pki, rogue: Pki) -> paho.Client:
    d1 = PASSWORDS["d1"]
    if case == "plain TCP":
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        client.username_pw_set("d1", d1)
        return client
    return {
        "no credentials": lambda: tls_client(pki, None, None, cert="d1"),
        "wrong password": lambda: tls_client(pki, "d1", "guess", cert="d1"),
        "unknown user": lambda: tls_client(pki, "d9", d1, cert="d1"),
        "another device's password": lambda: tls_client(pki, "d1", PASSWORDS["d2"], cert="d1"),
        # Trusts the real broker, but presents a certificate the fleet CA never signed.
        "client certificate from an untrusted CA": lambda: tls_client(
            rogue, "d1", d1, cert="d1", ca=pki.ca_cert
        ),
        "no client certificate": lambda: tls_client(pki, "d1", d1),
        "broker certificate not trusted by the client": lambda: tls_client(
            pki, "d1", d1, cert="d1", ca=rogue.ca_cert
        ),
    }[case]()


@pytest.mark.parametrize(
    "case,expected",
    [
        ("no credentials", "Not authorized"),
        ("wrong password", "Not authorized"),
        ("unknown user", "Not authorized"),
        ("another device's password", "Not authorized"),
        ("client certificate from an untrusted CA", ""),
        ("no client certificate", ""),
        ("broker certificate not trusted by the client", "certificate verify failed"),
        ("plain TCP", ""),
    ],
)
def test_clients_without_valid_credentials_are_refused(
    case: str, expected: str, pki: Pki, rogue: Pki, secure_broker: SecureBroker
) -> None:
    outcome = try_connect(refused_client(case, pki, rogue), secure_broker.port)
    print(f"{case}: {outcome}")
    assert not outcome.connected
    assert expected in outcome.reason


# ---- the daemon's own MQTT link -----------------------------------------------------------------------


def link_config(
    pki: Pki, port: int, password_file: str = "mqtt-password", ca: Path | None = None, cert: str = "d1"
) -> MqttConfig:
    return MqttConfig(
        host="127.0.0.1",
        port=port,
        username="d1",
        password_file=Path(password_file),
        tls=TlsConfig(
            ca_file=ca or pki.ca_cert,
            cert_file=pki.dir / f"{pki.name}-{cert}.crt",
            key_file=pki.dir / f"{pki.name}-{cert}.key",
        ),
    )


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$CREDENTIALS_DIRECTORY as systemd's LoadCredential=mqtt-password:... leaves it for the service."""
    directory = tmp_path / "credentials"
    directory.mkdir(mode=0o500)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))
    return directory


def start_link(cfg: MqttConfig, outbox: Outbox, attempts: list[float] | None = None) -> MqttLink:
    link = MqttLink(
        cfg,
        "taxonedge-d1-test",
        outbox,
        f"{D1}/status",
        b"offline",
        on_connected=lambda: None,
        on_message=lambda *a: None,
    )
    if attempts is not None:
        # Observe (not replace) the link's connection attempts: when each one starts.
        connect = link.client.connect

        def timed_connect(*args, **kwargs):
            attempts.append(time.monotonic())
            return connect(*args, **kwargs)

        link.client.connect = timed_connect
    link.start()
    return link


def test_daemon_link_delivers_with_tls_client_certificate_and_systemd_credential(
    pki: Pki, secure_broker: SecureBroker, credentials: Path, tmp_path: Path
) -> None:
    (credentials / "mqtt-password").write_text(PASSWORDS["d1"] + "\n")
    operator = session(pki, secure_broker, OPERATOR)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    link = None
    try:
        operator.subscribe(f"{D1}/labels")
        outbox.put(f"{D1}/labels", b'{"label": "Fruit/Apple"}')
        link = start_link(link_config(pki, secure_broker.port), outbox)
        operator.wait(lambda: f"{D1}/labels" in operator.received)
        deadline = time.monotonic() + 5
        while outbox.depth() and time.monotonic() < deadline:  # the row goes only on PUBACK
            time.sleep(0.05)
        assert outbox.depth() == 0 and link.last_error is None
    finally:
        if link:
            link.stop()
        operator.close()
        outbox.close()


@pytest.mark.parametrize(
    "case,expected",
    [
        (
            "wrong password",
            ["refused the connection", "Not authorized", "check mqtt.username and the password"],
        ),
        (
            "untrusted broker certificate",
            ["TLS certificate of 127.0.0.1", "does not verify", "check mqtt.tls.ca_file"],
        ),
        (
            "client certificate from an untrusted CA",
            [
                "closed the connection before accepting it",
                "refused the client certificate",
                "mqtt.tls.cert_file",
            ],
        ),
    ],
)
def test_daemon_link_reports_a_refusal_clearly_and_retries_with_backoff(
    case: str,
    expected: list[str],
    pki: Pki,
    rogue: Pki,
    secure_broker: SecureBroker,
    credentials: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (credentials / "mqtt-password").write_text("wrong\n" if case == "wrong password" else PASSWORDS["d1"])
    if case == "untrusted broker certificate":
        cfg = link_config(pki, secure_broker.port, ca=rogue.ca_cert)
    elif case == "client certificate from an untrusted CA":
        cfg = link_config(rogue, secure_broker.port, ca=pki.ca_cert)
    else:
        cfg = link_config(pki, secure_broker.port)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    outbox.put(f"{D1}/labels", b'{"label": "kept while refused"}')
    caplog.set_level(logging.ERROR, logger="taxonedge.edge.service.mqtt")
    attempts: list[float] = []
    link = start_link(cfg, outbox, attempts)
    try:
        time.sleep(5.0)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        # One line, saying what failed and what to check; repeated attempts do not flood the log.
        assert len(errors) == 1, errors
        for part in expected + ["retrying with backoff"]:
            assert part in errors[0], errors[0]
        assert link.last_error and not link.connected.is_set() and outbox.depth() == 1
        gaps = [round(b - a, 2) for a, b in pairwise(attempts)]
        print(f"{case}: {len(attempts)} attempts in 5 s, gaps {gaps} s; logged: {errors[0]}")
        # It keeps trying, and waits longer each time (0.5, 1, 2, ... s), instead of hammering the broker.
        assert len(attempts) >= 3
        assert all(later > earlier * 1.5 for earlier, later in pairwise(gaps)) and gaps[0] >= 0.4
        if case == "wrong password":
            # The operator fixes the password on the broker: the next retry gets in, the label goes out.
            secure_broker.reload({**PASSWORDS, "d1": "wrong"})
            assert link.connected.wait(15), "the link stopped retrying"
            deadline = time.monotonic() + 5
            while outbox.depth() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert outbox.depth() == 0
    finally:
        link.stop()
        outbox.close()


def test_optional_client_certificate_password_only_listener(pki: Pki) -> None:
    broker = start_broker(pki, require_certificate=False)
    try:
        with_cert = try_connect(tls_client(pki, "d1", PASSWORDS["d1"], cert="d1"), broker.port)
        without = try_connect(tls_client(pki, "d1", PASSWORDS["d1"]), broker.port)
        wrong = try_connect(tls_client(pki, "d1", "guess"), broker.port)
        assert with_cert.connected and without.connected, (with_cert, without)
        assert not wrong.connected
    finally:
        broker.stop()
        shutil.rmtree(broker.dir, ignore_errors=True)


# ---- the real daemon ----------------------------------------------------------------------------------


def test_daemon_refused_then_admitted_keeps_every_label(
    pki: Pki, secure_broker: SecureBroker, tmp_path: Path
) -> None:
    """`taxonedge run` with TLS, a client certificate and its password as a systemd credential: a wrong
    password is reported in one clear line, the daemon keeps classifying into its outbox and retrying, and
    once the broker accepts it every label arrives."""
    from .conftest import write_frames_folder
    from .daemonkit import DEVICE, DaemonProcess, write_config
    from .tinymodels import write_tiny_bundle

    bundle = write_tiny_bundle(tmp_path / "tiny.tebundle")
    flat = write_frames_folder(tmp_path, per_class=2)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text("not-the-password\n")
    mqtt = (
        f'username = "{DEVICE}"\npassword_file = "mqtt-password"\n'
        f'[mqtt.tls]\nca_file = "{pki.ca_cert}"\ncert_file = "{pki.dir / "fleet-d1.crt"}"\n'
        f'key_file = "{pki.dir / "fleet-d1.key"}"\n'
    )
    source = f'type = "folder"\npath = "{flat}"\nloop = true\npacing = "realtime"\nfps = 10'
    config = write_config(
        tmp_path / "config.toml", secure_broker, bundle, source, tmp_path / "state", extra=mqtt
    )
    operator = session(pki, secure_broker, OPERATOR)
    operator.subscribe(f"taxonedge/plant/line1/{DEVICE}/labels")
    daemon = DaemonProcess(config, env={"CREDENTIALS_DIRECTORY": str(credentials)})
    try:
        deadline = time.monotonic() + 30
        while "refused the connection" not in daemon.log and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # classifying into the outbox meanwhile, retrying with backoff
        refusals = [line for line in daemon.log.splitlines() if "refused the connection" in line]
        assert len(refusals) == 1 and "Not authorized" in refusals[0] and "password" in refusals[0], (
            daemon.log
        )
        assert daemon.proc.poll() is None and operator.received == []
        # The operator registers the password the device holds; the daemon's next retry gets in.
        secure_broker.reload({**PASSWORDS, DEVICE: "not-the-password"})
        operator.wait(lambda: len(operator.received) >= 40, timeout=40)
        assert daemon.terminate() == 0, daemon.log[-3000:]
        seqs = sorted({json.loads(p)["seq"] for p in operator.payloads})
        # Labels made while refused were kept and delivered: the first ones are there, without gaps.
        assert seqs[0] == 1 and seqs == list(range(1, len(seqs) + 1)), seqs
        print(
            f"refused once ({refusals[0].split('MQTT: ')[-1][:90]}...), then {len(seqs)} labels, seq "
            f"1..{seqs[-1]}"
        )
    finally:
        if daemon.proc.poll() is None:
            daemon.kill()
        operator.close()
