"""Unit groups of any ``nn.Module``, found by tracing it once.

``unit_groups(model, example_inputs=(x,))`` traces the model to an ATen graph (Python runs as
usual, tensors are fake, so a trace of a small model takes tens of milliseconds), walks the
graph with the rules of ``_rules.py``, and turns every free dimension variable that some
parameter computes into a ``UnitGroup`` named after the module that first computes it
(``"fc1"``, ``"layers.0.mlp.up_proj"``). The analysis is cached on the model and reused as
long as its modules and parameter names stay the same: width edits change only sizes, which
are read back from the tensors, so only depth edits (new modules) trace again.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from adaptnet.errors import EditError
from adaptnet.groups._dims import Cat, Dims, Layout, Mul
from adaptnet.groups._graph import graph_of
from adaptnet.groups._heads import single_heads
from adaptnet.groups._refine import fix_inner_factors, fix_module_constraints, leaf_variables, reads_normalised
from adaptnet.groups._rules import rule_for
from adaptnet.groups._walk import Walk, shape_of
from adaptnet.nn.groups import Layout as SliceLayout
from adaptnet.nn.groups import Slice, UnitGroup
from adaptnet.nn.protocols import DeclaresGroups, HasExampleInputs, HasSpec

logger = logging.getLogger(__name__)

_CACHE = "_adaptnet_trace"


@dataclass(frozen=True)
class _Part:
    """One tensor dimension of a group: ``param`` (qualified name), ``dim``, its layout tree."""

    param: str
    dim: int
    tree: Layout
    role: str
    fill: float | None
    after_norm: bool = False


@dataclass(frozen=True)
class _Group:
    name: str
    var: int
    parts: tuple[_Part, ...]
    mixed: frozenset[str]
    tied: tuple[str, ...]


@dataclass
class Trace:
    """What one trace found: the groups and, for every other parameter dim, why it is fixed."""

    key: tuple[Any, ...]
    example_inputs: tuple[Any, ...]
    groups: list[_Group]
    sizes: dict[int, int]  # every leaf variable's size at trace time
    fixed: dict[str, str] = field(default_factory=dict)  # "param[dim]" -> why it is not a group
    # Every parameter/buffer dim, groups or not: its variables and its role. Depth edits find a
    # block's writers into the residual stream from these, even where the stream is fixed.
    variables: dict[tuple[str, int], tuple[int, ...]] = field(default_factory=dict)
    roles: dict[tuple[str, int], str] = field(default_factory=dict)
    # The shapes of the outputs on the example inputs: no edit may change them.
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)
    # Multiply-accumulates of the example batch: per product, its output and summed dims' layouts.
    products: list[tuple[tuple[Layout, ...], tuple[Layout, ...]]] = field(default_factory=list)
    batch: int = 1  # the example batch's size (dim 0 of the first input)
    # Kinds of groups (``_kind``) whose edits were checked by tracing again: the check is about the
    # code of the modules a group runs through, so one group of a kind vouches for the others
    # (every block's MLP), and the finding survives a depth edit's new trace.
    verified: frozenset[Any] = frozenset()
    # Groups an edit found to be written into the model's code: no longer offered. (Kept on this
    # object, which the edit's rollback puts back: the finding survives the undone edit.)
    unusable: set[str] = field(default_factory=set)


def structure_key(model: nn.Module) -> tuple[Any, ...]:
    """Changes when modules are added, removed or replaced; not when tensors change shape."""
    return tuple((name, type(m)) for name, m in model.named_modules()) + tuple(
        name for name, _ in model.named_parameters()) + tuple(name for name, _ in model.named_buffers())


def _walk(graph: fx.Graph, names: list[str]) -> tuple[Walk, dict[str, fx.Node]]:
    """Run the rules over the graph; returns the walk and the placeholder of every parameter/buffer.

    The graph's first inputs are the model's parameters and buffers, ``names`` in order.
    """
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    param_of = {node.name: name for node, name in zip(inputs, names, strict=False)}
    dims = Dims()
    walk = Walk(dims)
    walk.single_heads = single_heads(graph)
    placeholders: dict[str, fx.Node] = {}
    for node in graph.nodes:
        walk.position += 1
        if node.op == "placeholder":
            shape = shape_of(node)
            if shape is None:
                continue
            if node.name in param_of:
                name = param_of[node.name]
                placeholders[name] = node
                walk.env[node] = walk.fresh(shape, "")
                for x in walk.env[node]:
                    dims.fixed.pop(x)  # parameters are what groups are made of
                walk.origin[node] = (name, list(range(len(shape))))
            else:
                walk.env[node] = walk.fresh(shape, "a model input")
        elif node.op == "call_function":
            rule = rule_for(node)
            out = rule(walk, node) if rule is not None else None
            val = node.meta.get("val")
            if rule is None or (out is None and (isinstance(val, torch.Tensor) or (
                    isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)))):
                why = f"op {node.target} (no rule)" if rule is None else f"op {node.target} (unexpected arguments)"
                if isinstance(val, torch.Tensor):
                    out = walk.fresh(val.shape, why)
                elif isinstance(val, (tuple, list)):
                    out = [walk.fresh(v.shape, why) if isinstance(v, torch.Tensor) else None for v in val]
                walk.env[node] = out  # before fix_node, which fixes the outputs too
                walk.fix_node(node, why)
            walk.env[node] = out
        elif node.op == "output":
            for arg in node.args[0]:
                for x in walk.lay(arg) or ():
                    dims.fix(x, "a model output")
    dims.settle()
    return walk, placeholders


def _tree(dims: Dims, x: Layout) -> Layout:
    x = dims.resolve(x)
    if isinstance(x, int):
        return x
    parts = tuple(_tree(dims, p) for p in x.parts)
    return Cat(parts) if isinstance(x, Cat) else Mul(parts)


def _role(uses: list[tuple[str, int]]) -> tuple[str, float | None]:
    """A dimension's role and fresh fill, from its uses: computing the units wins over reading them
    (a tied weight does both); a tensor only multiplied in starts new units at 1, one only added at 0."""
    roles = {r for r, _ in uses}
    if "out" in roles:
        return "out", None
    if "in" in roles:
        return "in", None
    if roles == {"scale"}:
        return "norm", 1.0
    if roles == {"shift"}:
        return "norm", 0.0
    return "norm", None


def _analyse(model: nn.Module, example_inputs: tuple[Any, ...]) -> Trace:
    graph, names = graph_of(model, example_inputs)
    walk, placeholders = _walk(graph, names)
    dims = walk.dims
    fix_module_constraints(model, walk, placeholders)
    dims.settle()
    fix_inner_factors(dims, [_tree(dims, x) for node in placeholders.values() for x in walk.env[node]])
    parts: dict[int, list[_Part]] = {}
    first_out: dict[int, tuple[int, str]] = {}
    fixed: dict[str, str] = {}
    sizes: dict[int, int] = {}
    variables: dict[tuple[str, int], tuple[int, ...]] = {}
    roles: dict[tuple[str, int], str] = {}
    for name, node in placeholders.items():
        for d, layout in enumerate(walk.env[node]):
            tree = _tree(dims, layout)
            leaves = dims.leaves(tree)
            sizes.update({v: dims.size(v) for v in leaves})
            uses = walk.uses.get((name, d), [])
            role, fill = _role(uses)
            variables[(name, d)] = tuple(dims.find(v) for v in leaves)
            roles[(name, d)] = role
            free = [v for v in dict.fromkeys(leaves) if v not in dims.fixed and dims.size(v) > 0]
            if not free:
                fixed[f"{name}[{d}]"] = dims.fixed.get(leaves[0], "fixed") if leaves else "empty"
            for v in free:
                if leaves.count(v) > 1 and not isinstance(tree, Cat):
                    dims.fixed[v] = f"units appear twice in {name}[{d}]"
                    continue
                after_norm = role == "in" and reads_normalised(walk.reads.get((name, d), []))
                parts.setdefault(v, []).append(_Part(name, d, tree, role, fill, after_norm))
                if role == "out":
                    position = min((p for r, p in uses if r == "out"), default=1 << 30)
                    if v not in first_out or position < first_out[v][0]:
                        first_out[v] = (position, name)
    groups: list[_Group] = []
    taken: set[str] = set()
    for v, (_, param) in sorted(first_out.items(), key=lambda item: item[1][0]):
        if v in dims.fixed:
            continue
        base = param.rpartition(".")[0] or param
        name, k = base, 2
        while name in taken:
            name, k = f"{base}#{k}", k + 1
        taken.add(name)
        group_parts = tuple(parts[v])
        tied_names = tuple(p.param for p in group_parts
                           if {r for r, _ in walk.uses.get((p.param, p.dim), [])} >= {"out", "in"})
        groups.append(_Group(name, v, group_parts, frozenset(dims.mixed.get(v, ())), tied_names))
    output = next(n for n in graph.nodes if n.op == "output")
    shapes = [tuple(shape_of(a) or ()) for a in output.args[0] if isinstance(a, fx.Node)]
    products = [(tuple(_tree(dims, x) for x in out), tuple(_tree(dims, x) for x in summed))
                for out, summed in walk.products]
    for out, summed in products:
        sizes.update({v: dims.size(v) for x in out + summed for v in leaf_variables(x)})
    first = next((t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim()), None)
    batch = int(first.shape[0]) if first is not None else 1
    return Trace(structure_key(model), example_inputs, groups, sizes, fixed, variables, roles, shapes, products,
                 batch)


# -- from a trace to UnitGroups for the model as it is now ----------------------------------------
def _tree_size(tree: Layout, sizes: Mapping[int, int]) -> int:
    if isinstance(tree, int):
        return sizes[tree]
    values = [_tree_size(p, sizes) for p in tree.parts]
    if isinstance(tree, Cat):
        return sum(values)
    total = 1
    for s in values:
        total *= s
    return total


def _current_sizes(model: nn.Module, trace: Trace) -> dict[int, int]:
    """Group sizes read back from the tensors (edits change them; the trace does not)."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    sizes = dict(trace.sizes)
    pending = {g.var for g in trace.groups}
    while pending:
        solved = set()
        for g in trace.groups:
            if g.var not in pending:
                continue
            for part in g.parts:
                others = [v for v in leaf_variables(part.tree) if v != g.var]
                if any(v in pending for v in others):
                    continue
                b = _tree_size(part.tree, {**sizes, g.var: 0})
                a = _tree_size(part.tree, {**sizes, g.var: 1}) - b
                sizes[g.var] = (int(tensors[part.param].shape[part.dim]) - b) // a
                solved.add(g.var)
                break
        if not solved:
            raise EditError("the model's tensor shapes no longer match its traced structure; trace it again "
                            "with adaptnet.unit_groups(model, example_inputs=...)")
        pending -= solved
    return sizes


def _concrete(tree: Layout, var: int, sizes: Mapping[int, int]) -> SliceLayout:
    if isinstance(tree, int):
        return ("g",) if tree == var else ("n", sizes[tree])
    kind = "cat" if isinstance(tree, Cat) else "mul"
    return (kind, tuple(_concrete(p, var, sizes) for p in tree.parts))


def _build(model: nn.Module, trace: Trace) -> dict[str, UnitGroup]:
    sizes = _current_sizes(model, trace)
    out: dict[str, UnitGroup] = {}
    for layer, g in enumerate(gr for gr in trace.groups if gr.name not in trace.unusable):
        slices = []
        for part in sorted(g.parts, key=lambda p: ("out", "norm", "in").index(p.role)):
            module_name, _, attr = part.param.rpartition(".")
            layout = None if part.tree == g.var else _concrete(part.tree, g.var, sizes)
            slices.append(Slice(model.get_submodule(module_name), attr, part.dim, part.role,  # type: ignore[arg-type]
                                layout, part.fill, part.after_norm))
        out[g.name] = UnitGroup(g.name, layer, tuple(slices), sizes[g.var], g.mixed, g.tied)
    return out


def trace(model: nn.Module, example_inputs: Sequence[Any] | None = None) -> Trace:
    """The model's cached trace, traced again when its modules changed or new inputs are given."""
    cached: Trace | None = model.__dict__.get(_CACHE)
    key = structure_key(model)
    if example_inputs is None:
        if cached is not None and cached.key == key:
            return cached
        example_inputs = inputs_for(model)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    inputs = tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t for t in inputs)
    result = _analyse(model, inputs)
    if cached is not None:
        result.verified = cached.verified
    model.__dict__[_CACHE] = result
    logger.debug("traced %s: %d unit groups", type(model).__name__, len(result.groups))
    return result


def inputs_for(model: nn.Module) -> tuple[Any, ...]:
    """Inputs to run ``model`` on: its own ``example_inputs()``, or those it was traced with, on
    its current device and (floating) dtype."""
    if isinstance(model, HasExampleInputs):
        return tuple(model.example_inputs())
    cached: Trace | None = model.__dict__.get(_CACHE)
    if cached is None:
        raise EditError(
            f"adaptnet needs example inputs to trace {type(model).__name__} once: call "
            "adaptnet.unit_groups(model, example_inputs=(x,)) first (x: a batch as forward() takes it)"
        )
    ref = next(iter(model.parameters()), None)
    if ref is None:
        return cached.example_inputs
    return tuple(t.to(device=ref.device, dtype=ref.dtype if t.is_floating_point() else t.dtype)
                 if isinstance(t, torch.Tensor) else t for t in cached.example_inputs)


def unit_groups(model: nn.Module, example_inputs: Sequence[Any] | None = None) -> dict[str, UnitGroup]:
    """Every unit group of ``model``, in the order the forward pass computes them.

    Args:
        model: any ``nn.Module``. A model with its own ``unit_groups()`` method (hand-declared
            groups, such as ``adaptnet.MoE``) is asked instead of traced.
        example_inputs: the positional inputs of one forward call (a tensor or a tuple). Needed
            the first time; kept with the cached trace for later re-traces (after depth edits).

    Returns:
        An ordered mapping from group name (the module that first computes the units) to
        ``UnitGroup``.
    """
    if isinstance(model, DeclaresGroups):
        return {g.name: g for g in model.unit_groups()}
    return _build(model, trace(model, example_inputs))


def macs(model: nn.Module, grow: Mapping[str, int] | None = None, inputs: tuple[Any, ...] | None = None) -> int:
    """Multiply-accumulates of one forward pass per sample, counted from the traced graph (every
    linear, matmul, convolution and attention product), for the group sizes the model has now,
    or with ``grow[name]`` more units in the named groups. Needs no forward pass.

    ``inputs`` (a batch): count for samples of their shape (images of another size, longer
    sequences), tracing again if the model was traced on samples of another shape.
    """
    found = trace(model)
    if inputs is not None and _sample_shapes(inputs) != _sample_shapes(found.example_inputs):
        found = trace(model, inputs)
    sizes = _current_sizes(model, found)
    for g in found.groups:
        sizes[g.var] += (grow or {}).get(g.name, 0)
    total = 0
    for out, summed in found.products:
        count = 1
        for x in out + summed:
            count *= _tree_size(x, sizes)
        total += count
    return total // max(1, found.batch)


def _sample_shapes(inputs: Sequence[Any]) -> list[tuple[int, ...]]:
    return [tuple(t.shape[1:]) for t in inputs if isinstance(t, torch.Tensor)]


def _trusted(model: nn.Module) -> bool:
    """adaptnet's own models and models built only from ``torch.nn``'s modules compute every size
    from their tensors (``nn.MultiheadAttention``, which does not, is never a group)."""
    if isinstance(model, (DeclaresGroups, HasSpec)):
        return True
    return all(type(m).__module__.startswith("torch.nn.") for m in model.modules())


def verify_group(model: nn.Module, edited: str) -> str | None:
    """After the first width edit of a group of ``edited``'s kind (``_kind``) in a model with code
    of its own: trace it again and compare its groups with those read from the tensors. A size written
    into the code (``view(b, -1, n_heads, d)``: the ``-1`` takes the new heads) runs, but traces
    differently. Returns what differs, or None. Groups of one unit are left out of the comparison:
    a trace cannot tell one unit from a broadcast.
    """
    if _trusted(model):
        return None
    found = trace(model)
    kind = _kind(unit_groups(model)[edited])
    if kind in found.verified:
        return None
    expected = {name: g.size for name, g in unit_groups(model).items() if g.size > 1}
    try:
        again = _build(model, _analyse(model, inputs_for(model)))
    except EditError as err:
        # As wrong as groups that differ: one written head (view(b, -1, 1, d)) widened into two
        # traces as heads inside the tokens, which no sizes solve.
        failure = f"it no longer traces as it did ({err})"
    else:
        seen = {name: g.size for name, g in again.items() if g.size > 1 and name not in found.unusable}
        if seen == expected:
            # The first trace stays: it saw every group at its traced size (none was a single unit).
            model.__dict__[_CACHE] = replace(found, verified=found.verified | {kind})
            return None
        differ = sorted(set(seen.items()) ^ set(expected.items()))
        failure = f"traced again, its unit groups differ from those edited ({differ[:4]})"
    found.unusable.add(edited)
    found.fixed[edited] = "a size written into the model's code (an edit of it traced differently)"
    return f"{failure}; {edited!r} is no longer offered"


def verify_one_unit(model: nn.Module, name: str) -> str | None:
    """After a prune leaves group ``name`` one unit: trace again and check that the group is still
    there, made of the same tensor dims. One unit is a size-1 dim, and most size-1 dims carry no
    index (an unsqueeze, a broadcast). One attention head is read as a head (``_heads.py``), and so
    is one key/value head, shared by SDPA's ``enable_gqa`` or repeated for its query heads by
    ``expand`` and ``reshape`` (Hugging Face's ``repeat_kv``). A one-unit group that a trace would
    read otherwise would vanish at the next trace (a depth edit, a load) and never grow again.
    Returns what differs, or None.
    """
    if isinstance(model, DeclaresGroups):
        return None
    before = next(g for g in trace(model).groups if g.name == name)
    try:
        again = _analyse(model, inputs_for(model))
    except EditError as err:
        return f"it no longer traces ({err})"
    after = next((g for g in again.groups if g.name == name), None)
    if after is None:
        return "traced again, its one unit is no unit group (a size-1 dim read as a broadcast)"

    def dims(g: _Group) -> set[tuple[str, int, str]]:
        return {(p.param, p.dim, p.role) for p in g.parts}

    if dims(after) != dims(before):
        differ = sorted(dims(after) ^ dims(before))
        return f"traced again, its one unit is a group of other tensors ({differ[:4]})"
    return None


def _kind(group: UnitGroup) -> frozenset[tuple[str, str, int, str]]:
    """What a group is made of, whatever its place: (module class, tensor, dim, role) of its slices."""
    return frozenset((type(sl.module).__qualname__, sl.name, sl.dim, sl.role) for sl in group.slices)


def widths(model: nn.Module) -> list[int]:
    """The sizes of the model's unit groups, in order: ``model.widths`` where the model has it,
    else the traced groups' sizes ([] for a model never traced)."""
    own = getattr(model, "widths", None)
    if own is not None:
        return list(own)
    if isinstance(model, DeclaresGroups) or _CACHE in model.__dict__:
        return [g.size for g in unit_groups(model).values()]
    return []


def ensure_traced(model: nn.Module, inputs: Any) -> None:
    """Trace ``model`` on ``inputs`` (one batch's inputs) unless it can already be traced or
    declares its groups: what the Trainer does with a user's model before its policies decide."""
    if isinstance(model, (DeclaresGroups, HasExampleInputs)):
        return
    if _CACHE not in model.__dict__:
        trace(model, inputs if isinstance(inputs, tuple) else (inputs,))


def find_group(model: nn.Module, layer: Any, what: str) -> UnitGroup:
    """The group ``layer`` names (a group name, or an index into the groups' order)."""
    groups = unit_groups(model)
    names = list(groups)
    if isinstance(layer, str):
        if layer in groups:
            return groups[layer]
        near = difflib.get_close_matches(layer, names, n=3, cutoff=0.3) or names[:5]
        cached: Trace | None = model.__dict__.get(_CACHE)
        why = sorted({reason for key, reason in (cached.fixed if cached is not None else {}).items()
                      if key.startswith(layer + ".")})
        raise EditError(f"{what}: {layer!r} is not a unit group of {type(model).__name__}"
                        + (f" (its tensors are fixed: {'; '.join(why[:2])})" if why else "")
                        + f"; nearest: {', '.join(near) if near else 'none (no groups)'}")
    if isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < len(names):
        return groups[names[layer]]
    raise EditError(
        f"{what} must be a group name or an integer in [0, {len(names) - 1}] (the model has {len(names)} "
        f"unit groups, widths {[g.size for g in groups.values()]}); got {layer!r}"
        if names else f"{what}={layer!r}: {type(model).__name__} has no hidden layer (no unit group)")
