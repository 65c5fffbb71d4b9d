"""The GAN recipe's figures: ring samples, metric curves, digit sample grids (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

COLOURS = {"adaptive": "tab:blue", "static": "tab:orange"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def plot_ring(samples: Mapping[str, torch.Tensor], before_growth: torch.Tensor | None, centers: torch.Tensor,
              sigma: float, path: Path) -> None:
    """Scatter of generated points, one panel per run (and the adaptive one just before its first growth)."""
    plt = _pyplot()
    panels = ([("adaptive, before first growth", before_growth)] if before_growth is not None else [])
    panels += [(f"{name}, final", points) for name, points in samples.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels, strict=True):
        pts = points[:1500].detach().numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4, color="tab:blue")
        for c in centers:  # the 3-sigma discs a high-quality sample falls in
            ax.add_patch(plt.Circle((float(c[0]), float(c[1])), 3 * sigma, color="red", fill=False, lw=0.8))
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", title=title, xticks=[], yticks=[])
        ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], metrics: Sequence[str],
                growth_steps: Sequence[int], path: Path) -> None:
    """Each metric against the step, one line per run; dotted lines mark growth."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.0), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for name, curve in curves.items():
            ax.plot(curve["step"], curve[metric], label=name, color=COLOURS.get(name), lw=1.2)
        for step in growth_steps:
            ax.axvline(step, color="grey", ls=":", lw=1)
        ax.set(xlabel="step", title=metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_digit_grid(images: Mapping[str, torch.Tensor], path: Path, rows: int = 10) -> None:
    """A ``rows`` x ``rows`` grid of ``(N, 1, r, r)`` images in [-1, 1] per entry, side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(images), figsize=(3.3 * len(images), 3.5), squeeze=False)
    for ax, (title, batch) in zip(axes[0], images.items(), strict=True):
        x = batch[: rows * rows].detach().float()
        x = torch.cat([x, x.new_full((rows * rows - len(x), *x.shape[1:]), -1.0)]) if len(x) < rows * rows else x
        x = torch.nn.functional.pad(x, (0, 1, 0, 1), value=-1.0)  # a blank pixel between neighbours
        r = x.shape[-1]
        # (rows*rows, 1, r, r) -> (rows*r, rows*r): rows of images side by side
        grid = x.reshape(rows, rows, r, r).permute(0, 2, 1, 3).reshape(rows * r, rows * r)
        ax.imshow(grid.numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
