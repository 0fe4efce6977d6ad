"""Pictures people would rather look at than read: attention maps and loss curves (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_attention_grid(
    weights: torch.Tensor, path: str | Path, tokens: Sequence[str] | None = None, title: str = ""
) -> Path:
    """Save a `[layers, heads, T, T]` (or `[heads, T, T]`) stack of attention maps as one PNG grid.

    Row = layer, column = head; each cell is a heatmap of query (y) against key (x).
    """
    plt = _pyplot()
    weights = weights.detach().float().cpu()
    if weights.dim() == 3:
        weights = weights[None]
    layers, heads, seq, _ = weights.shape
    fig, axes = plt.subplots(layers, heads, figsize=(2.2 * heads, 2.2 * layers + 0.6), squeeze=False)
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer][head]
            ax.imshow(weights[layer, head], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    if tokens is not None and seq <= 24:
        ax = axes[-1][0]
        ax.set_xticks(range(seq), labels=list(tokens), rotation=90, fontsize=6)
        ax.set_yticks(range(seq), labels=list(tokens), fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def save_loss_plot(history: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Train (`loss`) and validation (`val_loss`) loss against `step`, from one run's metrics records."""
    return save_curves({"": history}, path, title)


def save_curves(runs: Mapping[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """Every run's train loss (a line) and validation loss (dots, the same colour) against step, one plot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, history) in enumerate(runs.items()):
        color = f"C{i % 10}"
        for key, kind, style in (("loss", "train", ".-"), ("val_loss", "validation", "o--")):
            points = [(r["step"], r[key]) for r in history if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, color=color, markersize=4, label=f"{name} {kind}".strip())
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Lay out, write (making the folder) and close `fig`; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
