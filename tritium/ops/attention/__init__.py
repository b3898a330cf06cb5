"""The unified paged-attention kernel, its configurations and its PyTorch reference."""

from tritium.ops.attention.configs import AttentionConfig, choose_config
from tritium.ops.attention.reference import attention_reference
from tritium.ops.attention.unified import unified_attention, window_size

__all__ = ["AttentionConfig", "attention_reference", "choose_config", "unified_attention", "window_size"]
