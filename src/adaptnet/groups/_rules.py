"""What each ATen op says about the dimensions of its inputs and outputs.

An op without a rule fixes every dimension it touches (``trace._walk``): a group is never
found through an op that is not understood. Shape ops live in ``_shape_rules.py``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from adaptnet.groups import _shape_rules as shapes
from adaptnet.groups._dims import Layout, Mul
from adaptnet.groups._walk import Out, Rule, Walk, _arg, _name, args, shape_of


# -- elementwise and broadcasting ---------------------------------------------------------------
def broadcast(w: Walk, node: fx.Node, inputs: Sequence[Any], role: str | None = None) -> Out:
    """Output dims equal the inputs' dims of the same size, aligned from the right."""
    shape = shape_of(node)
    if shape is None:
        return None
    out: list[Layout | None] = [None] * len(shape)
    for arg in inputs:
        layout = w.lay(arg)
        if layout is None:
            continue
        offset = len(shape) - len(layout)
        for d, x in enumerate(layout):
            if offset + d < 0 or w.dims.size(x) != shape[offset + d]:
                continue  # a broadcast dim of size 1
            _meet(w, node, out, offset + d, x)
            if role is not None and shape[offset + d] > 1:
                w.use(arg, d, role)
    return [x if x is not None else w.dims.new(s, "broadcast") for x, s in zip(out, shape, strict=True)]


def _meet(w: Walk, node: fx.Node, out: list[Layout | None], d: int, x: Layout) -> None:
    """Put ``x`` in output slot ``d``: the first input there, then every other one unified with it.
    One head (``Dims.new_head``) against another size-1 dim (a mask's, a bias shared by the heads)
    is a broadcast, as it is with several heads: the head stays, unified with nothing."""
    slot = out[d]
    if slot is None:
        out[d] = x
    elif w.dims.one_head(slot) != w.dims.one_head(x) and w.dims.size(slot) == w.dims.size(x) == 1:
        out[d] = slot if w.dims.one_head(slot) else x
    else:
        w.unify(slot, x, node)


def _elementwise(role: str | None = None) -> Rule:
    def rule(w: Walk, node: fx.Node) -> Out:
        return broadcast(w, node, [a for a in node.args if isinstance(a, fx.Node)], role)
    return rule


def _first_output(w: Walk, node: fx.Node) -> Out:
    """Tuple-returning elementwise ops (``native_dropout``): every output has the input's layout."""
    src = w.lay(args(node)[0])
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return [list(src) if src is not None and isinstance(v, torch.Tensor) and list(v.shape) == shape_of(
            args(node)[0]) else None for v in val]
    return src


# -- matrix products ----------------------------------------------------------------------------
def _linear(w: Walk, node: fx.Node) -> Out:
    x, weight, bias = args(node)[0], args(node)[1], _arg(node, 2, "bias")
    lx, lw, out = w.lay(x), w.lay(weight), shape_of(node)
    if lx is None or lw is None or out is None:
        return None
    result = [*lx[:-1], lw[0]]
    w.unify(lx[-1], lw[1], node)
    w.use(weight, 0, "out")
    w.use(weight, 1, "in", reads=x)
    lb = w.lay(bias)
    if lb is not None:
        w.unify(lb[0], lw[0], node)
        w.use(bias, 0, "out")
    w.products.append((result, [lx[-1]]))
    return result


def _matmul(w: Walk, node: fx.Node, a: Any, b: Any) -> Out:
    la, lb, out = w.lay(a), w.lay(b), shape_of(node)
    if la is None or lb is None or out is None or len(la) < 2 or len(lb) < 2:
        return None
    w.unify(la[-1], lb[-2], node)
    w.use(a, -1, "in", reads=b)
    w.use(a, -2, "out")
    w.use(b, -2, "in", reads=a)
    w.use(b, -1, "out")
    batch = _broadcast_layouts(w, node, [la[:-2], lb[:-2]], out[:-2])
    result = [*batch, la[-2], lb[-1]]
    w.products.append((result, [la[-1]]))
    return result


def _broadcast_layouts(w: Walk, node: fx.Node, layouts: list[list[Layout]], shape: list[int]) -> list[Layout]:
    out: list[Layout | None] = [None] * len(shape)
    for layout in layouts:
        offset = len(shape) - len(layout)
        for d, x in enumerate(layout):
            if w.dims.size(x) == shape[offset + d]:
                _meet(w, node, out, offset + d, x)
    return [x if x is not None else w.dims.new(s, "broadcast") for x, s in zip(out, shape, strict=True)]


def _mm(w: Walk, node: fx.Node) -> Out:
    return _matmul(w, node, args(node)[0], args(node)[1])


def _addmm(w: Walk, node: fx.Node) -> Out:
    out = _matmul(w, node, args(node)[1], args(node)[2])
    if out is not None:
        bias = w.lay(args(node)[0])
        if bias is not None:
            offset = len(out) - len(bias)
            for d, x in enumerate(bias):
                if w.dims.size(x) == w.dims.size(out[offset + d]) and w.dims.size(x) > 1:
                    w.unify(x, out[offset + d], node)
                    w.use(args(node)[0], d, "out")
    return out


# -- convolutions -------------------------------------------------------------------------------
def _conv(w: Walk, node: fx.Node) -> Out:
    name = _name(node)
    x, weight, bias = args(node)[0], args(node)[1], _arg(node, 2, "bias")
    if name == "convolution":
        transposed, groups = bool(args(node)[6]), int(args(node)[8])
    elif name.startswith("conv_transpose"):
        transposed, groups = True, int(_arg(node, 6, "groups", 1))
    else:
        transposed, groups = False, int(_arg(node, 6, "groups", 1))
    lx, lw, out = w.lay(x), w.lay(weight), shape_of(node)
    if lx is None or lw is None or out is None:
        return None
    batched = len(lx) == len(lw)
    c_in = lx[1 if batched else 0]
    # Weight: (out, in/groups, k...) for a conv, (in, out/groups, k...) for a transposed conv.
    w_in, w_out = (lw[0], lw[1]) if transposed else (lw[1], lw[0])
    result = ([lx[0]] if batched else []) + [w.dims.new(out[1 if batched else 0])]
    c_out = result[-1]
    result += w.fresh(out[len(result):], "spatial size of a convolution's output")
    if groups == 1:
        w.unify(c_in, w_in, node)
        w.unify(c_out, w_out, node)
    else:
        # Channels tied across groups: unit g of the groups variable owns one slice of every
        # group's channels. The channels per group stay fixed; the number of groups may change.
        g = w.dims.new(groups)
        per_in = w.dims.new(w.dims.size(c_in) // groups, "channels per group of a grouped convolution")
        per_out = w.dims.new(w.dims.size(c_out) // groups, "channels per group of a grouped convolution")
        w.unify(c_in, Mul((g, per_in)), node)
        w.unify(c_out, Mul((g, per_out)), node)
        if transposed:
            w.unify(w_in, c_in, node)
            w.unify(w_out, per_out, node)
        else:
            w.unify(w_out, c_out, node)
            w.unify(w_in, per_in, node)
    w.use(weight, 0, "in" if transposed else "out", reads=x)
    w.use(weight, 1, "out" if transposed else "in", reads=x)
    lb = w.lay(bias)
    if lb is not None:
        w.unify(lb[0], c_out, node)
        w.use(bias, 0, "out")
    w.products.append((result, lw[1:]))  # each output sums over (in / groups) x kernel
    return result


def _spatial(n_spatial: int) -> Rule:
    """Pooling and resampling: leading (batch, channel) dims kept, spatial dims new."""
    def rule(w: Walk, node: fx.Node) -> Out:
        lx, out = w.lay(args(node)[0]), shape_of(node)
        val = node.meta.get("val")
        if lx is None:
            return None
        if out is None and isinstance(val, (tuple, list)):  # (values, indices)
            shapes = [list(v.shape) for v in val]
            first = list(lx[: len(lx) - n_spatial]) + w.fresh(shapes[0][len(lx) - n_spatial:], "spatial size")
            return [first, list(first)]
        assert out is not None
        return list(lx[: len(lx) - n_spatial]) + w.fresh(out[len(lx) - n_spatial:], "spatial size")
    return rule


# -- normalisation ------------------------------------------------------------------------------
def _layer_norm(kind: str) -> Rule:
    def rule(w: Walk, node: fx.Node) -> Out:
        x, shape = args(node)[0], args(node)[1]
        lx = w.lay(x)
        if lx is None:
            return None
        k = len(shape)
        params = [a for a in args(node)[2:4] if isinstance(a, fx.Node)]
        for p in params:
            lp = w.lay(p)
            if lp is None:
                continue
            for d in range(k):
                w.unify(lp[d], lx[len(lx) - k + d], node)
                w.use(p, d, "norm")
        # A norm without a scale cannot be corrected when the stream widens (edit/init.py: carry).
        scaled = len(args(node)) > 2 and w.lay(args(node)[2]) is not None
        for d in range(len(lx) - k, len(lx)):
            w.dims.mix(lx[d], kind if scaled else f"{kind} without a scale")
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):  # native_layer_norm: (out, mean, rstd)
            return [list(lx)] + [list(lx[: len(lx) - k]) + w.fresh([1] * k, "statistics") for _ in val[1:]]
        return list(lx)
    return rule


def _batch_norm(w: Walk, node: fx.Node) -> Out:
    lx = w.lay(args(node)[0])
    if lx is None:
        return None
    channel = lx[1]
    for p in args(node)[1:5]:
        lp = w.lay(p)
        if lp is not None:
            w.unify(lp[0], channel, node)
            w.use(p, 0, "norm")
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return [list(lx)] + [[channel] if isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == w.dims.size(
            channel) else (w.fresh(v.shape, "statistics") if isinstance(v, torch.Tensor) else None) for v in val[1:]]
    return list(lx)


def _group_norm(w: Walk, node: fx.Node) -> Out:
    lx = w.lay(args(node)[0])
    if lx is None:
        return None
    groups = int(args(node)[1])
    channel = lx[1]
    per_group = w.dims.new(w.dims.size(channel) // groups)
    w.unify(channel, Mul((w.dims.new(groups, "number of groups of a GroupNorm"), per_group)), node)
    w.dims.mix(per_group, "group_norm")
    for p in args(node)[2:4]:
        lp = w.lay(p)
        if lp is not None:
            w.unify(lp[0], channel, node)
            w.use(p, 0, "norm")
    return list(lx)


# -- reductions ---------------------------------------------------------------------------------
def _reduce(w: Walk, node: fx.Node) -> Out:
    lx = w.lay(args(node)[0])
    if lx is None:
        return None
    reduced = shapes.dims_arg(_arg(node, 1, "dim"), len(lx))
    val = node.meta.get("val")
    first = val[0] if isinstance(val, (tuple, list)) else val
    if not isinstance(first, torch.Tensor):
        return None
    keepdim = first.dim() == len(lx)
    for d in reduced:
        w.dims.mix(lx[d], "mean_square" if _name(node) == "mean" and _is_square(args(node)[0]) else _name(node))
    out = [w.dims.new(1, "reduced") if d in reduced else x for d, x in enumerate(lx) if keepdim or d not in reduced]
    if isinstance(val, (tuple, list)):
        return [list(out) for _ in val]
    return out


def _is_square(node: Any) -> bool:
    """``x.pow(2)``, ``x * x``, ``x.square()``: the mean of it is an RMSNorm's statistic."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    a = args(node)
    return (_name(node) == "pow" and len(a) > 1 and a[1] == 2) or _name(node) == "square" or (
        _name(node) == "mul" and len(a) > 1 and a[0] is a[1])


def _along(w: Walk, node: fx.Node) -> Out:
    """Softmax, cumsum...: same shape, units along ``dim`` mixed."""
    lx = w.lay(args(node)[0])
    if lx is None:
        return None
    w.dims.mix(lx[int(args(node)[1]) % len(lx)], _name(node))
    return list(lx)


# -- embeddings and attention ------------------------------------------------------------------
def _embedding(w: Walk, node: fx.Node) -> Out:
    weight, idx = args(node)[0], args(node)[1]
    lw, li = w.lay(weight), w.lay(idx)
    if lw is None or li is None:
        return None
    w.dims.fix(lw[0], "embedding vocabulary (an input dimension)")
    w.use(weight, 1, "out")
    return [*li, lw[1]]


def _sdpa(w: Walk, node: fx.Node) -> Out:
    q, k, v = (w.lay(a) for a in args(node)[:3])
    out = shape_of(node)
    if q is None or k is None or v is None or out is None:
        return None
    gqa = bool(node.kwargs.get("enable_gqa", False))
    heads_q, heads_k = w.dims.size(q[-3]), w.dims.size(k[-3])
    w.unify(k[-3], v[-3], node)
    if gqa and heads_q != heads_k:  # query head h reads key/value head h // (heads_q / heads_k)
        w.unify(q[-3], Mul((k[-3], w.dims.new(heads_q // heads_k, "query heads per key/value head"))), node)
    else:
        w.unify(q[-3], k[-3], node)
    w.unify(k[-2], v[-2], node)
    w.unify(q[-1], k[-1], node)
    # head_dim sets the softmax scale (and models hard-code it in their views): not a group.
    w.dims.fix(q[-1], "attention head_dim")
    w.dims.fix(v[-1], "attention head_dim")
    batch = _broadcast_layouts(w, node, [q[:-3], k[:-3], v[:-3]], out[:-3])
    mask = w.lay(_arg(node, 3, "attn_mask"))
    if mask is not None:
        _broadcast_layouts(w, node, [mask, [*batch, q[-3], q[-2], k[-2]]], [*out[:-1], w.dims.size(k[-2])])
    scores = [*batch, q[-3], q[-2], k[-2]]
    w.products += [(scores, [q[-1]]), ([*batch, q[-3], q[-2], v[-1]], [k[-2]])]  # q k^T, then weights v
    return [*batch, q[-3], q[-2], v[-1]]


def _each(names: str, rule: Rule) -> dict[str, Rule]:
    return dict.fromkeys(names.split(), rule)


RULES: dict[str, Rule] = {
    **_each("abs acos asin atan ceil clamp clamp_max clamp_min cos cosh elu erf erfc exp expm1 floor frac gelu "
            "hardsigmoid hardswish hardtanh isnan leaky_relu log log1p log2 logical_not bitwise_not logical_and "
            "logical_or bitwise_and bitwise_or mish nan_to_num neg reciprocal relu relu6 round rsqrt selu sigmoid "
            "sign silu sin sinh softplus sqrt square tan tanh threshold trunc where eq ne lt le gt ge maximum "
            "minimum masked_fill lerp addcmul addcdiv celu fmod remainder logit pow dropout feature_dropout "
            "alpha_dropout fill zeros_like ones_like full_like empty_like rand_like randn_like bernoulli",
            _elementwise()),
    **_each("add sub rsub", _elementwise("shift")),
    **_each("mul div", _elementwise("scale")),
    "native_dropout": _first_output,
    "linear": _linear, **_each("mm bmm matmul", _mm), **_each("addmm baddbmm", _addmm),
    **_each("conv1d conv2d conv3d convolution conv_transpose1d conv_transpose2d conv_transpose3d", _conv),
    **_each("layer_norm native_layer_norm", _layer_norm("layer_norm")), "rms_norm": _layer_norm("rms_norm"),
    **_each("batch_norm native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training "
            "_native_batch_norm_legit_functional", _batch_norm),
    "group_norm": _group_norm,
    **_each("sum mean amax amin max min var std var_mean std_mean norm linalg_vector_norm logsumexp prod any all "
            "argmax argmin", _reduce),
    **_each("softmax _softmax log_softmax _log_softmax cumsum", _along),
    **_each("max_pool1d avg_pool1d adaptive_avg_pool1d adaptive_max_pool1d upsample_nearest1d upsample_linear1d",
            _spatial(1)),
    **_each("max_pool2d max_pool2d_with_indices avg_pool2d adaptive_avg_pool2d _adaptive_avg_pool2d "
            "adaptive_max_pool2d upsample_nearest2d upsample_bilinear2d upsample_bicubic2d", _spatial(2)),
    **_each("max_pool3d avg_pool3d adaptive_avg_pool3d upsample_nearest3d", _spatial(3)),
    "embedding": _embedding, "scaled_dot_product_attention": _sdpa,
    **_each("alias clone contiguous detach lift_fresh_copy to _to_copy type_as copy", shapes._identity),
    **_each("view reshape _unsafe_view flatten unflatten", shapes._reshape),
    **_each("permute transpose t swapaxes numpy_T", shapes._permute),
    "unsqueeze": shapes._unsqueeze, "squeeze": shapes._squeeze,
    **_each("expand expand_as broadcast_to", shapes._expand),
    "repeat": shapes._repeat, "slice": shapes._slice, "select": shapes._select, "unbind": shapes._unbind,
    **_each("split split_with_sizes chunk tensor_split", shapes._split), **_each("cat concat", shapes._cat),
    "stack": shapes._stack,
    **_each("arange zeros ones full empty scalar_tensor rand randn randint eye linspace new_zeros new_ones new_full "
            "new_empty tensor", shapes._created),
    **_each("_assert_tensor_metadata _assert_scalar sym_size sym_numel sym_stride sym_constrain_range_for_size "
            "_assert_async", shapes._nothing),
}


def rule_for(node: fx.Node) -> Rule | None:
    if node.target is operator.getitem:
        return shapes._getitem
    name = _name(node)
    if name in RULES:
        return RULES[name]
    if name.endswith("_") and name[:-1] in RULES:  # in-place variant: the output is the first input
        return RULES[name[:-1]]
    return None
