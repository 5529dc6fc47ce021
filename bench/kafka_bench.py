"""MQTT-to-Kafka benchmark (run through scripts/bench-kafka; method in docs/benchmarks.md).

Three measurements against the same tansu build and settings, each on a fresh tansu (and NATS,
broker) so that no run reads or writes another's data:

* direct:   the ingestor's own producer settings (idempotent, acks=all, linger 5 ms, window
            2048) producing COUNT records of SIZE bytes with the same headers, from a Rust
            rdkafka producer (ingestor/examples/kafka_direct.rs): the rate Kafka takes.
* drain-K:  COUNT MQTT messages (QoS 1, SIZE bytes, over 100 topics) published through
            jetmq-broker while no ingestor runs, so they wait in JetStream; then K ingestors
            start and the time from their first to their last Kafka confirmation gives the
            ingestion rate (their /metrics polled every 20 ms).
* latency-K: with the K ingestors running, MQTT messages paced at RATE msg/s for SECS seconds;
            each payload carries its publish wall-clock time, and a Kafka consumer records when
            the record reached it: end-to-end MQTT publish -> Kafka consumer latency.
"""

from __future__ import annotations

import argparse
import json
import os
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


def direct(workdir: Path, args) -> dict:
    tansu = kh.Tansu(workdir / "direct").start()
    try:
        tansu.create_topic("direct", 3)
        out = subprocess.run(
            [args.direct_bin, "--bootstrap", tansu.bootstrap, "--topic", "direct", "--count", str(args.count),
             "--size", str(args.size), "--keys", str(TOPICS)],
            capture_output=True, text=True, timeout=args.timeout)
        if out.returncode != 0:
            raise RuntimeError(f"kafka_direct failed: {out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        tansu.kill9()


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
    env.start_ingestors()
    first = last = None
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        done = env.produced()
        if done > 0 and first is None:
            first = (now, done)
        if done >= args.count:
            last = (now, done)
            break
        time.sleep(0.02)
    if first is None or last is None:
        raise RuntimeError(f"ingestors did not finish: {[i.metrics() for i in env.ingestors]}")
    secs = last[0] - first[0]
    reader = kh.Reader(env.tansu.bootstrap, ["mqtt"])
    records = reader.read_distinct(args.count, timeout=args.timeout, linger=0.5)
    reader.close()
    return {
        "ingestors": env.k,
        "mqtt_publish_rate": args.count / pub_secs,
        "records": args.count,
        "in_kafka": kh.distinct(records),
        "duplicates": kh.duplicates(records),
        "seconds": secs,
        "rate": (last[1] - first[1]) / secs if secs > 0 else float("nan"),
        "per_ingestor": {i.mqtt_id: i.metric("produced_total") for i in env.ingestors},
    }


def latency(env: Env, args) -> dict:
    count = int(args.latency_rate * args.latency_secs)
    reader = kh.Reader(env.tansu.bootstrap, ["mqtt"])
    started_ns = time.time_ns()
    published = {}

    def run():
        published["secs"] = publish(env, count, args.size, rate=args.latency_rate)

    def this_phase() -> list[float]:
        lat = []
        for r in reader.records:
            try:
                sent_ns = int(r.value[:20])
            except ValueError:
                continue
            if sent_ns >= started_ns:  # not one of the drain phase's records
                lat.append((r.received - sent_ns / 1e9) * 1000)
        return lat

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + args.latency_secs + args.timeout
    seen = 0
    while time.monotonic() < deadline and seen < count:
        if reader.poll(0.05):
            seen = len(this_phase())
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
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--latency-rate", type=float, default=500.0)
    ap.add_argument("--latency-secs", type=float, default=10.0)
    ap.add_argument("--ingestors", default="1,2")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--direct-bin", required=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every process started here is stopped (by PID).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="jetmq-kafka-bench-"))
    result = {"count": args.count, "size": args.size, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    print(f"[kafka-bench] work dir {workdir}", flush=True)
    result["direct"] = direct(workdir, args)
    print(f"[kafka-bench] direct: {result['direct']['rate']:.0f} records/s", flush=True)
    for k in [int(x) for x in args.ingestors.split(",")]:
        env = Env(workdir / f"ingestors-{k}", k)
        try:
            d = drain(env, args)
            d["vs_direct"] = d["rate"] / result["direct"]["rate"]
            result[f"drain-{k}"] = d
            print(f"[kafka-bench] {k} ingestor(s): {d['rate']:.0f} records/s = {d['vs_direct']:.2f}x direct, "
                  f"{d['in_kafka']}/{d['records']} in Kafka, {d['duplicates']} duplicates", flush=True)
            lat = latency(env, args)
            result[f"latency-{k}"] = lat
            print(f"[kafka-bench] {k} ingestor(s) at {lat['rate']:.0f} msg/s: p50 {lat['p50_ms']:.1f} ms, "
                  f"p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms ({lat['received']}/{lat['published']})",
                  flush=True)
        finally:
            env.close()
    result["loadavg_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
