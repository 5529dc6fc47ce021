"""OpenTelemetry: one PUBLISH traced from MQTT through NATS to Kafka, exported over OTLP/HTTP
(protobuf) to a small receiver in this test; JSON logs carrying node and client id.

paho-mqtt -> jetmq-broker (span "mqtt publish", traceparent on the NATS message) ->
jetmq-ingestor (child span "kafka produce", traceparent on the Kafka record) -> tansu.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import harness
import kafka_harness as kh
from mqtt_client import V5, Client, uid

pytestmark = [pytest.mark.slow, pytest.mark.jetmq_only("needs jetmq, NATS and Kafka")]


class OtlpReceiver:
    """OTLP/HTTP traces endpoint on loopback: decodes every export request into plain dicts."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: list[dict] = []
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ok = self.path == "/v1/traces" and self.headers.get("Content-Type") == "application/x-protobuf"
                if ok:
                    req = trace_service_pb2.ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    receiver._add(req)
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/x-protobuf")
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", harness.free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _add(self, req) -> None:
        with self.lock:
            self.requests += 1
            for rs in req.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append({
                            "service": resource.get("service.name"),
                            "instance": resource.get("service.instance.id"),
                            "name": s.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "kind": s.kind,
                            "attributes": {a.key: (a.value.string_value or a.value.int_value)
                                           for a in s.attributes},
                            "duration_ns": s.end_time_unix_nano - s.start_time_unix_nano,
                        })

    def find(self, pred) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if pred(s)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def otlp():
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture
def pipeline(tmp_path_factory):
    made = []

    def make(**kw) -> kh.Pipeline:
        for problem in (harness.broker_bin_problem(), kh.ingestor_bin_problem()):
            if problem:
                pytest.fail(problem, pytrace=False)
        p = kh.Pipeline(tmp_path_factory.mktemp("otel"), **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def telemetry_toml(endpoint: str, ratio: float = 1.0) -> str:
    return f"""
[telemetry]
otlp_endpoint = "{endpoint}"
sampling_ratio = {ratio}
log_format = "json"
"""


def test_publish_is_traced_from_mqtt_through_nats_to_kafka(pipeline, otlp):
    p = pipeline(
        shares=1,
        broker_env={
            "JETMQ_TELEMETRY__OTLP_ENDPOINT": otlp.endpoint,
            "JETMQ_TELEMETRY__LOG_FORMAT": "json",
            "JETMQ_LOG": "info,jetmq_broker=debug",
        },
        ingestor_extra=telemetry_toml(otlp.endpoint),
    )
    client_id = uid("traced")
    c = Client(p.targets()[0], client_id=client_id, version=V5).connect()
    topics = {qos: f"traced/{qos}/{uid('t')}" for qos in (0, 1, 2)}
    for qos, topic in topics.items():
        assert c.publish(topic, f"hello {qos}".encode(), qos=qos) == 0
    c.disconnect()

    reader = p.reader("mqtt")
    records = reader.read_distinct(3, timeout=60)
    reader.close()
    assert kh.distinct(records) == 3, p.diagnostics()
    for qos, topic in topics.items():
        record = next(r for r in records if r.header_str("mqtt.topic") == topic)
        tp = record.header_str("traceparent")
        assert tp, f"no traceparent on the Kafka record of QoS {qos}: {record.headers}"
        version, trace_id, span_id, flags = tp.split("-")
        assert (version, flags) == ("00", "01")

        # Spans are exported in batches (every 5 s by default): wait for both sides.
        def both():
            return (otlp.find(lambda s: s["trace_id"] == trace_id and s["service"] == "jetmq-broker")
                    and otlp.find(lambda s: s["trace_id"] == trace_id and s["service"] == "jetmq-ingestor"))

        harness.wait_until(both, 30, interval=0.2, what=f"broker and ingestor spans of trace {trace_id}")
        [broker_span] = otlp.find(lambda s: s["trace_id"] == trace_id and s["service"] == "jetmq-broker")
        [ingestor_span] = otlp.find(lambda s: s["trace_id"] == trace_id and s["service"] == "jetmq-ingestor")
        assert broker_span["name"] == "mqtt publish"
        assert broker_span["parent_span_id"] == "", "the broker starts the trace"
        assert broker_span["instance"] == "b1"
        assert broker_span["attributes"]["mqtt.topic"] == topic
        assert broker_span["attributes"]["mqtt.qos"] == qos
        assert broker_span["attributes"]["mqtt.client_id"] == client_id
        assert ingestor_span["name"] == "kafka produce"
        assert ingestor_span["parent_span_id"] == broker_span["span_id"], "child of the broker's span"
        assert ingestor_span["instance"] == "ingestor-1"
        assert ingestor_span["attributes"]["messaging.destination.name"] == "mqtt"
        assert ingestor_span["attributes"]["jetmq.seq"] == record.seq
        # The Kafka record names the ingestor's span, so a consumer continues this trace.
        assert span_id == ingestor_span["span_id"]
        print(f"QoS {qos}: trace {trace_id}: broker span {broker_span['span_id']} "
              f"({broker_span['duration_ns'] / 1e6:.2f} ms) -> ingestor span {ingestor_span['span_id']} "
              f"({ingestor_span['duration_ns'] / 1e6:.2f} ms) -> Kafka traceparent {tp}")

    # JSON logs: every line is an object; lines about the client carry node and client id.
    broker = p.brokers[0]
    lines = [json.loads(line) for line in broker.log_path.read_text().splitlines() if line.startswith("{")]
    assert lines, broker.log_tail()
    about_client = [line for line in lines if (line.get("span") or {}).get("client_id") == client_id]
    assert about_client, "no log line in the client's span"
    assert all(line["span"]["node"] == "b1" for line in about_client)
    assert any(line["fields"].get("message") == "connected" for line in about_client)
    ingestor_log = p.ingestors["1"].log_path.read_text().splitlines()
    json_lines = [json.loads(line) for line in ingestor_log if line.startswith("{")]
    assert any(line["fields"].get("message") == "starting" for line in json_lines), ingestor_log[-5:]


def test_unsampled_and_untraced_messages_carry_no_traceparent(pipeline, otlp):
    # Broker samples nothing; the ingestor follows the (absent) parent with ratio 0 as well.
    p = pipeline(shares=1, broker_env={"JETMQ_TELEMETRY__OTLP_ENDPOINT": otlp.endpoint,
                                       "JETMQ_TELEMETRY__SAMPLING_RATIO": "0"},
                 ingestor_extra=telemetry_toml(otlp.endpoint, ratio=0.0))
    c = Client(p.targets()[0], version=V5).connect()
    assert kh.publish_many(c, [(f"quiet/{i}", b"x", 1) for i in range(20)]) == 20
    c.disconnect()
    reader = p.reader("mqtt")
    records = reader.read_distinct(20, timeout=60)
    reader.close()
    assert kh.distinct(records) == 20
    assert all(r.header("traceparent") is None for r in records)
    # A graceful stop flushes whatever spans are queued: there must be none.
    assert p.ingestors["1"].terminate(timeout=30) == 0
    assert p.brokers[0].terminate(timeout=30) == 0
    assert otlp.find(lambda s: True) == []
