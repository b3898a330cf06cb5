"""The engine loop: requests in, one scheduled step at a time; each sampled token recorded with its text and
logprobs, stop conditions checked; finished sequences out.

The scheduler plans each step (engine/step_plan.py); the runner runs the plan: a ModelRunner in this process with
one rank, a WorkerGroup of one process per rank under tensor parallelism."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tritium.engine.config import EngineConfig
from tritium.engine.page_pool import PagePool
from tritium.engine.sampling_params import SamplingParams
from tritium.engine.scheduler import Scheduler
from tritium.engine.sequence import Sequence
from tritium.engine.structured import Bitmasks, Grammars
from tritium.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from tritium.engine.worker import local_runner, share_gpu
from tritium.engine.worker_group import WorkerGroup
from tritium.models.config import ModelConfig
from tritium.models.parallel import check_tensor_parallel


@dataclass(frozen=True)
class StepStats:
    """What the last step ran: sequences, query tokens, and keys attended (context tokens, new ones included)."""

    num_seqs: int
    num_tokens: int
    context_tokens: int


class LLMEngine:
    """The engine over a model folder, or over a `ModelConfig` with seeded random weights in its shape (benchmarks),
    run as `config` says (an EngineConfig; its defaults when None)."""

    def __init__(self, model: str | Path | ModelConfig, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        self.config = config
        tokenizer = config.tokenizer
        if tokenizer is None and not isinstance(model, ModelConfig):
            tokenizer = model
        if tokenizer is None and not config.skip_tokenizer_init:
            raise ValueError("random weights come without a tokenizer: give tokenizer=DIR or skip_tokenizer_init=True")
        # The tokenizer first: a missing file fails fast.
        self.tokenizer = None if config.skip_tokenizer_init else Tokenizer(tokenizer)
        if isinstance(model, ModelConfig):
            self.model_config, self.eos_ids, self.sampling_defaults = model, set(), {}
        else:
            self.model_config = ModelConfig.load(model)
            generation = _read_json(Path(model) / "generation_config.json")
            self.eos_ids = _eos_ids(generation) | _eos_ids(_read_json(Path(model) / "config.json"))
            self.sampling_defaults = _sampling_defaults(generation, Path(model) / "generation_config.json")
        cfg = self.model_config
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        tp = config.tensor_parallel_size
        if tp == 1:
            self.runner = local_runner(model, config, self.max_model_len, self.eos_ids)
        else:
            check_tensor_parallel(cfg, tp)
            if config.ranks_address is None:
                _check_devices(config)
            self.runner = WorkerGroup(model, config, self.max_model_len, self.eos_ids)
        self.pages = PagePool(self.runner.num_pages, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.pages, config.max_num_batched_tokens, config.max_num_seqs)
        self.grammars = None if self.tokenizer is None else Grammars(self.tokenizer, cfg.vocab_size, self.eos_ids)
        self.bitmasks = Bitmasks(cfg.vocab_size)
        self.last_step = StepStats(0, 0, 0)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "") -> list[Sequence]:
        """Queue a request as its `params.n` samples; a bad one raises ValueError here and leaves the others
        untouched. The samples share the prompt's KV pages through the prefix cache."""
        self.check_request(prompt_ids, params)
        seqs = [Sequence(list(prompt_ids), params, request_id, index=k) for k in range(params.n)]
        for seq in seqs:
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids)
            if params.structured_outputs is not None:
                seq.grammar = self.grammars.matcher(params.structured_outputs)
            self.scheduler.add(seq)
        return seqs

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams with the model's defaults (generation_config.json: temperature, top_k, top_p, min_p,
        max_new_tokens, as vLLM reads them) under the fields given here."""
        return SamplingParams(**{**self.sampling_defaults, **overrides})

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming what is wrong with a request, before it is queued."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len ({self.max_model_len})")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise ValueError(f"{name} ({k}) exceeds the vocabulary ({vocab} tokens)")
        for name, ids in (("logit_bias", params.logit_bias or ()), ("stop_token_ids", params.stop_token_ids)):
            if any(t >= vocab for t in ids):
                raise ValueError(f"{name} names token ids outside the vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (the engine runs with skip_tokenizer_init=True); "
                             "use stop_token_ids")
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise ValueError("structured_outputs needs a tokenizer (the engine runs with skip_tokenizer_init=True)")
            self.grammars.compile(params.structured_outputs)

    def abort(self, request_id: str) -> list[Sequence]:
        """Stop a request (its client went away): its sequences end with finish_reason "abort" and their KV pages
        are free for others at once. Returns them; none when the request already finished."""
        dropped = self.scheduler.abort(request_id)
        self.runner.release([seq.seq_id for seq in dropped])
        return dropped

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """Run one step; returns the sequences that finished in it. Raises EngineDeadError when a tensor-parallel
        rank failed (the engine then serves nothing more)."""
        batch, plan = self.scheduler.schedule()
        if not batch:
            raise RuntimeError("no request fits in the KV-cache pool: the pool is smaller than one sequence")
        self.last_step = StepStats(len(batch), sum(n for _, n in batch), sum(s.num_computed + n for s, n in batch))
        if any(seq.grammar is not None for seq, _ in batch):  # the matchers have taken every token read back
            plan.bitmask = self.bitmasks.fill([seq.grammar for seq, _ in batch])
        out = self.runner.step(plan)
        finished = []
        for seq, n in batch:
            seq.num_computed += n
            seq.prompt_logprobs += out.prompt_logprobs.get(seq.seq_id, [])
            if seq.seq_id not in out.sampled:
                continue
            reason = self._record(seq, *out.sampled[seq.seq_id])
            if reason:
                self.scheduler.finish(seq, reason)
                finished.append(seq)
        if finished:
            self.runner.release([seq.seq_id for seq in finished])
        return finished

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks' processes (nothing to do with one rank); idempotent. An engine dropped
        without it stops them when it is garbage-collected, or when the interpreter exits."""
        if isinstance(self.runner, WorkerGroup):
            self.runner.shutdown()

    def _record(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> str | None:
        """Append a sampled token, its logprobs and its text; returns why the sequence ends here, if it does."""
        p = seq.params
        seq.output_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token]
        reason = None
        if seq.grammar is not None and (not seq.grammar.accept_token(token) or seq.grammar.is_terminated()):
            # The grammar ended on an end-of-sequence token (even with ignore_eos: nothing may follow). A token it
            # refuses cannot have been sampled under its mask; should one be, the output ends rather than break it.
            reason = "stop"
        elif token in p.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        elif not p.ignore_eos and token in self.eos_ids:
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens:
            reason = "length"
        if seq.detokenizer is None:
            return reason
        # A stop token's own text is left out, as a stop string's is.
        text = seq.detokenizer.add(token) if reason != "stop" or p.include_stop_str_in_output else ""
        if reason:
            text += seq.detokenizer.flush()
        start = len(seq.text)
        seq.text += text
        if len(seq.output_ids) < p.min_tokens:  # as vLLM: no stop string ends an output shorter than min_tokens
            return reason
        hit = _find_stop(seq.text, start, p.stop)
        if hit is None:
            return reason
        at, stop = hit
        seq.text = seq.text[:at + len(stop) if p.include_stop_str_in_output else at]
        seq.stop_reason = stop
        return "stop"


def _find_stop(text: str, start: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The first stop string in `text` that ends in its new part `text[start:]`: (where it begins, which)."""
    hits = [(at, s) for s in stops if (at := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits, key=lambda hit: (hit[0], len(hit[1]))) if hits else None


def _read_json(path: Path) -> dict:
    """A model folder's JSON file, or {} where the folder has none."""
    return json.loads(path.read_text()) if path.is_file() else {}


def _eos_ids(config: dict) -> set[int]:
    """The end-of-sequence ids a config.json or generation_config.json names (one id or a list)."""
    eos = config.get("eos_token_id")
    return set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])


# generation_config.json keys (transformers' names) that become SamplingParams defaults.
_SAMPLING_KEYS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                  "max_new_tokens": "max_tokens"}


def _sampling_defaults(raw: dict, path: Path) -> dict:
    """The sampling fields a generation_config.json (read from `path`) sets; a value SamplingParams refuses raises
    here, naming the file."""
    defaults = {ours: raw[theirs] for theirs, ours in _SAMPLING_KEYS.items() if raw.get(theirs) is not None}
    try:
        SamplingParams(**defaults)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    return defaults


def _check_devices(config: EngineConfig) -> None:
    """A GPU for each rank (one GPU for all with TRITIUM_TP_SHARE_GPU=1)."""
    device, tp = config.torch_device(), config.tensor_parallel_size
    if device.type == "cuda" and not share_gpu() and torch.cuda.device_count() < tp:
        raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs; this host has {torch.cuda.device_count()}")
