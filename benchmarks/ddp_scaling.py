"""DDP scaling: Trainer samples/s with 1 and 2 processes, and the cost of one edit under DDP.

Launches itself with ``python -m torch.distributed.run --nproc_per_node=N`` (gloo, CPU,
127.0.0.1, one thread per process) for N in 1, 2. Each rank trains a 784-1024-1024-10
AdaptiveMLP (Adam, ``--batch`` rows per rank and step) for ``--steps`` steps; samples/s count
all ranks' rows over the steps after the first ``WARMUP``. Then each rank times one
``widen(layer 0, by 64)`` as the Trainer applies it (drop the DDP wrapper, edit with the
optimizer carried, build a new DDP wrapper, which broadcasts the parameters), relative to the
median training step; the re-wrap alone (drop the wrapper, build a new one) is timed too.
The edit includes the two probe-loss evaluations (256 rows) the Trainer logs with each event.

Run: ``python benchmarks/ddp_scaling.py`` (``--quick`` for a smoke run; ``--out`` for the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ddp_scaling.json"
IN, HIDDEN, OUT, WARMUP = 784, 1024, 10, 3


def _worker(options: dict[str, Any]) -> None:
    import adaptnet as an
    from adaptnet.policy import EditRequest
    from adaptnet.train import _rng
    from adaptnet.train.callbacks import Callback
    from adaptnet.train.trainer import Trainer

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch, steps = options["batch"], options["steps"]

    class Clock(Callback):
        def __init__(self) -> None:
            self.times = [time.perf_counter()]

        def on_batch_end(self, trainer: Trainer, step: int, loss: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

    torch.manual_seed(0)
    model = an.AdaptiveMLP(IN, [HIDDEN, HIDDEN], OUT)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    clock = Clock()
    trainer = Trainer(model, opt, nn.functional.cross_entropy, callbacks=[clock], batch_size=batch, device="cpu",
                      probe_size=256)
    g = torch.Generator().manual_seed(1)
    n = batch * world * steps
    x, y = torch.randn(n, IN, generator=g), torch.randint(0, OUT, (n,), generator=g)
    clock.times = [time.perf_counter()]
    trainer.fit((x, y), epochs=1)
    durations = [b - a for a, b in zip(clock.times[:-1], clock.times[1:], strict=True)][WARMUP:]
    step_s = statistics.median(durations)
    samples_per_s = batch * world * len(durations) / sum(durations)

    probe = (x[:256], y[:256])
    edit_s = []
    for i in range(options["edits"]):
        if trainer.dist is not None:
            trainer.dist.barrier()
        began = time.perf_counter()
        trainer._edit(EditRequest("widen", 0, by=64, init="net2net"), probe, _rng.generator(0, i))
        edit_s.append(time.perf_counter() - began)
    rewrap_s = []  # the wrapper alone: drop it and build a new one (DDP broadcasts the parameters)
    for _ in range(options["edits"]):
        if trainer.dist is not None:
            trainer.dist.barrier()
        began = time.perf_counter()
        trainer._unwrap()
        trainer._wrap()
        rewrap_s.append(time.perf_counter() - began)
    if int(os.environ.get("RANK", "0")) == 0:
        result = {"world_size": world, "samples_per_s": samples_per_s, "median_step_s": step_s,
                  "edit_s": statistics.median(edit_s), "edit_over_step": statistics.median(edit_s) / step_s,
                  "rewrap_s": statistics.median(rewrap_s), "rewrap_over_step": statistics.median(rewrap_s) / step_s,
                  "widths_after": list(trainer.model.widths)}
        Path(options["result"]).write_text(json.dumps(result))
    # No destroy_process_group(): on torch 2.13 + gloo it intermittently hung one rank at exit.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(nproc: int, options: dict[str, Any], result: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(Path(__file__).resolve()),
           "--worker", json.dumps({**options, "result": str(result)})]
    subprocess.run(cmd, env=env, check=True)
    return dict(json.loads(result.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke run)")
    parser.add_argument("--batch", type=int, default=128, help="rows per rank and step")
    parser.add_argument("--repeats", type=int, default=2, help="runs per world size (alternating)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return
    options = {"batch": args.batch, "steps": 8 if args.quick else 40, "edits": 2 if args.quick else 5}
    load_at_start = os.getloadavg()  # other jobs share this machine: record how busy it was
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for repeat in range(1 if args.quick else args.repeats):
        for nproc in (1, 2):
            result = args.out.with_name(f".ddp_scaling_{nproc}.json")
            runs[nproc].append(_launch(nproc, options, result))
            result.unlink()
            print(f"repeat {repeat + 1}, {nproc} process(es): {runs[nproc][-1]}", flush=True)
    best = {n: max(r, key=lambda d: d["samples_per_s"]) for n, r in runs.items()}
    summary = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_avg_at_start": load_at_start, "load_avg_at_end": os.getloadavg()},
        "options": options, "runs": runs,
        "speedup_2_over_1": best[2]["samples_per_s"] / best[1]["samples_per_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("speedup_2_over_1",)}), f"-> {args.out}")


if __name__ == "__main__":
    main()
