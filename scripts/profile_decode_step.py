"""Where a single-stream decode step's GPU time goes (GPU only): 20 steps of the engine on random weights in a model's
shape under torch.profiler; prints the wall time per step, the GPU's busy and idle time, the largest idle gaps
(between which device operations), and each kernel's count and time per step.

    python scripts/profile_decode_step.py [--model-config llama-3.1-8b] [--context 512]
"""

import argparse
import collections
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from tritium.engine.config import EngineConfig
from tritium.engine.llm_engine import LLMEngine
from tritium.engine.sampling_params import SamplingParams
from tritium.models.shapes import MODEL_SHAPES, shape_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", default="llama-3.1-8b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--context", type=int, default=512, help="prompt tokens before the profiled steps")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    config = EngineConfig(skip_tokenizer_init=True, max_num_seqs=1, max_model_len=args.context + 4 * args.steps + 64)
    engine = LLMEngine(shape_config(args.model_config), config)
    vocab = engine.model_config.vocab_size
    ids = torch.randint(0, vocab, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.add_request(ids, SamplingParams(temperature=1.0, max_tokens=3 * args.steps, ignore_eos=True))
    for _ in range(args.steps):  # the prefill, then decodes in their steady state
        engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    report(prof, args.steps, wall_ms)


def report(prof, steps: int, wall_ms: float) -> None:
    ops = [e for e in prof.events() if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    ops.sort(key=lambda e: e.time_range.start)
    span_us = ops[-1].time_range.end - ops[0].time_range.start
    busy_us, end, previous = 0.0, ops[0].time_range.start, "start"
    gaps, kernels = collections.Counter(), collections.defaultdict(lambda: [0, 0.0])
    for op in ops:
        name, (s, t) = op.name[:60], (op.time_range.start, op.time_range.end)
        if s > end:
            gaps[f"{previous[:30]} -> {name[:30]}"] += s - end
        busy_us += max(0.0, t - max(s, end))
        end, previous = max(end, t), name
        kernels[name][0] += 1
        kernels[name][1] += t - s
    print(f"wall per step {wall_ms:.3f} ms; GPU span {span_us / 1e3 / steps:.3f} ms/step, busy "
          f"{busy_us / 1e3 / steps:.3f}, idle {(span_us - busy_us) / 1e3 / steps:.3f}; device ops per step "
          f"{len(ops) / steps:.0f}")
    print("largest idle sums per step (us):")
    for where, us in gaps.most_common(12):
        print(f"  {us / steps:8.1f}  {where}")
    print("per kernel per step: count, us")
    for name, (count, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:20]:
        print(f"  {count / steps:6.1f} {us / steps:9.1f}  {name}")


if __name__ == "__main__":
    main()
