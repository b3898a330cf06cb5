"""Tritium: LLM inference around one unified, performance-portable Triton attention kernel."""

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the kernels run in Triton's interpreter. Decided here, before anything in Tritium imports
    # triton: its @jit decorator (and triton.language's own helpers) read the switch when they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "default_model_path"]


def default_model_path() -> str:
    """The folder of the demo model that ships in the package (7M parameters, trained on Python's documentation):
    what `LLM()`, `tritium generate` and `tritium serve` take when no model is given."""
    from importlib import resources

    return str(resources.files("tritium").joinpath("default_model"))


def __getattr__(name: str):
    """`from tritium import LLM, SamplingParams` without loading the engine for every `import tritium`."""
    if name == "LLM":
        from tritium.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from tritium.engine.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput", "Logprob"):
        from tritium.engine import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'tritium' has no attribute {name!r}")
