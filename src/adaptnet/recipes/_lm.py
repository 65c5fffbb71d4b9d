"""The ``lm`` recipe's pieces: the text (the stdlib's own sources, as bytes), windows of it, and a
small GPT-style causal language model written with plain ``torch.nn``.

The model computes every size from its tensors (heads from ``view(b, t, 3, -1, head_dim)``), so
that adaptnet's tracing finds its unit groups: ``embed`` (the residual stream, d_model),
``blocks.i.qkv`` (attention heads of block i, whole heads) and ``blocks.i.fc`` (MLP hidden units).
``benchmarks/moe_charlm.py`` reads its text with ``stdlib_text`` and ``windows`` from here.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256  # bytes


def stdlib_text(chars: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``chars`` bytes of the stdlib's top-level ``*.py`` files (sorted by name), ``(chars,)``
    int64, and the file names used. ``ValueError`` if the stdlib holds fewer bytes."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    data, used = bytearray(), []
    for path in sorted(folder.glob("*.py")):
        if len(data) >= chars:
            break
        data += path.read_bytes()
        used.append(path.name)
    if len(data) < chars:
        raise ValueError(f"the stdlib in {folder} holds only {len(data)} bytes of top-level .py files; "
                         f"ask for at most that many")
    return torch.frombuffer(bytearray(data[:chars]), dtype=torch.uint8).long(), used


def windows(text: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets ``(B, T)`` for windows starting at ``starts`` ``(B,)``."""
    index = starts[:, None] + torch.arange(context + 1)  # (B, T + 1)
    chunk = text[index]
    return chunk[:, :-1], chunk[:, 1:]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of ``(B, T, V)`` logits against ``(B, T)`` targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class Block(nn.Module):
    """Pre-norm block: ``x + proj(attention(ln1 x))``, then ``x + out(gelu(fc(ln2 x)))``.

    Heads are ``head_dim`` wide; their number is read from the tensor, so a width edit of the
    ``qkv`` group (whole heads) needs no change of code.
    """

    def __init__(self, d_model: int, heads: int, head_dim: int, hidden: int):
        super().__init__()
        self.head_dim = head_dim
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, d_model)
        self.fc, self.act, self.out = nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, -1, self.head_dim)  # (B, T, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, head_dim)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.proj(a)
        return x + self.out(self.act(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Bytes ``(B, T)`` -> next-byte logits ``(B, T, 256)``; learnt positions, untied output layer."""

    def __init__(self, *, layers: int, d_model: int, heads: int, head_dim: int, hidden: int, context: int):
        super().__init__()
        self.embed, self.pos = nn.Embedding(VOCAB, d_model), nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*[Block(d_model, heads, head_dim, hidden) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, VOCAB)
        for p in (self.embed.weight, self.pos.weight):
            nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos(torch.arange(x.shape[1], device=x.device))  # (B, T, D)
        return self.head(self.ln(self.blocks(h)))


def sizes(model: TinyGPT) -> dict[str, int]:
    """The model's sizes now, read from its tensors (they change as it grows)."""
    first = model.blocks[0]
    assert isinstance(first, Block)
    return {"layers": len(model.blocks), "d_model": model.embed.weight.shape[1],
            "heads": first.qkv.out_features // (3 * first.head_dim), "hidden": first.fc.out_features}


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth of ``lr`` at ``steps``."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))
    return lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * cosine)


def interpolate_crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """The first x at which the curve ``[(x, y), ...]`` comes down to ``target`` (linear between
    points), or None if it never does."""
    previous: tuple[float, float] | None = None
    for x, y in points:
        if y <= target:
            if previous is None:
                return x
            x0, y0 = previous
            return x0 + (x - x0) * (y0 - target) / (y0 - y)
        previous = (x, y)
    return None


def relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """``max|after - before| / max|before|``: how much an edit changed an output."""
    return float((after - before).abs().max() / before.abs().max())
