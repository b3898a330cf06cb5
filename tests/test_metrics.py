"""/metrics under vLLM's names, types and labels (tritium/server/metrics.py): every metric docs/metrics.md lists and
every series the shipped Grafana dashboard queries is there after a few requests, and the counters move as the
requests say."""

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving import running_server

ROOT = Path(__file__).resolve().parents[1]
NAME = "served-demo"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


@pytest.fixture(scope="module")
def server():
    with running_server(name=NAME, max_model_len=256) as running:
        yield running


def listed_metrics() -> dict[str, str]:
    """name -> type, from the table in docs/metrics.md."""
    table = (ROOT / "docs/metrics.md").read_text()
    rows = re.findall(r"^\| `(vllm:[a-z0-9_]+)` \| (gauge|counter|histogram) \|", table, re.MULTILINE)
    assert len(rows) >= 15
    return dict(rows)


def dashboard_series() -> set[str]:
    """Every metric name in the dashboard's queries (panels and template variables)."""
    dashboard = json.loads((ROOT / "docs/grafana/tritium-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {name for e in exprs for name in re.findall(r"vllm:[a-z0-9_]+", e)}


def scrape(url: str) -> tuple[dict[str, str], dict[tuple[str, frozenset], float]]:
    """(family name -> type, (sample name, labels) -> value) of the server's /metrics."""
    families = list(text_string_to_metric_families(httpx.get(url + "/metrics").text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return {f.name: f.type for f in families}, samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset({"model_name": NAME, **labels}.items())), 0.0)


def test_listed_and_dashboard_metrics_are_exposed_after_requests(server):
    url = server[0]
    for body in ({"prompt": "The for statement", "max_tokens": 5, "n": 2, "ignore_eos": True},
                 {"prompt": ["Hello", "Hello"], "max_tokens": 3, "stop": ["\n"]}):
        assert httpx.post(url + "/v1/completions", json={"model": NAME, **body}, timeout=60).status_code == 200
    types, samples = scrape(url)
    names = {name for name, _ in samples}
    for metric, kind in listed_metrics().items():
        family = metric.removesuffix("_total") if kind == "counter" else metric
        assert types.get(family) == kind, f"{metric}: {types.get(family)}, docs say {kind}"
        for suffix in SUFFIXES[kind]:
            series = [labels for name, labels in samples if name == metric + suffix]
            assert series, f"{metric + suffix} is not on /metrics"
            assert all(dict(labels)["model_name"] == NAME for labels in series), metric
    queried = dashboard_series()
    assert len(queried) >= 15
    assert queried <= names, f"the dashboard queries series /metrics lacks: {sorted(queried - names)}"
    for reason in ("stop", "length", "abort", "error"):  # vLLM's finished_reason values, there from the start
        assert ("vllm:request_success_total", frozenset({"model_name": NAME, "finished_reason": reason}.items())) \
            in samples


def test_counters_and_histograms_move_with_a_request(server):
    url, engine = server
    _, before = scrape(url)
    r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "Hello there", "max_tokens": 4, "n": 2,
                                                  "ignore_eos": True}, timeout=60)
    assert r.status_code == 200
    _, after = scrape(url)
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    prompt_len = r.json()["usage"]["prompt_tokens"]
    assert delta("vllm:prompt_tokens_total") == 2 * prompt_len  # two samples, two requests as in vLLM
    assert delta("vllm:generation_tokens_total") == 8
    assert delta("vllm:request_success_total", finished_reason="length") == 2
    for histogram, count in (("time_to_first_token_seconds", 2), ("inter_token_latency_seconds", 6),
                             ("e2e_request_latency_seconds", 2), ("request_queue_time_seconds", 2),
                             ("request_prefill_time_seconds", 2), ("request_decode_time_seconds", 2),
                             ("request_time_per_output_token_seconds", 2), ("request_generation_tokens", 2)):
        assert delta(f"vllm:{histogram}_count") == count, histogram
    assert delta("vllm:request_generation_tokens_sum") == 8
    assert delta("vllm:request_prompt_tokens_sum") == 2 * prompt_len
    assert delta("vllm:request_params_n_sum") == 4 and delta("vllm:request_params_max_tokens_sum") == 8
    # The second sample's prompt pages came from the first's (prefix caching), so hits moved with the queries.
    assert delta("vllm:prefix_cache_queries_total") >= 2 * prompt_len
    assert delta("vllm:iteration_tokens_total_sum") >= prompt_len + 6
    assert value(after, "vllm:num_requests_running") == 0 and value(after, "vllm:kv_cache_usage_perc") == 0
    assert not engine.engine.has_unfinished()
