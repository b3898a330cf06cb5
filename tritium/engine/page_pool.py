"""The KV-cache page pool: reference-counted pages, prefix caching by hashing full pages.

A full page is named by a hash of its tokens chained to the previous page's hash, so a page is shared only
by sequences with the same whole prefix. Pages whose count drops to zero keep their contents and hash and
go to the end of the free list; they are reused for a hit until another allocation takes them.
"""

from collections import OrderedDict

from tritium.engine.sequence import Sequence


class PagePool:
    """The page pool; the scheduler is its one owner (it allocates, grows and frees sequences' pages)."""

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one page of at least one token, got {num_pages} x {page_size}")
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self.ref_count = [0] * num_pages
        self.page_hash: list[int | None] = [None] * num_pages
        self.free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))  # oldest first
        self.cached: dict[int, int] = {}  # hash -> page holding those tokens
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache, and those found there (metrics)
        self.hit_tokens = 0

    @property
    def num_pages(self) -> int:
        return len(self.ref_count)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def _page_hash(self, prev: int, tokens: list[int], page: int) -> int:
        """The name of page `page` of `tokens`, chained to the previous page's name `prev` (0 for the first)."""
        return hash((prev, tuple(tokens[page * self.page_size:(page + 1) * self.page_size])))

    def _hashes(self, tokens: list[int]) -> list[int]:
        hashes, prev = [], 0
        for i in range(len(tokens) // self.page_size):
            prev = self._page_hash(prev, tokens, i)
            hashes.append(prev)
        return hashes

    def _take(self) -> int:
        page, _ = self.free.popitem(last=False)
        old = self.page_hash[page]
        if old is not None and self.cached.get(old) == page:
            del self.cached[old]
        self.page_hash[page] = None
        self.ref_count[page] = 1
        return page

    def allocate_prompt(self, seq: Sequence) -> bool:
        """Give a waiting sequence pages for its whole context, reusing cached full pages; False if short."""
        tokens = seq.tokens
        needed = -(-len(tokens) // self.page_size)
        hits, hashes = [], []
        if self.prefix_caching and not seq.needs_prompt_logprobs:  # prompt logprobs need every position run
            # The last token must still run through the model to produce logits: never count it as cached.
            hashes = self._hashes(tokens[:-1])
            for h in hashes:
                page = self.cached.get(h)
                if page is None:
                    break
                hits.append(page)
        fresh = needed - len(hits)
        reusable_free = sum(1 for p in hits if self.ref_count[p] == 0)
        if fresh > self.num_free - reusable_free:
            return False
        for page in hits:
            if self.ref_count[page] == 0:
                del self.free[page]
            self.ref_count[page] += 1
        seq.pages = hits + [self._take() for _ in range(fresh)]
        seq.num_computed = len(hits) * self.page_size
        if self.prefix_caching:
            self.queried_tokens += len(tokens)
            self.hit_tokens += seq.num_computed
        seq.page_hashes = hashes[: len(hits)]
        return True

    def pages_missing(self, seq: Sequence, length: int | None = None) -> int:
        """Pages the sequence needs beyond those it holds, for `length` tokens (default: its current length)."""
        return max(0, -(-(length or len(seq)) // self.page_size) - len(seq.pages))

    def grow(self, seq: Sequence, length: int | None = None) -> None:
        """Add pages so `length` tokens (default: its current length) fit; the caller checked pages_missing <=
        num_free."""
        for _ in range(self.pages_missing(seq, length)):
            seq.pages.append(self._take())

    def commit_full_pages(self, seq: Sequence, num_tokens: int) -> None:
        """Name the pages that are full once the first `num_tokens` tokens are in the cache, so that prompts
        allocated after this call share them, even in the same step (each layer writes K/V before attending)."""
        if not self.prefix_caching:
            return
        full = num_tokens // self.page_size
        if full <= len(seq.page_hashes):
            return  # no page filled since the last call (most decode steps)
        tokens = seq.tokens
        for i in range(len(seq.page_hashes), full):
            h = self._page_hash(seq.page_hashes[-1] if seq.page_hashes else 0, tokens, i)
            seq.page_hashes.append(h)
            page = seq.pages[i]
            if self.page_hash[page] is None and h not in self.cached:
                self.page_hash[page] = h
                self.cached[h] = page

    def free_sequence(self, seq: Sequence) -> None:
        for page in reversed(seq.pages):  # tail pages first: they are the least likely to be shared
            self.ref_count[page] -= 1
            if self.ref_count[page] == 0:
                self.free[page] = None
        seq.pages = []
