"""On a GPU: every family (tiny random folders, float32) through the CUDA path: the attention kernel with its
windows and soft-caps, the fused-MoE kernels, the Triton glue, against transformers on the CPU."""

import pytest
import torch

from tests.models.helpers import FAMILIES, check_against_transformers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_transformers_on_gpu(family, tmp_path):
    check_against_transformers(family, "triton", tmp_path, device="cuda")
