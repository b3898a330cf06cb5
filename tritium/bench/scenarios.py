"""The kernel benchmark suite (`scenarios.json`, shared with the peers' anchors) and what each scenario costs."""

import json
from dataclasses import dataclass
from importlib import resources

from tritium.ops.attention.tuning import Problem


@dataclass(frozen=True)
class Scenario(Problem):
    """One attention call of the suite: sequences as (query_len, context_len) pairs, context counting the new
    tokens; with what it costs (FLOPs, bytes)."""

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q, _ in self.seqs)

    def visible_pairs(self) -> int:
        """Unmasked (query, key) pairs under the bottom-right causal mask and the window."""
        total = 0
        for q_len, ctx in self.seqs:
            prefix = ctx - q_len
            first, last = prefix + 1, ctx  # keys seen by the first and the last query
            if self.sliding_window is None:
                total += (first + last) * q_len // 2
            else:
                total += sum(min(prefix + i + 1, self.sliding_window) for i in range(q_len))
        return total

    def flops(self) -> int:
        """4 * pairs * head_size * num_q_heads (QK^T and PV, a multiply-add each)."""
        return 4 * self.visible_pairs() * self.head_size * self.num_q_heads

    def bytes(self, elem: int = 2, kv_elem: int = 2) -> int:
        """q read + out written + the K and V each sequence needs, read once (the window's keys, if any)."""
        tokens = sum(q for q, _ in self.seqs)
        keys = sum(ctx if self.sliding_window is None else min(ctx, self.sliding_window + q - 1)
                   for q, ctx in self.seqs)
        q_and_out = 2 * tokens * self.num_q_heads * self.head_size * elem
        return q_and_out + 2 * keys * self.num_kv_heads * self.head_size * kv_elem

    def shrunk(self, factor: int = 64, max_seqs: int = 4) -> "Scenario":
        """A small version of the same shape of work, for the interpreter on a CPU."""
        seqs = []
        for q_len, ctx in self.seqs[:max_seqs]:
            small_ctx = max(16, ctx // factor)
            small_q = q_len if q_len <= 4 else max(5, min(small_ctx, q_len // factor))
            seqs.append((small_q, max(small_ctx, small_q)))
        window = None if self.sliding_window is None else max(8, self.sliding_window // factor)
        return Scenario(self.name, self.num_q_heads, self.num_kv_heads, self.head_size, tuple(seqs), window)


def load_scenarios() -> list[Scenario]:
    """The suite, in the order of `scenarios.json`."""
    data = json.loads(resources.files("tritium.bench").joinpath("scenarios.json").read_text())
    suite = []
    for s in data["scenarios"]:
        seqs = tuple((g["query_len"], g["context_len"]) for g in s["sequences"] for _ in range(g["count"]))
        suite.append(Scenario(s["name"], s["num_q_heads"], s["num_kv_heads"], s["head_size"], seqs,
                              s.get("sliding_window")))
    return suite


def select_scenarios(scenarios: list[Scenario], names: list[str] | None) -> list[Scenario]:
    """Scenarios whose name contains any of `names` (case-insensitive); all of them when names is empty."""
    if not names:
        return scenarios
    chosen = [s for s in scenarios if any(n.lower() in s.name.lower() for n in names)]
    if not chosen:
        known = ", ".join(s.name for s in scenarios)
        raise ValueError(f"no scenario matches {names}; the suite has: {known}")
    return chosen
