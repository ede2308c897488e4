"""The daemon's MQTT link on a real broker: labels leave the outbox in order, whatever the network thread is
doing."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho
import pytest
from taxonedge.edge.service.config import MqttConfig
from taxonedge.edge.service.mqtt import MqttLink
from taxonedge.edge.service.outbox import Outbox

LABELS = 3000


def client(port: int, name: str) -> paho.Client:
    c = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=f"{name}-{time.monotonic_ns()}", protocol=paho.MQTTv5
    )
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def test_labels_keep_their_order_while_the_network_thread_is_busy(tmp_path, broker):
    """Labels are published (replayed by the sender thread, or offered as they are stored) while the
    network thread reads a flood of incoming messages and runs their callbacks. paho writes from the
    publishing thread unless told not to; two threads popping its
    packet queue reorder labels (seen: seq 2 before seq 1) or interleave their bytes."""
    received: list[int] = []
    done = threading.Event()

    def on_label(c, userdata, msg) -> None:
        received.append(int(msg.payload))
        if len(received) >= LABELS:
            done.set()

    subscriber = client(broker.port, "sub")
    subscriber.on_message = on_label
    subscriber.subscribe("t/labels", qos=1)
    outbox = Outbox(tmp_path / "o.sqlite")
    link = MqttLink(
        MqttConfig(port=broker.port),
        "link-test",
        outbox,
        "t/status",
        b"offline",
        on_connected=lambda: link.client.subscribe("t/cmd", qos=0),
        on_message=lambda *a: None,
    )
    flooder = client(broker.port, "flood")
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            flooder.publish("t/cmd", b"x" * 200, qos=0)
            time.sleep(0.0002)

    backlog = 500  # stored before the link starts, as after a restart: the sender replays these
    for i in range(backlog):
        outbox.put("t/labels", str(i).encode())
    link.start()
    try:
        assert link.connected.wait(10)
        # small label writes go out at once, not after the broker's delayed ACK of the previous packet
        assert link.client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        time.sleep(0.3)  # the link's subscription is in place
        threading.Thread(target=flood, daemon=True).start()
        for i in range(backlog, LABELS):
            # offered to the link as they are stored: published at once when next in line, never before an
            # older row (the backlog is still being replayed when the first of these come)
            link.notify_outbox(outbox.put("t/labels", str(i).encode()))
        assert done.wait(60), f"{len(received)} of {LABELS} labels arrived"
        assert received == list(range(LABELS))
        deadline = time.monotonic() + 10
        while outbox.depth() and time.monotonic() < deadline:  # every row leaves only on its PUBACK
            time.sleep(0.05)
        assert outbox.depth() == 0
    finally:
        stop.set()
        link.stop()
        for c in (subscriber, flooder):
            c.loop_stop()
            c.disconnect()
        outbox.close()


def test_a_label_offered_while_the_sender_holds_the_line_does_not_wait(tmp_path, broker):
    """The inference thread offers each label as it stores it; while the sender holds the publishing lock
    (as through a long replay after an outage) the offer returns at once and the sender publishes the row."""
    received: list[bytes] = []
    subscriber = client(broker.port, "sub2")
    subscriber.on_message = lambda c, u, msg: received.append(msg.payload)
    subscriber.subscribe("t/labels", qos=1)
    outbox = Outbox(tmp_path / "o.sqlite")
    link = MqttLink(
        MqttConfig(port=broker.port),
        "link-test-2",
        outbox,
        "t/status",
        b"offline",
        on_connected=lambda: None,
        on_message=lambda *a: None,
    )
    link.start()
    try:
        assert link.connected.wait(10)
        time.sleep(0.3)
        offered: list[bool] = []
        with link._send_lock:  # the sender, mid-replay
            row = outbox.put("t/labels", b"held")
            offer = threading.Thread(target=lambda: offered.append(link.notify_outbox(row)))
            offer.start()
            offer.join(5)
            assert not offer.is_alive(), "notify_outbox waited for the sender's lock"
            assert offered == [False]  # not sent live: the daemon keeps it out of its publish latency
            time.sleep(0.3)
            assert received == []  # nobody published it while the lock was held
        deadline = time.monotonic() + 10
        while (received != [b"held"] or outbox.depth()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert received == [b"held"] and outbox.depth() == 0
        # next in line with the line free: published by the offer itself
        assert link.notify_outbox(outbox.put("t/labels", b"live")) is True
        deadline = time.monotonic() + 10
        while received != [b"held", b"live"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert received == [b"held", b"live"]
    finally:
        link.stop()
        subscriber.loop_stop()
        subscriber.disconnect()
        outbox.close()


def until(condition: Callable[[], bool], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def labels_through_an_outage(
    tmp_path, broker, monkeypatch, protocol: str, expiry_s: float, outage_s: float, count: int = 5
) -> tuple[Outbox, list[tuple[bytes, int | None]]]:
    """Publish `count` labels while the broker is frozen (SIGSTOP: no PUBACK ever comes), kill it, restart it
    on the same port `outage_s` after the labels were stored, and let the link reconnect once a subscriber is
    in place. A label stored after the reconnect comes last: once it arrived, any re-sent one has too.
    Returns the outbox and what the subscriber got: (payload, MessageExpiryInterval)."""
    outbox = Outbox(tmp_path / "o.sqlite")
    link = MqttLink(
        MqttConfig(port=broker.port, protocol=protocol),
        f"link-{protocol}",
        outbox,
        "t/status",
        b"offline",
        on_connected=lambda: None,
        on_message=lambda *a: None,
    )
    # mosquitto runs without persistence: the subscriber must be back before the link re-sends, so the
    # link's reconnect waits at this gate (closed during the outage).
    gate = threading.Event()
    gate.set()
    real_connect = link.client.connect
    monkeypatch.setattr(link.client, "connect", lambda *a, **kw: gate.wait(60) and real_connect(*a, **kw))
    received: list[tuple[bytes, int | None]] = []
    subscriber = None
    link.start()
    try:
        assert link.connected.wait(10)
        gate.clear()
        os.kill(broker.process.pid, signal.SIGSTOP)
        stored_at = time.time()
        for i in range(count):
            link.notify_outbox(outbox.put("t/labels", str(i).encode(), expiry_s=expiry_s))
        assert until(lambda: link.unacked() == count), "the labels were not handed to paho"
        broker.process.kill()  # SIGKILL ends a stopped process too
        broker.process.wait()
        broker.process = None
        assert until(lambda: not link.connected.is_set()), "the link did not notice the broker died"
        time.sleep(max(0.0, stored_at + outage_s - time.time()))
        broker.start()
        subscribed = threading.Event()
        subscriber = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"sub-{time.monotonic_ns()}", protocol=paho.MQTTv5
        )
        subscriber.on_subscribe = lambda *a: subscribed.set()
        subscriber.on_message = lambda c, u, msg: received.append(
            (msg.payload, getattr(msg.properties, "MessageExpiryInterval", None))
        )
        subscriber.connect("127.0.0.1", broker.port)
        subscriber.loop_start()
        subscriber.subscribe("t/labels", qos=1)
        assert subscribed.wait(10)
        gate.set()
        assert link.connected.wait(30), "the link did not reconnect"
        link.notify_outbox(outbox.put("t/labels", b"after", expiry_s=60))
        assert until(lambda: any(payload == b"after" for payload, _ in received)), received
        assert until(lambda: outbox.depth() == 0 and link.unacked() == 0), (outbox.depth(), link.unacked())
        return outbox, received
    finally:
        gate.set()
        link.stop()
        if subscriber is not None:
            subscriber.loop_stop()
            subscriber.disconnect()


@pytest.mark.parametrize("protocol", ["v5", "v311"])
def test_labels_that_expired_in_flight_are_not_resent_after_the_outage(
    tmp_path, broker, monkeypatch, protocol
):
    """paho re-sends its unacknowledged labels on reconnect with their original expiry, so the broker took
    long-expired labels as fresh while the outbox counted them as expired. Expired ones are dropped instead
    (MQTT 3.1.1 has no expiry property: dropping them matters all the more)."""
    outbox, received = labels_through_an_outage(
        tmp_path, broker, monkeypatch, protocol, expiry_s=1.5, outage_s=4
    )
    assert [payload for payload, _ in received] == [b"after"]
    assert outbox.counter("expired") == 5
    assert outbox.depth() == 0
    outbox.close()


def test_labels_in_flight_through_an_outage_carry_their_remaining_life(tmp_path, broker, monkeypatch):
    """Unexpired labels in flight are re-sent after the outage, in order, with the life they have left, not
    the full expiry they were first sent with (the broker would keep them longer than the label lives)."""
    outbox, received = labels_through_an_outage(tmp_path, broker, monkeypatch, "v5", expiry_s=60, outage_s=4)
    assert [payload for payload, _ in received] == [b"0", b"1", b"2", b"3", b"4", b"after"]
    for payload, interval in received[:5]:
        # 4 s or more went by: at most 56 s left (the broker may take off a second of its own)
        assert interval is not None and 1 <= interval <= 56, (payload, interval)
    assert outbox.counter("expired") == 0
    outbox.close()
