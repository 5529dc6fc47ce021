"""A small parser for the Prometheus text exposition format (what /metrics serves)."""

from __future__ import annotations

import re

import harness

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Page:
    """One scrape: samples by (name, labels) and the declared types of the metric families."""

    def __init__(self, text: str):
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.types: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(maxsplit=3)
                assert name not in self.types, f"metric family {name} declared twice"
                self.types[name] = kind
                continue
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            assert m, f"malformed exposition line: {line!r}"
            labels = frozenset(_LABEL.findall(m.group(2) or ""))
            self.samples[(m.group(1), labels)] = float(m.group(3))

    def names(self) -> set[str]:
        """Sample names (histograms contribute their _bucket, _sum and _count series)."""
        return {name for name, _ in self.samples}

    def families(self) -> set[str]:
        return set(self.types)

    def value(self, name: str, **labels) -> float:
        """The value of the series `name` whose labels include `labels` (summed if several)."""
        want = set((k, str(v)) for k, v in labels.items())
        found = [v for (n, ls), v in self.samples.items() if n == name and want <= ls]
        assert found, f"no series {name}{labels or ''} in\n{self.text}"
        return sum(found)

    def buckets(self, name: str, **labels) -> list[tuple[float, float]]:
        """(le, cumulative count) of histogram `name`, ordered by le."""
        want = set((k, str(v)) for k, v in labels.items())
        out = []
        for (n, ls), v in self.samples.items():
            if n == f"{name}_bucket" and want <= ls:
                le = dict(ls)["le"]
                out.append((float("inf") if le == "+Inf" else float(le), v))
        return sorted(out)


def scrape(url: str, timeout: float = 5.0) -> Page:
    status, body = harness.http_get(url, timeout=timeout)
    assert status == 200, f"GET {url}: HTTP {status}"
    return Page(body.decode())


def node_metrics(node: harness.BrokerNode, timeout: float = 5.0) -> Page:
    """The /metrics page of a jetmq-broker started by the harness."""
    return scrape(f"http://{node.host}:{node.http_port}/metrics", timeout=timeout)
