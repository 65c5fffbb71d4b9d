"""Edit fuzzer: random models, optimizers, training and edits, every action checked.

Each case draws, from its seed, a model in float64 (adaptnet's ``AdaptiveMLP``/``AdaptiveCNN`` with
residual blocks, or a user's model traced by adaptnet: an MLP class, a pre-norm residual stack in an
``nn.Sequential``, a conv net with BatchNorm and depthwise convs, a hand-written attention with
``view(b, t, -1, head_dim)``, an ``nn.Sequential`` of torch's layers, a net around one of
adaptnet's input-adaptive modules (EarlyExit, PonderNet, ACT, MoE), and a tiny Hugging Face GPT-2
or Llama when ``transformers`` imports),
an optimizer adaptnet carries (SGD with momentum, Adam, AdamW, NAdam, RAdam, Adamax, RMSprop,
Adagrad), then a random sequence of actions: training steps, widen (every init), prune (amount,
keep, units; magnitude, taylor), deepen and remove_layer (by index on adaptnet's models, by block
name on a user's stacks), and invalid requests. After every action:

* an exact edit (widen with ``net2net``/``firefly``/``zero``/``gradmax``, deepen) kept the outputs
  (relative change <= 1e-8, eval mode; 1e-5 for Llama's stream, whose RMSNorm computes in float32);
  an exact init that adaptnet refuses with ``EditError`` is accepted (and counted), and so is
  ``exact=False`` where the group's units are mixed or tied; a prune to one unit that a new trace
  would not find as the same group (a pre-norm stream of one channel; GPT-2's MLP of one unit, whose
  ``Conv1D`` weight column then reads as a broadcast) is refused unchanged, and counted;
* a widen or prune changed the group's size by what was asked, and left every parameter outside
  the group (values and ``.grad``) bit-identical; ``Edit.max_output_change`` is the change measured;
* the optimizer holds exactly the model's parameters, with per-element state (and ``.grad``)
  shaped like them; module size attributes agree with the tensors; everything is still float64;
* a training step (on a copy of model and optimizer) gives a finite loss;
* an invalid request raises ``adaptnet.EditError`` and leaves parameters, grads, buffers, module
  attributes, unit groups and optimizer state bit-identical.

Widths stay bounded (at most 64 units a group, fewer for wide units such as heads; at most 6
layers), so that no sequence grows by itself. A failing case prints its seed, case number and
the actions up to the failure, then the run goes on; rerun one case with ``--seed S --case N``.
Bugs found and reported but not fixed yet are listed in ``KNOWN``: the cases that show them are
left out unless ``--check-known`` is given.

    python tests/fuzz/fuzz_edits.py --seconds 180 --seed 1     # make fuzz-edits
    python tests/fuzz/fuzz_edits.py --seed 0 --case 17 -v      # one case, every action printed
    python tests/fuzz/fuzz_edits.py --seconds 60 --check-known # the known bugs, still there?

Case ``N`` of seed ``S`` derives from ``random.Random(f"{S}/{N}")`` alone. Exit status: 0 when
every case passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import re
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "edit"))  # the edit tests' snapshot and invariant helpers

from edit_checks import assert_identical, capture, check_dtype_device, check_optimizer_in_sync  # noqa: E402

import adaptnet as an  # noqa: E402
from adaptnet.edit.depth import depth_edits  # noqa: E402
from adaptnet.edit.init import carry_kind  # noqa: E402
from adaptnet.nn import ACTIVATIONS, ResidualBlock  # noqa: E402

F64 = torch.float64
TOL = 1e-8  # relative output change allowed for an exact edit, in float64
# Hugging Face's LlamaRMSNorm computes in float32 whatever the model's dtype: an exact widen of the
# stream it normalises (units copied equally often) changes the float32 rounding of its mean.
TOL_F32 = 1e-5
MAX_UNITS = 64  # units of a group (wide units, such as heads: at most MAX_ENTRIES entries in all)
MAX_ENTRIES = 256
MAX_DEPTH = 6  # hidden layers of adaptnet's models, blocks of a user's stack
EXACT_INITS = ("net2net", "firefly", "zero", "gradmax")
INITS = (*EXACT_INITS, "random")
MEAN_LIKE = {"layer_norm", "rms_norm", "group_norm", "mean", "var", "std", "var_mean", "std_mean"}
REFUSED_EXACT = "cannot keep the function"  # the message of an exact init refused by a group
REFUSED_ONE = "to 1 unit: traced again"  # the message of a prune to one unit whose group would vanish


# Bugs this fuzzer found in adaptnet, reported and not yet fixed: the cases that show them are left
# out (or their check skipped) unless --check-known is given. Remove an entry once it is fixed.
# A case that shows one skips it with ``if ... and not CHECK_KNOWN:  # KNOWN["name"]``. None open now.
KNOWN: dict[str, str] = {}
CHECK_KNOWN = False  # --check-known


class Failure(Exception):
    """A check failed: the case is reported."""


# -- a user's models (traced by adaptnet) -------------------------------------------------------
class UserMLP(nn.Module):
    """A plain MLP class with a forward of its own: fc1 -> act -> fc2 (-> act -> fc3 ...)."""

    def __init__(self, n_in: int, hidden: list[int], n_out: int, act: str):
        super().__init__()
        sizes = [n_in, *hidden, n_out]
        self.n = len(sizes) - 1
        for i in range(self.n):
            setattr(self, f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))
        self.act = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "gelu": nn.GELU(), "silu": nn.SiLU()}[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.n):
            x = self.act(getattr(self, f"fc{i}")(x))
        return getattr(self, f"fc{self.n}")(x)


class PreNormBlock(nn.Module):
    """x + down(gelu(up(norm(x)))): a pre-norm residual block (LayerNorm, RMSNorm or none)."""

    def __init__(self, d: int, hidden: int, norm: str | None):
        super().__init__()
        self.norm = nn.LayerNorm(d) if norm == "layer" else nn.RMSNorm(d) if norm == "rms" else nn.Identity()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class ResidualStack(nn.Module):
    """stem -> nn.Sequential of pre-norm residual blocks -> head."""

    def __init__(self, n_in: int, d: int, hidden: list[int], n_out: int, norm: str | None):
        super().__init__()
        self.stem = nn.Linear(n_in, d)
        self.blocks = nn.Sequential(*(PreNormBlock(d, h, norm) for h in hidden))
        self.head = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class InvertedResidual(nn.Module):
    """x + bn3(pw2(relu(bn2(dw(relu(bn1(pw1(x)))))))): a MobileNet-style block, depthwise conv inside."""

    def __init__(self, c: int, e: int):
        super().__init__()
        self.pw1, self.bn1 = nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e)
        self.dw, self.bn2 = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e)
        self.pw2, self.bn3 = nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.pw1(x)))
        h = torch.relu(self.bn2(self.dw(h)))
        return x + self.bn3(self.pw2(h))


class ConvNet(nn.Module):
    """conv -> BatchNorm -> relu -> depthwise conv -> BatchNorm -> relu -> inverted residual blocks -> mean -> head."""

    def __init__(self, n_in: int, c: int, expand: list[int], classes: int):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(n_in, c, 3, padding=1), nn.BatchNorm2d(c)
        self.dw, self.bn_dw = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(*(InvertedResidual(c, e) for e in expand))
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(self.bn_dw(self.dw(h)))
        return self.head(self.blocks(h).mean(dim=(2, 3)))


class AttentionBlock(nn.Module):
    """Pre-norm attention written by hand (heads by view(b, t, -1, head_dim)), then a pre-norm MLP."""

    def __init__(self, d: int, head_dim: int, ff: int, fused: bool, sdpa: bool):
        super().__init__()
        self.head_dim, self.fused, self.sdpa = head_dim, fused, sdpa
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        if fused:
            self.qkv = nn.Linear(d, 3 * d)
        else:
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1) if self.fused else (self.q(h), self.k(h), self.v(h))
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            weights = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim**0.5, dim=-1)
            a = weights @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyLM(nn.Module):
    """Token embedding -> nn.ModuleList of attention blocks -> LayerNorm -> head (tied to the embedding or not)."""

    def __init__(self, vocab: int, d: int, head_dim: int, ffs: list[int], fused: bool, sdpa: bool, tied: bool):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(AttentionBlock(d, head_dim, ff, fused, sdpa) for ff in ffs)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class AroundAdaptive(nn.Module):
    """stem -> relu -> an input-adaptive module (EarlyExit, PonderNet, ACT, MoE) -> up -> tanh -> down."""

    def __init__(self, n_in: int, width: int, inner: nn.Module, inner_out: int, hidden: int, n_out: int):
        super().__init__()
        self.stem, self.inner = nn.Linear(n_in, width), inner
        self.up, self.down = nn.Linear(inner_out, hidden), nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(self.inner(torch.relu(self.stem(x))))))


def _adaptive(rng: random.Random, width: int) -> tuple[nn.Module, int]:
    """A random input-adaptive module reading ``width`` features, and its output width."""
    which, out = rng.choice(["early_exit", "pondernet", "act", "moe"]), rng.randint(2, 5)
    if which == "early_exit":
        hidden = [rng.randint(2, 8) for _ in range(rng.randint(1, 3))]
        # a threshold among the confidences of `out` classes: some rows leave early, some do not
        return an.EarlyExit.mlp(width, hidden, out, threshold=rng.uniform(1 / out, 1.0)), out
    if which == "moe":
        return an.MoE(width, rng.randint(2, 4), rng.randint(2, 8), top_k=rng.randint(1, 2),
                      capacity_factor=rng.choice([None, 0.75, 1.25])), width
    step = an.RecurrentStep(width, rng.randint(2, 8), out)
    with torch.no_grad():
        step.halt.weight.mul_(4.0)  # halting differs per row
    return (an.PonderNet(step, max_steps=4) if which == "pondernet" else an.ACT(step, max_steps=4)), out


# -- cases --------------------------------------------------------------------------------------
def _lm_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


@dataclass
class Case:
    """One model with its data, optimizer and the actions run on it."""

    seed: int
    number: int
    kind: str = ""
    description: str = ""
    model: Any = None
    x: Any = None
    y: Any = None
    loss_fn: Any = None
    own: bool = False  # adaptnet's own model: depth edits by index
    tensor_output: bool = True  # the model returns one tensor (not a Hugging Face ModelOutput)
    stacks: list[str] = field(default_factory=list)  # a user's stacks of residual blocks
    optimizer: Any = None
    optimizer_description: str = ""
    actions: list[str] = field(default_factory=list)
    problem: str | None = None
    details: str = ""


def _hf_available() -> bool:
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        return True
    except Exception:
        return False


def build_model(case: Case, rng: random.Random, kinds: list[str]) -> None:
    """Draw a model, its data and its loss function into ``case`` (float64)."""
    kind = case.kind = rng.choice(kinds)
    torch.manual_seed(rng.getrandbits(31))
    batch = rng.randint(3, 6)
    if kind == "own-mlp":
        n_in, n_out = rng.randint(2, 6), rng.randint(1, 3)
        widths = [rng.randint(1, 10) for _ in range(rng.randint(1, 3))]
        norm, act = rng.choice([None, "batch", "layer"]), rng.choice(ACTIVATIONS)
        dropout = rng.choice([0.0, 0.0, 0.2])
        spec = an.AdaptiveMLP(n_in, widths, n_out, activation=act, norm=norm, dropout=dropout).spec()
        spec["blocks"] = _own_blocks(rng, widths)
        case.model, case.own = an.AdaptiveMLP.from_spec(spec), True
        case.x, case.y, case.loss_fn = torch.randn(batch, n_in), torch.randn(batch, n_out), F.mse_loss
    elif kind == "own-cnn":
        n_in, classes = rng.randint(1, 3), rng.randint(2, 4)
        widths = [rng.randint(1, 8) for _ in range(rng.randint(1, 2))]
        kernel, pool = rng.choice([1, 3]), rng.choice(["max", "avg", None])
        norm, act, side = rng.choice([None, "batch"]), rng.choice(ACTIVATIONS), rng.randint(3, 6)
        spec = an.AdaptiveCNN(n_in, widths, classes, kernel_size=kernel, norm=norm, pool=pool, activation=act).spec()
        spec["blocks"] = _own_blocks(rng, widths)
        case.model, case.own = an.AdaptiveCNN.from_spec(spec), True
        case.x, case.y = torch.randn(batch, n_in, side, side), torch.randint(0, classes, (batch,))
        case.loss_fn = F.cross_entropy
    elif kind == "user-mlp":
        n_in, n_out = rng.randint(2, 8), rng.randint(1, 3)
        hidden = [rng.randint(1, 12) for _ in range(rng.randint(1, 3))]
        case.model = UserMLP(n_in, hidden, n_out, rng.choice(["relu", "tanh", "gelu", "silu"]))
        case.x, case.y, case.loss_fn = torch.randn(batch, n_in), torch.randn(batch, n_out), F.mse_loss
    elif kind == "user-stack":
        n_in, n_out, d = rng.randint(2, 6), rng.randint(1, 3), rng.randint(2, 10)
        hidden = [rng.randint(1, 12) for _ in range(rng.randint(1, 3))]
        case.model = ResidualStack(n_in, d, hidden, n_out, rng.choice(["layer", "layer", "rms", None]))
        case.x, case.y, case.loss_fn = torch.randn(batch, n_in), torch.randn(batch, n_out), F.mse_loss
        case.stacks = ["blocks"]
    elif kind == "user-conv":
        n_in, classes, c, side = rng.randint(1, 3), rng.randint(2, 4), rng.randint(2, 8), rng.randint(3, 5)
        case.model = ConvNet(n_in, c, [rng.randint(1, 8) for _ in range(rng.randint(1, 2))], classes)
        case.x, case.y = torch.randn(batch, n_in, side, side), torch.randint(0, classes, (batch,))
        case.loss_fn, case.stacks = F.cross_entropy, ["blocks"]
    elif kind == "torch-sequential":  # torch's layers alone: edits skip the run on the example inputs
        n_in, n_out = rng.randint(2, 6), rng.randint(1, 3)
        layers: list[nn.Module] = []
        width = n_in
        for _ in range(rng.randint(1, 3)):
            hidden = rng.randint(1, 12)
            layers.append(nn.Linear(width, hidden))
            norm = rng.choice([None, "batch", "layer"])
            if norm is not None:
                layers.append(nn.BatchNorm1d(hidden) if norm == "batch" else nn.LayerNorm(hidden))
            layers.append(rng.choice([nn.ReLU(), nn.Tanh(), nn.GELU(), nn.SiLU(), nn.Dropout(0.0)]))
            width = hidden
        case.model = nn.Sequential(*layers, nn.Linear(width, n_out))
        case.x, case.y, case.loss_fn = torch.randn(batch, n_in), torch.randn(batch, n_out), F.mse_loss
    elif kind == "user-adaptive":
        n_in, n_out, width = rng.randint(2, 6), rng.randint(1, 3), rng.randint(2, 8)
        inner, inner_out = _adaptive(rng, width)
        case.model = AroundAdaptive(n_in, width, inner, inner_out, rng.randint(1, 12), n_out)
        case.x, case.y, case.loss_fn = torch.randn(batch, n_in) * 2, torch.randn(batch, n_out), F.mse_loss
    elif kind == "user-attention":
        vocab, head_dim, heads, t = rng.randint(5, 12), rng.choice([2, 4]), rng.randint(1, 4), rng.randint(2, 6)
        sdpa = rng.random() < 0.5
        tied = rng.random() < 0.3
        case.model = TinyLM(vocab, heads * head_dim, head_dim, [rng.randint(2, 16) for _ in range(rng.randint(1, 2))],
                            fused=rng.random() < 0.5, sdpa=sdpa, tied=tied)
        case.x, case.y = torch.randint(0, vocab, (batch, t)), torch.randint(0, vocab, (batch, t))
        case.loss_fn, case.stacks = _lm_loss, ["blocks"]
    else:  # hf-gpt2, hf-llama
        import transformers

        vocab, t = 24, rng.randint(3, 6)
        if kind == "hf-gpt2":
            config = transformers.GPT2Config(n_embd=16, n_layer=rng.randint(1, 2), n_head=4, vocab_size=vocab,
                                             n_positions=16, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                             embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
            case.model, case.stacks = transformers.GPT2LMHeadModel(config), ["transformer.h"]
        else:
            config = transformers.LlamaConfig(hidden_size=16, intermediate_size=rng.randint(8, 24),
                                              num_hidden_layers=rng.randint(1, 2), num_attention_heads=4,
                                              num_key_value_heads=rng.choice([1, 2, 4]), vocab_size=vocab,
                                              max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
                                              pad_token_id=0, use_cache=False)
            case.model, case.stacks = transformers.LlamaForCausalLM(config), ["model.layers"]
        case.x, case.y = torch.randint(1, vocab, (batch, t)), torch.randint(1, vocab, (batch, t))
        case.loss_fn, case.tensor_output = _lm_loss, False
    case.model = case.model.to(F64)
    if case.x.is_floating_point():
        case.x = case.x.to(F64)
    if case.y.is_floating_point():
        case.y = case.y.to(F64)
    if not case.own:
        an.unit_groups(case.model, (case.x,))
    widths = {name: g.size for name, g in an.unit_groups(case.model).items()}
    detail = f"spec {case.model.spec()}" if case.own else f"groups {widths}"
    case.description = f"{kind}: {detail}; x {tuple(case.x.shape)}"


def _own_blocks(rng: random.Random, widths: list[int]) -> list[dict[str, Any]]:
    """Dense blocks of ``widths``, each followed by 0 or 1 residual blocks (as tests/edit/test_exactness.py)."""
    blocks: list[dict[str, Any]] = []
    for w in widths:
        blocks.append({"kind": "dense", "width": w})
        if rng.random() < 0.4 and len(blocks) < MAX_DEPTH:
            blocks.append({"kind": "residual", "width": rng.randint(1, 6)})
    return blocks


def build_optimizer(case: Case, rng: random.Random) -> None:
    """A random optimizer of those adaptnet carries, over one or two param groups."""
    name = rng.choice(["SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop", "Adagrad"])
    kwargs: dict[str, Any] = {
        "SGD": {"lr": 0.01, "momentum": 0.9, "nesterov": rng.random() < 0.5},
        "Adam": {"lr": 1e-3, "amsgrad": rng.random() < 0.3},
        "AdamW": {"lr": 1e-3, "amsgrad": rng.random() < 0.3},
        "NAdam": {"lr": 1e-3},
        "RAdam": {"lr": 1e-3},
        "Adamax": {"lr": 1e-3},
        "RMSprop": {"lr": 1e-3, "momentum": rng.choice([0.0, 0.9]), "centered": rng.random() < 0.5},
        "Adagrad": {"lr": 1e-2},
    }[name]
    params = list(case.model.parameters())
    if rng.random() < 0.3:  # matrices with weight decay, the rest without: new parameters join a group
        groups: Any = [{"params": [p for p in params if p.dim() > 1], "weight_decay": 1e-4},
                       {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        case.optimizer_description = f"{name}({kwargs}, 2 param groups)"
    else:
        groups = params
        case.optimizer_description = f"{name}({kwargs})"
    case.optimizer = getattr(torch.optim, name)(groups, **kwargs)


# -- checks -------------------------------------------------------------------------------------
def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "logits"):
        return [value.logits]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


@torch.no_grad()
def outputs(case: Case) -> list[torch.Tensor]:
    """The model's outputs on ``case.x`` in eval mode (the mode of every module is put back)."""
    modes = [(m, m.training) for m in case.model.modules()]
    case.model.eval()
    try:
        return [t.clone() for t in _tensors(case.model(case.x))]
    finally:
        for m, mode in modes:
            m.training = mode


def relative_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    if [t.shape for t in before] != [t.shape for t in after]:
        return math.inf
    change = 0.0
    for b, a in zip(before, after, strict=True):
        scale = float(b.abs().max()) if b.numel() else 0.0
        diff = float((a - b).abs().max()) if b.numel() else 0.0
        change = max(change, diff / max(scale, 1e-30))
    return change


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, case: Case) -> float:
    model.train()
    optimizer.zero_grad()
    loss = case.loss_fn(model(case.x), case.y)
    loss.backward()
    optimizer.step()
    return loss.item()


def check_state(case: Case) -> None:
    """The invariants after every action, and a training step on a copy that gives a finite loss."""
    try:
        check_optimizer_in_sync(case.model, case.optimizer)
        check_module_sizes(case.model)
        check_dtype_device(case.model, F64)
    except AssertionError as err:
        raise Failure(f"after the action: {err}") from err
    check_heads(case)
    model, optimizer = copy.deepcopy((case.model, case.optimizer))
    try:
        loss = train_step(model, optimizer, case)
    except Exception as err:
        raise Failure(f"a training step after the action fails: {type(err).__name__}: {err}") from err
    if not math.isfinite(loss):
        raise Failure(f"a training step after the action gives a loss of {loss}")


def check_heads(case: Case) -> None:
    """A Llama's attention in every layer is one heads group whatever its key/value heads, one
    (multi-query) included: a unit is a key/value head with its query heads. Checked in the groups
    edits use and in a new trace of a copy (as after a depth edit or a load), where one key/value
    head once read as a broadcast and its group vanished."""
    if case.kind != "hf-llama":
        return
    model = case.model
    traced_again = an.unit_groups(copy.deepcopy(model), (case.x,))
    for where, groups in (("", an.unit_groups(model)), (" traced again", traced_again)):
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            kv_heads = attn.k_proj.out_features // attn.head_dim
            group = groups.get(f"model.layers.{i}.self_attn.q_proj")
            if group is None or group.size != kv_heads:
                raise Failure(f"layer {i}'s attention ({kv_heads} key/value heads of "
                              f"{attn.q_proj.out_features // attn.head_dim} query heads){where} is "
                              f"{'no unit group' if group is None else f'a group of {group.size} units'}")


def check_module_sizes(model: nn.Module) -> None:
    """Every layer's size attributes agree with its tensors (as tests/edit/edit_checks.py check_sizes,
    with Conv1d and Embedding)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            shape = (m.out_features, m.in_features)
            assert tuple(m.weight.shape) == shape, f"{name}: {m} holds {tuple(m.weight.shape)}"
            assert m.bias is None or tuple(m.bias.shape) == (m.out_features,), name
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            shape = (m.out_channels, m.in_channels // m.groups)
            assert tuple(m.weight.shape[:2]) == shape, f"{name}: {m} holds {tuple(m.weight.shape)}"
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, f"{name}: {m}"
            assert m.bias is None or tuple(m.bias.shape) == (m.out_channels,), name
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                assert t is None or tuple(t.shape) == (m.num_features,), f"{name}: {m}"
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            for t in (m.weight, getattr(m, "bias", None)):
                assert t is None or tuple(t.shape) == tuple(m.normalized_shape), f"{name}: {m}"
        elif isinstance(m, nn.Embedding):
            assert tuple(m.weight.shape) == (m.num_embeddings, m.embedding_dim), f"{name}: {m}"


@dataclass
class Snapshot:
    """Everything an invalid request must leave bit-identical."""

    state: Any
    groups: dict[str, int]
    depth: tuple[Any, ...]
    layers: Any


def snapshot(case: Case) -> Snapshot:
    config = getattr(case.model, "config", None)
    return Snapshot(capture(case.model, case.optimizer), _sizes(case), depth_edits(case.model),
                    getattr(config, "num_hidden_layers", None))


def assert_unchanged(case: Case, before: Snapshot, error: Exception | None = None) -> None:
    """Bit-identical, but for a group that the refusal says is no longer offered (documented: an edit
    that finds a group's size written into the model's code takes the group off the list)."""
    after = snapshot(case)
    groups = dict(before.groups)
    found = re.search(r"'([^']+)' is no longer offered", str(error or ""))
    if found:
        groups.pop(found.group(1), None)
    try:
        assert_identical(before.state, after.state)
        assert groups == after.groups, f"unit groups changed: {before.groups} -> {after.groups}"
        assert before.depth == after.depth, "the recorded depth edits changed"
        assert before.layers == after.layers, "config.num_hidden_layers changed"
    except AssertionError as err:
        raise Failure(f"a refused request changed the model or optimizer: {err}") from err


def check_outside(group: an.UnitGroup, before: Snapshot) -> None:
    """A width edit leaves every parameter outside its group bit-identical: values and ``.grad``."""
    inside = {id(p) for p in group.parameters()}
    for name, p, value, grad, _ in before.state.params:
        if id(p) in inside:
            continue
        if not torch.equal(p.detach(), value):
            raise Failure(f"{name}, outside the edited group, changed value")
        if (grad is None) != (p.grad is None) or (grad is not None and not torch.equal(p.grad, grad)):
            raise Failure(f"{name}, outside the edited group, changed .grad")


def _sizes(case: Case) -> dict[str, int]:
    return {name: g.size for name, g in an.unit_groups(case.model).items()}


# -- actions ------------------------------------------------------------------------------------
@dataclass
class Stats:
    cases: int = 0
    actions: int = 0
    edits: Counter[str] = field(default_factory=Counter)  # applied, by op
    exact: int = 0  # exact edits whose outputs were checked
    inexact: int = 0  # exact=False on a group where the init cannot be exact
    refused_exact: Counter[str] = field(default_factory=Counter)  # exact inits refused, by init
    refused_one: int = 0  # prunes to one unit a new trace would not find as the same group (refused, unchanged)
    refused_depth: int = 0  # deepen of a block that turned out not residual (refused, model unchanged)
    invalid: int = 0
    steps: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    problems: Counter[str] = field(default_factory=Counter)  # failures by kind of problem


def unit_cap(group: an.UnitGroup) -> int:
    """The most units a group may reach here: MAX_UNITS, or fewer for units of many entries (heads)."""
    entries = max((int(sl.tensor.shape[sl.dim]) for sl in group.slices), default=group.size) // max(group.size, 1)
    return min(MAX_UNITS, max(4, MAX_ENTRIES // max(entries, 1)))


def _one_is_refused(group: an.UnitGroup) -> bool:
    """The documented rule: prune leaves one unit of a group unless one unit traces differently:
    one group of a grouped conv (a plain conv then; refused before the edit). One attention head is
    left, and so is one key/value head with its query heads (Llama's repeat_kv, SDPA's enable_gqa),
    which traces as several do (``check_heads``)."""
    return any(isinstance(sl.module, nn.modules.conv._ConvNd) and sl.module.groups == group.size > 1
               for sl in group.slices)


def can_be_exact(group: an.UnitGroup, init: str, by: int) -> bool:
    """The documented rule (docs/any-model.md): an exact init keeps the function unless the group's
    units are tied, or mixed (net2net and firefly by a multiple of the size under mean-like ops excepted;
    zero carries a LayerNorm/RMSNorm stream, or is refused where a norm's output is the stream)."""
    if init == "zero" and carry_kind(group) is not None:
        return True
    if group.tied:
        return False
    if not group.mixed:
        return True
    return init in ("net2net", "firefly") and set(group.mixed) <= MEAN_LIKE and by % group.size == 0


def _depth(case: Case) -> int:
    if case.own:
        return len(case.model.widths)
    return max(len(case.model.get_submodule(s)) for s in case.stacks) if case.stacks else 0


def _removable(model: Any) -> list[int]:
    """Layers of adaptnet's own model that remove_layer takes: residual blocks, MLP dense layers not
    feeding one."""
    blocks = list(model.blocks)
    out = []
    for i, b in enumerate(blocks):
        mlp_dense = isinstance(model, an.AdaptiveMLP) and len(blocks) > 1 and not _feeds_residual(blocks, i)
        if isinstance(b, ResidualBlock) or mlp_dense:
            out.append(i)
    return out


def _feeds_residual(blocks: list[nn.Module], i: int) -> bool:
    return i + 1 < len(blocks) and isinstance(blocks[i + 1], ResidualBlock)


class Runner:
    """Runs the random actions of one case and checks each."""

    def __init__(self, case: Case, rng: random.Random, stats: Stats, verbose: bool):
        self.case, self.rng, self.stats, self.verbose = case, rng, stats, verbose
        self.generator = torch.Generator().manual_seed(rng.getrandbits(31))
        self.number = 0

    def log(self, text: str) -> None:
        """An action, numbered."""
        self.number += 1
        self.case.actions.append(f"{self.number:3d}. {text}")
        if self.verbose:
            print(f"  {self.case.actions[-1]}", flush=True)

    def note(self, text: str) -> None:
        """What an action did."""
        self.case.actions.append(f"       -> {text}")
        if self.verbose:
            print(f"  {self.case.actions[-1]}", flush=True)

    # -- the valid actions ------------------------------------------------------------------
    def train(self) -> None:
        rng, case = self.rng, self.case
        steps = rng.randint(1, 3)
        pending = rng.random() < 0.4  # an edit between backward() and step(): grads to carry
        self.log(f"train {steps} step(s){', then backward without step' if pending else ''}")
        for _ in range(steps):
            loss = train_step(case.model, case.optimizer, case)
            self.stats.steps += 1
            if not math.isfinite(loss):
                raise Failure(f"training gave a loss of {loss}")
        if pending:
            case.optimizer.zero_grad()
            case.loss_fn(case.model(case.x), case.y).backward()
        elif rng.random() < 0.3:
            case.optimizer.zero_grad()

    def _pick(self) -> tuple[str, an.UnitGroup, Any]:
        """A random group, and how to name it: its name, or its index in unit_groups()."""
        groups = an.unit_groups(self.case.model)
        names = list(groups)
        i = self.rng.randrange(len(names))
        return names[i], groups[names[i]], (i if self.rng.random() < 0.3 else names[i])

    def widen(self) -> None:
        rng, case = self.rng, self.case
        name, group, layer = self._pick()
        cap, n = unit_cap(group), group.size
        if n >= cap:
            return self.prune()
        init = rng.choice(INITS)
        if group.mixed and 2 * n <= cap and rng.random() < 0.4:
            by = n * rng.randint(1, cap // n - 1)  # every unit copied equally often: exact under a LayerNorm
        else:
            by = rng.randint(1, min(6, cap - n))
        exact_possible = can_be_exact(group, init, by)
        exact = True if init == "random" else (rng.random() < 0.9 if exact_possible else rng.random() < 0.5)
        kwargs: dict[str, Any] = {"exact": exact, "generator": self.generator}
        if init in ("gradmax", "firefly"):
            kwargs.update(batch=(case.x, case.y), loss_fn=case.loss_fn)
        else:
            kwargs["batch"] = rng.choice([None, case.x, (case.x, case.y)])
        if init in ("net2net", "firefly"):
            kwargs["noise"] = rng.choice([0.0, 0.0, 0.1])
        self._mode()
        text = (f"widen({layer!r} [{name}: {n} units, mixed {sorted(group.mixed)}, tied {list(group.tied)}], by={by}, "
                f"init={init!r}, exact={exact}, batch={_show_batch(kwargs['batch'])}"
                + (f", noise={kwargs['noise']}" if "noise" in kwargs else "") + f") [{self._mode_name()}]")
        self.log(text)
        before, snap = outputs(case), snapshot(case)
        try:
            edit = an.widen(case.model, layer, by, init=init, optimizer=case.optimizer, **kwargs)
        except an.EditError as err:
            assert_unchanged(case, snap, err)
            if init in EXACT_INITS and exact and REFUSED_EXACT in str(err):
                self.stats.refused_exact[init] += 1
                self.note(f"refused (exact init): {err}")
                return None
            raise Failure(f"a valid widen was refused: {err}") from err
        after = outputs(case)
        change = relative_change(before, after)
        self.note(f"{name}: {n} -> {_sizes(case).get(name)} units, relative output change {change:.2e}")
        self.stats.edits["widen"] += 1
        if _sizes(case).get(name) != n + by:
            raise Failure(f"group {name} has {_sizes(case).get(name)} units after widening {n} by {by}")
        check_outside(group, snap)
        self._check_reported(edit, before, after, kwargs["batch"])
        if init in EXACT_INITS and exact:
            self.stats.exact += 1
            tol = TOL_F32 if case.kind == "hf-llama" and group.mixed else TOL
            if change > tol:
                raise Failure(f"exact widen changed the outputs by {change:.3g} (relative)"
                              + ("" if exact_possible else "; the group's units are mixed or tied, yet it was "
                                 "not refused"))
        elif init in EXACT_INITS:
            self.stats.inexact += 1
        return None

    def prune(self) -> None:
        rng, case = self.rng, self.case
        name, group, layer = self._pick()
        n = group.size
        least = 2 if _one_is_refused(group) else 1  # one conv group: refused (see invalid requests)
        if n <= least:
            return self.widen() if n < unit_cap(group) else None
        how = rng.choice(["amount", "keep", "units"])
        kwargs: dict[str, Any] = {}
        k = rng.randint(1, n - least)  # units to remove
        if how == "amount":
            kwargs["amount"] = min(max((k + rng.uniform(-0.3, 0.3)) / n, 1e-3), 1 - 1e-3)
        elif how == "keep":
            kwargs["keep"] = n - k
        else:
            kwargs["units"] = rng.sample(range(n), k)
        if how != "units":
            kwargs["importance"] = rng.choice(["magnitude", "taylor"])
        with_grads = all(p.grad is not None for p in group.parameters())
        if kwargs.get("importance") == "taylor" and (not with_grads or rng.random() < 0.7):
            kwargs.update(batch=(case.x, case.y), loss_fn=case.loss_fn)
        elif kwargs.get("importance") == "taylor":
            kwargs["batch"] = None  # the gradients already in .grad
        else:
            kwargs["batch"] = rng.choice([None, case.x])
        self._mode()
        shown = {k_: (_show_batch(v) if k_ == "batch" else v) for k_, v in kwargs.items() if k_ != "loss_fn"}
        self.log(f"prune({layer!r} [{name}: {n} units], {shown}) [{self._mode_name()}]")
        before, snap = outputs(case), snapshot(case)
        try:
            edit = an.prune(case.model, layer, optimizer=case.optimizer, **kwargs)
        except an.EditError as err:
            assert_unchanged(case, snap, err)
            if n - k == 1 and REFUSED_ONE in str(err):
                self.stats.refused_one += 1
                self.note(f"refused (one unit would not trace as the same group): {err}")
                return None
            raise Failure(f"a valid prune was refused: {err}") from err
        after = outputs(case)
        self.stats.edits["prune"] += 1
        left = _sizes(case).get(name)
        self.note(f"{name}: {n} -> {left} units, relative output change {relative_change(before, after):.2e}")
        if left != n - k:
            raise Failure(f"group {name} has {left} units after removing {k} of {n}")
        check_outside(group, snap)
        self._check_reported(edit, before, after, kwargs["batch"])
        return None

    def deepen(self) -> None:
        rng, case = self.rng, self.case
        if _depth(case) >= MAX_DEPTH or not (case.own or case.stacks):
            return self.remove() if _depth(case) > 1 else self.widen()
        kwargs: dict[str, Any] = {"batch": rng.choice([None, case.x])}
        if case.own:
            after: Any = rng.randrange(len(case.model.widths))
            kwargs["width"] = rng.choice([None, rng.randint(1, 8)])
        else:
            stack = rng.choice(case.stacks)
            after = f"{stack}.{rng.randrange(len(case.model.get_submodule(stack)))}"
            kwargs["init"] = rng.choice(["identity", "fresh"])
        self._mode()
        self.log(f"deepen(after={after!r}, {_show(kwargs)}) [{self._mode_name()}]")
        before, snap = outputs(case), snapshot(case)
        try:
            edit = an.deepen(case.model, after, optimizer=case.optimizer, **kwargs)
        except an.EditError as err:
            assert_unchanged(case, snap, err)
            raise Failure(f"a valid deepen was refused: {err}") from err
        after_out = outputs(case)
        change = relative_change(before, after_out)
        self.stats.edits["deepen"] += 1
        self.stats.exact += 1
        self.note(f"inserted {edit.group}; relative output change {change:.2e}")
        self._check_reported(edit, before, after_out, kwargs["batch"])
        if change > TOL:
            raise Failure(f"deepen changed the outputs by {change:.3g} (relative)")
        return None

    def remove(self) -> None:
        rng, case = self.rng, self.case
        if case.own:
            choices: list[Any] = _removable(case.model)
        else:
            choices = [f"{s}.{i}" for s in case.stacks for i in range(len(case.model.get_submodule(s)))
                       if len(case.model.get_submodule(s)) > 1]
        if not choices:
            return self.deepen() if (case.own or case.stacks) and _depth(case) < MAX_DEPTH else self.widen()
        layer = rng.choice(choices)
        batch = rng.choice([None, case.x])
        self._mode()
        self.log(f"remove_layer({layer!r}, batch={_show_batch(batch)}) [{self._mode_name()}]")
        before, snap = outputs(case), snapshot(case)
        try:
            edit = an.remove_layer(case.model, layer, optimizer=case.optimizer, batch=batch)
        except an.EditError as err:
            assert_unchanged(case, snap, err)
            raise Failure(f"a valid remove_layer was refused: {err}") from err
        after = outputs(case)
        self.stats.edits["remove_layer"] += 1
        self.note(f"relative output change {relative_change(before, after):.2e}")
        self._check_reported(edit, before, after, batch)
        return None

    def _check_reported(self, edit: an.Edit, before: list[torch.Tensor], after: list[torch.Tensor],
                        batch: Any) -> None:
        """With a batch (the case's inputs), the Edit record reports the output change measured here."""
        if batch is None or not self.case.tensor_output or before[0].shape != after[0].shape:
            return
        measured = float((after[0] - before[0]).abs().max())
        reported = edit.max_output_change
        if reported is None or abs(reported - measured) > 1e-6 * max(measured, 1e-30) + 1e-12:
            raise Failure(f"Edit.max_output_change is {reported}, the outputs changed by {measured}")

    def _mode(self) -> None:
        """Edits happen in train or eval mode alike."""
        self.case.model.train(self.rng.random() < 0.5)

    def _mode_name(self) -> str:
        return "train mode" if self.case.model.training else "eval mode"

    # -- invalid requests -------------------------------------------------------------------
    def invalid(self) -> None:
        case, rng = self.case, self.rng
        text, request = rng.choice(self._invalid_requests())
        self._mode()
        self.log(f"invalid: {text} [{self._mode_name()}]")
        snap = snapshot(case)
        try:
            request()
        except an.EditError as err:
            assert_unchanged(case, snap, err)
            self.stats.invalid += 1
            self.note(f"EditError: {err}")
            return
        except Exception as err:
            raise Failure(f"an invalid request raised {type(err).__name__}, not EditError: {err}") from err
        raise Failure("an invalid request was not refused")

    def _invalid_requests(self) -> list[tuple[str, Callable[[], Any]]]:
        case, rng, model, opt = self.case, self.rng, self.case.model, self.case.optimizer
        groups = an.unit_groups(model)
        names = list(groups)
        name = rng.choice(names)
        n = groups[name].size
        batch = (case.x, case.y)
        requests: list[tuple[str, Callable[[], Any]]] = []

        def add(text: str, fn: Callable[[], Any]) -> None:
            requests.append((text, fn))

        bad_name = rng.choice(["nope", f"{name}x", "", "head", "blocks.99", name.upper()])
        if bad_name not in groups:
            add(f"widen({bad_name!r}, 2)", lambda: an.widen(model, bad_name, 2, optimizer=opt))
            add(f"prune({bad_name!r}, keep=1)", lambda: an.prune(model, bad_name, keep=1, optimizer=opt))
        if n > 1 and _one_is_refused(groups[name]):
            add(f"prune({name!r}, keep=1) [one conv group]",
                lambda: an.prune(model, name, keep=1, optimizer=opt))
        bad_index = rng.choice([len(names), -1, 1.5, True, None])
        add(f"widen(layer={bad_index!r}, 2)", lambda: an.widen(model, bad_index, 2, optimizer=opt))
        bad_by = rng.choice([0, -1, 1.5, True, "2", None])
        add(f"widen({name!r}, by={bad_by!r})", lambda: an.widen(model, name, bad_by, optimizer=opt, exact=False))
        bad_init = rng.choice(["xavier", "", "Net2Net", None, "identity"])
        add(f"widen({name!r}, 2, init={bad_init!r})",
            lambda: an.widen(model, name, 2, init=bad_init, optimizer=opt, exact=False))
        probe = rng.choice(["gradmax", "firefly"])
        add(f"widen({name!r}, 2, init={probe!r}) without loss_fn",
            lambda: an.widen(model, name, 2, init=probe, optimizer=opt, batch=batch, exact=False))
        add(f"widen({name!r}, 2, init={probe!r}) with inputs only",
            lambda: an.widen(model, name, 2, init=probe, optimizer=opt, batch=case.x, loss_fn=case.loss_fn,
                             exact=False))
        nan_init = probe
        add(f"widen({name!r}, 2, init={nan_init!r}) with a nan loss",
            lambda: an.widen(model, name, 2, init=nan_init, optimizer=opt, batch=batch, exact=False,
                             loss_fn=lambda out, y: case.loss_fn(out, y) * math.nan))
        if n > 1:
            add(f"prune({name!r}, keep=1, importance='taylor') with a nan loss",
                lambda: an.prune(model, name, keep=1, importance="taylor", optimizer=opt, batch=batch,
                                 loss_fn=lambda out, y: case.loss_fn(out, y) * math.nan))
        bad_noise = rng.choice([-0.1, "0.1", None])
        add(f"widen({name!r}, 2, noise={bad_noise!r})",
            lambda: an.widen(model, name, 2, optimizer=opt, noise=bad_noise, exact=False))
        bad_prune = rng.choice([
            {"keep": 0}, {"keep": n + 1}, {"keep": -1}, {"keep": 1.5}, {"amount": 0.0}, {"amount": 1.0},
            {"amount": 1.5}, {"amount": -0.25}, {"amount": math.nan}, {"amount": 0.4 / n}, {"units": list(range(n))},
            {"units": [n]}, {"units": [-1]}, {"units": [0, 0]}, {"units": [0.5]}, {"amount": 0.5, "keep": 1}, {},
            {"keep": max(n - 1, 1), "importance": "l1"},
        ])
        add(f"prune({name!r}, {bad_prune})", lambda: an.prune(model, name, optimizer=opt, **bad_prune))
        add(f"prune({name!r}, keep=1, importance='taylor') with a batch and no loss_fn",
            lambda: an.prune(model, name, keep=1, importance="taylor", batch=batch, optimizer=opt))
        if n == 1:
            add(f"prune({name!r}, keep=1) of its only unit by units=[0]",
                lambda: an.prune(model, name, units=[0], optimizer=opt))
        # Optimizers that cannot be carried, or that do not hold the model's parameters.
        params = list(model.parameters())
        wrong = rng.choice(["lbfgs", "custom", "another model", "some parameters", "a list"])
        op = rng.choice(["widen", "prune", "deepen", "remove"])

        def wrong_optimizer() -> Any:
            if wrong == "lbfgs":
                return torch.optim.LBFGS(params)
            if wrong == "custom":
                return _Custom(params)
            if wrong == "another model":
                return torch.optim.Adam(nn.Linear(3, 3).parameters())
            if wrong == "some parameters":
                return torch.optim.SGD(params[:-1], lr=0.1)
            return list(params)

        if op == "prune" and n > 1:
            add(f"prune({name!r}, keep=1) with optimizer: {wrong}",
                lambda: an.prune(model, name, keep=1, optimizer=wrong_optimizer()))
        elif op in ("deepen", "remove") and case.own:
            fn = an.deepen if op == "deepen" else an.remove_layer
            add(f"{fn.__name__}(0) with optimizer: {wrong}", lambda: fn(model, 0, optimizer=wrong_optimizer()))
        elif op in ("deepen", "remove") and case.stacks:
            fn = an.deepen if op == "deepen" else an.remove_layer
            block = f"{case.stacks[0]}.0"
            if op == "deepen" or len(model.get_submodule(case.stacks[0])) > 1:
                add(f"{fn.__name__}({block!r}) with optimizer: {wrong}",
                    lambda: fn(model, block, optimizer=wrong_optimizer()))
        else:
            add(f"widen({name!r}, 1) with optimizer: {wrong}",
                lambda: an.widen(model, name, 1, optimizer=wrong_optimizer(), exact=False))
        # A graph still alive from a forward pass: width edits must refuse to swap the parameters.
        live = rng.choice(["widen", "prune"]) if n > 1 else "widen"

        def with_live_graph() -> Any:
            modes = [(m, m.training) for m in model.modules()]
            model.eval()  # no running statistics updated by the forward pass
            out = case.loss_fn(model(case.x), case.y)
            try:
                if live == "widen":
                    return an.widen(model, name, 1, init="random", optimizer=opt)
                return an.prune(model, name, keep=n - 1, optimizer=opt)
            finally:
                del out
                for m, mode in modes:
                    m.training = mode

        add(f"{live}({name!r}) between a forward pass and its backward()", with_live_graph)
        # Depth edits.
        depth = _depth(case)
        if case.own:
            bad_after = rng.choice([depth, -1, True, 1.5, None])
            add(f"deepen(after={bad_after!r})", lambda: an.deepen(model, bad_after, optimizer=opt))
            add("deepen(after=0, init='zero')", lambda: an.deepen(model, 0, init="zero", optimizer=opt))
            bad_width = rng.choice([0, -2, 1.5, "3"])
            add(f"deepen(after=0, width={bad_width!r})", lambda: an.deepen(model, 0, width=bad_width, optimizer=opt))
            bad_layer = rng.choice([depth, -1, False, "blocks"])
            add(f"remove_layer({bad_layer!r})", lambda: an.remove_layer(model, bad_layer, optimizer=opt))
            blocks = list(model.blocks)
            fixed = [i for i, b in enumerate(blocks) if not isinstance(b, ResidualBlock) and (
                isinstance(model, an.AdaptiveCNN) or _feeds_residual(blocks, i))]
            if fixed:  # a CNN's dense block, an MLP's dense layer that feeds a residual block
                layer = rng.choice(fixed)
                add(f"remove_layer({layer}) (not removable)", lambda: an.remove_layer(model, layer, optimizer=opt))
        else:
            stack = rng.choice(case.stacks) if case.stacks else "blocks"
            bad = ["nope", f"{stack}.99", f"{stack}.-1", stack, "head", f"{stack}.x"]
            if not isinstance(model, nn.Sequential):  # in an nn.Sequential, "0" names a block of the stack it is
                bad.append(names[0])
            bad_block = rng.choice(bad)
            add(f"deepen(after={bad_block!r})", lambda: an.deepen(model, bad_block, optimizer=opt))
            add(f"remove_layer({bad_block!r})", lambda: an.remove_layer(model, bad_block, optimizer=opt))
            add("deepen(after=0) (an index on a user's model)", lambda: an.deepen(model, 0, optimizer=opt))
            add("remove_layer(0) (an index on a user's model)", lambda: an.remove_layer(model, 0, optimizer=opt))
            if case.stacks:
                add(f"deepen(after='{stack}.0', init='xavier')",
                    lambda: an.deepen(model, f"{stack}.0", init="xavier", optimizer=opt))
                add(f"deepen(after='{stack}.0', width=4)",
                    lambda: an.deepen(model, f"{stack}.0", width=4, optimizer=opt))
                if len(model.get_submodule(stack)) == 1:
                    add(f"remove_layer('{stack}.0') (the only block)",
                        lambda: an.remove_layer(model, f"{stack}.0", optimizer=opt))
        return requests


class _Custom(torch.optim.Optimizer):
    """An optimizer adaptnet has never heard of."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.1})

    def step(self, closure: Any = None) -> None:  # pragma: no cover - never stepped
        return None


def _show_batch(batch: Any) -> str:
    if batch is None:
        return "None"
    return "(x, y)" if isinstance(batch, tuple) else "x"


def _show(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_show_batch(v) if k == 'batch' else repr(v)}" for k, v in kwargs.items())


ACTIONS = ("train", "widen", "prune", "deepen", "remove", "invalid")
WEIGHTS = (3, 6, 3, 2, 1.5, 4)


def run_case(seed: int, number: int, kinds: list[str], stats: Stats, verbose: bool = False) -> Case:
    """Case ``number`` of ``seed``: a model, an optimizer and a sequence of checked actions."""
    rng = random.Random(f"{seed}/{number}")
    case = Case(seed, number)
    try:
        build_model(case, rng, kinds)
        build_optimizer(case, rng)
        stats.cases += 1
        stats.kinds[case.kind] += 1
        if verbose:
            print(f"case {number}: {case.description}; {case.optimizer_description}", flush=True)
        runner = Runner(case, rng, stats, verbose)
        runner.train()  # optimizer state exists before the first edit
        stats.actions += 1
        check_state(case)
        hf = case.kind.startswith("hf-")
        for _ in range(rng.randint(4, 10) if hf else rng.randint(8, 24)):
            action = rng.choices(ACTIONS, WEIGHTS)[0]
            getattr(runner, action)()
            stats.actions += 1
            check_state(case)
        runner.train()
        stats.actions += 1
        check_state(case)
    except Failure as err:
        case.problem = str(err)
        case.details = "".join(traceback.format_exception(err.__cause__)) if err.__cause__ else ""
    except Exception as err:  # anything adaptnet (or the fuzzer) raised unexpectedly
        case.problem = f"unexpected {type(err).__name__}: {err}"
        case.details = traceback.format_exc()
    if case.problem is not None:
        stats.failed += 1
        stats.problems[re.sub(r"\d+", "N", case.problem)[:110]] += 1
    return case


def report(case: Case) -> str:
    """What a failing case prints: how to rerun it, the model, the optimizer and the actions."""
    actions = "\n".join(f"  {a}" for a in case.actions)
    tail = "\n".join(case.details.rstrip().splitlines()[-25:])
    return (f"FAILED: seed {case.seed} case {case.number}: {case.problem}\n"
            f"  rerun: python tests/fuzz/fuzz_edits.py --seed {case.seed} --case {case.number} -v\n"
            f"  model: {case.description}\n  optimizer: {case.optimizer_description}\n"
            f"--- actions (the last one failed) ---\n{actions}\n"
            + (f"--- traceback ---\n{tail}\n" if tail else ""))


def summary(stats: Stats, seconds: float, seed: int) -> str:
    edits = sum(stats.edits.values())
    by_op = ", ".join(f"{k} {v}" for k, v in sorted(stats.edits.items()))
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(stats.kinds.items()))
    refused = sum(stats.refused_exact.values())
    return (f"{stats.cases} models, {stats.actions} actions in {seconds:.0f} s (seed {seed}): {edits} edits applied "
            f"({by_op}), {stats.exact} of them checked exact, {stats.inexact} exact=False on mixed/tied groups; "
            f"{refused} exact inits refused by a mixed or tied group; {stats.refused_one} prunes to one unit "
            f"refused (not the same group on a new trace); {stats.invalid} invalid requests refused "
            f"unchanged; {stats.steps} training steps; {stats.failed} failed\n  models: {kinds}"
            + "".join(f"\n  failed {count}x: {problem}" for problem, count in stats.problems.most_common()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=0, help="the seed the cases derive from (default 0)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, help="time budget: start cases until it is spent (default 180)")
    budget.add_argument("--cases", type=int, help="run this many cases instead")
    budget.add_argument("--case", type=int, help="run only case N of the seed (to reproduce a failure)")
    parser.add_argument("--kind", action="append", help="only models of this kind (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every action as it runs")
    parser.add_argument("--check-known", action="store_true",
                        help="also run the cases of the known, reported bugs (KNOWN in this file)")
    args = parser.parse_args(argv)
    global CHECK_KNOWN
    CHECK_KNOWN = args.check_known
    if args.seconds is None and args.cases is None and args.case is None:
        args.seconds = 180.0
    torch.set_num_threads(1)  # tiny models: one thread is faster, and kinder to a shared machine
    kinds = ["own-mlp", "own-mlp", "own-cnn", "own-cnn", "user-mlp", "user-stack", "user-stack", "user-conv",
             "user-conv", "user-attention", "user-attention", "user-adaptive", "torch-sequential"]
    if _hf_available():
        kinds += ["hf-gpt2", "hf-llama"]
    if args.kind:
        unknown = set(args.kind) - set(kinds)
        if unknown:
            parser.error(f"unknown or unavailable kind(s) {sorted(unknown)}; choose from {sorted(set(kinds))}")
        kinds = args.kind
    stats, start, failures = Stats(), time.monotonic(), 0
    numbers = [args.case] if args.case is not None else range(args.cases if args.cases is not None else 2**62)
    for number in numbers:
        if args.seconds is not None and args.case is None and time.monotonic() - start >= args.seconds:
            break
        case = run_case(args.seed, number, kinds, stats, verbose=args.verbose)
        if case.problem is not None:
            failures += 1
            if failures <= 10:
                print(report(case), flush=True)
    print(summary(stats, time.monotonic() - start, args.seed))
    if KNOWN and not CHECK_KNOWN:
        print(f"  known bugs left out (--check-known runs them): {', '.join(KNOWN)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
