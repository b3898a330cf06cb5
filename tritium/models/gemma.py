"""Gemma 2 and Gemma 3 (text), over the Llama layers.

What differs from Llama: embeddings scaled by sqrt(hidden); RMSNorm scaling by (1 + weight); norms after
attention and after the MLP as well as before them; a GeGLU MLP; the softmax scale from
query_pre_attn_scalar; sliding-window layers among global ones (Gemma 2 alternates, Gemma 3 has five sliding
layers to each global one); soft-capped attention and output logits (Gemma 2); q/k norms and a RoPE base of its
own on the sliding layers, the global ones keeping rope_theta and its scaling (Gemma 3). The config carries all
of it, so one model class serves both.
"""

import torch
from torch import nn

from tritium.models.attention import AttentionMetadata
from tritium.models.config import ModelConfig
from tritium.models.llama import MLP, Attention, LlamaForCausalLM, RMSNorm, rope_inv_freq
from tritium.ops import rotary_cos_sin_cache


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        norm = (config.hidden_size, config.rms_norm_eps, True)
        self.input_layernorm = RMSNorm(*norm)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(*norm)
        self.pre_feedforward_layernorm = RMSNorm(*norm)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(*norm)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                cos_sin_cache: torch.Tensor, meta: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor],
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (this layer's normed MLP output, the residual stream before it), as Llama's layer."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, positions, cos_sin_cache, meta, kv_cache))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, GemmaDecoderLayer)
        local = None  # Gemma 3's sliding layers: their own RoPE base, unscaled
        if config.local_rope_theta is not None:
            inv_freq = rope_inv_freq(config.head_dim, config.local_rope_theta, None)
            local = rotary_cos_sin_cache(inv_freq, config.max_position_embeddings)
        self.register_buffer("local_cos_sin_cache", local, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        # sqrt(hidden) rounded to the activations' dtype first, as Gemma multiplies
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype).item()
        residual = None
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            local = layer.self_attn.sliding_window is not None and self.local_cos_sin_cache is not None
            rope = self.local_cos_sin_cache if local else self.cos_sin_cache
            x, residual = layer(x, residual, positions, rope, meta, cache)
        return self.model.norm(x, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.lm_head(hidden)
        cap = self.config.final_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 and logits is not None else logits
