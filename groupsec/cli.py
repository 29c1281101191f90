"""The ``groupsec`` command: the controller and the operator's tools.

Each subcommand lives in its own module with a ``register(subparsers)`` function (see
groupsec/cliutil.py). User mistakes raise ``ConfigError`` and are printed in one line,
without a traceback, with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from groupsec import cliutil

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
    return cliutil.build_parser(
        "groupsec",
        "groupsec: multicast group security. The group controller (key server) and operator tools.",
        COMMAND_MODULES,
    )


def main(argv: list[str] | None = None) -> int:
    return cliutil.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
