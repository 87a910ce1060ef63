"""DTM method: teachers (EMA, timm file, open_clip file, mimkit checkpoint), morphing on/off, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from mimkit.config import ConfigError
from mimkit.data.loader import ViewDataset, collate
from mimkit.data.sources import SyntheticShapes
from mimkit.engine.train import pretrain
from mimkit.losses.regression import regression_loss
from mimkit.methods.dtm import DTM
from mimkit.runs import load_run_config
from mimkit.schedules import Progress
from support import IBOT_RECIPE, ROOT, SYNTHETIC_28

RECIPE = ROOT / "configs" / "dtm" / "vit_tiny_fmnist_ema.yaml"
TINY = [
    "method.backbone.patch_size=4",
    "method.backbone.embed_dim=32",
    "method.backbone.depth=2",
    "method.backbone.num_heads=2",
    *SYNTHETIC_28,
    "data.synthetic.images=16",
    "data.batch_size=8",
    "data.num_workers=0",
]


def tiny_dtm(*overrides: str) -> tuple[DTM, SyntheticShapes]:
    cfg = load_run_config(RECIPE, [*TINY, *overrides])
    source = SyntheticShapes(cfg.data, "train")
    torch.manual_seed(0)
    return DTM(cfg.method, source.info), source


def batch_for(method: DTM, source: SyntheticShapes, size: int = 4) -> dict:
    dataset = ViewDataset(source, method.views(), seed=0)
    return collate([dataset[(0, i)] for i in range(size)])


def test_ema_teacher_step_trains_student_and_head_only() -> None:
    method, source = tiny_dtm()
    out = method.training_step(batch_for(method, source), Progress(0, 0, 10, 2))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert method.head.weight.grad is not None and method.student.mask_token.grad is not None
    assert all(p.grad is None for p in method.teacher.parameters())
    assert method.encoder() is method.student


def test_without_morphing_the_loss_is_tokenwise_distillation() -> None:
    method, source = tiny_dtm("method.morph.enabled=false", "method.normalize_targets=false")
    batch = batch_for(method, source)
    method.eval()
    out = method.training_step(batch, Progress(0, 0, 10, 2))
    images, masks = batch["views"]["image"], batch["views"]["mask"]
    with torch.no_grad():
        targets = method.teacher(images)[:, 1:]
        predictions = method.head(method.student(images, mask=masks)[:, 1:])
    torch.testing.assert_close(out.loss, regression_loss(predictions, targets, "smooth_l1", 2.0))


def test_morphing_changes_the_loss_and_draws_schedules() -> None:
    method, source = tiny_dtm()
    batch = batch_for(method, source)
    method.eval()
    torch.manual_seed(5)
    out = method.training_step(batch, Progress(0, 0, 10, 2))
    assert out.metrics["morph_removed"] > 0
    assert not torch.isclose(out.loss, out.metrics["loss_tokenwise"])


def test_block_masks_follow_the_recipe() -> None:
    method, source = tiny_dtm("method.mask.ratios=[[0.5,0.0]]")
    masks = batch_for(method, source, size=8)["views"]["mask"]
    assert masks.shape == (8, 7, 7)
    assert (masks.flatten(1).sum(1) <= 24).all() and masks.float().mean() > 0.3


def _tiny_timm_weights(tmp_path: Path, **shape: int) -> Path:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=28, **shape)
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_frozen_timm_teacher_from_a_local_file(tmp_path: Path) -> None:
    weights = _tiny_timm_weights(tmp_path, patch_size=4, embed_dim=48, depth=1, num_heads=2)
    method, source = tiny_dtm(
        "method.teacher.kind=timm",
        "method.teacher.model=vit_tiny_patch16_224",
        f"method.teacher.weights={weights}",
        "method.teacher.model_args={patch_size: 4, embed_dim: 48, depth: 1, num_heads: 2}",
    )
    assert method.head.out_features == 48  # the target width comes from the teacher
    out = method.training_step(batch_for(method, source), Progress(0, 0, 10, 2))
    out.loss.backward()
    assert not any(p.requires_grad for p in method.teacher.parameters())


def test_missing_or_mismatched_teacher_weights_fail_before_training(tmp_path: Path) -> None:
    timm_teacher = ["method.teacher.kind=timm", "method.teacher.model=vit_tiny_patch16_224"]
    with pytest.raises(ConfigError, match=r"method\.teacher\.weights: weights file .* does not exist"):
        tiny_dtm(
            *timm_teacher,
            f"method.teacher.weights={tmp_path / 'missing.safetensors'}",
            "method.teacher.model_args={patch_size: 4}",
        )
    wrong = _tiny_timm_weights(tmp_path, patch_size=4, embed_dim=48, depth=1, num_heads=2)
    with pytest.raises(ConfigError, match="does not match the model"):
        tiny_dtm(
            "method.teacher.kind=timm",
            "method.teacher.model=vit_small_patch16_224",
            f"method.teacher.weights={wrong}",
            "method.teacher.model_args={patch_size: 4}",
        )
    with pytest.raises(ConfigError, match="needs a local weights file"):
        load_run_config(RECIPE, [*TINY, *timm_teacher])


def test_teacher_with_another_patch_grid_is_refused(tmp_path: Path) -> None:
    weights = _tiny_timm_weights(tmp_path, patch_size=7, embed_dim=48, depth=1, num_heads=2)
    with pytest.raises(ConfigError, match="patch tokens"):
        tiny_dtm(
            "method.teacher.kind=timm",
            "method.teacher.model=vit_tiny_patch16_224",
            f"method.teacher.weights={weights}",
            "method.teacher.model_args={patch_size: 7, embed_dim: 48, depth: 1, num_heads: 2}",
        )


def test_open_clip_teacher_from_a_local_file(tmp_path: Path) -> None:
    open_clip = pytest.importorskip("open_clip")  # the `clip` extra; installed by `make test`
    config = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "patch_size": 4, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (tmp_path / "mimkit-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "mimkit-tiny-clip.json")
    weights = tmp_path / "tiny_clip.pt"
    torch.save(open_clip.create_model("mimkit-tiny-clip").state_dict(), weights)
    method, source = tiny_dtm(
        "method.teacher.kind=open_clip", "method.teacher.model=mimkit-tiny-clip", f"method.teacher.weights={weights}"
    )
    assert method.head.out_features == 24  # ln_post tokens times the projection, as CLIP's own embedding
    batch = batch_for(method, source)
    out = method.training_step(batch, Progress(0, 0, 10, 2))
    assert torch.isfinite(out.loss)


def test_mimkit_checkpoint_teacher_two_stage(tmp_path: Path) -> None:
    ibot = load_run_config(
        IBOT_RECIPE,
        [
            *TINY,
            "method.views.local_size=12",
            "method.out_dim=32",
            "method.patch_out_dim=32",
            "method.head_hidden_dim=32",
            "method.head_bottleneck_dim=16",
            "method.views.num_local=1",
            "train.epochs=1",
            "train.accelerator=cpu",
            "train.progress_bar=false",
            "train.loggers=[csv]",
            f"output_dir={tmp_path / 'ibot'}",
        ],
    )
    pretrain(ibot)
    method, source = tiny_dtm("method.teacher.kind=mimkit", f"method.teacher.checkpoint={tmp_path / 'ibot'}")
    assert method.head.out_features == 32
    out = method.training_step(batch_for(method, source), Progress(0, 0, 10, 2))
    assert torch.isfinite(out.loss)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        tiny_dtm("method.teacher.kind=mimkit", f"method.teacher.checkpoint={tmp_path / 'nothing'}")
