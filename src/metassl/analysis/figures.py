"""The pictures of ``metassl analyze`` as PNG bytes (matplotlib's object API, no pyplot state).

Each function takes plain tensors or lists and returns the encoded PNG; what every picture
shows is explained in docs/analysis.md.
"""

from __future__ import annotations

import io
from typing import Sequence

import torch
from matplotlib.figure import Figure

__all__ = ["correlation_heatmap", "spectrum_plot", "dimension_plot", "ablation_plot", "gate_scatter",
           "background_bars", "embedding_scatter"]

_DPI = 100


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def correlation_heatmap(corr: torch.Tensor, title: str) -> bytes:
    """|ρ| between dimensions, dimensions ordered by their first principal direction so that
    blocks of redundant dimensions sit together."""
    c = corr.double()
    order = torch.argsort(torch.linalg.eigh(c.abs())[1][:, -1]) if c.shape[0] > 1 else torch.arange(c.shape[0])
    fig = Figure(figsize=(4.2, 3.6))
    ax = fig.add_subplot()
    im = ax.imshow(c[order][:, order].abs().numpy(), vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="|correlation|")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("dimension (reordered)", fontsize=8)
    ax.set_ylabel("dimension (reordered)", fontsize=8)
    return _png(fig)


def spectrum_plot(spectra: dict[str, torch.Tensor], title: str) -> bytes:
    """Normalised singular values ``σ_k / σ_1`` (log scale) of each space, numerical zeros dropped."""
    fig = Figure(figsize=(4.8, 3.4))
    ax = fig.add_subplot()
    for name, s in spectra.items():
        s = s.double()
        if s.numel() and float(s[0]) > 0:
            ratio = s / s[0]
            ratio = ratio[ratio > 1e-7]  # below: rounding zeros (fewer samples than dimensions)
            ax.semilogy(torch.arange(1, ratio.numel() + 1).numpy(), ratio.numpy(), label=name, lw=1.4)
    ax.set_xlabel("index k", fontsize=8)
    ax.set_ylabel("σ_k / σ_1", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def dimension_plot(std: torch.Tensor, dead: torch.Tensor, title: str, gate: torch.Tensor | None = None) -> bytes:
    """Standard deviation of every dimension, sorted, dead ones in red; the gate when given."""
    order = torch.argsort(std, descending=True)
    fig = Figure(figsize=(4.8, 3.0))
    ax = fig.add_subplot()
    colours = ["#c0392b" if bool(d) else "#2c7fb8" for d in dead[order]]
    ax.bar(range(std.numel()), std[order].numpy(), color=colours, width=1.0)
    ax.set_xlabel("dimension (sorted by std)", fontsize=8)
    ax.set_ylabel("std", fontsize=8)
    ax.set_title(title, fontsize=9)
    if gate is not None:
        twin = ax.twinx()
        twin.plot(range(std.numel()), gate[order].numpy(), color="#e67e22", lw=0.8, label="learned mask")
        twin.set_ylabel("mask value", fontsize=8)
        twin.legend(fontsize=7, loc="upper right")
    return _png(fig)


def ablation_plot(gains: Sequence[float], labels: Sequence[str], title: str, significant: Sequence[bool]) -> bytes:
    """Accuracy change (points) when each group is removed, sorted; removals that raise the
    accuracy in orange (significant ones hatched)."""
    values = torch.tensor(list(gains), dtype=torch.float64) * 100
    order = torch.argsort(values, descending=True)
    fig = Figure(figsize=(6.0, 3.0))
    ax = fig.add_subplot()
    for pos, i in enumerate(order.tolist()):
        v = float(values[i])
        ax.bar(pos, v, color="#e67e22" if v > 0 else "#7f8c8d", width=0.9, hatch="//" if significant[i] else None)
    ax.axhline(0.0, color="black", lw=0.6)
    if len(order) <= 40:
        ax.set_xticks(range(len(order)), [labels[i] for i in order.tolist()], rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(order)} removals, sorted", fontsize=8)
    ax.set_ylabel("accuracy change (points)", fontsize=8)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def gate_scatter(gate: torch.Tensor, importance: torch.Tensor, title: str) -> bytes:
    """Learned mask value of each group against the accuracy lost when the group is removed."""
    fig = Figure(figsize=(4.2, 3.2))
    ax = fig.add_subplot()
    ax.scatter(gate.numpy(), (importance * 100).numpy(), s=10, alpha=0.7)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("mean mask value of the group", fontsize=8)
    ax.set_ylabel("accuracy lost on removal (points)", fontsize=8)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def background_bars(full: Sequence[float | None], foreground: Sequence[float | None], classes: Sequence[str],
                    title: str) -> bytes:
    """Per-class kNN accuracy on full and foreground-only test images."""
    n = len(full)
    x = torch.arange(n).double()
    fig = Figure(figsize=(5.6, 3.0))
    ax = fig.add_subplot()
    ax.bar((x - 0.2).numpy(), [v or 0.0 for v in full], width=0.4, label="full image")
    ax.bar((x + 0.2).numpy(), [v or 0.0 for v in foreground], width=0.4, label="foreground only")
    ax.set_xticks(range(n), list(classes)[:n] if classes else [str(i) for i in range(n)], rotation=45, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("kNN accuracy", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def embedding_scatter(coords: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], title: str) -> bytes:
    """2-D embedding, one colour per class."""
    fig = Figure(figsize=(4.6, 4.0))
    ax = fig.add_subplot()
    palette = [f"C{i % 10}" for i in range(int(labels.max()) + 1)] if labels.numel() else []
    for c in torch.unique(labels).tolist():
        sel = labels == c
        name = classes[c] if c < len(classes) else str(c)
        ax.scatter(coords[sel, 0].numpy(), coords[sel, 1].numpy(), s=4, alpha=0.7, color=palette[c], label=name,
                   marker="o" if c < 10 else "x")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    if len(classes) <= 20:
        ax.legend(fontsize=6, markerscale=2, loc="best", ncol=2)
    return _png(fig)
