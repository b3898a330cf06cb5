"""The tokenizer against transformers' on the same folder: encoding, decoding, chat templates; streaming decode."""

import pytest
import transformers

from tests.engine.helpers import CHAT_TEMPLATE, SENTENCES, save_tokenizer
from tritium.engine.tokenizer import IncrementalDetokenizer, Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, world!"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "The cat sat?"},
     {"role": "assistant", "content": "On the mat."}, {"role": "user", "content": "Caf\u00e9 \U0001f642"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "name": None}],
]


def test_encode_decode_match_transformers(text_model):
    path, _, hf_tok = text_model
    tok = Tokenizer(path)
    for text in SENTENCES + ["unseen words \u00fcber \u6f22\u5b57", ""]:
        assert tok.encode(text) == hf_tok(text).input_ids
        assert tok.encode(text, add_special_tokens=False) == hf_tok(text, add_special_tokens=False).input_ids
        ids = tok.encode(text)
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids)
    assert tok.eos_token_id == hf_tok.eos_token_id is not None
    assert tok.special_tokens == {"bos_token": hf_tok.bos_token, "eos_token": hf_tok.eos_token}


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(text_model, generation_prompt):
    path, _, hf_tok = text_model
    tok = Tokenizer(path)
    for conversation in CONVERSATIONS:
        ours = tok.apply_chat_template(conversation, add_generation_prompt=generation_prompt)
        theirs = hf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours == theirs
    assert "<|assistant|>\n" in ours and ours.endswith("<|assistant|>\n") == generation_prompt


def test_chat_template_file_and_errors(tmp_path):
    # transformers 5 writes the template to chat_template.jinja; that file wins over tokenizer_config.json.
    save_tokenizer(tmp_path, chat_template="ignored")
    (tmp_path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tok = Tokenizer(tmp_path)
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert tok.apply_chat_template(CONVERSATIONS[0]) == hf_tok.apply_chat_template(
        CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match="unknown role: tool"):  # the template's raise_exception
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="conversation"):
        tok.apply_chat_template([{"content": "no role"}])
    (tmp_path / "chat_template.jinja").unlink()
    save_tokenizer(tmp_path, chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(tmp_path).apply_chat_template(CONVERSATIONS[0])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="tokenizer missing: .* has no tokenizer.json.*skip_tokenizer_init=True"):
        Tokenizer(tmp_path)


def test_incremental_detokenizer_holds_back_partial_characters(text_model):
    tok = Tokenizer(text_model[0])
    # Characters never seen in training are single bytes: each takes several tokens.
    prompt = tok.encode("Hello")
    text = "caf\u00e9 \u6f22\u5b57\U0001f680 the mat"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # some characters do span several tokens
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(t) for t in ids]
    assert "" in pieces  # held back at least once
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text
    # An unfinished character at the end comes out as U+FFFD on flush, as a plain decode shows it.
    detok = IncrementalDetokenizer(tok, prompt)
    partial = tok.encode("\u6f22", add_special_tokens=False)[:-1]
    assert "".join(detok.add(t) for t in partial) == ""
    assert detok.flush() == tok.decode(partial)
    assert detok.flush() == ""
