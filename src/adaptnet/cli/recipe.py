"""``adaptnet recipe``: list the recipes, show one's settings, run one."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from adaptnet.cli._common import CLIError
from adaptnet.recipes import (
    RecipeError,
    describe_settings,
    get_recipe,
    parse_overrides,
    read_settings_file,
    recipe_names,
    run_recipe,
    show_progress,
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "recipe",
        help="run a scenario end to end: adaptive learning, RL, GANs, variable-length sequences",
        description="Run a recipe: a scenario for adaptive networks, with its data, training, comparison "
        "and plots in one command. Settings are KEY=VALUE (values read as YAML) over the recipe's "
        "defaults; `--show` prints them.",
        epilog="examples: adaptnet recipe --list;  adaptnet recipe rl env=Acrobot-v1 seed=1;  "
        "adaptnet recipe gan --quick --out runs/gan-try",
    )
    parser.add_argument("name", nargs="?", help="the recipe (see --list)")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="settings over the defaults")
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    parser.add_argument("--show", action="store_true", help="print the recipe's settings as YAML and exit")
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute) that goes end to end")
    parser.add_argument("--config", metavar="FILE", help="a YAML file of settings (KEY=VALUE on the line wins)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default runs/recipe-NAME-TIMESTAMP; "
                        "must be new or empty)")
    parser.set_defaults(run=run, extra_words=[])


def _yaml_scalar(value: Any) -> str:
    """``value`` as it would be written after ``key:`` in a settings file (lists in flow style)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    text: str = yaml.safe_dump(value, default_flow_style=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name in recipe_names():
            print(f"{name:<12}{get_recipe(name).summary}")
        return 0
    if args.name is None:
        raise CLIError(f"name a recipe: one of {', '.join(recipe_names())} (or use --list)")
    try:
        recipe = get_recipe(args.name)
        values = read_settings_file(args.config) if args.config else {}
        values.update(parse_overrides([*args.settings, *args.extra_words]))
        if args.show:
            for key, default, help_text in describe_settings(recipe):
                value = {**(recipe.quick if args.quick else {}), **values}.get(key, default)
                line = f"{key}: {_yaml_scalar(value)}"
                print(f"{line:<40}# {help_text}" if help_text else line)
            return 0
        with show_progress():
            results = run_recipe(args.name, values, out=args.out, quick=args.quick)
    except RecipeError as err:
        raise CLIError(str(err)) from None
    print(f"\nresults, settings and plots in {results['out']} ({results['wall_s']:.0f} s)")
    return 0
