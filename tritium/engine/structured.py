"""Structured output through xgrammar: a request's JSON schema, regex, choice or grammar is compiled once for the
model's tokenizer; each sequence holds a matcher that advances with every token it samples (so it survives
preemption: the outputs it has matched are kept) and fills a bitmask of the tokens allowed next.

Why xgrammar (measured on this project's 2-core CPU, Llama 3.1's 128,256-token vocabulary, batch 64, a JSON
schema of 6 fields, CPU time per step to fill the 64 masks, `scripts/grammar_mask_cost.py`): xgrammar 1.5-3.1 ms
(23-49 us a row), llguidance 7.7-15.9 ms, outlines-core 6.6 ms after a 55 s index build for that one schema
(docs/structured_output.md). xgrammar's masks come from a cache built at compile time for the tokens whose fate
does not depend on the parser's stack. xgrammar is imported on the first structured request (it imports
transformers, ~3 s)."""

import json
import threading

import torch

from tritium.engine.sampling_params import StructuredOutputsParams
from tritium.engine.tokenizer import Tokenizer

# Rows filled one by one below this many, by xgrammar's thread pool from it (threads cost more than tiny batches).
PARALLEL_ROWS = 8
# JSON as models write it in one line: no whitespace beyond the separators, so a model cannot pad forever.
SEPARATORS = (", ", ": ")


class Grammars:
    """Compiles what requests ask their outputs to match, for one tokenizer and vocabulary, and makes each
    sequence's matcher. Thread-safe: the server checks requests on its event loop, the engine thread adds them."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: set[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._compiler = None
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams):
        """The compiled grammar of `spec` (xgrammar caches them); ValueError naming the field it cannot compile."""
        kind, text = spec.key()
        with self._lock:
            compiler = self._compiler or self._make_compiler()
            try:
                if kind == "json":
                    return compiler.compile_json_schema(text, any_whitespace=False, separators=SEPARATORS)
                if kind == "json_object":
                    return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                        separators=SEPARATORS)
                if kind == "regex":
                    return compiler.compile_regex(text)
                if kind == "choice":
                    return compiler.compile_grammar(choice_grammar(spec.choice))
                return compiler.compile_grammar(text)
            except Exception as exc:  # noqa: BLE001  xgrammar raises RuntimeError and others for bad input
                raise ValueError(f"structured_outputs.{kind}: {_first_line(exc)}") from None

    def matcher(self, spec: StructuredOutputsParams):
        """A fresh matcher of `spec`'s grammar; it ends on the engine's end-of-sequence tokens."""
        import xgrammar

        return xgrammar.GrammarMatcher(self.compile(spec), override_stop_tokens=self.eos_ids)

    def _make_compiler(self):
        import transformers
        import xgrammar

        if not self.eos_ids:
            raise ValueError("structured output needs an end-of-sequence token, and this model names none")
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.backend)
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size, stop_token_ids=self.eos_ids)
        self._compiler = xgrammar.GrammarCompiler(info)
        return self._compiler


def choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar matching exactly one of `choices` (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Bitmasks:
    """Fills a step's token bitmask on the host from the rows' matchers (the engine puts it in the step's plan)."""

    def __init__(self, vocab_size: int) -> None:
        self.words = -(-vocab_size // 32)
        self._pool = None

    def fill(self, matchers: list) -> torch.Tensor:
        """The bitmask [rows, ceil(vocab / 32)] int32 on the host: bit t of row i says whether token t may come next;
        rows without a matcher (None) or whose matcher has ended allow every token."""
        host = torch.full((len(matchers), self.words), -1, dtype=torch.int32)
        live = [(i, m) for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
        if len(live) >= PARALLEL_ROWS:
            if self._pool is None:
                import xgrammar
                self._pool = xgrammar.BatchGrammarMatcher()
            self._pool.batch_fill_next_token_bitmask([m for _, m in live], host, [i for i, _ in live])
        else:
            for i, m in live:
                m.fill_next_token_bitmask(host, i)
        return host


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits[i, t] = -inf wherever bit t of bitmask row i is 0 (in place)."""
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :logits.shape[-1]]
    logits.masked_fill_(allowed == 0, float("-inf"))
