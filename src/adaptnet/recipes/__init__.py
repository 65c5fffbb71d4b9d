"""Recipes: the scenarios adaptive networks are used for, each one file and one command.

A recipe is a module in this package that defines ``RECIPE = Recipe(...)``: a name, a one-line
summary, a frozen dataclass of settings with their defaults, a ``quick`` set of overrides that
runs in well under a minute (the CI smoke test, and ``adaptnet recipe NAME --quick``), and a
``run(settings, out)`` function that writes its results, plots and checkpoints into ``out`` and
returns a JSON-able summary. ``adaptnet recipe NAME key=value ...`` runs one; ``run_recipe`` is the
same from Python.

Recipes report their progress (epoch lines, edits, the final table) with ``say``, on the logger
``adaptnet.recipes`` at INFO: ``adaptnet recipe`` shows it on stdout, ``show_progress()`` does the
same from Python, and a library user who does neither gets no output.

Recipe modules are imported only when listed or run, so an optional dependency (gymnasium for
``rl``) is needed only by the recipe that uses it; ``Recipe.requires`` names it so that a
missing one is reported as one line with the install command.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The recipes that ship with adaptnet, in the order `adaptnet recipe --list` shows them.
BUILTIN = ("adaptive", "rl", "gan", "sequences", "lm")
SETTINGS, RESULTS = "settings.yaml", "results.json"


progress = logging.getLogger(__name__)


def say(text: str) -> None:
    """A line of a recipe's progress report (see ``show_progress``)."""
    progress.info(text)


class _Stdout(logging.StreamHandler):
    """Writes to ``sys.stdout`` as it is when a line is logged (a caller may have replaced it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


@contextmanager
def show_progress(stream: Any = None) -> Iterator[None]:
    """Within the block, recipes' progress lines go to ``stream`` (default stdout), as they are."""
    handler = logging.StreamHandler(stream) if stream is not None else _Stdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = progress.level, progress.propagate
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False
    try:
        yield
    finally:
        progress.removeHandler(handler)
        progress.setLevel(saved[0])
        progress.propagate = saved[1]


class RecipeError(ValueError):
    """A bad recipe name, setting or value (the CLI prints it as one line, exit status 2)."""


@dataclass(frozen=True)
class Recipe:
    """One runnable scenario.

    Args:
        name: what ``adaptnet recipe NAME`` calls it.
        summary: one line for ``--list``.
        settings: a dataclass whose fields (with defaults, and a ``help`` entry in their metadata)
            are the recipe's settings; its ``__post_init__`` may raise ``ValueError`` for values out
            of range.
        run: ``run(settings, out_dir) -> results`` (a JSON-able mapping).
        quick: overrides for a run of well under a minute that still goes end to end.
        requires: ``(module, pip extra)`` pairs the recipe imports, checked before it runs.
    """

    name: str
    summary: str
    settings: type
    run: Callable[[Any, Path], Mapping[str, Any]]
    quick: Mapping[str, Any] = field(default_factory=dict)
    requires: tuple[tuple[str, str], ...] = ()


_REGISTERED: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Make ``recipe`` runnable by name (``adaptnet recipe`` sees it when the registering module is imported)."""
    if recipe.name in BUILTIN:
        raise RecipeError(f"recipe name {recipe.name!r} is taken by a built-in recipe")
    if not dataclasses.is_dataclass(recipe.settings):
        raise RecipeError(f"recipe {recipe.name}: settings must be a dataclass, got {recipe.settings!r}")
    _REGISTERED[recipe.name] = recipe
    return recipe


def recipe_names() -> tuple[str, ...]:
    builtin = (name for name in BUILTIN if importlib.util.find_spec(f"adaptnet.recipes.{name}") is not None)
    return (*builtin, *_REGISTERED)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (``RecipeError`` naming the ones there are, if none is)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    names = recipe_names()
    if name not in names:
        raise RecipeError(f"unknown recipe {name!r}; available: {', '.join(names)} (see `adaptnet recipe --list`)")
    recipe = importlib.import_module(f"adaptnet.recipes.{name}").RECIPE
    assert isinstance(recipe, Recipe)
    return recipe


# -- settings ------------------------------------------------------------------------------------
def describe_settings(recipe: Recipe) -> list[tuple[str, Any, str]]:
    """``(name, default, help)`` for each setting of ``recipe``."""
    rows = []
    for f in dataclasses.fields(recipe.settings):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        rows.append((f.name, default, f.metadata.get("help", "")))
    return rows


def _kind(tp: Any) -> str:
    if tp in (int, float, bool, str):
        return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {_kind(args[0]).removeprefix('an ').removeprefix('a ')}s, such as [8,8]"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _kind(a) for a in args)
    return str(tp)


def _coerce(tp: Any, value: Any) -> Any:
    """``value`` as type ``tp``, or raise ``TypeError``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, bool, str) and type(value) is tp:
        return value
    if origin is typing.Literal and value in args:
        return value
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        items = [_coerce(args[0], v) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(option, value)
            except TypeError:
                pass
    raise TypeError


def make_settings(recipe: Recipe, values: Mapping[str, Any]) -> Any:
    """The recipe's settings with ``values`` applied, each checked against its type and range."""
    hints = typing.get_type_hints(recipe.settings)
    names = [f.name for f in dataclasses.fields(recipe.settings)]
    checked = {}
    for key, value in values.items():
        if key not in names:
            raise RecipeError(f"recipe {recipe.name} has no setting {key!r}; its settings: {', '.join(names)}")
        try:
            checked[key] = _coerce(hints[key], value)
        except TypeError:
            raise RecipeError(f"setting {key}: expected {_kind(hints[key])}, got {value!r}") from None
    try:
        return recipe.settings(**checked)
    except ValueError as err:
        raise RecipeError(f"recipe {recipe.name}: {err}") from None


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["epochs=5", "hidden=[8,8]"]`` -> ``{"epochs": 5, "hidden": [8, 8]}`` (values read as YAML)."""
    from adaptnet.train.config import parse_value

    values = {}
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"setting {text!r}: expected KEY=VALUE, such as seed=1")
        values[key.strip()] = parse_value(value)
    return values


def read_settings_file(path: str | Path) -> dict[str, Any]:
    from adaptnet.train.config import ConfigError, read_yaml

    try:
        return read_yaml(path)
    except ConfigError as err:
        raise RecipeError(str(err)) from None


# -- running -------------------------------------------------------------------------------------
def _check_requirements(recipe: Recipe) -> None:
    for module, extra in recipe.requires:
        if importlib.util.find_spec(module) is None:
            raise RecipeError(f"recipe {recipe.name} needs {module}: pip install 'adaptnet[{extra}]'")


def default_out(name: str) -> Path:
    """``runs/recipe-NAME-YYYYmmdd-HHMMSS`` (a new folder, so no earlier results are overwritten)."""
    return Path("runs") / f"recipe-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_recipe(name: str, settings: Mapping[str, Any] | None = None, out: str | Path | None = None,
               quick: bool = False) -> dict[str, Any]:
    """Run recipe ``name`` with ``settings`` (over its defaults, or over its quick settings).

    Writes ``settings.yaml`` and ``results.json`` (plus the recipe's own plots and checkpoints)
    into ``out`` and returns the results, with the settings used and the wall time added.
    """
    recipe = get_recipe(name)
    values = {**(recipe.quick if quick else {}), **(settings or {})}
    chosen = make_settings(recipe, values)
    _check_requirements(recipe)
    folder = Path(out) if out is not None else default_out(name)
    if folder.exists() and any(folder.iterdir()):
        raise RecipeError(f"output folder {folder} is not empty; choose a new one with --out")
    folder.mkdir(parents=True, exist_ok=True)
    plain = dataclasses.asdict(chosen)
    (folder / SETTINGS).write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in plain.items()}, sort_keys=False))
    began = time.perf_counter()
    try:
        results = dict(recipe.run(chosen, folder))
    except BaseException:
        if [p.name for p in folder.iterdir()] == [SETTINGS]:  # nothing but our own file: leave no trace
            (folder / SETTINGS).unlink()
            folder.rmdir()
        raise
    results = {"recipe": name, "out": str(folder), "settings": plain, **results,
               "wall_s": round(time.perf_counter() - began, 2)}
    (folder / RESULTS).write_text(json.dumps(results, indent=2, default=list) + "\n")
    return results
