"""The channel count of a folder of images, decided from the header of every image (never from the first few: one
grayscale file sorted first once made a whole RGB folder gray).

PIL reads a file's header when it opens it and decodes pixels only on demand, so the mode of every image costs one
small read per file (about 30 microseconds on a local disk; docs/data.md). A folder whose scan takes long keeps the
modes in mimkit's cache, checked against each file's size and modification time, so later runs re-read only the
files that changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mimkit.cache import cache_dir
from mimkit.data.info import DataError
from mimkit.data.sources.base import DECODE_ERRORS, GRAY_MODES, WIDE_MODES

log = logging.getLogger("mimkit")

CACHE_AFTER_SECONDS = 2.0
"""A scan that takes longer is kept in the cache."""
PROGRESS_EVERY_SECONDS = 10.0
"""A long scan logs how far it got this often."""
CACHE_VERSION = 1
_said: set[tuple[str, tuple[int, ...]]] = set()


@dataclass
class FolderModes:
    """What the headers of a folder's images say: how many are gray, in colour, wider than 8 bits, unreadable."""

    root: Path
    total: int = 0
    gray: int = 0
    color: int = 0
    wide: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str, mode: str, reason: str) -> None:
        self.total += 1
        if not mode:
            self.unreadable.append((path, reason))
        elif mode in GRAY_MODES:
            self.gray += 1
            self.wide += mode in WIDE_MODES
        else:
            self.color += 1

    @property
    def channels(self) -> int:
        """The majority's channel count; RGB on a tie or when nothing is readable (converting gray to RGB loses
        nothing)."""
        return 1 if self.gray > self.color else 3

    def notices(self) -> list[tuple[int, str]]:
        """(log level, message) for what the user should know: a mixed folder, wide pixels, unreadable files."""
        found: list[tuple[int, str]] = []
        readable = self.gray + self.color
        if self.gray and self.color and self.channels == 3:
            found.append(
                (
                    logging.WARNING,
                    f"{self.root}: {self.gray:,} of {readable:,} images are grayscale; they are converted to RGB "
                    "(data.channels=3, the majority; data.channels=1 makes every image grayscale instead)",
                )
            )
        elif self.gray and self.color:
            found.append(
                (
                    logging.WARNING,
                    f"{self.root}: {self.color:,} of {readable:,} images are in colour; they are converted to "
                    "grayscale (data.channels=1, the majority; data.channels=3 keeps their colour)",
                )
            )
        if self.wide:
            found.append(
                (
                    logging.INFO,
                    f"{self.root}: {self.wide:,} of {readable:,} images have 16-bit or floating-point pixels; they "
                    "are scaled to 8 bits by their range (docs/data.md)",
                )
            )
        if self.unreadable:
            where, reason = self.unreadable[0]
            found.append(
                (
                    logging.WARNING,
                    f"{self.root}: {len(self.unreadable):,} of {self.total:,} files cannot be read (e.g. {where}: "
                    f"{reason}); they are skipped and counted as unreadable images (data.strict=true stops at the "
                    "first)",
                )
            )
        return found


def folder_channels(root: Path, files: list[Path], *, strict: bool = False) -> int:
    """The channel count of the images `files` under `root`, from every image's header. What a mixed, wide or
    partly unreadable folder becomes is said once per log (the two splits of an unsplit folder: one notice). With
    `strict` (data.strict), an unreadable file stops here, before anything is trained, as at its first read."""
    modes = read_modes(root, files)
    if strict and modes.unreadable:
        where, reason = modes.unreadable[0]
        raise DataError(f"unreadable image {where}: {reason} (set data.strict=false to skip such files with a warning)")
    destinations = tuple(id(handler) for handler in log.handlers)  # a new run's log hears it again
    for level, message in modes.notices():
        if (message, destinations) not in _said:
            _said.add((message, destinations))
            log.log(level, "data  %s", message)
    return modes.channels


def header_mode(path: Path) -> tuple[str, str]:
    """(mode, "") of an image file from its header alone, or ("", reason) when PIL cannot open it (damaged, not an
    image, or larger than PIL's decompression-bomb limit)."""
    try:
        with Image.open(path) as image:
            return image.mode, ""
    except DECODE_ERRORS as error:
        return "", f"{type(error).__name__}: {error}"


def read_modes(root: Path, files: list[Path]) -> FolderModes:
    """Every file's mode: from the cache when its size and modification time are unchanged, else from its header."""
    cache = _cache_path(root)
    cached = _read_cache(cache, root)
    entries: dict[str, list] = {}
    modes = FolderModes(root)
    start = last_report = time.perf_counter()
    opened = 0
    for count, path in enumerate(files, 1):
        name = os.path.relpath(path, root)
        try:
            stat = os.stat(path)
            key = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            key = [-1, -1]
        hit = cached.get(name)
        if isinstance(hit, list) and len(hit) == 4 and hit[:2] == key and all(isinstance(v, str) for v in hit[2:]):
            mode, reason = hit[2], hit[3]
        else:
            mode, reason = header_mode(path)
            opened += 1
        entries[name] = [*key, mode, reason]
        modes.add(str(path), mode, reason)
        if time.perf_counter() - last_report > PROGRESS_EVERY_SECONDS:
            last_report = time.perf_counter()
            log.info("data  %s: read the headers of %s of %s images", root, f"{count:,}", f"{len(files):,}")
    elapsed = time.perf_counter() - start
    if opened and (elapsed > CACHE_AFTER_SECONDS or cached):
        _write_cache(cache, root, entries)
        log.info("data  %s: read %s image headers in %.1f s (kept in %s)", root, f"{opened:,}", elapsed, cache)
    return modes


def _cache_path(root: Path) -> Path:
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return cache_dir() / "image-modes" / f"{digest}.json"


def _read_cache(path: Path, root: Path) -> dict[str, list]:
    """The cached entries of `root`; none when the file is missing, damaged or of another folder or version."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("root") != str(root.resolve()):
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _write_cache(path: Path, root: Path, entries: dict[str, list]) -> None:
    """Written beside and renamed over the old file, so a reader never sees half of it; a cache that cannot be
    written (read-only home, full disk) only costs the next run another scan."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"version": CACHE_VERSION, "root": str(root.resolve()), "files": entries}))
        partial.replace(path)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
