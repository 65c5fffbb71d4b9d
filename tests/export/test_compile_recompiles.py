"""``torch.compile``: the input-adaptive modules compile to one graph in eval; every edit costs
exactly one new graph and the steps between edits none, for adaptnet's MLP and CNN and a traced
user model, and under ``Trainer(compile=True)`` also past dynamo's limit of compiled versions per
function (``recompile_limit``, 8), after which dynamo would silently run the model eagerly.

Graphs are counted with ``torch._dynamo.utils.counters["stats"]["unique_graphs"]``. The backend
is ``"eager"``: recompiles are decided by dynamo's guards whatever the backend, and inductor's code
generation (seconds per graph on two cores) would only make the tests slow.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch
from export_models import Counter, early_exit, halting, moe
from torch import nn
from torch._dynamo.utils import counters

import adaptnet as an

EAGER = functools.partial(torch.compile, backend="eager")


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch.compiler.reset()
    counters.clear()
    yield
    torch.compiler.reset()


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _model(kind: str) -> tuple[nn.Module, torch.Tensor, str | int]:
    """(model, inputs, the group its edits widen)."""
    torch.manual_seed(0)
    if kind == "mlp":
        return an.AdaptiveMLP(4, [6, 6], 2), torch.randn(8, 4), 0
    if kind == "cnn":
        return an.AdaptiveCNN(1, [3, 3], 2), torch.randn(4, 1, 6, 6), 0
    model, x = Counter(), torch.randn(8, 6)
    an.unit_groups(model, example_inputs=(x,))
    return model, x, "fc1"


@pytest.mark.parametrize("kind", ["mlp", "cnn", "traced"])
def test_each_edit_is_one_recompile_and_steps_are_none(kind: str) -> None:
    model, x, layer = _model(kind)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    compiled = EAGER(model)
    per_edit = []
    for edit in range(5):  # within dynamo's recompile_limit: a user's own torch.compile needs no help
        before = _graphs()
        for _ in range(3):
            opt.zero_grad()
            compiled(x).square().mean().backward()
            opt.step()
            assert _graphs() == before + 1  # the first step compiles, the next ones reuse it
        per_edit.append(_graphs() - before)
        if edit % 2 and kind != "traced":
            an.deepen(model, after=0, optimizer=opt)
        else:
            an.widen(model, layer=layer, by=1, init="net2net", optimizer=opt)
    assert per_edit == [1] * 5


class EditEveryStep(an.Callback):
    """Widens the model after every second step and records the graphs compiled so far."""

    def __init__(self, layer: str | int):
        self.layer, self.graphs, self.edits = layer, [], 0

    def on_batch_end(self, trainer: an.Trainer, step: int, loss: torch.Tensor) -> None:
        self.graphs.append(_graphs())
        if step % 2 == 0:
            trainer.apply_edit(lambda m, o: an.widen(m, layer=self.layer, by=1, init="net2net", optimizer=o))
            self.edits += 1


@pytest.mark.parametrize("kind", ["mlp", "traced"])
def test_trainer_compile_recompiles_once_per_edit_past_the_limit(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "compile", EAGER)  # the Trainer calls torch.compile(module)
    model, x, layer = _model(kind)
    y = torch.randn(x.shape[0] * 6, *model(x).shape[1:])
    data = (torch.cat([x] * 6), y)
    recorder = EditEveryStep(layer)
    trainer = an.Trainer(model, torch.optim.SGD(model.parameters(), 1e-2), nn.functional.mse_loss,
                         callbacks=[recorder], compile=True, batch_size=x.shape[0], checkpoint_every=0)
    trainer.fit(data, epochs=4)  # 24 steps, 12 edits: more than recompile_limit (8)
    assert recorder.edits == 12 > torch._dynamo.config.recompile_limit
    # steps 1..24, edits after the even ones: a graph for step 1 and one for each step after an edit
    assert recorder.graphs == [1 + (s - 1) // 2 for s in range(1, 25)]


@pytest.mark.parametrize("kind", ["early_exit", "ponder", "act", "moe"])
def test_input_adaptive_modules_compile_to_one_graph_in_eval(kind: str) -> None:
    """Eval mode under torch.compile takes the traced path: no graph break (fullgraph), equal outputs."""
    model, x = {"early_exit": lambda: early_exit("patience"), "ponder": lambda: halting("ponder_lstm"),
                "act": lambda: halting("act"), "moe": lambda: moe(2, 0.75)}[kind]()
    compiled = EAGER(model, fullgraph=True)
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max() <= 1e-5
        compiled(x)
    assert _graphs() == 1
