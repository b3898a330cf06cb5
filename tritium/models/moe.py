"""The mixture-of-experts families, Mixtral and Qwen3-MoE: Llama's layers with a routed MLP of experts.

Each token's router logits pick its top-k experts (softmax, top-k, renormalised: always for Mixtral, by
norm_topk_prob for Qwen3-MoE); the experts run through the fused-MoE kernels. Expert weights are stacked:
gate_up_proj [experts, 2 * inter, hidden] (each expert's gate rows, then its up rows) and down_proj
[experts, hidden, inter], the layout and names of transformers 5; the loader fills them from checkpoints' per-expert
matrices. With tensor parallelism, a rank's part of every expert is a slice along inter of both.
"""

import torch
from torch import nn

from tritium.models.config import ModelConfig
from tritium.models.llama import DecoderLayer, LlamaForCausalLM
from tritium.ops import fused_moe, select_experts


class Experts(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n, inter, hidden = config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))
        # Checkpoints' per-expert matrices -> (our parameter, rows they fill in the expert's matrix).
        self.per_expert = {"w1": ("gate_up_proj", (0, inter)), "gate_proj": ("gate_up_proj", (0, inter)),
                       "w3": ("gate_up_proj", (inter, inter)), "up_proj": ("gate_up_proj", (inter, inter)),
                       "w2": ("down_proj", None), "down_proj": ("down_proj", None)}


class SparseMoE(nn.Module):
    """The routed MLP: forward(x [tokens, hidden]) -> [tokens, hidden]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.renormalize = config.experts_per_token, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights float32, expert ids int32), each [tokens, top_k]."""
        return select_experts(self.gate(x), self.top_k, self.renormalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        return fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)


def moe_layer(config: ModelConfig, layer: int) -> DecoderLayer:
    """Layer `layer`: experts where the config says so (Qwen3-MoE may keep dense MLPs on some layers)."""
    return DecoderLayer(config, layer, SparseMoE(config) if config.sparse_layers[layer] else None)


class MoeForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, moe_layer)
