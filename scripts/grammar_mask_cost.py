"""The per-step cost of filling a batch's token masks, for each grammar library that imports (xgrammar,
llguidance, outlines-core): how Tritium chose xgrammar (docs/structured_output.md has the numbers).

Each of `--batch` rows follows its own JSON document of one schema, tokenized by the tokenizer given (a real
128k one: Llama 3.1's tokenizer.json); at every step every row's mask is filled, checked to allow the row's next
token, and the token is consumed. The fill time is the calling thread's CPU time (the libraries fill on the calling
thread here), so other processes on a busy machine do not inflate it.

    python scripts/grammar_mask_cost.py --tokenizer DIR [--batch 64] [--libraries xgrammar llguidance outlines-core]

Only xgrammar is a dependency of Tritium; `pip install llguidance outlines-core` to time the others."""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import tokenizers
import torch

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.(com|org)$"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
    "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "active": {"type": "boolean"}},
    "required": ["name", "age", "email", "tags", "address", "active"], "additionalProperties": False}
WORDS = "alpha beta gamma delta river stone cloud maple quartz violet ember harbor".split()


def documents(count: int, seed: int = 0) -> list[str]:
    """`count` compact JSON documents valid under SCHEMA."""
    rng = random.Random(seed)
    word = lambda: rng.choice(WORDS)  # noqa: E731
    return [json.dumps({"name": f"{word().title()} {word().title()}", "age": rng.randint(0, 99),
                        "email": f"{word()}@{word()}.com", "tags": [word() for _ in range(rng.randint(0, 4))],
                        "address": {"city": word().title() + " City", "zip": str(rng.randint(10000, 99999))},
                        "active": i % 2 == 0}, separators=(",", ":")) for i in range(count)]


def xgrammar_rows(tokenizer_json: str, eos: int, vocab: int, batch: int):
    import transformers
    import xgrammar

    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_json)
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    grammar = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                                 separators=(",", ":"))
    rows = [xgrammar.GrammarMatcher(grammar) for _ in range(batch)]

    def fill(mask: torch.Tensor) -> None:
        for i, row in enumerate(rows):
            row.fill_next_token_bitmask(mask, i)

    return fill, lambda tokens: all(r.accept_token(t) for r, t in zip(rows, tokens))


def llguidance_rows(tokenizer_json: str, eos: int, vocab: int, batch: int):
    import llguidance
    import llguidance.torch

    tok = llguidance.LLTokenizer(Path(tokenizer_json).read_text(), n_vocab=vocab, eos_token=eos)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    first = llguidance.LLMatcher(tok, grammar)  # copies share its lexer's lazily built states: its best case
    rows = [first.deep_copy() for _ in range(batch)]

    def fill(mask: torch.Tensor) -> None:
        for i, row in enumerate(rows):
            llguidance.torch.fill_next_token_bitmask(row, mask, i)

    return fill, lambda tokens: all(r.consume_token(t) for r, t in zip(rows, tokens))


def outlines_core_rows(tokenizer_json: str, eos: int, vocab: int, batch: int):
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    # Byte-level BPE pieces back to their bytes (GPT-2's printable alphabet for the 256 byte values).
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in printable)})
    by_bytes: dict[bytes, list[int]] = {}
    for piece, token in tokenizers.Tokenizer.from_file(tokenizer_json).get_vocab(with_added_tokens=False).items():
        if token != eos and all(c in alphabet for c in piece):
            by_bytes.setdefault(bytes(alphabet[c] for c in piece), []).append(token)
    start = time.perf_counter()
    index = outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA)), outlines_core.Vocabulary(eos, by_bytes))
    print(f"  outlines-core: index built in {time.perf_counter() - start:.1f} s")
    rows = [outlines_core.Guide(index) for _ in range(batch)]

    def fill(mask: torch.Tensor) -> None:
        for i, row in enumerate(rows):
            row.write_mask_into(mask[i].data_ptr(), mask.shape[1], 4)

    def consume(tokens: list[int]) -> bool:
        for row, t in zip(rows, tokens):
            row.advance(t)
        return True

    return fill, consume


LIBRARIES = {"xgrammar": xgrammar_rows, "llguidance": llguidance_rows, "outlines-core": outlines_core_rows}


def measure(name: str, tokenizer_json: str, eos: int, batch: int) -> dict:
    tok = tokenizers.Tokenizer.from_file(tokenizer_json)
    vocab = tok.get_vocab_size()
    traces = [tok.encode(d, add_special_tokens=False).ids for d in documents(batch)]
    steps = min(map(len, traces))
    fill, consume = LIBRARIES[name](tokenizer_json, eos, vocab, batch)
    mask = torch.full((batch, -(-vocab // 32)), -1, dtype=torch.int32)
    cpu = 0.0
    for step in range(steps):
        start = time.thread_time()
        fill(mask)
        cpu += time.thread_time() - start
        tokens = [t[step] for t in traces]
        for row, token in enumerate(tokens):
            if not (int(mask[row, token // 32]) >> (token % 32)) & 1:
                raise AssertionError(f"{name}: row {row} step {step}: the mask refuses the document's token")
        if not consume(tokens):
            raise AssertionError(f"{name}: a row refused its document's token")
    return {"library": name, "vocab": vocab, "batch": batch, "steps": steps, "ms_per_step": cpu / steps * 1e3}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json")
    parser.add_argument("--eos", type=int, help="the end-of-sequence id (default: the tokenizer's last special)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES))
    args = parser.parse_args(argv)
    path = str(Path(args.tokenizer) / "tokenizer.json")
    added = tokenizers.Tokenizer.from_file(path).get_added_tokens_decoder()
    eos = args.eos if args.eos is not None else max(added, default=0)
    results = []
    for name in args.libraries:
        try:
            result = measure(name, path, eos, args.batch)
        except ImportError as exc:
            print(f"{name}: not installed ({exc})")
            continue
        results.append(result)
        print(f"{name}: {result['ms_per_step']:.2f} ms of CPU per step for {args.batch} rows at a "
              f"{result['vocab']}-token vocabulary ({result['ms_per_step'] / args.batch * 1e3:.0f} us a row, "
              f"{result['steps']} steps)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
