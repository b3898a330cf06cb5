"""The engine's settings in one typed object, with vLLM's names: what `LLM(...)`, the CLI and the server pass down."""

from dataclasses import dataclass, fields

import torch

DTYPES = ("auto", "bfloat16", "float16", "float32")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names; fp8 is e4m3 (torch.float8_e4m3fn)
BACKENDS = ("triton", "reference")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model. Every field is checked on construction; a bad one raises ValueError naming it.

    dtype: "auto" (bfloat16 on a GPU, float32 on the CPU), "bfloat16", "float16" or "float32".
    kv_cache_dtype: "auto" (the model's dtype) or "fp8" / "fp8_e4m3": K/V pages in float8 e4m3 with a per-layer
        scale each for K and V, so twice the pages in the same memory as bfloat16 and half the bytes per decode read.
    calculate_kv_scales: with an fp8 cache, measure the scales on the first step (its largest |k| and |v| per layer)
        instead of taking the checkpoint's (k_scale/v_scale) or, where it has none, 1.0.
    device: "cuda", "cpu" ... (default: a GPU when there is one).
    block_size: tokens per KV-cache page (vLLM's name for the page size).
    max_model_len: longest prompt + output (default: the model's max_position_embeddings).
    max_num_batched_tokens: the scheduler's token budget per step; max_num_seqs: sequences per step.
    enable_prefix_caching: share the pages of identical prompt prefixes.
    num_kv_pages: a fixed page-pool size (default: sized from free GPU memory times gpu_memory_utilization; on the
        CPU room for four sequences of max_model_len).
    enforce_eager: run decode steps eagerly, not as CUDA graphs.
    auto_tune: at start on a GPU, tune the attention kernel's problem classes this device's own tuned table lacks
        (within 90 s; cached, so once per device and shape); TRITIUM_AUTO_TUNE=0 turns it off too.
    attention_backend: "triton" (the unified kernel) or "reference" (PyTorch); default triton on a GPU, reference
        on the CPU.
    tokenizer: a folder or Hugging Face Hub id to take the tokenizer from (default: the model's); skip_tokenizer_init:
        load none (prompts and outputs are token ids).
    revision: the Hub revision (branch, tag or commit) of a model given by its Hub id.
    seed: seeds the random draws of requests that carry no seed of their own, so a run repeats (default: none, each
        run differs).
    tensor_parallel_size: ranks the model is split across, one process each (GPUs 0 .. N-1 over NCCL; on the CPU,
        over gloo).
    ranks_address: "HOST:PORT" where the engine waits for ranks that torchrun started on several hosts (default:
        the engine starts its ranks on this host); docs/tensor_parallel.md.
    """

    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = False
    device: str | None = None
    block_size: int = 16
    max_model_len: int | None = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    num_kv_pages: int | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    auto_tune: bool = True
    attention_backend: str | None = None
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    revision: str | None = None
    seed: int | None = None
    tensor_parallel_size: int = 1
    ranks_address: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):  # torch.bfloat16 is as good as "bfloat16"
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size"):
            _positive_int(name, getattr(self, name))
        for name in ("max_model_len", "num_kv_pages"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("enable_prefix_caching", "enforce_eager", "auto_tune", "skip_tokenizer_init",
                     "calculate_kv_scales"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.calculate_kv_scales and self.kv_cache_dtype == "auto":
            raise ValueError("calculate_kv_scales needs an fp8 KV cache (kv_cache_dtype='fp8'): a cache in the "
                             "model's dtype has no scales")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {u!r}")
        if self.attention_backend not in (None, *BACKENDS):
            raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {self.attention_backend!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("device", "tokenizer", "revision", "ranks_address"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value))
        if self.ranks_address is not None and self.tensor_parallel_size == 1:
            raise ValueError("ranks_address goes with tensor_parallel_size > 1")

    @classmethod
    def from_options(cls, **options) -> "EngineConfig":
        """An EngineConfig from keyword options (what `LLM(model, **options)` takes); an unknown name raises
        ValueError listing the known ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown engine option {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        return cls(**options)

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def torch_kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV pages' dtype for a model in `model_dtype`."""
        return model_dtype if self.kv_cache_dtype == "auto" else torch.float8_e4m3fn


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
