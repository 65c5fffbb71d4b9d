"""Unit groups found by tracing: one small model per pattern, exact edits on each, bad input."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import group_models as gm
import pytest
import torch
from torch import nn

import adaptnet as an
from adaptnet.groups import macs, tracing

F64 = torch.float64
# model factory, example input, {group name: how many slices it must have at least}
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "seed": (gm.Seed, lambda: torch.randn(6, 10)),
    "convs": (gm.Convs, lambda: torch.randn(6, 3, 16)),
    "grouped": (gm.Grouped, lambda: torch.randn(6, 3, 5, 5)),
    "decoder": (gm.Decoder, lambda: torch.randn(6, 4, 3, 3)),
    "branches": (gm.Branches, lambda: torch.randn(6, 5)),
    "attention": (lambda: gm.Attention(fused=False), lambda: torch.randint(0, 11, (3, 5))),
    "fused-qkv": (lambda: gm.Attention(fused=True), lambda: torch.randint(0, 11, (3, 5))),
    "squeeze-excite": (gm.SqueezeExcite, lambda: torch.randn(6, 3, 6, 6)),
    "tokens": (gm.TokensAndPositions, lambda: torch.randn(6, 1, 8, 8)),
    "resnet": (gm.ResNet, lambda: torch.randn(6, 3, 6, 6)),
    "eager-attention": (gm.EagerAttention, lambda: torch.randn(3, 5, 16)),
}
EXPECTED_GROUPS = {
    "seed": ["fc1"],
    "convs": ["c1", "c2"],
    "grouped": ["a"],
    "decoder": ["up1"],
    "branches": ["left", "right", "fused"],
    "attention": ["embed", "q"],
    "fused-qkv": ["embed", "qkv"],
    "squeeze-excite": ["conv", "squeeze"],
    "tokens": ["patch", "mlp1"],
    "resnet": ["stem", "layers.0.conv1", "layers.1.conv1"],
    "eager-attention": ["qkv"],  # heads; head_dim indexes inside a head and is not a group
}


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    factory, make_x = CASES[name]
    torch.manual_seed(0)
    model = factory().to(F64)
    x = make_x()
    x = x.to(F64) if x.is_floating_point() else x
    an.unit_groups(model, (x,))
    return model, x


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    model.train()
    opt.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    return loss.item()


def _in_sync(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    for p, state in opt.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert value.shape == p.shape, key


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("name", list(CASES))
def test_groups_found_by_tracing(name: str) -> None:
    model, _ = _build(name)
    assert list(an.unit_groups(model)) == EXPECTED_GROUPS[name]


@pytest.mark.parametrize("name", list(CASES))
def test_every_group_widens_exactly_prunes_and_trains(name: str) -> None:
    model, x = _build(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt, x)  # optimizer state exists before the edits
    for group in list(an.unit_groups(model)):
        for init in ("net2net", "zero"):
            before = _out(model, x)
            an.widen(model, group, 2, init=init, optimizer=opt, generator=torch.Generator().manual_seed(1))
            assert _relative(_out(model, x), before) <= 1e-8, (group, init)
            _in_sync(model, opt)
        size = an.unit_groups(model)[group].size
        an.prune(model, group, amount=0.25, optimizer=opt)
        assert an.unit_groups(model)[group].size == size - round(0.25 * size)
        _in_sync(model, opt)
        assert torch.isfinite(torch.tensor(_step(model, opt, x)))
        _in_sync(model, opt)


def test_gradient_guided_inits_on_traced_groups_are_exact() -> None:
    model, x = _build("fused-qkv")
    y = torch.randint(0, 11, (3, 5))

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.flatten(0, 1), target.flatten())

    for group in ("embed", "qkv"):
        for init in ("gradmax", "firefly"):  # firefly splits the heads whose gradients disagree most
            before = _out(model, x)
            an.widen(model, group, 2, init=init, batch=(x, y), loss_fn=loss_fn)
            assert _relative(_out(model, x), before) <= 1e-8


def test_a_head_is_one_unit_in_q_k_v_and_the_output_projection() -> None:
    for fused in (False, True):
        model, _ = _build("fused-qkv" if fused else "attention")
        heads = an.unit_groups(model)["qkv" if fused else "q"]
        assert heads.size == 4
        an.widen(model, heads.name, 1, init="zero")
        projection = model.qkv.weight.shape[0] if fused else model.q.weight.shape[0]
        assert projection == (3 if fused else 1) * 5 * 4  # 5 heads of head_dim 4
        assert model.o.in_features == 20


ONE_HEAD: dict[str, Callable[[int], nn.Module]] = {  # heads -> a model with head_dim 4, heads by view(b, t, -1, 4)
    "matmul": lambda heads: gm.Attention(fused=False, d=4 * heads, heads=heads, sdpa=False),
    "matmul-fused": lambda heads: gm.Attention(fused=True, d=4 * heads, heads=heads, sdpa=False),
    "sdpa": lambda heads: gm.Attention(fused=False, d=4 * heads, heads=heads),
    "sdpa-fused": lambda heads: gm.Attention(fused=True, d=4 * heads, heads=heads),
    "unbind": lambda heads: gm.EagerAttention(d=4 * heads, head_dim=4),  # view(b, t, 3, -1, 4), matmul
}


@pytest.mark.parametrize("name", list(ONE_HEAD))
def test_one_head_written_by_hand_is_a_group_of_heads_as_several_are(name: str) -> None:
    """The view's size-1 heads dim counts heads: one head gives the groups two heads give (the
    heads, not head_dim, which the view writes down), and widening it adds heads, exactly."""
    def build(heads: int) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        model = ONE_HEAD[name](heads).to(F64)
        x = torch.randn(3, 5, 4 * heads, dtype=F64) if name == "unbind" else torch.randint(0, 11, (3, 5))
        an.unit_groups(model, (x,))
        return model, x

    def made_of(group: an.UnitGroup) -> list[tuple[str, int, str]]:
        return sorted((f"{type(sl.module).__name__}.{sl.name}", sl.dim, sl.role) for sl in group.slices)

    model, x = build(1)
    two, _ = build(2)
    heads_group = "qkv" if "fused" in name or name == "unbind" else "q"
    groups = an.unit_groups(model)
    assert list(groups) == list(an.unit_groups(two)) == ([heads_group] if name == "unbind" else ["embed", heads_group])
    for group in groups:
        assert made_of(groups[group]) == made_of(an.unit_groups(two)[group])
    assert groups[heads_group].size == 1 and an.unit_groups(two)[heads_group].size == 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt, x)  # optimizer state exists before the edits
    for group in groups:
        for init in ("net2net", "zero"):
            before = _out(model, x)
            an.widen(model, group, 2, init=init, optimizer=opt, generator=torch.Generator().manual_seed(1))
            assert _relative(_out(model, x), before) <= 1e-8, (group, init)
            _in_sync(model, opt)
            assert torch.isfinite(torch.tensor(_step(model, opt, x)))
            _in_sync(model, opt)
    assert an.unit_groups(model)[heads_group].size == 5  # 1 + 2 + 2 heads of head_dim 4
    assert model.o.in_features == 5 * 4


def test_channels_of_grouped_convs_are_tied_across_groups() -> None:
    model, _ = _build("convs")
    an.widen(model, "c2", 2, init="net2net")  # a depthwise conv: its channels are the groups
    assert (model.dw.groups, model.dw.in_channels, model.dw.out_channels) == (10, 10, 10)
    assert model.bn.num_features == 10 and model.c2.out_channels == 10
    assert model.fc.in_features == 10 * 16  # flatten: a channel owns H * W columns
    grouped, _ = _build("grouped")
    assert an.unit_groups(grouped)["a"].size == 2  # 2 groups of 4 input channels each
    an.widen(grouped, "a", 1, init="zero")
    assert (grouped.a.out_channels, grouped.grouped.groups, grouped.grouped.in_channels) == (12, 3, 12)
    assert grouped.grouped.out_channels == 9 and grouped.head.in_features == 9


def test_parameters_used_directly_and_gates_are_slices() -> None:
    model, _ = _build("tokens")
    stream = an.unit_groups(model)["patch"]
    names = {(type(s.module).__name__, s.name, s.role) for s in stream.slices}
    assert ("TokensAndPositions", "cls", "norm") in names and ("TokensAndPositions", "pos", "norm") in names
    se, _ = _build("squeeze-excite")
    channel = an.unit_groups(se)["conv"]
    assert {(s.module, s.role) for s in channel.slices} >= {(se.excite, "out"), (se.squeeze, "in")}


def test_input_and_output_dimensions_are_never_groups() -> None:
    model, _ = _build("seed")
    found = tracing.trace(model)
    assert found.fixed["fc1.weight[1]"] == "a model input"
    assert found.fixed["fc2.weight[0]"] == "a model output"


def test_norms_mix_their_units_and_refuse_inexact_inits() -> None:
    torch.manual_seed(0)
    model = gm.Norms().to(F64)
    x = torch.randn(4, 6, dtype=F64)
    groups = an.unit_groups(model, (x,))
    assert (groups["a"].mixed == {"layer_norm"} and "rms_norm" in groups["b"].mixed) or "mean" in groups["b"].mixed
    assert groups["c"].mixed == {"group_norm"}
    with pytest.raises(an.EditError, match="exact=False"):
        an.widen(model, "c", 1, init="zero")
    with pytest.raises(an.EditError, match="exact=False"):
        an.widen(model, "a", 3, init="net2net")  # copies change the LayerNorm's mean and variance
    before = _out(model, x)
    an.widen(model, "a", groups["a"].size, init="net2net")  # every unit copied once: LayerNorm stays exact
    assert _relative(_out(model, x), before) <= 1e-8
    # zero carries the mean (LayerNorm) or zeros (RMSNorm) into new units, eps and scale corrected
    eps = model.ln.eps
    an.widen(model, "a", 3, init="zero")
    an.widen(model, "b", 5, init="zero")
    assert _relative(_out(model, x), before) <= 1e-8
    assert model.ln.eps == pytest.approx(eps * 16 / 19) and model.rms.eps == pytest.approx(
        torch.finfo(F64).eps * 8 / 13)
    an.widen(model, "c", 1, init="zero", exact=False)  # one unit per GroupNorm group
    assert model.gn.num_channels == 6 and model.c.out_channels == 6


def test_zero_carries_a_stream_with_a_concatenated_cls_token_and_an_added_position_table() -> None:
    torch.manual_seed(0)
    model, x = gm.PreNormTokens().to(F64), torch.randn(3, 1, 8, 8, dtype=F64)
    stream = next(iter(an.unit_groups(model, (x,))))
    before = _out(model, x)
    an.widen(model, stream, 3, init="zero")
    assert _relative(_out(model, x), before) <= 1e-12
    for table in (model.cls, model.pos):  # stream content: the new channels hold each row's mean
        assert torch.allclose(table[..., 8:], table[..., :8].mean(-1, keepdim=True).expand(-1, -1, 3))


def test_tied_weights_are_one_slice_carried_by_zero_and_refuse_copies() -> None:
    torch.manual_seed(0)
    model = gm.Tied().to(F64)
    ids = torch.randint(0, 12, (2, 3))
    groups = an.unit_groups(model, (ids,))
    assert groups["embed"].tied == ("embed.weight",)
    with pytest.raises(an.EditError, match="tied weights"):
        an.widen(model, "embed", 2, init="net2net")
    before = _out(model, ids)
    an.widen(model, "embed", 2, init="zero")  # new channels are zero in the embedding, so in the head too
    assert _relative(_out(model, ids), before) <= 1e-12
    an.widen(model, "embed", 2, init="random")
    assert model.out.weight is model.embed.weight and model.embed.weight.shape == (12, 12)


@pytest.mark.parametrize(("name", "after"), [("resnet", "layers.0"), ("stack", "blocks.1")])
def test_deepen_inserts_an_exact_copy_of_a_residual_block(name: str, after: str) -> None:
    if name == "stack":
        torch.manual_seed(0)
        model, x = gm.ResidualStack().to(F64), torch.randn(4, 5, dtype=F64)
        an.unit_groups(model, (x,))
    else:
        model, x = _build(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt, x)
    before = _out(model, x)
    edit = an.deepen(model, after, optimizer=opt)
    assert torch.equal(_out(model, x), before)
    _in_sync(model, opt)
    container = model.get_submodule(after.rpartition(".")[0])
    assert len(container) == 3 and edit.group == f"{after.rpartition('.')[0]}.{int(after[-1]) + 1}"
    _step(model, opt, x)
    _in_sync(model, opt)


def test_deepen_refuses_a_block_that_is_not_residual() -> None:
    model, x = gm.PostNorm(), torch.randn(3, 8)
    an.unit_groups(model, (x,))
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(an.EditError, match=r"not residual.*post-norm"):
        an.deepen(model, "blocks.0")
    assert len(model.blocks) == 2
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))


def test_trace_once_per_structure(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]
    real = tracing.graph_of

    def counting(*args: Any) -> Any:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(tracing, "graph_of", counting)
    model, x = gm.ResidualStack(), torch.randn(4, 5)
    an.unit_groups(model, (x,))
    an.widen(model, "stem", 8)  # a multiple of the units: exact under the blocks' LayerNorm
    an.prune(model, "blocks.0.up", keep=5)
    assert calls[0] == 3  # the first edit of each group is checked by tracing again
    an.widen(model, "stem", 16)
    an.prune(model, "blocks.0.up", keep=4)
    an.unit_groups(model)
    assert calls[0] == 3  # later ones change sizes only, read back from the tensors
    an.deepen(model, "blocks.1")
    an.unit_groups(model)
    assert calls[0] == 4  # new modules: traced again, with the example inputs kept


def test_save_and_load_into_a_fresh_instance(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = gm.ResidualStack(), torch.randn(4, 5)
    an.unit_groups(model, (x,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, opt, x)
    an.widen(model, "stem", 3, optimizer=opt, exact=False)
    an.deepen(model, "blocks.0", optimizer=opt)
    an.prune(model, "blocks.2.up", keep=7, optimizer=opt)
    _step(model, opt, x)
    an.save(tmp_path / "ck", model, optimizer=opt)
    loaded, state = an.load(tmp_path / "ck", model=gm.ResidualStack())
    assert torch.equal(_out(loaded, x), _out(model, x))
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    an.restore_optimizer(opt2, loaded, state["optimizer"])
    _step(model, opt, x)
    _step(loaded, opt2, x)
    assert torch.equal(_out(loaded, x), _out(model, x))  # the optimizer state came back too


def test_loading_into_a_different_model_names_the_first_differing_group(tmp_path: Path) -> None:
    model, x = gm.Seed(), torch.randn(2, 10)
    an.unit_groups(model, (x,))
    an.widen(model, "fc1", 2)
    an.save(tmp_path / "ck", model)
    other = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 1))
    with pytest.raises(an.CheckpointError, match="has no unit group 'fc1'"):
        an.load(tmp_path / "ck", model=other)
    with pytest.raises(an.CheckpointError, match="pass model="):
        an.load(tmp_path / "ck")


@pytest.mark.parametrize("heads", [4, 1])
def test_a_size_written_into_the_code_is_caught_and_undone(heads: int) -> None:
    torch.manual_seed(0)
    # 4 tokens: view(b, -1, heads, 4) takes one more head as more tokens (one head: as 8 tokens,
    # which no longer traces into groups at all)
    model, x = gm.FixedHeads(d=4 * heads, heads=heads), torch.randn(2, 4, 4 * heads)
    an.unit_groups(model, (x,))
    before = _out(model, x)
    with pytest.raises(an.EditError, match=r"(its unit groups differ|no longer traces as it did).*no longer offered"
                                           r".*undone"):
        an.widen(model, "q", 1, init="zero", exact=False)
    assert model.q.out_features == 4 * heads and torch.equal(_out(model, x), before)
    assert "q" not in an.unit_groups(model)  # a policy will not pick it again
    with pytest.raises(an.EditError, match="'q' is not a unit group"):
        an.prune(model, "q", keep=3)


def test_a_model_of_torch_layers_alone_is_not_run_after_an_edit_but_a_shape_it_holds_is() -> None:
    """An nn.Sequential of torch's layers takes every size from its tensors: its edit skips the run
    on the example inputs (a forward pass, as for adaptnet's own models). An Unflatten holds a shape:
    with one in the model the run stays, and catches the edit the shape forbids."""
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    unflat = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Unflatten(1, (2, 4)), nn.Flatten(),
                           nn.Linear(8, 2))
    for model in (plain, unflat):
        an.unit_groups(model, (x,))
    runs = {id(plain): 0, id(unflat): 0}
    for model in (plain, unflat):
        model.register_forward_pre_hook(lambda module, args: runs.__setitem__(id(module), runs[id(module)] + 1))
    an.widen(plain, "0", 2, init="net2net")
    an.widen(plain, "2", 2, init="net2net")
    assert runs[id(plain)] == 0 and plain[2].out_features == 10
    an.widen(unflat, "0", 2, init="net2net")  # read by a Linear only: fine
    assert runs[id(unflat)] >= 1
    # the graph shows (2, 4) as two units of 4 channels, but the Unflatten holds (2, 4): undone
    assert an.unit_groups(unflat)["2"].size == 2
    before = _out(unflat, x)
    with pytest.raises(an.EditError, match="undone"):
        an.widen(unflat, "2", 1, init="zero")
    assert unflat[2].out_features == 8 and torch.equal(_out(unflat, x), before)


@pytest.mark.parametrize("init", ["net2net", "zero"])
def test_policies_leave_alone_groups_their_init_cannot_grow_exactly(init: str) -> None:
    torch.manual_seed(0)
    model, x = gm.ResidualStack(), torch.randn(64, 5)
    y = x[:, :2].sin()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    policy = an.GrowEvery(every=1, by=2, where="round_robin", init=init)
    trainer = an.Trainer(model, opt, nn.functional.mse_loss, policies=[policy], batch_size=16, progress=False)
    trainer.fit((x, y), epochs=3)
    ups = model.blocks[0].up.out_features + model.blocks[1].up.out_features
    if init == "net2net":  # copies of 2 of the stream's 8 channels change its LayerNorms: not grown
        assert model.stem.out_features == 8 and ups == 2 * 16 + 3 * 2
    else:  # zero carries the stream's mean into new channels: the stream grows too
        assert model.stem.out_features == 10 and ups == 2 * 16 + 2 * 2


def test_deepen_refuses_a_block_that_changes_the_stream_shape() -> None:
    torch.manual_seed(0)
    model, x = gm.Convs(), torch.randn(2, 3, 16)
    an.unit_groups(model, (x,))
    stack = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6))
    an.unit_groups(stack, (torch.randn(2, 4),))
    with pytest.raises(an.EditError, match="not residual: the model does not run with a copy"):
        an.deepen(stack, "0")
    assert len(stack) == 2


def test_bad_input_gets_one_clear_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), gm.DataDependent())
    where = r"could not trace Sequential \(in module '1', DataDependent\).*control flow"
    with pytest.raises(an.EditError, match=where):
        an.unit_groups(model, (torch.randn(2, 4),))
    seed, _ = _build("seed")
    fixed = r"\(its tensors are fixed: a model output\)"
    with pytest.raises(an.EditError, match=rf"'fc2' is not a unit group of Seed {fixed}; nearest: fc1"):
        an.widen(seed, "fc2", 1)
    with pytest.raises(an.EditError, match="needs example inputs"):
        an.widen(gm.Seed(), "fc1", 1)
    hard = gm.HardCoded()
    an.unit_groups(hard, (torch.randn(2, 4),))
    with pytest.raises(an.EditError, match=r"outputs are \[\(3, 2\)\], not \[\(2, 2\)\]; the edit is undone"):
        an.widen(hard, "fc1", 1, exact=False)
    assert hard.fc1.out_features == 6


@pytest.mark.parametrize("name", ["seed", "convs", "resnet", "tokens"])
def test_macs_counted_from_the_graph_match_measured_ones_and_predict_growth(name: str) -> None:
    model, x = _build(name)
    assert macs(model) == an.count_macs(model, x)  # Linear and Conv products only in these models
    group = next(iter(an.unit_groups(model)))
    predicted = macs(model, {group: 2})
    an.widen(model, group, 2, init="zero", exact=False)
    assert macs(model) == predicted == an.count_macs(model, x)


def test_macs_count_attention_products() -> None:
    model, x = _build("attention")
    t, d, heads = 5, 16, 4
    attention = 2 * heads * t * t * (d // heads)  # q k^T and weights v, per sample
    assert macs(model) == an.count_macs(model, x) + attention


@pytest.mark.parametrize("name", list(ONE_HEAD))
def test_heads_prune_to_one_head_which_trains_traces_again_and_widens_back_exactly(name: str) -> None:
    """One head traces as several do, so a prune may leave one: the group stays offered (one unit,
    found again by a new trace), training goes on, and widening adds heads back exactly."""
    torch.manual_seed(0)
    model = ONE_HEAD[name](3).to(F64)
    x = torch.randn(3, 5, 12, dtype=F64) if name == "unbind" else torch.randint(0, 11, (3, 5))
    heads = "qkv" if "fused" in name or name == "unbind" else "q"
    names = list(an.unit_groups(model, (x,)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt, x)
    an.prune(model, heads, keep=1, optimizer=opt)
    _in_sync(model, opt)
    assert torch.isfinite(torch.tensor(_step(model, opt, x)))
    _in_sync(model, opt)
    assert list(an.unit_groups(model)) == names and an.unit_groups(model)[heads].size == 1
    again = an.unit_groups(copy.deepcopy(model), (x,))  # a new trace, as after a depth edit or a load
    assert list(again) == names and again[heads].size == 1
    for init in ("zero", "net2net"):
        before = _out(model, x)
        an.widen(model, heads, 1, init=init, optimizer=opt, generator=torch.Generator().manual_seed(1))
        assert _relative(_out(model, x), before) <= 1e-8, init
        _in_sync(model, opt)
        assert torch.isfinite(torch.tensor(_step(model, opt, x)))
    assert an.unit_groups(model)[heads].size == 3 and model.o.in_features == 3 * 4


def test_one_conv_group_is_not_left_by_a_prune() -> None:
    """One group of a grouped (here depthwise) conv traces as a plain conv, whose channels are no
    longer one group: the groups would change under the user's feet, so prune keeps two."""
    torch.manual_seed(0)
    convs = gm.Convs()
    groups = an.unit_groups(convs, (torch.randn(2, 3, 16),))
    depthwise = next(name for name, g in groups.items() if any(sl.module is convs.dw for sl in g.slices))
    with pytest.raises(an.EditError, match=r"one group of a grouped convolution.*keep at least 2"):
        an.prune(convs, depthwise, keep=1)
    an.prune(convs, depthwise, keep=2)
    an.widen(convs, depthwise, 3, init="zero")
    assert convs.dw.groups == convs.dw.out_channels == 5


# How grouped-query attention shares its key/value heads: repeated for the query heads by expand and
# reshape (Hugging Face's repeat_kv) into SDPA or into matmuls (HF's eager attention), or left to SDPA.
SHARED_KV = {"repeat-sdpa": {}, "repeat-matmul": {"matmul": True}, "sdpa-gqa": {"sdpa_gqa": True}}


def _made_of(model: nn.Module, group: an.UnitGroup) -> list[tuple[str, str, int, str, Any]]:
    """A group's slices by module name, tensor, dim, role and layout (where its units lie)."""
    names = {id(m): name for name, m in model.named_modules()}
    return sorted(((names[id(sl.module)], sl.name, sl.dim, sl.role, sl.layout) for sl in group.slices), key=repr)


@pytest.mark.parametrize("rep", [1, 2, 3])
@pytest.mark.parametrize("how", list(SHARED_KV))
def test_one_key_value_head_shared_by_all_query_heads_is_a_group_as_two_are(how: str, rep: int) -> None:
    """Multi-query attention: one key/value head, repeated by repeat_kv for all query heads (a size-1
    dim merged with the copies expand made) or shared by SDPA, traces as two key/value heads do: the
    same group, of one unit (the key/value head with its query heads). Widening adds a key/value
    head with its query heads, exactly, and training goes on with the optimizer in sync."""
    x = torch.randn(3, 5, 16, dtype=F64)

    def build(kv: int) -> nn.Module:
        torch.manual_seed(0)
        model = gm.GroupedQuery(kv=kv, rep=rep, **SHARED_KV[how]).to(F64)
        an.unit_groups(model, (x,))
        return model

    model, two = build(1), build(2)
    groups = an.unit_groups(model)
    assert list(groups) == list(an.unit_groups(two)) == ["q"]
    assert _made_of(model, groups["q"]) == _made_of(two, an.unit_groups(two)["q"])
    assert groups["q"].size == 1 and an.unit_groups(two)["q"].size == 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt, x)  # optimizer state exists before the edits
    for init in ("zero", "net2net"):
        before = _out(model, x)
        an.widen(model, "q", 1, init=init, optimizer=opt, generator=torch.Generator().manual_seed(1))
        assert _relative(_out(model, x), before) <= 1e-8, init
        _in_sync(model, opt)
        assert torch.isfinite(torch.tensor(_step(model, opt, x)))
        _in_sync(model, opt)
    assert an.unit_groups(model)["q"].size == 3 and an.unit_groups(copy.deepcopy(model), (x,))["q"].size == 3
    assert model.k.out_features == model.v.out_features == 3 * 4  # a key/value head of head_dim 4 each
    assert model.q.out_features == model.o.in_features == 3 * rep * 4  # with its rep query heads


@pytest.mark.parametrize("how", list(SHARED_KV))
def test_grouped_query_prunes_to_one_key_value_head_which_trains_traces_again_and_widens_back(how: str) -> None:
    """One key/value head traces as several do, however it is shared, so a prune may leave one: it
    stands, training goes on, a new trace finds the group again, and widening adds heads back exactly."""
    x = torch.randn(3, 5, 16, dtype=F64)
    torch.manual_seed(0)
    model = gm.GroupedQuery(**SHARED_KV[how]).to(F64)
    assert an.unit_groups(model, (x,))["q"].size == 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, opt, x)
    an.prune(model, "q", keep=1, optimizer=opt)
    assert model.k.out_features == 4 and model.q.out_features == 8  # one key/value head, its two query heads
    _in_sync(model, opt)
    assert torch.isfinite(torch.tensor(_step(model, opt, x)))
    assert an.unit_groups(model)["q"].size == 1
    assert an.unit_groups(copy.deepcopy(model), (x,))["q"].size == 1  # a new trace, as after a load
    for init in ("zero", "net2net"):
        before = _out(model, x)
        an.widen(model, "q", 1, init=init, optimizer=opt, generator=torch.Generator().manual_seed(1))
        assert _relative(_out(model, x), before) <= 1e-8, init
        _in_sync(model, opt)
        assert torch.isfinite(torch.tensor(_step(model, opt, x)))
    assert an.unit_groups(model)["q"].size == 3 and model.q.out_features == model.o.in_features == 24


def test_gradmax_where_its_probe_cannot_run_says_so_in_an_edit_error() -> None:
    torch.manual_seed(0)
    model, x = gm.HardCoded(), torch.randn(4, 4)
    an.unit_groups(model, (x,))
    batch = (x, model(x).detach())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(an.EditError, match="needs a layer that reads the units"):  # summed: no reader
        an.widen(model, "fc1", 2, init="gradmax", batch=batch, loss_fn=nn.functional.mse_loss, exact=False)
    with pytest.raises(an.EditError, match="probe units added, the model's forward fails"):  # view(-1, 2, 3)
        an.widen(model, "fc1#2", 2, init="gradmax", batch=batch, loss_fn=nn.functional.mse_loss, exact=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
