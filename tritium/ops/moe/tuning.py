"""The search behind `tritium tune --op moe`: time candidate configs of the fused-MoE GEMMs for MoE layer shapes on
the GPU at hand, check the winners against the experts' loop, cache them.

A class is a layer shape at a power-of-two token count. Tokens are routed by a softmax top-k of random logits
(close to uniform, as random weights route). The two GEMMs are tuned apart (the counting sort fixes no tile
size, so each may take its own block_m): every gate/up candidate is timed alone on the grouped rows, then every
down candidate on the rows the best gate/up wrote. Winners are checked against the float32 experts' loop, then
merged into the user's cache under this device's key, which the kernels read on their next start. As for
attention, parallel workers first compile every candidate into Triton's on-disk cache.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tritium.ops.attention.tuning import precompile, store
from tritium.ops.devices import device_key
from tritium.ops.moe import kernel
from tritium.ops.moe.configs import GemmConfig, MoEConfig, default_config, problem_class, reload_tables, user_cache_path
from tritium.ops.moe.fused import fused_moe, select_experts
from tritium.ops.moe.reference import moe_reference
from tritium.ops.timing import median_ms

TOKENS = tuple(1 << i for i in range(13))  # 1 .. 4096

ERROR_BOUND = 2e-2  # bf16/fp16 output against the float32 loop
CONFIGS_PER_JOB = 4


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer: experts, experts per token, hidden and intermediate sizes."""

    name: str
    num_experts: int
    top_k: int
    hidden: int
    inter: int

    def random_weights(self, dtype: torch.dtype, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) drawn on the generator's device, scaled so that a layer's outputs stay near unit size."""
        device = generator.device
        w13 = (torch.randn(self.num_experts, 2 * self.inter, self.hidden, generator=generator, device=device)
               / self.hidden**0.5).to(dtype)
        w2 = (torch.randn(self.num_experts, self.hidden, self.inter, generator=generator, device=device)
              / self.inter**0.5).to(dtype)
        return w13, w2

    def flops(self, tokens: int) -> int:
        return 2 * tokens * self.top_k * 3 * self.hidden * self.inter

    def bytes(self, tokens: int, active_experts: int, elem: int) -> int:
        """The picked experts' three matrices, x read and out written."""
        return (active_experts * 3 * self.hidden * self.inter + 2 * tokens * self.hidden) * elem


@dataclass(frozen=True)
class MoECompileJob:
    """Some candidates of one GEMM ("gate_up" or "down") for one layer shape, to compile in a worker."""

    shape: MoEShape
    gemm: str
    configs: tuple[GemmConfig, ...]
    dtype: torch.dtype


def candidates(shape: MoEShape, num_tokens: int) -> list[GemmConfig]:
    """Tiles worth timing, by the rows an expert gets on average: 16-row tiles with long reduction steps while the
    weights' bytes dominate, wider tiles and more warps as rows grow. Shapes that need more shared memory or
    registers than the device has fail to launch and drop out."""
    rows = num_tokens * shape.top_k / shape.num_experts
    if rows <= 16:
        return [GemmConfig(16, n, k, 4, s) for n in (32, 64, 128) for k in (64, 128, 256) for s in (3, 4, 5)]
    if rows <= 128:
        return [GemmConfig(m, n, k, w, s) for m in (32, 64) for n in (64, 128) for k in (64, 128) for w in (4, 8)
                for s in (3, 4)]
    return [GemmConfig(m, n, 64, w, s) for m in (64, 128) for n in (128, 256) for w in (4, 8) for s in (3, 4)]


def tune_shapes(shapes: list[MoEShape], tokens: list[int], dtype: torch.dtype = torch.bfloat16,
                cache: Path | None = None) -> dict[str, dict]:
    """Tune every (shape, token count) class on the GPU; returns {class: config fields}, merged into `cache` (the
    user cache by default) under this device's key."""
    device = torch.device("cuda")
    precompile(compile_jobs(shapes, tokens, dtype), compile_fn=compile_moe_job)
    path = cache or user_cache_path()
    winners = {}
    for shape in shapes:
        g = torch.Generator(device).manual_seed(0)
        w13, w2 = shape.random_weights(dtype, g)
        for n in tqdm(tokens, desc=f"tuning {shape.name}", unit="class"):
            cls = problem_class(n, shape.num_experts, shape.top_k, shape.hidden, shape.inter)
            best, line = _tune_class(shape, n, w13, w2, g)
            winners[cls] = best.to_dict()
            store(path, device_key(device), {cls: winners[cls]})  # a stopped run keeps its classes
            tqdm.write(f"{cls:32s} {line}")
        del w13, w2
        torch.cuda.empty_cache()
    reload_tables()
    return winners


def _tune_class(shape: MoEShape, num_tokens: int, w13: torch.Tensor, w2: torch.Tensor, g: torch.Generator,
                ) -> tuple[MoEConfig, str]:
    """The best gate/up and down configs of one class, checked; and a line saying how they did."""
    device, dtype = w13.device, w13.dtype
    x = torch.randn(num_tokens, shape.hidden, generator=g, device=device).to(dtype)
    weights, ids = select_experts(torch.randn(num_tokens, shape.num_experts, generator=g, device=device),
                                  shape.top_k, renormalize=True)
    grouping = kernel.group_by_expert(ids, shape.num_experts)
    act = torch.empty(num_tokens * shape.top_k, shape.inter, dtype=dtype, device=device)
    y = torch.empty(num_tokens * shape.top_k, shape.hidden, dtype=dtype, device=device)
    default = default_config(device, num_tokens, shape.num_experts, shape.top_k)
    tried = candidates(shape, num_tokens)

    def gate_up(c: GemmConfig) -> float:
        return _time(lambda: kernel.gate_up(x, w13, grouping, shape.top_k, act, c))

    def down(c: GemmConfig) -> float:
        return _time(lambda: kernel.down(act, w2, grouping, y, c))

    best = []
    for timer, default_gemm in ((gate_up, default.gate_up), (down, default.down)):
        times = {c: timer(c) for c in tried}
        winner = min(times, key=times.get)
        if math.isinf(times[winner]):
            raise RuntimeError(f"no candidate config ran on this device for {shape.name} at {num_tokens} tokens")
        if timer is gate_up:
            kernel.gate_up(x, w13, grouping, shape.top_k, act, winner)  # the rows the down candidates read
        best.append((winner, times[winner], timer(default_gemm)))
    config = MoEConfig(best[0][0], best[1][0])
    got = fused_moe(x, w13, w2, weights, ids, config=config).double()
    want = moe_reference(x, w13, w2, weights, ids, dtype=torch.float32).double()
    err = ((got - want).norm() / want.norm()).item()
    if not err <= ERROR_BOUND:
        raise RuntimeError(f"{shape.name} at {num_tokens} tokens: tuned config {config} is off the reference by "
                           f"{err:.2e}")
    line = "  ".join(f"{name} {c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages} {t:.4f} ms "
                     f"({d / t:.2f}x default)" for name, (c, t, d) in zip(("gate_up", "down"), best, strict=True))
    return config, line


def compile_jobs(shapes: list[MoEShape], tokens: list[int], dtype: torch.dtype) -> list[MoECompileJob]:
    """Every shape's distinct candidates of both GEMMs, in jobs of CONFIGS_PER_JOB."""
    jobs = []
    for shape in shapes:
        configs = list(dict.fromkeys(c for n in tokens for c in candidates(shape, n)))
        for gemm in ("gate_up", "down"):
            for start in range(0, len(configs), CONFIGS_PER_JOB):
                jobs.append(MoECompileJob(shape, gemm, tuple(configs[start:start + CONFIGS_PER_JOB]), dtype))
    return jobs


def compile_moe_job(job: MoECompileJob) -> int:
    """Launch each config of the job once on one token, with the layer's real weights' shapes and strides (what
    Triton specialises on); returns how many launched."""
    s, device = job.shape, torch.device("cuda")
    x = torch.randn(1, s.hidden, device=device).to(job.dtype)
    weights, ids = select_experts(torch.randn(1, s.num_experts, device=device), s.top_k, renormalize=True)
    grouping = kernel.group_by_expert(ids, s.num_experts)
    act = torch.zeros(s.top_k, s.inter, dtype=job.dtype, device=device)
    if job.gemm == "gate_up":
        w = torch.empty(s.num_experts, 2 * s.inter, s.hidden, dtype=job.dtype, device=device)
        run = lambda c: kernel.gate_up(x, w, grouping, s.top_k, act, c)  # noqa: E731
    else:
        w = torch.empty(s.num_experts, s.hidden, s.inter, dtype=job.dtype, device=device)
        y = torch.empty(s.top_k, s.hidden, dtype=job.dtype, device=device)
        run = lambda c: kernel.down(act, w, grouping, y, c)  # noqa: E731
    launched = 0
    for config in job.configs:
        try:
            run(config)
            torch.cuda.synchronize(device)
        except Exception:  # does not fit this device: not a candidate here, as _time decides too
            continue
        launched += 1
    return launched


def _time(fn) -> float:
    try:
        return median_ms(fn, torch.device("cuda"), warmup=5, rep=25)[0]
    except Exception:  # out of shared memory or registers on this device: not a candidate here
        return math.inf
