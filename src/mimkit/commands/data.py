"""`mimkit data`: get and inspect datasets."""

from __future__ import annotations

import argparse

from mimkit.data.info import DataError


def add(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("data", help="get and inspect datasets")
    sub = p.add_subparsers(title="data commands", metavar="ACTION", required=True)
    fetch = sub.add_parser("fetch", help="make Fashion-MNIST available (system package, else download to the cache)")
    fetch.add_argument("dataset", choices=["fashion-mnist"])
    fetch.set_defaults(run=run_data_fetch)
    info = sub.add_parser("info", help="describe the data a recipe reads")
    info.add_argument("-c", "--config", required=True, help="recipe: a shipped name or a YAML path")
    info.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    info.set_defaults(run=run_data_info)
    shard = sub.add_parser(
        "shard",
        help="write an image folder as tar shards (webdataset layout + index) for data.source=shards",
        description="Write the images of SRC (its train/, val/, test/ folders each, when it has them) as tar shards "
        "under OUT, in a seeded random order, with their original bytes; then train with data.source=shards "
        "data.root=OUT.",
    )
    shard.add_argument("src", metavar="SRC", help="an image folder (labels from its sub-folders, as for imagefolder)")
    shard.add_argument("out", metavar="OUT", help="an empty or new folder")
    shard.add_argument("--images-per-shard", type=int, default=1000, help="images per tar file (%(default)s)")
    shard.add_argument("--seed", type=int, default=0, help="seed of the order of the images (%(default)s)")
    shard.set_defaults(run=run_data_shard)


def run_data_fetch(args: argparse.Namespace) -> int:
    from mimkit.data import fashion_mnist

    for split in ("train", "test"):
        found = fashion_mnist.locate(split, None) or fashion_mnist.download(split)
        print(f"fashion-mnist {split}: {found[0]}")
    return 0


def run_data_info(args: argparse.Namespace) -> int:
    from mimkit.data.sources import build_source, describe
    from mimkit.runs import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    for split in (cfg.data.split, cfg.data.eval_split):
        try:
            print(f"{split}: {describe(build_source(cfg.data, split))}")
        except DataError as error:
            print(f"{split}: not available ({error})")
    return 0


def run_data_shard(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.progress import Progress

    from mimkit.data.config import DataConfig
    from mimkit.data.output_folder import check_output_folder
    from mimkit.data.shards import write_shards
    from mimkit.data.sources import ImageFolderSource

    src, out = Path(args.src).expanduser(), Path(args.out).expanduser()
    if not src.is_dir():
        raise DataError(f"{src} is not a folder; give the folder of images to shard")
    beside = src.resolve().with_name(src.resolve().name + "_shards")
    check_output_folder(out, "OUT", f"give OUT a new folder outside SRC, e.g. {beside}", {"SRC": src})
    splits = [name for name in ("train", "val", "test") if (src / name).is_dir()] or [None]
    written = []
    with Progress(transient=True) as progress:
        for split in splits:
            cfg = DataConfig(source="imagefolder", root=str(src), split=split or "train")
            source = ImageFolderSource(cfg, split or "train")
            target = out / split if split else out
            task = progress.add_task(f"sharding {split or src.name}", total=len(source.files))
            index = write_shards(
                source,
                target,
                images_per_shard=args.images_per_shard,
                seed=args.seed,
                progress=lambda n, task=task: progress.advance(task, n),
            )
            shards = index["shards"]
            total = sum(len(s["members"]) for s in shards)
            size = sum((target / s["file"]).stat().st_size for s in shards) / 2**20
            written.append(
                f"{target}: {total:,} images in {len(shards)} shard(s), {size:.2f} MiB, {len(index['classes'])} classes"
            )
    print("\n".join(written))
    print(f"train on them with: data.source=shards data.root={out}")
    return 0
