"""Mixture of experts: sorted dispatch against dense compute, and growing experts mid-training.

(a) dispatch  ``MoE`` sorts the (token, slot) assignments by expert and runs each expert on its
              own tokens. The dense alternative runs every expert on every token and masks the
              gates (``E x N`` work). Forward + backward in training mode, N = 4096 tokens,
              dim 128, hidden 256, E in (4, 16, 64), top-1 and top-2, timed side by side in
              the same run (each repeat times both, the median is reported).
(b) growth    A regression task made of 8 regions of input space, each with its own random
              target map. An ``MoE(8, 2, 32)`` trains with Adam (lr 3e-3, batches of 128); at
              step 300 ``grow_experts`` adds 2 experts, and training goes on to step 1500.
              Reported: the output change at the edit (on the 1024-row validation batch, which
              is also the calibration batch), the first step (checked every 25) at which every
              new expert gets tokens, and the final validation MSE, against staying at 2 experts
              and against 4 experts from the start. 3 seeds.

Run: ``python benchmarks/moe.py`` (``--quick`` for a smoke run, ``--threads``, ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _teacher_student import RESULTS, machine_info, render, write_json
from adaptnet.edit.experts import grow_experts
from adaptnet.nn.losses import adaptive_loss
from adaptnet.nn.moe import MoE

DEFAULT_OUT = RESULTS / "moe.json"


def dense_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, gates masked to the chosen experts (the E x N baseline)."""
    logits = moe.router(x)  # (N, E)
    top_logits, top_idx = logits.topk(moe.top_k, dim=-1)
    gates = logits.softmax(-1).gather(1, top_idx) if moe.top_k == 1 else top_logits.softmax(-1)
    weight = torch.zeros_like(logits).scatter(1, top_idx, gates)  # (N, E)
    hidden = moe.act(torch.einsum("nd,ehd->enh", x, moe.w1) + moe.b1[:, None])  # (E, N, H)
    y = torch.einsum("enh,edh->end", hidden, moe.w2) + moe.b2[:, None]  # (E, N, D)
    return torch.einsum("ne,end->nd", weight, y)


def _time(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _time_pair(moe: MoE, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of forward + backward: sorted dispatch, then dense (alternating)."""

    def sparse() -> None:
        (moe(x).square().mean() + moe.aux_loss()).backward()  # type: ignore[operator]

    def dense() -> None:
        dense_forward(moe, x).square().mean().backward()

    sparse(), dense()  # warm up
    times: dict[str, list[float]] = {"sparse": [], "dense": []}
    for _ in range(repeats):
        times["sparse"].append(_time(sparse))
        times["dense"].append(_time(dense))
    return statistics.median(times["sparse"]), statistics.median(times["dense"])


def dispatch(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for experts in (4, 16, 64):
        for top_k in (1, 2):
            torch.manual_seed(0)
            moe = MoE(128, experts, 256, top_k=top_k)
            x = torch.randn(1024 if quick else 4096, 128)
            with torch.no_grad():
                assert torch.allclose(moe(x), dense_forward(moe, x), atol=1e-5)
            s, d = _time_pair(moe, x, 3 if quick else 15)
            rows.append({"experts": experts, "top_k": top_k, "sparse_ms": 1e3 * s, "dense_ms": 1e3 * d,
                         "speedup": d / s})
    return rows


def _task(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    regions, maps = torch.randn(8, 8, generator=g), torch.randn(8, 8, 8, generator=g) / 8**0.5
    x = torch.randn(5120, 8, generator=g)
    y = torch.einsum("nij,nj->ni", maps[(x @ regions.T).argmax(1)], x).tanh()
    return x[:4096], y[:4096], x[4096:], y[4096:]


def growth_run(arm: str, top_k: int, seed: int, steps: int, grow_at: int) -> dict[str, Any]:
    x, y, xv, yv = _task(seed)
    torch.manual_seed(seed)
    moe = MoE(8, 4 if arm == "4 experts from the start" else 2, 32, top_k=top_k)
    opt = torch.optim.Adam(moe.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    change, alive = None, None
    for step in range(steps):
        if step == grow_at and arm.startswith("grow"):
            preserve = arm != "grow, even split (preserve=False)"
            init = "random" if "random" in arm else "copy"
            edit = grow_experts(moe, 2, init=init, optimizer=opt, preserve=preserve, batch=xv, generator=g)
            change = edit.max_output_change
        if arm.startswith("grow") and step > grow_at and alive is None and (step - grow_at) % 25 == 0:
            with torch.no_grad():
                moe.eval()
                moe(xv)
            stats = moe.last_stats
            if stats is not None and all(c > 0 for c in stats.routed_per_expert[2:]):
                alive = step - grow_at
        moe.train()
        rows = torch.randint(0, x.shape[0], (128,), generator=g)
        opt.zero_grad()
        adaptive_loss(moe, F.mse_loss, moe(x[rows]), y[rows]).backward()
        opt.step()
    moe.eval()
    with torch.no_grad():
        loss = float(F.mse_loss(moe(xv), yv))
    return {"arm": arm, "top_k": top_k, "seed": seed, "change": change, "alive_after": alive, "val_mse": loss}


ARMS = ("stay at 2 experts", "4 experts from the start", "grow, preserving (copy)", "grow, preserving (random)",
        "grow, even split (preserve=False)")


def growth(quick: bool) -> list[dict[str, Any]]:
    steps, grow_at = (300, 100) if quick else (1500, 300)
    return [growth_run(arm, k, seed, steps, grow_at) for k in (1, 2) for arm in ARMS for seed in range(3)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"machine": machine_info(args.threads), "quick": args.quick}
    results["dispatch"] = dispatch(args.quick)
    table = [("experts", "top_k", "sorted dispatch ms", "dense ms", "dense / sorted")]
    table += [(str(r["experts"]), str(r["top_k"]), f"{r['sparse_ms']:.1f}", f"{r['dense_ms']:.1f}",
               f"{r['speedup']:.2f}") for r in results["dispatch"]]
    print("\n".join(render(table)), end="\n\n")
    runs = growth(args.quick)
    results["growth"] = runs
    table = [("top_k", "arm", "max change at edit", "new experts all chosen after", "val MSE mean ± std")]
    for k in (1, 2):
        for arm in ARMS:
            mine = [r for r in runs if r["arm"] == arm and r["top_k"] == k]
            changes = [r["change"] for r in mine if r["change"] is not None]
            alive = [r["alive_after"] for r in mine]
            mse = [r["val_mse"] for r in mine]
            table.append((
                str(k), arm, f"{max(changes):.1e}" if changes else "-",
                ", ".join("never" if a is None else str(a) for a in alive) if arm.startswith("grow") else "-",
                f"{statistics.fmean(mse):.4f} ± {statistics.stdev(mse):.4f}",
            ))
    print("\n".join(render(table)))
    write_json(results, args.out)
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
