"""Prometheus metrics of one server under vLLM's names, types and labels (the `vllm:` prefix, `model_name` on every
series, `finished_reason` on finished requests), so that dashboards and alerts written for vLLM work unchanged.
Each server has a registry of its own (servers in one process, as in the tests, do not share counters).

Every engine sequence counts as a request, as in vLLM, whose n samples of a prompt are n requests in its engine.
"""

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tritium.engine.llm_engine import LLMEngine
from tritium.engine.sampling_params import SamplingParams

FINISHED_REASONS = ("stop", "length", "abort", "error")
# Seconds on a 1-2.5-5 grid from 1 ms to an hour; token counts on a 1-2-5 grid up to a million.
_SECONDS = tuple(m * 10.0**e for e in range(-3, 4) for m in (1, 2.5, 5) if m * 10.0**e <= 3600)
_TOKENS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5) if m * 10**e <= 10**6)


@dataclass
class SeqTimes:
    """When a sequence arrived, was first scheduled, and got its first and latest tokens (perf_counter seconds);
    and its prompt's length."""

    arrival: float
    prompt_len: int
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.running = self._gauge("num_requests_running", "Requests in the running batch")
        self.waiting = self._gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = self._gauge("kv_cache_usage_perc", "Share of KV-cache pages in use, a fraction 0..1")
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens of requests that started generating")
        self.generation_tokens = self._counter("generation_tokens", "Tokens generated")
        self.preemptions = self._counter("num_preemptions", "Requests preempted (their KV pages taken back)")
        self.prefix_queries = self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = self._counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        success = Counter("vllm:request_success", "Requests finished, by reason", ["model_name", "finished_reason"],
                          registry=self.registry)
        self.finished = {reason: success.labels(model_name, reason) for reason in FINISHED_REASONS}
        h = self._histogram
        self.ttft = h("time_to_first_token_seconds", "From arrival to the first generated token")
        self.inter_token = h("inter_token_latency_seconds", "Between two generated tokens of a request")
        self.e2e = h("e2e_request_latency_seconds", "From arrival to the end of a request")
        self.queue_time = h("request_queue_time_seconds", "From arrival to being first scheduled")
        self.prefill_time = h("request_prefill_time_seconds", "From being first scheduled to the first token")
        self.decode_time = h("request_decode_time_seconds", "From the first token to the last")
        self.inference_time = h("request_inference_time_seconds", "From being first scheduled to the last token")
        self.time_per_output_token = h("request_time_per_output_token_seconds",
                                       "A request's decode time over its tokens after the first")
        self.request_prompt_tokens = h("request_prompt_tokens", "Prompt length of a request", _TOKENS)
        self.request_generation_tokens = h("request_generation_tokens", "Tokens a request generated", _TOKENS)
        self.request_max_tokens = h("request_max_num_generation_tokens", "max_tokens a request asked for", _TOKENS)
        self.params_max_tokens = h("request_params_max_tokens", "The max_tokens parameter of a request", _TOKENS)
        self.params_n = h("request_params_n", "The n parameter of a request", (1, 2, 5, 10, 20))
        self.iteration_tokens = h("iteration_tokens_total", "Tokens run through the model in one engine step",
                                  _TOKENS)
        self._preemptions_seen = self._queries_seen = self._hits_seen = 0

    def _gauge(self, name: str, doc: str):
        return Gauge(f"vllm:{name}", doc, ["model_name"], registry=self.registry).labels(self.model_name)

    def _counter(self, name: str, doc: str):
        return Counter(f"vllm:{name}", doc, ["model_name"], registry=self.registry).labels(self.model_name)

    def _histogram(self, name: str, doc: str, buckets: tuple = _SECONDS):
        return Histogram(f"vllm:{name}", doc, ["model_name"], buckets=buckets,
                         registry=self.registry).labels(self.model_name)

    def tokens(self, times: SeqTimes, now: float, new: int) -> None:
        """`new` tokens of a sequence arrived at `now`."""
        self.generation_tokens.inc(new)
        if times.first_token is None:
            self.prompt_tokens.inc(times.prompt_len)
            self.ttft.observe(now - times.arrival)
            times.first_token = now
        else:
            self.inter_token.observe((now - times.last_token) / new)
        times.last_token = now

    def finish(self, times: SeqTimes, reason: str, now: float, output_len: int, params: SamplingParams) -> None:
        """A sequence ended; the latency and length histograms take those that ran to a stop or their length."""
        self.finished[reason].inc()
        if reason not in ("stop", "length") or times.first_token is None:
            return
        scheduled = times.scheduled if times.scheduled is not None else times.arrival
        self.e2e.observe(now - times.arrival)
        self.queue_time.observe(scheduled - times.arrival)
        self.prefill_time.observe(times.first_token - scheduled)
        self.decode_time.observe(times.last_token - times.first_token)
        self.inference_time.observe(times.last_token - scheduled)
        if output_len > 1:
            self.time_per_output_token.observe((times.last_token - times.first_token) / (output_len - 1))
        for histogram, value in ((self.request_prompt_tokens, times.prompt_len), (self.request_generation_tokens,
                                 output_len), (self.request_max_tokens, params.max_tokens),
                                 (self.params_max_tokens, params.max_tokens), (self.params_n, params.n)):
            histogram.observe(value)

    def engine_state(self, engine: LLMEngine, stepped: bool) -> None:
        """The gauges from the engine as it stands, and (after a step) what the step ran and the counters it moved."""
        sched, pages = engine.scheduler, engine.pages
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.kv_usage.set(1 - pages.num_free / pages.num_pages)
        if stepped:
            self.iteration_tokens.observe(engine.last_step.num_tokens)
        self.preemptions.inc(sched.num_preemptions - self._preemptions_seen)
        self.prefix_queries.inc(pages.queried_tokens - self._queries_seen)
        self.prefix_hits.inc(pages.hit_tokens - self._hits_seen)
        self._preemptions_seen, self._queries_seen = sched.num_preemptions, pages.queried_tokens
        self._hits_seen = pages.hit_tokens

    def render(self) -> bytes:
        return generate_latest(self.registry)
