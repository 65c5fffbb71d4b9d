"""Timing shared by the benchmarks, on the CPU or on a CUDA device."""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import torch

DEVICE_HELP = "where the timed work runs: cpu (default) or cuda[:N]; CUDA timing synchronises the device"


def device_option(text: str) -> torch.device:
    """``--device`` of the benchmarks: ``cpu`` or an available ``cuda[:N]``, refused in one line otherwise."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; allowed: cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks time cpu or cuda[:N] only")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no CUDA device")
        if (device.index or 0) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``: CUDA kernels run asynchronously, so a clock read right
    after a launch would time the launch, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_clock(device: torch.device) -> Callable[[], float]:
    """The clock that other load cannot inflate: this thread's CPU time on the CPU (time spent
    descheduled on a shared machine does not count; with one intra-op thread all the work runs on
    it), wall-clock read after a device synchronisation on CUDA (the CPU only launches the work)."""
    if device.type == "cuda":

        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return clock
    return time.thread_time


def steady_clock_name(device: torch.device) -> str:
    return "CUDA-synchronised wall-clock" if device.type == "cuda" else "CPU time of the timing thread"


def device_info(device: torch.device) -> dict[str, Any]:
    """What the JSON of a run records about the device it timed on."""
    if device.type != "cuda":
        return {"device": "cpu"}
    props = torch.cuda.get_device_properties(device)
    return {"device": str(device), "gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda}


def timed(fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter,
          device: torch.device | None = None) -> float:
    """Seconds ``fn`` takes on ``clock`` (wall-clock by default; ``time.process_time`` for this
    process's CPU time), garbage collection off while it runs, as timeit does; on a CUDA ``device``
    the work queued before is finished first and the work ``fn`` queued is included."""
    gc.collect()
    gc.disable()
    try:
        if device is not None:
            synchronize(device)
        start = clock()
        fn()
        if device is not None:
            synchronize(device)
        return clock() - start
    finally:
        gc.enable()
