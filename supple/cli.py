"""`supple` command line: `supple demo | measure | probe | coverage ...`.

Each sub-command lives with the code it drives; a module registers its commands through
``add_parsers(subparsers)`` and sets ``func`` on its parser. Heavy imports happen inside ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = ("supple.testbed.cli", "supple.measure.cli", "supple.measure.coverage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supple", description="Measure and prevent representation collapse in LLM post-training."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a command module not written yet
            if exc.name != name:
                raise
            continue
        mod.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
