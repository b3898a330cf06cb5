"""to_device: lists and CPU tensors arrive with the asked dtype and values (on the CPU, where the tests run)."""

import time

import pytest
import torch

from tritium.engine.host_copy import to_device


def test_values_and_dtype():
    cpu = torch.device("cpu")
    got = to_device([3, 1, 2], torch.int32, cpu)
    assert got.dtype == torch.int32 and got.tolist() == [3, 1, 2]
    table = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    got = to_device(table, torch.int32, cpu)
    assert got.dtype == torch.int32 and torch.equal(got, table.int())
    assert to_device([0.5, 2.0], torch.float32, cpu).tolist() == [0.5, 2.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_copy_does_not_wait_for_queued_work():
    device = torch.device("cuda")
    to_device([1], torch.int64, device)  # warm: the pinned allocator's first block
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time queued ahead of the copy
    start = time.perf_counter()
    got = to_device(list(range(1000)), torch.int64, device)
    host_ms = (time.perf_counter() - start) * 1e3
    assert got.device.type == "cuda"
    assert host_ms < 100, host_ms  # queued, not waited for
    assert got.tolist() == list(range(1000))  # and right once the queue reaches it
