"""Where a command may write: never among a user's images, never inside what the command itself reads.

Every mimkit command that writes (pretrain's output_dir, eval's RUN/eval, export --out, data shard's OUT, a
tokenizer's folder) checks its folder here before any work, so a mistyped path fails with a message instead of
mixing mimkit's files into a dataset: an image folder's sub-folders are its classes, so a run folder written there
becomes a class of it, and shards written inside their source are read back as images of it.

It lives with the data because it knows what an image file is (the image-folder source's extensions).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from mimkit.config import ConfigError
from mimkit.data.sources.imagefolder import IMAGE_EXTENSIONS

FIGURES_FOLDER = "report"
"""Where `mimkit viz` draws a run's figures: mimkit's own pictures, not a user's images."""


def check_output_folder(
    folder: str | Path, what: str, fix: str, reads: Mapping[str, str | Path | None] | None = None
) -> None:
    """A ConfigError naming `folder`, the reason and `fix` when `folder` is or lies inside one of the folders the
    command `reads` (name -> folder; None entries are skipped), or holds image files at its top level or one level
    down. `what` names the option or field that gave the folder."""
    folder = Path(folder).expanduser()
    where = folder.resolve()
    for name, given in (reads or {}).items():
        if given is None:
            continue
        source = Path(given).expanduser().resolve()
        if where == source or source in where.parents:
            relation = f"is {name}" if where == source else f"lies inside {name} ({given})"
            raise ConfigError(f"{what}: {folder} {relation}, which this command reads; {fix}")
    image = None if is_run_folder(folder) else first_image(folder)
    if image is not None:
        raise ConfigError(
            f"{what}: {folder} holds images ({image}); mimkit never writes into a folder of images: {fix}"
        )


def is_run_folder(folder: Path) -> bool:
    """A run folder of mimkit's (its config or checkpoints are there): the figures `mimkit viz --out` drew inside it
    are mimkit's own, so a resumed run is not refused for them."""
    return (folder / "config.yaml").is_file() or (folder / "checkpoints").is_dir()


def first_image(folder: Path) -> Path | None:
    """An image file at the top of `folder` or in one of its sub-folders (None if there is none, or no folder).

    mimkit's own pictures do not count: the figures of a run (`report/`) and the picture a tokenizer fit draws
    beside its file (`NAME.png` beside `NAME.pt`).
    """
    found = _image_in(folder)
    if found is not None:
        return found
    for entry in _entries(folder):
        if entry.name != FIGURES_FOLDER and _is_folder(entry) and (found := _image_in(Path(entry.path))) is not None:
            return found
    return None


def _image_in(folder: Path) -> Path | None:
    for entry in _entries(folder):
        path = Path(entry.path)
        if path.suffix.lower() in IMAGE_EXTENSIONS and not _is_folder(entry) and not path.with_suffix(".pt").exists():
            return path
    return None


def _entries(folder: Path) -> Iterator[os.DirEntry[str]]:
    """The entries of `folder` as the OS lists them (a large folder is read only up to the first image)."""
    try:
        with os.scandir(folder) as entries:
            yield from entries
    except OSError:  # no folder yet, a file, or unreadable: nothing of the user's to protect here
        return


def _is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
