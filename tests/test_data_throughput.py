"""The data-throughput benchmark runs end to end on a few small generated JPEGs and reports positive timings for every
recipe, source and mode; its generated images are the same for the same seed; its stand-ins build the recipes that
need files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mimkit.runs import load_run_config
from support import load_benchmark

bench = load_benchmark("data_throughput")
RECIPES = ("ibot/vit_small_imagefolder", "cim/vit_base_imagenet_respix")
"""One recipe built as shipped, one that needs a file the user may not have (a stand-in tokenizer)."""


def positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_quick_run_reports_every_recipe_source_and_mode(tmp_path) -> None:
    threads = torch.get_num_threads()
    argv = ["--quick", "--images", "4", "--image-side", "96", "--recipes", ",".join(RECIPES)]
    argv += ["--workers", "0,1", "--batch", "2", "--set", "seed=1", "--out", str(tmp_path)]
    path = bench.main(argv)
    assert torch.get_num_threads() == threads  # the one-thread setting does not leak into the caller
    assert path == tmp_path / "data_throughput.json"
    result = json.loads(path.read_text())
    assert {"machine", "versions", "settings", "images", "device_mode", "published_throughputs", "recipes"} <= set(
        result
    )
    assert result["images"]["count"] == 4 and result["images"]["generated"] and result["images"]["mean_kib"] > 0
    assert result["settings"]["device"] == "cpu" and result["settings"]["device_name"] is None
    assert result["settings"]["loader_batches_per_epoch"] == {"0": 2, "1": 2}  # --quick: 2, or 2 per worker
    assert [recipe["recipe"] for recipe in result["recipes"]] == list(RECIPES)
    modes = ["worker", "device"] if result["device_mode"] else ["worker"]
    for recipe in result["recipes"]:
        assert recipe["modes"] == modes
        assert set(recipe["ms_per_image"]) == {"imagefolder", "shards"}
        for source, parts in recipe["ms_per_image"].items():
            assert set(parts) == {"decode", *modes}, source
            assert all(positive(value) for value in parts.values()), (source, parts)
            assert all(len(rounds) == 1 for rounds in recipe["rounds_ms_per_image"][source].values())
        if result["device_mode"]:
            assert positive(recipe["device_part_ms_per_image"])
        assert recipe["official_ms_per_image"] is None and recipe["worker_vs_official"] is None
        assert set(recipe["loader_images_per_s"]) == set(modes)
        for rates in recipe["loader_images_per_s"].values():
            assert set(rates) == {"0", "1"} and all(positive(rate) for rate in rates.values())
        epochs = [values for rates in recipe["loader_epochs_images_per_s"].values() for values in rates.values()]
        assert len(epochs) == 2 * len(modes) and all(len(values) == 1 for values in epochs)
        for mode, cores in recipe["cores_needed"].items():
            per_core = 1e3 / recipe["ms_per_image"]["imagefolder"][mode]
            for label, rate, _ in bench.PUBLISHED:
                assert math.isclose(cores[label], rate / per_core)
        assert recipe["overrides"]["shards"][-1] == "seed=1" and recipe["config"]["seed"] == 1
    cim = result["recipes"][1]
    assert cim["stand_ins"] == [f"method.tokenizer={bench.STAND_IN_TOKENIZER}", "method.tokenizer_recipe=null"]
    assert cim["config"]["method"]["views"]["size"] == 224 and result["recipes"][0]["stand_ins"] == []
    table = path.with_suffix(".md").read_text()
    assert "| ibot/vit_small_imagefolder | shards |" in table and "871 img/s" in table
    assert "| device part ms/img (cpu) |" in table and "on this CPU." in table
    result["settings"] |= {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}  # as a GPU run writes them
    table = bench.markdown(result)
    assert "| device part ms/img (cuda) |" in table and "on cuda (NVIDIA H100 80GB HBM3)." in table
    assert "copied to cuda (NVIDIA H100 80GB HBM3)" in table and "this CPU" not in table


def test_generated_images_are_seeded_and_imagenet_like(tmp_path) -> None:
    first = bench.generate_images(tmp_path / "a", 3, 500)
    second = bench.generate_images(tmp_path / "b", 3, 500)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    described = bench.describe_images(first)
    assert all(min(size) >= 250 and max(size) <= 600 for size in described["sizes"])
    assert 40 < described["mean_kib"] < 250  # a photograph's JPEG at quality 90, not flat noise or a flat field
    rng = np.random.default_rng(0)
    sizes = np.array([bench.image_size(rng, 500) for _ in range(200)])
    assert 450 < np.median(sizes[:, 0]) < 560 and 300 < np.median(sizes[:, 1]) < 420  # around 500 x 375
    assert (sizes[:, 0] < sizes[:, 1]).any() and (sizes[:, 0] > sizes[:, 1]).any()  # some portrait, most landscape


def test_official_data_path_is_only_compared_at_its_own_settings() -> None:
    from reference.ibot_official_data import differences  # benchmarks/ is on the path once the benchmark is loaded

    for name in ("ibot/vit_small_imagenet", "ibot/vit_base_imagenet", "ibot/vit_small_imagefolder"):
        assert differences(load_run_config(bench.CONFIGS / f"{name}.yaml", ["data.root=/tmp"])) == []
    other = load_run_config(
        bench.CONFIGS / "ibot/vit_small_imagenet.yaml", ["method.views.local_size=64", "method.mask.shape=rand"]
    )
    assert differences(other) == ["method.views.local_size=64 (official: 96)"]
    other = load_run_config(bench.CONFIGS / "ibot/vit_small_imagenet.yaml", ["method.views.solarize_p=0.0"])
    assert differences(other) == ["method.views.solarize_p=0.0 (official: 0.2)"]


def test_device_option_batches_on_the_device_and_loader_epochs_that_keep_every_worker_busy() -> None:
    batch = {"global": [torch.zeros(2, 3), torch.ones(2)], "params": (torch.zeros(1),), "epoch": 3}
    moved = bench.move_data_to_device(batch, torch.device("meta"))  # what fabric.to_device runs
    assert moved["global"][0].device.type == "meta" and moved["global"][1].shape == (2,)
    assert isinstance(moved["params"], tuple) and moved["params"][0].device.type == "meta" and moved["epoch"] == 3
    assert [bench.loader_batches(4, workers) for workers in (0, 1, 2, 4, 8, 16)] == [4, 4, 4, 8, 16, 32]
    assert bench.parse_args(["--device", "cpu", "--workers", "1,4,8,16"]).workers == [1, 4, 8, 16]
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "no_such_device"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])  # refused up front, not after the images are made


def test_append_adds_recipes_to_an_earlier_result_of_the_same_settings_only() -> None:
    same = {"settings": {"batch": 32}, "images": {"count": 4}, "device_mode": True}
    earlier = {**same, "command": ["a"], "recipes": [{"recipe": "ibot/x", "v": 1}, {"recipe": "dtm/y", "v": 1}]}
    later = {**same, "command": ["b"], "recipes": [{"recipe": "dtm/y", "v": 2}, {"recipe": "symmim/z", "v": 2}]}
    merged = bench.appended(earlier, later)
    assert [(r["recipe"], r["v"]) for r in merged["recipes"]] == [("ibot/x", 1), ("dtm/y", 2), ("symmim/z", 2)]
    assert merged["command"] == ["b"] and merged["earlier_commands"] == [["a"]]
    assert bench.appended(merged, {**later, "command": ["c"]})["earlier_commands"] == [["a"], ["b"]]
    other = {**later, "settings": {"batch": 16}}
    assert bench.appended(earlier, other) is other  # other settings: the table's header would be wrong for both
