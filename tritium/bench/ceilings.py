"""The card's two ceilings, measured in the same run as the kernels: bf16 GEMM rate and copy bandwidth."""

import statistics
import time

import torch
from triton.testing import do_bench


def ceilings_line(ceilings: dict[str, float]) -> str:
    """The ceilings as a benchmark table's header prints them."""
    return (f"ceilings: bf16 GEMM {ceilings['bf16_gemm_tflops']:.0f} TFLOP/s, "
            f"copy {ceilings['copy_tb_per_s']:.2f} TB/s")


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """TFLOP/s of an 8192^3 bf16 matmul and TB/s of a 1 GiB device-to-device copy (read + write). On the CPU, a
    512^3 matmul and a 64 MiB copy timed by the clock (CPU runs check code paths; they are not measurements)."""
    if device.type != "cuda":
        return _cpu_ceilings()
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    gemm_ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    src = torch.randn(2**29, device=device, dtype=torch.float16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return {
        "bf16_gemm_tflops": 2 * n**3 / gemm_ms / 1e9,
        "copy_tb_per_s": 2 * src.numel() * src.element_size() / copy_ms / 1e9,
    }


def _cpu_ceilings() -> dict[str, float]:
    n = 512
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    src = torch.randn(2**25, dtype=torch.float16)  # 64 MiB
    dst = torch.empty_like(src)
    gemm_ms, copy_ms = _clock_ms(lambda: a @ b), _clock_ms(lambda: dst.copy_(src))
    return {"bf16_gemm_tflops": 2 * n**3 / gemm_ms / 1e9,
            "copy_tb_per_s": 2 * src.numel() * src.element_size() / copy_ms / 1e9}


def _clock_ms(fn, reps: int = 5) -> float:
    """Median wall time of fn() in milliseconds, after one call to warm it."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
