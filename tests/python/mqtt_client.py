"""A synchronous wrapper around paho-mqtt 2.x for short, readable tests.

    c = Client(target, version=5).connect()
    c.subscribe("a/b", qos=1)
    c.publish("a/b", b"x", qos=1)
    msg = c.get()
"""

from __future__ import annotations

import itertools
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

import harness
import mqtt_raw

V311, V5 = 4, 5
PROTO = {V311: paho.MQTTv311, V5: paho.MQTTv5}

_counter = itertools.count(1)
_RUN = uuid.uuid4().hex[:6]


def uid(prefix: str = "t") -> str:
    """Unique id for client ids and topics (per process and per call)."""
    return f"{prefix}-{_RUN}-{os.getpid() % 10000}-{next(_counter)}"


@dataclass
class Target:
    """Where a test connects: ``host, port = target`` works."""

    host: str
    port: int
    kind: str = "jetmq"  # "jetmq" | "mosquitto"
    limits: dict = field(default_factory=dict)
    process: object = None  # the harness process (for RSS / liveness checks)

    def __iter__(self):
        return iter((self.host, self.port))

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def is_jetmq(self) -> bool:
        return self.kind == "jetmq"

    @property
    def is_mosquitto(self) -> bool:
        return self.kind == "mosquitto"

    def __str__(self) -> str:
        return f"{self.kind}@{self.host}:{self.port}"


@dataclass
class Msg:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int
    props: dict  # v5 properties by paho name (UserProperty -> list of pairs, SubscriptionIdentifier -> list)
    t: float = 0.0


@dataclass
class Connack:
    reason: int
    session_present: bool
    props: dict


@dataclass
class Disconnect:
    from_server: bool  # a DISCONNECT packet was received (v5); False: socket closed
    reason: int
    props: dict = field(default_factory=dict)  # v5 DISCONNECT properties (e.g. ServerReference)
    t: float = 0.0  # time.monotonic() when the client noticed


def props_dict(p: Properties | None) -> dict:
    if p is None:
        return {}
    out = {}
    for name in p.names.keys():
        attr = name.replace(" ", "")
        if hasattr(p, attr):
            out[attr] = getattr(p, attr)
    return out


def make_props(ptype: int, d: dict | None) -> Properties | None:
    if not d:
        return None
    p = Properties(ptype)
    for k, v in d.items():
        setattr(p, k, v)
    return p


class Client:
    """One paho client with a background network thread, collecting messages in a queue."""

    def __init__(
        self,
        target,
        client_id: str | None = None,
        version: int = V5,
        clean: bool = True,
        session_expiry: int | None = None,
        keepalive: int = 30,
        will: dict | None = None,
        username: str | None = None,
        password: str | None = None,
        connect_props: dict | None = None,
        max_inflight: int = 20,
        manual_ack: bool = False,
        tls_ca: str | None = None,
    ):
        """will: {"topic", "payload", "qos", "retain", "props" (v5 dict, e.g. WillDelayInterval)}"""
        self.host, self.port = tuple(target)
        self.version = version
        self.client_id = uid("c") if client_id is None else client_id
        self.clean = clean
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.connect_props = dict(connect_props or {})
        self.messages: "queue.Queue[Msg]" = queue.Queue()
        self.disconnects: "queue.Queue[Disconnect]" = queue.Queue()
        self._connacks: "queue.Queue[Connack]" = queue.Queue()
        self._subacks: dict[int, list[int]] = {}
        self._unsubacks: dict[int, list[int]] = {}
        self._pubacks: dict[int, int] = {}
        self._cv = threading.Condition()
        kw = {}
        if version == V311:
            kw["clean_session"] = clean
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=PROTO[version],
            reconnect_on_failure=False,
            manual_ack=manual_ack,
            **kw,
        )
        c.max_inflight_messages_set(max_inflight)
        if tls_ca is not None:
            # TLS with the server's certificate checked against ``tls_ca`` and the address.
            c.tls_set(ca_certs=tls_ca)
        c.max_queued_messages_set(0)
        if username is not None:
            c.username_pw_set(username, password)
        if will:
            c.will_set(
                will["topic"],
                will.get("payload", b""),
                will.get("qos", 0),
                will.get("retain", False),
                properties=make_props(PacketTypes.WILLMESSAGE, will.get("props")),
            )
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe
        c.on_publish = self._on_publish
        c.on_disconnect = self._on_disconnect
        self.paho = c
        self.connected = False
        # Packet ids of QoS 1/2 messages handed to the test whose PUBACK/PUBCOMP paho has not
        # sent yet (it sends it right after on_message returns, unless manual_ack).
        self._acks_due: set[int] = set()
        self._manual_ack = manual_ack
        if not manual_ack:
            c._send_puback = self._counting_ack(c._send_puback)
            c._send_pubcomp = self._counting_ack(c._send_pubcomp)

    def _counting_ack(self, send):
        def send_and_count(mid, *args, **kw):
            rc = send(mid, *args, **kw)
            with self._cv:
                self._acks_due.discard(mid)
                self._cv.notify_all()
            return rc

        return send_and_count

    # ------------------------------------------------------------- callbacks
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        ca = Connack(int(reason_code.value), bool(flags.session_present), props_dict(properties))
        self.connected = ca.reason == 0
        self._connacks.put(ca)

    def _on_message(self, client, userdata, m):
        if m.qos > 0 and not self._manual_ack:
            with self._cv:
                self._acks_due.add(m.mid)
        self.messages.put(
            Msg(m.topic, bytes(m.payload), m.qos, bool(m.retain), bool(m.dup), m.mid,
                props_dict(getattr(m, "properties", None)), time.monotonic())
        )

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cv:
            self._subacks[mid] = [int(rc.value) for rc in reason_codes]
            self._cv.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cv:
            self._unsubacks[mid] = [int(rc.value) for rc in reason_codes] if reason_codes else []
            self._cv.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._cv:
            self._pubacks[mid] = int(reason_code.value) if reason_code is not None else 0
            self._cv.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected = False
        self.disconnects.put(Disconnect(bool(flags.is_disconnect_packet_from_server), int(reason_code.value),
                                        props_dict(properties), time.monotonic()))
        with self._cv:
            self._cv.notify_all()

    def _wait(self, d: dict, key, timeout: float, what: str):
        with self._cv:
            ok = self._cv.wait_for(lambda: key in d or not self.connected, timeout)
            if key in d:
                return d.pop(key)
        if not ok:
            raise AssertionError(f"{self.client_id}: no {what} within {timeout}s")
        raise AssertionError(f"{self.client_id}: disconnected while waiting for {what}")

    # ------------------------------------------------------------- connection
    def connect(self, timeout: float = 10.0, expect: int | None = 0, host: str | None = None, port: int | None = None,
                clean: bool | None = None) -> "Client":
        """Connect and wait for CONNACK. ``expect`` is the required reason code (None: anything)."""
        self.connack = self.connect_raw(timeout, host, port, clean)
        if expect is not None:
            assert self.connack.reason == expect, f"{self.client_id}: CONNACK {self.connack.reason:#x}, expected {expect:#x}"
        return self

    def connect_raw(self, timeout: float = 10.0, host: str | None = None, port: int | None = None,
                    clean: bool | None = None) -> Connack:
        if host is not None:
            self.host = host
        if port is not None:
            self.port = port
        if clean is not None:
            self.clean = clean
            if self.version == V311:
                self.paho._clean_session = clean
        self.paho.loop_stop()
        kw = {}
        if self.version == V5:
            props = dict(self.connect_props)
            if self.session_expiry is not None:
                props["SessionExpiryInterval"] = self.session_expiry
            kw["clean_start"] = self.clean
            kw["properties"] = make_props(PacketTypes.CONNECT, props)
        while not self._connacks.empty():
            self._connacks.get_nowait()
        self.paho.connect(self.host, self.port, keepalive=self.keepalive, **kw)
        self.paho.loop_start()
        try:
            return self._connacks.get(timeout=timeout)
        except queue.Empty:
            d = self.last_disconnect(0)
            raise AssertionError(f"{self.client_id}: no CONNACK from {self.host}:{self.port} within {timeout}s"
                                 + (f" (disconnected: {d})" if d else "")) from None

    @property
    def session_present(self) -> bool:
        return self.connack.session_present

    def disconnect(self, reason: int | None = None, props: dict | None = None) -> None:
        """Normal DISCONNECT (v5: with reason code / properties)."""
        # paho queues the PUBACK/PUBCOMP right after on_message returns: wait for that, so that
        # a message the test just consumed is acknowledged before the DISCONNECT goes out
        # (no error if it does not happen: the connection may be going already)
        with self._cv:
            self._cv.wait_for(lambda: not self._acks_due or not self.connected, 2.0)
        if self.connected:
            kw = {}
            if self.version == V5:
                if reason is not None:
                    kw["reasoncode"] = paho.ReasonCode(PacketTypes.DISCONNECT, identifier=reason)
                if props:
                    kw["properties"] = make_props(PacketTypes.DISCONNECT, props)
            self.paho.disconnect(**kw)
            try:
                self.disconnects.get(timeout=5)
            except queue.Empty:
                pass
        self.paho.loop_stop()
        self.connected = False

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT (triggers the will)."""
        sock = self.paho.socket()
        self.paho.loop_stop()
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
        self.paho._sock = None
        self.connected = False

    close = abort

    def wait_disconnect(self, timeout: float = 10.0) -> Disconnect:
        try:
            return self.disconnects.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: still connected after {timeout}s") from None

    def last_disconnect(self, timeout: float = 0.0) -> Disconnect | None:
        try:
            return self.disconnects.get(timeout=timeout) if timeout else self.disconnects.get_nowait()
        except queue.Empty:
            return None

    # ------------------------------------------------------------- operations
    def subscribe(self, topic, qos: int = 0, no_local: bool = False, retain_as_published: bool = False,
                  retain_handling: int = 0, sub_id: int | None = None, props: dict | None = None,
                  timeout: float = 10.0) -> list[int]:
        """Subscribe one filter or a list of (filter, qos). Returns the SUBACK reason codes."""
        filters = topic if isinstance(topic, list) else [(topic, qos)]
        if self.version == V5:
            opts = [
                (f, SubscribeOptions(qos=q, noLocal=no_local, retainAsPublished=retain_as_published,
                                     retainHandling=retain_handling))
                for f, q in filters
            ]
            p = dict(props or {})
            if sub_id is not None:
                p["SubscriptionIdentifier"] = sub_id
            rc, mid = self.paho.subscribe(opts, properties=make_props(PacketTypes.SUBSCRIBE, p))
        else:
            rc, mid = self.paho.subscribe(filters)
        assert rc == paho.MQTT_ERR_SUCCESS, f"subscribe failed locally: {rc}"
        return self._wait(self._subacks, mid, timeout, "SUBACK")

    def unsubscribe(self, topic, timeout: float = 10.0) -> list[int]:
        rc, mid = self.paho.unsubscribe(topic)
        assert rc == paho.MQTT_ERR_SUCCESS, f"unsubscribe failed locally: {rc}"
        return self._wait(self._unsubacks, mid, timeout, "UNSUBACK")

    def publish(self, topic: str, payload=b"", qos: int = 0, retain: bool = False, props: dict | None = None,
                wait: bool = True, timeout: float = 10.0):
        """Publish; with wait=True returns the PUBACK/PUBREC/PUBCOMP reason code (0 for QoS 0)."""
        info = self.paho.publish(topic, payload, qos, retain, properties=make_props(PacketTypes.PUBLISH, props))
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise AssertionError(f"{self.client_id}: publish failed locally: {paho.error_string(info.rc)}")
        if not wait:
            return info
        if qos == 0:
            info.wait_for_publish(timeout)
            return 0
        return self._wait(self._pubacks, info.mid, timeout, f"ack for QoS {qos} publish")

    def pop_ack(self, mid: int):
        with self._cv:
            return self._pubacks.pop(mid, None)

    # ------------------------------------------------------------- receiving
    def get(self, timeout: float = 5.0) -> Msg:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: no message within {timeout}s") from None

    def expect(self, n: int, timeout: float = 10.0) -> list[Msg]:
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            try:
                out.append(self.messages.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"{self.client_id}: got {len(out)} of {n} messages within {timeout}s: "
                                     f"{[(m.topic, m.payload[:20]) for m in out]}") from None
        return out

    def expect_none(self, timeout: float = 1.0) -> None:
        try:
            m = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError(f"{self.client_id}: unexpected message {m.topic!r} {m.payload[:40]!r} (retain={m.retain})")

    def drain(self, timeout: float = 0.5) -> list[Msg]:
        out = []
        while True:
            try:
                out.append(self.messages.get(timeout=timeout))
            except queue.Empty:
                return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close_quietly()

    def close_quietly(self) -> None:
        try:
            if self.connected:
                self.paho.disconnect()
        except Exception:  # noqa: BLE001
            pass
        self.paho.loop_stop()
        try:
            s = self.paho.socket()
            if s is not None:
                s.close()
        except Exception:  # noqa: BLE001
            pass
        self.connected = False


# ----------------------------------------------------------------------------- shared checks


def assert_alive(target, version: int = V5, timeout: float = 10.0) -> None:
    """A fresh client can connect, subscribe, publish and receive on ``target``."""
    topic = uid("alive")
    sub = Client(target, version=version).connect(timeout=timeout)
    pub = Client(target, version=version).connect(timeout=timeout)
    try:
        assert sub.subscribe(topic, qos=1) == [1]
        pub.publish(topic, b"ping", qos=1, timeout=timeout)
        m = sub.get(timeout)
        assert (m.topic, m.payload) == (topic, b"ping")
    finally:
        sub.close_quietly()
        pub.close_quietly()
    proc = getattr(target, "process", None)
    if proc is not None and hasattr(proc, "alive"):
        assert proc.alive(), f"{proc} is no longer running"


def collect_group(members, n: int, timeout: float = 10.0, quiet: float = 1.0) -> list[list[Msg]]:
    """The messages each of ``members`` (say, a shared subscription group) receives: read until
    they have ``n`` between them or ``timeout`` passes, then until each has been quiet for
    ``quiet`` seconds, so that a late extra copy is counted too."""
    got: list[list[Msg]] = [[] for _ in members]

    def have_n() -> bool:
        for out, c in zip(got, members):
            try:
                while True:
                    out.append(c.messages.get_nowait())
            except queue.Empty:
                pass
        return sum(map(len, got)) >= n

    harness.poll_until(have_n, timeout)  # the callers' assertions say what is missing
    for out, c in zip(got, members):
        out.extend(c.drain(quiet))
    return got


def raw(target, version: int = V5, **kw) -> mqtt_raw.RawClient:
    return mqtt_raw.RawClient(*tuple(target), version=version, **kw)


class Tracker:
    """Keeps clients of one test and closes them at the end (see conftest fixture ``clients``)."""

    def __init__(self, target):
        self.target = target
        self._clients: list = []

    def __call__(self, target=None, **kw) -> Client:
        c = Client(target or self.target, **kw)
        self._clients.append(c)
        return c

    def connect(self, target=None, **kw) -> Client:
        return self(target, **kw).connect()

    def raw(self, target=None, version: int = V5, **kw) -> mqtt_raw.RawClient:
        r = raw(target or self.target, version, **kw)
        self._clients.append(r)
        return r

    def raw_connected(self, prefix: str, version: int = V5, target=None) -> mqtt_raw.RawClient:
        """A raw client past a successful CONNECT (clean session, client id from ``prefix``)."""
        r = self.raw(target, version)
        r.mqtt_connect(uid(prefix))
        return r

    def close_all(self) -> None:
        for c in self._clients:
            try:
                c.close_quietly() if isinstance(c, Client) else c.close()
            except Exception:  # noqa: BLE001
                pass
        self._clients.clear()
