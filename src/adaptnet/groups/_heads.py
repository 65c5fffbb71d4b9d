"""One attention head: which size-1 dims of a view count heads, found before the walk.

With several heads, a view into heads (``view(b, t, -1, head_dim)``) splits a projection's width
into ``Mul(heads, head_dim)``: the heads are a group, and head_dim, which only indexes inside a
head, is not (``_refine.fix_inner_factors``). With one head the view makes a size-1 dim, and a
size-1 dim is also what ``unsqueeze``, broadcasting and ``keepdim`` make, so products drop it
(``Dims._factors``): the projection's width would be head_dim itself, a group whose every edit
breaks the view (or, with SDPA, which fixes head_dim, no group at all). The graph tells the
heads apart by their use: an attention product (``q @ k^T``, ``weights @ v``, SDPA) takes them
as a batch dim. Such a dim, followed back through transposes and elementwise ops (scaling,
rotary embeddings) to the view that split it off a wider dim, becomes one head
(``Dims.new_head``), so that one head traces as several do.

One key/value head shared by several query heads (multi-query attention) is repeated for them by
hand (Hugging Face's ``repeat_kv``: ``k[:, :, None].expand(b, 1, n_rep, t, d).reshape(b, n_rep, t, d)``),
so the product sees ``n_rep`` heads, not a size-1 dim. The reshape merges the key/value head
(outer) with the copies ``expand`` made (inner), as it merges several key/value heads with theirs:
followed through that merge, the size-1 dim is the key/value head, and with it the query heads
become ``Mul(kv head, n_rep)`` as with several key/value heads.
"""

from __future__ import annotations

from math import prod

from torch import fx

from adaptnet.groups._walk import _arg, _name, args, shape_of

RESHAPES = frozenset({"view", "reshape", "_unsafe_view", "flatten", "unflatten"})
_PERMUTES = frozenset({"transpose", "swapaxes", "permute", "t"})
# Ops whose output dim p is their first input's dim p: the way back from a product to its view.
_SAME_DIMS = frozenset({"alias", "clone", "contiguous", "detach", "_to_copy", "to", "type_as", "dropout", "mul",
                        "div", "add", "sub", "neg", "slice"})


def single_heads(graph: fx.Graph) -> set[tuple[fx.Node, int]]:
    """(view node, output dim) of every size-1 dim that counts the heads of an attention product."""
    found: set[tuple[fx.Node, int]] = set()
    for node in graph.nodes:
        out = shape_of(node)
        if node.op != "call_function" or out is None:
            continue
        name = _name(node)
        # (operand, its dim) where the product counts heads. A dim of several heads is followed
        # back, too: it may be one key/value head repeated for its query heads (``_view_of``).
        operands: list[tuple[fx.Node, int]] = []
        if name == "matmul":
            for a in args(node)[:2]:
                shape = shape_of(a) if isinstance(a, fx.Node) else None
                if shape is None or len(shape) < 3:
                    continue
                offset = len(out) - len(shape)
                # Not a size-1 dim broadcast against the other operand's heads.
                operands += [(a, d) for d in range(len(shape) - 2) if shape[d] == out[offset + d]]
        elif name == "scaled_dot_product_attention" and len(out) >= 3:
            q_heads = out[-3]
            gqa = bool(node.kwargs.get("enable_gqa", False))
            for a in args(node)[:3]:
                shape = shape_of(a) if isinstance(a, fx.Node) else None
                # One key/value head shared by several query heads (GQA) counts heads, too; without
                # enable_gqa, a size-1 dim against several query heads is a broadcast.
                if shape is not None and len(shape) >= 3 and (shape[-3] > 1 or q_heads == 1 or gqa):
                    operands.append((a, len(shape) - 3))
        for operand, dim in operands:
            view = _view_of(operand, dim)
            if view is not None:
                found.add(view)
    return found


def _view_of(node: fx.Node, dim: int) -> tuple[fx.Node, int] | None:
    """The view that made ``node``'s size-1 ``dim`` by splitting it off a wider dim, and the dim there.
    A ``dim`` of several heads leads to one only through ``repeat_kv``'s merge (``_repeated_head``)."""
    while node.op == "call_function":
        name = _name(node)
        source = args(node)[0] if node.args else None
        if not isinstance(source, fx.Node):
            return None
        shape, out = shape_of(source), shape_of(node)
        if name in RESHAPES:
            if shape is None or out is None:
                return None
            carried = carried_ones(shape, out)
            if out[dim] == 1 and dim in carried:  # a view that keeps the head (repeat_kv with n_rep 1)
                dim = carried[dim]
            elif out[dim] == 1:
                return (node, dim) if splits_off(shape, out, dim) else None
            else:
                found = _repeated_head(source, shape, out, dim)
                if found is None:
                    return None
                dim = found
        elif name in _PERMUTES:
            dim = _source_dim(node, dim)
        elif name == "unsqueeze" and out is not None:  # another dim made: ours moves by one
            made = int(args(node)[1]) % len(out)
            if made == dim:
                return None
            dim -= dim > made
        elif name == "expand" and shape is not None and out is not None:  # our dim kept, not broadcast
            dim -= len(out) - len(shape)
            if dim < 0 or shape[dim] != out[dim + len(out) - len(shape)]:
                return None
        elif name == "getitem":  # q, k, v = qkv.unbind(0): each is one index of the unbound dim
            if _name(source) != "unbind" or not isinstance(args(source)[0], fx.Node):
                return None
            unbound = int(_arg(source, 1, "dim", 0)) % (len(shape_of(node) or ()) + 1)
            dim, source = dim + (dim >= unbound), args(source)[0]
        elif name not in _SAME_DIMS or shape_of(source) != shape_of(node):
            return None
        node = source
    return None


def _repeated_head(expand: fx.Node, shape: list[int], out: list[int], dim: int) -> int | None:
    """For a reshape of ``expand``'s output (``shape``) to ``out``: the input's size-1 dim that is the
    outer part of output ``dim`` when every other input dim merged into it is a copy that ``expand``
    made from a size-1 dim. That is one key/value head repeated for its query heads
    (``(b, 1, n_rep, t, d) -> (b, n_rep, t, d)``); its copies stay a fixed inner factor, as
    ``n_rep`` does with several key/value heads."""
    source = args(expand)[0] if expand.args else None
    original = shape_of(source) if isinstance(source, fx.Node) else None
    if expand.op != "call_function" or _name(expand) != "expand" or original is None:
        return None
    start, end = prod(out[:dim]), prod(out[:dim + 1])
    offset = len(shape) - len(original)
    for i, size in enumerate(shape):
        if size != 1 or prod(shape[:i]) != start:  # not a size-1 dim at the outer end of output ``dim``
            continue
        # The input dims after it that fill output ``dim`` (row-major: up to where ``end`` is reached).
        last = next((j for j in range(i + 2, len(shape) + 1) if prod(shape[:j]) == end), None)
        if last is not None and all(j >= offset and original[j - offset] == 1 < shape[j] for j in range(i + 1, last)):
            return i
    return None


def _source_dim(node: fx.Node, dim: int) -> int:
    """The input dim that a transpose or permute puts at output ``dim``."""
    rank = len(shape_of(node) or ())
    name = _name(node)
    if name in ("transpose", "swapaxes"):
        a, b = int(args(node)[1]) % rank, int(args(node)[2]) % rank
        return b if dim == a else a if dim == b else dim
    if name == "t":
        return rank - 1 - dim
    return int(args(node)[1][dim]) % rank


def carried_ones(shape: list[int], out: list[int]) -> dict[int, int]:
    """For a reshape of ``shape`` to ``out``: the output's size-1 dims that are the input's size-1
    dims carried over (output dim -> input dim), matched in order at the same row-major place."""
    def ones(sizes: list[int]) -> dict[int, list[int]]:
        at: dict[int, list[int]] = {}
        for d, s in enumerate(sizes):
            if s == 1:
                at.setdefault(prod(sizes[:d]), []).append(d)
        return at

    before, after = ones(shape), ones(out)
    return {o: i for place, dims in after.items() for o, i in zip(dims, before.get(place, []), strict=False)}


def splits_off(shape: list[int], out: list[int], dim: int) -> bool:
    """Whether the reshape of ``shape`` to ``out`` makes its size-1 ``dim`` new (not one of the input's)
    and the outer part of a wider input dim, as ``(b, t, h*d) -> (b, t, h, d)`` does with ``h == 1``."""
    if out[dim] != 1 or dim in carried_ones(shape, out):
        return False
    place = prod(out[:dim])
    return any(s > 1 and prod(shape[:i]) <= place < prod(shape[:i + 1]) for i, s in enumerate(shape))
