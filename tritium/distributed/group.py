"""One process group per process, over NCCL between GPUs or gloo between CPUs (or, for tests, between ranks that
share one GPU: gloo then stages each collective through host memory).

Before a group is made, this process is rank 0 of 1 and every collective returns its input: the single-GPU engine
runs the same model code without a group.
"""

import datetime
import os

import torch
import torch.distributed as dist

# NVLink multicast (NCCL's NVLS, and the symmetric-memory and NVSHMEM paths built on it) stays off: on the shared
# GPU hosts this project runs on, a program that uses it can put the host's GPUs out of service for a day or more.
# A value set in the environment wins.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

_rank, _size, _staged = 0, 1, False


def disable_multicast() -> None:
    """Set MULTICAST_OFF's variables where they are unset (before NCCL reads them: before the group is made)."""
    for name, value in MULTICAST_OFF.items():
        os.environ.setdefault(name, value)


def init(rank: int, world_size: int, init_method: str, backend: str, timeout_s: float = 600.0) -> None:
    """Join the group as `rank` of `world_size` ("nccl" or "gloo"; `init_method` as torch.distributed takes it:
    "env://" under torchrun, "file://..." or "tcp://host:port")."""
    global _rank, _size, _staged
    disable_multicast()
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _rank, _size, _staged = rank, world_size, backend == "gloo"


def close() -> None:
    global _rank, _size, _staged
    if dist.is_initialized():
        dist.destroy_process_group()
    _rank, _size, _staged = 0, 1, False


def rank() -> int:
    return _rank


def world_size() -> int:
    return _size


def graph_capturable() -> bool:
    """Whether a CUDA graph can capture the collectives: NCCL's (or none, with one rank), not gloo's."""
    return not _staged


def barrier() -> None:
    """Wait until every rank is here."""
    if _size > 1:
        dist.barrier()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """x summed over the ranks, in place; returns x."""
    if _size > 1:
        _on_host(x, dist.all_reduce)
    return x


def broadcast(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's x in every rank's x, in place; returns x."""
    if _size > 1:
        _on_host(x, lambda t: dist.broadcast(t, src=0))
    return x


def gather(x: torch.Tensor) -> torch.Tensor | None:
    """The ranks' x [..., n] concatenated along the last dimension ([..., world_size * n]) on rank 0; None on the
    others."""
    if _size == 1:
        return x
    x = x.contiguous()
    device = x.device
    if _staged:
        x = x.cpu()
    parts = [torch.empty_like(x) for _ in range(_size)] if _rank == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1).to(device) if _rank == 0 else None


def _on_host(x: torch.Tensor, collective) -> None:
    """Run an in-place collective on x; over gloo a GPU tensor goes through host memory (the test-only set-up)."""
    if _staged and x.is_cuda:
        host = x.cpu()
        collective(host)
        x.copy_(host)
    else:
        collective(x)
