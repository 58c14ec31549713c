"""``ctpos``: one console command; each package owns its subcommand (``<package>.cli.register``).

The dispatcher imports a package only when its subcommand runs, so start-up stays
fast. A subcommand's typed errors end the process with a one-line reason and a
non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import os
import sys
from typing import NoReturn

# subcommand -> "module:function" that registers it (function(subparsers) -> None)
SUBCOMMANDS = {
    "sim": "sim.cli:register",
    "calibrate": "calibration.cli:register",
    "fit": "positioning.cli:register",
    "plan": "positioning.cli:register_plan",
    "eval": "positioning.cli:register_eval",
    "keys": "scanner_bridge.cli:register_keys",
    "daemon": "scanner_bridge.cli:register_daemon",
    "scanner-sim": "scanner_bridge.cli:register_scanner_sim",
    "bridge": "scanner_bridge.cli:register_bridge",
    "demo": "sim.demo:register",
}
# Commands that only read captures and print: once their output is flushed the process ends with os._exit,
# skipping the interpreter's teardown of torch (about 0.45 s of a 2.1 s `ctpos plan` here, with scipy then). By then
# they hold no open files, sockets or child processes, and they register no exit handlers.
FAST_EXIT = frozenset({"plan", "eval"})
# Commands that plan one capture and end: the cycle collector stays off for them. Their memory is freed by
# reference counting as it goes; with it on, three full collections over torch's import-time objects took
# about 60 ms of a 1.2 s `ctpos plan` here (docs/planning.md, "Time").
NO_CYCLE_COLLECTOR = frozenset({"plan"})


class UserError(Exception):
    """Base for errors that end a command with a one-line reason (exit 2)."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="ctpos", description="Contactless CT acquisition and patient positioning")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen subcommand's module is imported; the others get a stub entry for --help.
    chosen = _chosen(argv)
    for name, spec in SUBCOMMANDS.items():
        if name == chosen:
            module, func = spec.split(":")
            getattr(importlib.import_module(module), func)(sub)
        else:
            sub.add_parser(name, help=f"(see ctpos {name} --help)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ctpos: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every typed error of ours carries a one-line reason
        if type(exc).__module__.split(".")[0] in {"ctpos", "positioning", "sim", "calibration", "scanner_bridge"} \
                or isinstance(exc, (OSError, ValueError, RuntimeError, UserError)):
            print(f"ctpos {args.command}: {exc}", file=sys.stderr)
            return 2
        raise


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named in argv (its first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def run() -> NoReturn:
    """The console command: ``main`` on sys.argv, then exit; FAST_EXIT commands skip the interpreter's teardown."""
    argv = sys.argv[1:]
    if _chosen(argv) in NO_CYCLE_COLLECTOR:
        gc.disable()
    rc = main(argv)
    if _chosen(argv) in FAST_EXIT:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):  # a reader that went away: nothing more can reach it
                stream.flush()
        os._exit(rc)
    sys.exit(rc)
