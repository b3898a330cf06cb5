"""Launch configurations for the unified attention kernel, chosen per batch shape and device.

The choice uses only static facts (token count, sequence count, heads, head size, device), never the
values of sequence lengths, so one choice holds for every replay of a captured CUDA graph.
"""

from dataclasses import dataclass

import torch
import triton

# Programs per multiprocessor that a decode batch should offer before its keys are split.
_SPLIT_TARGET_PER_SM = 2
_MAX_SPLITS = 16


@dataclass(frozen=True)
class AttentionConfig:
    """How one launch is shaped.

    block_m: query rows per program (query tokens times the query heads of one KV head), power of two.
    tile_k: keys per step of the inner loop, power of two, at least 16.
    num_splits: programs that share one query tile's keys (1: no split and no merge launch).
    """

    block_m: int
    tile_k: int
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def validate(self, group: int) -> None:
        for name in ("block_m", "tile_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"config.{name} must be a power of two >= 16, got {value}")
        if self.block_m < group:
            raise ValueError(f"config.block_m={self.block_m} is smaller than the GQA group ({group} query heads "
                             "per KV head)")
        if not 1 <= self.num_splits <= 256:
            raise ValueError(f"config.num_splits must be in [1, 256], got {self.num_splits}")


def multiprocessor_count(device: torch.device) -> int:
    """SMs (CUDA) or compute units; a small stand-in on the CPU so that splitting is still exercised."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_config(
    device: torch.device, num_tokens: int, num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
) -> AttentionConfig:
    """A good configuration for this batch shape on this device."""
    group = num_q_heads // num_kv_heads
    tokens_per_seq = max(1, -(-num_tokens // max(num_seqs, 1)))
    rows = triton.next_power_of_2(group * tokens_per_seq)
    large_head = head_dim > 128
    if device.type != "cuda":
        # The interpreter runs on the CPU: small tiles keep it quick and still cover multi-tile loops.
        return AttentionConfig(block_m=max(16, min(rows, 32), triton.next_power_of_2(group)), tile_k=16,
                               num_splits=_splits(device, num_tokens, num_seqs, num_kv_heads, group))
    if rows <= 16 and group <= 16:
        splits = _splits(device, num_tokens, num_seqs, num_kv_heads, group)
        return AttentionConfig(block_m=16, tile_k=64 if not large_head else 32, num_splits=splits,
                               num_warps=4, num_stages=3 if not large_head else 2)
    block_m = max(64 if large_head else 128, triton.next_power_of_2(group))
    return AttentionConfig(block_m=block_m, tile_k=64 if not large_head else 32, num_splits=1,
                           num_warps=8 if block_m >= 128 else 4, num_stages=3 if not large_head else 2)


def _splits(device: torch.device, num_tokens: int, num_seqs: int, num_kv_heads: int, group: int) -> int:
    """Key splits for a decode-like batch: enough programs to fill the device, no more."""
    if num_tokens > 4 * num_seqs:
        return 1
    programs = max(1, num_seqs * num_kv_heads)
    wanted = _SPLIT_TARGET_PER_SM * multiprocessor_count(device)
    return max(1, min(_MAX_SPLITS, -(-wanted // programs)))
