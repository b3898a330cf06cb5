"""Tune the attention kernel on first use: at start, the problem classes the engine's steps can fall in that the
device's own tuned table lacks are tuned within a time budget and cached, so a second start tunes nothing.

A device without its own table runs its sibling's (or derived) configs meanwhile; on an H200 the sibling's table ran
the kernel suite at 0.93x FA3 where derived configs ran 0.82x (docs/benchmarks.md). `auto_tune=False`
(`--no-auto-tune`) or TRITIUM_AUTO_TUNE=0 skips it.
"""

import logging
import os
from collections.abc import Callable

import torch

from tritium.engine.warm_up import step_shapes
from tritium.ops.attention.configs import class_fields, problem_class, table_choice
from tritium.ops.attention.tuning import Problem, tune_classes

BUDGET_S = 90.0  # the whole auto-tune, compiles included, at engine start
# Keys per sequence in the problems a decode or mixed class is tuned on (capped by max_model_len). One config serves
# every context of its class: tuned on 1k contexts alone, the H200's single-sequence class (p8) took a config that
# ran the suite's 8k-context decode at 0.87x FA3 where the sibling's ran 1.13x (docs/benchmarks.md), so each class
# is tuned on a short and a long context and the config best over both wins.
CONTEXTS = (1024, 8192)
log = logging.getLogger(__name__)


def auto_tune_enabled(enabled: bool) -> bool:
    """The engine's setting, unless TRITIUM_AUTO_TUNE=0 turns it off."""
    return enabled and os.environ.get("TRITIUM_AUTO_TUNE", "1").strip() != "0"


def missing_classes(device: torch.device, max_num_batched_tokens: int, max_num_seqs: int, num_q_heads: int,
                    num_kv_heads: int, head_dim: int, page_size: int, max_model_len: int,
                    sliding_window: int | None = None, kv_fp8: bool = False) -> dict[str, list[Problem]]:
    """The classes a step can fall in (over fp8 K/V pages with `kv_fp8`) that this device's own table lacks, each
    with the problems of its shape to tune on: single-token decodes first (most steps), then mixed batches and
    prefills, then the rest."""
    tuned = table_choice(device).own
    found: dict[str, list[Problem]] = {}
    for tokens, seqs in step_shapes(max_num_batched_tokens, max_num_seqs):
        cls = problem_class(tokens, seqs, num_q_heads, num_kv_heads, head_dim, page_size, kv_fp8)
        if cls in tuned or cls in found:
            continue
        if class_fields(cls)["kind"] == "prefill":  # one long prompt: the step's budget of tokens
            n = min(max_num_batched_tokens, max_model_len)
            shapes = [((n, n),)]
        else:  # the step's shape, on a short and a long context
            per_seq = -(-tokens // seqs)
            shapes = [((per_seq, c),) * seqs for c in sorted({max(per_seq, min(max_model_len, c)) for c in CONTEXTS})]
        found[cls] = [Problem(f"{cls} (engine step)", num_q_heads, num_kv_heads, head_dim, shape, sliding_window)
                      for shape in shapes]
    order = {"decode-q1": 0, "mixed": 1, "prefill": 2}
    return dict(sorted(found.items(), key=lambda item: order.get(class_fields(item[0])["kind"], 3)))


def auto_tune(device: torch.device, dtype: torch.dtype, max_num_batched_tokens: int, max_num_seqs: int,
              num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int, max_model_len: int,
              sliding_window: int | None = None, kv_fp8: bool = False, budget_s: float = BUDGET_S,
              clock: Callable[[], float] | None = None) -> dict[str, dict]:
    """Tune the missing classes (`missing_classes`; over fp8 K/V pages with `kv_fp8`) within `budget_s` and cache
    the winners in the user's cache; returns {class: config fields} of those tuned (`clock` times the budget:
    time.monotonic by default). Says in the log which table the device runs with."""
    classes = missing_classes(device, max_num_batched_tokens, max_num_seqs, num_q_heads, num_kv_heads, head_dim,
                              page_size, max_model_len, sliding_window, kv_fp8)
    if not classes:
        log.info("attention configs: %s; it covers every class this engine's steps can run", table_choice(device)
                 .describe())
        return {}
    log.info("attention configs: %s; auto-tuning the %d classes it lacks (budget %.0f s; --no-auto-tune or "
             "TRITIUM_AUTO_TUNE=0 skips this)", table_choice(device).describe(), len(classes), budget_s)
    # No compile workers: spawned processes re-import the main module, which re-runs a user's script that has no
    # `if __name__ == "__main__"` guard (seen on the H200: every worker started an engine of its own).
    winners = tune_classes(classes, page_size, dtype, budget_s=budget_s, clock=clock, desc="auto-tuning attention",
                           workers=False)
    log.info("auto-tune cached %d of %d classes; attention configs now: %s", len(winners), len(classes),
             table_choice(device).describe())
    return winners
