"""One rank of the model: it loads its shard, sizes its KV cache, builds its runner."""

import logging
from pathlib import Path

import torch

from tritium.engine.auto_tune import auto_tune, auto_tune_enabled
from tritium.engine.config import EngineConfig
from tritium.engine.model_runner import ModelRunner
from tritium.models.config import ModelConfig
from tritium.models.llama import LlamaForCausalLM
from tritium.models.loader import load_model, random_model
from tritium.ops.attention.configs import table_choice

log = logging.getLogger(__name__)

ModelSource = str | Path | ModelConfig  # a model folder, or a shape to fill with seeded random weights


def load_shard(source: ModelSource, config: EngineConfig, device: torch.device) -> LlamaForCausalLM:
    """This rank's shard of the model (the whole model with one rank), in the dtype the config asks for."""
    dtype = config.torch_dtype(device)
    if isinstance(source, ModelConfig):
        return random_model(source, dtype, device)
    return load_model(source, dtype, device)


def fitting_pages(model: LlamaForCausalLM, config: EngineConfig, max_model_len: int) -> int:
    """KV pages of this rank's heads that fit: its free GPU memory times gpu_memory_utilization; on the CPU, room
    for four full-length sequences."""
    device = model.lm_head.weight.device
    if device.type != "cuda":
        return 4 * -(-max_model_len // config.block_size)
    attn = model.model.layers[0].self_attn
    page_bytes = (2 * model.config.num_layers * config.block_size * attn.num_kv_heads * attn.head_dim
                  * model.lm_head.weight.element_size())
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(free * config.gpu_memory_utilization) // page_bytes)


def check_pages(num_pages: int, config: EngineConfig, max_model_len: int) -> None:
    if num_pages * config.block_size < max_model_len:
        raise ValueError(f"{num_pages} KV pages of {config.block_size} tokens cannot hold one sequence of "
                         f"max_model_len={max_model_len}")


def tune_attention(model: LlamaForCausalLM, config: EngineConfig, max_model_len: int) -> None:
    """On a GPU with the Triton backend: auto-tune the attention classes this engine's steps can run that the
    device's table lacks (when on), and say in the log which tuned table the kernel runs with. Before the page pool
    takes the free memory."""
    device = model.lm_head.weight.device
    if device.type != "cuda" or (config.attention_backend or "triton") != "triton":
        return
    attn = model.model.layers[0].self_attn
    shape = (config.max_num_batched_tokens, config.max_num_seqs, attn.num_heads, attn.num_kv_heads, attn.head_dim,
             config.block_size, max_model_len, attn.sliding_window)
    if auto_tune_enabled(config.auto_tune):
        auto_tune(device, model.lm_head.weight.dtype, *shape)
    else:
        log.info("attention configs: %s (auto-tune off)", table_choice(device).describe())


def local_runner(source: ModelSource, config: EngineConfig, max_model_len: int, eos_ids: set[int]) -> ModelRunner:
    """The one rank, in this process: the whole model and its runner."""
    model = load_shard(source, config, config.torch_device())
    tune_attention(model, config, max_model_len)
    num_pages = config.num_kv_pages or fitting_pages(model, config, max_model_len)
    check_pages(num_pages, config, max_model_len)
    return ModelRunner(model, num_pages, config, max_model_len, eos_ids)
