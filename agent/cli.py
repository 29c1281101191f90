"""The ``groupsec-agent`` command (the group member)."""

from __future__ import annotations

import argparse
import importlib
import sys

from groupsec.errors import ConfigError, GroupSecError

COMMAND_MODULES: list[str] = [
    "agent.run",
    "agent.enroll",
    "agent.status",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groupsec-agent",
        description="groupsec-agent: a multicast group member. Registers with the controller and protects traffic.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except ConfigError as exc:
        print(f"groupsec-agent {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except GroupSecError as exc:
        print(f"groupsec-agent {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
