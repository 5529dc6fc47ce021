"""Reads Kafka from inside the compose stack's network, where the Kafka broker's advertised
name (kafka:9092) resolves. Run by tests/python/test_compose_stack.py in jetmq-test/tools:

    python3 read_kafka.py ends BOOTSTRAP TOPIC
        one JSON line: {"partition": high watermark, ...}
    python3 read_kafka.py read BOOTSTRAP TOPIC START MIN_RECORDS TIMEOUT_S
        one JSON line per record from START ({"partition": offset}, or "{}" for the beginning)
        until MIN_RECORDS were read (then 2 s more for late duplicates) or TIMEOUT_S passed

Starting at the ends read before a test keeps reads short: the test stand-in for Kafka
(tansu) gets slow when a read starts at the beginning of a long partition.
"""

import base64
import json
import sys
import time

from confluent_kafka import Consumer, TopicPartition


def consumer(bootstrap: str) -> Consumer:
    return Consumer({"bootstrap.servers": bootstrap, "group.id": f"compose-test-{time.time_ns()}",
                     "enable.auto.commit": False, "auto.offset.reset": "earliest"})


def partitions(c: Consumer, topic: str) -> list[int]:
    md = c.list_topics(topic, timeout=20).topics.get(topic)
    if md is None or md.error is not None:
        raise SystemExit(f"topic {topic}: {md.error if md else 'missing'}")
    return sorted(md.partitions)


def ends(bootstrap: str, topic: str) -> int:
    c = consumer(bootstrap)
    out = {str(p): c.get_watermark_offsets(TopicPartition(topic, p), timeout=20)[1] for p in partitions(c, topic)}
    print(json.dumps(out), flush=True)
    c.close()
    return 0


def read(bootstrap: str, topic: str, start: str, want: int, timeout: float) -> int:
    c = consumer(bootstrap)
    offsets = json.loads(start)
    c.assign([TopicPartition(topic, p, int(offsets.get(str(p), -2))) for p in partitions(c, topic)])
    seen, deadline, linger_until = 0, time.monotonic() + timeout, None
    while time.monotonic() < deadline and (linger_until is None or time.monotonic() < linger_until):
        for m in c.consume(num_messages=1000, timeout=0.5):
            if m.error():
                continue
            seen += 1
            print(json.dumps({
                "partition": m.partition(), "offset": m.offset(),
                "key": None if m.key() is None else m.key().decode("utf-8", "replace"),
                "value": base64.b64encode(m.value() or b"").decode(),
                "headers": {k: (v or b"").decode("utf-8", "replace") for k, v in (m.headers() or [])},
            }), flush=True)
        if seen >= want and linger_until is None:
            linger_until = time.monotonic() + 2.0
    c.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "ends":
        sys.exit(ends(sys.argv[2], sys.argv[3]))
    sys.exit(read(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6])))
