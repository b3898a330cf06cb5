"""What an fp8 KV cache costs in accuracy: held-out perplexity and greedy agreement against the model's dtype.

The text is the demo model's held-out set (every 20th document of `scripts/train_demo_model.py`'s corpus, as this
Python carries it), cut into windows of 256 tokens as the training script's held-out loss cuts it. Each window runs as
one prefill through the engine's model and paged cache, so every key and value the model attends to is read back from
the pages: an fp8 cache's rounding is in every score. Three caches: the model's dtype, fp8 with scales of 1.0 (what a
checkpoint without scales gets) and fp8 with scales measured on the first step (--calculate-kv-scales).

Greedy agreement: the first 32 tokens of held-out documents as prompts, 64 greedy tokens each (EOS ignored); a token
agrees when the fp8 run has the same token at the same position as the model-dtype run (after the first difference
the two texts usually part ways, so the common prefix is reported too). Teacher-forced agreement: the fraction of
held-out positions whose most likely next token is the same, each position on the true text (no divergence).

    python scripts/kv_cache_accuracy.py                       # the demo model in bfloat16, on the CPU: about 2 minutes
    python scripts/kv_cache_accuracy.py --dtype float32 --out results.json
"""

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch

from tritium import LLM, SamplingParams, default_model_path
from tritium.bench.environment import describe_environment
from tritium.models.attention import AttentionMetadata

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train_demo_model.py"
WINDOW = 256
MODES = {"model dtype": {}, "fp8, scales 1.0": {"kv_cache_dtype": "fp8"},
         "fp8, calculated scales": {"kv_cache_dtype": "fp8", "calculate_kv_scales": True}}


def held_out_documents() -> list[str]:
    """The training script's held-out documents: every 20th of its corpus."""
    spec = importlib.util.spec_from_file_location("train_demo_model", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [d for i, d in enumerate(module.documents()) if i % 20 == 0]


def token_stream(llm: LLM, docs: list[str]) -> list[int]:
    """The documents as one stream of ids, each followed by the end-of-text token (as the training script joins
    them)."""
    eot = llm.engine.tokenizer.eos_token_id
    ids = []
    for doc in docs:
        ids += llm.engine.tokenizer.encode(doc, add_special_tokens=False) + [eot]
    return ids


@torch.inference_mode()
def window_scores(llm: LLM, stream: list[int], max_windows: int, batch: int = 8) -> tuple[float, torch.Tensor]:
    """(mean negative log-likelihood per token, most likely next token at every position) over windows of the
    stream, each a one-sequence prefill through the engine's model and KV pages."""
    engine = llm.engine
    model, caches, page = engine.runner.model, engine.runner.kv_caches, engine.pages.page_size
    device = model.lm_head.weight.device
    n = min(max_windows, (len(stream) - 1) // WINDOW)
    pages_per_window = -(-WINDOW // page)
    assert batch * pages_per_window <= engine.pages.num_pages, "the page pool is too small for a batch of windows"
    nll, argmax = 0.0, []
    for start in range(0, n, batch):
        count = min(batch, n - start)
        x = torch.tensor([stream[(start + i) * WINDOW:(start + i + 1) * WINDOW] for i in range(count)])
        y = torch.tensor([stream[(start + i) * WINDOW + 1:(start + i + 1) * WINDOW + 1] for i in range(count)])
        table = torch.arange(count * pages_per_window, dtype=torch.int32).view(count, pages_per_window)
        positions = torch.arange(WINDOW).repeat(count)
        slots = table.long()[:, positions[:WINDOW] // page] * page + positions[:WINDOW] % page
        meta = AttentionMetadata(
            cu_seqlens_q=torch.arange(0, (count + 1) * WINDOW, WINDOW, dtype=torch.int32, device=device),
            seqused_k=torch.full((count,), WINDOW, dtype=torch.int32, device=device),
            block_table=table.to(device), slot_mapping=slots.flatten().to(device), max_seqlen_q=WINDOW,
            max_seqlen_k=WINDOW, backend=engine.runner.backend)
        hidden = model(x.flatten().to(device), positions.to(device), meta, caches)
        logits = model.logits(hidden).cpu()
        nll += torch.nn.functional.cross_entropy(logits, y.flatten(), reduction="sum").item()
        argmax.append(logits.argmax(-1))
    return nll / (n * WINDOW), torch.cat(argmax)


def agreement(runs: list[list[int]], base: list[list[int]]) -> dict:
    same = sum(a == b for run, ref in zip(runs, base) for a, b in zip(run, ref))
    prefixes = [next((i for i, (a, b) in enumerate(zip(run, ref)) if a != b), len(ref)) for run, ref in zip(runs, base)]
    return {"tokens_agreeing": same / sum(len(ref) for ref in base), "mean_common_prefix": sum(prefixes) / len(runs),
            "prompts_identical": sum(p == len(ref) for p, ref in zip(prefixes, base)) / len(runs)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default_model_path(), help="model folder (default: the demo model)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--windows", type=int, default=64, help="held-out windows of 256 tokens, at most")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    docs = held_out_documents()
    report = {"environment": describe_environment(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
              "model": args.model, "dtype": args.dtype, "modes": {}}
    base_tokens = base_argmax = None
    for name, options in MODES.items():
        llm = LLM(args.model, dtype=args.dtype, **options)
        tokenizer = llm.engine.tokenizer
        prompts = [{"prompt_token_ids": tokenizer.encode(d, add_special_tokens=False)[:32]} for d in docs]
        prompts = [p for p in prompts if len(p["prompt_token_ids"]) == 32][:args.prompts]
        params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
        # Generation first: with calculate_kv_scales its first step (every prompt's prefill) sets the scales.
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        nll, argmax = window_scores(llm, token_stream(llm, docs), args.windows)
        attn = llm.engine.runner.model.model.layers[0].self_attn
        row = {"perplexity": math.exp(nll), "layer0_scales": [attn.k_scale.item(), attn.v_scale.item()]}
        if base_tokens is None:
            base_tokens, base_argmax, base_ppl = tokens, argmax, row["perplexity"]
        else:
            row.update(agreement(tokens, base_tokens))
            row["perplexity_vs_model_dtype"] = row["perplexity"] / base_ppl - 1
            row["teacher_forced_top1_agreeing"] = (argmax == base_argmax).float().mean().item()
        report["modes"][name] = row
        print(name, json.dumps(row))
    report["held_out_tokens"] = len(base_argmax)
    report["seconds"] = time.perf_counter() - start
    env = report["environment"]
    print(f"\n{args.model} ({args.dtype}) on {env['card']}, torch {env['torch']}, {env['date']}, commit "
          f"{env['commit']}; {report['held_out_tokens']} held-out tokens, {len(base_tokens)} prompts x "
          f"{args.tokens} greedy tokens\n")
    print("| KV cache | held-out perplexity | vs model dtype | greedy tokens agreeing | mean common prefix | "
          "prompts identical | teacher-forced top-1 agreeing |")
    print("|---|---|---|---|---|---|---|")
    for name, r in report["modes"].items():
        if "tokens_agreeing" not in r:
            print(f"| {args.dtype} | {r['perplexity']:.3f} | - | - | - | - | - |")
            continue
        print(f"| {name} | {r['perplexity']:.3f} | {100 * r['perplexity_vs_model_dtype']:+.2f}% | "
              f"{100 * r['tokens_agreeing']:.1f}% | {r['mean_common_prefix']:.1f} of {args.tokens} | "
              f"{100 * r['prompts_identical']:.0f}% | {100 * r['teacher_forced_top1_agreeing']:.2f}% |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
