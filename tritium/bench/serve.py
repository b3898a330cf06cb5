"""`tritium bench serve`: load on any OpenAI-compatible server, measured from the client side.

Streaming `/v1/completions` requests arrive at a Poisson rate (or all at once); each one's time to first
token (TTFT), time per output token after the first (TPOT), the gaps between streamed chunks (inter-token
latency, ITL) and end-to-end latency are recorded, and the run reports throughput and p50/p90/p99 of each.
"""

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from tqdm import tqdm

from tritium.bench.environment import describe_environment
from tritium.bench.plots import plot_latency_cdfs

# Random prompts are words drawn from this list: any tokenizer splits them into about one token each.
WORDS = ("the of and to in is for that with as on by this from at or be are it an was which not can all have "
         "one more time will these other some when their each two up use how into what than then them would way "
         "first many about could its over only such new also like after most may just where any used must").split()


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0  # seconds from sending to the first streamed text
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)  # seconds between streamed chunks after the first
    error: str = ""


def load_prompts(path: Path | None, count: int, input_len: tuple[int, int], output_len: tuple[int, int],
                 seed: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens) pairs: from a JSONL file of {"prompt": str} lines (cycled), else random words."""
    rng = random.Random(seed)
    if path is not None:
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                item = json.loads(line)
                if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                    raise ValueError(f"{path}:{number}: each line must be {{\"prompt\": str}}")
                texts.append(item["prompt"])
        if not texts:
            raise ValueError(f"{path} holds no prompts")
        return [(texts[i % len(texts)], rng.randint(*output_len)) for i in range(count)]
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(*input_len))), rng.randint(*output_len))
            for _ in range(count)]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    res, last, chunks = Result(ok=False), None, 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                res.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return res
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):  # the usage chunk at the end
                    continue  # a chunk with choices carries one engine step's tokens, even if their text is empty
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last, chunks = now, chunks + 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.latency = time.perf_counter() - start
    res.output_tokens = res.output_tokens or chunks
    res.ok = last is not None
    res.error = "" if res.ok else "no text streamed"
    return res


async def _run(url: str, model: str, prompts: list[tuple[str, int]], rate: float, api_key: str | None,
               seed: int) -> tuple[list[Result], float]:
    rng = random.Random(seed + 1)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(None, connect=30), limits=limits) as client:
        bar = tqdm(total=len(prompts), desc="requests", unit="request")

        async def timed(prompt: str, max_tokens: int) -> Result:
            r = await _one(client, url, model, prompt, max_tokens)
            bar.update(1)
            return r

        start, tasks = time.perf_counter(), []
        for prompt, max_tokens in prompts:
            tasks.append(asyncio.create_task(timed(prompt, max_tokens)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        bar.close()
    return list(results), time.perf_counter() - start


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"p50": pick(0.50) * 1e3, "p90": pick(0.90) * 1e3, "p99": pick(0.99) * 1e3}


def run_serve_bench(
    url: str, num_prompts: int = 64, request_rate: float = float("inf"), prompts_path: Path | None = None,
    input_len: tuple[int, int] = (100, 1024), output_len: tuple[int, int] = (100, 1024), model: str | None = None,
    api_key: str | None = None, seed: int = 0, out_dir: Path = Path("benchmarks/results"),
) -> dict:
    """Send the requests, print the summary, write JSON and a latency plot into out_dir; returns the report."""
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if model is None:
        listing = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
        listing.raise_for_status()
        model = listing.json()["data"][0]["id"]
    prompts = load_prompts(prompts_path, num_prompts, input_len, output_len, seed)
    results, elapsed = asyncio.run(_run(url, model, prompts, request_rate, api_key, seed))
    good = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in good)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]
    report = {
        "client": describe_environment(torch.device("cpu")), "url": url, "model": model,
        "num_prompts": num_prompts, "request_rate": request_rate, "seconds": elapsed,
        "completed": len(good), "failed": len(results) - len(good),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "requests_per_s": len(good) / elapsed, "output_tokens_per_s": out_tokens / elapsed,
        "ttft_ms": _percentiles([r.ttft for r in good]), "tpot_ms": _percentiles(tpot),
        "itl_ms": _percentiles([x for r in good for x in r.itl]), "latency_ms": _percentiles([r.latency for r in good]),
        "requests": [{"ok": r.ok, "ttft": r.ttft, "latency": r.latency, "output_tokens": r.output_tokens,
                      "error": r.error} for r in results],
    }
    _print(report)
    env = report["client"]  # the client machine; the server's card is the server's to report
    rate = "burst" if math.isinf(request_rate) else f"rate{request_rate:g}"
    name = f"serve-{model.replace('/', '_')}-{num_prompts}req-{rate}-{env['date'][:10]}-{env['commit']}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1))
    plot_latency_cdfs({"TTFT": [r.ttft * 1e3 for r in good], "TPOT": [t * 1e3 for t in tpot],
                       "ITL": [x * 1e3 for r in good for x in r.itl]}, f"{model} at {url} ({env['commit']})",
                      out_dir / f"{name}.png")
    print(f"wrote {out_dir / name}.json and .png")
    return report


def _print(report: dict) -> None:
    print(f"{report['model']} at {report['url']}: {report['completed']} of {report['num_prompts']} requests "
          f"completed in {report['seconds']:.1f} s ({report['requests_per_s']:.2f} req/s, "
          f"{report['output_tokens_per_s']:.0f} output tok/s)")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "latency_ms"):
        p = report[key]
        print(f"  {key[:-3].upper():8s} p50 {p['p50']:9.1f} ms   p90 {p['p90']:9.1f} ms   p99 {p['p99']:9.1f} ms")
    for error in report["errors"]:
        print(f"  error: {error}")
