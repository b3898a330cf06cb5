"""The engine loop: requests in, one scheduled step at a time; each sampled token recorded with its text and
logprobs, stop conditions checked; finished sequences out.

Faults are sorted by whose they are. What raises while handling one request (its set-up, its tokens' text and stop
checks, or a batched step that fails only while it is in the batch) ends that request alone, with finish_reason
"error"; an engine fault (the device's, a dead rank's) marks the engine dead and fails every request."""

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tritium.engine.auto_tune import auto_tune, auto_tune_enabled
from tritium.engine.config import EngineConfig
from tritium.engine.errors import EngineDeadError, InvalidParameter, RequestFailed, is_engine_fault
from tritium.engine.model_runner import ModelRunner
from tritium.engine.page_pool import PagePool
from tritium.engine.record import record_token
from tritium.engine.sampling_params import SamplingParams
from tritium.engine.scheduler import Scheduler
from tritium.engine.sequence import Sequence, Status
from tritium.engine.structured import Grammars
from tritium.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from tritium.models.config import ModelConfig
from tritium.models.loader import load_model, random_model
from tritium.models.source import resolve_folder, resolve_model
from tritium.ops.attention.configs import table_choice

log = logging.getLogger(__name__)


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
        if not isinstance(model, ModelConfig):
            model = resolve_model(model, config.revision)
            ModelConfig.load(model)  # config.json and its architecture checked before anything is read
        tokenizer = config.tokenizer
        if tokenizer is None and not isinstance(model, ModelConfig):
            tokenizer = model
        if tokenizer is None and not config.skip_tokenizer_init:
            raise ValueError("random weights come without a tokenizer: give tokenizer=DIR or skip_tokenizer_init=True")
        # The tokenizer before the weights: a missing file fails fast.
        self.tokenizer = None if config.skip_tokenizer_init else Tokenizer(resolve_folder(tokenizer))
        device = config.torch_device()
        dtype = config.torch_dtype(device)
        if isinstance(model, ModelConfig):
            self.model, self.eos_ids, self.sampling_defaults = random_model(model, dtype, device), set(), {}
        else:
            generation = _read_json(Path(model) / "generation_config.json")
            self.model = load_model(model, dtype, device)
            self.eos_ids = _eos_ids(generation) | _eos_ids(_read_json(Path(model) / "config.json"))
            self.sampling_defaults = _sampling_defaults(generation, Path(model) / "generation_config.json")
        cfg = self.model.config
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        page_size = config.block_size
        backend = config.attention_backend or ("triton" if device.type == "cuda" else "reference")
        if backend == "triton" and device.type == "cuda":  # before the page pool takes the free memory
            self._tune_attention(device, dtype, page_size)
        num_pages = config.num_kv_pages
        if num_pages is None:
            num_pages = _kv_pages(self.model, device, page_size, config.gpu_memory_utilization, self.max_model_len)
        if num_pages * page_size < self.max_model_len:
            raise ValueError(f"{num_pages} KV pages of {page_size} tokens cannot hold one sequence of "
                             f"max_model_len={self.max_model_len}")
        self.pages = PagePool(num_pages, page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.pages, config.max_num_batched_tokens, config.max_num_seqs)
        # Decode steps replay CUDA graphs on a GPU unless enforce_eager (vLLM's name for the switch).
        graphs = not config.enforce_eager and device.type == "cuda" and backend == "triton"
        self.runner = ModelRunner(self.model, num_pages, page_size, backend, graphs, config.max_num_seqs,
                                  self.max_model_len, config.max_num_batched_tokens, self.eos_ids)
        self.grammars = None if self.tokenizer is None else Grammars(self.tokenizer, cfg.vocab_size, self.eos_ids)
        self.last_step = StepStats(0, 0, 0)
        self.dead: EngineDeadError | None = None  # set by an engine fault: nothing more is served
        if config.seed is not None:  # last: building the model draws from torch's generator too
            torch.manual_seed(config.seed)  # requests without a seed of their own draw from it

    def _tune_attention(self, device: torch.device, dtype: torch.dtype, page_size: int) -> None:
        """Auto-tune the attention classes this engine's steps can run that the device's table lacks (when on), and
        say in the log which tuned table the kernel runs with."""
        attn = self.model.model.layers[0].self_attn
        shape = (self.config.max_num_batched_tokens, self.config.max_num_seqs, attn.num_heads, attn.num_kv_heads,
                 attn.head_dim, page_size, self.max_model_len, attn.sliding_window)
        if auto_tune_enabled(self.config.auto_tune):
            auto_tune(device, dtype, *shape)
        else:
            log.info("attention configs: %s (auto-tune off)", table_choice(device).describe())

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "") -> list[Sequence]:
        """Queue a request as its `params.n` samples; a bad one raises ValueError here (a set-up that fails,
        RequestFailed) and leaves the others untouched. The samples share the prompt's KV pages through the prefix
        cache."""
        if self.dead is not None:
            raise self.dead
        self.check_request(prompt_ids, params)
        if params.max_tokens is None:  # up to the context, as vLLM
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(prompt_ids))
        seqs = [Sequence(list(prompt_ids), params, request_id, index=k) for k in range(params.n)]
        try:
            for seq in seqs:
                if self.tokenizer is not None:
                    seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids)
                if params.structured_outputs is not None:
                    seq.grammar = self.grammars.matcher(params.structured_outputs)
                self.runner.prepare(seq)
        except Exception as exc:  # noqa: BLE001  the request's own set-up: it alone fails
            for seq in seqs:
                self.runner.release(seq)
            self._check_fault(exc)
            raise RequestFailed(f"setting up the request failed: {type(exc).__name__}: {exc}") from exc
        for seq in seqs:
            self.scheduler.add(seq)
        return seqs

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams with the model's defaults (generation_config.json: temperature, top_k, top_p, min_p,
        max_new_tokens, as vLLM reads them) under the fields given here."""
        return SamplingParams(**{**self.sampling_defaults, **overrides})

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidParameter (a ValueError) naming what is wrong with a request, before it is queued."""
        if not isinstance(params, SamplingParams):
            raise InvalidParameter("params", f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise InvalidParameter("prompt", "the prompt is empty" if not prompt_ids else "the prompt is not a list")
        vocab = self.model.config.vocab_size
        if not all(type(t) is int and 0 <= t < vocab for t in prompt_ids):
            raise InvalidParameter("prompt", f"prompt token ids must be integers in [0, {vocab})")
        room = self.max_model_len - len(prompt_ids)
        if params.max_tokens is None and room < 1:
            raise InvalidParameter("prompt", f"prompt ({len(prompt_ids)} tokens) leaves no room to generate within "
                                   f"max_model_len ({self.max_model_len})")
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidParameter("max_tokens", f"prompt ({len(prompt_ids)} tokens) + max_tokens "
                                   f"({params.max_tokens}) exceeds max_model_len ({self.max_model_len})")
        if params.min_tokens > room:
            raise InvalidParameter("min_tokens", f"prompt ({len(prompt_ids)} tokens) + min_tokens "
                                   f"({params.min_tokens}) exceeds max_model_len ({self.max_model_len})")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise InvalidParameter(name, f"{name} ({k}) exceeds the vocabulary ({vocab} tokens)")
        for name, ids in (("logit_bias", params.logit_bias or ()), ("stop_token_ids", params.stop_token_ids)):
            if any(t >= vocab for t in ids):
                raise InvalidParameter(name, f"{name} names token ids outside the vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise InvalidParameter("stop", "stop strings need a tokenizer (the engine runs with "
                                   "skip_tokenizer_init=True); use stop_token_ids")
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise InvalidParameter("structured_outputs", "structured_outputs needs a tokenizer (the engine runs "
                                       "with skip_tokenizer_init=True)")
            try:
                self.grammars.compile(params.structured_outputs)
            except ValueError as exc:
                raise InvalidParameter("structured_outputs", str(exc)) from None

    def abort(self, request_id: str) -> list[Sequence]:
        """Stop a request (its client went away): its sequences end with finish_reason "abort" and their KV pages
        are free for others at once. Returns them; none when the request already finished."""
        dropped = self.scheduler.abort(request_id)
        for seq in dropped:
            self.runner.release(seq)
        return dropped

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """Run one step; returns the sequences that finished in it, those of a request that failed in it too (with
        finish_reason "error"). An engine fault raises EngineDeadError: every request has failed with it."""
        if self.dead is not None:
            raise self.dead
        # Sequences that arrived while decodes were launched ahead join after those decodes, unless none is left.
        batch = self.scheduler.schedule(admit=self.runner.ahead is None) or self.scheduler.schedule()
        if not batch:
            raise RuntimeError("no request fits in the KV-cache pool: the pool is smaller than one sequence")
        self.last_step = StepStats(len(batch), sum(n for _, n in batch), sum(s.num_computed + n for s, n in batch))
        sampled, finished = self._run(batch)
        for seq, n in batch:
            if seq.status is Status.FINISHED:  # its request failed in this step
                continue
            seq.num_computed += n
            if seq.seq_id not in sampled:
                continue
            try:
                reason = record_token(seq, *sampled[seq.seq_id], self.eos_ids)
            except Exception as exc:  # noqa: BLE001  its text or stop checks: its request alone fails
                self._check_fault(exc)
                finished += self._fail(seq.request_id, exc)
                continue
            if reason:
                self.scheduler.finish(seq, reason)
                self.runner.release(seq)
                finished.append(seq)
        return finished

    def _run(self, batch: list[tuple[Sequence, int]]) -> tuple[dict[int, tuple], list[Sequence]]:
        """The runner's step over the batch: (sampled token and logprobs by seq_id, sequences failed in it)."""
        try:
            return self.runner.step(batch, self._ahead(batch)), []
        except Exception as exc:  # noqa: BLE001  sorted below: the engine's fault, or some request's
            self._check_fault(exc)
            first = exc
        self.runner.ahead = None
        failed: list[Sequence] = []
        sampled = self._isolate(batch, first, failed)
        requests = {seq.request_id for seq, _ in batch}
        if len(requests) > 1 and {seq.request_id for seq in failed} == requests:
            self._die(first)  # every request fails even alone: the fault is not theirs
        return sampled, failed

    def _isolate(self, batch: list[tuple[Sequence, int]], exc: Exception, failed: list[Sequence]) -> dict[int, tuple]:
        """Run a batch whose step raised `exc` again in halves, down to single sequences, so that only the requests
        whose sequences fail alone fail; returns the others' samples. K/V written twice holds the same values; a
        seeded sample whose draw the failed step had taken draws anew."""
        if len(batch) == 1:
            failed += self._fail(batch[0][0].request_id, exc)
            return {}
        sampled = {}
        for part in (batch[:len(batch) // 2], batch[len(batch) // 2:]):
            part = [(seq, n) for seq, n in part if seq.status is not Status.FINISHED]
            if not part:
                continue
            try:
                sampled.update(self.runner.step(part))
            except Exception as part_exc:  # noqa: BLE001
                self._check_fault(part_exc)
                sampled.update(self._isolate(part, part_exc, failed))
        return sampled

    def _fail(self, request_id: str, exc: Exception) -> list[Sequence]:
        """End a request with finish_reason "error" (its pages freed); returns its sequences that were not done."""
        log.error("request %s failed in the engine", request_id, exc_info=exc)
        seqs = self.abort(request_id)
        for seq in seqs:
            seq.finish_reason, seq.error = "error", f"{type(exc).__name__}: {exc}"
        return seqs

    def _check_fault(self, exc: Exception) -> None:
        """Raise EngineDeadError when `exc` is an engine fault (see errors.is_engine_fault)."""
        if is_engine_fault(exc):
            self._die(exc)

    def _die(self, exc: Exception) -> None:
        """Mark the engine dead and fail every request with it; raises the EngineDeadError."""
        dead = exc if isinstance(exc, EngineDeadError) else EngineDeadError(
            f"the engine failed: {type(exc).__name__}: {exc}")
        log.critical("the engine is dead: %s", dead, exc_info=exc)
        self.dead = dead
        for request_id in {seq.request_id for seq in (*self.scheduler.waiting, *self.scheduler.running)}:
            for seq in self.abort(request_id):
                seq.finish_reason, seq.error = "error", str(dead)
        raise dead from exc

    def _ahead(self, batch: list[tuple[Sequence, int]]) -> list[Sequence]:
        """The sequences whose next decode can be launched before this step's tokens are read back: when nothing
        waits to be admitted and every running sequence samples in this step, those that do not end on this
        token by length; each is given the page for one more token. Empty when that is not the case."""
        if self.scheduler.waiting or len(batch) != len(self.scheduler.running):
            return []
        if any(seq.num_computed + n != len(seq) for seq, n in batch):  # a prefill chunk runs on next step
            return []
        seqs = [seq for seq, _ in batch if len(seq.output_ids) + 1 < seq.params.max_tokens]
        if sum(self.pages.pages_missing(seq, len(seq) + 1) for seq in seqs) > self.pages.num_free:
            return []
        for seq in seqs:
            self.pages.grow(seq, len(seq) + 1)
        return seqs


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


def _kv_pages(model, device: torch.device, page_size: int, utilization: float, max_model_len: int) -> int:
    """Pages that fit: free GPU memory times `utilization`; on the CPU, room for four full-length sequences."""
    cfg = model.config
    page_bytes = 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * model.lm_head.weight.element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * utilization) // page_bytes)
    return 4 * -(-max_model_len // page_size)
