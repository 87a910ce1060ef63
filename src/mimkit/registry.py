"""What every registry of mimkit shares (methods, encoder families, data sources, tokenizer kinds): the built-in
entries are the modules of one package, each registering itself when imported, so finding them is importing them."""

from __future__ import annotations

import functools
import importlib
import pkgutil


@functools.cache
def import_package(package: str, folder: str) -> None:
    """Import every module of `package` (whose files lie in `folder`) once per process: a registry calls this before
    each lookup, so its built-ins are there without the folder being listed again on every call."""
    for module in pkgutil.iter_modules([folder]):
        importlib.import_module(f"{package}.{module.name}")
