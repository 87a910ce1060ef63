"""mimkit's cache folder: downloaded data (Fashion-MNIST's fallback) and what an installation derives once (the field
names of its configs)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$MIMKIT_CACHE, else $XDG_CACHE_HOME/mimkit, else ~/.cache/mimkit."""
    if "MIMKIT_CACHE" in os.environ:
        return Path(os.environ["MIMKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "mimkit"
