"""`tritium serve` as a process: it says when it runs without an API key, and SIGTERM lets a stream in flight
finish before the process exits."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.serving import MODEL


def test_sigterm_lets_the_stream_in_flight_finish():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "tritium.cli", "serve", "--port", str(port), "--max-model-len",
                             "256"], stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 120, "ignore_eos": True, "stream": True}
        texts, events = [], []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if not texts:
                    proc.send_signal(signal.SIGTERM)
                if line.startswith("data: "):
                    events.append(line)
                    if line != "data: [DONE]":
                        texts.append(json.loads(line[6:])["choices"][0])
        assert events[-1] == "data: [DONE]" and texts[-1]["finish_reason"] == "length"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
    finally:
        proc.kill()
        stderr = proc.stderr.read()
    assert "No --api-key" in stderr and "loopback only" in stderr
