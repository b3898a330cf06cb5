"""Which sequences run in the next step, and how many of their tokens: decodes and prefill chunks together.

Each step has a token budget. Running sequences go first, oldest first: a decode costs one token, a
part-done prefill takes what the budget leaves. Waiting sequences are then admitted in arrival order while
pages and budget last. When a running sequence needs a page and none is free, the newest running sequence
is preempted: its pages are freed and it waits at the front of the queue to be recomputed, so the oldest
requests always make progress and none is starved.
"""

from collections import deque

from tritium.engine.page_pool import PagePool
from tritium.engine.sequence import Sequence, Status


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

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, admit: bool = True) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to run) for the next step; non-empty whenever there is work that fits at all. With
        `admit` False, waiting sequences wait one more step (the running ones' decodes were launched ahead)."""
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

    def _add(self, batch: list[tuple[Sequence, int]], seq: Sequence, budget: int) -> int:
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
