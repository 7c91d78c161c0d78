"""PNG plots of a record: RSS over time (one line per contender) and a throughput bar chart.

matplotlib is optional (`pip install -e ".[bench]"`); without it the harness says so and skips the plots.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import converted, median_run


def plot(record: dict, stem: Path) -> list[Path]:
    """Write `<stem>-rss.png` and `<stem>-throughput.png`; return the paths (empty without matplotlib).
    Contenders without a converted run (OOM-killed under --memory-limit) are left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('plots skipped: matplotlib is not installed (pip install -e ".[bench]")')
        return []

    title = f"{record['profile']} ({record['layers']} layers, {record['weight_bytes'] / 1e9:.2f} GB " \
            f"{record.get('source_dtype', 'bf16')}), " \
            f"page cache {record['page_cache']}, {record['machine']['cores']} cores, " \
            f"{record['machine']['ram_bytes'] / 2**30:.0f} GiB RAM"
    paths = [stem.with_name(stem.name + "-rss.png"), stem.with_name(stem.name + "-throughput.png")]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, runs in record["runs"].items():
        if not converted(runs):
            continue
        timeline = median_run(converted(runs))["timeline"]
        ax.plot([t for t, _, _ in timeline], [rss / 1e9 for _, rss, _ in timeline], label=name)
    ax.set_xlabel("seconds since start (median run)")
    ax.set_ylabel("RSS, GB")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    names = [n for n, s in record["summary"].items() if "throughput" in s]
    medians = [record["summary"][n]["throughput"] / 1e9 for n in names]
    spread = [[r["throughput"] / 1e9 for r in converted(record["runs"][n])] for n in names]
    lows = [m - min(s) for m, s in zip(medians, spread, strict=True)]
    highs = [max(s) - m for m, s in zip(medians, spread, strict=True)]
    ax.bar(names, medians, yerr=[lows, highs], capsize=6, color="tab:blue")
    ax.set_ylabel("weight GB / wall second (median, min–max)")
    ax.set_title(title, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths
