"""Charts for benchmark reports (PNG, via matplotlib's non-interactive backend)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, ScalarFormatter  # noqa: E402


def plot_speed_vs_baseline(rows: list[dict], baseline: str, title: str, path: Path) -> None:
    """One group of bars per scenario: each peer's speed relative to `baseline` (baseline time / peer time)."""
    peers = sorted({p for r in rows for p in r["ms"] if p != baseline}, key=lambda p: (p != "tritium", p))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 5))
    width = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        speeds = [r["ms"][baseline] / r["ms"][peer] if baseline in r["ms"] and peer in r["ms"] else 0 for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], speeds, width, label=peer)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(peers) - 1) / 2 for x in range(len(rows))])
    ax.set_xticklabels([r["name"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"speed vs {baseline} ({baseline} ms / peer ms, higher is better)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_title(title, fontsize=9)
    if peers:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)


def plot_step_roofline(steps: list[dict], title: str, path: Path) -> None:
    """Each engine step's time, and each decode step's share of the memory roofline, against the step index."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    decode = [(i, s) for i, s in enumerate(steps) if s.get("roofline") is not None]
    other = [(i, s) for i, s in enumerate(steps) if s.get("roofline") is None]
    top.scatter([i for i, _ in decode], [s["ms"] for _, s in decode], s=4, label="decode-only steps")
    top.scatter([i for i, _ in other], [s["ms"] for _, s in other], s=4, label="steps with prefill tokens")
    top.set_ylabel("step ms")
    top.set_yscale("log")  # JIT compiles of new problem classes show as rare steps of seconds
    top.legend(fontsize=8)
    bottom.scatter([i for i, _ in decode], [100 * s["roofline"] for _, s in decode], s=4)
    bottom.set_ylabel("% of memory roofline")
    bottom.set_xlabel("engine step")
    bottom.set_ylim(0, 105)
    top.set_title(title, fontsize=9)
    _save(fig, path)


def plot_latency_cdfs(series: dict[str, list[float]], title: str, path: Path) -> None:
    """One cumulative distribution per latency kind (milliseconds, log scale), with p50/p90/p99 marked."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, values in series.items():
        if not values:
            continue
        s = sorted(values)
        ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=name)
    for q in (0.5, 0.9, 0.99):
        ax.axhline(q, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests (TTFT, TPOT) or gaps (ITL) at or below")
    ax.set_title(title, fontsize=9)
    if any(series.values()):
        ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_moe(rows: list[dict], title: str, path: Path) -> None:
    """Per MoE shape: each method's ms and the floors against the token count (top), Tritium's share of the memory
    roofline and of the GEMM ceiling (bottom)."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(max(9, 6 * len(shapes)), 7), squeeze=False, sharex="col")
    for col, shape in enumerate(shapes):
        mine = [r for r in rows if r["shape"] == shape]
        tokens = [r["tokens"] for r in mine]
        top, bottom = axes[0][col], axes[1][col]
        for method in ("tritium", "loop", "dense"):
            top.plot(tokens, [r["ms"][method] for r in mine], marker="o", markersize=3, label=method)
        if "memory_floor_ms" in mine[0]:
            top.plot(tokens, [r["memory_floor_ms"] for r in mine], linestyle="--", label="memory roofline")
            top.plot(tokens, [r["compute_floor_ms"] for r in mine], linestyle=":", label="GEMM ceiling")
            bottom.plot(tokens, [100 * r["memory_floor_ms"] / r["ms"]["tritium"] for r in mine], marker="o",
                        markersize=3, label="% of memory roofline")
            bottom.plot(tokens, [100 * r["compute_floor_ms"] / r["ms"]["tritium"] for r in mine], marker="o",
                        markersize=3, label="% of GEMM ceiling")
            bottom.legend(fontsize=8)
        top.set_title(shape, fontsize=9)
        top.set_xscale("log", base=2)
        top.set_yscale("log")
        top.set_ylabel("ms")
        top.legend(fontsize=8)
        bottom.set_ylim(0, 105)
        bottom.set_xlabel("tokens")
        bottom.set_ylabel("Tritium, %")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
