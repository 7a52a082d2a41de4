"""The `glm5` command: a thin face over the library.

    glm5 --help
    glm5 params glm5-744b --json
    glm5 demo

Each subcommand lives next to the code it drives: a module listed in SUBCOMMAND_MODULES exposes
`register(subparsers)`, which adds its parser and sets `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from glm5.common import int_at_least  # noqa: F401  (subcommands written against glm5.cli.int_at_least)

# Modules that add subcommands. Add yours here; keep each module's import cheap (import heavy things in func):
# `glm5 --help` builds every parser and must not load torch (tests/test_cli_help.py).
SUBCOMMAND_MODULES = [
    "glm5.params",
    "glm5.demo",
    "glm5.train.cli",
    "glm5.tokenizer",
    "glm5.quant.cli",
    "glm5.quant.export_cli",
    "glm5.quant.plan",
    "glm5.serve.cli",
    "glm5.agent.cli",
    "glm5.rl.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm5", description="GLM-5 end to end: model, training, inference, tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        # bad input (a value, a path: missing, a file where a folder belongs, not writable): one line, no traceback
        print(f"glm5 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"glm5 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
