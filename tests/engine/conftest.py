"""A tiny Llama-3-style model with a 300-token vocabulary and a byte-level BPE tokenizer, saved once per session."""

import pytest
import transformers

from tests.engine.helpers import save_tokenizer
from tests.models.helpers import save_family


@pytest.fixture(scope="session")
def text_model(tmp_path_factory) -> tuple:
    """(folder, transformers model, transformers tokenizer of the folder)."""
    path = tmp_path_factory.mktemp("text_model")
    hf = save_family("llama3", path, vocab_size=300)
    save_tokenizer(path)
    return path, hf, transformers.PreTrainedTokenizerFast.from_pretrained(path)
