"""The ``pam`` command. Each layer registers its own subcommands from a light module.

The command modules are named by string and imported here only to build the parser; their
handlers import the heavy libraries (torch, executorch, uvicorn) when they run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "merging.commands",
    "merging.commands_pam",
    "mobile_export.commands",
    "service.commands",
)


def build_parser() -> tuple[argparse.ArgumentParser, tuple[type[BaseException], ...]]:
    parser = argparse.ArgumentParser(
        prog="pam", description="Pruning-aware merging of single-task networks for on-device multitask inference."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    user_errors: list[type[BaseException]] = []
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that layer has no commands yet
                continue
            raise
        mod.register(sub)
        user_errors.extend(getattr(mod, "USER_ERRORS", ()))
    return parser, tuple(user_errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser, user_errors = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except user_errors as e:
        print(f"pam {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
