"""The GPU check: the ``gpu`` tests, then the early-exit, halting and MoE benchmarks on CUDA, in one run.

Run it on a machine with an NVIDIA GPU and a torch built with CUDA (``make gpu-check``, which uses
``$(GPU_PYTHON)``, default ``python3``: the Makefile's virtual environment pins the CPU build of
torch). adaptnet is taken from ``src/`` when it is not installed. Steps, each a subprocess whose
output is shown and kept:

  tests        ``pytest -m gpu`` on the test files that hold ``gpu`` tests
  early_exit   ``benchmarks/early_exit.py --device cuda`` (three tasks, batches 1 to 1024)
  halting      ``benchmarks/halting_throughput.py --device cuda`` (the parity model trains on the
               CPU for ``--parity-seconds``, 60 here)
  moe          ``benchmarks/moe.py --device cuda`` (dispatch, expert growth; the peer arm when
               ``mixture-of-experts`` is installed)

Each benchmark's JSON, every step's log and a summary (``gpu_check.md``: the GPU, each step's exit
code and time) go to ``--out-dir`` (default ``benchmarks/results/gpu``). The exit code is 0 when
every step passed, 1 otherwise, 2 when there is no CUDA device (nothing runs). ``--device cpu`` runs
the same steps on the CPU (a dry run of the script itself); ``--quick`` passes ``--quick`` to the
benchmarks.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def gpu_test_files() -> list[str]:
    """The test files that mark tests ``gpu`` (pytest -m gpu needs no other file to be collected:
    the others may import packages that a GPU machine's Python lacks)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text())


def steps(device: str, quick: bool, out: Path) -> dict[str, list[str]]:
    python, extra = sys.executable, ["--quick"] if quick else []
    return {
        "tests": [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *gpu_test_files()],
        "early_exit": [python, str(BENCH / "early_exit.py"), "--device", device, "--out", str(out / "early_exit.json"),
                       *extra],
        "halting": [python, str(BENCH / "halting_throughput.py"), "--device", device, "--parity-seconds", "60",
                    "--out", str(out / "halting_throughput.json"), *extra],
        "moe": [python, str(BENCH / "moe.py"), "--device", device, "--out", str(out / "moe.json"), *extra],
    }


def run_step(name: str, command: list[str], out: Path, env: dict[str, str]) -> tuple[int, float]:
    """Run one step, showing its output as it comes and keeping it in ``out/NAME.log``."""
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with open(out / f"{name}.log", "w") as log, subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            log.write(line)
    return proc.returncode, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (default), or cpu for a dry run of the steps")
    parser.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks (smoke runs)")
    parser.add_argument("--out-dir", type=Path, default=BENCH / "results" / "gpu",
                        help="where the JSON, the logs and gpu_check.md go (default benchmarks/results/gpu)")
    parser.add_argument("--only", choices=["tests", "early_exit", "halting", "moe"], action="append",
                        help="run these steps only (repeatable; default all)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: this torch ({torch.__version__}, built with CUDA {torch.version.cuda}) sees no CUDA "
              "device; run it on a machine with an NVIDIA GPU (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (dry run)"
    print(f"gpu-check on {where}; torch {torch.__version__}; results in {out}", flush=True)
    results = {name: run_step(name, command, out, env) for name, command in steps(args.device, args.quick, out).items()
               if args.only is None or name in args.only}
    lines = [f"# gpu-check on {where}", "",
             f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}, "
             f"{'--quick' if args.quick else 'full'} benchmarks, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "", "| step | exit code | seconds |", "| --- | --- | --- |",
             *(f"| {name} | {rc} | {seconds:.0f} |" for name, (rc, seconds) in results.items())]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    failed = [name for name, (rc, _) in results.items() if rc != 0]
    print("\n" + "\n".join(lines) + ("\n\nfailed: " + ", ".join(failed) if failed else "\n\nall steps passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
