"""`tritium bench moe`: the fused-MoE layer alone, from one token to 4096, beside the experts' loop in PyTorch and a
dense GEMM of the same active weights, against the card's ceilings measured in the same run.

For each model shape (one MoE layer of Mixtral-8x7B or Qwen3-30B-A3B, random weights) and token count, tokens are
routed by a softmax top-k of random router logits (close to uniform). Timed: Tritium's `fused_moe` (the counting
sort, the two grouped GEMMs, the weighted sum; routing not included); the PyTorch loop over the experts that
transformers runs (`moe_reference` in the layer's dtype, timed eagerly: it reads counts on the host); and a dense
MLP of width top_k * inter (cuBLAS), which does the same FLOPs per token on the weights of top_k experts. The
floors: the memory roofline counts the bytes of the experts the tokens actually pick (plus x and out) over the
measured copy bandwidth; the compute floor, the FLOPs over the measured bf16 GEMM rate.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from triton.testing import do_bench

from tritium.bench.ceilings import ceilings_line, measure_ceilings
from tritium.bench.environment import describe_environment
from tritium.bench.kernels import text_table
from tritium.bench.plots import plot_moe
from tritium.models.shapes import MODEL_SHAPES, shape_config
from tritium.ops import fused_moe, select_experts, silu_and_mul
from tritium.ops.moe import choose_config, kernel, moe_reference
from tritium.ops.moe.tuning import TOKENS, MoEShape
from tritium.ops.timing import median_ms

ERROR_BOUND = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def moe_shapes() -> dict[str, MoEShape]:
    """The MoE layer of every mixture-of-experts model shape, by the shape's name."""
    found = {}
    for name in MODEL_SHAPES:
        c = shape_config(name)
        if c.num_experts:
            found[name] = MoEShape(name, c.num_experts, c.experts_per_token, c.hidden_size, c.moe_intermediate_size)
    return found


# On a CPU the kernels run in Triton's interpreter: one small layer, a few token counts.
_CPU_SHAPE = MoEShape("tiny (interpreter)", 8, 2, 32, 48)
_CPU_TOKENS = (1, 5)


def run_moe_bench(shape_names: list[str] | None = None, tokens: list[int] | None = None,
                  dtype: torch.dtype = torch.bfloat16, out_dir: Path = Path("benchmarks/results")) -> dict:
    """Run the benchmark and write JSON + PNG into out_dir; returns the report."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    known = moe_shapes()
    unknown = [n for n in shape_names or () if n not in known]
    if unknown:
        raise ValueError(f"unknown MoE shape {', '.join(unknown)}; known: {', '.join(known)}")
    shapes = [known[n] for n in shape_names or known]
    interpreted = device.type != "cuda"
    if interpreted:
        print("No CUDA device: one small layer through Triton's interpreter on the CPU. The timings measure the "
              "interpreter, not a GPU; the correctness checks are real.")
        shapes, tokens, dtype = [_CPU_SHAPE], [n for n in tokens or _CPU_TOKENS if n <= 16], torch.float32
    tokens = list(tokens or TOKENS)
    env = describe_environment(device)
    report = {"environment": env, "dtype": str(dtype).removeprefix("torch."), "interpreted": interpreted,
              "ceilings": None if interpreted else measure_ceilings(device),
              "timing": "wall clock, one run" if interpreted else
              "median of triton.testing.do_bench (Tritium and dense: CUDA-graph replays; the loop: eager calls)",
              "rows": []}
    for shape in shapes:
        g = torch.Generator(device).manual_seed(0)
        w13, w2 = shape.random_weights(dtype, g)
        for n in tqdm(tokens, desc=shape.name, unit="batch"):
            report["rows"].append(_measure(shape, n, w13, w2, g, report["ceilings"]))
        del w13, w2
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(format_table(report))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(report)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    title = (f"fused MoE layer, {env['card']}, {report['dtype']}, torch {env['torch']}, triton {env['triton']}, "
             f"{env['date']}, commit {env['commit']}")
    plot_moe(report["rows"], title, out_dir / f"{stem}.png")
    print(f"wrote {out_dir / stem}.json and .png")
    return report


def _measure(shape: MoEShape, num_tokens: int, w13: torch.Tensor, w2: torch.Tensor, g: torch.Generator,
             ceilings: dict | None) -> dict:
    """One (shape, token count) point: each method's ms, Tritium's error, the floors."""
    device, dtype = w13.device, w13.dtype
    x = torch.randn(num_tokens, shape.hidden, generator=g, device=device).to(dtype)
    weights, ids = select_experts(torch.randn(num_tokens, shape.num_experts, generator=g, device=device),
                                  shape.top_k, renormalize=True)
    active = int(torch.unique(ids).numel())
    config = choose_config(device, num_tokens, shape.num_experts, shape.top_k, shape.hidden, shape.inter)
    out = torch.empty_like(x)

    def tritium() -> None:
        if device.type == "cuda":
            fused_moe(x, w13, w2, weights, ids, config=config)
        else:  # on the CPU fused_moe is torch's loop: the bench is about the kernels
            kernel.launch(x, w13, w2, weights, ids, out, config)

    row = {"shape": shape.name, "tokens": num_tokens, "active_experts": active, "flops": shape.flops(num_tokens),
           "bytes": shape.bytes(num_tokens, active, w13.element_size()), "config": config.to_dict(), "ms": {},
           "timing": {}}
    tritium()
    got = (fused_moe(x, w13, w2, weights, ids, config=config) if device.type == "cuda" else out).double()
    want = moe_reference(x, w13, w2, weights, ids, dtype=torch.float32).double()
    row["rel_err"] = ((got - want).norm() / want.norm()).item()
    row["ms"]["tritium"], row["timing"]["tritium"] = median_ms(tritium, device)
    dense = _dense(x, w13, w2, shape.top_k)
    row["ms"]["dense"], row["timing"]["dense"] = median_ms(dense, device)
    loop = lambda: moe_reference(x, w13, w2, weights, ids, dtype=None)  # noqa: E731
    if device.type == "cuda":  # host syncs (it reads which tokens each expert has): timed eagerly, not captured
        row["ms"]["loop"], row["timing"]["loop"] = do_bench(loop, warmup=10, rep=50, return_mode="median"), "eager"
    else:
        row["ms"]["loop"], row["timing"]["loop"] = median_ms(loop, device)
    if ceilings:
        row["memory_floor_ms"] = row["bytes"] / (ceilings["copy_tb_per_s"] * 1e9)
        row["compute_floor_ms"] = row["flops"] / (ceilings["bf16_gemm_tflops"] * 1e9)
    return row


def _dense(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int):
    """A dense MLP of width top_k * inter on the first top_k experts' weights: the FLOPs of the MoE layer per token
    and, for one token, its bytes; cuBLAS GEMMs and the SiLU-and-mul kernel."""
    inter = w2.shape[2]
    gate_up = torch.cat([w13[:top_k, :inter].reshape(-1, w13.shape[2]), w13[:top_k, inter:].reshape(-1, w13.shape[2])])
    down = w2[:top_k].permute(1, 0, 2).reshape(w2.shape[1], -1).contiguous()
    return lambda: F.linear(silu_and_mul(F.linear(x, gate_up)), down)


def format_table(report: dict) -> str:
    """Per shape and token count: each method's ms, Tritium's share of each floor, its speed against the loop and
    the dense GEMM; '!' marks a failed check."""
    bound = ERROR_BOUND[getattr(torch, report["dtype"])]
    head = ["shape", "tokens", "experts", "tritium ms", "% mem roof", "% GEMM ceil", "loop ms", "vs loop",
            "dense ms", "vs dense", "TB/s", "TFLOP/s"]
    lines = []
    for r in report["rows"]:
        ms = r["ms"]
        t = ms["tritium"]
        mem, comp = r.get("memory_floor_ms"), r.get("compute_floor_ms")
        lines.append([r["shape"], r["tokens"], r["active_experts"], f"{t:.4f}" + ("" if r["rel_err"] <= bound else "!"),
                      f"{100 * mem / t:.0f}%" if mem else "-", f"{100 * comp / t:.0f}%" if comp else "-",
                      f"{ms['loop']:.4f}", f"{ms['loop'] / t:.1f}x", f"{ms['dense']:.4f}", f"{ms['dense'] / t:.2f}x",
                      f"{r['bytes'] / t / 1e9:.2f}", f"{r['flops'] / t / 1e9:.1f}"])
    env = report["environment"]
    text = [f"{env['card']} | torch {env['torch']} | triton {env['triton']} | {report['dtype']} | {env['date']} | "
            f"commit {env['commit']}"]
    if report["ceilings"]:
        text.append(ceilings_line(report["ceilings"]))
    text += text_table(head, lines)
    eager = sorted({f"{r['shape']} t{r['tokens']}" for r in report["rows"] if r["timing"]["tritium"] == "eager"})
    if eager:
        text.append("Tritium timed eagerly (its capture failed): " + ", ".join(eager))
    return "\n".join(text)


def _stem(report: dict) -> str:
    env = report["environment"]
    card = env["card"].replace(" ", "_").replace("(", "").replace(")", "")
    commit = env["commit"].replace("+local-changes", "-dirty")
    return f"moe-{card}-{report['dtype']}-{env['date'][:10]}-{commit}"
