"""The `mimkit` command."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from mimkit import __version__
from mimkit.commands import COMMANDS
from mimkit.commands.pretrain import EPILOG
from mimkit.config import ConfigError
from mimkit.data.info import DataError

OVERRIDE = re.compile(r"^(seed|output_dir|resume|(data|optim|train|method)\.[\w.]+)=")
"""A config override (`optim.lr=1e-3`) wherever it stands on the command line, also after a flag."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in arguments if OVERRIDE.match(a)]
    args = parser.parse_args([a for a in arguments if not OVERRIDE.match(a)])
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
        description="Masked-image-modeling pretraining of vision backbones (iBOT, DTM, SymMIM, CIM).",
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
