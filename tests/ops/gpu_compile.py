"""Compile the Triton kernels for an NVIDIA Hopper GPU (sm_90) on a machine that has none.

The interpreter runs a kernel as Python, so it accepts code that Triton's compiler rejects (for instance a
runtime `if` that changes a tensor's shape). This script compiles every case of CASES through Triton's real
pipeline (Triton IR, LLVM, PTX, ptxas) without a GPU: a stand-in driver names the target, and a JIT cache
hook compiles each kernel the launch asks for and then cancels the launch.

Run by test_gpu_compile.py as `python -m tests.ops.gpu_compile` from the repository root, with
TRITON_INTERPRET=0. Prints one JSON line: {case: {"ok": bool, "error": str, "shared": bytes}}, or
{"unavailable": reason} when the compiler itself cannot be driven this way (no NVIDIA backend, an API change).
"""

import json
import os
import sys
import traceback

TARGET = ("cuda", 90, 32)  # H100 / H200
SHARED_MEMORY_LIMIT = 232448  # bytes of shared memory one block may use on sm_90

# Attention cases: q dtype, kv dtype (None: q's), head size, q heads, kv heads, page size, config
# (block_m, tile_k, num_splits, num_warps, num_stages, page_lookahead, tma), features. Shapes and configs as the GPU
# meets them. Features may name the output's dtype ("out": fp8 takes an output_scale) and the dots' ("dots": what
# `dot_dtype` picks for an fp8 query on a GPU with fp8 tensor cores, or without; on CPU tensors it would pick
# float32, the interpreter's).
_DECODE = (16, 64, 4, 4, 3, 0)
_PREFILL = (128, 64, 1, 8, 3, 1)
_LARGE_HEAD = (64, 32, 1, 4, 2)
ATTENTION_CASES = {
    "decode_bf16_d128_g4": ("bfloat16", None, 128, 32, 8, 16, _DECODE, {}),
    "prefill_bf16_d128_g4": ("bfloat16", None, 128, 32, 8, 16, _PREFILL, {}),
    "prefill_pages_in_step": ("bfloat16", None, 128, 32, 8, 16, (128, 64, 1, 8, 3, 0), {}),
    "prefill_tile128_pages_ahead": ("bfloat16", None, 128, 32, 8, 16, (128, 128, 1, 8, 3, 1), {}),
    "page64_one_page_tiles_ahead": ("bfloat16", None, 128, 32, 8, 64, (64, 64, 1, 4, 3, 1), {}),
    "decode_pages_ahead": ("bfloat16", None, 128, 32, 8, 16, (16, 64, 4, 4, 3, 1), {}),
    "prefill_fp16_d64_mha_page32": ("float16", None, 64, 16, 16, 32, _PREFILL, {}),
    "d80_g5_page24_alibi": ("bfloat16", None, 80, 20, 4, 24, _PREFILL, {"alibi": True}),
    "d96_g6_page256_split2_sinks": ("float16", None, 96, 12, 2, 256, (16, 64, 2, 4, 3), {"sinks": True}),
    "d112_g7_softcap": ("bfloat16", None, 112, 28, 4, 16, _PREFILL, {"softcap": 30.0}),
    "d192_g4": ("bfloat16", None, 192, 16, 4, 32, _LARGE_HEAD, {}),
    "d256_g4_sinks": ("float16", None, 256, 8, 2, 64, _LARGE_HEAD, {"sinks": True}),
    "g32_d128": ("bfloat16", None, 128, 64, 2, 16, _PREFILL, {}),
    "page8_tile64": ("bfloat16", None, 128, 8, 1, 8, (16, 64, 1, 4, 3), {}),
    "fp8_decode_bf16": ("bfloat16", "float8_e4m3fn", 128, 32, 8, 16, _DECODE, {}),
    "fp8_prefill_fp16_everything": ("float16", "float8_e4m3fn", 128, 32, 8, 16, _PREFILL,
                                    {"window": (1023, 0), "softcap": 20.0, "alibi": True, "sinks": True}),
    "fp32_d64": ("float32", None, 64, 8, 2, 16, (16, 64, 1, 4, 3), {}),
    "causal_window_left": ("bfloat16", None, 128, 32, 8, 16, _PREFILL, {"window": (1024, -1)}),
    "causal_everything_split3": ("bfloat16", None, 128, 32, 8, 16, (16, 64, 3, 4, 3),
                                 {"window": (1023, 0), "softcap": 20.0, "alibi": True, "sinks": True}),
    "noncausal": ("bfloat16", None, 128, 32, 8, 16, _PREFILL, {"causal": False}),
    "noncausal_window": ("bfloat16", None, 128, 32, 8, 16, _PREFILL, {"causal": False, "window": (128, 128)}),
    "noncausal_window_left": ("bfloat16", None, 128, 32, 8, 16, _DECODE, {"causal": False, "window": (300, -1)}),
    "noncausal_window_right": ("float16", None, 64, 8, 8, 16, _PREFILL, {"causal": False, "window": (-1, 20)}),
    "fp8_pages_tma_page64": ("bfloat16", "float8_e4m3fn", 128, 32, 8, 64, (64, 64, 1, 4, 3, 1, 1), {}),
    "fp8_out_bf16_q_split4": ("bfloat16", "float8_e4m3fn", 128, 32, 8, 16, _DECODE,
                              {"out": "float8_e4m3fn", "sinks": True}),
    "fp8_q_bf16_pages_decode": ("float8_e4m3fn", "bfloat16", 128, 32, 8, 16, _DECODE, {}),
    "fp8_q_fp8_dots_decode": ("float8_e4m3fn", None, 128, 32, 8, 16, _DECODE, {"dots": "float8_e4m3fn"}),
    "fp8_q_fp8_dots_prefill_everything": ("float8_e4m3fn", None, 128, 32, 8, 16, _PREFILL,
                                          {"dots": "float8_e4m3fn", "window": (1023, 0), "softcap": 20.0,
                                           "alibi": True, "sinks": True}),
    "fp8_q_fp8_dots_tma_fp8_out": ("float8_e4m3fn", None, 128, 32, 8, 64, (128, 64, 1, 8, 3, 1, 1),
                                   {"dots": "float8_e4m3fn", "out": "float8_e4m3fn"}),
    "fp8_q_fp8_dots_d64_tile32": ("float8_e4m3fn", None, 64, 16, 16, 32, (64, 32, 1, 4, 3, 1),
                                  {"dots": "float8_e4m3fn", "causal": False}),
    "fp8_q_bf16_dots_prefill": ("float8_e4m3fn", None, 128, 32, 8, 16, _PREFILL, {"dots": "bfloat16"}),
    "fp8_q_fp8_dots_d256": ("float8_e4m3fn", None, 256, 8, 2, 64, _LARGE_HEAD, {"dots": "float8_e4m3fn"}),
}
# write_kv_cache cases: source dtype, cache dtype, kv heads, head size, page size, slot dtype.
KV_CACHE_CASES = {
    "kv_cache_fp8_from_bf16": ("bfloat16", "float8_e4m3fn", 8, 128, 16, "int64"),
    "kv_cache_fp16_3_heads_d80": ("float16", "float16", 3, 80, 16, "int32"),
}
# Glue kernel cases: op, dtype, sizes. rms_norm: x's shape, with a residual, Gemma's unit offset; rotary_and_cache:
# q heads, kv heads, head size, page size, slot dtype; silu_and_mul / gelu_and_mul: tokens, intermediate size.
GLUE_CASES = {
    "rms_norm_bf16_hidden4096_residual": ("rms_norm", "bfloat16", ((4, 4096), True, False)),
    "rms_norm_fp16_hidden5120": ("rms_norm", "float16", ((4, 5120), False, False)),
    "rms_norm_bf16_qk_heads_d128": ("rms_norm", "bfloat16", ((4, 32, 128), False, False)),
    "rms_norm_fp32_hidden80_residual": ("rms_norm", "float32", ((4, 80), True, False)),
    "rms_norm_bf16_gemma_hidden3584_residual": ("rms_norm", "bfloat16", ((4, 3584), True, True)),
    "rms_norm_bf16_gemma_qk_heads_d256": ("rms_norm", "bfloat16", ((4, 8, 256), False, True)),
    "rotary_bf16_d128_g4": ("rotary_and_cache", "bfloat16", (32, 8, 128, 16, "int64")),
    "rotary_fp16_d80_g5_int32": ("rotary_and_cache", "float16", (20, 4, 80, 16, "int32")),
    "rotary_bf16_d256_mqa": ("rotary_and_cache", "bfloat16", (64, 1, 256, 64, "int64")),
    "rotary_bf16_d128_fp8_cache": ("rotary_and_cache", "bfloat16", (32, 8, 128, 16, "int64", "float8_e4m3fn")),
    "silu_and_mul_bf16_14336": ("silu_and_mul", "bfloat16", (4, 14336)),
    "silu_and_mul_fp16_112": ("silu_and_mul", "float16", (4, 112)),
    "gelu_and_mul_bf16_14336": ("gelu_and_mul", "bfloat16", (4, 14336)),
}
# Fused-MoE cases: dtype, (experts, top_k, hidden, inter), gate_up and down configs (block_m, block_n, block_k,
# num_warps, num_stages). Sizes are runtime arguments: small ones with the real ones' divisibility compile the same
# code as Mixtral's (4096, 14336) and Qwen3-MoE's (2048, 768).
MOE_CASES = {
    "moe_decode_bf16_e8_k2": ("bfloat16", (8, 2, 512, 1024), ((16, 64, 128, 4, 4), (16, 64, 128, 4, 4))),
    "moe_decode_bf16_deep_k": ("bfloat16", (8, 2, 512, 1024), ((16, 32, 256, 4, 5), (16, 128, 256, 4, 3))),
    "moe_mid_fp16_e128_k8": ("float16", (128, 8, 256, 768), ((64, 64, 64, 4, 3), (64, 128, 64, 4, 3))),
    "moe_prefill_bf16_e8_k2": ("bfloat16", (8, 2, 512, 1024), ((128, 128, 64, 8, 3), (128, 128, 64, 8, 3))),
    "moe_prefill_bf16_e128_k8": ("bfloat16", (128, 8, 256, 768), ((128, 128, 64, 8, 4), (128, 256, 64, 8, 3))),
    "moe_odd_fp32": ("float32", (6, 3, 48, 80), ((16, 32, 32, 4, 2), (16, 16, 32, 4, 2))),
}
CASES = [*ATTENTION_CASES, *KV_CACHE_CASES, *GLUE_CASES, *MOE_CASES]


def _install_compiler():
    """Point Triton at a stand-in sm_90 device and make every launch compile, then do nothing."""
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    target = GPUTarget(*TARGET)

    class StandInDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return target

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(StandInDriver())
    compiled = []

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        src = triton.compiler.ASTSource(fn.jit_function, compile["signature"], compile["constants"],
                                        compile["configs"][0])
        kernel = triton.compile(src, target=target, options={"num_warps": compile["num_warps"],
                                                             "num_stages": compile["num_stages"]})
        compiled.append((fn.name, kernel.metadata.shared))
        return True  # handled: the launch is skipped

    knobs.runtime.jit_cache_hook = hook
    return compiled


def _run_attention(case):
    import torch

    import tritium.ops.attention.unified as unified
    from tritium.ops import AttentionConfig, unified_attention
    from tritium.ops.attention.batches import random_paged_batch

    q_dtype, kv_dtype, d, hq, hkv, page, config, features = case
    batch = random_paged_batch([(5, 40), (1, 17)], hq, hkv, d, page, dtype=getattr(torch, q_dtype),
                               kv_dtype=None if kv_dtype is None else getattr(torch, kv_dtype))
    out_dtype = getattr(torch, features.get("out", "bfloat16" if q_dtype == "float8_e4m3fn" else q_dtype))
    out = torch.empty(batch.q.shape, dtype=out_dtype)
    args = batch.kernel_args(out, causal=features.get("causal", True), window_size=features.get("window", (-1, -1)),
                             softcap=features.get("softcap", 0.0))
    choose_dots = unified.dot_dtype
    if "dots" in features:
        unified.dot_dtype = lambda q, k, config: getattr(torch, features["dots"])
        unified._PLANS.clear()
    try:
        unified_attention(*args, torch.full((hq,), 0.1) if features.get("alibi") else None,
                          torch.zeros(hq) if features.get("sinks") else None,
                          output_scale=torch.ones(1) if out_dtype == torch.float8_e4m3fn else None,
                          return_lse=True, config=AttentionConfig(*config))
    finally:
        unified.dot_dtype = choose_dots
        unified._PLANS.clear()


def _run_kv_cache(case):
    import torch

    from tritium.ops import write_kv_cache

    src, cache, hkv, d, page, slot = case
    key = torch.randn(4, hkv, d).to(getattr(torch, src))
    k_cache = torch.zeros(2, page, hkv, d).to(getattr(torch, cache))
    scales = {"k_scale": torch.ones(1), "v_scale": torch.ones(1)} if cache == "float8_e4m3fn" else {}
    write_kv_cache(key, key.clone(), k_cache, k_cache.clone(), torch.arange(4).to(getattr(torch, slot)), **scales)


def _run_glue(case):
    """Calls the launchers, not the public functions: on CPU tensors those run torch, not the kernels."""
    import torch

    from tritium.ops.activation import _launch_act_and_mul
    from tritium.ops.rms_norm import _launch_rms_norm
    from tritium.ops.rotary import _launch_rotary_and_cache

    op, dtype, sizes = case
    dtype = getattr(torch, dtype)
    if op == "rms_norm":
        shape, residual, unit_offset = sizes
        x = torch.randn(shape).to(dtype)
        out = torch.empty_like(x)
        _launch_rms_norm(x, torch.ones(shape[-1]).to(dtype), 1e-6, x.clone() if residual else None, out,
                         torch.empty_like(x) if residual else None, unit_offset)
    elif op == "rotary_and_cache":
        hq, hkv, d, page, slot, *cache = sizes
        q, k = torch.randn(4, hq, d).to(dtype), torch.randn(4, hkv, d).to(dtype)
        k_cache = torch.zeros(2, page, hkv, d).to(getattr(torch, cache[0]) if cache else dtype)
        _launch_rotary_and_cache(q, k, k.clone(), torch.arange(4), torch.ones(16, d), k_cache, k_cache.clone(),
                                 torch.arange(4).to(getattr(torch, slot)), torch.ones(1), torch.ones(1))
    else:
        tokens, intermediate = sizes
        activation = "gelu_tanh" if op == "gelu_and_mul" else "silu"
        _launch_act_and_mul(torch.randn(tokens, 2 * intermediate).to(dtype),
                            torch.empty(tokens, intermediate).to(dtype), activation)


def _run_moe(case):
    import torch

    from tritium.ops import select_experts
    from tritium.ops.moe import GemmConfig, MoEConfig, kernel

    dtype, (experts, top_k, hidden, inter), (gate_up, down) = case
    dtype = getattr(torch, dtype)
    x = torch.randn(5, hidden).to(dtype)
    weights, ids = select_experts(torch.randn(5, experts), top_k, renormalize=True)
    kernel.launch(x, torch.randn(experts, 2 * inter, hidden).to(dtype), torch.randn(experts, hidden, inter).to(dtype),
                  weights, ids, torch.empty_like(x), MoEConfig(GemmConfig(*gate_up), GemmConfig(*down)))


def _describe(exc: BaseException) -> str:
    """The exception and its causes, innermost last (Triton wraps the real error of a nested call)."""
    parts = []
    while exc is not None and len(parts) < 5:
        parts.append("".join(traceback.format_exception_only(type(exc), exc))[-2000:])
        exc = exc.__cause__ or exc.__context__
    return "\n--- caused by ---\n".join(parts)


def main() -> dict:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return {"unavailable": "TRITON_INTERPRET=1: kernels would be interpreted, not compiled"}
    try:
        compiled = _install_compiler()
        import tritium.ops  # noqa: F401  (defines the kernels, compiled rather than interpreted)
        _run_kv_cache(KV_CACHE_CASES["kv_cache_fp16_3_heads_d80"])  # the machinery works on a simple kernel
        assert compiled, "the JIT cache hook was not called"
    except Exception as exc:  # the compiler cannot be driven this way here
        return {"unavailable": f"{type(exc).__name__}: {exc}"}
    results = {}
    for name in CASES:
        compiled.clear()
        try:
            if name in ATTENTION_CASES:
                _run_attention(ATTENTION_CASES[name])
            elif name in KV_CACHE_CASES:
                _run_kv_cache(KV_CACHE_CASES[name])
            elif name in MOE_CASES:
                _run_moe(MOE_CASES[name])
            else:
                _run_glue(GLUE_CASES[name])
            results[name] = {"ok": True, "error": "", "shared": max(shared for _, shared in compiled)}
        except Exception as exc:
            results[name] = {"ok": False, "error": _describe(exc), "shared": 0}
    return results


if __name__ == "__main__":
    print(json.dumps(main()))
    sys.stdout.flush()
