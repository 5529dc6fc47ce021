#!/usr/bin/env python3
"""Turns the raw results of scripts/bench into one table, a JSON document and plots.

    report.py --raw DIR --out DIR [--quick 0|1] [--command CMD] ...

Reads DIR/<scenario>.<target>.json (one jetmq-bench result each) and writes
OUT/latest.json, OUT/latest.md, OUT/latency.png (matplotlib) or OUT/latency.svg
(hand-written, when matplotlib is missing), OUT/failover.png (the node-failure timeline:
connected clients and messages per second; matplotlib only), and copies the raw results and the
warnings/errors grepped from the process logs to OUT/raw/. Prints the table.
Standard library only (matplotlib optional).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

TARGET_NAMES = {
    "mosquitto": "mosquitto",
    "nats": "NATS MQTT",
    "jetmq1": "jetmq (1 NATS)",
    "jetmq3": "jetmq (3 nodes)",
}
PEERS = ("mosquitto", "nats")
JETMQS = ("jetmq1", "jetmq3")
SCENARIO_TITLES = {
    "qos0-fanin": "QoS 0 fan-in",
    "qos1-fanin": "QoS 1 fan-in",
    "qos1-backlog": "QoS 1 fan-in, backlog",
    "fanout": "fan-out",
    "clients10k": "10k clients x 1 msg/s",
    "idle10k": "idle connections",
    "reconnect": "reconnect storm",
    "failover": "node failure (kill -9)",
    "failover-stream": "message stream leader failure (NATS kill -9)",
    "failover-sessions": "sessions bucket leader failure (NATS kill -9)",
    "kafka": "MQTT to Kafka",
}


def get(d, *path, default=None):
    for p in path:
        if isinstance(d, dict) and p in d:
            d = d[p]
        else:
            return default
    return d


def is_broker(target: str, proc: str) -> bool:
    """The MQTT-facing processes: the broker itself (for NATS MQTT, the server)."""
    if target == "nats":
        return proc.startswith("nats")
    return proc.startswith("jetmq") or proc.startswith("mosquitto")


def procs(d, target, which):
    out = []
    for name, p in (get(d, "processes") or {}).items():
        if name == "loadgen":
            continue
        b = is_broker(target, name)
        if which == "all" or (which == "broker") == b:
            out.append(p)
    return out


def sum_or_none(values):
    values = [v for v in values if v is not None]
    return sum(values) if values else None


def broker_peak_mb(d, t):
    return sum_or_none([p.get("rss_peak_kb", 0) / 1024 for p in procs(d, t, "broker")])


def total_peak_mb(d, t):
    return sum_or_none([p.get("rss_peak_kb", 0) / 1024 for p in procs(d, t, "all")])


def system_cpu(d, t):
    return sum_or_none([p.get("cpu_secs") for p in procs(d, t, "all")])


def loadgen_cpu(d, t):
    return get(d, "processes", "loadgen", "cpu_secs")


def idle_kb(d, t, which):
    per = get(d, "result", "rss_per_connection_kb") or {}
    vals = [v for name, v in per.items() if which == "all" or is_broker(t, name)]
    return sum(vals) if vals else None


def session_present_share(d, t):
    n = get(d, "params", "sessions")
    p = get(d, "result", "storm", "session_present")
    if not n or p is None:
        return None
    return p / n


# (scenario, label, extractor, better, format)
METRICS = [
    ("qos0-fanin", "delivered msg/s", lambda d, t: get(d, "result", "receive", "rate"), "higher", "{:,.0f}"),
    ("qos0-fanin", "lost", lambda d, t: get(d, "result", "receive", "lost"), "lower", "{:,.0f}"),
    ("qos0-fanin", "latency p99 ms", lambda d, t: get(d, "result", "receive", "latency_ms", "p99"), "lower", "{:,.1f}"),
    ("qos1-fanin", "delivered msg/s", lambda d, t: get(d, "result", "receive", "rate"), "higher", "{:,.0f}"),
    ("qos1-fanin", "latency p99 ms", lambda d, t: get(d, "result", "receive", "latency_ms", "p99"), "lower", "{:,.1f}"),
    ("qos1-fanin", "PUBACK msg/s", lambda d, t: get(d, "result", "publish", "ack_rate"), "higher", "{:,.0f}"),
    ("qos1-fanin", "PUBACK p99 ms", lambda d, t: get(d, "result", "publish", "ack_latency_ms", "p99"), "lower", "{:,.1f}"),
    ("qos1-fanin", "lost", lambda d, t: get(d, "result", "receive", "lost"), "lower", "{:,.0f}"),
    ("qos1-backlog", "delivered msg/s", lambda d, t: get(d, "result", "receive", "rate"), "higher", "{:,.0f}"),
    ("qos1-backlog", "PUBACK msg/s", lambda d, t: get(d, "result", "publish", "ack_rate"), "higher", "{:,.0f}"),
    ("qos1-backlog", "latency p50 ms", lambda d, t: get(d, "result", "receive", "latency_ms", "p50"), "lower", "{:,.1f}"),
    ("qos1-backlog", "lost", lambda d, t: get(d, "result", "receive", "lost"), "lower", "{:,.0f}"),
    ("fanout", "deliveries/s", lambda d, t: get(d, "result", "receive", "rate"), "higher", "{:,.0f}"),
    ("fanout", "latency p99 ms", lambda d, t: get(d, "result", "receive", "latency_ms", "p99"), "lower", "{:,.1f}"),
    ("fanout", "lost", lambda d, t: get(d, "result", "receive", "lost"), "lower", "{:,.0f}"),
    ("clients10k", "connected", lambda d, t: get(d, "result", "connect", "ok"), "higher", "{:,.0f}"),
    ("clients10k", "latency p50 ms", lambda d, t: get(d, "result", "receive", "latency_ms", "p50"), "lower", "{:,.2f}"),
    ("clients10k", "latency p99 ms", lambda d, t: get(d, "result", "receive", "latency_ms", "p99"), "lower", "{:,.2f}"),
    ("clients10k", "PUBACK p99 ms", lambda d, t: get(d, "result", "publish", "ack_latency_ms", "p99"), "lower", "{:,.2f}"),
    ("clients10k", "lost", lambda d, t: get(d, "result", "receive", "lost"), "lower", "{:,.0f}"),
    ("clients10k", "broker peak RSS MB", broker_peak_mb, "lower", "{:,.1f}"),
    ("clients10k", "+NATS peak RSS MB", total_peak_mb, "lower", "{:,.1f}"),
    ("idle10k", "connected", lambda d, t: get(d, "result", "connect", "ok"), "higher", "{:,.0f}"),
    ("idle10k", "broker KB/conn", lambda d, t: idle_kb(d, t, "broker"), "lower", "{:,.2f}"),
    ("idle10k", "+NATS KB/conn", lambda d, t: idle_kb(d, t, "all"), "lower", "{:,.2f}"),
    ("reconnect", "storm s (all CONNACK)", lambda d, t: get(d, "result", "storm", "secs"), "lower", "{:,.2f}"),
    ("reconnect", "session present", session_present_share, "higher", "{:.0%}"),
    ("reconnect", "queued msgs delivered", lambda d, t: get(d, "result", "offline", "delivered"), "higher", "{:,.0f}"),
    ("reconnect", "queued msgs s", lambda d, t: get(d, "result", "offline", "secs"), "lower", "{:,.2f}"),
    ("reconnect", "storm CONNACK p50 ms", lambda d, t: get(d, "result", "storm", "connack_ms", "p50"), "lower", "{:,.0f}"),
    ("reconnect", "storm CONNACK p99 ms", lambda d, t: get(d, "result", "storm", "connack_ms", "p99"), "lower", "{:,.0f}"),
    ("reconnect", "kernel listen overflows", lambda d, t: get(d, "kernel_tcp", "listen_overflows"), "lower", "{:,.0f}"),
    ("clients10k", "kernel listen overflows", lambda d, t: get(d, "kernel_tcp", "listen_overflows"), "lower", "{:,.0f}"),
    ("idle10k", "kernel listen overflows", lambda d, t: get(d, "kernel_tcp", "listen_overflows"), "lower", "{:,.0f}"),
    ("failover", "clients", lambda d, t: get(d, "result", "connect", "ok"), "higher", "{:,.0f}"),
    ("failover", "clients dropped by the kill", lambda d, t: get(d, "result", "kill", "clients_dropped"), "", "{:,.0f}"),
    ("failover", "resumed, session present", lambda d, t: get(d, "result", "kill", "resumed_session_present"), "higher", "{:,.0f}"),
    ("failover", "reconnected, session lost", lambda d, t: get(d, "result", "kill", "resumed_session_absent"), "lower", "{:,.0f}"),
    ("failover", "s from kill to last resume", lambda d, t: get(d, "result", "kill", "last_resume_secs"), "lower", "{:,.2f}"),
    ("failover", "all connected at end", lambda d, t: get(d, "result", "kill", "all_connected_at_end"), "higher", "{}"),
    ("failover", "messages acknowledged", lambda d, t: get(d, "result", "publish", "acked"), "higher", "{:,.0f}"),
    ("failover", "lost (acked, not delivered)", lambda d, t: get(d, "result", "receive", "lost"), "lower", "{:,.0f}"),
    ("failover", "QoS 2 duplicates", lambda d, t: get(d, "result", "receive", "duplicates_qos2"), "lower", "{:,.0f}"),
    ("failover", "QoS 1 duplicates", lambda d, t: get(d, "result", "receive", "duplicates_qos1"), "lower", "{:,.0f}"),
    ("failover", "order violations (must be 0)", lambda d, t: get(d, "result", "receive", "order_violations"), "lower", "{:,.0f}"),
    ("failover", "resume, broker's part p50 ms", lambda d, t: get(d, "result", "kill", "resume_connect_ms", "p50"), "lower", "{:,.0f}"),
    ("failover", "resume, broker's part max ms", lambda d, t: get(d, "result", "kill", "resume_connect_ms", "max"), "lower", "{:,.0f}"),
    ("failover", "clients' detection p50 ms", lambda d, t: get(d, "result", "kill", "detection_ms", "p50"), "lower", "{:,.0f}"),
    ("failover", "latency p99 ms", lambda d, t: get(d, "result", "receive", "latency_ms", "p99"), "lower", "{:,.1f}"),
    ("failover", "latency max ms", lambda d, t: get(d, "result", "receive", "latency_ms", "max"), "lower", "{:,.1f}"),
    # MQTT to Kafka (bench/kafka_bench.py): steady-state records/s into one tansu through K
    # ingestors and from K direct rdkafka producers (K = 1, 2), in the same run.
    ("kafka", "1 ingestor records/s", lambda d, t: get(d, "drain-1", "rate"), "higher", "{:,.0f}"),
    ("kafka", "1 direct producer records/s", lambda d, t: get(d, "direct", "rate"), "higher", "{:,.0f}"),
    ("kafka", "1 ingestor ÷ 1 direct producer", lambda d, t: get(d, "drain-1", "vs_direct_same_k"), "higher", "{:.2f}x"),
    ("kafka", "2 ingestors records/s (sum)", lambda d, t: get(d, "drain-2", "rate"), "higher", "{:,.0f}"),
    ("kafka", "2 direct producers records/s (sum)", lambda d, t: get(d, "direct-2", "rate"), "higher", "{:,.0f}"),
    ("kafka", "2 ingestors ÷ 2 direct producers", lambda d, t: get(d, "drain-2", "vs_direct_same_k"), "higher", "{:.2f}x"),
    ("kafka", "2 ingestors ÷ 1 direct producer", lambda d, t: get(d, "drain-2", "vs_direct"), "higher", "{:.2f}x"),
    ("kafka", "e2e latency p50 ms, 1 ingestor", lambda d, t: get(d, "latency-1", "p50_ms"), "lower", "{:,.1f}"),
    ("kafka", "e2e latency p99 ms, 1 ingestor", lambda d, t: get(d, "latency-1", "p99_ms"), "lower", "{:,.1f}"),
    ("kafka", "e2e latency p99 ms, 2 ingestors", lambda d, t: get(d, "latency-2", "p99_ms"), "lower", "{:,.1f}"),
    ("kafka", "direct produce latency p99 ms", lambda d, t: get(d, "direct-latency-1", "p99_ms"), "lower", "{:,.1f}"),
    ("kafka", "duplicates in Kafka", lambda d, t: kafka_duplicates(d), "lower", "{:,.0f}"),
]
# Scenarios that are not a jetmq-bench run: no CPU/RSS/log rows.
NO_COMMON_METRICS = ("kafka",)


def kafka_duplicates(d):
    """Records in Kafka beyond the ones published, over every ingestor run."""
    dups = [get(d, k, "duplicates") for k in d if k.startswith("drain-")]
    return sum_or_none(dups)
def log_lines(d, t):
    logs = get(d, "_logs")
    if logs is None:
        return None
    return sum(v["lines"] for name, v in logs.items() if is_broker(t, name.split(".")[0]))


# Appended to every load scenario.
# The NATS-node kills (scripts/bench failover-stream, failover-sessions) report as "failover".
METRICS += [(variant, *rest) for (scenario, *rest) in METRICS if scenario == "failover"
            for variant in ("failover-stream", "failover-sessions")]

COMMON_METRICS = [
    ("CPU s (broker+NATS)", system_cpu, "lower", "{:,.1f}"),
    ("load generator CPU s", loadgen_cpu, "lower", "{:,.1f}"),
    ("broker WARN/ERROR log lines", log_lines, "lower", "{:,.0f}"),
]


def fmt(value, spec):
    if value is None:
        return "-"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def ratio(j, p):
    if j is None or p is None:
        return None
    if p == 0:
        return None if j == 0 else float("inf")
    return j / p


def status_of(d):
    text = _status_of(d)
    starts = get(d, "_startup_failures") if d else None
    if starts:
        text += f" (after {len(starts)} failed start attempt(s): {starts[0]})"
    return text


def _status_of(d):
    if d is None:
        return "missing"
    if get(d, "not_run"):
        err = str(get(d, "error") or "")
        if "not applicable" in err:
            return "not applicable"
        return err if err.startswith("not run") else "not run"
    if get(d, "error"):
        return "FAILED: " + str(get(d, "error"))
    if not get(d, "ok", default=False):
        notes = "; ".join(get(d, "notes") or [])
        errs = get(d, "result", "errors") or {}
        top = sorted(errs.items(), key=lambda kv: -kv[1])[:2]
        extra = "; ".join(f"{k} x{v}" for k, v in top)
        return "degraded" + (f": {notes}" if notes else "") + (f" [{extra}]" if extra else "")
    return "ok"


def build_rows(runs, scenarios, targets):
    rows = []
    for s in scenarios:
        results = [runs.get(s, {}).get(t) for t in targets]
        if all(d is None or get(d, "not_run") for d in results):
            # Run nowhere: one row that says why, per target.
            rows.append({"scenario": s, "metric": "not run", "better": "", "fmt": "{}",
                         "values": {t: status_of(runs.get(s, {}).get(t)) for t in targets}})
            continue
        metrics = [(m[1], m[2], m[3], m[4]) for m in METRICS if m[0] == s]
        if s not in NO_COMMON_METRICS:
            metrics += COMMON_METRICS
        for label, fn, better, spec in metrics:
            values = {}
            for t in targets:
                d = runs.get(s, {}).get(t)
                if d is None or get(d, "error"):
                    values[t] = None
                    continue
                try:
                    values[t] = fn(d, t)
                except Exception:  # noqa: BLE001 - one odd result must not kill the report
                    values[t] = None
            rows.append({"scenario": s, "metric": label, "values": values, "better": better, "fmt": spec})
    return rows


def ratio_columns(targets):
    return [(j, p) for j in JETMQS if j in targets for p in PEERS if p in targets]


def render_table(rows, targets, markdown):
    rcols = ratio_columns(targets)
    head = ["scenario", "metric"] + [TARGET_NAMES.get(t, t) for t in targets]
    head += [f"{'j1' if j == 'jetmq1' else 'j3'}/{'mosq' if p == 'mosquitto' else 'nats'}" for j, p in rcols]
    lines = []
    for r in rows:
        cells = [SCENARIO_TITLES.get(r["scenario"], r["scenario"]), r["metric"] + (" ↑" if r["better"] == "higher" else " ↓" if r["better"] == "lower" else "")]
        if r["metric"] == "not run":
            cells += [str(r["values"].get(t) or "not run") for t in targets] + [""] * len(rcols)
        else:
            cells += [fmt(r["values"].get(t), r["fmt"]) for t in targets]
            for j, p in rcols:
                x = ratio(r["values"].get(j), r["values"].get(p))
                cells.append("-" if x is None else ("inf" if x == float("inf") else f"{x:.2f}x"))
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    widths = [max(len(str(x[i])) for x in [head] + lines) for i in range(len(head))]
    sep = "  "
    out = [sep.join(str(h).ljust(w) for h, w in zip(head, widths))]
    out.append(sep.join("-" * w for w in widths))
    prev = None
    for c in lines:
        if prev is not None and c[0] != prev:
            out.append("")
        prev = c[0]
        out.append(sep.join(str(x).ljust(w) for x, w in zip(c, widths)))
    return "\n".join(out)


def value(rows, s, metric, t):
    for r in rows:
        if r["scenario"] == s and r["metric"] == metric:
            return r["values"].get(t)
    return None


def check_targets(rows, targets, quick):
    """The targets from the issue, per jetmq variant."""
    checks = []

    def add(name, j, got, want, ok, detail):
        checks.append({"target": name, "jetmq": j, "got": got, "want": want,
                       "met": ok, "detail": detail})

    for j in JETMQS:
        if j not in targets:
            continue
        for s, label, need in (
            ("qos0-fanin", "QoS 0 fan-in >= 1.0x mosquitto", ("mosquitto", 1.0)),
            ("qos0-fanin", "QoS 0 fan-in >= 1.0x NATS MQTT", ("nats", 1.0)),
            ("qos1-fanin", "QoS 1 fan-in >= 1.0x mosquitto", ("mosquitto", 1.0)),
            ("qos1-fanin", "QoS 1 fan-in >= 2.0x NATS MQTT", ("nats", 2.0)),
        ):
            peer, factor = need
            if peer not in targets:
                continue
            metric = "delivered msg/s"
            x = ratio(value(rows, s, metric, j), value(rows, s, metric, peer))
            add(label, j, None if x is None else round(x, 3), factor,
                None if x is None else x >= factor,
                "ratio of delivered msg/s at the subscriber")
        p99 = value(rows, "clients10k", "latency p99 ms", j)
        add("10k clients: p99 < 10 ms", j, p99, 10, None if p99 is None else p99 < 10, "end-to-end p99")
        mem = value(rows, "clients10k", "broker peak RSS MB", j)
        add("10k clients: broker memory < 150 MB", j, mem, 150,
            None if mem is None else mem < 150, "peak RSS of the jetmq process(es), NATS not included")
        kb = value(rows, "idle10k", "broker KB/conn", j)
        add("idle connection < 8 KB", j, kb, 8, None if kb is None else kb < 8,
            "RSS delta of the jetmq process(es) / connections")
        st = value(rows, "reconnect", "storm s (all CONNACK)", j)
        sp = value(rows, "reconnect", "session present", j)
        add("reconnect storm < 5 s", j, st, 5,
            None if st is None else (st < 5 and (sp or 0) >= 1.0),
            "until every client has CONNACK with session present")
    for j in JETMQS:
        if j not in targets or "kafka" not in {r["scenario"] for r in rows}:
            continue
        one = value(rows, "kafka", "1 ingestor ÷ 1 direct producer", j)
        two = value(rows, "kafka", "2 ingestors ÷ 2 direct producers", j)
        p99 = value(rows, "kafka", "e2e latency p99 ms, 1 ingestor", j)
        if j == "jetmq1" or one is not None:
            one = None if one is None else round(one, 3)
            two = None if two is None else round(two, 3)
            add("MQTT to Kafka, 1 ingestor >= 0.8x 1 direct producer", j, one, 0.8,
                None if one is None else one >= 0.8,
                "steady-state records/s into the same tansu, same run")
            add("MQTT to Kafka, 2 ingestors >= 0.8x 2 direct producers", j, two, 0.8,
                None if two is None else two >= 0.8,
                "sum of both ingestors vs. sum of two producers side by side, one tansu")
            add("MQTT to Kafka: end-to-end p99 reported", j, None if p99 is None else round(p99, 1), "a number",
                None if p99 is None else True,
                "MQTT PUBLISH to Kafka consumer at 200 msg/s, ms")
    if "jetmq3" in targets:
        lost = value(rows, "failover", "lost (acked, not delivered)", "jetmq3")
        dup2 = value(rows, "failover", "QoS 2 duplicates", "jetmq3")
        resume = value(rows, "failover", "s from kill to last resume", "jetmq3")
        absent = value(rows, "failover", "reconnected, session lost", "jetmq3")
        back = value(rows, "failover", "all connected at end", "jetmq3")
        add("node failure: zero loss", "jetmq3", lost, 0, None if lost is None else lost == 0,
            "acknowledged (PUBACK/PUBCOMP) and never delivered")
        add("node failure: no QoS 2 duplicates", "jetmq3", dup2, 0, None if dup2 is None else dup2 == 0,
            "QoS 2 messages delivered twice")
        add("node failure: all sessions resumed < 10 s", "jetmq3", resume, 10,
            None if resume is None else (resume < 10 and absent == 0 and back is True),
            "kill until the last dropped client had CONNACK with session present")
    if quick:
        for c in checks:
            c["detail"] += " (quick mode: scaled down)"
    return checks


def machine_info(args):
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""

    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    root = Path(__file__).resolve().parents[1]
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "load_average_at_report": sh("cut -d' ' -f1-3 /proc/loadavg"),
        "mosquitto": sh(f"{args.mosquitto} -h 2>/dev/null | head -n1"),
        "nats_server": sh(f"{args.nats_server} --version"),
        "rustc": sh("rustc --version"),
        "jetmq_commit": sh(f"git -C {root} rev-parse --short HEAD") + (" (dirty)" if sh(f"git -C {root} status --porcelain") else ""),
        "jetmq_broker": args.broker_label,
    }


def latency_series(runs, targets):
    """(scenario, target) -> percentiles in ms, for the pubsub scenarios."""
    out = {}
    for s in LATENCY_SCENARIOS:
        for t in targets:
            lat = get(runs.get(s, {}).get(t) or {}, "result", "receive", "latency_ms")
            if lat and lat.get("count"):
                out[(s, t)] = [lat["p50"], lat["p90"], lat["p99"], lat["p999"], lat["max"]]
    return out


LATENCY_SCENARIOS = ("qos0-fanin", "qos1-fanin", "qos1-backlog", "fanout", "clients10k", "failover")
PCT_LABELS = ["p50", "p90", "p99", "p99.9", "max"]
COLORS = {"mosquitto": "#4c72b0", "nats": "#55a868", "jetmq1": "#c44e52", "jetmq3": "#8172b2"}


def plot_png(series, targets, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return False
    scen = [s for s in LATENCY_SCENARIOS if any((s, t) in series for t in targets)]
    if not scen:
        return False
    ncols = min(3, len(scen))
    nrows = (len(scen) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(scen):]:
        ax.axis("off")
    for ax, s in zip(flat, scen):
        present = [t for t in targets if (s, t) in series]
        width = 0.8 / max(1, len(present))
        for k, t in enumerate(present):
            xs = [i + (k - (len(present) - 1) / 2) * width for i in range(len(PCT_LABELS))]
            ax.bar(xs, series[(s, t)], width=width, label=TARGET_NAMES.get(t, t), color=COLORS.get(t))
        ax.set_yscale("log")
        ax.set_xticks(range(len(PCT_LABELS)))
        ax.set_xticklabels(PCT_LABELS)
        ax.set_title(SCENARIO_TITLES.get(s, s))
        ax.set_ylabel("end-to-end latency, ms (log)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_svg(series, targets, path):
    import math

    scen = [s for s in LATENCY_SCENARIOS if any((s, t) in series for t in targets)]
    if not scen:
        return False
    pw, ph, pad = 380, 260, 50
    width = pw * len(scen) + pad
    height = ph + 90
    allv = [v for vals in series.values() for v in vals if v > 0]
    lo = math.floor(math.log10(min(allv))) if allv else -1
    hi = math.ceil(math.log10(max(allv))) if allv else 3
    hi = max(hi, lo + 1)

    def y(v):
        v = max(v, 10 ** lo)
        return 30 + ph - (math.log10(v) - lo) / (hi - lo) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    for si, s in enumerate(scen):
        x0 = pad + si * pw
        parts.append(f'<text x="{x0 + pw / 2}" y="18" text-anchor="middle" font-size="13">{SCENARIO_TITLES.get(s, s)}</text>')
        for e in range(lo, hi + 1):
            parts.append(f'<line x1="{x0}" x2="{x0 + pw - 20}" y1="{y(10 ** e)}" y2="{y(10 ** e)}" stroke="#ddd"/>')
            if si == 0:
                parts.append(f'<text x="{x0 - 5}" y="{y(10 ** e) + 4}" text-anchor="end">{10 ** e:g} ms</text>')
        present = [t for t in targets if (s, t) in series]
        group = (pw - 30) / len(PCT_LABELS)
        bw = group * 0.8 / max(1, len(present))
        for i, lab in enumerate(PCT_LABELS):
            gx = x0 + i * group
            parts.append(f'<text x="{gx + group * 0.4}" y="{30 + ph + 15}" text-anchor="middle">{lab}</text>')
            for k, t in enumerate(present):
                v = series[(s, t)][i]
                top = y(v)
                parts.append(f'<rect x="{gx + k * bw:.1f}" y="{top:.1f}" width="{bw:.1f}" height="{30 + ph - top:.1f}" fill="{COLORS.get(t, "#888")}"><title>{TARGET_NAMES.get(t, t)} {lab}: {v:.2f} ms</title></rect>')
    lx = pad
    for t in targets:
        parts.append(f'<rect x="{lx}" y="{height - 22}" width="12" height="12" fill="{COLORS.get(t, "#888")}"/>')
        parts.append(f'<text x="{lx + 16}" y="{height - 12}">{TARGET_NAMES.get(t, t)}</text>')
        lx += 140
    parts.append("</svg>")
    Path(path).write_text("\n".join(parts))
    return True


def plot_failover(d, path):
    """Connected clients and messages per second around the kill; False without data."""
    rows = get(d, "result", "timeline") or []
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return False
    t = [r["t"] for r in rows]
    lo = [r["connected_min"] if r["connected_min"] is not None else r["connected_max"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.step(t, lo, where="post", color="#8172b2", label="connected clients (lowest in the second)")
    ax.set_xlabel("seconds since publishing started")
    ax.set_ylabel("connected clients")
    ax.set_ylim(0, max(get(d, "params", "clients") or 0, max(lo or [0])) * 1.08 + 1)
    ax2 = ax.twinx()
    ax2.plot(t, [r["received"] for r in rows], color="#c44e52", label="messages received / s")
    ax2.plot(t, [r["acked"] for r in rows], color="#55a868", alpha=0.8, label="publishes acknowledged / s")
    ax2.set_ylabel("messages per second")
    ax2.set_ylim(bottom=0)
    kill = get(d, "result", "kill", "at_secs")
    if kill is not None:
        ax.axvline(kill, color="black", linestyle="--", linewidth=1)
        ax.text(kill, ax.get_ylim()[1] * 0.98, " kill -9", va="top")
        last = get(d, "result", "kill", "last_resume_secs")
        if last is not None:
            ax.axvspan(kill, kill + last, color="#dddddd", alpha=0.5, label=f"kill to last resume: {last:.1f} s")
    lost = get(d, "result", "receive", "lost")
    dup2 = get(d, "result", "receive", "duplicates_qos2")
    dup1 = get(d, "result", "receive", "duplicates_qos1")
    ax.set_title(f"node failure: {get(d, 'params', 'clients')} clients, lost {lost}, "
                 f"QoS 2 duplicates {dup2}, QoS 1 duplicates {dup1}", fontsize=10)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def failover_md(d, plot):
    """A section for latest.md: the key numbers and the timeline."""
    r = get(d, "result") or {}
    k = r.get("kill") or {}
    rec = r.get("receive") or {}
    out = ["", "## Node failure", ""]
    if get(d, "error"):
        return out + [f"Failed: {get(d, 'error')}"]
    p = get(d, "params") or {}
    out += [f"{p.get('clients')} clients ({p.get('mqtt')}, QoS {p.get('qos')}, {p.get('rate')} msg/s each), "
            f"{p.get('kill')} killed at {fmt(k.get('at_secs'), '{:.1f}')} s; reconnect delay {p.get('reconnect_delay')} s "
            f"+ up to {p.get('reconnect_jitter')} s.", "",
            f"- clients dropped by the kill: {k.get('clients_dropped')}; back with session present: "
            f"{k.get('resumed_session_present')}; with session lost: {k.get('resumed_session_absent')}; "
            f"all connected at the end: {k.get('all_connected_at_end')}",
            f"- kill to the last resumed session: {fmt(k.get('last_resume_secs'), '{:.2f}')} s; outage per client "
            f"p50 {fmt(get(k, 'outage_ms', 'p50'), '{:,.0f}')} ms, p99 {fmt(get(k, 'outage_ms', 'p99'), '{:,.0f}')} ms, "
            f"max {fmt(get(k, 'outage_ms', 'max'), '{:,.0f}')} ms",
            f"- sent {get(r, 'publish', 'sent')}, acknowledged {get(r, 'publish', 'acked')}, "
            f"unacknowledged at the end {get(r, 'publish', 'unacked_at_end')}; received {rec.get('received')} "
            f"({rec.get('unique')} unique); **lost {rec.get('lost')}**, QoS 2 duplicates {rec.get('duplicates_qos2')}, "
            f"QoS 1 duplicates {rec.get('duplicates_qos1')}, **order violations {rec.get('order_violations')}** "
            f"(QoS 1 {rec.get('order_violations_qos1')}, QoS 2 {rec.get('order_violations_qos2')})",
            f"- resume after the kill: the clients' detection (kill until the drop was noticed) p50 "
            f"{fmt(get(k, 'detection_ms', 'p50'), '{:,.0f}')} ms, max {fmt(get(k, 'detection_ms', 'max'), '{:,.0f}')} ms; "
            f"the broker's part (TCP connect until CONNACK with session present) p50 "
            f"{fmt(get(k, 'resume_connect_ms', 'p50'), '{:,.0f}')} ms, p99 {fmt(get(k, 'resume_connect_ms', 'p99'), '{:,.0f}')} ms, "
            f"max {fmt(get(k, 'resume_connect_ms', 'max'), '{:,.0f}')} ms",
            f"- errors seen by the clients: " + ("; ".join(f"{e} x{n}" for e, n in (r.get("errors") or {}).items()) or "none")]
    if plot:
        out += ["", f"![node failure timeline]({plot})"]
    rows = r.get("timeline") or []
    if rows:
        out += ["", "| s | connected (min-max) | sent | acked | received | CONNACKs |", "|---|---|---|---|---|---|"]
        for row in rows:
            out.append(f"| {row['t']} | {row['connected_min']}-{row['connected_max']} | {row['sent']} | "
                       f"{row['acked']} | {row['received']} | {row['connacks']} |")
    return out


def loadavg(v):
    return " / ".join(f"{x:.1f}" for x in v) if isinstance(v, list) else "-"


def kafka_md(d):
    """A section for latest.md: every number of the MQTT-to-Kafka run."""
    out = ["", "## MQTT to Kafka", ""]
    if get(d, "error"):
        out += [f"Failed: {str(get(d, 'error')).splitlines()[0]}", ""]
    out += [f"{get(d, 'count')} records of {get(d, 'size')} B over 100 topics into tansu (sqlite), steady-state "
            f"rate between 10 % and 90 % confirmed; latency at {fmt(get(d, 'latency_rate'), '{:.0f}')} msg/s for "
            f"{fmt(get(d, 'latency_secs'), '{:.0f}')} s; load average {loadavg(get(d, 'loadavg_before'))} before, "
            f"{loadavg(get(d, 'loadavg_after'))} after.", "",
            "| run | records/s | ÷ 1 direct producer | ÷ as many direct producers | in Kafka | detail |",
            "|---|---|---|---|---|---|"]
    for key in sorted(k for k in d if k == "direct" or k.startswith("direct-") and not k.startswith("direct-latency")):
        r = d[key]
        per = ", ".join(fmt(x.get("rate"), "{:,.0f}") for x in r.get("per_producer") or [])
        out.append(f"| {r.get('producers', 1)} direct producer(s) | {fmt(r.get('rate'), '{:,.0f}')} | | | "
                   f"{fmt(r.get('in_kafka'), '{:,}')} | whole-run rate per producer: {per or '-'} |")
    for key in sorted(k for k in d if k.startswith("drain-")):
        r = d[key]
        per = ", ".join(f"{i}: {fmt(n, '{:,.0f}')}" for i, n in (r.get("per_ingestor") or {}).items())
        out.append(f"| {r.get('ingestors')} ingestor(s) | {fmt(r.get('rate'), '{:,.0f}')} | "
                   f"{fmt(r.get('vs_direct'), '{:.2f}x')} | {fmt(r.get('vs_direct_same_k'), '{:.2f}x')} | "
                   f"{fmt(r.get('in_kafka'), '{:,}')} ({fmt(r.get('duplicates'), '{:,}')} duplicates) | "
                   f"records per ingestor {per}; MQTT publish {fmt(r.get('mqtt_publish_rate'), '{:,.0f}')} msg/s |")
    out += ["", "| latency | p50 ms | p99 ms | max ms | received |", "|---|---|---|---|---|"]
    for key in sorted(k for k in d if k.startswith("latency-") or k.startswith("direct-latency-")):
        r = d[key]
        what = (f"direct produce, tansu of {key.rsplit('-', 1)[1]} ingestor(s)" if key.startswith("direct")
                else f"MQTT through {r.get('ingestors')} ingestor(s)")
        out.append(f"| {what} | {fmt(r.get('p50_ms'), '{:,.1f}')} | {fmt(r.get('p99_ms'), '{:,.1f}')} | "
                   f"{fmt(r.get('max_ms'), '{:,.1f}')} | {r.get('received')}/{r.get('published')} |")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", default="0")
    ap.add_argument("--command", default="scripts/bench")
    ap.add_argument("--scenarios", default="")
    ap.add_argument("--targets", default="")
    ap.add_argument("--nats-server", default="nats-server")
    ap.add_argument("--mosquitto", default="mosquitto")
    ap.add_argument("--broker-label", default="working tree")
    args = ap.parse_args()
    raw = Path(args.raw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick == "1"

    runs: dict[str, dict[str, dict]] = {}
    for f in sorted(raw.glob("*.json")):
        scenario, _, target = f.stem.partition(".")
        try:
            runs.setdefault(scenario, {})[target] = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            runs.setdefault(scenario, {})[target] = {"ok": False, "error": f"unreadable result: {e}"}
    # Warnings and errors grepped from the process logs by scripts/bench.
    logdir = raw / "logs"
    if logdir.is_dir():
        for f in sorted(logdir.glob("*.log")):
            parts = f.name[: -len(".log")].split(".", 2)
            if len(parts) != 3:
                continue
            scenario, target, proc = parts
            d = runs.get(scenario, {}).get(target)
            if d is None:
                continue
            lines = [ln.strip() for ln in f.read_text(errors="replace").splitlines() if ln.strip()]
            d.setdefault("_logs", {})[proc] = {"lines": len(lines), "last": lines[-5:]}
    for f in sorted(raw.glob("*.notes")):
        scenario, _, target = f.stem.partition(".")
        lines = [ln.strip() for ln in f.read_text(errors="replace").splitlines() if ln.strip()]
        d = runs.get(scenario, {}).get(target)
        if d is not None and lines:
            d["_startup_failures"] = lines
    scenarios = args.scenarios.split() or sorted(runs)
    targets = [t for t in (args.targets.split() or list(TARGET_NAMES)) if t]

    rows = build_rows(runs, scenarios, targets)
    checks = check_targets(rows, targets, quick)
    status = {s: {t: status_of(runs.get(s, {}).get(t)) for t in targets} for s in scenarios}
    info = machine_info(args)

    # Keep the raw results and log excerpts next to the summary.
    raw_out = out / "raw"
    if raw_out.resolve() != raw.resolve():
        if raw_out.exists():
            shutil.rmtree(raw_out)
        shutil.copytree(raw, raw_out)

    series = latency_series(runs, targets)
    plot = None
    for stale in (out / "latency.png", out / "latency.svg"):
        if stale.exists():
            stale.unlink()
    if plot_png(series, targets, out / "latency.png"):
        plot = "latency.png"
    elif plot_svg(series, targets, out / "latency.svg"):
        plot = "latency.svg"

    fo = runs.get("failover", {}).get("jetmq3")
    fo_plot = None
    stale = out / "failover.png"
    if stale.exists():
        stale.unlink()
    if fo and not get(fo, "not_run") and plot_failover(fo, out / "failover.png"):
        fo_plot = "failover.png"

    doc = {
        "machine": info,
        "command": args.command,
        "quick": quick,
        "scenarios": scenarios,
        "targets": targets,
        "status": status,
        "table": [{k: v for k, v in r.items() if k != "fmt"} for r in rows],
        "targets_from_issue": checks,
        "plot": plot,
        "failover_plot": fo_plot,
        "runs": runs,
    }
    (out / "latest.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")

    md = [f"# jetmq benchmark: {info['date']}", "",
          f"Command: `{args.command}`{' (quick mode)' if quick else ''}", "",
          f"Machine: {info['nproc']} cores ({info['cpu']}), {info['memory_gib']} GiB, kernel {info['kernel']}; "
          f"{info['mosquitto']}; nats-server {info['nats_server']}; {info['rustc']}; repository at {info['jetmq_commit']}, "
          f"jetmq-broker measured: {info['jetmq_broker']}", "",
          "↑ higher is better, ↓ lower is better; ratios are jetmq ÷ peer (j1 = jetmq on 1 NATS node, "
          "j3 = 3 jetmq nodes over a 3-node NATS cluster).", "",
          render_table(rows, targets, markdown=True), "", "## Run status", "",
          "| scenario | " + " | ".join(TARGET_NAMES.get(t, t) for t in targets) + " |",
          "|---|" + "---|" * len(targets)]
    for s in scenarios:
        md.append(f"| {SCENARIO_TITLES.get(s, s)} | " + " | ".join(" ".join(status[s][t].replace("|", "/").split()) for t in targets) + " |")
    md += ["", "## Targets from the issue", "", "| target | jetmq | got | want | met |", "|---|---|---|---|---|"]
    for c in checks:
        got = "-" if c["got"] is None else (f"{c['got']:.2f}" if isinstance(c["got"], float) else str(c["got"]))
        met = "n/a" if c["met"] is None else ("yes" if c["met"] else "**no**")
        md.append(f"| {c['target']} | {TARGET_NAMES[c['jetmq']]} | {got} | {c['want']} | {met} |")
    if plot:
        md += ["", f"![latency percentiles]({plot})"]
    if fo and not get(fo, "not_run"):
        md += failover_md(fo, fo_plot)
    for t in targets:
        kd = runs.get("kafka", {}).get(t)
        if kd and not get(kd, "not_run") and (get(kd, "direct") or get(kd, "error")):
            md += kafka_md(kd)
    (out / "latest.md").write_text("\n".join(md) + "\n")

    print()
    print(render_table(rows, targets, markdown=False))
    print()
    for s in scenarios:
        bad = {t: v for t, v in status[s].items() if v != "ok"}
        if bad:
            print(f"{SCENARIO_TITLES.get(s, s)}: " + "; ".join(f"{TARGET_NAMES.get(t, t)}: {v}" for t, v in bad.items()))
    print()
    for c in checks:
        met = "n/a" if c["met"] is None else ("met" if c["met"] else "MISSED")
        print(f"{TARGET_NAMES[c['jetmq']]:16} {c['target']:40} got {c['got']} want {c['want']}: {met}")
    print(f"\nwrote {out / 'latest.json'}, {out / 'latest.md'}" + (f", {out / plot}" if plot else "")
          + (f", {out / fo_plot}" if fo_plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
