"""MoE against lucidrains' ``mixture-of-experts`` (the peer in ``benchmarks/moe.py``): holding the
same weights, with the same number of slots per expert, both route, drop and compute the same
thing. The peer is installed with the dev tools (``pip install -e '.[dev]'``)."""

from __future__ import annotations

import mixture_of_experts as peer
import pytest
import torch
from torch import nn

from adaptnet.nn.moe import MoE


def _pair(experts: int, factor: float) -> tuple[nn.Module, MoE]:
    torch.manual_seed(experts)
    theirs = peer.MoE(dim=16, num_experts=experts, hidden_dim=32, activation=nn.ReLU, second_policy_train="all",
                      second_policy_eval="all", capacity_factor_train=2 * factor, capacity_factor_eval=2 * factor)
    ours = MoE(16, experts, 32, top_k=2, capacity_factor=factor)
    with torch.no_grad():
        ours.router.weight.copy_(theirs.gate.w_gating.t())
        ours.router.bias.zero_()
        ours.w1.copy_(theirs.experts.w1.transpose(1, 2))
        ours.w2.copy_(theirs.experts.w2.transpose(1, 2))
        ours.b1.zero_()
        ours.b2.zero_()
    return theirs, ours


@pytest.mark.parametrize(("experts", "factor"), [(4, 1.25), (8, 1.25), (8, 0.5)])
def test_same_weights_same_outputs_and_drops(experts: int, factor: float) -> None:
    theirs, ours = _pair(experts, factor)
    x = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0))  # one capacity group of 64 tokens
    with torch.no_grad():
        expected, _ = theirs(x)
        got = ours(x)
        dispatch, _, _ = theirs.gate(x)  # (1, 64, E, capacity)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    stats = ours.last_stats
    assert stats is not None
    assert stats.capacity == dispatch.shape[-1]
    served = dispatch.sum(dim=(2, 3))  # (1, 64) slots served per token
    assert stats.dropped == int(2 * 64 - served.sum())
    assert stats.dropped_tokens == int((served == 0).sum())
    if factor < 1:
        assert stats.dropped > 0  # the comparison covers dropping, not only dropless routing
