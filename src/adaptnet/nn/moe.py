"""MoE: a mixture-of-experts layer with top-k routing, capacity limits and auxiliary losses.

Tokens ``(..., dim)`` are flattened to ``(N, dim)``. A linear router gives logits ``(N, E)``;
each token goes to its ``top_k`` experts, two-layer MLPs ``dim -> hidden -> dim`` whose
parameters are stacked along a leading expert dimension, so that the experts (with their
router rows) form one unit group that ``adaptnet.grow_experts`` edits like any other.

Gates: with ``top_k == 1`` the gate is the chosen expert's softmax probability over all
experts (Switch Transformer), so the router learns from the task loss; with ``top_k >= 2``
the gates are the softmax over the chosen experts' logits only, i.e. their probabilities
renormalised to sum to 1 (GShard, Mixtral).

Dispatch sorts the ``N * top_k`` (token, slot) assignments by expert and runs each expert
once on exactly its tokens: no dense ``E x N`` compute, and each expert's result does not
depend on the others (what makes growing experts exact, see ``adaptnet.edit.experts``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptnet.nn import _traced
from adaptnet.nn.activations import ACTIVATIONS, make_activation
from adaptnet.nn.groups import Slice, UnitGroup
from adaptnet.nn.losses import KeepsForwardState
from adaptnet.nn.registry import register_model

SPEC_FORMAT = 1


@dataclass(frozen=True)
class MoEStats:
    """What one forward pass of an ``MoE`` did with its ``tokens`` tokens.

    Attributes:
        tokens: ``N``, the number of tokens (all leading dimensions flattened).
        routed_per_expert: assignments the router made to each expert (``N * top_k`` in all).
        tokens_per_expert: assignments each expert processed (after capacity drops).
        dropped: (token, slot) assignments dropped because their expert was full.
        dropped_tokens: tokens all of whose slots were dropped (their output is 0).
        capacity: assignments each expert may take, or None (dropless).
    """

    tokens: int
    routed_per_expert: list[int]
    tokens_per_expert: list[int]
    dropped: int
    dropped_tokens: int
    capacity: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _non_negative(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def expert_capacity(capacity_factor: float, tokens: int, top_k: int, num_experts: int) -> int:
    """``ceil(capacity_factor * tokens * top_k / num_experts)``, at least 1.

    Computed in integers, with the capacity factor as the nearest fraction of denominator at most
    10^6: float noise does not change the result (a factor rescaled with the number of experts by
    ``grow_experts`` gives the same integer), and a number of tokens that ``torch.export`` leaves
    free (a ``SymInt``) gives an integer expression of it rather than a guard on its value.
    """
    ratio = Fraction(capacity_factor).limit_denominator(10**6)
    numerator, denominator = ratio.numerator * top_k, ratio.denominator * num_experts
    return torch.sym_max(1, (numerator * tokens + denominator - 1) // denominator)


@register_model
class MoE(KeepsForwardState):
    """Mixture of experts ``(..., dim) -> (..., dim)`` with top-k routing.

    Args:
        dim: token size.
        num_experts: ``E``, the number of experts.
        hidden: hidden width of each expert MLP.
        top_k: experts per token (1: Switch gates; 2 or more: gates renormalised over the chosen).
        capacity_factor: None for dropless routing; otherwise each expert takes at most
            ``ceil(capacity_factor * N * top_k / E)`` assignments per forward pass. Assignments
            are served slot by slot (every token's first choice before any second choice), in
            token order within a slot; the rest are dropped. A dropped slot contributes
            nothing (no renormalisation): a token whose slots are all dropped gets 0, so wrap
            the layer as ``x + moe(x)`` for such tokens to pass through unchanged.
        aux_loss_coef: ``alpha`` of the load-balancing loss ``alpha * E * sum_i f_i * P_i``,
            ``f_i`` the fraction of the ``N * top_k`` assignments the router gave expert ``i``
            (before capacity drops; for top-1, the fraction of tokens whose choice is ``i``)
            and ``P_i`` the mean router probability of ``i``. Perfect balance gives ``alpha``.
        z_loss_coef: weight of the router z-loss ``mean_n(logsumexp(logits_n) ** 2)``.
        activation: of the expert MLPs, one of ``relu``, ``leaky_relu``, ``gelu``, ``silu``, ``tanh``.

    Parameters: ``router`` (``nn.Linear(dim, E)``), ``w1`` ``(E, hidden, dim)``, ``b1``
    ``(E, hidden)``, ``w2`` ``(E, dim, hidden)``, ``b2`` ``(E, dim)``. After a training-mode
    forward, ``aux_loss()`` returns both losses (the Trainer adds it by itself); every
    forward sets ``last_stats`` (an ``MoEStats``). Only the last forward is remembered.
    """

    forward_state = ("_aux",)

    def __init__(
        self,
        dim: int,
        num_experts: int,
        hidden: int,
        top_k: int = 1,
        capacity_factor: float | None = None,
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        activation: str = "relu",
    ):
        super().__init__()
        _positive_int("dim", dim)
        _positive_int("num_experts", num_experts)
        _positive_int("hidden", hidden)
        _positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} needs at least {top_k} experts, got num_experts={num_experts}")
        if capacity_factor is not None and (_non_negative("capacity_factor", capacity_factor) == 0):
            raise ValueError("capacity_factor must be > 0 (or None for dropless routing), got 0")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.dim, self.top_k, self.activation = dim, top_k, activation
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.aux_loss_coef = _non_negative("aux_loss_coef", aux_loss_coef)
        self.z_loss_coef = _non_negative("z_loss_coef", z_loss_coef)
        self.act = make_activation(activation)
        self.router = nn.Linear(dim, num_experts)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_experts()
        self._aux: torch.Tensor | None = None  # stashed by a training-mode forward
        self._last: tuple[Any, ...] | None = None  # raw record of the last forward (see last_stats)

    def reset_experts(self) -> None:
        """Initialise every expert like a pair of fresh ``nn.Linear`` layers."""
        with torch.no_grad():
            for t, fan_in in ((self.w1, self.dim), (self.b1, self.dim), (self.w2, self.hidden), (self.b2, self.hidden)):
                t.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    # -- sizes are read from the tensors, so that edits never leave them stale -----------------
    @property
    def num_experts(self) -> int:
        return int(self.w1.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.w1.shape[1])

    @property
    def widths(self) -> list[int]:
        """Widths of the unit groups ``widen``/``prune`` address: the experts' hidden width."""
        return [self.hidden]

    def capacity(self, tokens: int) -> int | None:
        """Assignments each expert may take in a forward pass over ``tokens`` tokens (None: dropless)."""
        if self.capacity_factor is None:
            return None
        return expert_capacity(self.capacity_factor, tokens, self.top_k, self.num_experts)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoE expects inputs (..., {self.dim}), got {tuple(x.shape)}")
        num_experts, k = self.num_experts, self.top_k
        if k > num_experts:
            raise ValueError(f"top_k={k} but the layer has only {num_experts} experts")
        tokens = x.reshape(-1, self.dim)  # (N, D)
        n = tokens.shape[0]
        logits = self.router(tokens)  # (N, E)
        top_logits, top_idx = logits.topk(k, dim=-1)  # (N, k), best first
        probs = logits.softmax(dim=-1) if (k == 1 or self.training) else None  # (N, E)
        if k == 1:
            assert probs is not None
            gates = probs.gather(1, top_idx)  # (N, 1): Switch gate, the chosen expert's probability
        else:
            gates = top_logits.softmax(dim=-1)  # (N, k): renormalised over the chosen experts only

        if _traced.tracing(self, x):  # torch.export / torch.compile: fixed shapes, see adaptnet.nn._traced
            self._last, self._aux = None, None
            experts = (self.w1, self.b1, self.w2, self.b2)
            return _traced.moe(tokens, top_idx, gates, self.capacity(n), experts, self.act).reshape(x.shape)

        # Assignments a = slot * N + token (slot-major: first choices are served first).
        expert_of = top_idx.t().reshape(-1)  # (k N,)
        token_of = torch.arange(n, device=x.device).repeat(k)  # (k N,)
        gate_of = gates.t().reshape(-1)  # (k N,)
        order = torch.argsort(expert_of, stable=True)  # by expert, then by assignment
        routed = torch.bincount(expert_of, minlength=num_experts)  # (E,)
        capacity = self.capacity(n)
        kept = routed
        if capacity is not None:
            start = routed.cumsum(0) - routed  # (E,) first sorted position of each expert
            position = torch.arange(order.numel(), device=x.device) - start[expert_of[order]]
            order = order[position < capacity]
            kept = routed.clamp(max=capacity)
        token_sorted = token_of[order]  # (M,)
        inputs = tokens.index_select(0, token_sorted)  # (M, D)
        outputs = []
        # unbind, not w1[e]: one backward node for all experts, instead of a full-size zero
        # gradient per expert (which made 64 experts 10x slower)
        w1, b1, w2, b2 = (t.unbind(0) for t in (self.w1, self.b1, self.w2, self.b2))
        for e, chunk in enumerate(inputs.split(kept.tolist())):
            if chunk.shape[0]:
                hidden = self.act(F.linear(chunk, w1[e], b1[e]))  # (n_e, H)
                outputs.append(F.linear(hidden, w2[e], b2[e]))  # (n_e, D)
        y = torch.cat(outputs) if outputs else tokens.new_zeros(0, self.dim)
        out = tokens.new_zeros(n, self.dim).index_add(0, token_sorted, y * gate_of[order].unsqueeze(1))

        self._last = (n, routed.detach(), kept.detach(), token_sorted.detach(), capacity)
        self._aux = self._losses(logits, probs, routed) if self.training and n > 0 else None
        return out.reshape(x.shape)

    def _losses(self, logits: torch.Tensor, probs: torch.Tensor | None, routed: torch.Tensor) -> torch.Tensor | None:
        """Load-balancing loss plus router z-loss, for the batch just routed."""
        if self.aux_loss_coef == 0 and self.z_loss_coef == 0:
            return None
        assert probs is not None
        n = logits.shape[0]
        fraction = routed.to(probs.dtype) / (n * self.top_k)  # (E,) f_i, no gradient (counts)
        balance = self.aux_loss_coef * self.num_experts * (fraction * probs.mean(dim=0)).sum()
        z = self.z_loss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
        return balance + z

    # -- the loss protocol (adaptnet.nn.losses) and statistics ----------------------------------
    def aux_loss(self) -> torch.Tensor | None:
        """``load balancing + z-loss`` of the last training-mode forward; None after an eval forward."""
        return self._aux

    def clear_loss_state(self) -> None:
        """Forget what the last forward stashed for the losses."""
        self._aux = None

    @property
    def last_stats(self) -> MoEStats | None:
        """Routing statistics of the last forward pass (None before the first)."""
        if self._last is None:
            return None
        n, routed, kept, token_sorted, capacity = self._last
        served = torch.bincount(token_sorted, minlength=n) if n else token_sorted.new_zeros(0)
        return MoEStats(
            tokens=n,
            routed_per_expert=routed.tolist(),
            tokens_per_expert=kept.tolist(),
            dropped=int(routed.sum() - kept.sum()),
            dropped_tokens=int((served == 0).sum()),
            capacity=capacity,
        )

    # -- unit groups (what edits work on) --------------------------------------------------------
    def expert_group(self) -> UnitGroup:
        """The experts as one unit group along dim 0: router rows and bias, and every expert tensor.

        The expert MLPs' input layer (``w1``, ``b1``) and the router are producers (``"out"``);
        the output layer (``w2``, ``b2``) is what the gated sum reads (``"in"``), so an index
        map's ``scale`` rescales an expert's output. ``adaptnet.grow_experts`` edits this group.
        It is not among ``unit_groups()``: ``widen``/``prune`` and growth policies treat those as
        layers of hidden units that Net2Net splitting keeps exact, which experts are not (the
        router's softmax couples them).
        """
        return UnitGroup("experts", 0, (
            Slice(self.router, "weight", 0, "out"),
            Slice(self.router, "bias", 0, "out"),
            Slice(self, "w1", 0, "out"),
            Slice(self, "b1", 0, "out"),
            Slice(self, "w2", 0, "in"),
            Slice(self, "b2", 0, "in"),
        ))

    def unit_groups(self) -> list[UnitGroup]:
        """The experts' hidden units, one group for all experts (unit ``h`` of every expert).

        ``widen(moe, 0, by, init="net2net")`` splits hidden units in every expert at once
        (exact); ``prune(moe, 0, ...)`` removes hidden units from every expert.
        """
        return [UnitGroup("experts.hidden", 0, (
            Slice(self, "w1", 1, "out"),
            Slice(self, "b1", 1, "out"),
            Slice(self, "w2", 2, "in"),
        ))]

    # -- spec (checkpoints) ----------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description of the current architecture (edits included)."""
        return {
            "type": "MoE", "format": SPEC_FORMAT, "dim": self.dim, "num_experts": self.num_experts,
            "hidden": self.hidden, "top_k": self.top_k, "capacity_factor": self.capacity_factor,
            "aux_loss_coef": self.aux_loss_coef, "z_loss_coef": self.z_loss_coef, "activation": self.activation,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> MoE:
        """A freshly initialised ``MoE`` with exactly the architecture of ``spec``."""
        if spec.get("type") != "MoE":
            raise ValueError(f"spec is for {spec.get('type')!r}, not MoE")
        if spec.get("format") != SPEC_FORMAT:
            raise ValueError(f"MoE spec format {spec.get('format')!r} is not supported (expected {SPEC_FORMAT})")
        return cls(**{k: v for k, v in spec.items() if k not in ("type", "format")})

    def extra_repr(self) -> str:
        capacity = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        return (f"dim={self.dim}, num_experts={self.num_experts}, hidden={self.hidden}, top_k={self.top_k}, "
                f"{capacity}, activation={self.activation!r}")
