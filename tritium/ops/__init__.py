"""Triton kernels: unified paged attention and the KV-cache write. Without CUDA they run in Triton's interpreter."""

from tritium.ops.attention import AttentionConfig, attention_reference, unified_attention
from tritium.ops.kv_cache import write_kv_cache

__all__ = ["AttentionConfig", "attention_reference", "unified_attention", "write_kv_cache"]
