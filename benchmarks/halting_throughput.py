"""Halting at inference: does active-set compaction turn fewer ponder steps into throughput?

A batch of 256 parity inputs (16 entries in {-1, 0, 1}, see ``parity.py``) through a recurrent
halting model in eval mode, one intra-op thread (``torch.set_num_threads(1)``), no autograd
(``torch.inference_mode``). Two models:

  gru512  ``RecurrentStep(16, 512, 2, cell="gru")``, untrained (seed 0), large enough that the
          GRU cell dominates the cost. The halting head's weights are scaled so that halting
          differs per sample, and its bias is calibrated so that the mean number of ponder
          steps is ``--fraction`` (default 0.4) of ``max_steps`` (20).
  parity  ``RecurrentStep(16, 128, 2, cell="gru")`` trained on parity by ``parity.py``'s
          harness (seed 0, interpolation split) for at most ``--parity-seconds``.

Arms, timed side by side in the same run (each repeat times every arm one after the other;
the median over repeats is reported):

  adaptnet        ``PonderNet`` eval forward: deterministic halting, halted rows leave the batch
  masked          the same step, decisions and output, written as a loop that runs the whole batch
                  until every sample has halted and masks the halted rows (what public code does)
  adaptnet-sampl  ``PonderNet(mode="sampled")`` with the same weights
  labml           ``labml_nn.adaptive_computation.ponder_net.ParityPonderGRU`` (labml-nn), weights
                  copied from the same step (one output logit: the logit difference), ``is_halt``
                  on: sampled halting, a masked loop until all samples halted
  adaptnet-act    ``ACT`` with the cell of the next arm (its first-step flag input included)
  pact            ``pytorch_adaptive_computation_time.AdaptiveGRUCell`` (ACT, masked loop until all
                  halted), same size, halting bias set to the calibrated bias

Speed-ups are ratios of medians within the run. Arms that sample draw their own random
numbers, so they are compared on samples/s and the steps they took, not on outputs.
With ``--device cuda`` the models and the batch live on the GPU (the parity model still trains on
the CPU) and every time is wall-clock read after synchronising the device; the steady column is
then that same clock (on the CPU it is the CPU time of the timing thread).

Run: ``python benchmarks/halting_throughput.py`` (``--quick`` for a smoke run, ``--device``,
``--repeats``, ``--batch``, ``--fraction``, ``--parity-seconds``, ``--out``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from _teacher_student import RESULTS, finish, machine_info, render
from _timing import DEVICE_HELP, device_info, device_option, steady_clock, steady_clock_name, timed
from adaptnet.nn.halting import ACT, PonderNet, RecurrentStep
from parity import DEFAULTS as PARITY_DEFAULTS
from parity import ELEMENTS, SPLITS, fit, parity_data

DEFAULT_OUT = RESULTS / "halting_throughput.json"
Arm = Callable[[torch.Tensor], Any]


def masked_loop(net: PonderNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic PonderNet halting without compaction: every step runs on the whole batch
    until the last sample halts; halted rows keep their output. Returns (output, steps)."""
    batch, n_max = x.shape[0], net.max_steps
    h = None
    survive = x.new_ones(batch)
    done = torch.zeros(batch, dtype=torch.bool, device=x.device)
    steps = torch.zeros(batch, dtype=torch.long, device=x.device)
    out: torch.Tensor | None = None
    for n in range(n_max):
        h, y, halt = net.step(x, h)
        survive = survive * (1 - torch.sigmoid(halt.reshape(batch)))
        new = ~done if n == n_max - 1 else (survive <= 0.5) & ~done
        out = torch.where(new[:, None], y, y if out is None else out)
        steps = torch.where(new, n + 1, steps)
        done = done | new
        if bool(done.all()):
            break
    assert out is not None
    return out, steps


class FlagStep(nn.Module):
    """pytorch-adaptive-computation-time's cell as an adaptnet step: input plus a first-step flag."""

    def __init__(self, cell: nn.GRUCell, halt: nn.Linear, output: nn.Linear):
        super().__init__()
        self.cell, self.halt, self.output = cell, halt, output

    def forward(self, x: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flag = x.new_full((x.shape[0], 1), 1.0 if h is None else 0.0)
        h = self.cell(torch.cat([x, flag], dim=1), h)
        return h, self.output(h), self.halt(h).squeeze(1)


def calibrate(net: PonderNet, x: torch.Tensor, fraction: float) -> float:
    """Set the halting bias so that the mean deterministic ponder steps is ``fraction * max_steps``."""
    lo, hi = -10.0, 10.0
    for _ in range(30):
        mid = (lo + hi) / 2
        net.step.halt.bias.fill_(mid)
        net(x)
        assert net.last_steps is not None
        if float(net.last_steps.float().mean()) > fraction * net.max_steps:
            lo = mid  # too many steps: halt more eagerly
        else:
            hi = mid
    net.step.halt.bias.fill_(hi)
    return hi


def gru512(hidden: int, max_steps: int, x: torch.Tensor, fraction: float, halt_scale: float) -> PonderNet:
    torch.manual_seed(0)
    net = PonderNet(RecurrentStep(ELEMENTS, hidden, 2, cell="gru"), max_steps=max_steps).eval().to(x.device)
    net.step.halt.weight.mul_(halt_scale)  # spread the halting logits across samples
    calibrate(net, x, fraction)
    return net


def trained_parity(path: Path | None, seconds: float) -> tuple[PonderNet, dict[str, Any]]:
    """The parity model: loaded from ``path`` (saved by ``parity.py --save-models``), else trained here."""
    config = {**PARITY_DEFAULTS, "budget_s": seconds}
    net = PonderNet(RecurrentStep(ELEMENTS, config["hidden"], 2, cell="gru"), max_steps=config["max_steps"],
                    lambda_p=config["lambda_p"], beta=config["beta"])
    if path is not None:
        net.load_state_dict(load_file(str(path)))
        info: dict[str, Any] = {"loaded_from": str(path)}
    else:
        row, trained = fit("pondernet", "interpolation", 0, config)
        net.load_state_dict(trained.state_dict())
        info = {k: row[k] for k in ("iters", "train_seconds", "train_cpu_seconds")}
    x, y = parity_data(10_000, SPLITS["interpolation"]["test"], torch.Generator().manual_seed(20_000))
    net.eval()
    with torch.inference_mode():
        info["test_accuracy"] = float((net(x).argmax(dim=1) == y).float().mean())
    assert net.last_steps is not None
    info["mean_ponder_steps"] = float(net.last_steps.float().mean())
    return net, info


def peers(net: PonderNet) -> dict[str, nn.Module]:
    """labml's ParityPonderGRU and pytorch-adaptive-computation-time's AdaptiveGRUCell at the size of
    ``net``, on its device; arms whose package is missing are left out (the reason is printed)."""
    hidden, found, device = net.step.sizes[1], {}, next(net.parameters()).device
    try:
        from labml_nn.adaptive_computation.ponder_net import ParityPonderGRU
    except ImportError as err:
        print(f"labml-nn not importable, arm left out: {err}")
    else:
        labml = ParityPonderGRU(ELEMENTS, hidden, net.max_steps).eval().to(device)
        labml.gru.load_state_dict(net.step.cell.state_dict())
        labml.lambda_layer.load_state_dict(net.step.halt.state_dict())
        w, b = net.step.output.weight, net.step.output.bias
        labml.output_layer.weight.copy_(w[1:] - w[:1])  # logit of class 1 against class 0
        labml.output_layer.bias.copy_(b[1:] - b[:1])
        labml.is_halt = True
        found["labml"] = labml
    try:
        from pytorch_adaptive_computation_time.models import AdaptiveGRUCell
    except ImportError as err:
        print(f"pytorch-adaptive-computation-time not importable, arm left out: {err}")
    else:
        pact = AdaptiveGRUCell(ELEMENTS, hidden, time_penalty=0.01, initial_halting_bias=float(net.step.halt.bias),
                               time_limit=net.max_steps + 1).eval().to(device)  # runs <= time_limit - 1 steps
        pact._halting_unit[0].weight.copy_(net.step.halt.weight)
        found["pact"] = pact
    return found


StepsOf = Callable[[torch.Tensor], tuple[float | None, int]]


def arms(net: PonderNet) -> tuple[dict[str, Arm], dict[str, StepsOf]]:
    """Callables to time, and for each a function giving (mean steps per sample or None where the
    arm does not say, steps its loop ran) on a batch."""
    sampled = PonderNet(net.step, net.max_steps, net.lambda_p, net.beta, mode="sampled").eval()
    timed_arms: dict[str, Arm] = {"adaptnet": net, "masked": lambda x: masked_loop(net, x), "adaptnet-sampl": sampled}
    steps_of: dict[str, StepsOf] = {"adaptnet": lambda x: _steps(net, x), "masked": lambda x: _summary(
        masked_loop(net, x)[1]), "adaptnet-sampl": lambda x: _steps(sampled, x)}
    found = peers(net)
    if "labml" in found:
        labml = found["labml"]
        timed_arms["labml"] = labml
        steps_of["labml"] = lambda x: (None, int(labml(x)[0].shape[0]))  # its loop length (plus one GRU call)
    if "pact" in found:
        pact = found["pact"]
        act = ACT(FlagStep(pact._cell, pact._halting_unit[0], net.step.output), max_steps=net.max_steps).eval()
        timed_arms["adaptnet-act"] = act
        timed_arms["pact"] = pact
        steps_of["adaptnet-act"] = lambda x: _steps(act, x)
        # it returns steps + 1 for samples that reach its limit: clamp to the steps it ran
        steps_of["pact"] = lambda x: _summary(pact(x)[2].clamp(max=pact.time_limit - 1))
    return timed_arms, steps_of


def _summary(steps: torch.Tensor) -> tuple[float, int]:
    return float(steps.float().mean()), int(steps.max())


def _steps(net: PonderNet | ACT, x: torch.Tensor) -> tuple[float, int]:
    net(x)
    assert net.last_steps is not None
    return _summary(net.last_steps)


def compare(net: PonderNet, x: torch.Tensor) -> dict[str, Any]:
    """adaptnet's output and decisions against the masked loop's on the same batch."""
    out = net(x)
    assert net.last_steps is not None
    ref, steps = masked_loop(net, x)
    return {"max_abs_output_diff": float((out - ref).abs().max()),
            "decisions_differ": int((net.last_steps != steps).sum()),
            "mean_steps": float(steps.float().mean()), "max_steps_in_batch": int(steps.max()),
            "steps_histogram": torch.bincount(steps, minlength=net.max_steps + 1)[1:].tolist()}


def measure(net: PonderNet, x: torch.Tensor, repeats: int, inner: int) -> dict[str, Any]:
    """Median wall-clock and steady time (``_timing.steady_clock``) per batch of every arm, interleaved."""
    timed_arms, steps_of = arms(net)
    for fn in timed_arms.values():  # warm-up
        fn(x)
    clock = steady_clock(x.device)
    wall: dict[str, list[float]] = {name: [] for name in timed_arms}
    steady: dict[str, list[float]] = {name: [] for name in timed_arms}
    for _ in range(repeats):
        for name, fn in timed_arms.items():

            def run(fn: Arm = fn, name: str = name) -> None:
                start = clock()  # inside timed(), after its gc.collect() and synchronisation
                for _ in range(inner):
                    fn(x)
                steady[name].append((clock() - start) / inner)

            wall[name].append(timed(run, device=x.device) / inner)
    median = {name: statistics.median(v) for name, v in wall.items()}
    median_steady = {name: statistics.median(v) for name, v in steady.items()}
    steps = {name: fn(x) for name, fn in steps_of.items()}
    return {
        "ms_per_batch": {k: round(1e3 * v, 3) for k, v in median.items()},
        "steady_ms_per_batch": {k: round(1e3 * v, 3) for k, v in median_steady.items()},
        "samples_per_s": {k: round(x.shape[0] / v, 1) for k, v in median.items()},
        "mean_steps": {k: None if v[0] is None else round(v[0], 3) for k, v in steps.items()},
        "loop_steps": {k: v[1] for k, v in steps.items()},
        "speedup_adaptnet_over_masked": median["masked"] / median["adaptnet"],
        "steady_speedup_adaptnet_over_masked": median_steady["masked"] / median_steady["adaptnet"],
        "speedup_adaptnet_over": {k: round(v / median["adaptnet"], 3) for k, v in median.items()},
        "steady_speedup_adaptnet_over": {k: round(v / median_steady["adaptnet"], 3) for k, v in median_steady.items()},
        "all_repeats_ms": {k: [round(1e3 * t, 3) for t in v] for k, v in wall.items()},
        "all_repeats_steady_ms": {k: [round(1e3 * t, 3) for t in v] for k, v in steady.items()},
    }


def table(results: dict[str, Any]) -> str:
    m, steady = results["machine"], "CUDA-synced" if "gpu" in results["machine"] else "CPU"
    lines = [f"halting_throughput: torch {m['torch']}, threads {m['threads']}, CPUs {m['cpu_count']} "
             f"({m['cpus_usable']} usable), {m['cpu']}" + (f"; timed on {m['gpu']}" if "gpu" in m else "")
             + f"; load average {results['load_avg_at_start']} -> {results['load_avg_at_end']}"]
    for name, r in results["models"].items():
        c = r["check"]
        lines += ["", f"== {name}: {r['description']}; batch {results['config']['batch']}, max_steps "
                      f"{r['max_steps']}; median of {results['config']['repeats']} repeats",
                  f"adaptnet vs masked: mean steps {c['mean_steps']:.2f}, slowest sample {c['max_steps_in_batch']}, "
                  f"decisions differing {c['decisions_differ']}, max |output diff| {c['max_abs_output_diff']:.2e}",
                  f"steps histogram (1..{r['max_steps']}): {c['steps_histogram']}", ""]
        rows = [("arm", "ms/batch", f"{steady} ms/batch", "samples/s", "mean steps", "loop steps",
                 f"adaptnet speed-up over it (wall, {steady})")]
        t = r["timing"]
        for arm, ms in t["ms_per_batch"].items():
            mean = t["mean_steps"][arm]
            rows.append((arm, f"{ms:.2f}", f"{t['steady_ms_per_batch'][arm]:.2f}", f"{t['samples_per_s'][arm]:.0f}",
                         "-" if mean is None else f"{mean:.2f}", str(t["loop_steps"][arm]),
                         f"{t['speedup_adaptnet_over'][arm]:.2f}x, {t['steady_speedup_adaptnet_over'][arm]:.2f}x"))
        lines += render(rows)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--device", type=device_option, default=torch.device("cpu"), help=DEVICE_HELP)
    parser.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 9; 2 with --quick)")
    parser.add_argument("--fraction", type=float, default=0.4, help="gru512 mean steps / max_steps (default 0.4)")
    parser.add_argument("--parity-seconds", type=float, default=600.0,
                        help="training budget of the parity model (default 600; 30 with --quick)")
    parser.add_argument("--parity-model", type=Path, default=None, metavar="FILE",
                        help="trained parity weights (parity.py --save-models writes pondernet_interpolation_0"
                             ".safetensors); trained here when left out")
    parser.add_argument("--models", choices=["gru512", "parity", "all"], default="all", help="default all")
    parser.add_argument("--quick", action="store_true", help="smoke run: hidden 128 instead of 512, 2 repeats")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 9)
    if repeats < 1 or args.batch < 1 or not 0 < args.fraction <= 1:
        parser.error("--repeats and --batch must be positive, --fraction in (0, 1]")
    torch.set_num_threads(1)
    load_at_start = [round(v, 2) for v in os.getloadavg()]
    started = time.perf_counter()
    x, _ = parity_data(args.batch, (1, ELEMENTS), torch.Generator().manual_seed(1))
    x = x.to(args.device)
    hidden, halt_scale = (128 if args.quick else 512), 8.0
    models: dict[str, Any] = {}
    if args.models in ("gru512", "all"):
        with torch.inference_mode():
            big = gru512(hidden, 20, x, args.fraction, halt_scale)
            models["gru512"] = {"description": f"RecurrentStep(16, {hidden}, 2, 'gru'), untrained, halting weights "
                                               f"x{halt_scale}, bias {float(big.step.halt.bias):.3f}",
                                "max_steps": big.max_steps, "check": compare(big, x),
                                "timing": measure(big, x, repeats, 1 if not args.quick else 2)}
    if args.models in ("parity", "all"):
        small, trained = trained_parity(args.parity_model, 30.0 if args.quick else args.parity_seconds)
        small.to(args.device)
        with torch.inference_mode():
            models["parity"] = {"description": f"RecurrentStep(16, {small.step.sizes[1]}, 2, 'gru') trained on parity "
                                               f"(test accuracy {trained['test_accuracy']:.4f})",
                                "max_steps": small.max_steps, "trained": trained, "check": compare(small, x),
                                "timing": measure(small, x, repeats, 10)}
    results: dict[str, Any] = {
        "benchmark": "halting_throughput",
        "command": " ".join(["python", "benchmarks/halting_throughput.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**machine_info(torch.get_num_threads()), **device_info(args.device)},
        "steady_clock": steady_clock_name(args.device), "load_avg_at_start": load_at_start,
        "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
        "config": {"batch": args.batch, "repeats": repeats, "fraction": args.fraction, "quick": args.quick,
                   "inference_mode": True},
        "models": models,
    }
    return finish(results, started, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
