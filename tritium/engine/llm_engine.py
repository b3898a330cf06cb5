"""The engine loop: requests in, one scheduled step at a time; each sampled token recorded with its text and
logprobs, stop conditions checked; finished sequences out.

The scheduler plans each step (engine/step_plan.py); the runner runs the plan: a ModelRunner in this process with
one rank, a WorkerGroup of one process per rank under tensor parallelism.

Faults are sorted by whose they are. What raises while handling one request (its set-up, its tokens' text and stop
checks, or a batched step that fails only while it is in the batch) ends that request alone, with finish_reason
"error"; an engine fault (the device's, a dead rank's) marks the engine dead and fails every request."""

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tritium.engine.config import EngineConfig
from tritium.engine.errors import EngineDeadError, InvalidParameter, RequestFailed, is_engine_fault
from tritium.engine.model_runner import StepOutput
from tritium.engine.page_pool import PagePool
from tritium.engine.record import record_token
from tritium.engine.sampling_params import SamplingParams
from tritium.engine.scheduler import Scheduler
from tritium.engine.sequence import Sequence, Status
from tritium.engine.step_plan import StepPlan, make_plan
from tritium.engine.structured import Bitmasks, Grammars
from tritium.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from tritium.engine.worker import local_runner, share_gpu
from tritium.engine.worker_group import WorkerGroup
from tritium.models.config import ModelConfig
from tritium.models.parallel import check_tensor_parallel
from tritium.models.source import resolve_folder, resolve_model

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
        # The tokenizer first: a missing file fails fast.
        self.tokenizer = None if config.skip_tokenizer_init else Tokenizer(resolve_folder(tokenizer))
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
        self.dead: EngineDeadError | None = None  # set by an engine fault: nothing more is served
        if config.seed is not None:  # last: building the model draws from torch's generator too
            torch.manual_seed(config.seed)  # requests without a seed of their own draw from it

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
        except Exception as exc:  # noqa: BLE001  the request's own set-up: it alone fails
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
        vocab = self.model_config.vocab_size
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
        self.runner.release([seq.seq_id for seq in dropped])
        return dropped

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """Run one step; returns the sequences that finished in it, those of a request that failed in it too (with
        finish_reason "error"). An engine fault (a dead tensor-parallel rank among them) raises EngineDeadError:
        every request has failed with it, and the engine serves nothing more."""
        if self.dead is not None:
            raise self.dead
        batch, plan = self.scheduler.schedule()
        if not batch:
            raise RuntimeError("no request fits in the KV-cache pool: the pool is smaller than one sequence")
        self.last_step = StepStats(len(batch), sum(n for _, n in batch), sum(s.num_computed + n for s, n in batch))
        out, finished = self._run(batch, plan)
        done = []
        for seq, n in batch:
            if seq.status is Status.FINISHED:  # its request failed in this step
                continue
            seq.num_computed += n
            seq.prompt_logprobs += out.prompt_logprobs.get(seq.seq_id, [])
            if seq.seq_id not in out.sampled:
                continue
            try:
                reason = record_token(seq, *out.sampled[seq.seq_id], self.eos_ids)
            except Exception as exc:  # noqa: BLE001  its text or stop checks: its request alone fails
                self._check_fault(exc)
                finished += self._fail(seq.request_id, exc)
                continue
            if reason:
                self.scheduler.finish(seq, reason)
                done.append(seq)
        if done:
            self.runner.release([seq.seq_id for seq in done])
        return finished + done

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks' processes (nothing to do with one rank); idempotent. An engine dropped
        without it stops them when it is garbage-collected, or when the interpreter exits."""
        if isinstance(self.runner, WorkerGroup):
            self.runner.shutdown()

    def _run(self, batch: list[tuple[Sequence, int]], plan: StepPlan) -> tuple[StepOutput, list[Sequence]]:
        """The runner's step on the plan: (its output, sequences failed in it)."""
        try:
            return self.runner.step(self._with_bitmask(plan, batch)), []
        except Exception as exc:  # noqa: BLE001  sorted below: the engine's fault, or some request's
            self._check_fault(exc)
            first = exc
        # The parts below run whole and launch nothing ahead; the next plan takes no decode launched ahead either (a
        # runner drops one that a plan does not take).
        self.scheduler.ahead = set()
        failed: list[Sequence] = []
        out = self._isolate(batch, first, failed)
        requests = {seq.request_id for seq, _ in batch}
        if len(requests) > 1 and {seq.request_id for seq in failed} == requests:
            self._die(first)  # every request fails even alone: the fault is not theirs
        return out, failed

    def _with_bitmask(self, plan: StepPlan, batch: list[tuple[Sequence, int]]) -> StepPlan:
        if any(seq.grammar is not None for seq, _ in batch):  # the matchers have taken every token read back
            plan.bitmask = self.bitmasks.fill([seq.grammar for seq, _ in batch])
        return plan

    def _isolate(self, batch: list[tuple[Sequence, int]], exc: Exception, failed: list[Sequence]) -> StepOutput:
        """Run a batch whose step raised `exc` again in halves, down to single sequences, so that only the requests
        whose sequences fail alone fail; returns the others' output. K/V written twice holds the same values; a
        seeded sample whose draw the failed step had taken draws anew."""
        if len(batch) == 1:
            failed += self._fail(batch[0][0].request_id, exc)
            return StepOutput()
        out = StepOutput()
        for part in (batch[:len(batch) // 2], batch[len(batch) // 2:]):
            part = [(seq, n) for seq, n in part if seq.status is not Status.FINISHED]
            if not part:
                continue
            try:
                got = self.runner.step(self._with_bitmask(make_plan(part, [], False), part))
            except Exception as part_exc:  # noqa: BLE001
                self._check_fault(part_exc)
                got = self._isolate(part, part_exc, failed)
            out.sampled.update(got.sampled)
            out.prompt_logprobs.update(got.prompt_logprobs)
        return out

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
