"""scripts/bench_structured_step.py on the CPU with the demo model: a smoke run that times every mode with the whole
batch running under its grammar or penalties (the GPU run is the one whose numbers count)."""

import importlib.util
from pathlib import Path

from tritium import default_model_path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_structured_step.py"


def test_smoke_run_times_every_mode(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_structured_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--model", default_model_path(), "--batch", "4", "--steps", "3", "--input-len", "8",
                          "--out", str(tmp_path / "report.json")])
    assert (tmp_path / "report.json").is_file()
    for mode in ("free", "structured", "penalized"):
        assert report[mode]["median_ms"] > 0
    assert report["structured"]["mask_fill_ms"] > 0 and report["free"]["mask_fill_ms"] == 0
