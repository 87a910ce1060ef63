"""The `mimkit` sub-commands. Each module builds its parser without heavy imports and imports what it runs."""

from mimkit.commands import data, eval, export, pretrain, recipes, runs, tokenizer, viz

COMMANDS = [pretrain, recipes, tokenizer, data, eval, export, viz, runs]
"""Modules with `add(subparsers)`; their parsers set `run` to the function that executes the command."""
