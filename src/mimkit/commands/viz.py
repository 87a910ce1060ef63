"""`mimkit viz`: figures of a run (attention, masks, patch PCA, segmentation, training curves) and its HTML report."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from mimkit.data.sources import Subset
    from mimkit.methods.base import Method
    from mimkit.models.encoder import Encoder
    from mimkit.runs import LoadedRun

FIGURES = ("attention", "masks", "reconstructions", "panels", "pca", "embedding", "segmentation", "curves", "report")
"""What `--what` can name, in the order they are made (the report last: it shows the figures made before)."""

EPILOG = """examples:
  mimkit viz runs/ibot_vit_tiny_fmnist                  every figure and runs/ibot_vit_tiny_fmnist/report/index.html
  mimkit viz runs/try --what attention --images 8       one figure, more images
  mimkit viz runs/try/checkpoints/epoch_0009.ckpt --out runs/try/report_epoch9
"""


def add(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "viz",
        help="figures of a run and an HTML report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Draw [CLS] attention maps, masked views, reconstructions, a method's own panels (CIM: its "
        "corrupted images and predictions), patch-feature PCA, a 2-D PCA of image features and training curves of "
        "a run as PNGs, and an index.html that gathers them with the config and the evaluation "
        "results.",
        epilog=EPILOG,
    )
    p.add_argument("run_path", metavar="RUN", help="run folder or checkpoint file")  # `run` is the function
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="data overrides, e.g. data.root=/data")
    p.add_argument("--images", type=int, default=4, metavar="N", help="images per figure (default 4)")
    p.add_argument("--split", help="split the images come from (default: the run's data.eval_split)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/report)")
    p.add_argument(
        "--what",
        nargs="+",
        choices=FIGURES,
        default=list(FIGURES),
        metavar="WHAT",
        help=f"any of {', '.join(FIGURES)} (default: all; the report always comes last)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.6,
        metavar="F",
        help="attention mass the thresholded maps keep (default 0.6)",
    )
    p.add_argument(
        "--smooth", type=float, default=0.0, metavar="W", help="EMA weight in [0, 1) for the curves (0: raw)"
    )
    p.add_argument(
        "--points", type=int, default=1000, metavar="N", help="images in the feature embedding (default 1000)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mimkit.config import ConfigError

    if args.images < 1 or args.points < 1 or not 0 < args.threshold <= 1 or not 0 <= args.smooth < 1:
        raise ConfigError("viz: needs --images >= 1, --points >= 1, 0 < --threshold <= 1 and 0 <= --smooth < 1")
    from mimkit.runs import load_run

    loaded = load_run(args.run_path, args.overrides)
    out = Path(args.out) if args.out else loaded.run_dir / "report"
    if not _drawn_by_viz(out):  # a folder of mimkit's own figures is redrawn in place
        from mimkit.data.output_folder import check_output_folder

        fix = "choose a folder of its own with --out (the default is RUN/report)"
        check_output_folder(out, "--out", fix, {"data.root": loaded.cfg.data.root})
    out.mkdir(parents=True, exist_ok=True)
    makers = {
        "attention": _attention,
        "masks": _masks,
        "reconstructions": _reconstructions,
        "panels": _panels,
        "pca": _pca,
        "embedding": _embedding,
        "segmentation": _segmentation,
        "curves": _curves,
    }
    for name in FIGURES:
        if name not in args.what:
            continue
        if name == "report":
            path = _report(loaded, out)
        else:
            figure = makers[name](loaded, args)
            if figure is None:
                continue
            path = out / f"{name}.png"
            figure.savefig(path, dpi=110)
        print(f"saved {path}")
    return 0


def _encoder_and_images(loaded: LoadedRun, args: argparse.Namespace) -> tuple[Encoder, torch.Tensor]:
    """The run's encoder and `--images` evenly spaced images of the split through EvalView."""
    import torch

    from mimkit.data.views import EvalView

    encoder = loaded.encoder()
    images = [view for view, _, _ in _samples(loaded, args, EvalView(loaded.method.data, encoder.image_size))]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return encoder.to(device).eval(), torch.stack(images).to(device)


def _spread_images(loaded: LoadedRun, args: argparse.Namespace, count: int) -> Subset:
    """`count` images spread evenly over the split."""
    from mimkit.data.sources import Subset

    source = loaded.source(args.split or loaded.cfg.data.eval_split)
    return Subset(source, min(count, len(source)), spread=True)


def _samples(
    loaded: LoadedRun, args: argparse.Namespace, transform: Callable[[torch.Tensor, int], Any]
) -> list[tuple[Any, int, int]]:
    """Views of `--images` evenly spaced images; unreadable ones skipped."""
    from mimkit.data.info import DataError
    from mimkit.data.loader import Skipped, ViewDataset

    spread = _spread_images(loaded, args, args.images)
    dataset = ViewDataset(spread.source, transform, seed=loaded.cfg.seed)  # random views seeded by split index
    epoch = max(loaded.cfg.train.epochs - 1, 0)  # mask schedules (start_epoch) as at the end of training
    samples = [dataset[(epoch, i)] for i in spread.indices]
    skipped = [s for s in samples if isinstance(s, Skipped)]
    if skipped:
        print(f"viz: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0].where} ({skipped[0].reason})")
    samples = [s for s in samples if not isinstance(s, Skipped)]
    if not samples:
        raise DataError(f"viz: none of the chosen images of {spread.info.name} could be read")
    return samples


def _attention(loaded: LoadedRun, args: argparse.Namespace) -> Figure | None:
    from mimkit.viz.attention import attention_figure, attention_maps

    if not loaded.encoder().has_attention:
        print(f"attention: {loaded.encoder().describe()} has no attention maps; skipped")
        return None
    encoder, images = _encoder_and_images(loaded, args)
    info = loaded.method.data
    return attention_figure(images, attention_maps(encoder, images, args.threshold), info.mean, info.std)


def _pca(loaded: LoadedRun, args: argparse.Namespace) -> Figure:
    import torch

    from mimkit.viz.pca import patch_pca_rgb, pca_figure

    encoder, images = _encoder_and_images(loaded, args)
    with torch.no_grad():
        patches = encoder(images)[:, encoder.num_prefix_tokens :]
    rgb = patch_pca_rgb(patches, encoder.grid(*images.shape[-2:]))
    return pca_figure(images, rgb, loaded.method.data.mean, loaded.method.data.std)


def _embedding(loaded: LoadedRun, args: argparse.Namespace) -> Figure:
    import torch

    from mimkit.eval.features import encoder_image_size, extract_features
    from mimkit.viz.embedding import embedding_figure
    from mimkit.viz.pca import principal_components

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = loaded.encoder().to(device)
    source = _spread_images(loaded, args, args.points)
    found = extract_features(encoder, source, encoder_image_size(encoder, source), "cls", device=device)
    return embedding_figure(principal_components(found.features, 2), found.labels, loaded.method.data.class_names)


def _masks(loaded: LoadedRun, args: argparse.Namespace) -> Figure | None:
    import torch

    from mimkit.viz.masks import mask_overlay_figure

    transform = loaded.method.views()
    contents = [transform.contents(views) for views, _, _ in _samples(loaded, args, transform)]
    masked = [[(c, m) for c, m in zip(v.crops, v.masks, strict=True) if m is not None] for v in contents]
    names = [n for n, m in zip(contents[0].names, contents[0].masks, strict=False) if m is not None]
    if not masked[0]:
        print(f"masks: the views of {loaded.cfg.method.name} carry no patch masks; skipped")
        return None
    crops = torch.stack([torch.stack([c for c, _ in pairs]) for pairs in masked])
    masks = torch.stack([torch.stack([m for _, m in pairs]) for pairs in masked])
    return mask_overlay_figure(crops, masks, loaded.method.data.mean, loaded.method.data.std, names)


def _method_and_views(loaded: LoadedRun, args: argparse.Namespace) -> tuple[Method, Any]:
    """The run's method in eval mode and a collated batch of its own views of `--images` images."""
    from mimkit.data.loader import collate

    method = loaded.method.eval()
    return method, collate(_samples(loaded, args, method.views()))["views"]


def _reconstructions(loaded: LoadedRun, args: argparse.Namespace) -> Figure | None:
    import torch

    from mimkit.viz.masks import reconstruction_figure

    method, views = _method_and_views(loaded, args)
    with torch.no_grad():
        found = method.reconstruct(views)
    if found is None:
        print(f"reconstructions: {loaded.cfg.method.name} predicts no pixels; skipped")
        return None
    info = method.data
    return reconstruction_figure(found.originals, found.reconstructions, found.masks, info.mean, info.std)


def _panels(loaded: LoadedRun, args: argparse.Namespace) -> Figure | None:
    """The method's own rows of inputs and outputs (CIM: masks, tokenizer images, corrupted images, predictions)."""
    import torch

    from mimkit.viz.masks import panels_figure

    method, views = _method_and_views(loaded, args)
    with torch.no_grad():
        panels = method.panels(views)
    if not panels:
        print(f"panels: {loaded.cfg.method.name} draws no panels beyond its masks; skipped")
        return None
    info = method.data
    return panels_figure([(panel.title, panel.values) for panel in panels], info.mean, info.std)


def _segmentation(loaded: LoadedRun, args: argparse.Namespace) -> Figure | None:
    """What the probe of `mimkit eval segment` predicts for a few eval images, beside their label maps."""
    import torch

    from mimkit.data.info import DataError, UnreadableImage
    from mimkit.data.sources import label_size_problem
    from mimkit.data.views import EvalView
    from mimkit.eval.dense import PROBE_FILE, load_probe
    from mimkit.eval.features import encoder_image_size
    from mimkit.eval.segment import predict_label_maps
    from mimkit.viz.segmentation import segmentation_figure

    path = loaded.run_dir / "eval" / PROBE_FILE
    if not path.is_file():
        print(f"segmentation: no {path} (mimkit eval segment RUN trains it); skipped")
        return None
    probe, classes, about = load_probe(path)
    if (about["checkpoint"], about["modified"]) != (str(loaded.checkpoint), loaded.checkpoint.stat().st_mtime_ns):
        print(f"segmentation: {path} was trained on another checkpoint; run mimkit eval segment again; skipped")
        return None
    encoder = loaded.encoder().eval()
    spread = _spread_images(loaded, args, args.images)
    view = EvalView(spread.info, encoder_image_size(encoder, spread))
    try:
        if spread.segmentation_classes() != classes:
            raise DataError(f"{path} was trained on other classes than this data's; evaluate it on this data first")
        pairs = [(spread.load(i)[0], spread.label_map(i)) for i in range(len(spread))]
        for i, (image, labels) in enumerate(pairs):
            if labels.shape != image.shape[-2:]:
                problem = label_size_problem(tuple(labels.shape), tuple(image.shape[-2:]))
                raise DataError(f"{spread.label_map_where(i)}: {problem}")
    except (DataError, UnreadableImage) as error:
        print(f"segmentation: {error}; skipped")
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = torch.stack([view(image) for image, _ in pairs]).to(device)
    truth = torch.stack([view.label_map(labels) for _, labels in pairs])
    predicted = predict_label_maps(probe.to(device), encoder.to(device), images)
    return segmentation_figure(images, truth, predicted, classes, spread.info.mean, spread.info.std)


def _curves(loaded: LoadedRun, args: argparse.Namespace) -> Figure | None:
    from mimkit.engine.logs import METRICS_FILE, read_metrics
    from mimkit.viz.curves import curves_figure

    if not (loaded.run_dir / METRICS_FILE).is_file():
        print(f"curves: no {METRICS_FILE} in {loaded.run_dir}; skipped")
        return None
    return curves_figure(read_metrics(loaded.run_dir), args.smooth)


def _report(loaded: LoadedRun, out: Path) -> Path:
    from datetime import datetime

    from mimkit import __version__
    from mimkit.config import dump_yaml
    from mimkit.data.sources import describe
    from mimkit.viz.report import write_report

    summary = {
        "run folder": str(loaded.run_dir),
        "checkpoint": str(loaded.checkpoint),
        "method": loaded.cfg.method.name,
        "data": describe(loaded.source(loaded.cfg.data.split)),
        "generated": f"{datetime.now():%Y-%m-%d %H:%M} by mimkit {__version__}",
    }
    return write_report(out, loaded.run_dir, dump_yaml(loaded.cfg), summary)


def _drawn_by_viz(folder: Path) -> bool:
    """The folder holds figures and nothing but mimkit's figures (a report folder drawn before)."""
    pictures = [p for p in folder.glob("*.png")] if folder.is_dir() else []
    return bool(pictures) and all(p.stem in FIGURES for p in pictures)
