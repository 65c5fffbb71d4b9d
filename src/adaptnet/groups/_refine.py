"""What the walk over a graph cannot see by itself, settled after it: variables that only index
inside another group's units (an attention head's head_dim), constraints that modules assert in
Python (``nn.MultiheadAttention``), and which readers of a stream read a norm's output."""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from adaptnet.groups._dims import Dims, Layout, Mul
from adaptnet.groups._walk import Walk, _name


def leaf_variables(tree: Layout) -> list[int]:
    return [tree] if isinstance(tree, int) else [v for p in tree.parts for v in leaf_variables(p)]


# Ops that keep a zero a zero and pass a value on unmixed: views, dropout, casts, scaling, and the
# activations with f(0) = 0 (new channels reach a reader through relu(norm(x)) as zeros, too).
_PASS_ZERO = frozenset({"view", "reshape", "_unsafe_view", "clone", "contiguous", "dropout", "native_dropout",
                        "getitem", "alias", "detach", "_to_copy", "to", "type_as", "transpose", "permute", "t",
                        "expand", "unsqueeze", "squeeze", "flatten", "mul", "relu", "gelu", "silu", "tanh",
                        "leaky_relu", "elu", "selu", "hardtanh", "relu6", "hardswish", "mish"})


def reads_normalised(reads: list[fx.Node]) -> bool:
    """Whether every value in ``reads`` is a norm's output, up to ops that keep zeros (``_PASS_ZERO``)."""
    def normalised(node: Any) -> bool:
        while isinstance(node, fx.Node) and node.op == "call_function":
            name = _name(node)
            if name in ("layer_norm", "native_layer_norm", "rms_norm"):
                return True
            if name == "mul":
                return any(normalised(a) for a in node.args)
            if name not in _PASS_ZERO or not node.args:
                return False
            node = node.args[0]
        return False
    return bool(reads) and all(normalised(r) for r in reads)


def fix_inner_factors(dims: Dims, trees: list[Layout]) -> None:
    """A variable that only ever indexes inside another free variable's units (the head_dim of
    heads, ``Mul(heads, head_dim)``, in attention written by hand) is not a group: code that
    views into heads writes it down, and it sets the softmax scale."""
    def free(v: int) -> bool:
        return v not in dims.fixed and dims.size(v) > 1

    inner_only: dict[int, bool] = {}

    def visit(x: Layout, under_free: bool) -> None:
        if isinstance(x, int):
            if free(x):
                inner_only[x] = inner_only.get(x, True) and under_free
            return
        if isinstance(x, Mul):
            outer_free = False
            for part in x.parts:
                visit(part, under_free or outer_free)
                # A single head is still the outer factor: its head_dim stays inside it.
                outer_free = outer_free or any(v not in dims.fixed for v in leaf_variables(part))
        else:
            for part in x.parts:
                visit(part, under_free)

    for tree in trees:
        visit(tree, False)
    for v, inner in inner_only.items():
        if inner:
            dims.fixed[v] = "indexes inside another group's units (such as an attention head's head_dim)"


def fix_module_constraints(model: nn.Module, walk: Walk, placeholders: dict[str, fx.Node]) -> None:
    """Constraints the graph cannot show: ``nn.MultiheadAttention`` asserts in Python that
    ``num_heads * head_dim == embed_dim`` (the width of its input), so neither can change alone."""
    for prefix, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for pname, _ in module.named_parameters(prefix=prefix):
                node = placeholders.get(pname)
                for layout in walk.env.get(node, []) if node is not None else []:
                    walk.dims.fix(layout, "nn.MultiheadAttention needs num_heads * head_dim == embed_dim")
