"""What the ``groupsec`` and ``groupsec-agent`` commands share: building the parser from
subcommand modules, and turning user mistakes into one line and an exit code.

Each subcommand module has ``register(subparsers)`` (or ``register_commands``, where a
submodule named ``register`` would shadow it) that adds its parser and sets ``func``
(called with the parsed arguments, returns the exit code). ``ConfigError`` (a user's
mistake) prints one line and exits 2, any other ``GroupSecError`` exits 1, neither with a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from groupsec.errors import ConfigError, GroupSecError


def build_parser(prog: str, description: str, modules: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in modules:
        mod = importlib.import_module(name)
        (getattr(mod, "register_commands", None) or mod.register)(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except ConfigError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except GroupSecError as exc:
        print(f"{parser.prog} {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)
