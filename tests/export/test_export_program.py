"""``torch.export`` and ONNX of EarlyExit, PonderNet, ACT, MoE and grown models: the program's and
onnxruntime's outputs equal eager, the graph keeps its work-skipping control flow, and the skipped
work is not done. ONNX runs on one case of each kind (each conversion takes 1-3 s)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from export_models import early_exit, grown, halting, moe
from torch import nn

ort = pytest.importorskip("onnxruntime")  # the [export] extra; make venv installs it

TOL = 1e-5
MATMULS = ("aten::addmm", "aten::mm", "aten::bmm")


def _matmuls(fn: Callable[[], Any]) -> int:
    """Matrix products that ran in ``fn`` (its cost, counted without a clock)."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in MATMULS)


def _export_and_compare(model: nn.Module, x: torch.Tensor, onnx: bool = False) -> torch.export.ExportedProgram:
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        expected = model(x)
        got = program.module()(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL
    if onnx:  # converted from the program: the model is traced once
        converted = torch.onnx.export(program, (x,), dynamo=True, verbose=False)
        assert converted is not None
        session = ort.InferenceSession(converted.model_proto.SerializeToString())
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert (torch.from_numpy(out) - expected).abs().max().item() <= TOL
    return program


def _higher_order(program: torch.export.ExportedProgram) -> set[str]:
    return {n.target.name() for n in program.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)}


@pytest.mark.parametrize("criterion", ["confidence", "entropy", "patience"])
def test_early_exit_exports_with_a_cond_per_exit(criterion: str) -> None:
    model, x = early_exit(criterion)
    with torch.no_grad():
        model(x)
    counts = model.last_stats.counts  # type: ignore[union-attr]
    assert sum(c > 0 for c in counts) >= 2, counts  # rows leave at different exits
    program = _export_and_compare(model, x, onnx=criterion == "confidence")
    assert "cond" in _higher_order(program)
    # the eager path still compacts (and records statistics) after an export
    with torch.no_grad():
        model(x)
    assert model.last_stats is not None and model.last_stats.counts == counts


def test_exported_early_exit_skips_the_blocks_nobody_needs() -> None:
    model, x = early_exit("confidence")
    program = torch.export.export(model, (x,))
    full = _matmuls(lambda: program.module()(x))
    model.threshold = 0.0  # everybody leaves at the first exit
    program = _export_and_compare(model, x)
    assert _matmuls(lambda: program.module()(x)) == 2 < full  # block 0 and head 0 only


@pytest.mark.parametrize("kind", ["ponder", "ponder_lstm", "act"])
def test_halting_exports_as_a_loop_that_stops_when_all_halted(kind: str) -> None:
    model, x = halting(kind)
    with torch.no_grad():
        model(x)
    steps = model.last_steps
    assert steps is not None and steps.min() < steps.max() < model.max_steps  # type: ignore[operator]
    program = _export_and_compare(model, x, onnx=kind != "ponder_lstm")
    assert "while_loop" in _higher_order(program)
    # the loop runs the slowest row's steps, not max_steps
    per_step = _matmuls(lambda: model.step(x, None))
    assert _matmuls(lambda: program.module()(x)) == per_step * int(steps.max())


def test_moe_exports_with_fixed_capacity_buffers() -> None:
    model, x = moe(2, 0.75)  # top-2 gates, a capacity that drops assignments
    with torch.no_grad():
        model(x)
    stats = model.last_stats
    assert stats is not None and stats.dropped > 0
    program = _export_and_compare(model, x, onnx=True)
    assert "cond" in _higher_order(program)


def test_moe_with_a_capacity_exports_with_a_free_batch() -> None:
    """The capacity is an integer expression of the number of tokens: one program serves every batch
    size, with the drops eager takes at that size."""
    model, x = moe(2, 0.75)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    converted = torch.onnx.export(program, (x,), dynamo=True, verbose=False)
    assert converted is not None
    session = ort.InferenceSession(converted.model_proto.SerializeToString())
    for batch in (2, 3, 7):
        other = torch.randn(batch, *x.shape[1:], generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(other)
            got = program.module()(other)
        assert model.last_stats is not None and model.last_stats.dropped > 0  # the capacity binds
        assert (got - expected).abs().max().item() <= TOL
        (out,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
        assert (torch.from_numpy(out) - expected).abs().max().item() <= TOL


def test_exported_dropless_moe_runs_only_the_expert_a_token_chose() -> None:
    model, _ = moe(1, None)  # top-1 (Switch) gates, dropless
    one = torch.randn(1, 8)
    program = _export_and_compare(model, one)
    # one router product, then the chosen expert's two products (of four experts)
    assert _matmuls(lambda: program.module()(one)) == 1 + 2


@pytest.mark.parametrize("kind", ["mlp", "cnn", "traced"])
def test_grown_models_export(kind: str) -> None:
    model, x = grown(kind)
    _export_and_compare(model, x, onnx=kind != "mlp")
