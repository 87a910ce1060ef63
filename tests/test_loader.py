"""From a source to batches: seeded views, the resumable sharded sampler, skipping collate; the view pipelines."""

from __future__ import annotations

import logging
import random
import warnings

import pytest
import torch

from mimkit.data.augment import GRAY, JITTER
from mimkit.data.config import DataConfig
from mimkit.data.info import DataError, DataInfo, UnreadableImage
from mimkit.data.loader import EpochSampler, Skipped, ViewDataset, collate, seeded, train_loader
from mimkit.data.masking import MaskGenerator
from mimkit.data.sources import ImageSource, SyntheticConfig, build_source
from mimkit.data.views import EvalView, MultiCropViews
from mimkit.methods import method_class
from mimkit.runs import load_run_config
from support import IBOT_RECIPE
from toy_method import ToyViews

IBOT_PATCH4 = ["data.source=synthetic", "method.backbone.patch_size=4", "method.views.local_size=12"]
"""The recipe on a 7x7 patch grid with 12-pixel local crops, the shapes these tests spell out."""


def shapes(images: int = 32, size: int = 16, channels: int | None = None) -> ImageSource:
    return build_source(
        DataConfig(source="synthetic", options=SyntheticConfig(images=images, size=size), channels=channels)
    )


def toy_dataset(images: int = 32, seed: int = 7) -> ViewDataset:
    return ViewDataset(shapes(images), ToyViews(crop=8, mean=0.5, std=0.25), seed=seed)


def same_views(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class FlakySource(ImageSource):
    """Six tiny images; those in `broken` cannot be decoded."""

    def __init__(self, broken: tuple[int, ...]) -> None:
        self.broken = broken
        self.info = DataInfo("flaky", 1, 6, (4, 4), None, (0.5,), (0.25,))

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        if index in self.broken:
            raise UnreadableImage(f"img_{index}.png", "truncated")
        return torch.full((1, 4, 4), index, dtype=torch.uint8), -1


def as_float(image: torch.Tensor, epoch: int) -> torch.Tensor:
    return image.float()


# ---------------------------------------------------------------------------------------------------
# seeded


def test_seeded_restores_the_global_generators() -> None:
    torch.manual_seed(11)
    random.seed(11)
    torch_before, random_before = torch.random.get_rng_state(), random.getstate()
    with seeded(1, 2, 3):
        torch.rand(5)
        random.random()
    assert torch.equal(torch.random.get_rng_state(), torch_before)
    assert random.getstate() == random_before


def test_seeded_restores_the_generators_after_an_exception() -> None:
    torch_before, random_before = torch.random.get_rng_state(), random.getstate()
    with pytest.raises(ZeroDivisionError), seeded(4):
        torch.rand(3)
        random.random()
        _ = 1 / 0
    assert torch.equal(torch.random.get_rng_state(), torch_before) and random.getstate() == random_before


def test_seeded_draws_depend_only_on_the_keys() -> None:
    def draws(*keys: int) -> tuple[list[float], float]:
        with seeded(*keys):
            return torch.rand(4).tolist(), random.random()

    first = draws(5, 0, 9)
    torch.rand(10)  # whatever the global state, the block's draws are the same
    random.random()
    assert draws(5, 0, 9) == first
    assert draws(5, 1, 9) != first and draws(5, 0, 8) != first and draws(6, 0, 9) != first


# ---------------------------------------------------------------------------------------------------
# ViewDataset


def test_view_of_an_image_is_identical_across_calls() -> None:
    dataset = toy_dataset()
    views, label, index = dataset[(2, 5)]
    again, label_again, index_again = dataset[(2, 5)]
    assert same_views(views, again) and label == label_again == 1 and index == index_again == 5


def test_views_differ_across_epochs_and_seeds() -> None:
    dataset = toy_dataset()
    assert not same_views(dataset[(0, 5)][0], dataset[(1, 5)][0])
    assert not same_views(dataset[(0, 5)][0], toy_dataset(seed=8)[(0, 5)][0])


def test_plain_index_means_epoch_zero() -> None:
    dataset = toy_dataset()
    assert same_views(dataset[5][0], dataset[(0, 5)][0])


def test_transform_receives_the_epoch() -> None:
    dataset = ViewDataset(shapes(4), lambda image, epoch: epoch, seed=0)
    assert dataset[(3, 1)][0] == 3


def test_unreadable_image_is_skipped_and_reported_by_its_consumer() -> None:
    dataset = ViewDataset(FlakySource(broken=(2,)), as_float, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw warning: the engine or the evaluation reports it, once
        item = dataset[(0, 2)]
    assert item == Skipped("img_2.png", "truncated")


def test_unreadable_image_is_fatal_when_strict() -> None:
    dataset = ViewDataset(FlakySource(broken=(2,)), as_float, seed=0, strict=True)
    with pytest.raises(DataError, match=r"unreadable image img_2.png: truncated \(set data.strict=false"):
        dataset[(0, 2)]


# ---------------------------------------------------------------------------------------------------
# EpochSampler


def epoch_order(sampler: EpochSampler, epoch: int, start: int = 0) -> list[int]:
    sampler.set_position(epoch, start)
    pairs = list(sampler)
    assert all(e == epoch for e, _ in pairs)
    return [index for _, index in pairs]


def test_sampler_shards_disjointly_and_covers_the_epoch() -> None:
    ranks = [EpochSampler(10, shuffle=True, seed=3, num_replicas=2, rank=r) for r in range(2)]
    shards = [epoch_order(sampler, epoch=4) for sampler in ranks]
    assert [len(s) for s in shards] == [5, 5] and [len(sampler) for sampler in ranks] == [5, 5]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(10))


def test_sampler_order_depends_on_epoch_and_seed() -> None:
    sampler = EpochSampler(20, shuffle=True, seed=3)
    first = epoch_order(sampler, 0)
    assert sorted(first) == list(range(20))
    assert epoch_order(sampler, 0) == first
    assert epoch_order(sampler, 1) != first
    assert epoch_order(EpochSampler(20, shuffle=True, seed=4), 0) != first


def test_unshuffled_sampler_is_in_order() -> None:
    assert epoch_order(EpochSampler(7, shuffle=False, seed=0), 2) == list(range(7))


@pytest.mark.parametrize("rank", [0, 1])
def test_set_position_yields_the_tail_of_the_epoch(rank: int) -> None:
    sampler = EpochSampler(21, shuffle=True, seed=5, num_replicas=2, rank=rank, drop_last=True)
    full = epoch_order(sampler, 3)
    assert len(full) == sampler.samples_per_epoch == 10
    for start in (0, 1, 4, 9, 10):
        assert epoch_order(sampler, 3, start) == full[start:]
        assert len(sampler) == len(full) - start
    assert epoch_order(sampler, 3) == full  # a later epoch starts from its beginning again


# ---------------------------------------------------------------------------------------------------
# collate and train_loader


def test_collate_drops_and_reports_skipped_items() -> None:
    image = torch.ones(1, 2, 2)
    batch = collate([(image, 3, 0), Skipped("bad.jpg", "truncated"), (2 * image, 4, 2)])
    assert batch["views"].shape == (2, 1, 2, 2) and torch.equal(batch["views"][1], 2 * image)
    assert batch["label"].tolist() == [3, 4] and batch["index"].tolist() == [0, 2]
    assert batch["skipped"] == ["bad.jpg (truncated)"]


def test_collate_of_only_skipped_items_is_empty() -> None:
    batch = collate([Skipped("a.png", "x"), Skipped("b.png", "y")])
    assert batch["views"] is None and len(batch["label"]) == 0 and len(batch["index"]) == 0
    assert batch["skipped"] == ["a.png (x)", "b.png (y)"]


def test_collate_batches_nested_views() -> None:
    dataset = toy_dataset()
    batch = collate([dataset[(0, i)] for i in range(3)])
    assert batch["views"]["clean"].shape == (3, 1, 8, 8) and batch["skipped"] == []


def epoch_batches(loader, epoch: int, start: int = 0) -> list[dict]:
    loader.sampler.set_position(epoch, start)
    return list(loader)


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        same_views(x["views"], y["views"]) and torch.equal(x["index"], y["index"]) and x["skipped"] == y["skipped"]
        for x, y in zip(a, b, strict=True)
    )


def test_batches_do_not_depend_on_the_number_of_workers() -> None:
    dataset = toy_dataset(images=24)
    serial = train_loader(dataset, batch_size=4, num_workers=0, seed=1)
    parallel = train_loader(dataset, batch_size=4, num_workers=2, seed=1)
    try:
        for epoch in (0, 1):
            expected = epoch_batches(serial, epoch)
            assert len(expected) == 6
            assert same_batches(epoch_batches(parallel, epoch), expected)
    finally:
        del parallel  # stops the persistent workers


def test_loader_resumed_mid_epoch_gives_the_remaining_batches() -> None:
    loader = train_loader(toy_dataset(images=24), batch_size=4, num_workers=0, seed=1)
    full = epoch_batches(loader, 2)
    assert same_batches(epoch_batches(loader, 2, start=2 * 4), full[2:])
    assert not same_batches(epoch_batches(loader, 3), full)


def test_loader_keeps_only_full_batches_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    loader = train_loader(toy_dataset(images=10), batch_size=4, num_workers=0, seed=1)
    batches = epoch_batches(loader, 0)
    assert [len(b["index"]) for b in batches] == [4, 4]
    assert torch.equal(torch.random.get_rng_state(), before)


def test_loader_reports_skipped_images_in_batches() -> None:
    dataset = ViewDataset(FlakySource(broken=(1, 4)), as_float, seed=0)
    loader = train_loader(dataset, batch_size=3, num_workers=0, seed=0)
    batches = epoch_batches(loader, 0)
    skipped = sorted(s for b in batches for s in b["skipped"])
    assert skipped == ["img_1.png (truncated)", "img_4.png (truncated)"]
    assert sorted(i for b in batches for i in b["index"].tolist()) == [0, 2, 3, 5]


def test_feature_extraction_skips_unreadable_images_and_fails_clearly_when_none_is_left(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mimkit.eval.features import RawPixels, extract_features

    with caplog.at_level(logging.WARNING, logger="mimkit"):
        found = extract_features(RawPixels(), FlakySource(broken=(1, 4)), image_size=4, batch_size=4)
    assert found.features[:, 0].tolist() == pytest.approx([(i / 255 - 0.5) / 0.25 for i in (0, 2, 3, 5)])
    assert caplog.text.count("skipped 2 unreadable image(s), e.g. img_1.png (truncated), img_4.png") == 1
    with pytest.raises(DataError, match=r"none of the 6 images of flaky could be read \(e.g. img_0.png"):
        extract_features(RawPixels(), FlakySource(broken=tuple(range(6))), image_size=4)


@pytest.mark.parametrize(("images", "replicas"), [(3, 1), (7, 2)])
def test_loader_refuses_data_smaller_than_one_global_batch(images: int, replicas: int) -> None:
    with pytest.raises(DataError, match=rf"{images} images are fewer than one global batch \(4 x {replicas} devices"):
        train_loader(toy_dataset(images=images), batch_size=4, num_workers=0, seed=0, num_replicas=replicas)


# ---------------------------------------------------------------------------------------------------
# Views


def data_info(channels: int) -> DataInfo:
    return DataInfo("synthetic", channels, 8, (32, 32), 4, (0.5,) * channels, (0.25,) * channels)


def ibot_views(channels: int) -> MultiCropViews:
    cfg = load_run_config(IBOT_RECIPE, IBOT_PATCH4).method
    return MultiCropViews(
        cfg.views, data_info(channels), (cfg.views.global_size // 4,) * 2, masks=MaskGenerator(cfg.mask)
    )


def jittered_crops(channels: int) -> int:
    """How many of 10 images' global crops drew colour jitter or grayscale."""
    views = ibot_views(channels)
    image = shapes(size=32, channels=channels).load(0)[0]
    count = 0
    for index in range(10):
        with seeded(0, 0, index):
            params = [augment.draw(image)[1] for augment in views.global_views]
        count += sum(int(p[JITTER] > 0 or p[GRAY] > 0) for p in params)
    return count


@pytest.mark.parametrize("channels", [1, 3])
def test_multicrop_gives_masked_global_crops_and_local_crops(channels: int) -> None:
    views = ibot_views(channels)
    image = shapes(size=32, channels=channels).load(0)[0]
    with seeded(0, 1, 2):
        out = views(image, epoch=0)
    assert [tuple(g.shape) for g in out["global"]] == [(channels, 28, 28)] * 2
    assert all(g.dtype == torch.float32 for g in out["global"] + out["local"])
    assert [tuple(m.shape) for m in out["masks"]] == [(7, 7)] * 2
    assert all(m.dtype == torch.bool for m in out["masks"])
    assert [tuple(c.shape) for c in out["local"]] == [(channels, 12, 12)] * 4


def test_colour_operations_only_for_rgb() -> None:
    assert jittered_crops(1) == 0
    assert jittered_crops(3) > 10  # p = 0.8 of 20 crops


def test_multicrop_is_reproducible_under_the_same_seed() -> None:
    views, image = ibot_views(3), shapes(size=32, channels=3).load(1)[0]
    with seeded(4, 0, 1):
        a = views(image, epoch=1)
    with seeded(4, 0, 1):
        b = views(image, epoch=1)
    with seeded(4, 1, 1):
        c = views(image, epoch=1)
    for key in ("global", "masks", "local"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True))
    assert not torch.equal(a["global"][0], c["global"][0])


def test_multicrop_masks_some_crops() -> None:
    views, image = ibot_views(1), shapes(size=32).load(0)[0]
    masked = []
    for index in range(10):
        with seeded(0, 0, index):
            masked += [bool(mask.any()) for mask in views(image, epoch=0)["masks"]]
    assert any(masked) and not all(masked)  # ratios [[0, 0], [0.3, 0.2]]: about half the crops are masked


def test_ibot_method_builds_its_views() -> None:
    cfg = load_run_config(IBOT_RECIPE, IBOT_PATCH4).method
    method = method_class("ibot")(cfg, data_info(1))
    out = method.views()(shapes(size=32).load(0)[0], 0)
    assert len(out["global"]) == 2 and len(out["masks"]) == 2 and len(out["local"]) == cfg.views.num_local
    assert out["masks"][0].shape == (7, 7) and out["global"][0].shape == (1, 28, 28)


@pytest.mark.parametrize(
    ("height", "width"),
    [(64, 48), (28, 28), (20, 20), (20, 40), (28, 40)],
    ids=["larger", "equal", "smaller", "smaller-wide", "one-side-equal"],
)
def test_eval_view_gives_the_requested_size(height: int, width: int) -> None:
    view = EvalView(data_info(3), size=28)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    out = view(image)
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32
    assert torch.equal(view(image), out)


def test_eval_view_leaves_an_image_of_the_right_size_unresampled() -> None:
    info = data_info(3)
    image = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    expected = (image.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(EvalView(info, size=28)(image), expected)


def test_eval_view_centre_crops_after_resizing_larger_images() -> None:
    image = torch.zeros(1, 64, 64, dtype=torch.uint8)
    image[:, 16:48, 16:48] = 255  # a centred bright square covering the middle half
    out = EvalView(data_info(1), size=28)(image)  # 64 -> 32, then the central 28
    assert out.shape == (1, 28, 28)
    assert out[0, 14, 14] == pytest.approx((1 - 0.5) / 0.25, abs=0.05)
    assert out[0, 0, 0] == pytest.approx((0 - 0.5) / 0.25, abs=0.05)
