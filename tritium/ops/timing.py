"""How benchmarks and the tuner time a call: CUDA-graph replays on a GPU, so Python's launch cost stays out."""

import time
from collections.abc import Callable

import torch


def median_ms(run: Callable[[], object], device: torch.device, warmup: int = 25, rep: int = 100,
              graph: bool = True) -> tuple[float, str]:
    """Median milliseconds of `run` and how they were taken ("graph", "eager" or "wall clock").

    On a GPU each call is captured in a CUDA graph and the replays are timed with CUDA events, the L2 cache
    flushed before each (do_bench). Replaying keeps Python's per-call cost (argument checks, the launch)
    out of the number, as in a serving step, which matters for kernels of a few tens of microseconds.
    A call that cannot be captured, or any call with `graph` False, is timed eagerly: the host's cost of each call
    (checks, the launch) then counts, as in an eager engine step. On the CPU: one wall-clock run.
    """
    if device.type != "cuda":
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1e3, "wall clock"
    from triton.testing import do_bench

    captured = _capture(run) if graph else None
    if captured is None:
        return do_bench(run, warmup=warmup, rep=rep, return_mode="median"), "eager"
    return do_bench(captured.replay, warmup=warmup, rep=rep, return_mode="median"), "graph"


def _capture(run) -> "torch.cuda.CUDAGraph | None":
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        return graph
    except Exception:  # not capturable (host syncs, say): time it eagerly instead
        torch.cuda.synchronize()
        return None
