"""``adaptnet export RUN_DIR --format onnx|pt2``: the latest checkpoint's model as a file other runtimes load.

``pt2`` is a ``torch.export`` program (``torch.export.load``); ``onnx`` is converted from that
program by ``torch.onnx.export(..., dynamo=True)`` (the ``[export]`` extra). The model is exported
in eval mode on an example batch whose shape comes from the checkpoint and the run's config (or
``--input-shape``), with the batch dimension left free where the model allows it. Before saying
it is done, the command runs the written file on the example and compares it with the model.
A run of a user's own class (``model.target``) is rebuilt from its config only with ``--trust-code``,
as ``resume`` and ``inspect`` do.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptnet.cli._common import CLIError
from adaptnet.cli.inspect_run import locate
from adaptnet.nn import AdaptiveCNN, MoE
from adaptnet.train.rundir import CONFIG

HELP = "export the model of a run's latest checkpoint to ONNX or a torch.export program (.pt2)"
FORMATS = ("onnx", "pt2")
BATCH = 2  # rows of the example batch (export treats a size of 1 as a constant)
TOL = 1e-4  # what the written file may differ from the model by on the example batch


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help=HELP, description=HELP + ".")
    parser.add_argument("path", metavar="RUN_DIR", help="a run directory (its newest loadable checkpoint) or a "
                        "checkpoint folder")
    parser.add_argument("--format", required=True, metavar="FORMAT", help="onnx or pt2")
    parser.add_argument("--out", metavar="FILE", help="where to write (default: RUN_DIR/model.FORMAT)")
    parser.add_argument("--input-shape", metavar="SHAPE",
                        help="one input sample's shape, e.g. 64 or 1,8,8 (default: from the checkpoint and config)")
    parser.add_argument("--trust-code", action="store_true",
                        help="import the model.target that the run's config.yaml names (it runs that code)")
    return parser


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise CLIError(f"--input-shape {text!r}: must be positive integers separated by commas, e.g. 1,8,8")
    return shape


def _config_image_shape(run_dir: Path | None) -> tuple[int, ...] | None:
    """The images' ``(C, H, W)`` of the run's data, for a CNN (which accepts any size)."""
    if run_dir is None or not (run_dir / CONFIG).is_file():
        return None
    from adaptnet.train.build import load_splits
    from adaptnet.train.config import load_config

    shape = load_splits(load_config(run_dir / CONFIG)).info.image_shape
    return None if shape is None else tuple(shape)


def sample_shape(model: nn.Module, run_dir: Path | None) -> tuple[int, ...]:
    """One input sample's shape: from the data for a CNN, the model's own example, an MoE's token
    size, or the first Linear layer's input size."""
    if isinstance(model, AdaptiveCNN) and (shape := _config_image_shape(run_dir)) is not None:
        return shape
    example = getattr(model, "example_inputs", None)
    if callable(example):
        return tuple(example()[0].shape[1:])
    if isinstance(model, MoE):
        return (model.dim,)
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise CLIError(f"cannot tell what input a {type(model).__name__} takes; pass --input-shape")
    return (first.in_features,)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence what torch logs while exporting (torchvision ops it skips, deprecations inside torch,
    the graph it traced before a failure): a failure is reported in one line by the caller."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # torch's loggers set their own levels: only this reaches them all
    try:
        # torch.export prints the partial graph of a failed trace to sys.stderr itself
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def export_program(model: nn.Module, x: torch.Tensor) -> tuple[torch.export.ExportedProgram, bool]:
    """``(program, batch_is_free)``: the batch dimension is left free when the model allows it
    (else the program is for the example's batch size only)."""
    batch = torch.export.Dim("batch")
    try:
        return torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), True
    except Exception:  # a batch-size constraint (or any failure: the static export below reports it)
        pass
    try:
        return torch.export.export(model, (x,)), False
    except Exception as err:
        raise CLIError(f"the {type(model).__name__} cannot be exported with torch.export: {_first_line(err)}") from err


def _write_onnx(program: torch.export.ExportedProgram, x: torch.Tensor, out: Path, expected: torch.Tensor) -> float:
    try:
        import onnxruntime
    except ImportError as err:
        raise CLIError("--format onnx needs onnx, onnxscript and onnxruntime: pip install 'adaptnet[export]'") from err
    try:
        converted = torch.onnx.export(program, (x,), dynamo=True, verbose=False)
    except Exception as err:
        raise CLIError(f"the exported program cannot be converted to ONNX: {_first_line(err)}") from err
    assert converted is not None  # dynamo=True always returns the program
    converted.save(str(out))
    session = onnxruntime.InferenceSession(str(out))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return float((torch.from_numpy(got) - expected).abs().max())


def _write_pt2(program: torch.export.ExportedProgram, x: torch.Tensor, out: Path, expected: torch.Tensor) -> float:
    torch.export.save(program, out)
    loaded = torch.export.load(out)  # what a user of the file gets
    with torch.no_grad():
        return float((loaded.module()(x) - expected).abs().max())


def run(args: argparse.Namespace) -> int:
    fmt = str(args.format).lower()
    if fmt not in FORMATS:
        raise CLIError(f"--format {args.format!r}: must be one of {', '.join(FORMATS)}")
    checkpoint, run_dir, model, _state, _skipped = locate(Path(args.path), args.trust_code)
    run_dir = run_dir if run_dir is not None else (Path(args.path) if (Path(args.path) / CONFIG).is_file() else None)
    out = Path(args.out) if args.out else (run_dir or checkpoint) / f"model.{fmt}"
    if out.is_dir():
        raise CLIError(f"--out {out}: is a directory; give a file name")
    shape = _parse_shape(args.input_shape) if args.input_shape else sample_shape(model, run_dir)
    model = model.cpu().eval()
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    x = torch.randn(BATCH, *shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    try:
        with torch.no_grad():
            expected = model(x)
    except Exception as err:  # the input shape does not fit the model
        raise CLIError(f"the {type(model).__name__} does not run on inputs of shape {(BATCH, *shape)}: "
                       f"{_first_line(err)}; pass --input-shape") from err
    writers: dict[str, Any] = {"onnx": _write_onnx, "pt2": _write_pt2}
    with _quiet():
        program, free = export_program(model, x)
        out.parent.mkdir(parents=True, exist_ok=True)
        diff = writers[fmt](program, x, out, expected)
    if not diff <= TOL:  # also catches NaN
        out.unlink(missing_ok=True)
        raise CLIError(f"the written {fmt} file's outputs differ from the model's by {diff:.3g} (more than "
                       f"{TOL:g}); nothing written")
    batch = "B" if free else str(BATCH)
    print(f"wrote {out} ({fmt}, {type(model).__name__} from {checkpoint.name}, input ({batch}, "
          f"{', '.join(map(str, shape))}), max |output - model| {diff:.2g} on an example batch)")
    return 0
