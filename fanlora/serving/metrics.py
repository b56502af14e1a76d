"""`GET /metrics`: the server's state in Prometheus' text format, through the ``prometheus_client`` library.

What an operator of a shared service watches (vLLM exports the same kinds under ``vllm:``): requests per
tenant and how they ended, time to first token and whole-request latency per tenant (histograms), tokens per
forward, and — read at scrape time from the scheduler and the engine, so nothing is counted twice — requests
waiting, rows running, KV blocks used and free, preemptions, adapters resident and in host memory, adapter loads
and evictions.

Each app has its own ``CollectorRegistry`` (tests build many apps in one process; the default global registry
would refuse the second). Observations come from the engine thread (a finished job, a forward); scrapes read
plain attributes, so a scrape never takes the scheduler's lock and never waits for a forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

BASE = "base"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Live(Collector):
    """Gauges read from the scheduler and engine at scrape time."""

    def __init__(self, scheduler: Any, engine: Any, host: Any = None) -> None:
        self.scheduler, self.engine, self.host = scheduler, engine, host

    def collect(self) -> Iterator[Any]:
        s = self.scheduler
        yield GaugeMetricFamily("fanlora_requests_waiting", "Admitted requests not yet decoding", value=s.waiting)
        rows = len(s.current)
        yield GaugeMetricFamily("fanlora_requests_running", "Requests being decoded", value=rows)
        kv = getattr(s, "kv", None)
        if kv is not None:
            blocks = GaugeMetricFamily("fanlora_kv_blocks", "Paged KV pool blocks", labels=["state"])
            blocks.add_metric(["used"], kv.capacity - len(kv.free))
            blocks.add_metric(["free"], len(kv.free))
            yield blocks
        yield GaugeMetricFamily(
            "fanlora_oldest_wait_seconds", "How long the longest-waiting request has waited", value=s.oldest_wait()
        )
        yield CounterMetricFamily(
            "fanlora_requests_late", "Requests that waited longer than --overload-seconds for a row", value=s.late
        )
        yield CounterMetricFamily(
            "fanlora_preemptions", "Prompts preempted to give a tenant a row", value=getattr(s, "preempted", 0)
        )
        if getattr(s, "team", None) is not None:  # serve --threads auto
            yield GaugeMetricFamily("fanlora_torch_threads", "torch's team on the engine thread", value=s.team.size)
        resident = len(self.engine.adapters)
        yield GaugeMetricFamily("fanlora_adapters_resident", "Adapters in the engine's slots", value=resident)
        evicted = self.engine.table.evictions
        yield CounterMetricFamily("fanlora_adapter_evictions", "Adapters evicted for --max-loras", value=evicted)
        if self.host is not None:
            yield GaugeMetricFamily(
                "fanlora_adapters_host", "Parsed adapters in host memory", value=len(self.host.items)
            )


class ServerMetrics:
    """The app's metrics; :meth:`finished` and :meth:`forward` are called by the scheduler's engine thread."""

    def __init__(self, scheduler: Any, engine: Any, host: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fanlora_requests", "Requests ended, by model and how", ["model", "finish"], registry=r)
        self.ttft = Histogram("fanlora_time_to_first_token_seconds", "Admission to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.latency = Histogram("fanlora_request_seconds", "Admission to end", ["model"], buckets=LATENCY_BUCKETS,
                                 registry=r)  # fmt: skip
        self.tokens = Histogram("fanlora_batched_tokens", "Tokens per forward", buckets=TOKEN_BUCKETS, registry=r)
        self.loads = Counter("fanlora_adapter_loads", "Adapters read from disk into a slot", registry=r)
        r.register(_Live(scheduler, engine, host))

    def finished(self, job: Any, now: float) -> None:
        model = job.adapter or BASE
        how = "cancelled" if job.cancelled and not job.finished else (job.finished or "aborted")
        self.requests.labels(model, how).inc()
        self.latency.labels(model).observe(now - job.started)
        if job.first_token is not None:
            self.ttft.labels(model).observe(job.first_token - job.started)

    def forward(self, tokens: int) -> None:
        self.tokens.observe(tokens)

    def text(self) -> bytes:
        return generate_latest(self.registry)
