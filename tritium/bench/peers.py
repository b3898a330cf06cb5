"""The kernels Tritium is timed against, each adapted to run one scenario's batch.

A peer's `build(batch, scenario)` returns `(run, result)`: `run()` is what gets timed; `result()` gives the
output as [num_tokens, num_q_heads, head_size] for the correctness check. It returns None where the peer
cannot express the scenario (a dense SDPA batch of unequal sequences, say). Peers whose package does not
import are left out of the run and named in the report. Tritium's fp8 variants run when `--peer` names them:
they time the same scenario with its K/V pages (and query) rounded to fp8 e4m3, against Tritium in the batch's
dtype in the same run.
"""

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tritium.bench.scenarios import Scenario
from tritium.ops import unified_attention
from tritium.ops.attention.batches import PagedBatch
from tritium.ops.attention.configs import choose_config
from tritium.ops.kv_cache import quantize_fp8

Built = tuple[Callable[[], object], Callable[[], torch.Tensor]] | None


@dataclass(frozen=True)
class Peer:
    name: str
    description: str
    build: Callable[[PagedBatch, Scenario], Built]
    module: str | None = None  # the package that must import for this peer to run
    default: bool = True  # runs unless --peer names others; False: only when named
    fp8: bool = False  # times fp8 inputs: judged by the looser FP8 bound (their rounding alone costs ~4%)


def _tritium(batch: PagedBatch, sc: Scenario) -> Built:
    out = torch.empty_like(batch.q)
    args = batch.kernel_args(out, window_size=sc.window_size)
    return (lambda: unified_attention(*args)), (lambda: out)


def _tritium_fp8(query: bool, fp8_dot: int = 1) -> Callable[[PagedBatch, Scenario], Built]:
    """Tritium over the batch with its K/V pages (and with `query`, its query) in fp8 e4m3, each with a per-tensor
    scale from its data; the output in the batch's dtype. fp8_dot=0 keeps the dots out of fp8 tensor cores."""
    def build(batch: PagedBatch, sc: Scenario) -> Built:
        fp8 = dataclasses.replace(batch, k_cache=None, v_cache=None)
        fp8.k_cache, fp8.k_scale = _fp8(batch.k_cache)
        fp8.v_cache, fp8.v_scale = _fp8(batch.v_cache)
        if query:
            fp8.q, fp8.q_scale = _fp8(batch.q)
        out = torch.empty_like(batch.q)
        args = fp8.kernel_args(out, window_size=sc.window_size)
        num_tokens, hq, d = batch.q.shape
        config = choose_config(batch.q.device, num_tokens, batch.seqused_k.numel(), hq, batch.k_cache.shape[2], d,
                               batch.k_cache.shape[1], kv_fp8=True)
        config = dataclasses.replace(config, fp8_dot=fp8_dot)
        return (lambda: unified_attention(*args, config=config)), (lambda: out)

    return build


def _fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x in fp8 e4m3 and its float32 scale (its largest magnitude maps to 224; NaN stays NaN)."""
    scale = (x.float().nan_to_num().abs().amax() / 224.0).reshape(1)
    return quantize_fp8(x, scale), scale


def _contiguous_kv(batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sequence's keys and values gathered from its pages into one [total_keys, kv_heads, d] run."""
    page = batch.k_cache.shape[1]
    keys, values, cu = [], [], [0]
    for i, ctx in enumerate(batch.seqused_k.tolist()):
        pages = batch.block_table[i, : -(-ctx // page)].long()
        keys.append(batch.k_cache[pages].flatten(0, 1)[:ctx])
        values.append(batch.v_cache[pages].flatten(0, 1)[:ctx])
        cu.append(cu[-1] + ctx)
    cu_k = torch.tensor(cu, dtype=torch.int32, device=batch.q.device)
    return torch.cat(keys), torch.cat(values), cu_k


def _fa3(batch: PagedBatch, sc: Scenario) -> Built:
    from flash_attn_interface import flash_attn_with_kvcache

    q = batch.q
    holder = {}

    def run() -> None:
        holder["out"] = flash_attn_with_kvcache(
            q, batch.k_cache, batch.v_cache, cache_seqlens=batch.seqused_k, page_table=batch.block_table,
            cu_seqlens_q=batch.cu_seqlens_q, max_seqlen_q=batch.max_seqlen_q, softmax_scale=q.shape[-1] ** -0.5,
            causal=True, window_size=sc.window_size, num_splits=0)

    return run, lambda: _first(holder["out"])


def _fa3_contig(batch: PagedBatch, sc: Scenario) -> Built:
    from flash_attn_interface import flash_attn_varlen_func

    k, v, cu_k = _contiguous_kv(batch)
    holder = {}

    def run() -> None:
        holder["out"] = flash_attn_varlen_func(
            batch.q, k, v, batch.cu_seqlens_q, cu_k, batch.max_seqlen_q, batch.max_seqlen_k,
            softmax_scale=batch.q.shape[-1] ** -0.5, causal=True, window_size=sc.window_size)

    return run, lambda: _first(holder["out"])


def _torch_varlen(batch: PagedBatch, sc: Scenario) -> Built:
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    k, v, cu_k = _contiguous_kv(batch)
    group = batch.q.shape[1] // k.shape[1]
    kwargs = {"scale": batch.q.shape[-1] ** -0.5}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    elif group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if "window_size" in params:
        kwargs["window_size"] = (sc.window_size[0], 0)
    elif sc.sliding_window is not None:
        return None
    else:
        kwargs["is_causal"] = True
    holder = {}

    def run() -> None:
        holder["out"] = varlen_attn(batch.q, k, v, batch.cu_seqlens_q, cu_k, batch.max_seqlen_q,
                                    batch.max_seqlen_k, **kwargs)

    return run, lambda: _first(holder["out"])


def _sdpa(backend_name: str) -> Callable[[PagedBatch, Scenario], Built]:
    def build(batch: PagedBatch, sc: Scenario) -> Built:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention

        shapes = set(sc.seqs)
        if len(shapes) != 1 or sc.sliding_window is not None:
            return None  # a dense batch needs equal sequences
        ((q_len, ctx),) = shapes
        if q_len not in (1, ctx):
            return None  # a chunk on a prefix needs a bottom-right mask that SDPA's is_causal does not give
        k, v, _ = _contiguous_kv(batch)
        b, hq, d = len(sc.seqs), batch.q.shape[1], batch.q.shape[2]
        qd = batch.q.view(b, q_len, hq, d).transpose(1, 2)
        kd = k.view(b, ctx, -1, d).transpose(1, 2)
        vd = v.view(b, ctx, -1, d).transpose(1, 2)
        backend = getattr(SDPBackend, backend_name)
        holder = {}

        def run() -> None:
            with sdpa_kernel(backend):
                holder["out"] = scaled_dot_product_attention(qd, kd, vd, is_causal=q_len > 1, enable_gqa=True)

        return run, lambda: holder["out"].transpose(1, 2).reshape(-1, hq, d)

    return build


def _vllm_triton(batch: PagedBatch, sc: Scenario) -> Built:
    module = None
    for path in ("vllm.v1.attention.ops.triton_unified_attention", "vllm.attention.ops.triton_unified_attention"):
        try:
            module = importlib.import_module(path)
            break
        except ImportError:
            continue
    if module is None:
        return None
    out = torch.empty_like(batch.q)
    args = batch.kernel_args(out, window_size=sc.window_size)
    return (lambda: module.unified_attention(*args)), (lambda: out)


def _first(result: object) -> torch.Tensor:
    """FlashAttention entry points return out or (out, lse, ...) depending on version."""
    return result[0] if isinstance(result, tuple | list) else result


PEERS = [
    Peer("tritium", "Tritium's unified Triton kernel, default configs", _tritium),
    Peer("tritium_fp8kv", "Tritium, fp8 K/V pages (the engine's --kv-cache-dtype fp8)", _tritium_fp8(False),
         default=False, fp8=True),
    Peer("tritium_fp8", "Tritium, fp8 query and K/V pages: fp8 dots where the device has them", _tritium_fp8(True),
         default=False, fp8=True),
    Peer("tritium_fp8_bf16dot", "Tritium, fp8 query and K/V pages, dots in bfloat16 (fp8_dot=0)",
         _tritium_fp8(True, fp8_dot=0), default=False, fp8=True),
    Peer("fa3", "FlashAttention-3, paged KV through page_table, num_splits=0", _fa3, "flash_attn_interface"),
    Peer("fa3_contig", "FlashAttention-3 varlen on contiguous K/V", _fa3_contig, "flash_attn_interface"),
    Peer("vllm_triton", "vLLM's unified Triton attention kernel", _vllm_triton, "vllm"),
    Peer("torch_varlen", "torch.nn.attention.varlen.varlen_attn on contiguous K/V", _torch_varlen,
         "torch.nn.attention.varlen"),
    Peer("sdpa_flash", "torch SDPA, FLASH_ATTENTION backend, dense batch", _sdpa("FLASH_ATTENTION")),
    Peer("sdpa_cudnn", "torch SDPA, CUDNN_ATTENTION backend, dense batch", _sdpa("CUDNN_ATTENTION")),
]


def available_peers(device: torch.device, names: list[str] | None = None) -> tuple[list[Peer], list[str]]:
    """The peers that can run here (Tritium always; the others need CUDA and their package), and why not the rest."""
    chosen, missing = [], []
    for peer in PEERS:
        if (names and peer.name not in names) or (not names and not peer.default):
            continue
        if not peer.name.startswith("tritium") and device.type != "cuda":
            missing.append(f"{peer.name} (needs CUDA)")
            continue
        if peer.module is not None:
            try:
                importlib.import_module(peer.module)
            except Exception as exc:  # a peer's import can fail in many ways; it is only left out
                missing.append(f"{peer.name} ({type(exc).__name__}: {exc})"[:160])
                continue
        chosen.append(peer)
    return chosen, missing
