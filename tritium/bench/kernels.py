"""`tritium bench kernels`: the scenario suite, Tritium and its peers timed in one process on one card.

Every peer's output is checked against the PyTorch reference on a sample of rows before it is timed;
the report gives ms per peer, Tritium's TFLOP/s, TB/s and share of the floor, and speed relative to
FlashAttention-3 (FA3 time / Tritium time).
"""

import json
from pathlib import Path

import torch
from tqdm import tqdm

from tritium.bench.ceilings import ceilings_line, measure_ceilings
from tritium.bench.environment import describe_environment
from tritium.bench.peers import available_peers
from tritium.bench.plots import plot_speed_vs_baseline
from tritium.bench.scenarios import load_scenarios, select_scenarios
from tritium.ops.attention.batches import random_paged_batch, reference_sample
from tritium.ops.attention.configs import table_choice
from tritium.ops.timing import median_ms

BASELINE = "fa3"
ERROR_BOUND = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}
# Tritium's fp8 variants see inputs rounded to e4m3 (up to 2^-4 each): against the reference on the unrounded batch
# that alone costs about 4%.
FP8_ERROR_BOUND = 8e-2


def run_kernel_bench(
    scenario_names: list[str] | None = None,
    page_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    quick: bool = False,
    peer_names: list[str] | None = None,
    out_dir: Path = Path("benchmarks/results"),
    eager: bool = False,
) -> dict:
    """Run the suite and write JSON + PNG into out_dir; returns the report. With `eager`, every call is timed as
    it is made (host cost included), not as a CUDA-graph replay."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    interpreted = device.type != "cuda"
    if interpreted:
        print("No CUDA device: running the shrunk suite through Triton's interpreter on the CPU. "
              "The timings measure the interpreter, not a GPU; the correctness checks are real.")
        if dtype == torch.bfloat16:
            dtype = torch.float16  # the interpreter has been seen computing bf16 dots wrongly
    scenarios = select_scenarios(load_scenarios(), scenario_names)
    if quick or interpreted:
        scenarios = [s.shrunk() for s in scenarios]
    peers, missing = available_peers(device, peer_names)
    env = describe_environment(device)
    ceilings = measure_ceilings(device) if not interpreted else None
    report = {"environment": env, "page_size": page_size, "dtype": str(dtype).removeprefix("torch."),
              "quick": quick or interpreted, "interpreted": interpreted, "ceilings": ceilings,
              "timing": "wall clock, one run" if interpreted else
              "median of triton.testing.do_bench over eager calls (host cost included), L2 flushed before each"
              if eager else
              "median of triton.testing.do_bench over CUDA-graph replays of one call, L2 flushed before each",
              "eager": eager, "attention_table": table_choice(device).describe(),
              "peers": {p.name: p.description for p in peers}, "fp8_peers": [p.name for p in peers if p.fp8],
              "peers_missing": missing, "scenarios": []}

    for sc in tqdm(scenarios, desc="scenarios", unit="scenario"):
        batch = random_paged_batch(list(sc.seqs), sc.num_q_heads, sc.num_kv_heads, sc.head_size, page_size,
                                   dtype=dtype, device=device)
        rows, ref = reference_sample(batch, sc.window_size)
        row = {"name": sc.name, "flops": sc.flops(), "bytes": sc.bytes(elem=batch.q.element_size()),
               "ms": {}, "timing": {}, "rel_err": {}, "errors": {}}
        for peer in peers:
            try:
                built = peer.build(batch, sc)
                if built is None:
                    continue
                run, result = built
                run()
                _sync(device)
                got = result()[rows].double()
                row["rel_err"][peer.name] = ((got - ref).norm() / ref.norm()).item()
                row["ms"][peer.name], row["timing"][peer.name] = median_ms(run, device, graph=not eager)
            except Exception as exc:  # a peer failing one scenario is reported, not fatal
                row["errors"][peer.name] = f"{type(exc).__name__}: {exc}"[:300]
        if ceilings:
            row["floor_ms"] = max(row["flops"] / (ceilings["bf16_gemm_tflops"] * 1e9),
                                  row["bytes"] / (ceilings["copy_tb_per_s"] * 1e9))
        report["scenarios"].append(row)
        del batch
        if device.type == "cuda":
            torch.cuda.empty_cache()

    bound = ERROR_BOUND[dtype]
    print(format_table(report, bound))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(report)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    title = f"{env['card']}, {report['dtype']}, page {page_size}, torch {env['torch']}, triton {env['triton']}, " \
            f"{env['date']}, commit {env['commit']}"
    baseline = BASELINE if any(BASELINE in r["ms"] for r in report["scenarios"]) else "tritium"
    plot_speed_vs_baseline(report["scenarios"], baseline, title, out_dir / f"{stem}.png")
    print(f"wrote {out_dir / stem}.json and .png")
    return report


def text_table(head: list, rows: list[list]) -> list[str]:
    """Aligned lines: the head, a rule, the rows; the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]

    def fmt(cells: list) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def format_table(report: dict, bound: float) -> str:
    """Tritium's ms, TFLOP/s, TB/s, % of floor and speed vs FA3, then each peer's ms (Tritium's fp8 variants: with
    their speed-up over Tritium); '!' marks a failed check."""
    peers = [p for p in report["peers"] if p != "tritium"]
    head = ["scenario", "tritium ms", "TFLOP/s", "TB/s", "% floor", f"vs {BASELINE}"] + [f"{p} ms" for p in peers]
    lines = []
    for r in report["scenarios"]:
        ms = r["ms"].get("tritium")
        cells = [r["name"]]
        if ms is None:
            cells += ["-"] * 5
        else:
            floor = r.get("floor_ms")
            base = r["ms"].get(BASELINE)
            cells += [_ms(ms, r, "tritium", bound), f"{r['flops'] / ms / 1e9:.0f}", f"{r['bytes'] / ms / 1e9:.2f}",
                      f"{100 * floor / ms:.0f}%" if floor else "-", f"{base / ms:.2f}x" if base else "-"]
        for p in peers:
            if p in report.get("fp8_peers", ()):
                cell = _ms(r["ms"].get(p), r, p, FP8_ERROR_BOUND)
                cells.append(cell + (f" ({ms / r['ms'][p]:.2f}x)" if ms and r["ms"].get(p) else ""))
            else:
                cells.append(_ms(r["ms"].get(p), r, p, bound))
        lines.append(cells)
    env = report["environment"]
    text = [f"{env['card']} | torch {env['torch']} | triton {env['triton']} | {report['dtype']} | page "
            f"{report['page_size']} | {env['date']} | commit {env['commit']}"]
    if report["ceilings"]:
        text.append(ceilings_line(report["ceilings"]))
    text.append(f"tritium's configs: {report['attention_table']}")
    text += text_table(head, lines)
    eager = sorted({p for r in report["scenarios"] for p, how in r.get("timing", {}).items() if how == "eager"})
    if eager and not report["eager"]:
        text.append("timed eagerly (not capturable in a CUDA graph): " + ", ".join(eager))
    if report["peers_missing"]:
        text.append("not run: " + "; ".join(report["peers_missing"]))
    failures = [f"{r['name']}: {p}: {e}" for r in report["scenarios"] for p, e in r["errors"].items()]
    text += [f"error: {f}" for f in failures]
    return "\n".join(text)


def _ms(ms: float | None, row: dict, peer: str, bound: float) -> str:
    if ms is None:
        return "x" if peer in row["errors"] else "-"
    return f"{ms:.4f}" + ("" if row["rel_err"].get(peer, 0.0) <= bound else "!")  # NaN fails too


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stem(report: dict) -> str:
    card = report["environment"]["card"].replace(" ", "_").replace("(", "").replace(")", "")
    date = report["environment"]["date"][:10]
    quick = ("-quick" if report["quick"] else "") + ("-eager" if report["eager"] else "")
    commit = report["environment"]["commit"].replace("+local-changes", "-dirty")
    return f"kernels-{card}-{report['dtype']}-page{report['page_size']}{quick}-{date}-{commit}"
