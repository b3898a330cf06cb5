"""A bounded soak of `tritium serve` (demo model, CPU): 2,000 mixed requests from many concurrent clients, streamed
and whole, completions and chat, some cut off by their client, some invalid. Every request ends with a result or an
error object (0 lost), the KV pages all come back (0 leaked), and the server's memory stays flat."""

import asyncio
import json
import random
import re
import time
from collections import Counter

import httpx

from tests.serving import MODEL, serve_process

REQUESTS, CLIENTS = 2000, 48
WARM_UP = 300  # requests before the first memory reading
RSS_GROWTH_LIMIT_MB = 40


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def _request(rng: random.Random) -> tuple[str, str, dict]:
    """(kind, path, body) of one random request."""
    prompt = " ".join(rng.choice(["for", "while", "import", "class", "the", "def", "return", "x"])
                      for _ in range(rng.randint(1, 12)))
    sampling = {"max_tokens": rng.randint(1, 6), "temperature": rng.choice([0, 0.7, 1.0]),
                "seed": rng.choice([None, rng.randint(0, 2**63 - 1)]), "ignore_eos": rng.random() < 0.5}
    completion = {"model": MODEL, "prompt": prompt, **sampling}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **sampling}
    roll = rng.random()
    if roll < 0.30:
        return "stream", "/v1/completions", {**completion, "stream": True, "n": rng.choice([1, 1, 2])}
    if roll < 0.50:
        return "whole", "/v1/completions", {**completion, "prompt": [prompt] * rng.choice([1, 2]),
                                            "logprobs": rng.choice([None, 2])}
    if roll < 0.65:
        stream = rng.random() < 0.5
        return "stream" if stream else "whole", "/v1/chat/completions", {**chat, "stream": stream}
    if roll < 0.77:
        return "cut stream", "/v1/completions", {**completion, "max_tokens": 40, "stream": True}
    if roll < 0.87:
        return "cut whole", "/v1/completions", {**completion, "max_tokens": 40}
    bad = rng.choice([{"seed": 2**64}, {"temperature": -1}, {"top_k": 2**40}, {"prompt": [10**6]},
                      {"stop": "\ud800"}, {"max_tokens": 10**6}, {"n": 100}, {"model": "other"}])
    return "invalid", "/v1/completions", {**completion, **bad}


async def _one(client: httpx.AsyncClient, url: str, kind: str, path: str, body: dict, rng: random.Random) -> str:
    """How the request ended: "ok", "error" (an error object), "cut" (its client left), or "lost: why"."""
    if kind == "cut whole":
        try:
            await asyncio.wait_for(client.post(url + path, content=_json(body)), timeout=rng.uniform(0.0, 0.2))
        except asyncio.TimeoutError:
            return "cut"
        return "ok"  # it finished before its client left
    if kind in ("stream", "cut stream"):
        async with client.stream("POST", url + path, content=_json(body)) as r:
            if r.status_code != 200:
                return f"lost: stream status {r.status_code} {(await r.aread())[:300]}"
            events = []
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if kind == "cut stream" and len(events) == 2:
                        return "cut"
        if events[-1:] != ["[DONE]"] or any("error" in json.loads(e) for e in events[:-1]):
            return f"lost: stream ended {events[-2:]}"
        return "ok"
    r = await client.post(url + path, content=_json(body))
    if kind != "invalid" and r.status_code == 200 and all(c["finish_reason"] in ("stop", "length")
                                                          for c in r.json()["choices"]):
        return "ok"
    if kind == "invalid" and r.status_code in (400, 404) and set(r.json()["error"]) == {"message", "type", "param",
                                                                                       "code"}:
        return "error"
    return f"lost: {r.status_code} {r.text[:200]}"


async def _soak(url: str, pid: int) -> tuple[Counter, Counter, list[float]]:
    rng = random.Random(0)
    work = [_request(rng) for _ in range(REQUESTS)]
    outcomes, kinds, rss = Counter(), Counter(kind for kind, _, _ in work), []
    queue: asyncio.Queue = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)

    async def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(timeout=120, headers={"content-type": "application/json"}) as client:
            while not queue.empty():
                kind, path, body = queue.get_nowait()
                try:
                    outcome = await _one(client, url, kind, path, body, rng)
                except Exception as exc:  # noqa: BLE001  a transport error is a lost request
                    outcome = f"lost: {type(exc).__name__}: {exc}"
                outcomes[outcome if outcome.startswith("lost") else (kind, outcome)] += 1
                if sum(outcomes.values()) in (WARM_UP, REQUESTS // 2):
                    rss.append(_rss_mb(pid))

    await asyncio.gather(*(client_loop(i) for i in range(CLIENTS)))
    return outcomes, kinds, rss


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()  # ASCII: a lone surrogate goes as its \\ud800 escape


def _metrics(url: str) -> dict[str, float]:
    """The server's samples by name, labels dropped (one model: one series per name here)."""
    lines = httpx.get(url + "/metrics").text.splitlines()
    return {name.split("{")[0]: float(value) for line in lines if not line.startswith("#")
            for name, value in [line.rsplit(" ", 1)]}


def test_soak_2000_mixed_requests_lose_none_leak_no_page_and_keep_memory_flat():
    with serve_process("--max-model-len", "256") as server:
        pid = server.proc.pid
        start = time.monotonic()
        outcomes, kinds, rss = asyncio.run(_soak(server.url, pid))
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 10  # aborts of the last cut requests are on their way
        while (m := _metrics(server.url))["vllm:kv_cache_usage_perc"] != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        rss.append(_rss_mb(pid))
        assert httpx.get(server.url + "/health").status_code == 200
    lost = {k: v for k, v in outcomes.items() if isinstance(k, str)}
    assert not lost, lost
    assert sum(outcomes.values()) == REQUESTS
    assert m["vllm:kv_cache_usage_perc"] == 0 and m["vllm:num_requests_running"] == 0
    assert m["vllm:num_requests_waiting"] == 0
    assert outcomes[("invalid", "error")] == kinds["invalid"] and outcomes[("cut stream", "cut")] > 100
    # One log line per request the engine saw: each whole answer and finished stream (200), each cut (499, unless
    # the answer was complete first), none for the invalid ones.
    statuses = Counter(re.findall(r"request \S+: status (\d+)", server.stderr))
    ok = outcomes[("stream", "ok")] + outcomes[("whole", "ok")]
    cut = outcomes[("cut stream", "cut")] + sum(outcomes[("cut whole", how)] for how in ("cut", "ok"))
    assert statuses.keys() <= {"200", "499"} and ok <= statuses["200"] and sum(statuses.values()) <= ok + cut
    assert "generation throughput" in server.stderr  # the stats line
    warm, _, end = rss
    assert end - warm < RSS_GROWTH_LIMIT_MB, rss
    print(f"\nsoak: {REQUESTS} requests by {CLIENTS} clients in {elapsed:.1f} s; outcomes "
          f"{dict(sorted((' '.join(k), v) for k, v in outcomes.items()))}; engine requests logged by status "
          f"{dict(statuses)}; server RSS {warm:.0f} MB after {WARM_UP} requests, {rss[1]:.0f} MB halfway, "
          f"{end:.0f} MB at the end; KV pages in use at the end: 0")
