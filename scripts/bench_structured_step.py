"""What a structured-output decode step costs over a free one, at one batch size (issue 17's target: <= 10% more at
batch 64, Llama 3.1 8B's shape on an H200). Also times penalized steps (presence, frequency, repetition).

The same random prompts run three times through one engine: free sampling, then every row under a JSON schema
(an array of objects that never closes, so no row ends early and the batch stays whole), then every row
penalized. Each decode step is timed as `tritium bench throughput` times it: from the previous step's tokens on
the host to this one's (a decode is launched before the one before it is read back). The medians of the steady
decode steps are compared; the host's mask-filling time per step is reported beside them.

    python scripts/bench_structured_step.py --model-config llama-3.1-8b --tokenizer DIR   # GPU, ~2 min
    python scripts/bench_structured_step.py --model tritium/default_model --batch 8 --steps 6   # CPU smoke run

`--tokenizer DIR` is a folder with the model's tokenizer.json (128,256 tokens for Llama 3.1). Without one, a
byte-level BPE of that size is trained on the Python standard library's source, so the masks cover a vocabulary
of the real size built the way real ones are (11 minutes on 2 busy CPU cores: give a tokenizer where you can)."""

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from tritium.engine.config import EngineConfig
from tritium.engine.llm_engine import LLMEngine
from tritium.engine.sampling_params import SamplingParams, StructuredOutputsParams
from tritium.models.shapes import MODEL_SHAPES, shape_config

RECORD = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 32}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
    "active": {"type": "boolean"}}, "required": ["name", "age", "email", "tags", "active"]}
NEVER_ENDING = {"type": "array", "items": RECORD, "minItems": 1_000_000}


def synthetic_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A byte-level BPE of `vocab_size` tokens (one of them the end of text) trained on the standard library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            try:
                yield path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):  # a few test files are Latin-1 on purpose
                continue

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|end_of_text|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    return folder


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, steps: int) -> tuple[list[float], int]:
    """Per-step milliseconds of `steps` decode steps with every prompt running, after the prefills and two warm-up
    decodes; and the number of sequences that were still running at the end (all of them, or the step is void)."""
    for i, ids in enumerate(prompts):
        engine.add_request(ids, params, f"{time.monotonic_ns()}-{i}")
    while engine.last_step.num_tokens != engine.last_step.num_seqs or engine.scheduler.waiting:
        engine.step()  # prefills, until a step runs decodes only
    for _ in range(2):
        engine.step()
    times, t0 = [], time.perf_counter()
    for _ in range(steps):
        engine.step()
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        t0 = t1
    running = len(engine.scheduler.running)
    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        engine.abort(seq.request_id)
    return times, running


def timed_fills(engine: LLMEngine) -> list[float]:
    """Record the host's time in each bitmask fill from now on (milliseconds)."""
    bitmasks, fills = engine.bitmasks, []
    fill = bitmasks.fill

    def timed(matchers: list) -> torch.Tensor:
        start = time.perf_counter()
        out = fill(matchers)
        fills.append((time.perf_counter() - start) * 1e3)
        return out

    bitmasks.fill = timed
    return fills


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", choices=sorted(MODEL_SHAPES), help="random weights in a real model's shape")
    parser.add_argument("--model", help="a model folder instead (its own tokenizer)")
    parser.add_argument("--tokenizer", help="a folder with tokenizer.json for --model-config (default: synthetic)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per mode")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.model_config is None):
        parser.error("give --model-config NAME or --model DIR")
    with tempfile.TemporaryDirectory() as scratch:
        if args.model_config:
            source = shape_config(args.model_config)
            tokenizer = args.tokenizer or str(synthetic_tokenizer(Path(scratch), source.vocab_size))
        else:
            source, tokenizer = args.model, None
        max_tokens = args.steps + 16
        max_model_len = args.input_len + max_tokens + 1
        pages = None if torch.cuda.is_available() else args.batch * -(-max_model_len // 16)  # the CPU's default: 4
        config = EngineConfig(tokenizer=tokenizer, max_num_seqs=args.batch, max_model_len=max_model_len,
                              max_num_batched_tokens=max(2048, args.input_len), num_kv_pages=pages)
        engine = LLMEngine(source, config)
        g = torch.Generator().manual_seed(0)
        vocab = min(engine.model_config.vocab_size, 1000)  # ordinary tokens: random ids past them may be specials
        prompts = [torch.randint(10, vocab, (args.input_len,), generator=g).tolist() for _ in range(args.batch)]
        base = dict(temperature=1.0, seed=0, max_tokens=max_tokens, ignore_eos=True)
        modes = {"free": SamplingParams(**base),
                 "structured": SamplingParams(**base, structured_outputs=StructuredOutputsParams(json=NEVER_ENDING)),
                 "penalized": SamplingParams(**base, presence_penalty=0.5, frequency_penalty=0.5,
                                             repetition_penalty=1.2)}
        engine.grammars.compile(modes["structured"].structured_outputs)  # compiling is per request, not per step
        run(engine, prompts, modes["free"], 4)  # warm-up: the shapes' first cuBLAS calls, the allocator
        fills = timed_fills(engine)
        report = {"model": args.model_config or args.model, "batch": args.batch, "steps": args.steps,
                  "input_len": args.input_len, "tokenizer": args.tokenizer or ("synthetic" if args.model_config
                                                                              else args.model),
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        for name, params in modes.items():
            fills.clear()
            times, running = run(engine, prompts, params, args.steps)
            if running != args.batch:
                raise RuntimeError(f"{name}: {running} of {args.batch} sequences ran every timed step")
            report[name] = {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
                            "mask_fill_ms": statistics.median(fills) if fills else 0.0}
    for name in ("structured", "penalized"):
        report[name]["over_free"] = report[name]["median_ms"] / report["free"]["median_ms"] - 1
    print(f"{report['device']} | {report['model']} | batch {args.batch} | tokenizer {report['tokenizer']}")
    for name in modes:
        r = report[name]
        extra = f", {r['over_free']:+.1%} over free" if "over_free" in r else ""
        fill = f", mask fill {r['mask_fill_ms']:.2f} ms on the host" if r["mask_fill_ms"] else ""
        print(f"{name:>10}: {r['median_ms']:.2f} ms/step (median of {args.steps}){extra}{fill}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
