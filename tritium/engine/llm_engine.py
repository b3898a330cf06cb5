"""The engine loop: requests in, one scheduled step at a time, finished sequences out."""

import json
from pathlib import Path

import torch

from tritium.engine.block_manager import BlockManager
from tritium.engine.model_runner import ModelRunner
from tritium.engine.sampling_params import SamplingParams
from tritium.engine.scheduler import Scheduler
from tritium.engine.sequence import Sequence
from tritium.models.loader import load_model


class LLMEngine:
    def __init__(
        self, model_dir: str | Path, dtype: str | torch.dtype = "auto", device: str | None = None,
        block_size: int = 16, max_model_len: int | None = None, max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256, enable_prefix_caching: bool = True, num_kv_blocks: int | None = None,
        gpu_memory_utilization: float = 0.9, attention_backend: str | None = None,
    ) -> None:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.model = load_model(model_dir, dtype, device)
        cfg = self.model.config
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.eos_ids = _eos_ids(Path(model_dir))
        if num_kv_blocks is None:
            num_kv_blocks = _kv_blocks(self.model, device, block_size, gpu_memory_utilization, self.max_model_len)
        if num_kv_blocks * block_size < self.max_model_len:
            raise ValueError(f"{num_kv_blocks} KV pages of {block_size} tokens cannot hold one sequence of "
                             f"max_model_len={self.max_model_len}")
        backend = attention_backend or ("triton" if device.type == "cuda" else "reference")
        self.blocks = BlockManager(num_kv_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_batched_tokens, max_num_seqs)
        self.runner = ModelRunner(self.model, num_kv_blocks, block_size, backend)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "") -> Sequence:
        """Queue a request; a bad one raises ValueError here and leaves the others untouched."""
        self.check_request(prompt_ids, params)
        seq = Sequence(list(prompt_ids), params, request_id)
        self.scheduler.add(seq)
        return seq

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming what is wrong with a request, before it is queued."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len ({self.max_model_len})")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """Run one step; returns the sequences that finished in it."""
        batch = self.scheduler.schedule()
        if not batch:
            raise RuntimeError("no request fits in the KV-cache pool: the pool is smaller than one sequence")
        sampled = self.runner.step(batch)
        finished = []
        for seq, n in batch:
            seq.num_computed += n
            self.blocks.commit_full_pages(seq)
            token = sampled.get(seq.seq_id)
            if token is None:
                continue
            seq.output_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)
                self.runner.release(seq)
                finished.append(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return "stop"
        if len(seq.output_ids) >= p.max_tokens:
            return "length"
        return None


def _eos_ids(model_dir: Path) -> set[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return ids


def _kv_blocks(model, device: torch.device, block_size: int, utilization: float, max_model_len: int) -> int:
    """Pages that fit: free GPU memory times `utilization`; on the CPU, room for four full-length sequences."""
    cfg = model.config
    page_bytes = 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * model.lm_head.weight.element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * utilization) // page_bytes)
    return 4 * -(-max_model_len // block_size)
