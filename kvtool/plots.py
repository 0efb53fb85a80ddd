"""PNG figures: the layer-distance heatmap (with a sharing map drawn on it) and the quality-vs-memory frontier.
Each function returns the PNG's bytes; callers write them (atomically) where they belong."""

from __future__ import annotations

import io

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def distance_heatmap(dist: np.ndarray, title: str = "", kv_source_layers: list[int] | None = None) -> bytes:
    """Heatmap of a layer x layer distance matrix; ``kv_source_layers`` marks each consumer→source pair."""
    plt = _plt()
    n = dist.shape[0]
    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=110)
    im = ax.imshow(dist, cmap="viridis", origin="upper")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="distance")
    if kv_source_layers is not None:
        pairs = [(j, s) for j, s in enumerate(kv_source_layers) if s != j]
        if pairs:
            ax.scatter([s for _, s in pairs], [j for j, _ in pairs], marker="s", s=40, facecolors="none",
                       edgecolors="red", linewidths=1.5, label="layer (row) reads source (column)")
            ax.legend(loc="upper right", fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    step = max(1, n // 10)
    ax.set_xticks(range(0, n, step))
    ax.set_yticks(range(0, n, step))
    ax.set_title(title or "KV distance between layers (calibration averages)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def frontier(points: list[dict], base_ppl: float | None = None) -> bytes:
    """Perplexity against KV bytes (fraction of the base) for several plans; ``points``: {label, kv_ratio, ppl}, and
    optionally ``series``: points of one series are joined by a line and named once, in the legend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    series: dict[str, list[dict]] = {}
    for p in points:
        if "series" in p:
            series.setdefault(p["series"], []).append(p)
            continue
        ax.scatter(p["kv_ratio"], p["ppl"], s=30, label=p["label"])
    markers = "os^Dv<>px*"
    for n, (name, pts) in enumerate(series.items()):
        pts = sorted(pts, key=lambda p: p["kv_ratio"])
        ax.plot([p["kv_ratio"] for p in pts], [p["ppl"] for p in pts], marker=markers[n % len(markers)], ms=4,
                lw=1.2, label=name)
    if base_ppl is not None:
        ax.scatter([1.0], [base_ppl], marker="*", s=120, color="black", label="base", zorder=5)
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("KV-cache bytes (fraction of base)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title("Quality vs KV memory", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def heal_curve(curves: dict[str, list[dict]], base_ppl: float) -> bytes:
    """Held-out perplexity (× base) and greedy token agreement against tokens trained, one line per run;
    ``curves``: name → points {tokens, ppl, token_agreement}."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.6, 3.8), dpi=110)
    # "0 tokens" drawn a quarter of the way below the first checkpoint on the log axis
    zero = min((p["tokens"] for pts in curves.values() for p in pts if p["tokens"] > 0), default=4) / 4
    for name, pts in curves.items():
        pts = sorted(pts, key=lambda p: p["tokens"])
        x = [p["tokens"] or zero for p in pts]
        a.plot(x, [p["ppl"] / base_ppl for p in pts], marker="o", ms=4, label=name)
        b.plot(x, [p["token_agreement"] for p in pts], marker="o", ms=4, label=name)
    a.axhline(1.0, color="black", lw=0.8)
    a.set_ylabel("held-out perplexity (× base)")
    b.set_ylabel("greedy token agreement with base (32 tokens)")
    b.set_ylim(0, 1)
    for ax in (a, b):
        ax.set_xscale("log")
        ax.axvline(zero * 2, color="black", lw=0.5, ls=":")
        ax.set_xlabel("tokens trained (left of the dotted line: before healing)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("kvtool heal on the base model's own text", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _plt().close(fig)
    return buf.getvalue()
