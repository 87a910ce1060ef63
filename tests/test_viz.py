"""Figures and the run report: attention math against an explicit reference, kept-mass thresholds, PCA colours,
curves, reconstructions, generic evaluation tables, and `mimkit viz` end to end on a tiny iBOT run."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from mimkit.cli import main
from mimkit.engine.logs import read_metrics
from mimkit.engine.train import pretrain
from mimkit.eval.results import save_result
from mimkit.models.backbones import BackboneConfig, build_backbone
from mimkit.models.families.vit import MaskableViT
from mimkit.runs import load_run_config
from mimkit.viz.attention import attention_maps, kept_mass
from mimkit.viz.curves import curves_figure, smoothed
from mimkit.viz.embedding import embedding_figure
from mimkit.viz.masks import mask_overlay_figure, reconstruction_figure, to_display
from mimkit.viz.pca import patch_pca_rgb, principal_components
from mimkit.viz.report import tables
from support import IBOT_RECIPE, QUIET_CPU_RUN, SYNTHETIC_28, TINY_IBOT_HEADS

TINY_RUN = [
    "method.backbone.embed_dim=32",
    "method.backbone.depth=2",
    "method.backbone.num_heads=2",
    *TINY_IBOT_HEADS,
    "method.views.num_local=2",
    "method.mask.ratios=[[0.4,0.1]]",
    *SYNTHETIC_28,
    "data.synthetic.images=8",
    "data.batch_size=4",
    "train.epochs=1",
    "train.log_every_steps=1",
    *QUIET_CPU_RUN,
]


def tiny_vit(channels: int = 1, heads: int = 2) -> MaskableViT:
    cfg = BackboneConfig("vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=24, depth=2, num_heads=heads)
    torch.manual_seed(0)
    return build_backbone(cfg, channels, mask_token=False).eval()


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0


def saved(figure: Figure, path: Path) -> Path:
    figure.savefig(path)
    assert_png(path)
    return path


# ---------------------------------------------------------------------------------------------------
# Attention


def test_attention_matches_explicit_attention_on_the_block_input() -> None:
    encoder = tiny_vit(heads=3).double()
    images = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    block = encoder.vit.blocks[-1]
    seen: dict[str, torch.Tensor] = {}
    block.register_forward_pre_hook(lambda _m, args: seen.update(block_input=args[0]))
    block.attn.register_forward_hook(lambda _m, _args, output: seen.update(attn_output=output))

    attention = encoder.last_attention(images)

    x = block.norm1(seen["block_input"])
    heads, dim = block.attn.num_heads, block.attn.head_dim
    weight, bias = block.attn.qkv.weight, block.attn.qkv.bias
    per_head, outputs = [], []
    for h in range(heads):
        q = x @ weight[h * dim : (h + 1) * dim].T + bias[h * dim : (h + 1) * dim]
        k = x @ weight[(heads + h) * dim : (heads + h + 1) * dim].T + bias[(heads + h) * dim : (heads + h + 1) * dim]
        v = x @ weight[(2 * heads + h) * dim :][:dim].T + bias[(2 * heads + h) * dim :][:dim]
        scores = torch.exp(q @ k.transpose(1, 2) / math.sqrt(dim))
        probabilities = scores / scores.sum(-1, keepdim=True)
        per_head.append(probabilities)
        outputs.append(probabilities @ v)
    reference = torch.stack(per_head, dim=1)

    assert attention.shape == (2, heads, 50, 50)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, heads, 50, dtype=torch.float64))
    torch.testing.assert_close(attention, reference)
    # the probabilities are the ones timm's fused kernel used: they reproduce the block's attention output
    torch.testing.assert_close(block.attn.proj(torch.cat(outputs, dim=-1)), seen["attn_output"])


def test_cls_maps_are_the_cls_row_on_the_patch_grid() -> None:
    encoder = tiny_vit()
    maps = attention_maps(encoder, torch.randn(3, 1, 28, 28), fraction=0.5)
    assert maps.maps.shape == maps.kept.shape == (3, 2, 7, 7)
    torch.testing.assert_close(maps.maps.flatten(-2), maps.attention[:, :, 0, 1:])
    assert not encoder.vit.blocks[-1].attn._forward_hooks  # the capture hook is gone


@pytest.mark.parametrize("fraction", [0.1, 0.6, 0.9, 1.0])
def test_kept_mass_is_the_fewest_patches_holding_the_fraction(fraction: float) -> None:
    # multiples of 1/64 add up exactly in float32, so "at least the fraction" has no rounding slack
    maps = torch.randint(0, 40, (2, 3, 5, 6), generator=torch.Generator().manual_seed(1)).float() ** 2 / 64
    kept = kept_mass(maps, fraction)
    for m, k in zip(maps.flatten(0, 1), kept.flatten(0, 1), strict=True):
        target = fraction * m.sum().item()
        assert m[k].sum() >= target
        values = m.flatten().sort(descending=True).values.tolist()
        fewest = next(i + 1 for i in range(len(values)) if sum(values[: i + 1]) >= target)
        assert int(k.sum()) == fewest
        if not k.all():
            assert m[k].min() >= m[~k].max()  # the kept patches are the largest ones


# ---------------------------------------------------------------------------------------------------
# PCA, masks, reconstructions, curves


def test_pca_colours_have_the_grid_shape_and_span_the_unit_range() -> None:
    g = torch.Generator().manual_seed(0)
    strength = torch.linspace(-3, 3, 2 * 16)
    direction = torch.randn(40, generator=g)
    patches = (strength[:, None] * direction + 0.1 * torch.randn(32, 40, generator=g)).view(2, 16, 40)
    rgb = patch_pca_rgb(patches, (4, 4))
    assert rgb.shape == (2, 4, 4, 3)
    assert rgb.min() >= 0 and rgb.max() <= 1
    torch.testing.assert_close(rgb.flatten(0, 2).amin(0), torch.zeros(3))
    torch.testing.assert_close(rgb.flatten(0, 2).amax(0), torch.ones(3))
    first = rgb.flatten(0, 2)[:, 0]
    assert abs(torch.corrcoef(torch.stack([first, strength]))[0, 1]) > 0.99  # component 1 is the planted one


def test_pca_of_fewer_features_than_colours_leaves_the_rest_black() -> None:
    rgb = patch_pca_rgb(torch.randn(1, 9, 2), (3, 3))
    assert rgb.shape == (1, 3, 3, 3) and rgb[..., 2].abs().max() == 0


def test_principal_components_are_uncorrelated_by_decreasing_variance() -> None:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(200, 6, generator=g) * torch.tensor([5.0, 0.1, 2.0, 0.1, 0.1, 0.1]) + 7
    coordinates = principal_components(features, 2)
    assert coordinates.shape == (200, 2)
    torch.testing.assert_close(coordinates.mean(0), torch.zeros(2), atol=1e-4, rtol=0)
    variances = coordinates.var(0)
    assert variances[0] > variances[1] > 1  # the 5- and 2-scaled axes, in that order
    assert abs(torch.corrcoef(coordinates.T)[0, 1]) < 1e-4
    assert abs(torch.corrcoef(torch.stack([coordinates[:, 0], features[:, 0]]))[0, 1]) > 0.99


def test_principal_components_beyond_the_rank_are_zero() -> None:
    coordinates = principal_components(torch.randn(5, 1), 2)
    assert coordinates.shape == (5, 2) and coordinates[:, 1].abs().max() == 0


def test_embedding_has_one_legend_entry_per_class_present() -> None:
    labels = torch.tensor([0, 2, 2, 0, 2])
    figure = embedding_figure(torch.randn(5, 2), labels, ("cat", "dog", "fish"))
    (ax,) = figure.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cat", "fish"]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 5
    unlabelled = embedding_figure(torch.randn(3, 2), torch.full((3,), -1))
    assert [t.get_text() for t in unlabelled.axes[0].get_legend().get_texts()] == ["unlabelled"]


@pytest.mark.parametrize("channels", [1, 3])
def test_display_undoes_normalisation_and_masks_overlay(tmp_path: Path, channels: int) -> None:
    mean, std = (0.5,) * channels, (0.25,) * channels
    pixels = torch.rand(2, 2, channels, 16, 16)
    normalised = (pixels - 0.5) / 0.25
    torch.testing.assert_close(torch.from_numpy(to_display(normalised, mean, std)), pixels.movedim(-3, -1))
    masks = torch.rand(2, 2, 4, 4) > 0.5
    assert_png(saved(mask_overlay_figure(normalised, masks, mean, std), tmp_path / "masks.png"))


def test_reconstruction_figure_from_synthetic_tensors(tmp_path: Path) -> None:
    originals, reconstructions = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    masks = torch.rand(3, 4, 4) > 0.5
    assert_png(saved(reconstruction_figure(originals, reconstructions, masks), tmp_path / "reconstructions.png"))


def test_curves_from_a_small_metrics_file(tmp_path: Path) -> None:
    columns = ["step", "loss", "loss_cls", "loss_patch", "lr", "weight_decay", "images_per_second", "epoch"]
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, [*columns, "skipped_images", "knn_top1"])
        writer.writeheader()
        for step in range(1, 21):
            writer.writerow({c: step if c == "step" else 1 / step for c in columns})
            if step % 10 == 0:
                writer.writerow({"step": step, "epoch": step // 10 - 1, "skipped_images": 0, "knn_top1": step / 40})
    figure = curves_figure(read_metrics(tmp_path), smoothing=0.6)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["loss", "learning rate", "weight decay", "images / s", "k-NN top-1"]
    assert len(figure.axes[0].get_legend().get_texts()) == 3
    assert len(figure.axes[0].lines) == 6 and len(figure.axes[1].lines) == 1  # raw + smoothed; schedules exact
    assert_png(saved(figure, tmp_path / "curves.png"))
    assert smoothed([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)


def test_evaluation_json_becomes_tables() -> None:
    knn = {"temperature": 0.07, "accuracy": {"pretrained": {"10": 0.81234, "20": 0.8}, "raw pixels": {"10": 0.5}}}
    found = tables(knn, "knn")
    assert [t.title for t in found] == ["knn", "knn / accuracy"]
    assert found[1].header == ["", "10", "20"]
    assert found[1].rows == [["pretrained", "0.8123", "0.8"], ["raw pixels", "0.5", ""]]
    linear = tables({"table": [{"lr": 0.1, "top1": 0.7}, {"lr": 0.01, "top1": 0.75}]}, "linear")
    assert linear[0].title == "linear / table" and linear[0].header == ["lr", "top1"] and len(linear[0].rows) == 2


# ---------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch iBOT run on 8 synthetic images, with a k-NN result file beside it."""
    run = tmp_path_factory.mktemp("viz") / "run"
    pretrain(load_run_config(IBOT_RECIPE, [*TINY_RUN, f"output_dir={run}"]))
    accuracy = {"pretrained": {"10": 0.5, "20": 0.25}, "random init": {"10": 0.3, "20": 0.2}}
    save_result(run, "knn", {"pooling": "cls", "accuracy": {"pretrained": {"20": 0.125}}}, "k=20: first 12.50", 0.125)
    save_result(run, "knn", {"pooling": "cls", "accuracy": accuracy}, "k=20: pretrained 25.00", 0.25)
    return run


def test_viz_writes_every_figure_and_a_report(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["viz", str(tiny_run), "--images", "3"]) == 0
    out = capsys.readouterr().out
    report = tiny_run / "report"
    figures = ["attention", "masks", "pca", "embedding", "curves"]
    for name in figures:
        assert_png(report / f"{name}.png")
        assert f"saved {report / f'{name}.png'}" in out
    page = (report / "index.html").read_text()
    assert f"saved {report / 'index.html'}" in out
    assert all(f'src="{name}.png"' in page for name in figures)
    assert "name: ibot" in page and "global_size: 28" in page  # the config
    assert "<td>random init</td>" in page and "knn / accuracy" in page  # the evaluation table
    assert page.index("k=20: first 12.50") < page.index("k=20: pretrained 25.00")  # every evaluation, in order
    assert "Environment" in page


def test_viz_makes_only_what_is_asked_where_asked(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    assert main(["viz", str(tiny_run), "--what", "report", "curves", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "index.html"]
    page = (out / "index.html").read_text()
    assert 'src="curves.png"' in page and "attention.png" not in page
    assert main(["viz", str(tiny_run), "--what", "curves", "--out", str(out)]) == 0  # its own figures: redrawn


def test_viz_never_draws_into_a_folder_of_images(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (4, 4)).save(photos / "holiday.png")
    assert main(["viz", str(tiny_run), "--what", "curves", "--out", str(photos)]) == 2
    assert "holds images" in capsys.readouterr().err and sorted(p.name for p in photos.iterdir()) == ["holiday.png"]


def test_viz_on_rgb_data(tmp_path: Path) -> None:
    run = tmp_path / "rgb"
    pretrain(load_run_config(IBOT_RECIPE, [*TINY_RUN, "data.channels=3", f"output_dir={run}"]))
    assert main(["viz", str(run), "--images", "2", "--what", "attention", "masks", "pca"]) == 0
    for name in ("attention", "masks", "pca"):
        assert_png(run / "report" / f"{name}.png")


@pytest.mark.parametrize("option", [["--images", "0"], ["--points", "0"], ["--threshold", "1.5"], ["--smooth", "1"]])
def test_viz_bad_option_values_exit_2_naming_them(
    tiny_run: Path, option: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["viz", str(tiny_run), *option, "--what", "curves"]) == 2
    assert option[0] in capsys.readouterr().err


def test_embedding_takes_points_images_of_the_split(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mimkit.viz.embedding

    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
    draw = mimkit.viz.embedding.embedding_figure
    monkeypatch.setattr(mimkit.viz.embedding, "embedding_figure", lambda p, y, n: drawn.append((p, y)) or draw(p, y, n))
    assert main(["viz", str(tiny_run), "--what", "embedding", "--points", "5", "--out", str(tmp_path)]) == 0
    assert_png(tmp_path / "embedding.png")
    ((points, labels),) = drawn
    assert points.shape == (5, 2) and labels.shape == (5,) and labels.min() >= 0  # synthetic shapes are labelled
