"""prune's importance scores choose the units a reference computation says they should.

The references are written out from the layers' weights in float64, independent of adaptnet's
group slices: ``magnitude`` is the L2 norm of everything a unit owns (its producer's weight row
and bias, its consumer's weight columns; a flattened channel owns H*W columns), ``taylor`` is
``|sum of w * dL/dw|`` over the same entries. Scores are summed in the weights' own dtype
(float32/float64; half types in float32), so a bfloat16 model is scored too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaptnet as an


def _lowest(scores: torch.Tensor, n: int) -> tuple[int, ...]:
    return tuple(sorted(torch.argsort(scores, stable=True)[:n].tolist()))


def _mlp(dtype: torch.dtype) -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).to(dtype)
    with torch.no_grad():  # consumer columns of very different sizes: both sides of a unit must count
        model[2].weight.mul_(10 * torch.rand(12).to(dtype))
    x = torch.randn(8, 6, dtype=dtype)
    an.unit_groups(model, (x,))
    return model, x


def _mlp_terms(model: nn.Sequential, of: str) -> torch.Tensor:
    """``(12, entries)``: every entry hidden unit u owns, as float64, from ``of`` (weight or grad)."""
    def get(p: torch.Tensor) -> torch.Tensor:
        return (p if of == "weight" else p.grad).detach().to(torch.float64)
    first, second = model[0], model[2]
    return torch.cat([get(first.weight), get(first.bias)[:, None], get(second.weight).T], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_magnitude_prunes_the_units_of_smallest_norm(dtype: torch.dtype) -> None:
    model, _ = _mlp(dtype)
    expected = _lowest(_mlp_terms(model, "weight").pow(2).sum(dim=1).sqrt(), 5)
    edit = an.prune(model, "0", keep=7, importance="magnitude")
    assert edit.units_removed == expected
    assert model[0].out_features == 7 and model[2].in_features == 7


def test_taylor_with_gradients_present_prunes_the_units_of_smallest_first_order_change() -> None:
    model, x = _mlp(torch.float64)
    F.mse_loss(model(x), torch.zeros(8, 3, dtype=torch.float64)).backward()
    w, g = _mlp_terms(model, "weight"), _mlp_terms(model, "grad")
    expected = _lowest((w * g).sum(dim=1).abs(), 4)
    edit = an.prune(model, "0", keep=8, importance="taylor")
    assert edit.units_removed == expected


def test_magnitude_of_a_flattened_channel_counts_its_h_times_w_columns() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 4))
    an.unit_groups(model, (torch.randn(2, 2, 5, 5),))
    conv, linear = model[0], model[3]
    with torch.no_grad():
        linear.weight.mul_(10 * torch.rand(54))
    owned = torch.cat([conv.weight.detach().reshape(6, -1), conv.bias.detach()[:, None],
                       linear.weight.detach().reshape(4, 6, 9).permute(1, 0, 2).reshape(6, -1)], dim=1)
    expected = _lowest(owned.double().pow(2).sum(dim=1), 3)
    edit = an.prune(model, "0", keep=3, importance="magnitude")
    assert edit.units_removed == expected
    assert linear.in_features == 3 * 9
