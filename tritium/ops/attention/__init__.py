"""The unified paged-attention kernel, its configurations and its PyTorch reference."""

from tritium.ops.attention.configs import AttentionConfig, choose_config
from tritium.ops.attention.reference import attention_reference
from tritium.ops.attention.unified import PreparedAttention, prepare_attention, unified_attention, window_size

__all__ = ["AttentionConfig", "PreparedAttention", "attention_reference", "choose_config", "prepare_attention",
           "unified_attention", "window_size"]
