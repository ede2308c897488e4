"""The daemon's MQTT side: one paho client, its network loop, and the sender that drains the outbox.

Labels never go straight to paho (its queue drops the newest message when full and forgets everything
on exit): outbox rows are published in id order while connected, at most `window` of them unacknowledged,
and a row is deleted only when its PUBACK arrives. paho itself re-sends its unacknowledged messages after a
reconnect, less the labels that expired during the outage (deleted from the outbox and counted as expired);
the rest carry their remaining life as their expiry. After a restart the sender replays whatever the outbox
still holds.

A row just stored is published by the thread that stored it when nothing older is waiting (the steady
state: one thread hand-off and one outbox read less per label); otherwise the sender thread publishes it
in its turn. One lock keeps the two from overtaking each other.

The network loop is ours (not `loop_start`) so that a refused connection is reported with what to fix
(wrong password, ACL, TLS certificate, host down) and retried with backoff, instead of being swallowed.
It is also the only thread that writes to the socket (see `on_socket_register_write` below).
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import MqttConfig
from .osthread import start_thread
from .outbox import Outbox, OutboxMessage

log = logging.getLogger(__name__)

# How long before a lost connection a broker's PUBACK may still be unsaved: mosquitto acknowledges in the
# network-loop pass that reads a message and saves (autosave_on_changes) at the end of it, milliseconds
# later; 2 s covers a slow disk by far, and costs only duplicates (de-duplicated by msg_id).
RESEND_WINDOW_S = 2.0

# Hints for the refusals an operator can fix, by CONNACK reason (v5 names; 3.1.1 codes map onto them).
_FIXES = {
    "Bad user name or password": "check mqtt.username and the password file / environment variable",
    # mosquitto also answers a wrong password with "Not authorized" under MQTT v5.
    "Not authorized": (
        "the broker refuses this client: check mqtt.username and the password (file, "
        "credential or environment variable), and the broker's password_file and acl_file"
    ),
    "Client identifier not valid": "set a different mqtt.client_id",
    "Server unavailable": "the broker is up but not accepting clients; it is retried",
    "Bad authentication method": "check mqtt.username / password and the broker's auth setup",
}


def client_id_for(cfg: MqttConfig, device: str) -> str:
    """A client id unique per process, so that two daemons (or a restart overlap) never kick each other
    off."""
    return cfg.client_id or f"taxonedge-{device}-{uuid.uuid4().hex[:8]}"


def describe_connect_error(exc: BaseException, cfg: MqttConfig) -> str:
    """One line saying what went wrong connecting and what to check."""
    where = f"{cfg.host}:{cfg.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate of {where} does not verify ({exc.verify_message}): check mqtt.tls.ca_file "
            "and that the broker certificate names this host"
        )
    if isinstance(exc, ssl.SSLError):
        return (
            f"TLS handshake with {where} failed ({exc.reason or exc}): check mqtt.tls and the broker's "
            "listener"
        )
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"nothing listens on {where} (connection refused): is the broker running, are "
            "mqtt.host/port right?"
        )
    if isinstance(exc, TimeoutError):
        return f"connecting to {where} timed out: check the network and mqtt.host"
    return f"cannot connect to {where}: {exc}"


def describe_dropped(cfg: MqttConfig) -> str:
    """One line for a connection the broker closed before answering CONNECT."""
    where = f"{cfg.host}:{cfg.port}"
    if cfg.tls is not None:
        return (
            f"the broker at {where} closed the connection before accepting it: it most likely refused "
            "the client certificate: check mqtt.tls.cert_file/key_file (signed by the broker's CA, "
            "not expired) and the broker log"
        )
    return (
        f"the broker at {where} closed the connection before accepting it: is it a TLS listener "
        "(then set mqtt.tls)? check the broker log"
    )


class MqttLink:
    """Connects, keeps connected, publishes from the outbox, hands received messages to `on_message`.
    (Over 300 lines: the connect loop, the sender and paho's callbacks share one send lock and one map of
    labels in flight, which a split would have to pass around.)

    `on_connected()` runs (on the network thread) after every successful CONNACK: subscribe and republish
    retained state there. `on_message(topic, payload, properties)` must only enqueue work.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        outbox: Outbox,
        will_topic: str,
        will_payload: bytes,
        on_connected: Callable[[], None],
        on_message: Callable[[str, bytes, Any], None],
        window: int = 50,
    ):
        self.cfg = cfg
        self.outbox = outbox
        self.window = window
        self.v5 = cfg.protocol == "v5"
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
        )
        self.client.max_inflight_messages_set(window)
        will_props = None
        if self.v5:
            will_props = Properties(PacketTypes.WILLMESSAGE)
            will_props.WillDelayInterval = cfg.will_delay_s
        self.client.will_set(will_topic, will_payload, qos=1, retain=True, properties=will_props)
        if cfg.username is not None:
            self.client.username_pw_set(cfg.username, cfg.password())
        if cfg.tls is not None:
            self.client.tls_set(
                ca_certs=str(cfg.tls.ca_file),
                certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
            )
        # Every socket write happens on the network thread. Without a loop_start() thread paho writes from
        # whichever thread calls publish(), and two threads popping its packet queue reorder packets (seen:
        # label seq 2 before seq 1) or interleave their bytes. With this hook set (paho's external-loop API)
        # publish() only queues and wakes the network loop through paho's socket pair.
        self.client.on_socket_register_write = lambda client, userdata, sock: None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self._on_connected = on_connected
        self._on_message_cb = on_message
        self.connected = threading.Event()
        self.last_error: str | None = None
        self.connects = 0
        self.disconnects = 0
        self.refused_acks = 0
        self._connack = False
        self._accepted = False  # CONNACK said yes; `connected` follows once paho has re-sent its queue
        self._backoff = 0.5
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._acks: queue.SimpleQueue[tuple[int, bool, str]] = queue.SimpleQueue()
        self._send_lock = threading.Lock()  # held while publishing rows and settling their acks
        self._sent: dict[int, OutboxMessage] = {}  # paho mid -> outbox row (under _send_lock)
        self._last_sent_id = 0  # (under _send_lock)
        # Rows the broker acknowledged lately (time.monotonic() of the PUBACK, row; under _send_lock): a
        # broker
        # that crashes acknowledges a message before it saves it, so after a lost connection the ones acked
        # within RESEND_WINDOW_S of the loss are sent again (at least once: consumers de-duplicate by msg_id).
        self._acked: deque[tuple[float, OutboxMessage]] = deque()
        self._resend: list[OutboxMessage] = []  # (under _send_lock) to send again once reconnected
        self.resent = 0
        self._warned_paho = False  # paho's resend queue not found (a newer paho): said once
        self._threads: list[threading.Thread] = []

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        for name, target in (("mqtt-net", self._network_loop), ("mqtt-send", self._send_loop)):
            self._threads.append(start_thread(target, name))

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and end the threads."""
        self._stop.set()
        self._wake.set()
        self.client.disconnect()  # returns an error code (not an exception) when already disconnected
        for thread in self._threads:
            thread.join(timeout=3)

    def notify_outbox(self, message: OutboxMessage | None = None) -> bool:
        """A new row is in the outbox: published here and now when it is next in line (True), else by the
        sender (False)."""
        # Never wait for the lock: the sender may hold it through a long replay, and the inference thread
        # calling this must not stall behind it (the row is stored; the sender gets to it in its turn).
        if message is not None and self.connected.is_set() and self._send_lock.acquire(blocking=False):
            try:
                if (
                    message.id == self._last_sent_id + 1
                    and len(self._sent) < self.window
                    and self.connected.is_set()
                    and self._publish_row(message)
                ):
                    return True
            finally:
                self._send_lock.release()
        self._wake.set()
        return False

    def unacked(self) -> int:
        return len(self._sent)

    # ---- publishing ------------------------------------------------------------------------------
    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Any = None
    ) -> None:
        """A control-plane message (not a label). While disconnected paho queues QoS 1 in memory."""
        self.client.publish(
            topic, payload, qos=qos, retain=retain, properties=properties if self.v5 else None
        )

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        # While disconnected paho answers MQTT_ERR_NO_CONN and nothing happens: on_connected redoes it.
        self.client.subscribe(topic_filter, qos=qos)

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            with self._send_lock:
                self._drain_acks()
                if self._resend and self.connected.is_set():
                    self._send_again()
                while self.connected.is_set() and len(self._sent) < self.window and not self._stop.is_set():
                    batch = self.outbox.pending(self._last_sent_id, limit=self.window - len(self._sent))
                    if not batch or not all(self._publish_row(message) for message in batch):
                        break
                    self._drain_acks()

    def _send_again(self) -> None:
        """The rows acknowledged just before the connection was lost (under _send_lock), before new ones."""
        rows, self._resend = self._resend, []
        now = time.time()
        for row in rows:
            if row.expires_at is None or row.expires_at >= now:
                self._publish_row(row, again=True)
                self.resent += 1
        if rows:
            log.info(
                "sent %d label(s) again that the broker acknowledged within %.0f s before the connection "
                "was lost (a crashed broker may not have saved them)",
                len(rows),
                RESEND_WINDOW_S,
            )

    def _publish_row(self, message: OutboxMessage, again: bool = False) -> bool:
        """Hand one outbox row to paho (under _send_lock); False when paho refused it (it stays stored)."""
        props = None
        if self.v5 and message.expires_at is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = message.remaining_s()
        info = self.client.publish(message.topic, message.payload, qos=message.qos, properties=props)
        if info.rc != paho.MQTT_ERR_SUCCESS and info.rc != paho.MQTT_ERR_NO_CONN:
            log.warning("publishing outbox row %d failed: %s", message.id, paho.error_string(info.rc))
            return False
        self._sent[info.mid] = message
        if not again:
            self._last_sent_id = message.id
        return True

    def _drain_acks(self) -> None:
        """Settle the PUBACKs that came in (under _send_lock, so that every mid is recorded before its
        ack)."""
        acked: list[int] = []
        while True:
            try:
                mid, ok, reason = self._acks.get_nowait()
            except queue.Empty:
                break
            row = self._sent.pop(mid, None)
            if row is None:
                continue
            if ok:
                acked.append(row.id)
                self._acked.append((time.monotonic(), row))
            else:
                # Kept in the outbox: it is replayed on the next start, after the broker's ACL is fixed.
                self.refused_acks += 1
                log.error(
                    "the broker refused label row %d (%s): check the ACL for this client's topics",
                    row.id,
                    reason,
                )
        self.outbox.ack(*acked)
        horizon = time.monotonic() - RESEND_WINDOW_S
        while self._acked and self._acked[0][0] < horizon:
            self._acked.popleft()

    # ---- network loop ----------------------------------------------------------------------------
    def _network_loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            self._backoff = backoff
            try:
                self.client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
            except (OSError, ssl.SSLError) as exc:  # ssl.SSLError is an OSError; named for the reader
                self._report(describe_connect_error(exc, self.cfg), backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self._no_delay()
            started = time.monotonic()
            self._connack = False
            while not self._stop.is_set():
                rc = self.client.loop(timeout=0.2)
                if rc != paho.MQTT_ERR_SUCCESS:
                    break
                if self._accepted and not self.connected.is_set():
                    # Only now, after the loop that handled CONNACK re-sent paho's unacknowledged labels,
                    # may the sender add new ones: otherwise a new label could overtake an older one.
                    self.connected.set()
                    self._wake.set()
            self._accepted = False
            self.connected.clear()
            if not self._stop.is_set():
                self._keep_recent_acks()
            if self._stop.is_set():
                # Let paho send the DISCONNECT queued by stop().
                self.client.loop(timeout=0.2)
                return
            if not self._connack:
                # Dropped without any CONNACK: a TLS broker does this when it rejects the client certificate.
                self._report(describe_dropped(self.cfg), backoff)
            if self.connects and time.monotonic() - started > 10:
                backoff = 0.5
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)

    def _keep_recent_acks(self) -> None:
        """The connection was lost: what the broker acknowledged within RESEND_WINDOW_S goes out again."""
        with self._send_lock:
            self._drain_acks()
            horizon = time.monotonic() - RESEND_WINDOW_S
            seen = {row.id for row in self._resend}
            self._resend += [row for at, row in self._acked if at >= horizon and row.id not in seen]
            self._acked.clear()

    def _no_delay(self) -> None:
        """Labels are small writes that must go out at once: with Nagle's algorithm on, a label written while
        the broker's ACK of a QoS 0 message (stats) is still delayed waits for it (seen: 8-20 ms, p99)."""
        sock = self.client.socket()
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:  # not TCP (a unix socket): nothing to switch off
                log.debug("TCP_NODELAY not set: %s", exc)

    def _report(self, message: str, backoff: float) -> None:
        if message != self.last_error:
            log.error("MQTT: %s (retrying with backoff, now %.1f s)", message, backoff)
        self.last_error = message

    # ---- paho callbacks (network thread: never block, never raise) -------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connack = True
        if reason.is_failure:
            name = str(reason)
            fix = _FIXES.get(name, "check the broker log")
            self._report(
                f"the broker at {self.cfg.host}:{self.cfg.port} refused the connection: {name}: {fix}",
                self._backoff,
            )
            return
        self.connects += 1
        self.last_error = None
        log.info("MQTT connected to %s:%d (%s)", self.cfg.host, self.cfg.port, self.cfg.protocol)
        self._accepted = True
        try:
            self._settle_in_flight()
        except Exception:  # noqa: BLE001 - an exception here would kill paho's network thread
            log.exception("settling the labels in flight failed; paho re-sends them as they are")
        try:
            self._on_connected()
        except Exception:  # noqa: BLE001 - an exception here would kill paho's network thread
            log.exception("on-connect handler failed")

    def _settle_in_flight(self) -> None:
        """Drop the in-flight labels that expired during the outage and give the rest their remaining life.

        Runs in on_connect, which paho calls just before it re-sends its unacknowledged messages with their
        original properties: left alone, an expired label would go out with its full expiry (the broker
        takes it as fresh) while the outbox counts it as expired. Taking _send_lock on the network thread is
        safe: its holders (sender, notify_outbox) never wait for this thread; publish() only queues.
        """
        with self._send_lock:
            self._drain_acks()  # a PUBACK that came in before the drop: delivered, not expired
            if not self._sent:
                return
            queue_and_lock = self._resend_queue()
            if queue_and_lock is None:
                return
            out, mutex = queue_and_lock
            now = time.time()
            expired = [
                mid for mid, row in self._sent.items() if row.expires_at is not None and row.expires_at < now
            ]
            with mutex:
                for mid in expired:
                    out.pop(mid, None)
                if self.v5:
                    for mid, row in self._sent.items():
                        if mid not in out or row.expires_at is None:
                            continue
                        if out[mid].properties is None:
                            out[mid].properties = Properties(PacketTypes.PUBLISH)
                        out[mid].properties.MessageExpiryInterval = row.remaining_s(now)
            rows = [self._sent.pop(mid).id for mid in expired]
            if rows:
                log.info("%d label(s) expired during the outage: not re-sent", len(rows))
            self.outbox.expire(*rows)

    def _resend_queue(self) -> tuple[Any, Any] | None:
        """paho's unacknowledged messages (mid -> MQTTMessage, in resend order) and their lock; None (said
        once) where a paho version lacks them. paho has no public way to edit what it re-sends
        (drop_out_messages() takes everything, and publishing again would reorder), hence the private
        names."""
        out = getattr(self.client, "_out_messages", None)
        mutex = getattr(self.client, "_out_message_mutex", None)
        if out is not None and mutex is not None:
            return out, mutex
        if not self._warned_paho:
            self._warned_paho = True
            log.warning(
                "this paho version has no _out_messages: labels in flight across a reconnect are "
                "re-sent even when expired, with their original expiry"
            )
        return None

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._accepted = False
        if self.connected.is_set() and not self._stop.is_set():
            self.disconnects += 1
            log.warning(
                "MQTT disconnected from %s:%d (%s); the outbox keeps labels until it is back",
                self.cfg.host,
                self.cfg.port,
                reason,
            )
        self.connected.clear()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._acks.put((mid, not reason.is_failure, str(reason)))
        self._wake.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            self._on_message_cb(message.topic, message.payload, getattr(message, "properties", None))
        except Exception:  # noqa: BLE001
            log.exception("dropping an incoming message on %r", getattr(message, "_topic", b"?"))
