"""The `mimkit` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mimkit import __version__
from mimkit.commands import COMMANDS
from mimkit.commands.pretrain import EPILOG
from mimkit.config import ConfigError
from mimkit.data.info import DataError


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        return args.run(args) or 0
    except (ConfigError, DataError, FileNotFoundError) as error:
        print(f"mimkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mimkit: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimkit",
        description="Masked-image-modeling pretraining of vision backbones (iBOT, DTM).",
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
