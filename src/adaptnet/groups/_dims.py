"""Dimension variables: which dimensions of a traced graph index the same units, and how.

Every dimension of every tensor in the graph gets a *layout*: a variable (an index space of
some size) or a structure of variables. ``Cat`` lays parts one after the other (``torch.cat``,
a fused qkv projection, ``split``); ``Mul`` is a row-major product (a view into heads, the
flatten of ``(C, H, W)`` into a Linear: unit ``c`` owns a block of ``H * W`` columns). Ops
*unify* the layouts of the dimensions they tie together: two variables become one, and a
variable unified with a structure is refined into it (every other dimension that used the
variable then has that structure too). At the end every parameter dimension is a tree whose
leaves are variables; a leaf variable that nothing fixed is a unit group.

Variables are *fixed* when their size cannot change: the model's inputs and outputs, tensors
created inside ``forward`` (``arange``, constants), ops the rules do not understand. A
variable also records the ops that *mix* its units (a LayerNorm or a mean over them): such a
group can be edited, but not every initialiser keeps the function there.

A size-1 dimension carries no index (an ``unsqueeze``, a broadcast, a ``keepdim`` reduction), so
products drop it, except where it counts units: one attention head (``_heads.py``). Such a
variable is *one head*: kept as a factor, ``Mul(heads, head_dim)`` as with several heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod


@dataclass(frozen=True)
class Cat:
    """Parts laid one after the other along a dimension."""

    parts: tuple[Layout, ...]


@dataclass(frozen=True)
class Mul:
    """A row-major product: index ``(i0, i1, ...)`` sits at ``i0 * size(rest) + ...`` (last part fastest)."""

    parts: tuple[Layout, ...]


Layout = int | Cat | Mul  # an int is a variable id


class Dims:
    """Union-find over dimension variables, with refinement into ``Cat``/``Mul`` structures."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._defn: dict[int, Layout] = {}
        self.fixed: dict[int, str] = {}  # root -> why its size cannot change
        self.mixed: dict[int, set[str]] = {}  # root -> ops that mix its units
        self.heads: set[int] = set()  # roots of size-1 variables that count heads: one head

    # -- variables ---------------------------------------------------------------------------
    def new(self, size: int, fixed: str | None = None) -> int:
        v = len(self._parent)
        self._parent.append(v)
        self._size.append(int(size))
        if fixed is not None:
            self.fixed[v] = fixed
        return v

    def new_head(self) -> int:
        """A variable for one attention head: size 1, yet a factor of the width it splits."""
        v = self.new(1)
        self.heads.add(v)
        return v

    def one_head(self, x: Layout) -> bool:
        """Whether ``x`` is a variable of one head (``new_head``)."""
        x = self.resolve(x)
        return isinstance(x, int) and x in self.heads

    def find(self, v: int) -> int:
        root = v
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[v] != root:  # path compression
            self._parent[v], v = root, self._parent[v]
        return root

    def resolve(self, x: Layout) -> Layout:
        """``x`` with its top-level variable replaced by its definition, if it has one."""
        while isinstance(x, int):
            root = self.find(x)
            if root not in self._defn:
                return root
            x = self._defn[root]
        return x

    def size(self, x: Layout) -> int:
        x = self.resolve(x)
        if isinstance(x, int):
            return self._size[x]
        sizes = [self.size(p) for p in x.parts]
        return sum(sizes) if isinstance(x, Cat) else prod(sizes)

    def leaves(self, x: Layout) -> list[int]:
        x = self.resolve(x)
        if isinstance(x, int):
            return [x]
        return [leaf for p in x.parts for leaf in self.leaves(p)]

    def fix(self, x: Layout, reason: str) -> None:
        for leaf in self.leaves(x):
            self.fixed.setdefault(leaf, reason)

    def mix(self, x: Layout, op: str) -> None:
        for leaf in self.leaves(x):
            self.mixed.setdefault(leaf, set()).add(op)

    def settle(self) -> None:
        """Pass what was recorded on refined variables down to the leaves they became."""
        for v in list(self._defn):
            if v in self.fixed:
                self.fix(self._defn[v], self.fixed[v])
            for op in self.mixed.get(v, ()):
                self.mix(self._defn[v], op)

    # -- unification -------------------------------------------------------------------------
    def unify(self, a: Layout, b: Layout, why: str) -> None:
        """Make ``a`` and ``b`` the same layout; where their structures cannot be matched,
        fix both (with ``why``) rather than guess."""
        if not self._unify(a, b):
            self.fix(a, f"{why}: layouts not understood")
            self.fix(b, f"{why}: layouts not understood")

    def _unify(self, a: Layout, b: Layout) -> bool:
        a, b = self.resolve(a), self.resolve(b)
        if a == b:
            return True
        if self.size(a) != self.size(b):
            return False
        if isinstance(a, int) and isinstance(b, int):
            self._union(a, b)
            return True
        if isinstance(a, int) or isinstance(b, int):
            var, tree = (a, b) if isinstance(a, int) else (b, a)
            assert isinstance(var, int) and not isinstance(tree, int)
            if var in self.leaves(tree):
                return False
            self._defn[var] = tree
            return True
        if isinstance(a, Mul) and isinstance(b, Mul):
            return self._unify_products(list(a.parts), list(b.parts))
        ca, cb = self._as_cat(a), self._as_cat(b)
        if ca is None or cb is None:
            return False
        return self._unify_cats(ca, cb)

    def _union(self, a: int, b: int) -> None:
        self._parent[b] = a
        if b in self.fixed:
            self.fixed.setdefault(a, self.fixed.pop(b))
        if b in self.mixed:
            self.mixed.setdefault(a, set()).update(self.mixed.pop(b))
        if b in self.heads:
            self.heads.add(a)

    def _factors(self, parts: list[Layout]) -> list[Layout]:
        """Flatten nested products; size-1 factors carry no index and are dropped, except one head."""
        out: list[Layout] = []
        for p in parts:
            r = self.resolve(p)
            if isinstance(r, Mul):
                out += self._factors(list(r.parts))
            elif self.size(r) != 1 or self.one_head(r):
                out.append(r)
        return out

    def _unify_products(self, fa: list[Layout], fb: list[Layout]) -> bool:
        """Match two row-major products factor by factor from the outermost, splitting a
        factor into ``outer x inner`` where one side is coarser (a reshape into heads)."""
        fa, fb = self._factors(fa), self._factors(fb)
        while fa and fb:
            x, y = fa[0], fb[0]
            sx, sy = self.size(x), self.size(y)
            if sx == sy:
                if not self._unify(x, y):
                    return False
                fa, fb = fa[1:], fb[1:]
                continue
            if sx > sy:  # keep x the smaller one
                x, y, sx, sy, fa, fb = y, x, sy, sx, fb, fa
            if sy % sx:
                return False
            split = self._split_outer(y, sx)
            if split is None:
                return False
            outer, inner = split
            if not self._unify(x, outer):
                return False
            fa, fb = fa[1:], [inner, *fb[1:]]
        return not fa and not fb

    def _split_outer(self, x: Layout, outer: int) -> tuple[Layout, Layout] | None:
        """``x`` as ``Mul(o, i)`` with ``size(o) == outer``, refining a variable if needed."""
        x = self.resolve(x)
        if isinstance(x, int):
            o, i = self.new(outer), self.new(self._size[x] // outer)
            self._defn[x] = Mul((o, i))
            return o, i
        if isinstance(x, Mul):
            factors = self._factors(list(x.parts))
            if factors and self.size(factors[0]) % outer == 0:
                head = self._split_outer(factors[0], outer)
                if head is not None:
                    return head[0], Mul((head[1], *factors[1:]))
        return None

    def _as_cat(self, x: Layout) -> list[Layout] | None:
        """The parts of ``x`` laid end to end (a product whose outer factor is a Cat distributes)."""
        x = self.resolve(x)
        if isinstance(x, Cat):
            return list(x.parts)
        if isinstance(x, Mul):
            factors = self._factors(list(x.parts))
            if not factors:
                return None
            outer = self.resolve(factors[0])
            if isinstance(outer, Cat):
                return [Mul((p, *factors[1:])) for p in outer.parts]
            return [x]
        return [x]

    def _unify_cats(self, ca: list[Layout], cb: list[Layout]) -> bool:
        cuts = sorted(set(_offsets(self, ca)) | set(_offsets(self, cb)))
        pa, pb = self._pieces(ca, cuts), self._pieces(cb, cuts)
        if pa is None or pb is None or len(pa) != len(pb):
            return False
        return all(self._unify(x, y) for x, y in zip(pa, pb, strict=True))

    def _pieces(self, parts: list[Layout], cuts: list[int]) -> list[Layout] | None:
        """Split ``parts`` (laid end to end) at every offset in ``cuts``."""
        pieces: list[Layout] = []
        start = 0
        for p in parts:
            size = self.size(p)
            inner = [c - start for c in cuts if start < c < start + size]
            rest: Layout = p
            done = 0
            for c in inner:
                split = self._split_at(rest, c - done)
                if split is None:
                    return None
                pieces.append(split[0])
                rest, done = split[1], c
            pieces.append(rest)
            start += size
        return pieces

    def _split_at(self, x: Layout, offset: int) -> tuple[Layout, Layout] | None:
        """``x`` as ``Cat(left, right)`` with ``size(left) == offset``."""
        x = self.resolve(x)
        if isinstance(x, int):
            left, right = self.new(offset), self.new(self._size[x] - offset)
            self._defn[x] = Cat((left, right))
            return left, right
        parts = self._as_cat(x)
        if parts is None:
            return None
        if len(parts) == 1:  # a product: split its outer factor at a multiple of the inner size
            assert isinstance(x, Mul)
            factors = self._factors(list(x.parts))
            inner = prod(self.size(f) for f in factors[1:])
            if offset % inner:
                return None
            head = self._split_at(factors[0], offset // inner)
            if head is None:
                return None
            return Mul((head[0], *factors[1:])), Mul((head[1], *factors[1:]))
        pieces = self._pieces(parts, [offset])
        if pieces is None:
            return None
        ends = _offsets(self, pieces)
        k = ends.index(offset) + 1
        return _cat(pieces[:k]), _cat(pieces[k:])


def _offsets(dims: Dims, parts: list[Layout]) -> list[int]:
    """End offsets of ``parts`` laid end to end."""
    out, total = [], 0
    for p in parts:
        total += dims.size(p)
        out.append(total)
    return out


def _cat(parts: list[Layout]) -> Layout:
    return parts[0] if len(parts) == 1 else Cat(tuple(parts))
