"""The `mimkit` command."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from mimkit import __version__
from mimkit.commands import COMMANDS
from mimkit.commands.pretrain import EPILOG
from mimkit.config import ConfigError
from mimkit.data.info import DataError
from mimkit.recipes import method_families

OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")
"""A config override (`optim.lr=1e-3`, `seed=1`) wherever it stands on the command line, also after a flag. Any
dotted name counts, so a misspelt one reaches the config's own check, which names the closest field."""


def is_override(argument: str) -> bool:
    """`key=value` that is not an existing file or folder (a run folder may be called `lr=1e-3`)."""
    return bool(OVERRIDE.match(argument)) and not Path(argument).exists()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    valued = value_options(parser)
    after_option = [i > 0 and arguments[i - 1] in valued for i in range(len(arguments))]
    overrides = [a for a, value in zip(arguments, after_option, strict=True) if is_override(a) and not value]
    args = parser.parse_args(
        [a for a, value in zip(arguments, after_option, strict=True) if value or not is_override(a)]
    )
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    if overrides:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(overrides)} (this command takes no config overrides)")
        args.overrides = [*args.overrides, *overrides]
    try:
        return args.run(args) or 0
    except (ConfigError, DataError, FileNotFoundError) as error:
        print(f"mimkit: error: {user_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mimkit: interrupted", file=sys.stderr)
        return 130


def value_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option of the command line (sub-commands included) that takes a value: the word after one of them is
    that value (`--output-dir lr=1e-3`), never an override."""
    found: set[str] = set()
    for action in parser._actions:
        if action.option_strings and action.nargs != 0:
            found.update(action.option_strings)
        for sub in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            found |= value_options(sub)
    return found


def user_message(error: BaseException) -> str:
    """The error's own message; for one raised in a DataLoader worker, without the worker's traceback."""
    message = str(error)
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]  # "package.module.DataError: what went wrong"
    name, _, rest = last.partition(": ")
    return rest if name.rsplit(".", 1)[-1] == type(error).__name__ and rest else last


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimkit",
        description=f"Masked-image-modeling pretraining of vision backbones ({', '.join(method_families())}).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"mimkit {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in COMMANDS:
        module.add(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
