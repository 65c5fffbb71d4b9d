"""The shared body of AdaptiveMLP and AdaptiveCNN: a stack of blocks, a readout, a linear head.

Both models differ only in which layers make up a block (Linear vs Conv2d, dropout vs
pooling) and how features reach the head (as they are vs global average pooling).
Everything structural (spec, depth changes, example inputs) lives here once; their unit
groups are found by tracing, as for any model.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from adaptnet.errors import EditError
from adaptnet.nn.blocks import Block, Op, ResidualBlock

SPEC_FORMAT = 1
BlockSpec = Mapping[str, Any]


class StackedNet(nn.Module, metaclass=ABCMeta):
    """Blocks (``Block`` or ``ResidualBlock``) followed by a readout and a linear head.

    Subclasses define the layers of a block (``_make_op``, ``_make_norm``, ``_make_post``),
    the readout before the head, and their constructor options (``options``).
    """

    # Name of the constructor argument that lists the widths of the dense blocks.
    widths_arg: ClassVar[str]
    blocks: nn.ModuleList
    head: nn.Linear

    def __init__(self, in_size: int, out_size: int, options: dict[str, Any]):
        super().__init__()
        self.in_size, self.out_size = in_size, out_size
        self.options = options  # JSON-serialisable constructor options (part of spec())

    # -- hooks for subclasses ------------------------------------------------------------
    @abstractmethod
    def _make_op(self, n_in: int, n_out: int) -> Op:
        """The layer of a block: Linear or Conv2d."""

    @abstractmethod
    def _make_norm(self, n: int) -> nn.Module:
        """Normalisation over ``n`` units, or Identity."""

    @abstractmethod
    def _make_post(self, residual: bool) -> nn.Module:
        """What follows the activation: dropout or pooling (residual blocks never pool)."""

    @abstractmethod
    def _make_act(self) -> nn.Module:
        """A fresh activation module."""

    def _readout(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _remove_dense(self, index: int) -> None:
        raise EditError(
            f"{type(self).__name__} can only remove residual blocks (layers "
            f"{self._residual_layers()}); layer {index} is a dense block"
        )

    # -- building ------------------------------------------------------------------------
    def _build(self, block_specs: Sequence[BlockSpec]) -> None:
        blocks: list[nn.Module] = []
        stream = self.in_size
        for i, b in enumerate(block_specs):
            kind, width = b.get("kind"), b.get("width")
            if not isinstance(width, int) or isinstance(width, bool) or width < 1:
                raise ValueError(f"block {i}: width must be a positive integer, got {width!r}")
            if kind == "dense":
                blocks.append(self._dense(stream, width))
                stream = width
            elif kind == "residual":
                if i == 0:
                    raise ValueError("block 0 must be 'dense'; a residual block needs a stream")
                blocks.append(self._residual(stream, width))
            else:
                raise ValueError(f"block {i}: kind must be 'dense' or 'residual', got {kind!r}")
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(stream, self.out_size)

    def _dense(self, n_in: int, n_out: int) -> Block:
        return Block(self._make_op(n_in, n_out), self._make_norm(n_out), self._make_act(), self._make_post(False))

    def _residual(self, stream: int, inner: int) -> ResidualBlock:
        return ResidualBlock(
            self._make_op(stream, inner),
            self._make_norm(inner),
            self._make_act(),
            self._make_post(True),
            self._make_op(inner, stream),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self._readout(x))

    # -- description ---------------------------------------------------------------------
    def _blocks(self) -> list[Block | ResidualBlock]:
        return list(self.blocks)  # type: ignore[arg-type]

    @property
    def widths(self) -> list[int]:
        """Current width of every hidden layer (inner width for residual blocks)."""
        return [b.width for b in self._blocks()]

    def block_specs(self) -> list[dict[str, Any]]:
        return [
            {"kind": "residual" if isinstance(b, ResidualBlock) else "dense", "width": b.width}
            for b in self._blocks()
        ]

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description of the current architecture (edits included)."""
        return {"type": type(self).__name__, "format": SPEC_FORMAT, **self.options, "blocks": self.block_specs()}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> StackedNet:
        """Build a freshly initialised model with exactly the architecture of ``spec``."""
        if spec.get("type") != cls.__name__:
            raise ValueError(f"spec is for {spec.get('type')!r}, not {cls.__name__}")
        if spec.get("format") != SPEC_FORMAT:
            raise ValueError(f"spec format {spec.get('format')!r} is not supported (expected {SPEC_FORMAT})")
        blocks = spec.get("blocks")
        if not isinstance(blocks, list):
            raise ValueError("spec['blocks'] must be a list of {'kind', 'width'} entries")
        options = {k: v for k, v in spec.items() if k not in ("type", "format", "blocks")}
        dense = [b.get("width") for b in blocks if isinstance(b, Mapping) and b.get("kind") == "dense"]
        model = cls(**{**options, cls.widths_arg: dense})
        model._build(blocks)
        return model

    def _residual_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if isinstance(b, ResidualBlock)]

    # -- unit groups: found by tracing, like any model's (adaptnet.unit_groups) -----------------
    def _example_shape(self) -> tuple[int, ...]:
        """The shape of one input sample, for tracing."""
        return (self.in_size,)

    def example_inputs(self) -> tuple[torch.Tensor]:
        """A batch of two zero inputs, on the model's device and dtype (what a trace needs)."""
        ref = next(self.parameters())
        return (torch.zeros(2, *self._example_shape(), dtype=ref.dtype, device=ref.device),)

    # -- depth changes (called by adaptnet.edit.deepen / remove_layer) ----------------------
    def insert_residual(self, after: int, width: int | None = None) -> ResidualBlock:
        """Insert a residual block after layer ``after`` that computes the identity.

        Its last layer starts at zero, so ``x + op2(...) == x`` exactly, in train and eval
        mode, with any normalisation inside the block.
        """
        stream = next(b.width for b in reversed(self._blocks()[: after + 1]) if isinstance(b, Block))
        block = self._residual(stream, width or stream)
        with torch.no_grad():
            block.op2.weight.zero_()
            if block.op2.bias is not None:
                block.op2.bias.zero_()
        ref = next(self.parameters())
        block.to(device=ref.device, dtype=ref.dtype)
        block.train(self.training)
        self.blocks.insert(after + 1, block)
        return block

    def remove_block(self, index: int) -> None:
        """Remove hidden layer ``index`` (a residual block, or a dense block where supported)."""
        if isinstance(self.blocks[index], ResidualBlock):
            del self.blocks[index]
        else:
            self._remove_dense(index)
