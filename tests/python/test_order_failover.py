"""Per-publisher order through failures (issue 19): a broker killed while many QoS 2 messages
sit between PUBREC and PUBCOMP, and the NATS node leading the message stream killed during a
publish burst. Order is checked where clients see it and in the stream itself.
"""

import base64
import collections
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import harness
import mqtt_raw as R
import pytest
from mqtt_client import V5, V311, Client, Tracker, uid
from test_cluster_failover import message_stream_leader, reconnect, stream_report

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(300)]

# Packet ids of stream messages are derived from their position (broker/src/routing/position.rs:
# stream sequence s, part 0 -> s * 256), as position mod 32767 + 1: they wrap between stream
# sequences 127 and 128.
IDS_WRAP_AT_SEQ = 128


def _packet_id_seq(packet_id: int) -> int:
    """The stream sequence of an unbundled message below IDS_WRAP_AT_SEQ from its packet id."""
    return (packet_id - 1) // 256


@pytest.mark.parametrize("version", [V311, V5], ids=["v311", "v5"])
def test_pubrels_after_a_broker_kill_follow_the_pubrec_order(fresh_cluster, version):
    """A subscriber answers PUBREC for a run of QoS 2 messages whose packet ids wrap, and holds
    back PUBCOMP (and PUBACK for QoS 1 messages in between). Its node is killed; on another node
    the resumed session must send the PUBRELs in the order of the PUBRECs [MQTT-4.6.0-4], not
    by packet id, resend the QoS 1 messages in their order, and send no QoS 2 message again."""
    _nats, procs, targets = fresh_cluster
    a, b, _c = targets
    if _nats is None:
        pytest.skip("jetmq only: packet ids derived from stream positions")
    cid, topic = uid("relorder"), uid("relorder-t")
    props = {"SessionExpiryInterval": 600} if version == V5 else None
    cl = Tracker(a)
    try:
        sub = cl.raw(a, version=version)
        sub.mqtt_connect(cid, clean=False, props=props)
        assert list(sub.subscribe([(f"{topic}/#", 2)]).reasons) == [2]
        pub = cl.raw(b, version=V5)
        pub.mqtt_connect(uid("relorder-pub"))

        # Where the stream is: a probe's packet id, then QoS 0 fillers (one stream message
        # each) so that the run below straddles the point where packet ids wrap.
        assert pub.publish_acked(f"{topic}/q2", b"probe", qos=2).type == R.PUBCOMP
        probe = sub.expect(R.PUBLISH, 30)
        sub.send(R.ack(R.PUBREC, probe.packet_id, version))
        assert sub.expect(R.PUBREL, 30).packet_id == probe.packet_id
        sub.send(R.ack(R.PUBCOMP, probe.packet_id, version))
        run = 12  # QoS 2 messages, each followed by a QoS 1 one: 24 in flight (max_inflight 32)
        fillers = IDS_WRAP_AT_SEQ - run - 1 - _packet_id_seq(probe.packet_id)
        assert fillers >= 0, f"the stream is already past {IDS_WRAP_AT_SEQ - run}: probe {probe!r}"
        for i in range(fillers):
            pub.publish(uid("relorder-filler"), f"f{i}".encode(), qos=0)
        for k in range(run):
            assert pub.publish_acked(f"{topic}/q2", f"q2-{k}".encode(), qos=2).type == R.PUBCOMP
            assert pub.publish_acked(f"{topic}/q1", f"q1-{k}".encode(), qos=1).type == R.PUBACK

        pubrec_order, pubrels, qos1 = [], [], []
        deadline = time.monotonic() + 30
        while (len(pubrels) < run or len(qos1) < run) and time.monotonic() < deadline:
            p = sub.recv_packet(max(0.1, deadline - time.monotonic()))
            if p.type == R.PUBLISH and p.qos == 2:
                sub.send(R.ack(R.PUBREC, p.packet_id, version))
                pubrec_order.append(p.packet_id)
            elif p.type == R.PUBLISH and p.qos == 1:
                qos1.append(p.payload)  # no PUBACK: resent after the resume
            elif p.type == R.PUBREL:
                pubrels.append(p.packet_id)  # no PUBCOMP: still released after the resume
        assert qos1 == [f"q1-{k}".encode() for k in range(run)]
        assert pubrels == pubrec_order and len(pubrels) == run, (pubrec_order, pubrels)
        assert pubrec_order != sorted(pubrec_order), f"packet ids must wrap for this test: {pubrec_order}"

        # PUBREL goes out only after the session record says "released": the record holds all.
        procs[0].kill9()
        sub.wait_closed(30)

        again = cl.raw(b, version=version)
        assert again.mqtt_connect(cid, clean=False, props=props).session_present
        resent_pubrels, resent_qos1, resent_qos2 = [], [], []
        deadline = time.monotonic() + 30
        while (len(resent_pubrels) < run or len(resent_qos1) < run) and time.monotonic() < deadline:
            try:
                p = again.recv_packet(max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                break
            if p.type == R.PUBREL:
                resent_pubrels.append(p.packet_id)
            elif p.type == R.PUBLISH and p.qos == 1:
                resent_qos1.append(p.payload)
            elif p.type == R.PUBLISH:
                resent_qos2.append(p.payload)
        assert resent_pubrels == pubrec_order, (
            f"PUBRELs after the resume in packet id order {resent_pubrels}, not in PUBREC order {pubrec_order}")
        assert resent_qos1 == qos1, f"QoS 1 resent out of order: {resent_qos1}"
        for pid in resent_pubrels:
            again.send(R.ack(R.PUBCOMP, pid, version))
        tail = again.receive_for(2.0)
        resent_qos2 += [p.payload for p in tail if p.type == R.PUBLISH and p.qos == 2]
        assert not resent_qos2, f"QoS 2 messages sent again after PUBREC: {resent_qos2}"
    finally:
        cl.close_all()


# ------------------------------------------------------------------ stream leader killed mid-burst

MARK = re.compile(rb"ord\|(\w+)\|(\d{6})\|")


def _mark(pub: str, n: int) -> bytes:
    return f"ord|{pub}|{n:06d}|".encode()


def order_violations(observed) -> dict[str, list[int]]:
    """Per publisher, the numbers that arrived for the first time after a higher one: what
    overtaking or a reversal looks like. Repeats (QoS 1 duplicates, redeliveries after a resume)
    are not violations."""
    seen: dict[str, set] = collections.defaultdict(set)
    high: dict[str, int] = {}
    late: dict[str, list[int]] = collections.defaultdict(list)
    for pub, n in observed:
        if n in seen[pub]:
            continue
        seen[pub].add(n)
        if n < high.get(pub, -1):
            late[pub].append(n)
        high[pub] = max(high.get(pub, -1), n)
    return dict(late)


def known_gap_shape(late: dict[str, list[int]], window: int) -> str | None:
    """What the known silent-loss gap of issue 19 can look like, checked: messages in flight to
    a stream leader that died without answering are stored again after the publisher's later
    messages. So per publisher at most one window is late, and the late ones are still in their
    own order. The reversal this test was written for (whole batches put back one message at a
    time) broke both. Returns what does not fit, or None."""
    for pub, numbers in late.items():
        if len(numbers) > window:
            return f"{pub}: {len(numbers)} late, more than its window of {window}: {numbers[:20]}"
        if any(a >= b for a, b in zip(numbers, numbers[1:])):
            return f"{pub}: late ones reversed among themselves: {numbers[:20]}"
    return None


def read_stream_marks(node, stream: str = "JETMQ_MSGS", timeout: float = 60.0) -> list[tuple[str, int]]:
    """Every (publisher, number) mark stored in the stream, in stream order (bundles in their
    order): one `STREAM.MSG.GET` per stored message, pipelined over one NATS connection."""
    import socket

    info = json.loads(node.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=10))
    assert "error" not in info, info
    first, last = info["state"]["first_seq"], info["state"]["last_seq"]
    # The broker's inbox prefix and NKEY: the harness locks NATS as the shipped configs do.
    inbox = f"_INBOX.broker.readback{time.monotonic_ns()}"
    bodies: dict[int, bytes] = {}
    with socket.create_connection((node.host, node.port), timeout=timeout) as s:
        f = s.makefile("rb")
        info = f.readline()
        assert info.startswith(b"INFO ")
        out = [harness.nats_connect_line(node.host, node.port, info), f"SUB {inbox}.* 1\r\n".encode()]
        for seq in range(first, last + 1):
            body = json.dumps({"seq": seq}).encode()
            out.append(f"PUB $JS.API.STREAM.MSG.GET.{stream} {inbox}.{seq} {len(body)}\r\n".encode() + body + b"\r\n")
        s.sendall(b"".join(out))
        answered = 0
        deadline = time.monotonic() + timeout
        while answered < last + 1 - first:
            assert time.monotonic() < deadline, f"stream read-back: {answered} of {last + 1 - first} answers"
            line = f.readline()
            if not line:
                raise AssertionError("NATS closed the read-back connection")
            if line.startswith(b"PING"):
                s.sendall(b"PONG\r\n")
                continue
            if line.startswith(b"-ERR"):
                raise AssertionError(line.decode())
            if not (line.startswith(b"MSG ") or line.startswith(b"HMSG ")):
                continue
            parts = line.split()
            total = int(parts[-1])
            header_size = int(parts[-2]) if line.startswith(b"HMSG ") else 0
            data = f.read(total + 2)[header_size:total]
            answered += 1
            answer = json.loads(data)
            if "message" in answer:  # else: deleted or never stored (a gap in the sequence)
                bodies[answer["message"]["seq"]] = base64.b64decode(answer["message"].get("data") or "")
    return [(m.group(1).decode(), int(m.group(2))) for seq in sorted(bodies) for m in MARK.finditer(bodies[seq])]


class MarkCollector:
    """A subscriber's deliveries as (publisher, number), in arrival order."""

    def __init__(self, client: Client):
        self.client = client
        self.observed: list[tuple[str, int]] = []
        self.counts: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                m = self.client.messages.get(timeout=0.2)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            found = MARK.match(m.payload)
            if found:
                key = (found.group(1).decode(), int(found.group(2)))
                self.observed.append(key)
                self.counts[key] += 1

    def stop(self):
        self._stop.set()
        self._t.join(5)


def _published(info) -> bool:
    return bool(getattr(info, "_published", False))


def publish_marks(pub: Client, name: str, topic: str, n: int, qos: int, window: int, targets, deadline: float,
                  progress, acked: set):
    """Publishes marks 0..n-1 of ``name`` keeping up to ``window`` unacknowledged, following
    the publisher through disconnects (its session keeps the unacknowledged ones, which paho
    sends again in order)."""
    inflight = collections.deque()
    i = 0
    while (i < n or inflight) and time.monotonic() < deadline:
        if not pub.connected:
            try:
                reconnect(pub, targets, timeout=max(1.0, deadline - time.monotonic()))
            except AssertionError:
                return
        while inflight and _published(inflight[0][1]):
            acked.add((name, inflight.popleft()[0]))
        if i < n and len(inflight) < window:
            inflight.append((i, pub.paho.publish(topic, _mark(name, i) + b"x" * 40, qos=qos)))
            i += 1
            progress()
            continue
        if not inflight:
            continue
        info = inflight[0][1]
        with info._condition:
            info._condition.wait(0.1)


@pytest.mark.needs_nats
@pytest.mark.parametrize("batching", [False, True], ids=["default", "always-batch"])
def test_stream_leader_kill_during_a_burst_keeps_each_publishers_order(request, batching):
    """Publishers at QoS 1 and 2, each with a window of unacknowledged messages, publish a burst
    to one topic; the NATS node leading the message stream is killed with -9 a third of the way
    in. Read back, the stream holds each publisher's messages in order (first copies; QoS 1
    may repeat), subscribers at QoS 1 and 2 receive them in that order, no acknowledged message
    is lost, and no QoS 2 message arrives twice."""
    nats, procs, targets = request.getfixturevalue("fresh_cluster_batching" if batching else "fresh_cluster")
    if nats is None:
        pytest.skip("jetmq only: reads the message stream back")
    a, b, c = targets
    topic = uid("ordburst")
    n, window = 300, 16
    names = [f"p{i}" for i in range(6)]
    qos_of = {name: 1 + i % 2 for i, name in enumerate(names)}
    cl = Tracker(a)
    try:
        subs = [cl(b, client_id=uid("ob-s1"), version=V311, clean=False).connect(),
                cl(c, client_id=uid("ob-s2"), version=V5, clean=False, session_expiry=600).connect()]
        assert subs[0].subscribe(topic, qos=1) == [1]
        assert subs[1].subscribe(topic, qos=2) == [2]
        sub_targets = [[b, c], [c, b]]
        collectors = [MarkCollector(s) for s in subs]
        pubs = [cl(targets[i % 3], client_id=uid(f"ob-{name}"), version=V5, clean=False, session_expiry=600,
                   max_inflight=window).connect() for i, name in enumerate(names)]
        sent = [0]
        lock = threading.Lock()
        killed = threading.Event()
        victim = []

        def progress():
            with lock:
                sent[0] += 1
                due = sent[0] >= len(names) * n // 3 and not killed.is_set()
                if due:
                    killed.set()
            if due:
                victim.append(message_stream_leader(nats))
                nats.nodes[victim[0]].kill9()

        acked: set = set()
        deadline = time.monotonic() + 150
        pool = ThreadPoolExecutor(len(pubs), thread_name_prefix="publisher")
        try:
            publishing = [pool.submit(publish_marks, p, name, topic, n, qos_of[name], window,
                                      [targets[(i + k) % 3] for k in range(3)], deadline, progress, acked)
                          for i, (p, name) in enumerate(zip(pubs, names))]
        finally:
            pool.shutdown(wait=False)
        while not all(f.done() for f in publishing) and time.monotonic() < deadline + 5:
            for s, ts in zip(subs, sub_targets):
                if s.last_disconnect(0.1) is not None:
                    reconnect(s, ts)
        for f in publishing:
            if f.done():
                f.result()  # raises what a publisher raised
        assert killed.is_set(), "the burst never reached the kill point"
        want = {(name, i) for name in names for i in range(n)}
        assert acked == want, (f"{len(want - acked)} messages never acknowledged, e.g. {sorted(want - acked)[:10]}; "
                               f"streams: {stream_report(nats)}")

        delivered_by = time.monotonic() + 90
        while time.monotonic() < delivered_by and any(set(acked) - set(col.counts) for col in collectors):
            for s, ts in zip(subs, sub_targets):
                if s.last_disconnect(0.2) is not None:
                    reconnect(s, ts)
        time.sleep(1.0)  # a moment for late duplicates to show up (checked below)
        for col in collectors:
            col.stop()

        survivor = next(node for node in nats.nodes if node.alive())
        stored = read_stream_marks(survivor)
        lost_in_stream = sorted(acked - set(stored))
        assert not lost_in_stream, f"{len(lost_in_stream)} acknowledged messages not in the stream: {lost_in_stream[:10]}"
        problems = []
        late = order_violations(stored)
        stored_late = sum(map(len, late.values()))
        misfit = known_gap_shape(late, window)
        if late:
            problems.append(f"stream: {stored_late} stored out of publisher order: "
                            f"{ {k: v[:8] for k, v in late.items()} }")
        for label, col in zip(("QoS 1 subscriber", "QoS 2 subscriber"), collectors):
            lost = sorted(acked - set(col.counts))
            assert not lost, f"{label}: {len(lost)} acknowledged messages lost, e.g. {lost[:10]}"
            late = order_violations(col.observed)
            seen_late = sum(map(len, late.values()))
            # Subscribers read the stream in order: disorder they see beyond the stream's own is
            # a delivery bug, not the storage gap below.
            assert seen_late <= stored_late, f"{label}: {seen_late} out of publisher order, the stream only {stored_late}"
            if late:
                problems.append(f"{label}: {seen_late} out of publisher order: "
                                f"{ {k: v[:8] for k, v in late.items()} }")
        twice = sorted(k for k, count in collectors[1].counts.items() if count > 1 and qos_of[k[0]] == 2)
        assert not twice, f"QoS 2 subscriber: {len(twice)} QoS 2 messages twice, e.g. {twice[:10]}"
        print(f"killed NATS node n{victim[0] + 1}; {len(stored)} marks in the stream for {len(want)} messages")
        report = "; ".join(problems) + f"; streams: {stream_report(nats)}"
        # Before the fix every run stored 28-56 messages out of order (whole batches put back
        # reversed, later ones overtaking). What is left is the gap architecture.md names: a
        # message lost silently with the dying leader, overtaken by messages sent in the
        # second before the hold starts; seen in about a third of the runs on a loaded
        # 2-core machine (2-21 messages, one or more publishers). Anything else is a regression.
        assert misfit is None, f"{misfit}; {report}"
        if stored_late:
            pytest.xfail(f"known gap of issue 19 (still open): {report}")
    finally:
        cl.close_all()
