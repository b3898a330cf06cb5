"""Which sequences run in the next step, and how many of their tokens: decodes and prefill chunks together.

Each step has a token budget. Running sequences go first, oldest first: a decode costs one token, a
part-done prefill takes what the budget leaves. Waiting sequences are then admitted in arrival order while
pages and budget last. When a running sequence needs a page and none is free, the newest running sequence
is preempted: its pages are freed and it waits at the front of the queue to be recomputed, so the oldest
requests always make progress and none is starved.

The scheduler decides everything about a step and says it in one StepPlan: which sequences, which tokens, which
pages, and whether the next decode is launched ahead. When nothing waits and every running sequence samples in this
step, their next decodes are launched before this step's tokens are read back (the device does not wait for the
host between steps), each given the page for one more token now. The next step is then those decodes (of the
sequences that did not stop), and sequences that arrive meanwhile join one step later.
"""

from collections import deque

from tritium.engine.page_pool import PagePool
from tritium.engine.sequence import Sequence, Status
from tritium.engine.step_plan import StepPlan, make_plan

Batch = list[tuple[Sequence, int]]  # (sequence, tokens it runs in the step)


class Scheduler:
    def __init__(self, pages: PagePool, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.pages = pages
        self.max_tokens = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.ahead: set[int] = set()  # sequences whose next decode the last step launched ahead

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[Batch, StepPlan]:
        """The next step: (sequence, tokens to run) pairs, non-empty whenever there is work that fits at all, and
        its plan. A step launched ahead is taken while any of its sequences runs on."""
        batch = self._batch(admit=False) if self.ahead else []
        from_ahead = bool(batch) and all(n == 1 and seq.seq_id in self.ahead for seq, n in batch)
        if not batch:
            batch = self._batch(admit=True)
        ahead = self._ahead(batch)
        self.ahead = {seq.seq_id for seq in ahead}
        return batch, make_plan(batch, ahead, from_ahead)

    def _ahead(self, batch: Batch) -> list[Sequence]:
        """The sequences whose next decode can be launched with this step: all of them when nothing waits and every
        running sequence samples now, less those that end on this token by length; each is given the page for one
        more token. Empty when that is not the case or the pages are short."""
        if self.waiting or len(batch) != len(self.running):
            return []
        if any(seq.num_computed + n != len(seq) for seq, n in batch):  # a prefill chunk runs on next step
            return []
        seqs = [seq for seq, _ in batch if len(seq.output_ids) + 1 < seq.params.max_tokens]
        if sum(self.pages.pages_missing(seq, len(seq) + 1) for seq in seqs) > self.pages.num_free:
            return []
        for seq in seqs:
            self.pages.grow(seq, len(seq) + 1)
        return seqs

    def _batch(self, admit: bool) -> Batch:
        """(sequence, tokens to run) for the next step; with `admit` False, waiting sequences wait one more step."""
        budget = self.max_tokens
        batch: list[tuple[Sequence, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            while self.pages.pages_missing(seq) > self.pages.num_free:
                victim = self.running.pop()  # newest first
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.pages.grow(seq)
                budget -= self._add(batch, seq, budget)
                i += 1
                continue
            break  # seq itself was preempted: nothing newer is left running
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            if not self.pages.allocate_prompt(seq):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget -= self._add(batch, seq, budget)
        return batch

    def _add(self, batch: Batch, seq: Sequence, budget: int) -> int:
        """Put as many of the sequence's tokens as the budget allows into the batch; returns how many."""
        n = min(seq.num_uncomputed, budget)
        batch.append((seq, n))
        self.pages.commit_full_pages(seq, seq.num_computed + n)  # later samples of the same prompt share them now
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.pages.free_sequence(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def abort(self, request_id: str) -> list[Sequence]:
        """Drop a request's waiting and running sequences and free their pages at once; returns them."""
        dropped = [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
        for seq in dropped:
            (self.waiting if seq.status is Status.WAITING else self.running).remove(seq)
            self.pages.free_sequence(seq)
            seq.status = Status.FINISHED
            seq.finish_reason = "abort"
        return dropped

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        self.pages.free_sequence(seq)
