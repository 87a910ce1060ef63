"""Writing tar shards for clusters (`mimkit data shard SRC OUT`): a few large files instead of many small ones.

A shard folder holds `shard-000000.tar`, ... in the webdataset layout (each image's original file bytes as
`<key>.<ext>` and its label as `<key>.cls`; `tar tf` and webdataset read them) and `index.json`, which records
where every member's bytes start. So the `shards` source (`mimkit.data.sources.shards.ShardSource`) reads an image with
one positioned read (`os.pread`: no shared file offset, safe in forked DataLoader workers), and training keeps
what a map-style source has: per-image seeded views and exact mid-epoch resume. The training sampler reads by
shard (`ImageSource.groups`): each epoch shuffles the shard order and the images within each shard, and every
rank takes a contiguous run of that order, so each rank (and each worker, which takes whole batches) reads a few
whole shards.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Callable
from pathlib import Path

from mimkit.data.info import DataError
from mimkit.data.sources.imagefolder import ImageFolderSource
from mimkit.data.sources.shards import SHARD_FORMAT, SHARD_INDEX


def write_shards(
    source: ImageFolderSource,
    out: Path,
    *,
    images_per_shard: int = 1000,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write the images of an image-folder source into shards under `out` in a seeded random order (so each shard
    mixes the classes), with their original bytes; returns the index. An existing index in `out` is an error."""
    if images_per_shard < 1:
        raise DataError(f"--images-per-shard: must be >= 1; got {images_per_shard}")
    out.mkdir(parents=True, exist_ok=True)
    if (out / SHARD_INDEX).exists():
        raise DataError(f"{out} already holds shards ({SHARD_INDEX}); choose an empty folder")
    order = list(range(len(source.files)))
    random.Random(seed).shuffle(order)
    shards = []
    for start in range(0, len(order), images_per_shard):
        name = f"shard-{len(shards):06d}.tar"
        written = []
        with tarfile.open(out / f"{name}.partial", "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in order[start : start + images_per_shard]:
                path, label = source.files[index], source.targets[index]
                key = f"{index:09d}"
                _add(tar, f"{key}{path.suffix.lower()}", path.read_bytes())
                _add(tar, f"{key}.cls", str(label).encode())
                written.append((key, f"{key}{path.suffix.lower()}", label))
                if progress is not None:
                    progress(1)
        with tarfile.open(out / f"{name}.partial") as tar:  # where each image's bytes start, as a reader sees it
            found = {member.name: member for member in tar.getmembers()}
        members = [[key, found[member].offset_data, found[member].size, label] for key, member, label in written]
        (out / f"{name}.partial").replace(out / name)
        shards.append({"file": name, "members": members})
    index = {
        "format": SHARD_FORMAT,
        "source": str(source.root),
        "classes": list(source.info.class_names),
        "channels": source.channels,
        "shards": shards,
    }
    (out / f"{SHARD_INDEX}.partial").write_text(json.dumps(index))
    (out / f"{SHARD_INDEX}.partial").replace(out / SHARD_INDEX)  # the folder counts as shards only once it is complete
    return index


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
