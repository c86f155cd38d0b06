"""params.yaml: one file for the whole pipeline, each setting in it once.

    seed_everything, model, data, trainer, tracking   LeukoCLI's config: `leuko fit|cv|register --config params.yaml`
    prepare, evaluate, register                       a command's own options: `leuko prepare --params params.yaml`

LeukoCLI accepts the command sections and leaves them alone; each command checks its own section when it
reads it, so a misspelt key is an error there, and a misspelt section is an error in LeukoCLI.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from leuko.errors import LeukoError

# Sections of params.yaml that belong to leuko's argparse commands rather than to LeukoCLI.
COMMAND_SECTIONS = ("prepare", "evaluate", "register")
# Options a section cannot set: help, and --params itself.
_NOT_FROM_PARAMS = {"help", "params"}


class ParamsError(LeukoError, ValueError):
    """A params file, section or key that cannot be used; the message says how to fix it."""


def params_path(argv: list[str]) -> str | None:
    """The value of --params FILE (or --params=FILE) in argv, if given."""
    for i, arg in enumerate(argv):
        if arg.startswith("--params="):
            return arg.split("=", 1)[1]
        if arg == "--params":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ParamsError("--params needs a file, e.g. --params params.yaml")
            return argv[i + 1]
    return None


def load_section(path: str | Path, section: str) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"--params {path}: file not found; give the pipeline's params.yaml")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"--params {path}: not valid YAML ({exc})") from exc
    if not isinstance(tree, dict):
        raise ParamsError(f"--params {path}: the top level must be a mapping of sections")
    if section not in tree:
        raise ParamsError(
            f"--params {path}: no `{section}:` section; add one (it may be empty: `{section}: {{}}`) or drop --params"
        )
    values = tree[section] or {}
    if not isinstance(values, dict):
        raise ParamsError(f"--params {path}: `{section}:` must be a mapping of option: value, got {values!r}")
    return values


def section_tokens(
    parser: argparse.ArgumentParser, section: str, values: dict, source: str = "params.yaml"
) -> list[str]:
    """Command-line tokens for a section's values, checked against the command's own options.

    Keys are option names with `_` for `-` (skip_bad: true -> --skip-bad). A list goes to an option that
    takes several values as several values (shape: [32, 32, 32] -> --shape 32 32 32), and to one that takes
    one value comma-joined (classes: [a, b] -> --classes a,b). null leaves the option at its default.
    """
    actions = {
        a.dest: a
        for a in parser._actions  # argparse keeps no public list of a parser's options
        if a.option_strings and a.dest not in _NOT_FROM_PARAMS and a.help != argparse.SUPPRESS
    }
    tokens: list[str] = []
    for key, value in values.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            known = ", ".join(sorted(actions))
            raise ParamsError(f"{source}: {section}.{key} is not an option of `leuko {section}`; known: {known}")
        flag = max(action.option_strings, key=len)
        if value is None:
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ParamsError(f"{source}: {section}.{key} is {value!r}; give true or false")
            if value != action.default:
                tokens.append(flag)
            continue
        if isinstance(value, dict):
            raise ParamsError(f"{source}: {section}.{key} is a mapping; give a value or a list")
        takes_many = action.nargs not in (None, "?") or isinstance(action, argparse._AppendAction)
        if isinstance(value, list):
            if isinstance(action, argparse._AppendAction):
                for item in value:
                    tokens += [flag, str(item)]
            elif takes_many:
                tokens += [flag, *map(str, value)]
            else:
                tokens += [flag, ",".join(map(str, value))]
        else:
            tokens += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
    return tokens


def expand(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`leuko COMMAND --params FILE ...` -> argv with FILE's COMMAND section inserted right after COMMAND,
    so options given on the command line come later and win."""
    if not argv or argv[0] not in COMMAND_SECTIONS:
        return argv
    path = params_path(argv[1:])
    if path is None:
        return argv
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = argv[0]
    if command not in commands.choices:
        return argv
    values = load_section(path, command)
    return [command, *section_tokens(commands.choices[command], command, values, source=str(path)), *argv[1:]]
