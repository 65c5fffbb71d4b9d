"""Rules for ops that move dimensions around: views, transposes, slices, concatenation.

A reshape unifies the row-major product of the input's dims with the output's, which splits
a dimension into heads (``(B, T, H*D) -> (B, T, H, D)``) or merges channels and positions
(``(B, C, H, W) -> (B, C*H*W)``: unit ``c`` owns ``H*W`` columns of the next Linear). Slices,
splits and ``cat`` lay parts end to end (a fused qkv projection, gate and up halves).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from adaptnet.groups._dims import Cat, Layout, Mul
from adaptnet.groups._heads import carried_ones
from adaptnet.groups._walk import Out, Walk, _arg, _name, args, shape_of


def dims_arg(arg: Any, rank: int) -> list[int]:
    if arg is None or arg == []:
        return list(range(rank))
    return sorted({int(d) % rank for d in (arg if isinstance(arg, (list, tuple)) else [arg])})


def _reshape(w: Walk, node: fx.Node) -> Out:
    lx, out = w.lay(args(node)[0]), shape_of(node)
    if lx is None or out is None:
        return None
    # A size-1 dim carries no index, unless it counts one attention head: split off here
    # (``w.single_heads``), or carried over from the input (heads merged back, or a no-op view).
    carried = carried_ones([w.dims.size(x) for x in lx], out)
    result = [w.dims.new(s) if s != 1
              else lx[carried[d]] if d in carried and w.dims.one_head(lx[carried[d]])
              else w.dims.new_head() if (node, d) in w.single_heads
              else w.dims.new(1, "size-1 dim") for d, s in enumerate(out)]
    w.unify(Mul(tuple(lx)), Mul(tuple(result)), node)
    return result


def _permute(w: Walk, node: fx.Node) -> Out:
    lx = w.lay(args(node)[0])
    if lx is None:
        return None
    name = _name(node)
    rank = len(lx)
    if name in ("transpose", "swapaxes"):
        a, b = int(args(node)[1]) % rank, int(args(node)[2]) % rank
        order = list(range(rank))
        order[a], order[b] = order[b], order[a]
    elif name in ("t", "numpy_T"):
        order = list(reversed(range(rank)))
    else:
        order = [int(d) % rank for d in args(node)[1]]
    _carry_origin(w, node, order)
    return [lx[d] for d in order]


def _carry_origin(w: Walk, node: fx.Node, order: list[int]) -> None:
    src = args(node)[0]
    if isinstance(src, fx.Node) and src in w.origin:
        name, dims = w.origin[src]
        w.origin[node] = (name, [dims[d] for d in order])


def _identity(w: Walk, node: fx.Node) -> Out:
    src = args(node)[0]
    lx = w.lay(src)
    if lx is None:
        return None
    out = shape_of(node)
    if out is not None and len(out) != len(lx):
        return _reshape(w, node)
    if isinstance(src, fx.Node) and src in w.origin:
        w.origin[node] = w.origin[src]
    return list(lx)


def _unsqueeze(w: Walk, node: fx.Node) -> Out:
    lx = w.lay(args(node)[0])
    if lx is None:
        return None
    d = int(args(node)[1]) % (len(lx) + 1)
    return [*lx[:d], w.dims.new(1, "size-1 dim"), *lx[d:]]


def _squeeze(w: Walk, node: fx.Node) -> Out:
    lx, out = w.lay(args(node)[0]), shape_of(node)
    if lx is None or out is None:
        return None
    dims = dims_arg(_arg(node, 1, "dim"), len(lx))
    return [x for d, x in enumerate(lx) if not (d in dims and w.dims.size(x) == 1)]


def _expand(w: Walk, node: fx.Node) -> Out:
    lx, out = w.lay(args(node)[0]), shape_of(node)
    if lx is None or out is None:
        return None
    offset = len(out) - len(lx)
    return [lx[d - offset] if d >= offset and w.dims.size(lx[d - offset]) == s else w.dims.new(s, "broadcast")
            for d, s in enumerate(out)]


def _repeat(w: Walk, node: fx.Node) -> Out:
    lx, out = w.lay(args(node)[0]), shape_of(node)
    if lx is None or out is None:
        return None
    reps = [int(r) for r in args(node)[1]]
    offset = len(out) - len(lx)
    result: list[Layout] = []
    for d, r in enumerate(reps):
        if d < offset:
            result.append(w.dims.new(out[d], "repeat"))
        elif r == 1:
            result.append(lx[d - offset])
        else:  # tiles: the copy index is the outer factor
            result.append(Mul((w.dims.new(r, "repeat"), lx[d - offset])))
    return result


def _slice(w: Walk, node: fx.Node) -> Out:
    lx, out = w.lay(args(node)[0]), shape_of(node)
    if lx is None or out is None:
        return None
    dim = int(_arg(node, 1, "dim", 0)) % len(lx)
    size = w.dims.size(lx[dim])
    start = _arg(node, 2, "start", 0) or 0
    step = int(_arg(node, 4, "step", 1) or 1)
    start = max(0, min(size, start + size if start < 0 else start))
    result = list(lx)
    if out[dim] == size:
        return result
    piece = w.dims.new(out[dim])
    result[dim] = piece
    if step != 1:
        w.dims.fix(lx[dim], "strided slice")
        w.dims.fix(piece, "strided slice")
        return result
    parts: list[Layout] = [w.dims.new(start)] if start else []
    parts.append(piece)
    rest = size - start - out[dim]
    parts += [w.dims.new(rest)] if rest else []
    w.unify(lx[dim], Cat(tuple(parts)), node)
    return result


def _select(w: Walk, node: fx.Node) -> Out:
    lx = w.lay(args(node)[0])
    if lx is None:
        return None
    dim = int(args(node)[1]) % len(lx)
    w.dims.fix(lx[dim], "indexed by select")
    return [x for d, x in enumerate(lx) if d != dim]


def _unbind(w: Walk, node: fx.Node) -> Out:
    """``q, k, v = qkv.unbind(0)``: each output is one index of ``dim``, which is then fixed."""
    lx, val = w.lay(args(node)[0]), node.meta.get("val")
    if lx is None or not isinstance(val, (tuple, list)):
        return None
    dim = int(_arg(node, 1, "dim", 0)) % len(lx)
    w.dims.fix(lx[dim], "indexed by unbind")
    return [[x for d, x in enumerate(lx) if d != dim] for _ in val]


def _split(w: Walk, node: fx.Node) -> Out:
    lx, val = w.lay(args(node)[0]), node.meta.get("val")
    if lx is None or not isinstance(val, (tuple, list)):
        return None
    dim = int(_arg(node, 2, "dim", 0)) % len(lx)
    pieces = [w.dims.new(v.shape[dim]) for v in val]
    w.unify(lx[dim], Cat(tuple(p for p in pieces if w.dims.size(p))), node)
    return [[*lx[:dim], p, *lx[dim + 1:]] for p in pieces]


def _cat(w: Walk, node: fx.Node) -> Out:
    tensors, out = args(node)[0], shape_of(node)
    if out is None:
        return None
    layouts = [w.lay(t) for t in tensors]
    if any(lt is None for lt in layouts):
        return None
    dim = int(_arg(node, 1, "dim", 0)) % len(out)
    parts = [lt for lt in layouts if lt is not None and len(lt) == len(out) and w.dims.size(lt[dim])]
    result = list(parts[0])
    for lt in parts[1:]:
        for d in range(len(out)):
            if d != dim:
                w.unify(result[d], lt[d], node)
    result[dim] = parts[0][dim] if len(parts) == 1 else Cat(tuple(lt[dim] for lt in parts))
    return result


def _stack(w: Walk, node: fx.Node) -> Out:
    tensors, out = args(node)[0], shape_of(node)
    layouts = [w.lay(t) for t in tensors]
    if out is None or any(lt is None for lt in layouts):
        return None
    dim = int(_arg(node, 1, "dim", 0)) % len(out)
    first = layouts[0]
    assert first is not None
    for lt in layouts[1:]:
        for a, b in zip(first, lt or [], strict=True):
            w.unify(a, b, node)
    return [*first[:dim], w.dims.new(out[dim], "stack"), *first[dim:]]


def _getitem(w: Walk, node: fx.Node) -> Out:
    value = w.env.get(args(node)[0])
    return value[args(node)[1]] if isinstance(value, list) else None


def _nothing(w: Walk, node: fx.Node) -> Out:
    return None


def _created(w: Walk, node: fx.Node) -> Out:
    val = node.meta.get("val")
    return w.fresh(val.shape, f"created in forward ({_name(node)})") if isinstance(val, torch.Tensor) else None
