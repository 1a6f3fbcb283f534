"""`supple` command line: `supple demo | measure | probe | coverage ...`.

Each sub-command lives with the code it drives; a module registers its commands through
``add_parsers(subparsers)`` and sets ``func`` on its parser. Heavy imports happen inside ``func``.

User errors — a missing path, a bad option value, a refused file (a pickle, a hub id where a local
directory is needed) — print one line, ``supple <command>: error: <what to change>``, on stderr and exit
with status 2, like argparse's own errors. A traceback appears only for a real bug, or for any error
with ``--debug``. The measurement commands run with ``HF_HUB_OFFLINE=1`` unless the caller set it:
supple reads local files only.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

_COMMAND_MODULES = ("supple.testbed.cli", "supple.measure.cli", "supple.measure.coverage")
_OFFLINE_COMMANDS = ("measure", "probe", "coverage")
# what user errors raise: missing or unreadable paths (OSError), bad values and refused files
# (ValueError, which supple.measure.adapters.PickleRefusedError subclasses)
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError)


def _user_errors() -> tuple[type[BaseException], ...]:
    """``USER_ERRORS`` plus the "embedded model not installed" error (its message says how)."""
    try:
        from supple.measure.embedded import EmbeddedModelMissing
    except ImportError:
        return USER_ERRORS
    return (*USER_ERRORS, EmbeddedModelMissing)


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``PROG: error: MESSAGE``, and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="supple", description="Measure and prevent representation collapse in LLM post-training."
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for every error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a command module not written yet
            if exc.name != name:
                raise
            continue
        mod.add_parsers(sub)
    for sp in sub.choices.values():  # `supple measure ... --debug` works as well as `supple --debug measure`
        if not any("--debug" in a.option_strings for a in sp._actions):
            sp.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks"
            )
    parser.set_defaults(_commands=sub.choices)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename!r}"
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    commands = getattr(args, "_commands", {})
    if extra:  # reported by the sub-command's parser: `supple coverage: error: unrecognized arguments: ...`
        (commands.get(args.command) or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    if args.command in _OFFLINE_COMMANDS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if getattr(args, "debug", False):
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        print(f"supple {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
