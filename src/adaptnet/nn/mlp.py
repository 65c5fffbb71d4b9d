"""AdaptiveMLP: a multilayer perceptron whose widths and depth can change during training."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adaptnet._tensor import set_parameter
from adaptnet.errors import EditError
from adaptnet.nn._stack import StackedNet
from adaptnet.nn.activations import ACTIVATIONS, make_activation
from adaptnet.nn.blocks import Block, ResidualBlock
from adaptnet.nn.registry import register_model

NORMS = (None, "batch", "layer")


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@register_model
class AdaptiveMLP(StackedNet):
    """An MLP ``in_features -> hidden... -> out_features`` whose structure can be edited.

    The seed example's ``AdaptiveNet(10, 50, 1)`` is ``AdaptiveMLP(10, [50], 1)``.

    Args:
        in_features: input size; inputs are ``(B, in_features)``.
        hidden: width of each hidden layer (may be empty: a linear model).
        out_features: output size; outputs are ``(B, out_features)``.
        activation: one of ``relu``, ``leaky_relu``, ``gelu``, ``silu``, ``tanh``.
        norm: ``None``, ``"batch"`` (BatchNorm1d) or ``"layer"`` (LayerNorm) after each hidden Linear.
        dropout: dropout probability after each hidden activation.
    """

    widths_arg = "hidden"

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        activation: str = "relu",
        norm: str | None = None,
        dropout: float = 0.0,
    ):
        _check_positive("in_features", in_features)
        _check_positive("out_features", out_features)
        if isinstance(hidden, int):
            hidden = [hidden]
        for i, width in enumerate(hidden):
            _check_positive(f"hidden[{i}]", width)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of None, 'batch', 'layer', got {norm!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        options = {
            "in_features": in_features,
            "out_features": out_features,
            "activation": activation,
            "norm": norm,
            "dropout": float(dropout),
        }
        super().__init__(in_features, out_features, options)
        self._build([{"kind": "dense", "width": w} for w in hidden])

    def _make_op(self, n_in: int, n_out: int) -> nn.Linear:
        return nn.Linear(n_in, n_out, bias=self.options["norm"] is None)

    def _make_norm(self, n: int) -> nn.Module:
        norm = self.options["norm"]
        if norm == "batch":
            return nn.BatchNorm1d(n)
        if norm == "layer":
            return nn.LayerNorm(n)
        return nn.Identity()

    def _make_act(self) -> nn.Module:
        return make_activation(self.options["activation"])

    def _make_post(self, residual: bool) -> nn.Module:
        p = self.options["dropout"]
        return nn.Dropout(p) if p > 0 else nn.Identity()

    def _remove_dense(self, index: int) -> None:
        """Replace dense layer ``index`` and its consumer by their linear composition.

        The removed layer's normalisation and activation are dropped, so the function
        changes (``remove_layer`` reports by how much on a batch).
        """
        after = self.blocks[index + 1] if index + 1 < len(self.blocks) else None
        if isinstance(after, ResidualBlock):
            raise EditError(
                f"layer {index} feeds residual blocks {self._residual_layers()}; remove those first"
            )
        removed = self.blocks[index]
        assert isinstance(removed, Block)
        consumer = after.op if isinstance(after, Block) else self.head
        with torch.no_grad():
            w_removed, b_removed = removed.op.weight, removed.op.bias
            if consumer.bias is not None and b_removed is not None:
                set_parameter(consumer.bias, consumer.bias + consumer.weight @ b_removed)
            set_parameter(consumer.weight, consumer.weight @ w_removed)  # (out, in of removed)
            consumer.in_features = consumer.weight.shape[1]
        del self.blocks[index]
