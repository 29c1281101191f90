"""The ``groupsec`` command: the controller and the operator's tools.

Each subcommand lives in its own module with a ``register(subparsers)`` function that
adds its parser and sets ``func`` (called with the parsed arguments, returns the exit
code). User mistakes raise ``ConfigError`` and are printed in one line, without a
traceback, with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from groupsec.errors import ConfigError, GroupSecError

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = [
    "groupsec.controller.cli_init",
    "groupsec.controller.cli_member",
    "groupsec.controller.cli_serve",
    "groupsec.controller.hapki",
    "groupsec.bench",
    "groupsec.inspect",
    "groupsec.demo",
    "groupsec.lab",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groupsec",
        description="groupsec: multicast group security. The group controller (key server) and operator tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        mod = importlib.import_module(name)
        (getattr(mod, "register_commands", None) or mod.register)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except ConfigError as exc:
        print(f"groupsec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except GroupSecError as exc:
        print(f"groupsec {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
