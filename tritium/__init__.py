"""Tritium: LLM inference around one unified, performance-portable Triton attention kernel."""

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the kernels run in Triton's interpreter. Decided here, before anything in Tritium imports
    # triton: its @jit decorator (and triton.language's own helpers) read the switch when they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

__version__ = "0.1.0"
