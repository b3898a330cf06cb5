"""Prometheus metrics of one server: load, KV-cache use, token counts and latencies, in a registry of its own
(so that servers in one process, as in the tests, do not share counters)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("tritium_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("tritium_num_requests_waiting", "Requests waiting for KV-cache pages", registry=r)
        self.kv_usage = Gauge("tritium_kv_cache_usage_ratio", "Share of KV-cache pages in use (0 to 1)", registry=r)
        self.prompt_tokens = Counter("tritium_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("tritium_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("tritium_requests", "Requests ended, by finish reason", ["finish_reason"],
                                registry=r)
        self.ttft = Histogram("tritium_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("tritium_time_per_output_token_seconds", "Between two generated tokens of a sequence",
                              buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
