"""The kernels compile for an NVIDIA Hopper GPU (sm_90), checked on the CPU.

The interpreter that runs the other CPU tests executes kernels as Python and accepts code that Triton's
compiler rejects; `gpu_compile` compiles a covering set of shapes, dtypes, configurations and features
through the real pipeline (down to ptxas) without a GPU, in a subprocess that does not interpret.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ops.gpu_compile import CASES, SHARED_MEMORY_LIMIT

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "tests.ops.gpu_compile"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if "unavailable" in results:
        pytest.skip(f"cannot compile for sm_90 here: {results['unavailable']}")
    return results


@pytest.mark.parametrize("case", CASES)
def test_compiles_for_sm90(case, compiled):
    result = compiled[case]
    assert result["ok"], f"{case} does not compile for sm_90:\n{result['error']}"
    assert result["shared"] <= SHARED_MEMORY_LIMIT, f"{case} needs {result['shared']} bytes of shared memory"
