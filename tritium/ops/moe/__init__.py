"""The fused mixture-of-experts layer: routing, the grouped-GEMM Triton kernels, their configs, the reference."""

from tritium.ops.moe.configs import GemmConfig, MoEConfig, choose_config
from tritium.ops.moe.fused import fused_moe, select_experts
from tritium.ops.moe.reference import moe_reference

__all__ = ["GemmConfig", "MoEConfig", "choose_config", "fused_moe", "moe_reference", "select_experts"]
