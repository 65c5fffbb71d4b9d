"""The Hugging Face Trainer callback: growth inside trainer.train() with the Trainer's optimizer carried,
the LR scheduler kept, the config updated for from_pretrained, and a resume from the Trainer's checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import adaptnet as an

transformers = pytest.importorskip("transformers")  # the [hf] extra, installed by `make test`
from adaptnet.integrations.transformers import AdaptnetCallback, from_pretrained, sync_config  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB, T = 32, 8
HEADS0, MLP0, HEADS1, MLP1 = 1, 2, 3, 4  # group indices of the GPT-2 below: wte, h.0.attn, h.0.mlp, h.1.attn, h.1.mlp


def gpt2() -> Any:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=4, n_inner=32, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
        eos_token_id=0))


class Tokens(torch.utils.data.Dataset):
    """Sequences that count up modulo VOCAB from a random start: learnable next-token prediction."""

    def __init__(self, n: int):
        starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(1))
        self.ids = (starts + torch.arange(T)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Steps(transformers.TrainerCallback):
    """Checks, before every optimizer step, that the optimizer holds the model's current parameters."""

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                              **kw: Any) -> None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert held == {id(p) for p in model.parameters() if p.requires_grad}
        for p in model.parameters():
            avg = optimizer.state.get(p, {}).get("exp_avg")
            assert avg is None or avg.shape == p.shape


def _trainer(model: Any, out: Path, cb: AdaptnetCallback, epochs: int) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=8, learning_rate=1e-2,
        eval_strategy="epoch", save_strategy="epoch", logging_steps=1, report_to=[], use_cpu=True,
        lr_scheduler_type="linear", disable_tqdm=True, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(32), eval_dataset=Tokens(16),
                                callbacks=[cb, Steps()])


def _policies() -> list[an.Policy]:
    return [an.GrowEvery(every=1, by=8, where=MLP0), an.GrowEvery(every=1, by=8, where=MLP1)]


def test_grows_during_train_and_from_pretrained_rebuilds_it(tmp_path: Path) -> None:
    model = gpt2()
    cb = AdaptnetCallback(_policies())
    trainer = _trainer(model, tmp_path / "run", cb, epochs=2)
    trainer.train()
    assert model.config.n_inner == 48 and cb.reasons == []  # both MLPs grew alike: the config says it
    assert len(cb.events) == 4 and "val_loss" in cb.history and "train_loss" in cb.history
    assert plain(trainer.lr_scheduler.optimizer) is plain(trainer.optimizer)  # the same scheduler, same optimizer
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)  # linear decay ran to its end
    model.save_pretrained(tmp_path / "saved")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "saved")
    ids = Tokens(4).ids
    model.eval()
    assert torch.equal(again(ids).logits, model(ids).logits)
    # The Trainer's own checkpoints carry adaptnet.json: rebuilt by adaptnet too.
    rebuilt = from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "run" / "checkpoint-8")
    assert torch.equal(rebuilt(ids).logits, model(ids).logits)


def plain(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)


def test_a_width_no_config_can_say_is_named_and_still_loads(tmp_path: Path) -> None:
    model = gpt2()
    cb = AdaptnetCallback([an.GrowEvery(every=1, by=8, where=MLP0), an.GrowEvery(every=1, by=1, where=HEADS0),
                           an.GrowEvery(every=1, by=1, where=HEADS1)])
    _trainer(model, tmp_path / "run", cb, epochs=1).train()
    assert any("MLP widths (n_inner) differ" in r for r in cb.reasons)
    assert any("5 heads of size 4 next to a residual width of 16" in r for r in cb.reasons)
    folder = tmp_path / "run" / "checkpoint-4"
    with pytest.raises(Exception, match=r"mismatched_sizes|size mismatch"):
        transformers.GPT2LMHeadModel.from_pretrained(folder)
    rebuilt = from_pretrained(transformers.GPT2LMHeadModel, folder)
    ids = Tokens(4).ids
    model.eval()
    assert torch.equal(rebuilt(ids).logits, model(ids).logits)


def test_resume_from_the_trainers_checkpoint_with_the_grown_shapes(tmp_path: Path) -> None:
    first = AdaptnetCallback(_policies())
    _trainer(gpt2(), tmp_path / "run", first, epochs=1).train()
    cb = AdaptnetCallback(_policies())
    fresh = cb.resume(gpt2(), tmp_path / "run" / "checkpoint-4")
    assert fresh.config.n_inner == 40
    _trainer(fresh, tmp_path / "run", cb, epochs=2).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert fresh.config.n_inner == 48 and len(cb.events) == 4 and cb.runner.decisions == 2


def test_llama_config_follows_heads_and_layers() -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=16))
    ids = Tokens(2).ids
    an.unit_groups(model, (ids,))
    for layer in (0, 1):
        an.widen(model, f"model.layers.{layer}.self_attn.q_proj", 1, init="zero")
    an.deepen(model, "model.layers.1")
    assert sync_config(model) == []
    c = model.config
    assert (c.num_key_value_heads, c.num_attention_heads, c.head_dim, c.num_hidden_layers) == (3, 6, 4, 3)
    rebuilt = transformers.LlamaForCausalLM(c)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_several_processes_are_refused_at_the_start() -> None:
    from types import SimpleNamespace

    cb = AdaptnetCallback(_policies())
    with pytest.raises(ValueError, match="runs in one process; this run has 2"):
        cb.on_train_begin(SimpleNamespace(world_size=2), None, None, model=gpt2())
