"""Mixture of experts in a character-level language model, against a dense model of equal FLOPs per token.

Text: the Python standard library's own source, the top-level ``*.py`` files of
``sysconfig.get_paths()["stdlib"]`` in sorted order, concatenated as UTF-8 bytes up to
``--chars`` bytes (default 1,200,000); the first 90% trains, the last 10% validates (whole
files from the end of the alphabet: text the model never saw). Tokens are bytes (256 symbols).

Models (pre-norm transformer, causal attention, context 64):

  byte embedding + learnt positions -> ``layers`` x (x + attention(LN x), x + FF(LN x)) -> LN -> Linear(256)

  dense  FF is an MLP ``dim -> hidden -> dim`` (ReLU).
  moe    FF is ``adaptnet.MoE(dim, experts, hidden, top_k=1, capacity_factor=1.25)``: every token
         runs one expert MLP of the same shape as the dense FF, so the FLOPs per token are
         equal up to the router (``dim x experts`` MACs, under 2% here); the MoE has ``experts``
         times the FF parameters. The load-balancing and z-losses are added (``adaptive_loss``).

Both train the same steps on the same batches (AdamW, warm-up then cosine decay, gradient
clipping 1.0). Reported: validation bits per character (with the capacity limit in force:
a dropped token passes through the residual unchanged), the (token, slot) assignments
dropped for lack of capacity (validation, and over the last quarter of training), and the
load balance: the coefficient of variation (std / mean) of the tokens each expert is routed,
per layer, on the validation text.

Run: ``python benchmarks/moe_charlm.py`` (``--quick`` for a smoke run; ``--steps``, ``--seeds``,
``--chars``, ``--threads``, ``--out``; ``--first-seed`` and ``--merge`` to run seeds as separate
processes and tabulate them together).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from _teacher_student import RESULTS, machine_info, render, write_json
from adaptnet.nn.losses import adaptive_loss
from adaptnet.nn.moe import MoE
from adaptnet.recipes._lm import lm_loss, stdlib_text, windows  # shared with the lm recipe

DEFAULT_OUT = RESULTS / "moe_charlm.json"
FULL = {"chars": 1_200_000, "steps": 1500, "batch": 32, "context": 64, "dim": 128, "hidden": 256, "layers": 2,
        "heads": 4, "experts": 8, "lr": 3e-3, "warmup": 50, "eval_batches": None, "aux_loss_coef": 1e-2}
QUICK = {**FULL, "chars": 200_000, "steps": 60, "eval_batches": 4, "warmup": 10}
CAPACITY_FACTOR = 1.25


class Block(nn.Module):
    """Pre-norm transformer block; ``ff`` is a dense MLP or an ``MoE`` (both (..., D) -> (..., D))."""

    def __init__(self, dim: int, heads: int, ff: nn.Module):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = ff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, D / heads)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.ff(self.ln2(x))


class CharLM(nn.Module):
    """Bytes ``(B, T)`` -> next-byte logits ``(B, T, 256)``."""

    def __init__(self, cfg: dict[str, Any], moe: bool):
        super().__init__()
        dim = cfg["dim"]
        self.embed, self.pos = nn.Embedding(256, dim), nn.Parameter(torch.zeros(cfg["context"], dim))
        nn.init.normal_(self.pos, std=0.02)

        def ff() -> nn.Module:
            if moe:
                return MoE(dim, cfg["experts"], cfg["hidden"], top_k=1, capacity_factor=CAPACITY_FACTOR,
                           aux_loss_coef=cfg["aux_loss_coef"])
            return nn.Sequential(nn.Linear(dim, cfg["hidden"]), nn.ReLU(), nn.Linear(cfg["hidden"], dim))

        self.blocks = nn.Sequential(*[Block(dim, cfg["heads"], ff()) for _ in range(cfg["layers"])])
        self.ln, self.out = nn.LayerNorm(dim), nn.Linear(dim, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]  # (B, T, D)
        return self.out(self.ln(self.blocks(h)))

    def moes(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]


def macs_per_token(cfg: dict[str, Any], moe: bool) -> int:
    """Multiply-accumulates per token of a forward pass (every expert slot served; causal attention
    averaged over the positions of a window)."""
    d, t = cfg["dim"], cfg["context"]
    attention = 4 * d * d + d * (t + 1)  # qkv and output projections; q.k and weights.v over (t + 1) / 2 keys
    ff = 2 * d * cfg["hidden"] + (d * cfg["experts"] if moe else 0)  # one expert (top-1) + router, or the MLP
    return cfg["layers"] * (attention + ff) + 256 * d


def routing(model: CharLM) -> list[dict[str, int | list[int]]]:
    out = []
    for m in model.moes():
        s = m.last_stats
        assert s is not None
        out.append({"tokens": s.tokens, "routed": s.routed_per_expert, "dropped": s.dropped})
    return out


def evaluate(model: CharLM, val: torch.Tensor, cfg: dict[str, Any]) -> dict[str, Any]:
    """Bits per char over the validation text cut into windows of ``context`` bytes, and the routing there.

    The windows are shuffled (a fixed permutation) into batches of ``batch``, as in training: the
    capacity limit applies per forward pass, and a batch of neighbouring windows from one file
    would load the experts unlike any training batch."""
    model.eval()
    t, b = cfg["context"], cfg["batch"]
    starts = torch.arange(0, val.numel() - t - 1, t)
    starts = starts[torch.randperm(starts.numel(), generator=torch.Generator().manual_seed(0))]
    if cfg["eval_batches"] is not None:
        starts = starts[: b * cfg["eval_batches"]]
    total, count = 0.0, 0
    routed = [[0] * cfg["experts"] for _ in model.moes()]
    dropped, assignments = 0, 0
    with torch.no_grad():
        for chunk in starts.split(b):
            x, y = windows(val, chunk, t)
            total += float(lm_loss(model(x), y)) * y.numel()
            count += y.numel()
            for layer, r in enumerate(routing(model)):
                routed[layer] = [a + c for a, c in zip(routed[layer], r["routed"], strict=True)]  # type: ignore[arg-type]
                dropped += int(r["dropped"])  # type: ignore[arg-type]
                assignments += int(r["tokens"])  # type: ignore[arg-type]
    model.train()
    out: dict[str, Any] = {"val_bits_per_char": total / count / math.log(2), "val_tokens": count}
    if routed:
        out["val_dropped_fraction"] = dropped / assignments
        out["val_routed_per_expert"] = routed
        out["val_load_cv"] = [statistics.pstdev(r) / statistics.fmean(r) for r in routed]
    return out


def train(arm: str, seed: int, text: torch.Tensor, val: torch.Tensor, cfg: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = CharLM(cfg, moe=arm == "moe")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    steps, warmup = cfg["steps"], cfg["warmup"]
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    g = torch.Generator().manual_seed(seed)  # the same batches for both arms of a seed
    dropped, assignments, curve = 0, 0, []
    started = time.perf_counter()
    for step in range(steps):
        x, y = windows(text, torch.randint(0, text.numel() - cfg["context"] - 1, (cfg["batch"],), generator=g),
                       cfg["context"])
        loss = adaptive_loss(model, lm_loss, model(x), y)  # + load balancing and z-loss of every MoE
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step >= steps * 3 // 4:
            for r in routing(model):
                dropped += int(r["dropped"])  # type: ignore[arg-type]
                assignments += int(r["tokens"])  # type: ignore[arg-type]
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            curve.append((step, round(float(loss.detach()), 4)))
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    result = {"arm": arm, "seed": seed, "params": params, "macs_per_token": macs_per_token(cfg, arm == "moe"),
              "train_seconds": round(seconds, 1), "loss_curve": curve, **evaluate(model, val, cfg)}
    if assignments:
        result["train_dropped_fraction_last_quarter"] = dropped / assignments
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 200k chars, 60 steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=1, help="seeds (default 1)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run: first-seed .. first-seed + seeds - 1")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="train nothing: tabulate the runs of these JSON files (seeds run as separate processes)")
    parser.add_argument("--chars", type=int, default=None)
    parser.add_argument("--aux-loss-coef", type=float, default=None, help="MoE load-balancing weight (default 1e-2)")
    parser.add_argument("--arms", choices=["both", "moe", "dense"], default="both")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("steps", "chars", "aux_loss_coef"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if min(cfg["steps"], cfg["chars"], args.seeds, args.threads) < 1:
        parser.error("--steps, --chars, --seeds and --threads must be positive")
    torch.set_num_threads(args.threads)
    load_at_start = [round(v, 2) for v in os.getloadavg()]
    started = time.perf_counter()
    try:
        text, files = stdlib_text(cfg["chars"])
    except ValueError as err:
        parser.error(f"{err} (--chars)")
    cut = int(0.9 * text.numel())
    arms = ("dense", "moe") if args.arms == "both" else (args.arms,)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    merged: list[dict[str, Any]] = []
    if args.merge:
        merged = [json.loads(path.read_text()) for path in args.merge]
        cfg = {k: v for k, v in merged[0]["config"].items() if k in cfg}
        runs = [r for m in merged for r in m["runs"]]
        seeds = sorted({r["seed"] for r in runs})  # type: ignore[assignment]
        load_at_start = [m["load_avg_at_start"] for m in merged]  # type: ignore[misc]
    else:
        runs = [train(arm, seed, text[:cut], text[cut:], cfg) for seed in seeds for arm in arms]
    results: dict[str, Any] = {
        "benchmark": "moe_charlm",
        "command": " ".join(["python", "benchmarks/moe_charlm.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(args.threads), "load_avg_at_start": load_at_start,
        "config": {**cfg, "capacity_factor": CAPACITY_FACTOR, "top_k": 1, "seeds": list(seeds),
                   "files": f"{len(files)} files, {files[0]} .. {files[-1]}", "train_bytes": cut,
                   "val_bytes": text.numel() - cut},
        "runs": runs,
    }
    if merged:
        results["merged_from"] = [m["command"] for m in merged]
    table = [("arm", "seed", "params", "MACs/token", "train s", "val bits/char", "dropped (val)",
              "dropped (train, last 1/4)", "load CV per layer (val)")]
    for r in runs:
        table.append((r["arm"], str(r["seed"]), f"{r['params']:,}", f"{r['macs_per_token']:,.0f}",
                      str(r["train_seconds"]), f"{r['val_bits_per_char']:.4f}",
                      f"{r['val_dropped_fraction']:.2%}" if "val_dropped_fraction" in r else "-",
                      f"{r['train_dropped_fraction_last_quarter']:.2%}" if r["arm"] == "moe" else "-",
                      ", ".join(f"{c:.3f}" for c in r.get("val_load_cv", [])) or "-"))
    bpc = {arm: [r["val_bits_per_char"] for r in runs if r["arm"] == arm] for arm in arms}
    results["summary"] = {arm: {"val_bits_per_char_mean": statistics.fmean(v), "per_seed": v} for arm, v in bpc.items()}
    if len(arms) == 2:
        results["summary"]["moe_better_every_seed"] = all(m < d for m, d in zip(bpc["moe"], bpc["dense"], strict=True))
    results["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results["seconds"] = round(time.perf_counter() - started, 1)
    print("\n".join(render(table)))
    means = ", ".join(f"{arm} {results['summary'][arm]['val_bits_per_char_mean']:.4f}" for arm in arms)
    print(f"\nval bits/char, mean over {len(seeds)} seed(s): {means}; {results['seconds']} s")
    write_json(results, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
