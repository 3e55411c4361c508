"""The service's counters and histograms, rendered in the Prometheus text exposition format
(version 0.0.4) without a client library. Updated from the event loop thread only."""

from __future__ import annotations

import bisect
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ROUTES = ("/v1/predict", "/v1/explain", "/v1/info", "/healthz", "/metrics", "/", "/docs", "/openapi.json")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {acc}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum:.6f}", f"{name}_count{lab} {self.count}"]
        return out


class Metrics:
    """Requests by route and status, request latency, inputs, flagged inputs, batch sizes, queue depth."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.inputs = 0
        self.flagged = 0
        self.batches = Histogram(BATCH_BUCKETS)
        self.queue_depth = 0
        self.rejected_full = 0

    def request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "/v1/sample" if path.startswith("/v1/sample/") else "other"
        self.requests[(route, status)] += 1
        self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, size: int, flagged: int) -> None:
        self.batches.observe(size)
        self.inputs += size
        self.flagged += flagged

    def render(self) -> str:
        p = "backdoorlab"
        out = [f"# HELP {p}_requests_total HTTP requests answered, by route and status code.",
               f"# TYPE {p}_requests_total counter"]
        out += [f'{p}_requests_total{{route="{r}",code="{c}"}} {n}' for (r, c), n in sorted(self.requests.items())]
        out += [f"# HELP {p}_request_duration_seconds Time from a request's arrival to its answer.",
                f"# TYPE {p}_request_duration_seconds histogram"]
        for r, h in sorted(self.latency.items()):
            out += h.lines(f"{p}_request_duration_seconds", f'route="{r}"')
        out += [f"# HELP {p}_inputs_total Images answered by the guarded model.", f"# TYPE {p}_inputs_total counter",
                f"{p}_inputs_total {self.inputs}",
                f"# HELP {p}_flagged_total Images flagged as trojaned.", f"# TYPE {p}_flagged_total counter",
                f"{p}_flagged_total {self.flagged}",
                f"# HELP {p}_flagged_share Share of the answered images flagged as trojaned.",
                f"# TYPE {p}_flagged_share gauge", f"{p}_flagged_share {self.flagged / self.inputs if self.inputs else 0.0:.6f}",
                f"# HELP {p}_batch_inputs Images per batch through the model.", f"# TYPE {p}_batch_inputs histogram"]
        out += self.batches.lines(f"{p}_batch_inputs")
        out += [f"# HELP {p}_queue_depth Requests waiting for the model.", f"# TYPE {p}_queue_depth gauge",
                f"{p}_queue_depth {self.queue_depth}",
                f"# HELP {p}_rejected_queue_full_total Requests answered 503 because the queue was full.",
                f"# TYPE {p}_rejected_queue_full_total counter", f"{p}_rejected_queue_full_total {self.rejected_full}"]
        return "\n".join(out) + "\n"
