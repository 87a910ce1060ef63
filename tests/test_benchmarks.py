"""The step-throughput benchmark runs end to end on a tiny tier, writes its report, and times a step that trains."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mimkit.runs import load_run_config
from support import load_benchmark

bench = load_benchmark("step_throughput")
OWN_PARTS = {"dtm": "morphing", "cim": "tokenizer"}
"""A method's own timed part beside the step and its floors."""
SUMMARY_KEYS = {
    "step_ms",
    "backbone_ms",
    "backbone_heads_ms",
    "overhead",
    "outside_backbone_heads_share",
    "images_per_s",
    "view_ms_per_image",
    "views_worker_load",
    "peak_memory_mib",
    "step_gflop",
    "step_of_roof",
    "backbone_of_roof",
    "reference_ms",
    "step_vs_reference",
}


@pytest.mark.parametrize("method", bench.METHODS)
def test_tiny_tier_writes_json_and_table(method: str, tmp_path) -> None:
    argv = ["--method", method, "--tier", "test", "--steps", "2", "--warmup", "1", "--repeats", "2"]
    path = bench.main([*argv, "--threads", str(torch.get_num_threads()), "--out", str(tmp_path)])
    assert path == tmp_path / f"{method}_test_cpu.json"
    result = json.loads(path.read_text())
    assert {"machine", "versions", "threads", "precision", "cases", "command"} <= result.keys()
    assert result["machine"]["cpu"] and result["versions"]["torch"] and result["threads"] == torch.get_num_threads()
    (case,) = result["cases"]
    own = OWN_PARTS.get(method)
    parts = {"step", "backbone", "backbone_heads"} | ({own} if own else set())
    assert case["times_s"].keys() == parts
    for runs in case["times_s"].values():
        assert len(runs) == 2 and all(len(samples) == 2 and min(samples) > 0 for samples in runs)
    assert "data.source=synthetic" in case["overrides"] and case["batch_size"] == 4
    assert len(case["view_seconds_per_image"]) == 4 and min(case["view_seconds_per_image"]) > 0
    summary = case["summary"]
    extra = {f"{own}_ms", f"{own}_share"} if own else set()
    assert summary.keys() == SUMMARY_KEYS | extra
    assert math.isfinite(summary["overhead"]) and summary["overhead"] > 0
    assert summary["images_per_s"] > 0 and summary["peak_memory_mib"] > 0 and math.isfinite(case["final_loss"])
    if own:
        assert math.isfinite(summary[f"{own}_share"]) and summary[f"{own}_share"] > 0  # timings: no upper bound
    table = path.with_suffix(".md").read_text()
    assert "| vit_micro | 4 |" in table and "overhead" in table


@pytest.mark.parametrize("method", ["ibot", "dtm"])
def test_timed_step_trains_student_and_teacher(method: str) -> None:
    (case,) = bench.method_file(method).CASES["test"]
    built = bench.build(bench.CONFIGS / case.recipe, bench.overrides_for(case, "cpu", "32-true", False))
    student = {k: v.clone() for k, v in built.method.student.state_dict().items()}
    teacher = {k: v.clone() for k, v in built.method.teacher.state_dict().items()}
    built.step()
    assert math.isfinite(built.last_loss)
    assert any(not torch.equal(v, built.method.student.state_dict()[k]) for k, v in student.items())
    assert any(not torch.equal(v, built.method.teacher.state_dict()[k]) for k, v in teacher.items())
    bench.method_file(method).floor(built, True)()
    assert all(p.grad is None for p in built.method.parameters()), "floors must leave no gradients behind"


def test_every_tier_case_is_a_valid_recipe_of_the_specified_shape() -> None:
    assert {"ibot", "dtm"} <= set(bench.METHODS)
    for method in bench.METHODS:
        for name, cases in bench.method_file(method).CASES.items():
            tier = bench.TIERS[name]
            for case in cases:
                overrides = bench.overrides_for(case, tier.device, tier.precision, True)
                cfg = load_run_config(bench.CONFIGS / case.recipe, overrides)
                assert cfg.method.name == method and cfg.data.source == "synthetic" and cfg.train.compile
                if name == "test":
                    continue
                views, backbone = cfg.method.views, cfg.method.backbone
                assert cfg.data.batch_size == 64
                if name == "cpu-small":
                    shape = (backbone.embed_dim, backbone.depth, backbone.num_heads, backbone.patch_size)
                    assert shape == (192, 12, 3, 4) and backbone.img_size == cfg.data.options.size == 28
                    assert cfg.data.channels == 1 and cfg.train.precision == "32-true"
                else:
                    assert backbone.img_size == cfg.data.options.size == 224 and cfg.train.precision == "bf16-mixed"
                if method == "ibot":
                    small = name == "cpu-small"
                    assert (views.num_local, views.local_size) == ((4, 12) if small else (10, 96))
                    assert cfg.method.out_dim == cfg.method.patch_out_dim == (1024 if small else 8192)
                    assert (cfg.method.head_hidden_dim, cfg.method.head_bottleneck_dim) == (2048, 256)  # reference
                elif method == "dtm":
                    assert cfg.method.teacher.kind == "ema"


def test_unknown_case_is_refused() -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--method", "ibot", "--tier", "cpu-small", "--case", "vit_huge"])


def test_flop_counts_of_a_linear_layer_and_of_cpu_attention() -> None:
    flops = load_benchmark("flop_utilisation")
    layer, x = torch.nn.Linear(16, 8), torch.randn(4, 16)
    assert flops.count_flops(lambda: layer(x)) == 2 * 4 * 16 * 8
    q = torch.randn(2, 3, 10, 8)
    attention = flops.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert attention == 2 * (2 * 2 * 3 * 10 * 10 * 8)  # q k^T and p v: the CPU kernel is counted like the GPU's
    rows = flops.utilisation({"step": 10**9}, {"step": 0.5}, roof=4e9, peak=None)
    assert rows["step"]["flop_per_s"] == 2e9 and rows["step"]["of_roof"] == 0.5 and rows["step"]["of_peak"] is None


def test_reference_must_be_a_checkout_of_the_official_code(tmp_path) -> None:
    with pytest.raises(SystemExit, match="not a checkout of the official iBOT code"):
        bench.main(["--method", "ibot", "--tier", "test", "--steps", "1", "--reference", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench.parse_args(["--method", "dtm", "--tier", "test", "--reference", str(tmp_path)])  # no adapter


def test_gpu_tier_driver_runs_on_a_cpu_and_reports_each_run(tmp_path) -> None:
    driver = load_benchmark("gpu_tier")
    argv = ["--tier", "test", "--device", "cpu", "--methods", "ibot", "dtm", "--no-compile", "--steps", "1"]
    argv += ["--data-budget-s", "0"]  # the data stages: tests/test_gpu_tier.py
    report = driver.main([*argv, "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)])
    text = report.read_text()
    assert "- packages: all present" in text and "- ibot: done" in text and "- dtm: done" in text
    assert "| vit_micro | 4 |" in text and (tmp_path / "ibot_test_cpu.json").is_file()
    assert driver.runs(["ibot", "dtm", "cim"], True) == [
        ("ibot", False),
        ("ibot", True),
        ("dtm", False),
        ("cim", False),
        ("dtm", True),
        ("cim", True),
    ]


def test_speed_changes_and_the_docs_tables_from_the_result_files(tmp_path) -> None:
    changes = load_benchmark("speed_changes")
    report = load_benchmark("speed_report")
    common = ["--steps", "1", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)]
    bench.main(["--method", "dtm", "--tier", "test", *common])
    path = changes.main(["--method", "dtm", "--tier", "test", *common[:-2], "--out", str(tmp_path)])
    rows = {row["change"]: row for row in json.loads(path.read_text())["changes"]}
    assert rows.keys() == {"adamw", "health", "precision", "attention"}  # DTM has one crop size: no packing
    assert all(row["before_ms"] > 0 and row["after_ms"] > 0 for row in rows.values())
    ibot = changes.main(["--method", "ibot", "--tier", "test", *common])
    assert {row["change"] for row in json.loads(ibot.read_text())["changes"]} >= {"adamw", "packing"}
    text = report.main(["--results", str(tmp_path), "--tier", "test"])
    assert "| DTM (EMA teacher, L = 2) |" in text and "| AdamW: per-tensor loop → fused | " in text
    assert "| fp32: eager → `torch.compile` backbones | – | – | – | – |" in text  # not run without --compile
    assert "| iBOT fp32" not in text  # no iBOT result file: no row


def test_extra_overrides_and_a_subset_of_parts(tmp_path) -> None:
    argv = ["--method", "dtm", "--tier", "test", "--steps", "1", "--warmup", "0", "--parts", "step", "--no-flops"]
    path = bench.main(
        [*argv, "--set", "method.backbone.activation_checkpointing=true", "--profile", "--out", str(tmp_path)]
    )
    assert "aten::" in (tmp_path / "dtm_test_cpu_vit_micro_profile.txt").read_text()  # the operators of a step
    (case,) = json.loads(path.read_text())["cases"]
    assert case["config"]["method"]["backbone"]["activation_checkpointing"] is True
    assert case["times_s"].keys() == {"step"} and case["flops"] == {}
    assert case["summary"].keys() == {"peak_memory_mib"} and case["peak_memory"]["before_steps"] > 0


def test_the_loss_fingerprint_comparison_fails_on_any_difference(capsys: pytest.CaptureFixture[str]) -> None:
    fingerprint = load_benchmark("loss_fingerprint")
    before = {"ibot/x": {"loss": [1.0, 2.0], "loss_cls": [0.5, 0.25]}, "cim/y": {"loss": [3.0]}}
    assert fingerprint.compare(before, before, tolerance=0.0) == 0
    moved = {"ibot/x": {"loss": [1.0, 2.0 + 1e-5], "loss_cls": [0.5, 0.25]}}
    assert fingerprint.compare(before, moved, tolerance=0.0) == 1
    assert fingerprint.compare(before, moved, tolerance=1e-5) == 0
    assert fingerprint.compare(before, {"ibot/x": {"loss": [1.0], "loss_cls": [0.5, 0.25]}}, tolerance=1.0) == 1
    assert "cim/y: not run after (not compared)" in capsys.readouterr().out


def test_augment_changes_times_each_pair(tmp_path) -> None:
    path = load_benchmark("augment_changes").main(["--rounds", "1", "--calls", "1", "--out", str(tmp_path)])
    rows = json.loads(path.read_text())["us_per_call"]
    assert set(rows) == {"blur", "hue", "jitter", "to_tensor", "resize", "global_view"}
    assert all(row["before"] > 0 and row["after"] > 0 for row in rows.values())


def test_knn_scale_reports_time_and_memory_per_bank_dtype(tmp_path) -> None:
    argv = ["--bank", "3000", "--dim", "16", "--queries", "50", "--chunk", "20", "--bank-chunk", "700"]
    path = load_benchmark("knn_scale").main([*argv, "--out", str(tmp_path)])
    results = json.loads(path.read_text())["results"]
    assert set(results) == {"float32", "float16"}
    assert all(row["seconds"] > 0 and row["peak_gib"] > 0.05 for row in results.values())
