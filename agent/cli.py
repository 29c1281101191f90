"""The ``groupsec-agent`` command (the group member). Subcommands are the modules below,
each with ``register(subparsers)`` (see groupsec/cliutil.py)."""

from __future__ import annotations

import argparse
import sys

from groupsec import cliutil

COMMAND_MODULES: list[str] = [
    "agent.run",
    "agent.enroll",
    "agent.status",
]


def build_parser() -> argparse.ArgumentParser:
    return cliutil.build_parser(
        "groupsec-agent",
        "groupsec-agent: a multicast group member. Registers with the controller and protects traffic.",
        COMMAND_MODULES,
    )


def main(argv: list[str] | None = None) -> int:
    return cliutil.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
