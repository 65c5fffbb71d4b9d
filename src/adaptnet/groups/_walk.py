"""The walk over an exported graph: the layouts of every value, and how parameters are used.

``Walk`` visits the graph node by node. A rule (``_rules.py``, ``_shape_rules.py``) receives
the node, unifies the layouts of the dimensions the op ties together (``_dims.py``), records
how it uses parameters (``out`` rows that compute units, ``in`` columns that read them, other
per-unit values), and returns the layouts of the node's outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from adaptnet.groups._dims import Dims, Layout

Out = Any  # list[Layout] for a tensor, a list of those for several outputs, None for non-tensors
Rule = Callable[["Walk", fx.Node], Out]


class Walk:
    """The layouts of every value in one graph, and how parameters are used."""

    def __init__(self, dims: Dims):
        self.dims = dims
        self.env: dict[fx.Node, Out] = {}
        # For values that are a parameter (or a transpose of one): its name and, per dim, the
        # parameter's dim. Lets a rule see that ``linear``'s weight is a parameter.
        self.origin: dict[fx.Node, tuple[str, list[int | None]]] = {}
        self.uses: dict[tuple[str, int], list[tuple[str, int]]] = {}  # (param, dim) -> [(role, node index)]
        # For "in" uses: the value each read multiplies (a residual stream's readers that read a
        # LayerNorm's output see zeros in channels that carry the stream's mean: see edit/init.py).
        self.reads: dict[tuple[str, int], list[fx.Node]] = {}
        # Every product (linear, matmul, conv, attention): its output dims and the dims it sums
        # over; multiply-accumulates are the product of their sizes, for any group sizes.
        self.products: list[tuple[list[Layout], list[Layout]]] = []
        # (view node, output dim): the size-1 dims that count one attention head (``_heads.py``).
        self.single_heads: set[tuple[fx.Node, int]] = set()
        self.position = 0

    # -- helpers for rules -------------------------------------------------------------------
    def lay(self, arg: Any) -> list[Layout] | None:
        value = self.env.get(arg) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, list) and all(not isinstance(x, list) for x in value) else None

    def fresh(self, shape: Sequence[int], why: str) -> list[Layout]:
        return [self.dims.new(int(s), why) for s in shape]

    def unify(self, a: Layout, b: Layout, node: fx.Node) -> None:
        self.dims.unify(a, b, f"op {_name(node)}")

    def use(self, arg: Any, dim: int, role: str, reads: Any = None) -> None:
        """Record that parameter ``arg``'s ``dim`` is used as ``role``; an ``in`` use that
        multiplies the value ``reads`` (a linear's input) records that too."""
        if isinstance(arg, fx.Node) and arg in self.origin:
            name, dims = self.origin[arg]
            pdim = dims[dim % len(dims)]
            if pdim is not None:
                self.uses.setdefault((name, pdim), []).append((role, self.position))
                if role == "in" and isinstance(reads, fx.Node):
                    self.reads.setdefault((name, pdim), []).append(reads)

    def use_all(self, arg: Any, role: str) -> None:
        layout = self.lay(arg)
        for d in range(len(layout or ())):
            self.use(arg, d, role)

    def fix_node(self, node: fx.Node, why: str) -> None:
        for value in [self.env.get(a) for a in node.all_input_nodes] + [self.env.get(node)]:
            for layout in _flat(value):
                self.dims.fix(layout, why)


def _flat(value: Out) -> list[Layout]:
    if value is None:
        return []
    if isinstance(value, list):
        return [x for v in value for x in _flat(v)]
    return [value]


def _name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return str(name).split(".")[0]


def shape_of(node: fx.Node) -> list[int] | None:
    val = node.meta.get("val")
    return [int(s) for s in val.shape] if isinstance(val, torch.Tensor) else None


def args(node: fx.Node) -> list[Any]:
    """The node's positional arguments, untyped (rules know each op's signature)."""
    return list(node.args)


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)
