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
(c) peer      ``mixture-of-experts`` (lucidrains, PyPI; ``pip install mixture-of-experts``): its top-2
              ``MoE`` against ``adaptnet.MoE`` holding the same weights (router without bias, expert
              biases 0, ReLU), dim 128, hidden 256, E in (4, 16), top-2 (the peer's second policy
              "all": every token keeps its second choice), capacity factor 1.25 in adaptnet's sense
              (1.25 x the mean load of an expert). The peer counts capacity as ``int(group * cf / E)``
              slots shared by first and second choices, adaptnet as ``ceil(cf * N * top_k / E)``: the
              peer gets ``2 * 1.25`` so that both give every expert the same number of slots. Both
              serve every first choice before any second choice, in token order, so with one group
              of N tokens they route, drop and compute the same thing (checked: outputs agree to
              float rounding). Reported: forward + backward time in
              training mode (interleaved repeats, median, ratio per repeat) and the (token, slot)
              assignments and tokens dropped; also the peer at its usual layout, one capacity group
              per sequence (8 sequences of N / 8 tokens).

With ``--device cuda`` all three parts run on the GPU and every time is wall-clock read after
synchronising the device.

Run: ``python benchmarks/moe.py`` (``--quick`` for a smoke run, ``--only peer`` for (c) alone,
``--device``, ``--threads``, ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from _teacher_student import RESULTS, machine_info, render, write_json
from _timing import DEVICE_HELP, device_info, device_option, timed
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


def _time_pair(moe: MoE, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of forward + backward: sorted dispatch, then dense (alternating)."""

    def sparse() -> None:
        (moe(x).square().mean() + moe.aux_loss()).backward()  # type: ignore[operator]

    def dense() -> None:
        dense_forward(moe, x).square().mean().backward()

    sparse(), dense()  # warm up
    times: dict[str, list[float]] = {"sparse": [], "dense": []}
    for _ in range(repeats):
        times["sparse"].append(timed(sparse, device=x.device))
        times["dense"].append(timed(dense, device=x.device))
    return statistics.median(times["sparse"]), statistics.median(times["dense"])


def dispatch(quick: bool, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for experts in (4, 16, 64):
        for top_k in (1, 2):
            torch.manual_seed(0)
            moe = MoE(128, experts, 256, top_k=top_k).to(device)
            x = torch.randn(1024 if quick else 4096, 128).to(device)
            with torch.no_grad():
                assert torch.allclose(moe(x), dense_forward(moe, x), atol=1e-5)
            s, d = _time_pair(moe, x, 3 if quick else 15)
            rows.append({"experts": experts, "top_k": top_k, "sparse_ms": 1e3 * s, "dense_ms": 1e3 * d,
                         "speedup": d / s})
    return rows


def _peer_from(peer: nn.Module, ours: MoE) -> None:
    """Give ``ours`` the peer's weights: router rows, expert matrices (transposed), biases 0."""
    with torch.no_grad():
        ours.router.weight.copy_(peer.gate.w_gating.t())  # peer: (D, E), x @ w
        ours.router.bias.zero_()
        ours.w1.copy_(peer.experts.w1.transpose(1, 2))  # peer (E, D, H) -> ours (E, H, D)
        ours.w2.copy_(peer.experts.w2.transpose(1, 2))  # peer (E, H, D) -> ours (E, D, H)
        ours.b1.zero_()
        ours.b2.zero_()


def _peer_drops(peer: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(assignments dropped, tokens with nothing served) of the peer's gate on ``x`` (B, T, D)."""
    with torch.no_grad():
        dispatch, _, _ = peer.gate(x)  # (B, T, E, capacity), 1 where a slot is served
    served = dispatch.sum(dim=(2, 3))  # (B, T)
    return int(2 * served.numel() - served.sum()), int((served == 0).sum())


def _ours_step(moe: MoE, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        (moe(x).square().mean() + moe.aux_loss()).backward()  # type: ignore[operator]
    return run


def _peer_step(moe: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        out, loss = moe(x)  # (B, T, D), the peer's balancing loss
        (out.square().mean() + loss).backward()
    return run


def peer(quick: bool, device: torch.device) -> dict[str, Any]:
    """(c): lucidrains' ``mixture-of-experts`` against ``adaptnet.MoE``, same weights, same capacity."""
    try:
        from importlib.metadata import version

        from mixture_of_experts import MoE as PeerMoE
    except ImportError:
        return {"skipped": "mixture-of-experts is not installed (pip install mixture-of-experts)"}
    tokens, dim, hidden, factor = (1024 if quick else 2048), 128, 256, 1.25
    repeats = 3 if quick else 15
    rows = []
    for experts in (4, 16):
        torch.manual_seed(0)
        # the peer's capacity factor counts slots per token, adaptnet's per assignment (top_k per token)
        theirs = PeerMoE(dim=dim, num_experts=experts, hidden_dim=hidden, activation=nn.ReLU,
                         second_policy_train="all", second_policy_eval="all", capacity_factor_train=2 * factor,
                         capacity_factor_eval=2 * factor, loss_coef=1e-2).to(device)
        ours = MoE(dim, experts, hidden, top_k=2, capacity_factor=factor, aux_loss_coef=1e-2,
                   z_loss_coef=0.0).to(device)
        _peer_from(theirs, ours)
        x = torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(experts)).to(device)
        grouped = x.reshape(8, tokens // 8, dim)  # the peer's usual layout: one capacity group per sequence
        with torch.no_grad():
            difference = float((theirs(x)[0] - ours(x)).abs().max())
        stats = ours.last_stats
        assert stats is not None
        peer_dropped, peer_tokens = _peer_drops(theirs, x)
        grouped_dropped, grouped_tokens = _peer_drops(theirs, grouped)

        arms = {"adaptnet": _ours_step(ours, x), "peer": _peer_step(theirs, x),
                "peer, 8 groups": _peer_step(theirs, grouped)}
        for fn in arms.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in arms}
        for r in range(repeats):
            names = list(arms)[r % len(arms):] + list(arms)[:r % len(arms)]  # rotate the order
            for name in names:
                times[name].append(timed(arms[name], device=device))
        ratios = [p / o for p, o in zip(times["peer"], times["adaptnet"], strict=True)]
        ratios_grouped = [p / o for p, o in zip(times["peer, 8 groups"], times["adaptnet"], strict=True)]
        rows.append({
            "experts": experts, "top_k": 2, "tokens": tokens, "capacity_per_expert": stats.capacity,
            "max_abs_output_difference": difference,
            "ms": {name: 1e3 * statistics.median(v) for name, v in times.items()},
            "peer_over_adaptnet": statistics.median(ratios),
            "peer_8_groups_over_adaptnet": statistics.median(ratios_grouped),
            "dropped_assignments": {"adaptnet": stats.dropped, "peer": peer_dropped, "peer, 8 groups": grouped_dropped},
            "dropped_tokens": {"adaptnet": stats.dropped_tokens, "peer": peer_tokens,
                               "peer, 8 groups": grouped_tokens},
        })
    return {"package": f"mixture-of-experts {version('mixture-of-experts')}", "dim": dim, "hidden": hidden,
            "capacity_factor_peer": 2 * factor, "capacity_factor_adaptnet": factor, "repeats": repeats, "rows": rows}


def peer_table(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"peer: skipped ({result['skipped']})"
    table = [("experts", "tokens", "slots/expert", "max |out diff|", "adaptnet ms", "peer ms", "peer / adaptnet",
              "peer 8 groups ms", "ratio", "dropped assignments (ours, peer, peer 8 groups)", "dropped tokens")]
    for r in result["rows"]:
        ms, d, t = r["ms"], r["dropped_assignments"], r["dropped_tokens"]
        table.append((str(r["experts"]), str(r["tokens"]), str(r["capacity_per_expert"]),
                      f"{r['max_abs_output_difference']:.1e}", f"{ms['adaptnet']:.1f}", f"{ms['peer']:.1f}",
                      f"{r['peer_over_adaptnet']:.2f}", f"{ms['peer, 8 groups']:.1f}",
                      f"{r['peer_8_groups_over_adaptnet']:.2f}",
                      f"{d['adaptnet']}, {d['peer']}, {d['peer, 8 groups']}",
                      f"{t['adaptnet']}, {t['peer']}, {t['peer, 8 groups']}"))
    return "\n".join(render(table))


def _task(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    regions, maps = torch.randn(8, 8, generator=g), torch.randn(8, 8, 8, generator=g) / 8**0.5
    x = torch.randn(5120, 8, generator=g)
    y = torch.einsum("nij,nj->ni", maps[(x @ regions.T).argmax(1)], x).tanh()
    return x[:4096], y[:4096], x[4096:], y[4096:]


def growth_run(arm: str, top_k: int, seed: int, steps: int, grow_at: int, device: torch.device) -> dict[str, Any]:
    x, y, xv, yv = (t.to(device) for t in _task(seed))
    torch.manual_seed(seed)
    moe = MoE(8, 4 if arm == "4 experts from the start" else 2, 32, top_k=top_k).to(device)
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


def growth_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
    print("\n".join(render(table)), end="\n\n")
    return runs


ARMS = ("stay at 2 experts", "4 experts from the start", "grow, preserving (copy)", "grow, preserving (random)",
        "grow, even split (preserve=False)")


def growth(quick: bool, device: torch.device) -> list[dict[str, Any]]:
    steps, grow_at = (300, 100) if quick else (1500, 300)
    return [growth_run(arm, k, seed, steps, grow_at, device) for k in (1, 2) for arm in ARMS for seed in range(3)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["dispatch", "growth", "peer"], default=None, help="run one part")
    parser.add_argument("--device", type=device_option, default=torch.device("cpu"), help=DEVICE_HELP)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"machine": {**machine_info(args.threads), **device_info(args.device)},
                               "quick": args.quick, "load_avg_at_start": [round(v, 2) for v in os.getloadavg()]}
    parts = ("dispatch", "growth", "peer") if args.only is None else (args.only,)
    if "dispatch" in parts:
        results["dispatch"] = dispatch(args.quick, args.device)
        table = [("experts", "top_k", "sorted dispatch ms", "dense ms", "dense / sorted")]
        table += [(str(r["experts"]), str(r["top_k"]), f"{r['sparse_ms']:.1f}", f"{r['dense_ms']:.1f}",
                   f"{r['speedup']:.2f}") for r in results["dispatch"]]
        print("\n".join(render(table)), end="\n\n")
    if "growth" in parts:
        results["growth"] = growth_table(growth(args.quick, args.device))
    if "peer" in parts:
        results["peer"] = peer(args.quick, args.device)
        print(peer_table(results["peer"]))
    results["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    if args.only is not None and args.out.exists():  # one part rerun: keep the others' results
        previous = json.loads(args.out.read_text())
        previous.setdefault("runs", {})[args.only] = {k: results[k] for k in ("machine", "quick", "load_avg_at_start",
                                                                              "load_avg_at_end")}
        results = {**previous, args.only: results[args.only]}
    write_json(results, args.out)
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
