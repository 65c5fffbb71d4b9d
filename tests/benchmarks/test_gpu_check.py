"""``make gpu-check`` (benchmarks/gpu_check.py): refuses in one line where there is no CUDA device,
and its steps, summary and logs work (a dry run on the CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_refuses_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    done = _run("--out-dir", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "sees no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_benchmarks_refuse_a_device_they_cannot_time(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe.py"), "--device", "tpu:0", "--out",
                           str(tmp_path / "moe.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--device" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "moe.json").exists()


def test_a_dry_run_on_the_cpu_runs_the_gpu_tests_step_and_writes_the_summary(tmp_path: Path) -> None:
    done = _run("--device", "cpu", "--only", "tests", "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:]
    log = (tmp_path / "tests.log").read_text()
    assert "tests/nn/test_on_device.py" in done.stdout  # the files with gpu tests are the ones collected
    assert "skipped" in log  # no CUDA here: the gpu tests were collected and skipped
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "| tests | 0 |" in summary and "CPU (dry run)" in summary
