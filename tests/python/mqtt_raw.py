"""A tiny MQTT 3.1.1 / 5.0 packet encoder/decoder and a raw-socket client.

Used where a client library cannot (or will not) produce the bytes a test needs:
exact flows, malformed packets, protocol violations, slow readers/writers.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from dataclasses import dataclass, field

# packet types
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15

PACKET_NAMES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP",
    8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP",
    14: "DISCONNECT", 15: "AUTH",
}

V311, V5 = 4, 5

# ----------------------------------------------------------------------------- properties

_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
PROPS = {
    0x01: ("PayloadFormatIndicator", _BYTE),
    0x02: ("MessageExpiryInterval", _U32),
    0x03: ("ContentType", _STR),
    0x08: ("ResponseTopic", _STR),
    0x09: ("CorrelationData", _BIN),
    0x0B: ("SubscriptionIdentifier", _VARINT),
    0x11: ("SessionExpiryInterval", _U32),
    0x12: ("AssignedClientIdentifier", _STR),
    0x13: ("ServerKeepAlive", _U16),
    0x15: ("AuthenticationMethod", _STR),
    0x16: ("AuthenticationData", _BIN),
    0x17: ("RequestProblemInformation", _BYTE),
    0x18: ("WillDelayInterval", _U32),
    0x19: ("RequestResponseInformation", _BYTE),
    0x1A: ("ResponseInformation", _STR),
    0x1C: ("ServerReference", _STR),
    0x1F: ("ReasonString", _STR),
    0x21: ("ReceiveMaximum", _U16),
    0x22: ("TopicAliasMaximum", _U16),
    0x23: ("TopicAlias", _U16),
    0x24: ("MaximumQoS", _BYTE),
    0x25: ("RetainAvailable", _BYTE),
    0x26: ("UserProperty", _PAIR),
    0x27: ("MaximumPacketSize", _U32),
    0x28: ("WildcardSubscriptionAvailable", _BYTE),
    0x29: ("SubscriptionIdentifierAvailable", _BYTE),
    0x2A: ("SharedSubscriptionAvailable", _BYTE),
}
PROP_IDS = {name: (pid, typ) for pid, (name, typ) in PROPS.items()}
_MULTI = {"UserProperty", "SubscriptionIdentifier"}


def varint(n: int) -> bytes:
    if n < 0 or n > 268_435_455:
        raise ValueError(n)
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    mult, value = 1, 0
    for i in range(4):
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        value += (b & 0x7F) * mult
        if not b & 0x80:
            return value, pos
        mult *= 128
    raise ValueError("malformed varint")


def mqtt_str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("!H", len(b)) + b


def encode_props(props) -> bytes:
    """props: dict name -> value (lists allowed for UserProperty/SubscriptionIdentifier) or list of (name, value)."""
    if props is None:
        return b"\x00"
    items = props.items() if isinstance(props, dict) else props
    body = bytearray()
    for name, value in items:
        pid, typ = PROP_IDS[name]
        values = value if (name in _MULTI and isinstance(value, list)) else [value]
        for v in values:
            body += varint(pid)
            if typ == _BYTE:
                body += bytes([v])
            elif typ == _U16:
                body += struct.pack("!H", v)
            elif typ == _U32:
                body += struct.pack("!I", v)
            elif typ == _VARINT:
                body += varint(v)
            elif typ in (_STR, _BIN):
                body += mqtt_str(v)
            elif typ == _PAIR:
                body += mqtt_str(v[0]) + mqtt_str(v[1])
    return varint(len(body)) + bytes(body)


def decode_props(data: bytes, pos: int) -> tuple[dict, int]:
    length, pos = read_varint(data, pos)
    end = pos + length
    props: dict = {}
    while pos < end:
        pid, pos = read_varint(data, pos)
        name, typ = PROPS.get(pid, (f"0x{pid:02x}", None))
        if typ == _BYTE:
            v = data[pos]
            pos += 1
        elif typ == _U16:
            (v,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif typ == _U32:
            (v,) = struct.unpack_from("!I", data, pos)
            pos += 4
        elif typ == _VARINT:
            v, pos = read_varint(data, pos)
        elif typ in (_STR, _BIN):
            (ln,) = struct.unpack_from("!H", data, pos)
            v = bytes(data[pos + 2 : pos + 2 + ln])
            pos += 2 + ln
            if typ == _STR:
                v = v.decode("utf-8", "replace")
        elif typ == _PAIR:
            (ln,) = struct.unpack_from("!H", data, pos)
            k = bytes(data[pos + 2 : pos + 2 + ln]).decode("utf-8", "replace")
            pos += 2 + ln
            (ln,) = struct.unpack_from("!H", data, pos)
            val = bytes(data[pos + 2 : pos + 2 + ln]).decode("utf-8", "replace")
            pos += 2 + ln
            v = (k, val)
        else:
            raise ValueError(f"unknown property id 0x{pid:02x}")
        if name in _MULTI:
            props.setdefault(name, []).append(v)
        else:
            props[name] = v
    return props, end


# ----------------------------------------------------------------------------- encoders


def fixed(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + varint(len(body)) + body


def connect(
    client_id: str | bytes = "",
    version: int = V311,
    clean: bool = True,
    keepalive: int = 60,
    will: dict | None = None,
    username: str | None = None,
    password: bytes | None = None,
    props=None,
    protocol_name: bytes = b"MQTT",
    reserved_flag: bool = False,
) -> bytes:
    """will: {"topic", "payload", "qos", "retain", "props"(v5)}"""
    flags = 0
    if clean:
        flags |= 0x02
    if will:
        flags |= 0x04 | (will.get("qos", 0) << 3) | (0x20 if will.get("retain") else 0)
    if password is not None:
        flags |= 0x40
    if username is not None:
        flags |= 0x80
    if reserved_flag:
        flags |= 0x01
    body = mqtt_str(protocol_name) + bytes([version, flags]) + struct.pack("!H", keepalive)
    if version == V5:
        body += encode_props(props or {})
    body += mqtt_str(client_id)
    if will:
        if version == V5:
            body += encode_props(will.get("props") or {})
        body += mqtt_str(will["topic"]) + mqtt_str(will.get("payload", b""))
    if username is not None:
        body += mqtt_str(username)
    if password is not None:
        body += mqtt_str(password)
    return fixed(CONNECT, 0, body)


def publish(
    topic: str | bytes,
    payload: bytes = b"",
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int | None = None,
    version: int = V311,
    props=None,
) -> bytes:
    flags = (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = mqtt_str(topic)
    if qos > 0:
        body += struct.pack("!H", packet_id if packet_id is not None else 1)
    if version == V5:
        body += encode_props(props or {})
    return fixed(PUBLISH, flags, body + payload)


def ack(ptype: int, packet_id: int, version: int = V311, reason: int | None = None, props=None) -> bytes:
    """PUBACK / PUBREC / PUBREL / PUBCOMP."""
    body = struct.pack("!H", packet_id)
    if version == V5 and (reason or props):
        body += bytes([reason or 0])
        if props:
            body += encode_props(props)
    return fixed(ptype, 0x02 if ptype == PUBREL else 0, body)


def subscribe(packet_id: int, filters, version: int = V311, props=None, flags: int = 0x02) -> bytes:
    """filters: list of (filter, options byte) - options = qos | nl<<2 | rap<<3 | rh<<4."""
    body = struct.pack("!H", packet_id)
    if version == V5:
        body += encode_props(props or {})
    for f, opts in filters:
        body += mqtt_str(f) + bytes([opts])
    return fixed(SUBSCRIBE, flags, body)


def unsubscribe(packet_id: int, filters, version: int = V311) -> bytes:
    body = struct.pack("!H", packet_id)
    if version == V5:
        body += b"\x00"
    for f in filters:
        body += mqtt_str(f)
    return fixed(UNSUBSCRIBE, 0x02, body)


def pingreq() -> bytes:
    return b"\xc0\x00"


def disconnect(version: int = V311, reason: int = 0, props=None) -> bytes:
    if version == V5 and (reason or props):
        return fixed(DISCONNECT, 0, bytes([reason]) + encode_props(props or {}))
    return b"\xe0\x00"


# ----------------------------------------------------------------------------- decoding


@dataclass
class Packet:
    type: int
    flags: int
    body: bytes
    version: int = V311
    # parsed fields (depending on type)
    packet_id: int | None = None
    reason: int | None = None  # CONNACK rc, PUBACK.. rc, DISCONNECT rc
    session_present: bool | None = None
    props: dict = field(default_factory=dict)
    reasons: list[int] = field(default_factory=list)  # SUBACK / UNSUBACK
    topic: bytes | None = None
    payload: bytes | None = None

    @property
    def name(self) -> str:
        return PACKET_NAMES.get(self.type, f"type{self.type}")

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 0x03

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def retain(self) -> bool:
        return bool(self.flags & 0x01)

    def __repr__(self) -> str:
        extra = []
        for k in ("packet_id", "reason", "session_present", "topic", "reasons"):
            v = getattr(self, k)
            if v not in (None, []):
                extra.append(f"{k}={v!r}")
        if self.props:
            extra.append(f"props={self.props!r}")
        if self.payload is not None:
            extra.append(f"payload={self.payload[:40]!r}{'...' if len(self.payload) > 40 else ''}")
        return f"<{self.name} {' '.join(extra)}>"


def parse(ptype: int, flags: int, body: bytes, version: int) -> Packet:
    p = Packet(ptype, flags, bytes(body), version)
    b = p.body
    if ptype == CONNACK:
        p.session_present = bool(b[0] & 1)
        p.reason = b[1]
        if version == V5 and len(b) > 2:
            p.props, _ = decode_props(b, 2)
    elif ptype == PUBLISH:
        (tl,) = struct.unpack_from("!H", b, 0)
        p.topic = b[2 : 2 + tl]
        pos = 2 + tl
        if p.qos > 0:
            (p.packet_id,) = struct.unpack_from("!H", b, pos)
            pos += 2
        if version == V5:
            p.props, pos = decode_props(b, pos)
        p.payload = b[pos:]
    elif ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        (p.packet_id,) = struct.unpack_from("!H", b, 0)
        p.reason = b[2] if len(b) > 2 else 0
        if version == V5 and len(b) > 3:
            p.props, _ = decode_props(b, 3)
    elif ptype in (SUBACK, UNSUBACK):
        (p.packet_id,) = struct.unpack_from("!H", b, 0)
        pos = 2
        if version == V5:
            p.props, pos = decode_props(b, pos)
        p.reasons = list(b[pos:])
    elif ptype == DISCONNECT:
        p.reason = b[0] if len(b) >= 1 else 0
        if version == V5 and len(b) > 1:
            p.props, _ = decode_props(b, 1)
    return p


class Closed(Exception):
    """The peer closed the connection."""


class RawClient:
    """A blocking MQTT connection over a plain socket, for byte-exact tests."""

    def __init__(self, host: str, port: int, version: int = V311, timeout: float = 5.0, rcvbuf: int | None = None):
        self.version = version
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.closed = False
        self._next_id = 0

    def next_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    # -- io
    def send(self, data: bytes) -> bool:
        """Send bytes; False if the peer has already closed/reset the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.closed = True
            return False
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET):
                self.closed = True
                return False
            raise

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from server")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no data from server") from None
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.closed = True
            raise Closed()
        self.buf += chunk

    def recv_packet(self, timeout: float | None = None) -> Packet:
        """Next packet; raises Closed on EOF/reset, TimeoutError if nothing arrives."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if len(self.buf) >= 2:
                try:
                    length, pos = read_varint(self.buf, 1)
                except ValueError as e:
                    if "truncated" not in str(e):
                        raise
                else:
                    if len(self.buf) >= pos + length:
                        first = self.buf[0]
                        body = bytes(self.buf[pos : pos + length])
                        del self.buf[: pos + length]
                        return parse(first >> 4, first & 0x0F, body, self.version)
            self._fill(deadline)

    def expect(self, ptype: int, timeout: float | None = None) -> Packet:
        p = self.recv_packet(timeout)
        assert p.type == ptype, f"expected {PACKET_NAMES[ptype]}, got {p!r}"
        return p

    def wait_closed(self, timeout: float) -> list[Packet]:
        """Read until the server closes the connection; returns packets received meanwhile.

        Raises AssertionError if the connection is still open after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        got: list[Packet] = []
        while True:
            try:
                got.append(self.recv_packet(max(0.0, deadline - time.monotonic())))
            except Closed:
                return got
            except TimeoutError:
                raise AssertionError(f"server did not close the connection within {timeout}s (received {got})") from None

    def receive_for(self, seconds: float) -> list[Packet]:
        """Every packet that arrives within ``seconds``, answering QoS 1/2 deliveries the way
        a client does (PUBACK, PUBREC, PUBCOMP)."""
        got: list[Packet] = []
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                p = self.recv_packet(max(0.01, remaining))
            except TimeoutError:
                break
            got.append(p)
            if p.type == PUBLISH and p.qos:
                self.send(ack(PUBACK if p.qos == 1 else PUBREC, p.packet_id, self.version))
            elif p.type == PUBREL:
                self.send(ack(PUBCOMP, p.packet_id, self.version))
        return got

    def is_open(self) -> bool:
        """True if the server has not closed the connection (non-destructive probe)."""
        if self.closed:
            return False
        try:
            r, _, _ = select.select([self.sock], [], [], 0)
            if not r:
                return True
            data = self.sock.recv(65536, socket.MSG_PEEK)
            return bool(data)
        except OSError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- conveniences
    def connect(self, client_id: str | bytes = "", **kw) -> Packet:
        """Send CONNECT and return the CONNACK (does not assert success)."""
        kw.setdefault("version", self.version)
        self.send(connect(client_id, **kw))
        return self.expect(CONNACK)

    def mqtt_connect(self, client_id: str | bytes, **kw) -> Packet:
        ca = self.connect(client_id, **kw)
        assert ca.reason == 0, f"CONNACK refused: {ca!r}"
        return ca

    def subscribe(self, filters, props=None, timeout: float | None = None) -> Packet:
        """filters: list of (filter, options) or a single filter string (QoS 0)."""
        if isinstance(filters, (str, bytes)):
            filters = [(filters, 0)]
        pid = self.next_id()
        self.send(subscribe(pid, filters, self.version, props))
        p = self.expect(SUBACK, timeout)
        assert p.packet_id == pid, p
        return p

    def publish(self, topic, payload: bytes = b"", qos: int = 0, retain: bool = False, props=None,
                packet_id: int | None = None, dup: bool = False) -> int | None:
        pid = None
        if qos:
            pid = packet_id or self.next_id()
        self.send(publish(topic, payload, qos, retain, dup, pid, self.version, props))
        return pid

    def publish_acked(self, topic, payload: bytes = b"", qos: int = 1, **kw) -> Packet:
        """Publish with full QoS 1/2 flow; returns the PUBACK or PUBCOMP (PUBREC if it failed)."""
        pid = self.publish(topic, payload, qos, **kw)
        if qos == 1:
            return self.expect(PUBACK)
        rec = self.expect(PUBREC)
        assert rec.packet_id == pid
        if rec.reason >= 0x80:
            return rec
        self.send(ack(PUBREL, pid, self.version))
        return self.expect(PUBCOMP)

    def disconnect(self, reason: int = 0, props=None) -> None:
        self.send(disconnect(self.version, reason, props))
        self.close()


def sub_options(qos: int = 0, no_local: bool = False, retain_as_published: bool = False, retain_handling: int = 0) -> int:
    return qos | (0x04 if no_local else 0) | (0x08 if retain_as_published else 0) | (retain_handling << 4)


def publish_bursts(host: str, port: int, topic_of, publishers: int, rounds: int, per_round: int) -> None:
    """QoS 1 load that makes jetmq bundle: each of `publishers` connections writes `per_round`
    PUBLISH packets (at most the broker's receive maximum) to ``topic_of(publisher)`` in one TCP
    write, all connections at once, round after round, so the node's batch task finds many
    messages of one topic queued together. Payloads are ``<publisher>:<n>``, n counting from 0
    per publisher. Every PUBACK must be success."""
    from mqtt_client import uid

    pubs = [RawClient(host, port) for _ in range(publishers)]
    try:
        for p in pubs:
            p.mqtt_connect(uid("burst"))
        for r in range(rounds):
            for i, p in enumerate(pubs):
                p.send(b"".join(publish(topic_of(i), f"{i}:{r * per_round + k}".encode(), qos=1, packet_id=k + 1)
                                for k in range(per_round)))
            for p in pubs:
                acks = [p.expect(PUBACK, timeout=20) for _ in range(per_round)]
                assert sorted(a.packet_id for a in acks) == list(range(1, per_round + 1))
                assert all(not a.reason for a in acks), acks
    finally:
        for p in pubs:
            p.close()
