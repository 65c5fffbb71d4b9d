"""Turn pydantic validation errors into one line: the dotted key, what is allowed, what was given.

``train.epochs: must be an integer >= 1, got -3`` reads better than pydantic's multi-line
report, and the allowed values come from the field's own type and constraints, so the
message cannot drift from the schema.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

# Errors raised by our own cross-field checks carry their full message under this type.
OWN_ERROR = "adaptnet_config"


def _strip(tp: Any) -> tuple[Any, list[Any]]:
    """``Annotated[X, ...]`` -> ``(X, metadata)``."""
    meta: list[Any] = []
    while get_origin(tp) is Annotated:
        tp, *extra = get_args(tp)
        meta += extra
    return tp, meta


def _union_args(tp: Any) -> tuple[Any, ...]:
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else ()


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML (null, true, 'text', [1, 2])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


show_value = _show  # for the cross-field checks of ``config``


def _flat(meta: Sequence[Any]) -> list[Any]:
    """Constraint objects, with those inside ``Field(...)`` metadata unpacked."""
    return [x for m in meta for x in (m.metadata if isinstance(m, FieldInfo) else [m])]


def _bounds(meta: Sequence[Any]) -> str:
    parts = []
    for m in _flat(meta):
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(m, attr, None)
            if isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt, at.Interval)) and bound is not None:
                parts.append(f"{op} {bound}")
    return " and ".join(parts)


def _list_size(meta: Sequence[Any]) -> str:
    """``"2 "``, ``"non-empty "``, ``"at most 3 "`` or ``""`` (words before the items of a list)."""
    low = next((m.min_length for m in _flat(meta) if isinstance(m, at.MinLen)), 0)
    high = next((m.max_length for m in _flat(meta) if isinstance(m, at.MaxLen)), None)
    if high is not None and low == high:
        return f"{low} "
    words = ["non-empty" if low == 1 else f"at least {low}" if low else "", f"at most {high}" if high else ""]
    return " ".join(w for w in words if w) + " " if any(words) else ""


def describe(tp: Any) -> str:
    """What a type allows, in words: ``an integer >= 1``, ``one of sgd, adam``, ``... or null``."""
    tp, meta = _strip(tp)
    bounds = _bounds(meta)
    suffix = f" {bounds}" if bounds else ""
    args = _union_args(tp)
    if args:
        options = [a for a in args if a is not type(None)]
        if all(_is_model(_strip(a)[0]) for a in options):
            return "a mapping"
        text = " or ".join(describe(a) for a in options) + suffix
        return text + (" or null" if len(options) < len(args) else "")
    if get_origin(tp) is Literal:
        values = [_show(v) if not isinstance(v, str) else v for v in get_args(tp)]
        return "one of " + ", ".join(values)
    if get_origin(tp) in (list, tuple):
        (item,) = get_args(tp)[:1] or (Any,)
        size = _list_size(meta)
        return f"a {size}list of {_plural(describe(item))}" if size.startswith("non") else \
            f"a list of {size}{_plural(describe(item))}"
    if get_origin(tp) is dict:
        return "a mapping"
    if _is_model(tp):
        return f"a mapping with keys {', '.join(sorted(tp.model_fields))}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp))) + suffix


def _plural(text: str) -> str:
    for single, many in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings"),
                         ("a mapping", "mappings")):
        if text.startswith(single):
            return many + text[len(single):]
    return text


def _walk(root: type[BaseModel], loc: Sequence[int | str]) -> tuple[list[str], Any, type[BaseModel] | None]:
    """Follow ``loc`` through the schema: (dotted key parts, type at the end, the enclosing model).

    Tags of discriminated unions (``model -> mlp -> hidden``) are left out of the key.
    """
    parts: list[str] = []
    tp: Any = root
    owner: type[BaseModel] | None = None
    for item in loc:
        tp, _ = _strip(tp)
        args = [a for a in _union_args(tp) if a is not type(None)]
        if args and all(_is_model(a) for a in args):  # a tagged union: this item is the tag
            tagged = [a for a in args if _tag(a) == item]
            if tagged:
                tp = tagged[0]
                continue
        if len(args) > 1 and item in {_member_name(a) for a in args}:
            continue  # pydantic names the union member it tried (``where.str``): report the union
        if len(args) == 1:
            tp, _ = _strip(args[0])
        if _is_model(tp):
            owner = tp
            parts.append(str(item))
            field = tp.model_fields.get(str(item))
            if field is None:
                return parts, None, owner
            tp = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        elif get_origin(tp) in (list, tuple):
            parts.append(str(item))
            tp = (get_args(tp) or (Any,))[0]
        else:
            parts.append(str(item))
            tp = Any
    return parts, tp, owner


def _member_name(tp: Any) -> str:
    """How pydantic names a member of a plain union in an error's location: ``str``, ``int``, ``list[int]``."""
    tp, _ = _strip(tp)
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _tag(model: type[BaseModel]) -> Any:
    for field in model.model_fields.values():
        if get_origin(field.annotation) is Literal and len(get_args(field.annotation)) == 1:
            return get_args(field.annotation)[0]
    return None


def one_line(error: ErrorDetails, root: type[BaseModel], prefix: str = "") -> str:
    """One pydantic error as ``dotted.key: what is wrong; what is allowed``."""
    parts, tp, owner = _walk(root, error["loc"])
    key = ".".join(([prefix] if prefix else []) + parts) or "config"
    kind, given = error["type"], error.get("input")
    if kind == OWN_ERROR:
        return str(error["msg"])
    if kind == "extra_forbidden":
        allowed = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(parts[-1], allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{key}: unknown key; allowed: {', '.join(allowed)}{hint}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        ctx = error.get("ctx") or {}
        field = str(ctx.get("discriminator", "'type'")).strip("'")
        tags = str(ctx.get("expected_tags", "")).replace("'", "")
        got = _show(ctx["tag"]) if "tag" in ctx else "nothing"
        return f"{key}.{field}: must be one of {tags}, got {got}"
    if kind == "missing":
        return f"{key}: required; must be {describe(tp)}"
    if tp is None or tp is Any:
        return f"{key}: {error['msg']}, got {_show(given)}"
    return f"{key}: must be {describe(tp)}, got {_show(given)}"


def format_validation_error(err: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    """The first error of ``err`` on one line, with a count of the others."""
    # Each member of a failed union reports its own error; they read the same once the union is named.
    lines = list(dict.fromkeys(one_line(e, root, prefix) for e in err.errors(include_url=False)))
    text = lines[0]
    if len(lines) > 1:
        text += f" (and {len(lines) - 1} more problem{'s' * (len(lines) > 2)})"
    return " ".join(text.split())
