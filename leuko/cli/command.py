"""How a `leuko` subcommand is declared: its parser (help, examples, `--params FILE`) and its usage error.

Each command-group module (data, training, sweep, tracking, evaluation, deploy) adds its subcommands
with `add_command` and points each at its handler with `set_defaults(func=...)`; a handler that takes
config overrides after its own options also sets `takes_rest=True` and is called as `func(args, rest)`.
Only argparse and leuko.params are imported here, so building the parser stays instant.
"""

from __future__ import annotations

import argparse
import textwrap

from leuko.errors import LeukoError
from leuko.params import COMMAND_SECTIONS


class UsageError(LeukoError):
    """A user-facing error: printed as one message, exit code 2, no traceback."""


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def examples(text: str) -> str:
    """An epilog: `examples:` and the dedented, indented lines of text."""
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def add_command(sub, name: str, help: str, example_lines: str) -> argparse.ArgumentParser:
    """A subcommand's parser with its help and examples; with `--params FILE` when params.yaml has its section."""
    p = sub.add_parser(name, help=help, description=help, epilog=examples(example_lines), formatter_class=formatter)
    if name in COMMAND_SECTIONS:
        p.add_argument(
            "--params",
            metavar="FILE",
            help=f"read options from the `{name}:` section of FILE (params.yaml); options given here win",
        )
    return p
