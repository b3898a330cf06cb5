"""Triton kernels: unified paged attention, the KV-cache write, the fused mixture-of-experts layer, and the model's
glue (RMSNorm, RoPE fused with the cache write, SiLU/GELU-and-mul). Without CUDA the first two run in Triton's
interpreter; the MoE layer and the glue run in plain torch."""

from tritium.ops.activation import gelu_and_mul, silu_and_mul
from tritium.ops.attention import AttentionConfig, attention_reference, unified_attention
from tritium.ops.kv_cache import write_kv_cache
from tritium.ops.moe import fused_moe, select_experts
from tritium.ops.rms_norm import rms_norm
from tritium.ops.rotary import rotary_and_cache, rotary_cos_sin_cache

__all__ = ["AttentionConfig", "attention_reference", "fused_moe", "gelu_and_mul", "rms_norm", "rotary_and_cache",
           "rotary_cos_sin_cache", "select_experts", "silu_and_mul", "unified_attention", "write_kv_cache"]
