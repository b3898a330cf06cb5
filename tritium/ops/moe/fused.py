"""`fused_moe`: a mixture-of-experts MLP over routed tokens, with every argument checked first; `select_experts`:
the routing that feeds it."""

import torch

from tritium.ops.moe import kernel
from tritium.ops.moe.configs import MoEConfig, choose_config
from tritium.ops.moe.reference import moe_reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts in fp32, the top_k of each token, renormalised to sum to 1 if asked (Mixtral
    always; Qwen3-MoE by its norm_topk_prob) -> (weights float32 [tokens, top_k], expert ids int32)."""
    weights, ids = torch.topk(torch.softmax(router_logits.float(), dim=-1), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: MoEConfig | None = None) -> torch.Tensor:
    """x [tokens, hidden] through the experts each token was routed to -> [tokens, hidden] in x's dtype.

    w13 [experts, 2 * inter, hidden] holds each expert's gate then up projection, w2 [experts, hidden, inter] its
    down projection; topk_weights float32 and topk_ids int32, both [tokens, top_k], as `select_experts` gives
    them. On a GPU: the Triton kernels (`kernel.py`), with `config` or the one tuned for the problem class; on
    the CPU, the same function in plain PyTorch.
    """
    _check(x, w13, w2, topk_weights, topk_ids)
    if x.device.type != "cuda":
        return moe_reference(x, w13, w2, topk_weights, topk_ids, dtype=x.dtype)
    num_experts, two_inter, hidden = w13.shape
    if config is None:
        config = choose_config(x.device, x.shape[0], num_experts, topk_ids.shape[1], hidden, two_inter // 2)
    config.validate()
    out = torch.empty_like(x)
    kernel.launch(x, w13, w2, topk_weights, topk_ids, out, config)
    return out


def _check(x, w13, w2, topk_weights, topk_ids) -> None:
    """Raise a ValueError naming the first argument the kernels cannot take."""
    tensors = {"x": x, "w13": w13, "w2": w2, "topk_weights": topk_weights, "topk_ids": topk_ids}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() != 2 or x.dtype not in DTYPES:
        raise ValueError(f"x must be float16/bfloat16/float32 [tokens, hidden], got {tuple(x.shape)} {x.dtype}")
    tokens, hidden = x.shape
    if w13.dim() != 3 or w13.shape[2] != hidden or w13.shape[1] % 2 or not w13.shape[1]:
        raise ValueError(f"w13 must be [experts, 2 * inter, hidden={hidden}], got {tuple(w13.shape)}")
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    if w2.shape != (num_experts, hidden, inter):
        raise ValueError(f"w2 must be [experts={num_experts}, hidden={hidden}, inter={inter}], got {tuple(w2.shape)}")
    for name, t in (("w13", w13), ("w2", w2)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}")
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens or topk_ids.dtype != torch.int32:
        raise ValueError(f"topk_ids must be int32 [tokens={tokens}, top_k], got {tuple(topk_ids.shape)} "
                         f"{topk_ids.dtype}")
    if not 1 <= topk_ids.shape[1] <= num_experts:
        raise ValueError(f"top_k ({topk_ids.shape[1]}) must be between 1 and the number of experts ({num_experts})")
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype != torch.float32:
        raise ValueError(f"topk_weights must be float32 of topk_ids' shape {tuple(topk_ids.shape)}, got "
                         f"{tuple(topk_weights.shape)} {topk_weights.dtype}")
    for name, t in (("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
