"""Triton kernels: unified paged attention, the KV-cache write, and the model's glue (RMSNorm, RoPE fused with the
cache write, SiLU-and-mul). Without CUDA the first two run in Triton's interpreter; the glue runs in plain torch."""

from tritium.ops.activation import silu_and_mul
from tritium.ops.attention import AttentionConfig, attention_reference, unified_attention
from tritium.ops.kv_cache import write_kv_cache
from tritium.ops.rms_norm import rms_norm
from tritium.ops.rotary import rotary_and_cache, rotary_cos_sin_cache

__all__ = ["AttentionConfig", "attention_reference", "rms_norm", "rotary_and_cache", "rotary_cos_sin_cache",
           "silu_and_mul", "unified_attention", "write_kv_cache"]
