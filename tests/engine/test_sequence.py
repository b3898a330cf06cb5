"""Sequence.token_slice reads tokens[start:end] across the prompt/output boundary without building the list."""

import pytest

from tritium.engine.sampling_params import SamplingParams
from tritium.engine.sequence import Sequence


@pytest.mark.parametrize(("start", "end"), [(0, 3), (2, 5), (5, 6), (4, 9), (5, 9), (0, 9), (8, 9), (3, 3)])
def test_token_slice_equals_slicing_the_tokens(start, end):
    seq = Sequence([11, 12, 13, 14, 15], SamplingParams())
    seq.output_ids = [21, 22, 23, 24]
    assert seq.token_slice(start, end) == seq.tokens[start:end]
