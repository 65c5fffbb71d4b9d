"""The ``adaptnet`` command: train, resume, report, inspect (and demo, recipe).

Each subcommand is a module with ``add_parser(subparsers)`` and ``run(args) -> int``;
``adaptnet.cli.main`` registers them. Only this package prints; the library logs.
"""
