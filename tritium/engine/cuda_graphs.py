"""CUDA graphs for decode steps: the model's forward is captured once per bucketed batch size and replayed with
the step's layout copied into static buffers, so a decode step costs a few copies and one graph launch instead
of the hundreds of kernel launches of an eager forward.

A step of b decodes (one query token per sequence) replays the smallest bucket B >= b. The B - b padding
sequences own no query token and no cached key (cu_seqlens_q stays at b, seqused_k is 0), so the attention
kernel's programs for them exit at once; their token rows (id 0, slot -1: never written to the cache) are
computed and dropped. Every launch in the forward is shaped by static facts (token and sequence counts),
never by lengths, which is what makes one capture valid for every replay.
"""

import torch
from tqdm import tqdm

from tritium.models.attention import AttentionMetadata
from tritium.models.llama import LlamaForCausalLM


def batch_buckets(max_seqs: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, then every multiple of 8 below max_seqs (vLLM's spacing), and max_seqs."""
    return [b for b in (1, 2, 4) if b < max_seqs] + list(range(8, max_seqs, 8)) + [max_seqs]


def fill_rows(table: torch.Tensor, rows: list[list[int]]) -> None:
    """table[i, :len(rows[i])] = rows[i] for a CPU int32 table, row by row through numpy (several times quicker
    than building a padded nested list for torch.tensor: a 256-sequence step's block tables are ~25k entries)."""
    view = table.numpy()
    for i, row in enumerate(rows):
        view[i, :len(row)] = row


class DecodeInputs:
    """Fixed device buffers holding a decode batch padded to a bucket size: what a captured forward reads."""

    def __init__(self, max_seqs: int, max_pages_per_seq: int, page_size: int, device: torch.device) -> None:
        self.tokens = torch.zeros(3, max_seqs, dtype=torch.int64, device=device)  # ids, positions, slots
        self.seq_info = torch.zeros(2 * max_seqs + 1, dtype=torch.int32, device=device)  # cu_seqlens_q, seqused_k
        self.block_table = torch.zeros(max_seqs, max_pages_per_seq, dtype=torch.int32, device=device)
        self.max_keys = max_pages_per_seq * page_size
        # Host staging, two sets used in turn: pinned on a GPU, so the copies are asynchronous. A step is filled
        # while the one before may not have run yet, so a set is rewritten only once its last copies are done.
        pin = device.type == "cuda"
        self.host_tokens = torch.zeros(2, 3, max_seqs, dtype=torch.int64, pin_memory=pin)
        self.host_seq_info = torch.zeros(2, 2 * max_seqs + 1, dtype=torch.int32, pin_memory=pin)
        self.host_table = torch.zeros(2, max_seqs, max_pages_per_seq, dtype=torch.int32, pin_memory=pin)
        self.copied = [torch.cuda.Event() if pin else None for _ in range(2)]
        self.turn = 0

    def fill(self, size: int, ids: list[int] | torch.Tensor, positions: list[int], slots: list[int],
             context_lens: list[int], page_tables: list[list[int]]) -> None:
        """Copy in b <= size decodes and pad them to `size` sequences. `ids` may be a device tensor: the tokens
        the previous step sampled, not yet read back."""
        b, pad, turn = len(positions), size - len(positions), self.turn
        self.turn ^= 1
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()
        host_tokens, host_seq_info, host_table = self.host_tokens[turn], self.host_seq_info[turn], self.host_table[turn]
        host_ids = ids if isinstance(ids, list) else [0] * b
        host_tokens[:, :size] = torch.tensor([host_ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad])
        host_seq_info[:2 * size + 1] = torch.tensor(list(range(b + 1)) + [b] * pad + context_lens + [0] * pad)
        width = max(len(t) for t in page_tables)
        # Entries past a row's own pages may be stale from an earlier step: never read, the kernel stops at seqused_k.
        fill_rows(host_table, page_tables)
        self.tokens[:, :size].copy_(host_tokens[:, :size], non_blocking=True)
        self.seq_info[:2 * size + 1].copy_(host_seq_info[:2 * size + 1], non_blocking=True)
        self.block_table[:b, :width].copy_(host_table[:b, :width], non_blocking=True)
        if self.copied[turn] is not None:
            self.copied[turn].record()
        if not isinstance(ids, list):
            self.tokens[0, :b].copy_(ids)

    def forward(self, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                size: int) -> torch.Tensor:
        """The model over the first `size` sequences of the buffers -> hidden states [size, hidden]."""
        ids, positions, slots = self.tokens[:, :size]
        meta = AttentionMetadata(
            cu_seqlens_q=self.seq_info[:size + 1], seqused_k=self.seq_info[size + 1:2 * size + 1],
            block_table=self.block_table[:size], slot_mapping=slots, max_seqlen_q=1, max_seqlen_k=self.max_keys)
        return model(ids, positions, meta, kv_caches)


class DecodeGraphs:
    """Decode batches through forwards captured at every bucket size (largest first, sharing one memory pool)."""

    @torch.inference_mode()
    def __init__(self, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], max_seqs: int,
                 max_pages_per_seq: int, page_size: int) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.buckets = batch_buckets(max_seqs)
        device = model.lm_head.weight.device
        self.inputs = DecodeInputs(max_seqs, max_pages_per_seq, page_size, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        for size in tqdm(self.buckets[::-1], desc="capturing CUDA graphs", unit="graph", leave=False):
            # Dummy decodes of one key each, on page 0: no request holds a page yet.
            self.inputs.fill(size, [0] * size, [0] * size, [0] * size, [1] * size, [[0]] * size)
            self.inputs.forward(model, kv_caches, size)  # compiles and warms every kernel outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.inputs.forward(model, kv_caches, size)
            self.graphs[size] = graph
        torch.cuda.synchronize(device)

    def bucket(self, num_seqs: int) -> int | None:
        """The captured size a batch of num_seqs decodes replays; None when it is larger than every bucket."""
        return next((b for b in self.buckets if b >= num_seqs), None)

    def forward(self, ids: list[int] | torch.Tensor, positions: list[int], slots: list[int], context_lens: list[int],
                page_tables: list[list[int]]) -> torch.Tensor:
        """Hidden states [b, hidden] of b decodes (b at most the largest bucket), valid until the next replay."""
        size = self.bucket(len(positions))
        self.inputs.fill(size, ids, positions, slots, context_lens, page_tables)
        self.graphs[size].replay()
        return self.outputs[size][:len(positions)]
