"""`tritium serve` as a process on SIGTERM or SIGINT: it stops accepting, lets what is in flight run for
--shutdown-timeout, then ends each open stream with an error event and `data: [DONE]` and each whole request with
503, and exits 0 without a traceback. It says when it runs without an API key."""

import json
import signal
import threading
import time

import httpx
import pytest

from tests.serving import MODEL, serve_process

GRACE = 3.0


def _stream(url: str, body: dict, out: dict, started: threading.Event) -> None:
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        out["events"] = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                out["events"].append(None if line == "data: [DONE]" else json.loads(line[6:]))
                started.set()
    out["ended"] = time.monotonic()


def _whole(url: str, body: dict, out: dict) -> None:
    out["response"] = httpx.post(url + "/v1/completions", json=body, timeout=60)
    out["ended"] = time.monotonic()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_then_ends_what_outlasts_the_grace_period(sig):
    long = {"model": MODEL, "prompt": "Hello", "max_tokens": 1000, "ignore_eos": True}  # minutes on a CPU
    with serve_process("--max-model-len", "1100", "--shutdown-timeout", str(GRACE)) as server:
        url = server.url
        outs = [{} for _ in range(4)]
        started = [threading.Event() for _ in range(3)]
        threads = [threading.Thread(target=_stream, args=(url, long, outs[0], started[0])),
                   threading.Thread(target=_stream, args=(url, {**long, "prompt": "The for"}, outs[1], started[1])),
                   threading.Thread(target=_whole, args=(url, long, outs[3]))]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started[:2])
        short = threading.Thread(target=_stream, args=(url, {**long, "max_tokens": 3}, outs[2], started[2]))
        short.start()
        assert started[2].wait(60)
        server.proc.send_signal(sig)
        signalled = time.monotonic()
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(url + "/health")
        for t in (*threads, short):
            t.join(timeout=60)
        code = server.proc.wait(timeout=30)
        exited = time.monotonic()
    assert code == 0 and "Traceback" not in server.stderr, server.stderr
    assert outs[2]["events"][-1] is None and outs[2]["events"][-2]["choices"][0]["finish_reason"] == "length"
    for out in outs[:2]:  # cut at the deadline: text so far, then an error event and [DONE]
        events = out["events"]
        assert events[-1] is None and events[-2]["error"]["type"] == "server_error", events[-3:]
        assert "shut down" in events[-2]["error"]["message"] and "choices" in events[-3]
        assert GRACE - 0.5 < out["ended"] - signalled < GRACE + 3
    response = outs[3]["response"]
    assert response.status_code == 503 and "shut down" in response.json()["error"]["message"]
    assert exited - signalled < GRACE + 5
    assert "No --api-key" in server.stderr and "loopback only" in server.stderr
