"""The server's logs, through `logging`: a line per finished request (id, status, prompt and output tokens,
latency), a periodic stats line (throughput, running and waiting requests, KV-cache use); --disable-log-requests
drops the first. And the command line's serving options reach the server's config."""

import logging
import re

import httpx
import pytest

from tests.serving import MODEL, running_server

REQUEST_LINE = r"request (cmpl-\w+-\d+): status (\d+), prompt tokens (\d+), output tokens (\d+), latency [\d.]+ s"


def test_a_line_per_finished_request_and_a_stats_line(caplog):
    with running_server(max_model_len=64) as (url, engine), caplog.at_level(logging.INFO, "tritium.server"):
        engine.stats.interval = 0.0  # a stats line after every step
        ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 3,
                                                       "ignore_eos": True, "n": 2}, timeout=60)
        refused = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": [1, 2], "seed": 2**64})
        engine.stats.interval = 1e9
    assert ok.status_code == 200 and refused.status_code == 400
    lines = [r.getMessage() for r in caplog.records if r.name == "tritium.server"]
    requests = [m.groups() for line in lines if (m := re.fullmatch(REQUEST_LINE, line))]
    assert requests == [(ok.json()["id"] + "-0", "200", "3", "6")]  # the refused one never reached the engine
    stats = [line for line in lines if line.startswith("prompt throughput")]
    assert stats and re.fullmatch(r"prompt throughput [\d.]+ tokens/s, generation throughput [\d.]+ tokens/s, "
                                  r"running \d+ requests, waiting \d+ requests, KV-cache usage [\d.]+%", stats[0])


def test_disable_log_requests(caplog):
    with running_server(max_model_len=64, server={"log_requests": False}) as (url, _), \
            caplog.at_level(logging.INFO, "tritium.server"):
        assert httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}).is_success
    assert not [r for r in caplog.records if r.getMessage().startswith("request ")]


def test_serve_options_reach_the_server_config(monkeypatch):
    import tritium.server.serve
    from tritium.cli import main

    seen = []
    monkeypatch.setattr(tritium.server.serve, "run_server", lambda model, config, engine, *a: seen.append(config) or 0)
    assert main(["serve", "--timeout-keep-alive", "2", "--timeout-header", "3.5", "--max-connections", "9",
                 "--shutdown-timeout", "4", "--disable-log-requests", "--port", "1234"]) == 0  # served, then stopped
    (config,) = seen
    assert (config.timeout_keep_alive, config.timeout_header, config.max_connections, config.shutdown_timeout,
            config.log_requests, config.port) == (2, 3.5, 9, 4, False, 1234)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--timeout-header", "0"])
    assert exit_info.value.code == 2
