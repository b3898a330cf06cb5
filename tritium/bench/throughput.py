"""`tritium bench throughput`: offline generation speed of the engine, with Hugging Face transformers as the peer.

Random weights in a real model's shape (no download) or a model folder; prompts of random token ids with
input and output lengths drawn uniformly, EOS ignored. Reports requests/s and tokens/s, and for each decode
step (a step that runs only decodes) the share of the memory roofline it reached: the bytes the step must
read (every weight once, but of a MoE layer only the experts its tokens are expected to pick under uniform
routing; plus each sequence's cached K/V) over the copy bandwidth measured in the same run, divided by the step's
time: from the previous step's tokens on the host to this step's (the engine launches a decode before reading
back the one before it; timing a step alone would stall that overlap). `--single` runs one stream instead (the
latency mode).

With tensor parallelism (N ranks) the roofline is one GPU's: the bytes the rank that reads the most must read (its
weights, about 1/N of them, and the K/V of its own heads) over one GPU's copy bandwidth. The all-reduce share of a
decode step is the time of its 2 x layers + 1 all-reduces of the batch's hidden states, each timed alone on the
ranks after the run, over the step's time. The transformers peer runs with one rank on a GPU only.
"""

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tritium.bench.ceilings import measure_ceilings
from tritium.bench.environment import describe_environment
from tritium.bench.hf_peer import hf_model_like, hf_state_dict
from tritium.bench.plots import plot_step_roofline
from tritium.engine.config import EngineConfig
from tritium.engine.llm_engine import LLMEngine
from tritium.engine.sampling_params import SamplingParams
from tritium.models.config import ModelConfig
from tritium.models.shapes import MODEL_SHAPES, shape_config
from tritium.models.source import resolve_model


@dataclass(frozen=True)
class Workload:
    num_prompts: int = 256
    input_len: tuple[int, int] = (100, 1024)
    output_len: tuple[int, int] = (100, 1024)
    seed: int = 0

    def requests(self, vocab_size: int) -> list[tuple[list[int], int]]:
        """(prompt token ids, output length) pairs, lengths uniform in their ranges (inclusive)."""
        g = torch.Generator().manual_seed(self.seed)

        def draw(lo: int, hi: int) -> int:
            return int(torch.randint(lo, hi + 1, (1,), generator=g))

        out = []
        for _ in range(self.num_prompts):
            n_in, n_out = draw(*self.input_len), draw(*self.output_len)
            out.append((torch.randint(0, vocab_size, (n_in,), generator=g).tolist(), n_out))
        return out


def run_throughput_bench(
    model: str, workload: Workload, single: bool = False, hf_prompts: int = 32,
    out_dir: Path = Path("benchmarks/results"), config: EngineConfig | None = None,
) -> dict:
    """Time the engine (and transformers' generate on a subset) on one workload; write JSON + PNG into out_dir.
    Without a GPU it runs only when config.device is "cpu" (a check of the code path, not a measurement)."""
    config = dataclasses.replace(config or EngineConfig(), skip_tokenizer_init=True)
    if config.device is None and not torch.cuda.is_available():
        raise RuntimeError("tritium bench throughput needs a GPU (--device cpu runs it on the CPU: a check of the "
                           "code path, not a measurement)")
    device, tp = config.torch_device(), config.tensor_parallel_size
    source, raw_config = _model_source(model, config.revision)
    if single:
        workload = Workload(1, workload.input_len, workload.output_len, workload.seed)
    env = describe_environment(device)
    ceilings = measure_ceilings(device)  # one GPU's (GPU 0's under tensor parallelism)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    engine = LLMEngine(source, config)
    cfg = engine.model_config
    requests = workload.requests(cfg.vocab_size)
    _warm_up(engine, requests)
    sizes = engine.runner.sizes()  # of the rank that reads the most; an fp8 cache's K/V bytes are half
    kv_dtype = config.torch_kv_dtype(config.torch_dtype(device))
    steps, elapsed = _timed_steps(engine, requests, sizes, ceilings["copy_tb_per_s"])
    decode = [r for r in steps if r["decode_only"]]
    if tp > 1 and decode:
        _all_reduce_shares(engine, decode)
    n_in = sum(len(ids) for ids, _ in requests)
    n_out = sum(n for _, n in requests)
    report = {
        "environment": env, "ceilings": ceilings, "model": model, "workload": workload.__dict__, "single": single,
        "engine_config": {k: str(v) for k, v in dataclasses.asdict(config).items()},
        "tensor_parallel_size": tp, "rank_bytes": sizes,
        "kv_cache": {"dtype": str(kv_dtype).removeprefix("torch."), "pages": engine.pages.num_pages,
                     "page_size": engine.pages.page_size,
                     "tokens": engine.pages.num_pages * engine.pages.page_size},
        "tritium": {
            "seconds": elapsed, "requests_per_s": len(requests) / elapsed, "output_tokens_per_s": n_out / elapsed,
            "total_tokens_per_s": (n_in + n_out) / elapsed, "steps": len(steps), "decode_steps": len(decode),
            **_medians(decode),
            # the decode-only steps alone: where the K/V read dominates a long-context batch (prefills excluded)
            "decode_output_tokens_per_s": (1e3 * sum(r["tokens"] for r in decode) / sum(r["ms"] for r in decode)
                                           if decode else math.nan),
        },
        "steps": steps,
    }
    hf_weights = None
    if hf_prompts and tp == 1 and device.type == "cuda" and _has_transformers():
        # kept on the host while the engine's KV pool is released
        hf_weights = {k: v.detach().to("cpu") for k, v in hf_state_dict(engine.runner.model).items()}
    dtype = config.torch_dtype(device)
    engine.shutdown()
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report["transformers"] = None
    if hf_weights is not None:
        hf = hf_model_like(hf_weights, raw_config, cfg.family, dtype)
        del hf_weights
        report["transformers"] = _transformers_peer(hf, requests[:hf_prompts])
    _print(report)
    name = result_name(env, model, single, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1))
    plot_step_roofline(steps, f"{model} on {env['card']} ({env['commit']})", out_dir / f"{name}.png")
    print(f"wrote {out_dir / name}.json and .png")
    return report


def _model_source(model: str, revision: str | None) -> tuple[Path | ModelConfig, dict]:
    """What the engine loads (a model shape's config with random weights, or a resolved folder) and the raw
    config.json fields the transformers peer is built from."""
    if model in MODEL_SHAPES:
        return shape_config(model), {**MODEL_SHAPES[model], "torch_dtype": "bfloat16"}
    source = resolve_model(model, revision)
    return source, json.loads((source / "config.json").read_text())


def _timed_steps(engine: LLMEngine, requests: list[tuple[list[int], int]], sizes: dict,
                 copy_tb_per_s: float) -> tuple[list[dict], float]:
    """Run the requests to the end; each step's row (ms, sequences, tokens, and for a decode-only step its share of
    the roofline) and the seconds the whole run took."""
    cfg = engine.model_config
    steps, start = [], time.perf_counter()
    for i, (ids, n_out) in enumerate(requests):
        engine.add_request(ids, SamplingParams(temperature=1.0, max_tokens=n_out, ignore_eos=True), str(i))
    with tqdm(total=len(requests), desc="generating", unit="request") as bar:
        t0 = start
        while engine.has_unfinished():
            finished = engine.step()
            # From the last step's tokens on the host to this one's: no sync between, the next decode is queued.
            t1 = time.perf_counter()
            ms, t0 = (t1 - t0) * 1e3, t1
            s = engine.last_step
            row = {"ms": ms, "seqs": s.num_seqs, "tokens": s.num_tokens, "decode_only": s.num_tokens == s.num_seqs}
            if row["decode_only"]:
                weights = sizes["weight_bytes"] + sizes["expert_bytes"] * active_expert_share(cfg, s.num_seqs)
                read = weights + s.context_tokens * sizes["kv_bytes_per_token"]
                row["roofline"] = read / (copy_tb_per_s * 1e9) / ms
            steps.append(row)
            bar.update(len(finished))
    return steps, time.perf_counter() - start


def _all_reduce_shares(engine: LLMEngine, decode: list[dict]) -> None:
    """Each decode step's all-reduce share: 2 per layer and 1 for the embedding, of its batch's hidden states, each
    timed alone on the ranks (engine.runner.all_reduce_ms), over the step's time."""
    per_step = 2 * engine.model_config.num_layers + 1
    ms = engine.runner.all_reduce_ms(sorted({r["seqs"] for r in decode}))
    for r in decode:
        r["all_reduce_share"] = per_step * ms[r["seqs"]] / r["ms"]


def _medians(decode: list[dict]) -> dict:
    """The decode steps' roofline share (median and time-weighted) and all-reduce share (the same, when measured)."""
    out = {}
    for key, name in (("roofline", "decode_roofline"), ("all_reduce_share", "decode_all_reduce_share")):
        rows = [r for r in decode if key in r]
        out[f"{name}_median"] = statistics.median(r[key] for r in rows) if rows else math.nan
        # time-weighted: the share of all the decode steps' measured time
        out[f"{name}_overall"] = sum(r[key] * r["ms"] for r in rows) / sum(r["ms"] for r in rows) if rows else math.nan
    return out


def active_expert_share(config: ModelConfig, num_tokens: int) -> float:
    """The share of a MoE layer's experts that `num_tokens` tokens pick, as expected under uniform routing:
    1 - (1 - k / E) ** tokens (0 for a dense model)."""
    if not config.num_experts:
        return 0.0
    return 1.0 - (1.0 - config.experts_per_token / config.num_experts) ** num_tokens


def result_name(env: dict, model: str, single: bool, config: EngineConfig) -> str:
    """The results' file stem: card, model, mode (single or batch, eager, a page size other than 16, an fp8 KV cache,
    tensor parallelism), date, commit, so that runs of one commit in different modes do not overwrite each other."""
    mode = ("single" if single else "batch") + ("-eager" if config.enforce_eager else "")
    if config.block_size != 16:
        mode += f"-page{config.block_size}"
    if config.kv_cache_dtype != "auto":
        mode += "-kv" + config.kv_cache_dtype.split("_")[0]
    if config.tensor_parallel_size > 1:
        mode += f"-tp{config.tensor_parallel_size}"
    card, model = env["card"].replace(" ", "_"), model.replace("/", "_")
    return f"throughput-{card}-{model}-{mode}-{env['date'][:10]}-{env['commit']}"


def _warm_up(engine: LLMEngine, requests: list[tuple[list[int], int]]) -> None:
    """Run, outside the timed region, the step shapes the run will meet: prefills, mixed steps, and decode steps at
    every power-of-two batch size up to the run's, so that cuBLAS's first calls on each shape and the allocator's
    growth are not timed (the engine compiled its attention kernels at start)."""
    size = 1
    while True:
        for i in range(size):
            ids = requests[i % len(requests)][0][:16]
            engine.add_request(ids, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), f"warm{size}-{i}")
        while engine.has_unfinished():
            engine.step()
        if size >= min(len(requests), engine.scheduler.max_seqs):
            break
        size *= 2
    if engine.config.torch_device().type == "cuda" and engine.config.tensor_parallel_size == 1:
        torch.cuda.synchronize()


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _transformers_peer(hf: torch.nn.Module, requests: list[tuple[list[int], int]]) -> dict:
    """transformers' generate on the same weights for a subset of the requests, in batches of 8 with left padding;
    each batch runs to its longest output, the output tokens counted are the ones asked for."""
    n_out, start = 0, time.perf_counter()
    for b in range(0, len(requests), 8):
        batch = requests[b:b + 8]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device="cuda")
        longest = max(n for _, n in batch)
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                        pad_token_id=0)
        n_out += sum(n for _, n in batch)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    n_in = sum(len(p) for p, _ in requests)
    return {"requests": len(requests), "seconds": elapsed, "output_tokens_per_s": n_out / elapsed,
            "total_tokens_per_s": (n_in + n_out) / elapsed}


def _print(report: dict) -> None:
    t, hf, tp, kv = report["tritium"], report["transformers"], report["tensor_parallel_size"], report["kv_cache"]
    print(f"{report['environment']['card']} | {report['model']} | commit {report['environment']['commit']}"
          + (f" | tensor parallel x{tp}" if tp > 1 else "")
          + f" | KV cache {kv['dtype']}: {kv['pages']} pages of {kv['page_size']} ({kv['tokens']} tokens)")
    print(f"tritium: {t['requests_per_s']:.2f} req/s, {t['output_tokens_per_s']:.0f} output tok/s, "
          f"{t['total_tokens_per_s']:.0f} total tok/s; decode steps {t['decode_steps']} at "
          f"{t['decode_roofline_median']:.0%} of the {'per-GPU ' if tp > 1 else ''}memory roofline (median), "
          f"{t['decode_roofline_overall']:.0%} time-weighted, {t['decode_output_tokens_per_s']:.0f} output tok/s")
    if tp > 1:
        print(f"all-reduces: {t['decode_all_reduce_share_median']:.0%} of a decode step (median), "
              f"{t['decode_all_reduce_share_overall']:.0%} time-weighted")
    if hf:
        print(f"transformers ({hf['requests']} requests): {hf['output_tokens_per_s']:.0f} output tok/s, "
              f"{hf['total_tokens_per_s']:.0f} total tok/s")
