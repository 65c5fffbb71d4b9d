"""Hugging Face transformers built from small configs (no download): groups, exact edits, depth, save/load."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import adaptnet as an

transformers = pytest.importorskip("transformers")  # the [hf] extra, installed by `make test`
transformers.logging.set_verbosity_error()
F64 = torch.float64
VOCAB = 40


def gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0))


def llama() -> nn.Module:  # grouped-query attention: 4 query heads share 2 key/value heads
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def llama_heads(kv: int, heads: int, attention: str = "sdpa") -> nn.Module:
    """A Llama of ``kv`` key/value heads for ``heads`` query heads of head_dim 4 (``kv=1``: multi-query)."""
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=4, vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        attn_implementation=attention)).to(F64)


def bert() -> nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=16, num_labels=3))


MODELS: dict[str, tuple[Callable[[], nn.Module], str, str, str | None]] = {
    # factory, a heads group, an MLP group, a block to deepen after (None: post-norm)
    "gpt2": (gpt2, "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.h.0"),
    "llama": (llama, "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj", "model.layers.1"),
    "bert": (bert, "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.intermediate.dense", None),
}


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = MODELS[name][0]().to(F64)
    ids = torch.randint(1, VOCAB, (2, 6))
    an.unit_groups(model, (ids,))
    return model, ids


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", list(MODELS))
def test_heads_and_mlp_widen_exactly_with_adamw_carried(name: str) -> None:
    model, ids = _build(name)
    _, heads, mlp, _ = MODELS[name]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _logits(model, ids)
    model.train()
    model(ids).logits.pow(2).mean().backward()
    opt.step()
    for group, by in ((heads, 1), (mlp, 5)):
        for init in ("zero", "net2net"):
            before = _logits(model, ids)
            an.widen(model, group, by, init=init, optimizer=opt)
            assert _relative(_logits(model, ids), before) <= 1e-8, (group, init)
    for p in model.parameters():
        for value in opt.state[p].values():
            assert not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape == p.shape
    an.prune(model, heads, keep=2, optimizer=opt)
    model.train()
    loss = model(ids).logits.pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_a_new_key_value_head_brings_its_query_heads() -> None:
    model, _ = _build("llama")
    attn = model.model.layers[0].self_attn
    assert an.unit_groups(model)["model.layers.0.self_attn.q_proj"].size == 2  # key/value heads
    an.widen(model, "model.layers.0.self_attn.q_proj", 1, init="zero")
    assert attn.k_proj.out_features == 3 * 4 and attn.q_proj.out_features == 6 * 4 and attn.o_proj.in_features == 24


def _made_of(model: nn.Module, group: an.UnitGroup) -> list[tuple[str, str, int, str, object]]:
    names = {id(m): name for name, m in model.named_modules()}
    return sorted(((names[id(sl.module)], sl.name, sl.dim, sl.role, sl.layout) for sl in group.slices), key=repr)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    model.train()
    opt.zero_grad()
    loss = model(ids).logits.pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    for p in model.parameters():
        assert all(not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape == p.shape for v in opt.state[p].values())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_multi_query_llama_traces_as_grouped_query_does_and_widens_exactly(attention: str) -> None:
    """num_key_value_heads=1: repeat_kv repeats the one key/value head for all 4 query heads. It is
    the heads group that 2 key/value heads of 4 query heads each give, of one unit; widening adds a
    key/value head with its 4 query heads, exactly, and training goes on with AdamW in sync."""
    ids = torch.randint(1, VOCAB, (2, 6))
    model, two = llama_heads(1, 4, attention), llama_heads(2, 8, attention)
    groups, groups_two = an.unit_groups(model, (ids,)), an.unit_groups(two, (ids,))
    assert list(groups) == list(groups_two)
    for name in groups:
        assert _made_of(model, groups[name]) == _made_of(two, groups_two[name]), name
    heads = "model.layers.0.self_attn.q_proj"
    assert groups[heads].size == 1 and groups_two[heads].size == 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step(model, opt, ids)
    for init in ("zero", "net2net"):
        before = _logits(model, ids)
        an.widen(model, heads, 1, init=init, optimizer=opt)
        assert _relative(_logits(model, ids), before) <= 1e-8, init
        _train_step(model, opt, ids)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == attn.v_proj.out_features == 3 * 4
    assert attn.q_proj.out_features == attn.o_proj.in_features == 3 * 4 * 4
    assert an.unit_groups(model)[heads].size == 3


def test_llama_prunes_to_one_key_value_head_and_widens_back_exactly() -> None:
    """From 2 key/value heads to 1 (multi-query attention): the prune stands, a new trace finds the
    group again, training goes on, and widening adds the key/value head back exactly."""
    model, ids = _build("llama")
    heads = "model.layers.0.self_attn.q_proj"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step(model, opt, ids)
    an.prune(model, heads, keep=1, optimizer=opt)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == 4 and attn.q_proj.out_features == 2 * 4  # one key/value head, 2 query heads
    _train_step(model, opt, ids)
    assert an.unit_groups(model)[heads].size == 1
    assert an.unit_groups(copy.deepcopy(model), (ids,))[heads].size == 1
    for init in ("zero", "net2net"):
        before = _logits(model, ids)
        an.widen(model, heads, 1, init=init, optimizer=opt)
        assert _relative(_logits(model, ids), before) <= 1e-8, init
        _train_step(model, opt, ids)
    assert an.unit_groups(model)[heads].size == 3 and attn.q_proj.out_features == 6 * 4


STREAMS = {"gpt2": "transformer.wte", "llama": "model.embed_tokens", "bert": "bert.embeddings.word_embeddings"}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_residual_stream_widens_exactly_by_any_amount_with_adamw_carried(name: str) -> None:
    model, ids = _build(name)
    stream = an.unit_groups(model)[STREAMS[name]]
    assert stream.mixed == ({"mean_square"} if name == "llama" else {"layer_norm"})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(ids).logits.pow(2).mean().backward()
    opt.step()
    before = _logits(model, ids)
    if name == "bert":  # post-norm: the LayerNorm's output is the stream; refused, nothing changed
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(an.EditError, match="post-norm"):
            an.widen(model, STREAMS[name], 3, init="zero", optimizer=opt)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert all(s["exp_avg"].shape == p.shape for p, s in opt.state.items())
        return
    for by in (1, 7, 16):
        an.widen(model, STREAMS[name], by, init="zero", optimizer=opt)
    # Llama's RMSNorm computes in float32 even in a float64 model: exact to float32 rounding there.
    assert _relative(_logits(model, ids), before) <= (1e-6 if name == "llama" else 1e-12)
    assert an.unit_groups(model)[STREAMS[name]].size == 16 + 24
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape
    if name == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight  # tied weights stay tied
        assert model.transformer.ln_f.eps == pytest.approx(1e-5 * 16 / 40)
    model.train()
    loss = model(ids).logits.pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


ONE_UNIT_REFUSED = [  # (model, group, what a new trace would find)
    ("gpt2", STREAMS["gpt2"], "no unit group"), ("llama", STREAMS["llama"], "no unit group"),
    ("gpt2", "transformer.h.1.mlp.c_fc", "a group of other tensors"),
]


@pytest.mark.parametrize(("name", "group", "found"), ONE_UNIT_REFUSED)
def test_a_prune_to_one_unit_that_a_new_trace_would_not_find_is_undone(name: str, group: str, found: str) -> None:
    """One channel of a pre-norm stream is a size-1 dim its norms' weights broadcast over (a new trace
    finds no group: it could never grow again); GPT-2's MLP of one unit loses its Conv1D weight from the
    group. The prune is undone, bit for bit; keeping 2 stands and traces again."""
    model, ids = _build(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_step(model, opt, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {id(p): s["exp_avg"].clone() for p, s in opt.state.items()}
    with pytest.raises(an.EditError, match=rf"to 1 unit: traced again, its one unit is {found}.*keep at least 2"):
        an.prune(model, group, keep=1, optimizer=opt)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(s["exp_avg"], moments[id(p)]) for p, s in opt.state.items())
    an.prune(model, group, keep=2, optimizer=opt)
    assert an.unit_groups(copy.deepcopy(model), (ids,))[group].size == 2
    _train_step(model, opt, ids)


@pytest.mark.parametrize("name", list(MODELS))
def test_deepen_is_exact_for_pre_norm_blocks_and_refused_for_post_norm(name: str) -> None:
    model, ids = _build(name)
    after = MODELS[name][3]
    if after is None:
        with pytest.raises(an.EditError, match="post-norm"):
            an.deepen(model, "bert.encoder.layer.0")
        assert len(model.bert.encoder.layer) == 2
        return
    before = _logits(model, ids)
    an.deepen(model, after)
    assert torch.equal(_logits(model, ids), before)
    first = after.rpartition(".")[0] + ".0"  # anywhere in the stack: before the first block's copy too
    an.deepen(model, first, init="fresh")
    assert torch.equal(_logits(model, ids), before)
    assert model.config.num_hidden_layers == 4
    record = an.deepen(model, first, init="copy", batch=ids)  # stacking (G_stack): not exact, reported
    assert record.max_output_change is not None and record.max_output_change > 0
    assert model.config.num_hidden_layers == 5


def test_save_and_load_a_grown_hf_model_into_a_fresh_instance(tmp_path: Path) -> None:
    model, ids = _build("llama")
    an.widen(model, "model.layers.0.self_attn.q_proj", 1, init="zero")
    an.widen(model, "model.layers.1.mlp.gate_proj", 3, init="net2net")
    an.deepen(model, "model.layers.0")
    an.save(tmp_path / "ck", model)
    fresh = llama().to(F64)
    loaded, _ = an.load(tmp_path / "ck", model=fresh)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_exact_false_still_carries_the_stream_and_falls_back_where_it_cannot() -> None:
    model, ids = _build("gpt2")
    before = _logits(model, ids)
    an.widen(model, STREAMS["gpt2"], 5, init="zero", exact=False)  # the carry is exact here: used
    assert _relative(_logits(model, ids), before) <= 1e-12
    bert, bert_ids = _build("bert")
    opt = torch.optim.AdamW(bert.parameters(), lr=1e-3)
    bert.train()
    bert(bert_ids).logits.pow(2).mean().backward()
    opt.step()  # trained norms: LayerNorm(1, 0) outputs would have mean 0, and the carry be exact even here
    before = _logits(bert, bert_ids)
    an.widen(bert, STREAMS["bert"], 3, init="zero", optimizer=opt, exact=False)  # post-norm: plain zero, inexact
    assert _relative(_logits(bert, bert_ids), before) > 1e-6
    assert an.unit_groups(bert)[STREAMS["bert"]].size == 19


def test_nn_transformer_encoder_widens_its_mlps_exactly_and_says_why_heads_and_stream_are_fixed() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to(F64)
    x = torch.randn(2, 5, 16, dtype=F64)
    groups = an.unit_groups(model, (x,))
    assert list(groups) == ["layers.0.linear1", "layers.1.linear1"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.eval()
    with torch.no_grad():
        before = model(x)
    for name in groups:
        an.widen(model, name, 7, init="zero", optimizer=opt)
        an.widen(model, name, 3, init="net2net", optimizer=opt)
    with torch.no_grad():
        assert _relative(model(x), before) <= 1e-12
    with pytest.raises(an.EditError, match="is not a unit group of TransformerEncoder \\(its tensors are fixed: "):
        an.widen(model, "layers.0.self_attn", 1)
