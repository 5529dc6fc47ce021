#!/usr/bin/env python3
"""Load a Kafka-protocol broker the way jetmq's ingestor does, and see whether it holds up.

Issue #16 ("The Kafka stand-in"). Starts one broker (tansu by default, any argv with --broker-cmd),
creates a topic, then:

1. produce: --total records (~100 bytes, --keys distinct MQTT-topic-like keys) into a
   --partitions topic with the ingestor's producer settings (enable.idempotence=true, acks=all,
   linger.ms=5, max.in.flight=1, no compression), as fast as the broker takes them, in steps of
   --step records. Each step ends with a flush; its rate is step / (produce + flush time).
   A probe thread sends a metadata request (list_topics, 10 s timeout) every 2 s throughout.
   After each step: broker CPU (delta of utime+stime over the step) and RSS, and the same for
   --extra-pid's process tree (e.g. the postmaster).
2. read all: a consumer in a fresh group, auto.offset.reset=earliest, reads until it has
   every delivered record (or nothing arrives for --idle-timeout s, or --read-timeout s pass).
3. tail read: the last 1,000 records of partition 0, assigned from high watermark - 1000.

Stops early when a step exceeds --step-timeout (300 s) or two metadata probes in a row fail.
Every loop is bounded in count and time. The broker is started with the given argv and stopped
by PID (SIGKILL, as the test harness does). Writes a JSON report (--out) and prints a table.

    nice -n 19 ~/.cache/jetmq/venv/bin/python measure.py --label sqlite \\
        --tansu ~/.cache/jetmq/tansu-0.6.0/bin/tansu --storage sqlite://tansu.db --workdir /tmp/x
    nice -n 19 ~/.cache/jetmq/venv/bin/python measure.py --label postgres \\
        --tansu ~/.cache/jetmq/tansu-0.6.0-pg/bin/tansu \\
        --storage postgres://postgres@127.0.0.1:PGPORT/tansu --workdir /tmp/y --extra-pid POSTMASTER_PID
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def proc_tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def usage(pid: int | None, tree: bool = False) -> tuple[float, int]:
    """(cpu seconds, rss bytes) of pid (and its descendants if tree)."""
    if not pid:
        return 0.0, 0
    cpu, rss = 0.0, 0
    for p in (proc_tree(pid) if tree else [pid]):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / CLK
            rss += int(fields[21]) * PAGE
        except (OSError, ValueError, IndexError):
            pass
    return cpu, rss


class Probe(threading.Thread):
    """A metadata request every `every` s; records latencies and failures."""

    def __init__(self, bootstrap: str, topic: str, every: float = 2.0):
        super().__init__(daemon=True)
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.topic, self.every = topic, every
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.reset()
        self.consecutive_fail = 0

    def reset(self) -> None:
        with getattr(self, "lock", threading.Lock()):
            self.n, self.fail, self.max_s = 0, 0, 0.0

    def one(self) -> tuple[bool, float]:
        t = time.monotonic()
        try:
            md = self.admin.list_topics(topic=self.topic, timeout=10)
            ok = self.topic in md.topics and md.topics[self.topic].error is None
        except Exception:  # KafkaException on timeout
            ok = False
        return ok, time.monotonic() - t

    def run(self) -> None:
        while not self.stop_ev.is_set():
            ok, dt = self.one()
            with self.lock:
                self.n += 1
                self.max_s = max(self.max_s, dt)
                if ok:
                    self.consecutive_fail = 0
                else:
                    self.fail += 1
                    self.consecutive_fail += 1
            self.stop_ev.wait(max(0.0, self.every - dt))

    def snapshot(self) -> dict:
        with self.lock:
            return {"probes": self.n, "failed": self.fail, "max_s": round(self.max_s, 3)}


def key_of(i: int, keys: int) -> bytes:
    k = i % keys
    return f"site/{k % 10}/building/{(k // 10) % 10}/device/{k // 100}/telemetry".encode()


def value_of(i: int, size: int) -> bytes:
    head = f'{{"seq":{i},"t":{time.time():.6f},"v":"'.encode()
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True)
    ap.add_argument("--tansu", help="tansu binary (starts `tansu broker --storage-engine STORAGE ...`)")
    ap.add_argument("--storage", default="sqlite://tansu.db")
    ap.add_argument("--broker-cmd", help="other broker: argv with {port}; the topic must be creatable "
                                         "via the Kafka CreateTopics API")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--extra-pid", type=int, help="also account this process tree (e.g. postmaster)")
    ap.add_argument("--topic", default="standin")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--total", type=int, default=1_000_000)
    ap.add_argument("--step", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=0,
                    help="pace the producer at this many records/s (0: as fast as acked); a paced "
                         "producer sends many small batches, as the ingestor does at a modest load")
    ap.add_argument("--step-timeout", type=float, default=300)
    ap.add_argument("--read-timeout", type=float, default=900)
    ap.add_argument("--idle-timeout", type=float, default=60)
    ap.add_argument("--out", help="JSON report (default WORKDIR/result-LABEL.json)")
    a = ap.parse_args()

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    port = a.port or free_port()
    bootstrap = f"127.0.0.1:{port}"
    url = f"tcp://127.0.0.1:{port}"
    if a.broker_cmd:
        argv = a.broker_cmd.format(port=port).split()
    else:
        argv = [a.tansu, "broker", "--storage-engine", a.storage, "--listener-url", url,
                "--advertised-listener-url", url]
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    log = open(work / f"broker-{a.label}.log", "ab")
    report: dict = {"label": a.label, "argv": argv, "total": a.total, "step": a.step, "rate": a.rate,
                    "partitions": a.partitions, "keys": a.keys, "size": a.size, "steps": []}
    out_path = Path(a.out) if a.out else work / f"result-{a.label}.json"

    def save() -> None:
        out_path.write_text(json.dumps(report, indent=2))

    broker = subprocess.Popen(argv, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env)
    report["broker_pid"] = broker.pid
    print(f"[{a.label}] broker pid {broker.pid} on {bootstrap}: {' '.join(argv)}", flush=True)
    probe = None
    try:
        deadline = time.monotonic() + 60
        while not port_open(port):
            if broker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"broker did not start (rc={broker.poll()}); see {log.name}")
            time.sleep(0.2)

        if a.tansu and not a.broker_cmd:
            r = subprocess.run([a.tansu, "topic", "create", "--broker", url, "--partitions",
                                str(a.partitions), a.topic], cwd=work, capture_output=True, text=True,
                               timeout=60)
            if r.returncode != 0:
                raise SystemExit(f"topic create failed: {r.stdout}{r.stderr}")
        else:
            from confluent_kafka.admin import NewTopic
            fs = AdminClient({"bootstrap.servers": bootstrap}).create_topics(
                [NewTopic(a.topic, a.partitions, 1)], operation_timeout=30)
            for f in fs.values():
                f.result(timeout=60)

        probe = Probe(bootstrap, a.topic)
        ok, dt = probe.one()
        print(f"[{a.label}] first metadata ok={ok} in {dt:.3f}s", flush=True)
        probe.start()

        delivered, failed = [0], [0]
        first_err: list[str] = []
        max_offset: dict[int, int] = {}  # partition -> highest acked offset

        def on_delivery(err, msg):
            if err is None:
                delivered[0] += 1
                if msg.offset() > max_offset.get(msg.partition(), -1):
                    max_offset[msg.partition()] = msg.offset()
            else:
                failed[0] += 1
                if len(first_err) < 5:
                    first_err.append(str(err))

        tx_requests = [0]  # produce requests sent (librdkafka statistics, every 1 s)

        def on_stats(js: str) -> None:
            try:
                st = json.loads(js)
                tx_requests[0] = sum(b.get("tx", 0) for b in st.get("brokers", {}).values()
                                     if b.get("nodeid", -1) >= 0)
            except ValueError:
                pass

        producer = Producer({
            "statistics.interval.ms": 1000, "stats_cb": on_stats,
            "bootstrap.servers": bootstrap, "client.id": "standin-measure",
            "enable.idempotence": True, "acks": "all", "linger.ms": 5, "batch.size": 1_000_000,
            "batch.num.messages": 10_000, "max.in.flight.requests.per.connection": 1,
            "compression.type": "none", "message.timeout.ms": 120_000,
        })

        # ------------------------------------------------------------------ produce
        sent = 0
        stopped = None
        t_all = time.monotonic()
        t_pace = t_all
        while sent < a.total and stopped is None:
            n = min(a.step, a.total - sent)
            probe.reset()
            cpu0, _ = usage(broker.pid)
            xcpu0, _ = usage(a.extra_pid, tree=True)
            d0 = delivered[0]
            tx0 = tx_requests[0]
            t0 = time.monotonic()
            step_deadline = t0 + a.step_timeout
            i = 0
            while i < n:
                try:
                    producer.produce(a.topic, key=key_of(sent + i, a.keys),
                                     value=value_of(sent + i, a.size), on_delivery=on_delivery)
                    i += 1
                except BufferError:
                    producer.poll(0.05)
                if a.rate and i % 20 == 0:
                    # poll() returns early whenever it serves a callback: loop until due
                    while (ahead := t_pace + (sent + i) / a.rate - time.monotonic()) > 0:
                        producer.poll(ahead)
                if i % 1000 == 0:
                    producer.poll(0)
                    if time.monotonic() > step_deadline:
                        stopped = f"step over {a.step_timeout:.0f}s while producing"
                        break
                    if probe.consecutive_fail >= 2:
                        stopped = "broker stopped answering metadata (2 probes in a row)"
                        break
            t_prod = time.monotonic() - t0
            while len(producer) > 0 and stopped is None:
                producer.poll(0.5)
                if time.monotonic() > step_deadline:
                    stopped = f"step over {a.step_timeout:.0f}s waiting for acks"
                elif probe.consecutive_fail >= 2:
                    stopped = "broker stopped answering metadata (2 probes in a row)"
            wall = time.monotonic() - t0
            sent += i
            cpu1, rss = usage(broker.pid)
            xcpu1, xrss = usage(a.extra_pid, tree=True)
            acked = delivered[0] - d0
            t_stats = time.monotonic()
            producer.poll(1.1)  # one more statistics callback
            t_pace += time.monotonic() - t_stats  # not counted against the pace
            reqs = tx_requests[0] - tx0
            row = {"upto": sent, "records": i, "acked": acked, "wall_s": round(wall, 2),
                   "produce_s": round(t_prod, 2), "rate": round(acked / wall) if wall else 0,
                   "broker_cpu_pct": round(100 * (cpu1 - cpu0) / wall, 1) if wall else 0,
                   "broker_rss_mb": round(rss / 2**20, 1), "metadata": probe.snapshot(),
                   "requests": reqs, "records_per_request": round(acked / reqs, 1) if reqs else None,
                   "delivered_total": delivered[0], "failed_total": failed[0]}
            if a.extra_pid:
                row["extra_cpu_pct"] = round(100 * (xcpu1 - xcpu0) / wall, 1) if wall else 0
                row["extra_rss_mb"] = round(xrss / 2**20, 1)
            report["steps"].append(row)
            save()
            print(f"[{a.label}] {json.dumps(row)}", flush=True)
        report["produce"] = {"sent": sent, "delivered": delivered[0], "failed": failed[0],
                             "errors": first_err, "wall_s": round(time.monotonic() - t_all, 1),
                             "stopped": stopped}
        if stopped:
            left = producer.flush(30)
            report["produce"]["unacked_after_stop"] = left
        save()

        # metadata after the load
        time.sleep(2)
        ok, dt = probe.one()
        report["metadata_after_produce"] = {"ok": ok, "s": round(dt, 3)}
        print(f"[{a.label}] produce: {json.dumps(report['produce'])}; metadata after: ok={ok} {dt:.3f}s",
              flush=True)

        # ------------------------------------------------------------------ read all
        want = delivered[0]
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"standin-{uuid.uuid4()}",
                      "auto.offset.reset": "earliest", "enable.auto.commit": False,
                      "fetch.max.bytes": 52_428_800, "max.partition.fetch.bytes": 10_485_760})
        c.subscribe([a.topic])
        got, t0 = 0, time.monotonic()
        last_progress, first_at, marks = t0, None, []
        read_stop = None
        while got < want:
            now = time.monotonic()
            if now - t0 > a.read_timeout:
                read_stop = f"over {a.read_timeout:.0f}s"
                break
            if now - last_progress > a.idle_timeout:
                read_stop = f"nothing for {a.idle_timeout:.0f}s"
                break
            msgs = c.consume(num_messages=10_000, timeout=1.0)
            for m in msgs:
                if m.error() is None:
                    got += 1
                elif m.error().code() != KafkaError._PARTITION_EOF:
                    read_stop = read_stop or f"error {m.error()}"
            if msgs:
                last_progress = time.monotonic()
                first_at = first_at or last_progress - t0
                if not marks or got // a.step > marks[-1][0] // a.step:
                    marks.append((got, round(last_progress - t0, 1)))
                    print(f"[{a.label}] read {got} in {last_progress - t0:.1f}s", flush=True)
        read_s = time.monotonic() - t0
        c.close()
        report["read_all"] = {"want": want, "got": got, "s": round(read_s, 1),
                              "rate": round(got / read_s) if read_s else 0,
                              "first_record_s": round(first_at, 2) if first_at else None,
                              "marks": marks, "stopped": read_stop}
        save()
        print(f"[{a.label}] read all: {json.dumps(report['read_all'])}", flush=True)

        # ------------------------------------------------------------------ tail read
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"standin-tail-{uuid.uuid4()}",
                      "enable.auto.commit": False})
        try:
            try:
                lo, hi = c.get_watermark_offsets(TopicPartition(a.topic, 0), timeout=30)
                src = "ListOffsets"
            except Exception as e:  # tansu 0.6.0 + PostgreSQL < 16: ListOffsets(latest) fails
                report["tail_read_watermark_error"] = str(e)
                lo, hi, src = 0, max_offset.get(0, -1) + 1, "producer acks"
            start = max(lo, hi - 1000)
            c.assign([TopicPartition(a.topic, 0, start)])
            n, t0 = 0, time.monotonic()
            while n < hi - start and time.monotonic() - t0 < 120:
                for m in c.consume(num_messages=1000, timeout=1.0):
                    if m.error() is None:
                        n += 1
            report["tail_read"] = {"partition": 0, "from": start, "high": hi, "high_from": src, "got": n,
                                   "s": round(time.monotonic() - t0, 3)}
        except Exception as e:  # KafkaException (timeout)
            report["tail_read"] = {"error": str(e)}
        c.close()
        ok, dt = probe.one()
        report["metadata_after_read"] = {"ok": ok, "s": round(dt, 3)}
        cpu, rss = usage(broker.pid)
        report["broker_final"] = {"cpu_s": round(cpu, 1), "rss_mb": round(rss / 2**20, 1)}
        save()
        print(f"[{a.label}] tail read: {json.dumps(report['tail_read'])}; metadata: ok={ok} {dt:.3f}s",
              flush=True)
    finally:
        if probe:
            probe.stop_ev.set()
        if broker.poll() is None:
            os.kill(broker.pid, signal.SIGKILL)
            broker.wait(30)
        save()
        print(f"[{a.label}] broker {broker.pid} stopped; report {out_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
