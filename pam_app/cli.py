"""The ``pam`` command. Each layer registers its own subcommands from a light module.

The command modules are named by string and imported here only to build the parser; their
handlers import the heavy libraries (torch, executorch, uvicorn) when they run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

COMMAND_MODULES = (
    "pam_app.commands_merging",
    "pam_app.commands_pam",
    "pam_app.commands_import",
    "pam_app.commands_export",
    "pam_app.commands_serve",
    "pam_app.commands",
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


def _distributed() -> Any:
    """``merging.distributed`` if this run joined a process group (never imported just to ask)."""
    mod = sys.modules.get("merging.distributed")
    return mod if mod is not None and mod.is_distributed() else None


def _leave_job(command: str, e: BaseException, code: int) -> NoReturn:
    """A failing rank reports and exits at once: waiting for its peers at shutdown could hang, and its
    exit is what stops them (torchrun stops the others; a peer in a collective fails fast or times out)."""
    dist = _distributed()
    rank = dist.rank() if dist is not None else "?"
    if code == 1:
        traceback.print_exception(e, file=sys.stderr)
    print(f"pam {command} (rank {rank}): error: {e}", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser, user_errors = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --nproc, which relaunches the command
    try:
        code = int(args.func(args) or 0)
    except user_errors as e:
        if _distributed() is not None:
            _leave_job(args.command, e, 2)
        print(f"pam {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        dist = _distributed()
        if dist is not None:
            failure = dist.as_rank_failure(e)
            _leave_job(args.command, failure or e, 3 if failure is not None else 1)
        raise
    dist = _distributed()
    if dist is not None:
        dist.barrier()  # rank 0 may still be writing; nobody tears the group down under it
        dist.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
