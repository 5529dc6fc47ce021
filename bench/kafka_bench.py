"""MQTT-to-Kafka benchmark (run through scripts/bench-kafka; method in docs/benchmarks.md).

Every environment is fresh (nats-server, jetmq-broker, tansu with sqlite storage, K
jetmq-ingestors), so no run reads or writes another's data:

* direct:    COUNT records of SIZE bytes, with the ingestor's metadata headers, produced
             straight into a fresh tansu by a Rust rdkafka producer with exactly the ingestor's
             settings (idempotent, acks=all, linger 5 ms, window 2048;
             ingestor/examples/kafka_direct.rs).
* direct-K:  the baseline for K ingestors (K > 1): K kafka_direct processes side by side, each
             producing COUNT / K records over its own share of the keys, into one fresh tansu
             (all K ingestors share one tansu too, and its sqlite store takes one writer at a
             time). Rate over the merged confirmations of all K, measured like the others.
* drain-K:   COUNT MQTT messages (QoS 1, SIZE bytes, 100 topics) published through
             jetmq-broker while no ingestor runs, so they wait in JetStream; then K ingestors
             start. Their /metrics are polled every 20 ms.
             Both rates are steady-state rates: records confirmed between the moments 10 % and
             90 % of COUNT were confirmed, divided by that time (no start-up, no tail).
* latency-K: with K ingestors running on a fresh store, first records paced at RATE/s
             produced straight into the same tansu (the baseline: produce call -> consumer),
             then MQTT messages at RATE/s for SECS seconds. Each payload carries its publish
             wall-clock time; a Kafka consumer notes when each record reached it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))

import harness  # noqa: E402
import kafka_harness as kh  # noqa: E402
from mqtt_client import Client  # noqa: E402

TOPICS = 100


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def steady_rate(samples: list[tuple[float, float]], count: int) -> tuple[float, float]:
    """Rate between the moments 10 % and 90 % of `count` were confirmed (linear interpolation
    between samples): the same definition for the direct producer and the ingestors, free of
    start-up (connections, producer id, metadata, the first full window) and of the tail."""

    def crossing(target: float) -> float:
        for (t0, n0), (t1, n1) in zip(samples, samples[1:]):
            if n0 < target <= n1:
                return t0 + (t1 - t0) * (target - n0) / (n1 - n0)
        raise RuntimeError(f"count never crossed {target}")

    lo, hi = 0.1 * count, 0.9 * count
    secs = crossing(hi) - crossing(lo)
    return (hi - lo) / secs, secs


def cpu_secs(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0


def direct(workdir: Path, args, producers: int = 1) -> dict:
    """COUNT records produced straight into a fresh tansu by `producers` kafka_direct processes
    running side by side (COUNT split evenly, each over its own share of the keys). The rate is
    the steady-state rate of all their confirmations merged on one (wall-clock) time line."""
    wd = workdir / ("direct" if producers == 1 else f"direct-{producers}")
    wd.mkdir(parents=True, exist_ok=True)
    tansu = kh.Tansu(wd).start()
    procs: list[tuple[subprocess.Popen, Path, Path]] = []
    try:
        tansu.create_topic("direct", 3)
        counts = [args.count // producers + (1 if i < args.count % producers else 0) for i in range(producers)]
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        # Output to files, not pipes: no producer can block on a full pipe while another is read.
        for i, n in enumerate(counts, start=1):
            out_path, err_path = wd / f"kafka_direct-{i}.json", wd / f"kafka_direct-{i}.log"
            with open(out_path, "w") as out, open(err_path, "w") as err:
                procs.append((subprocess.Popen(
                    [args.direct_bin, "--bootstrap", tansu.bootstrap, "--topic", "direct", "--count", str(n),
                     "--size", str(args.size), "--keys", str(TOPICS), "--producers", str(producers),
                     "--producer", str(i)],
                    stdout=out, stderr=err), out_path, err_path))
        deadline = time.monotonic() + args.timeout
        tansu_cpu0 = cpu_secs(tansu.pid)
        outputs = []
        for p, out_path, err_path in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"kafka_direct (pid {p.pid}) did not finish within {args.timeout:.0f} s")
            if p.returncode != 0:
                raise RuntimeError(f"kafka_direct failed ({p.returncode}): {err_path.read_text()[-2000:].strip()}")
            outputs.append(json.loads(out_path.read_text().strip().splitlines()[-1]))
        # One time line: each confirmation at its producer's wall-clock start + its offset.
        t0 = min(o["started_unix"] for o in outputs)
        times = sorted(o["started_unix"] - t0 + t for o in outputs for t in o.pop("confirmed_at"))
        samples = [(0.0, 0.0)] + [(t, float(i + 1)) for i, t in enumerate(times)]
        result: dict = {"producers": producers, "records": args.count, "size": args.size,
                        "failed": sum(o["failed"] for o in outputs)}
        result["rate"], result["seconds_10_to_90"] = steady_rate(samples, args.count)
        result["seconds"] = max(o["started_unix"] - t0 + o["seconds"] for o in outputs)
        result["start_spread_seconds"] = max(o["started_unix"] for o in outputs) - t0
        result["per_producer"] = [{k: o[k] for k in ("producer", "records", "keys", "seconds", "rate")}
                                  for o in outputs]
        # Where the CPU went (2 cores shared by everything): tansu's share, measured from the
        # producers' start to the last one's exit (tansu may still be committing a little).
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        result["cpu_secs"] = {
            "tansu": round(cpu_secs(tansu.pid) - tansu_cpu0, 2),
            # The producers were reaped by wait(): their CPU is in this process's children usage.
            "producers": round(children.ru_utime + children.ru_stime
                               - children0.ru_utime - children0.ru_stime, 2),
        }
        result["in_kafka"] = kh.stored_count(tansu.bootstrap, "direct")
        return result
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()  # by PID (Popen), never by name
                p.wait()
        tansu.kill9()


# The ingestor's producer settings (ingestor/src/kafka.rs client_config with the defaults).
INGESTOR_PRODUCER = {
    "enable.idempotence": True, "acks": "all", "linger.ms": 5, "batch.size": 1000000,
    "batch.num.messages": 10000, "max.in.flight.requests.per.connection": 1,
    "message.timeout.ms": 0, "compression.type": "none", "queue.buffering.max.messages": 100000,
}


def direct_latency(tansu: kh.Tansu, args) -> dict:
    """The latency baseline: records paced at RATE/s produced straight into the tansu the
    ingestors write to (topic "direct", right after the drain, so its store has the same
    size: tansu's per-request cost grows with it) with the ingestor's settings (confluent-kafka,
    the same librdkafka), read back by the same reader: produce call -> Kafka consumer."""
    from confluent_kafka import Producer

    tansu.create_topic("direct", 3)
    reader = kh.Reader(tansu.bootstrap, ["direct"], from_end=True)
    reader.poll(1.0)
    producer = Producer({"bootstrap.servers": tansu.bootstrap, **INGESTOR_PRODUCER})
    # Warm up like a running ingestor is: connections, metadata, idempotent producer id.
    producer.produce("direct", b"warm-up", key=b"warm-up")
    producer.flush(30)
    reader.read_until(lambda rs: len(rs) >= 1, timeout=30, linger=0)
    reader.records.clear()
    count = int(args.latency_rate * args.latency_secs)
    pad = b"x" * max(0, args.size - 20)
    start = time.monotonic()
    for n in range(count):
        due = start + n / args.latency_rate
        while time.monotonic() < due:
            producer.poll(0)
            reader.poll(0.001)
        producer.produce("direct", b"%020d" % time.time_ns() + pad, key=f"bench/{n % TOPICS}/data".encode())
        producer.poll(0)
    deadline = time.monotonic() + args.timeout
    while len(reader.records) < count and time.monotonic() < deadline:
        producer.poll(0)
        reader.poll(0.05)
    producer.flush(30)
    reader.close()
    lat = [(r.received - int(r.value[:20]) / 1e9) * 1000 for r in reader.records]
    return {"rate": args.latency_rate, "published": count, "received": len(lat),
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "max_ms": max(lat) if lat else float("nan")}


class Env:
    def __init__(self, workdir: Path, ingestors: int):
        self.workdir = workdir
        self.nats = harness.NatsServer(workdir, mapping=kh.mapping_block(ingestors))
        self.nats.start()
        self.broker = harness.BrokerNode(workdir, [self.nats.url], node_id="b1",
                                         extra_env={"RUST_LOG": "warn"}).start()
        self.tansu = kh.Tansu(workdir).start()
        self.tansu.create_topic("mqtt", 3)
        self.tansu.create_topic("mqtt-dead-letter", 1)
        self.ingestors: list[kh.Ingestor] = []
        self.k = ingestors

    def start_ingestors(self) -> None:
        if self.ingestors:
            return
        toml = kh.ingestor_toml([self.nats.url], self.tansu.bootstrap,
                                "[metrics]\nlog_interval_secs = 10\nlag_interval_secs = 1\n").replace(
            "[metrics]\nlog_interval_secs = 2\nlag_interval_secs = 1\n", "")
        for i in range(1, self.k + 1):
            ing = kh.Ingestor(self.workdir, i, toml, extra_env={"RUST_LOG": "warn"})
            ing.start(timeout=60)
            self.ingestors.append(ing)

    def produced(self) -> float:
        return sum(i.metric("produced_total") for i in self.ingestors)

    def close(self) -> None:
        for i in self.ingestors:
            i.terminate()
        self.tansu.kill9()
        self.broker.terminate()
        self.nats.terminate()


def publish(env: Env, count: int, size: int, rate: float | None = None, clients: int = 4) -> float:
    """QoS 1 publishes over TOPICS topics from `clients` paho clients; returns seconds taken.
    Paced at `rate` msg/s in total when given. Payload: publish time (ns, wall clock) + padding."""
    pad = b"x" * max(0, size - 20)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            c = Client(env.broker.address, max_inflight=100).connect()  # broker receive_maximum: 128
            mine = range(w, count, clients)
            per_client_rate = rate / clients if rate else None
            started = time.monotonic()
            batch: list[tuple[str, bytes, int]] = []
            for j, n in enumerate(mine):
                if per_client_rate:
                    due = started + j / per_client_rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        if batch:
                            kh.publish_many(c, batch)
                            batch = []
                        time.sleep(delay)
                    payload = b"%020d" % time.time_ns() + pad
                    kh.publish_many(c, [(f"bench/{n % TOPICS}/data", payload, 1)])
                else:
                    batch.append((f"bench/{n % TOPICS}/data", b"%020d" % time.time_ns() + pad, 1))
                    if len(batch) >= 500:
                        kh.publish_many(c, batch)
                        batch = []
            if batch:
                kh.publish_many(c, batch)
            c.disconnect()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.monotonic() - t0


def drain(env: Env, args) -> dict:
    pub_secs = publish(env, args.count, args.size)
    others = {"nats": env.nats.pid, "broker": env.broker.pid, "tansu": env.tansu.pid}
    cpu0 = {name: cpu_secs(pid) for name, pid in others.items()}
    env.start_ingestors()
    samples = []  # (time, records confirmed by Kafka), polled every 20 ms
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        samples.append((time.monotonic(), env.produced()))
        if samples[-1][1] >= args.count:
            break
        time.sleep(0.02)
    if samples[-1][1] < args.count:
        raise RuntimeError(f"ingestors did not finish: {[i.metrics() for i in env.ingestors]}")
    # CPU seconds spent from the ingestors' start to the last confirmation, per process.
    cpu = {name: round(cpu_secs(pid) - cpu0[name], 2) for name, pid in others.items()}
    for ing in env.ingestors:
        cpu[f"ingestor-{ing.mqtt_id}"] = round(cpu_secs(ing.pid), 2)
    rate, secs = steady_rate(samples, args.count)
    stored = kh.stored_count(env.tansu.bootstrap, "mqtt")
    return {
        "ingestors": env.k,
        "mqtt_publish_rate": args.count / pub_secs,
        "records": args.count,
        "in_kafka": stored,
        "duplicates": stored - args.count,
        "seconds_10_to_90": secs,
        "rate": rate,
        "per_ingestor": {i.mqtt_id: i.metric("produced_total") for i in env.ingestors},
        "seconds": samples[-1][0] - samples[0][0],
        "cpu_secs": cpu,
    }


def latency(env: Env, args) -> dict:
    count = int(args.latency_rate * args.latency_secs)
    reader = kh.Reader(env.tansu.bootstrap, ["mqtt"], from_end=True)
    reader.poll(1.0)  # assignment done, positioned at the end
    started_ns = time.time_ns()
    published = {}

    def run():
        published["secs"] = publish(env, count, args.size, rate=args.latency_rate)

    to_broker: list[float] = []

    def this_phase() -> list[float]:
        lat = []
        to_broker.clear()
        for r in reader.records:
            try:
                sent_ns = int(r.value[:20])
            except ValueError:
                continue
            if sent_ns >= started_ns:  # not one of the drain phase's records
                lat.append((r.received - sent_ns / 1e9) * 1000)
                # The record's timestamp is the broker's receive time (ms).
                to_broker.append(r.timestamp_ms - sent_ns / 1e6)
        return lat

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + args.latency_secs + args.timeout
    # Only count here: the latencies are computed once at the end, so the reader keeps up.
    seen = 0
    checked = 0
    while time.monotonic() < deadline and seen < count:
        reader.poll(0.05)
        for r in reader.records[checked:]:
            if r.value[:20].isdigit() and int(r.value[:20]) >= started_ns:
                seen += 1
        checked = len(reader.records)
    t.join(args.timeout)
    reader.close()
    lat = this_phase()
    return {
        "ingestors": env.k,
        "rate": args.latency_rate,
        "published": count,
        "publish_seconds": published.get("secs"),
        "received": len(lat),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else float("nan"),
        "publish_to_broker_p50_ms": percentile(to_broker, 50),
        "publish_to_broker_p99_ms": percentile(to_broker, 99),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--latency-rate", type=float, default=200.0)
    ap.add_argument("--latency-secs", type=float, default=10.0)
    ap.add_argument("--ingestors", default="1,2")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--direct-bin", required=True)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workdir", type=Path, help="where the processes keep their data and logs "
                    "(default: a new temporary directory)")
    args = ap.parse_args()
    if args.count < 5 * 2048:
        ap.error("--count must be at least 10240 (5 times the 2048-record window) for a steady-state rate")
    # SIGTERM unwinds like Ctrl-C, so every process started here is stopped (by PID).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = args.workdir
    else:
        workdir = Path(tempfile.mkdtemp(prefix="jetmq-kafka-bench-"))
    result = {"ok": False, "count": args.count, "size": args.size,
              "latency_rate": args.latency_rate, "latency_secs": args.latency_secs,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
              "loadavg_before": os.getloadavg()}
    print(f"[kafka-bench] work dir {workdir}", flush=True)
    try:
        run(workdir, args, result)
        result["ok"] = True
    except BaseException as e:  # noqa: BLE001 - the partial result is still written
        result["error"] = f"{type(e).__name__}: {e}" if not isinstance(e, SystemExit) else f"stopped (exit {e.code})"
        raise
    finally:
        result["loadavg_after"] = os.getloadavg()
        text = json.dumps(result, indent=2)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")
        print(text, flush=True)
    return 0


def run(workdir: Path, args, result: dict) -> None:
    ks = [int(x) for x in args.ingestors.split(",")]
    result["direct"] = direct(workdir, args)
    print(f"[kafka-bench] direct, 1 producer: {result['direct']['rate']:.0f} records/s", flush=True)

    for k in ks:
        # Latency on a fresh store (tansu's per-request cost grows with its store), then the
        # drain on another fresh one.
        env = Env(workdir / f"latency-{k}", k)
        try:
            env.start_ingestors()
            dl = result[f"direct-latency-{k}"] = direct_latency(env.tansu, args)
            print(f"[kafka-bench] direct into the same tansu at {dl['rate']:.0f} msg/s: p50 {dl['p50_ms']:.1f} ms, "
                  f"p99 {dl['p99_ms']:.1f} ms, max {dl['max_ms']:.1f} ms ({dl['received']}/{dl['published']})",
                  flush=True)
            lat = result[f"latency-{k}"] = latency(env, args)
            print(f"[kafka-bench] {k} ingestor(s) at {lat['rate']:.0f} msg/s: p50 {lat['p50_ms']:.1f} ms, "
                  f"p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms ({lat['received']}/{lat['published']})",
                  flush=True)
        finally:
            env.close()
        # The baseline with as many producers as ingestors, right before their drain.
        if k == 1:
            base = result["direct"]
        else:
            base = result[f"direct-{k}"] = direct(workdir, args, producers=k)
            print(f"[kafka-bench] direct, {k} producers side by side: {base['rate']:.0f} records/s in total "
                  f"({', '.join('%.0f' % p['rate'] for p in base['per_producer'])} each, whole runs)", flush=True)
        env = Env(workdir / f"drain-{k}", k)
        try:
            d = drain(env, args)
            # Against one direct producer (as before) and against as many direct producers as
            # ingestors, measured the same way into the same kind of fresh tansu.
            d["vs_direct"] = d["rate"] / result["direct"]["rate"]
            d["direct_same_k_rate"] = base["rate"]
            d["vs_direct_same_k"] = d["rate"] / base["rate"]
            d["rate_per_ingestor"] = d["rate"] / k
            result[f"drain-{k}"] = d
            print(f"[kafka-bench] {k} ingestor(s): {d['rate']:.0f} records/s = {d['vs_direct']:.2f}x 1 direct producer, "
                  f"{d['vs_direct_same_k']:.2f}x {k} direct producer(s); "
                  f"{d['in_kafka']}/{d['records']} in Kafka, {d['duplicates']} duplicates", flush=True)
        finally:
            env.close()


if __name__ == "__main__":
    sys.exit(main())
