"""Test set-up: without CUDA the Triton kernels run through Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so before tritium is imported;
tritium.ops does the same on its own, this is a harmless duplicate that keeps the tests independent of it.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# No engine in the tests tunes at start (on a fresh GPU each would spend up to 90 s of its budget there); the
# auto-tune's own tests call it directly.
os.environ.setdefault("TRITIUM_AUTO_TUNE", "0")

import pytest  # noqa: E402

import tritium.ops  # noqa: E402, F401  (imported after the switch on purpose)


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A CPU generator seeded from the test's id: fresh inputs for every test, reproducible run to run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
