"""One model file for the Llama-like families: Llama 2/3/3.1, Mistral, Qwen2, Qwen3; its layers also build
Gemma (gemma.py) and the mixture-of-experts families (moe.py).

Tokens of all sequences in a step are flattened into one batch ([num_tokens, hidden]); attention goes
through the paged KV cache (`paged_attention`), everything else is per token. q/k/v and gate/up are fused
into one matmul each; the loader splits Hugging Face's separate weights into them. Under tensor parallelism
(models/parallel.py) each rank holds its slice of the heads, of the MLP and of the vocabulary; with one rank the
parallel layers are plain ones.
"""

import math
from collections.abc import Callable

import torch
from torch import nn

from tritium import distributed
from tritium.models.attention import AttentionMetadata, paged_attention
from tritium.models.config import ModelConfig
from tritium.models.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    kv_heads_per_rank,
)
from tritium.ops import gelu_and_mul, rms_norm, rotary_cos_sin_cache, silu_and_mul


class RMSNorm(nn.Module):
    """Holds the weight; forward(x) -> normed, or forward(x, residual) -> (normed, x + residual). With
    `unit_offset` (Gemma) the weight is stored as the scale minus 1, so it starts at 0."""

    def __init__(self, size: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size) if unit_offset else torch.ones(size))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return rms_norm(x, self.weight, self.eps, residual, self.unit_offset)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, with Llama-3's scaling of the low frequencies or a linear
    scaling of all of them (Gemma 3's global layers) if asked."""
    d = head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = scaling
    if s is None:
        return inv_freq.float()
    if s.get("rope_type", s.get("type")) == "linear":
        return (inv_freq / s["factor"]).float()
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, the band between blended.
    smooth = ((old_len / wavelen) - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    middle = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(middle, blended, scaled).float()


class Attention(nn.Module):
    """Attention of layer `layer`: its sliding window, the family's softmax scale and logit soft-cap."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        # This rank's heads: its slice of the query heads and the KV heads they read.
        d = self.head_dim = config.head_dim
        self.num_heads = config.num_heads // distributed.world_size()
        first_kv, self.num_kv_heads = kv_heads_per_rank(config.num_kv_heads)
        q_start = distributed.rank() * self.num_heads * d
        kv = (first_kv * d, self.num_kv_heads * d, config.num_kv_heads * d)
        parts = {"q": (q_start, self.num_heads * d, config.num_heads * d), "k": kv, "v": kv}
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, parts, bias=config.qkv_bias)
        self.o_proj = RowParallelLinear(config.num_heads * d, config.hidden_size)
        norm = (self.head_dim, config.rms_norm_eps, config.norm_unit_offset)
        self.q_norm = RMSNorm(*norm) if config.qk_norm else None
        self.k_norm = RMSNorm(*norm) if config.qk_norm else None
        self.sliding_window = config.layer_windows[layer]
        self.softcap = config.attn_softcap
        self.scale = config.attention_scale
        # An fp8 KV cache holds k / k_scale and v / v_scale: from the checkpoint (the loader), measured on the first
        # step (--calculate-kv-scales), else 1.0, as vLLM defaults. float32 whatever the model's dtype (the model is
        # built under its dtype as torch's default: the dtype must be given).
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(tokens, self.num_heads, self.head_dim)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = paged_attention(q, k, v, positions, cos_sin_cache, kv_cache[0], kv_cache[1], meta, self.scale,
                              self.sliding_window, self.softcap, self.k_scale, self.v_scale)
        return self.o_proj(out.reshape(tokens, q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        size = config.intermediate_size // distributed.world_size()
        part = (distributed.rank() * size, size, config.intermediate_size)
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, {"gate": part, "up": part}, bias=False)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.act_and_mul = gelu_and_mul if config.hidden_act == "gelu_pytorch_tanh" else silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Layer `layer`; its MLP is `mlp` when given (a mixture of experts), else a dense one."""

    def __init__(self, config: ModelConfig, layer: int, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config) if mlp is None else mlp

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                cos_sin_cache: torch.Tensor, meta: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor],
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (this layer's MLP output, the residual stream before it); the sum of the two is the
        layer's output, added by the next norm (vLLM's layout: the adds ride in the fused norms)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, cos_sin_cache, meta, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, make_layer: Callable[[ModelConfig, int], nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)


class LlamaForCausalLM(nn.Module):
    """forward(token ids, positions, metadata, caches) -> hidden states; logits() for the rows sampled from.
    `make_layer(config, i)` builds layer i (a family with other layers passes its own)."""

    def __init__(self, config: ModelConfig, make_layer: Callable[[ModelConfig, int], nn.Module] = DecoderLayer,
                 ) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, make_layer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # float32 whatever the model's dtype: the loader casts only parameters.
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("cos_sin_cache", rotary_cos_sin_cache(inv_freq, config.max_position_embeddings),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x, residual = self.model.embed_tokens(input_ids), None
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, self.cos_sin_cache, meta, cache)
        return self.model.norm(x, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """float32 logits [rows, vocab] of the hidden rows, on rank 0 (None on the other ranks)."""
        return self.lm_head(hidden)
