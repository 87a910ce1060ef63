"""Teachers: an exponential moving average (EMA) of a student, or a frozen network that provides targets."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mimkit.config import ConfigError, check
from mimkit.data.info import DataInfo
from mimkit.data.sources import IMAGENET_MEAN, IMAGENET_STD
from mimkit.models.backbones import BackboneConfig, build_backbone
from mimkit.models.encoder import Encoder


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` that takes no gradients (the starting point of an EMA teacher)."""
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    return teacher


class EMA:
    """teacher <- m * teacher + (1 - m) * student, over the parameters both networks share by name.

    The student may own parameters the teacher lacks (e.g. the mask token); the reverse is an error unless
    `allow_teacher_only`, when such teacher parameters keep their values (iBOT's teacher with its own patch
    prototypes and a student without). The parameter lists are built once, so an update is one fused foreach call.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, allow_teacher_only: bool = False) -> None:
        student_params = dict(student.named_parameters())
        missing = [name for name, _ in teacher.named_parameters() if name not in student_params]
        if missing and not allow_teacher_only:
            raise ValueError(f"teacher parameters without a student counterpart: {missing[:5]}")
        pairs = [(p, student_params[name]) for name, p in teacher.named_parameters() if name in student_params]
        self.teacher_params = [t for t, _ in pairs]
        self.student_params = [s for _, s in pairs]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        students = [s.detach().to(t.dtype) for t, s in zip(self.teacher_params, self.student_params, strict=True)]
        torch._foreach_lerp_(self.teacher_params, students, 1.0 - momentum)

    @torch.no_grad()
    def copy_student(self) -> None:
        """Make the teacher equal to the student (start of training)."""
        torch._foreach_copy_(self.teacher_params, [s.detach() for s in self.student_params])


# ---------------------------------------------------------------------------------------------------
# Frozen teachers that turn images into patch-token targets


@dataclass
class TeacherConfig:
    """Where distillation targets come from: an EMA of the student, or a frozen network from local files."""

    kind: Literal["ema", "timm", "open_clip", "mimkit"] = "ema"
    model: str | None = None
    """timm or open_clip model name (kind timm / open_clip), e.g. vit_base_patch16_224 or ViT-B-16."""
    weights: str | None = None
    """Local weights file of that model (never downloaded)."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Shape of a timm teacher that differs from its name's default: patch_size, embed_dim, depth, num_heads,
    mlp_ratio."""
    checkpoint: str | None = None
    """A mimkit run folder or checkpoint (kind mimkit); its encoder is the teacher."""
    momentum: float = 0.996
    """EMA teacher: momentum at the start, cosine to 1 over training."""
    normalization: Literal["teacher", "student"] = "teacher"
    """Frozen teachers: feed images normalised with the teacher's own mean/std ("teacher", correct), or the
    student's input as it is ("student": DTM's reference feeds CLIP ImageNet-normalised pixels)."""

    def validate(self, prefix: str = "method.teacher") -> None:
        if self.kind in ("timm", "open_clip"):
            check(bool(self.model), f"{prefix}.model", f"kind={self.kind} needs a model name")
            check(
                bool(self.weights),
                f"{prefix}.weights",
                f"kind={self.kind} needs a local weights file (mimkit never downloads weights)",
            )
        if self.kind == "mimkit":
            check(bool(self.checkpoint), f"{prefix}.checkpoint", "kind=mimkit needs a run folder or checkpoint")
        check(0 <= self.momentum <= 1, f"{prefix}.momentum", f"must lie in [0, 1]; got {self.momentum}")
        allowed = {"patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"}
        unknown = sorted(set(self.model_args) - allowed)
        check(not unknown, f"{prefix}.model_args", f"unknown keys {unknown}; allowed: {', '.join(sorted(allowed))}")


class TokenTeacher(nn.Module):
    """A frozen network giving patch tokens (B, N, C) for images normalised with the *student's* statistics.

    Images are converted to the teacher's channels and normalisation first, so a CLIP teacher can teach a
    student trained on grayscale data normalised with that data's mean and std.
    """

    def __init__(
        self,
        tokens: Callable[[torch.Tensor], torch.Tensor],
        network: nn.Module,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        data: DataInfo,
        renormalize: bool = True,
    ) -> None:
        super().__init__()
        self.renormalize = renormalize
        self.network = network.eval().requires_grad_(False)
        self.tokens, self.channels = tokens, channels
        self.register_buffer("data_mean", torch.tensor(data.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("data_std", torch.tensor(data.std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> TokenTeacher:
        super().train(mode)
        self.network.eval()  # a frozen teacher never uses dropout or drop path
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher tokens of student inputs; `renormalize` False feeds them as they are (channels still adapted)."""
        pixels = images * self.data_std + self.data_mean if self.renormalize else images
        if pixels.shape[1] != self.channels:
            pixels = pixels.expand(-1, self.channels, -1, -1) if pixels.shape[1] == 1 else pixels.mean(1, keepdim=True)
        return self.tokens((pixels - self.mean) / self.std if self.renormalize else pixels)


def build_token_teacher(cfg: TeacherConfig, data: DataInfo, image_size: int) -> TokenTeacher:
    """The frozen teacher a config names; missing files and unknown names fail here, before training."""
    if cfg.kind == "timm":
        return _timm_teacher(cfg, data, image_size)
    if cfg.kind == "open_clip":
        return _open_clip_teacher(cfg, data)
    raise ValueError(f"{cfg.kind} teachers are built by the method (EMA of its student, or a saved mimkit run)")


def encoder_teacher(encoder: Encoder, trained_on: DataInfo, data: DataInfo) -> TokenTeacher:
    """A trained encoder as a frozen teacher: its patch/feature tokens of images normalised as it was trained."""
    prefix = encoder.num_prefix_tokens

    def tokens(x: torch.Tensor) -> torch.Tensor:
        return encoder(x)[:, prefix:]

    return TokenTeacher(tokens, encoder, trained_on.channels, trained_on.mean, trained_on.std, data)


def _timm_teacher(cfg: TeacherConfig, data: DataInfo, image_size: int) -> TokenTeacher:
    shape = BackboneConfig(name=cfg.model or "", img_size=image_size, weights=cfg.weights, **cfg.model_args)
    encoder = build_backbone(shape, in_chans=3, mask_token=False, prefix="method.teacher")
    pretrained = encoder.timm_model().pretrained_cfg or {}
    prefix = encoder.num_prefix_tokens

    def tokens(x: torch.Tensor) -> torch.Tensor:
        return encoder(x)[:, prefix:]

    mean, std = pretrained.get("mean", IMAGENET_MEAN), pretrained.get("std", IMAGENET_STD)
    return TokenTeacher(tokens, encoder, 3, mean, std, data, renormalize=cfg.normalization == "teacher")


def _open_clip_teacher(cfg: TeacherConfig, data: DataInfo) -> TokenTeacher:
    try:
        import open_clip
    except ImportError as error:
        raise ConfigError("method.teacher.kind=open_clip needs open_clip: pip install 'mimkit[clip]'") from error
    weights = Path(cfg.weights or "").expanduser()
    if not weights.is_file():
        raise ConfigError(f"method.teacher.weights: {weights} does not exist (give the local open_clip weights file)")
    try:
        model = open_clip.create_model(cfg.model, pretrained=str(weights), device="cpu")
    except RuntimeError as error:  # unknown model names and mismatched state dicts both raise RuntimeError
        raise ConfigError(f"method.teacher: open_clip {cfg.model!r} with {weights}: {error}") from None
    visual = model.visual
    visual.output_tokens = True

    def tokens(x: torch.Tensor) -> torch.Tensor:
        _, patch_tokens = visual(x)  # after ln_post; the reference distils them projected, as CLIP's pooled output
        return patch_tokens @ visual.proj if visual.proj is not None else patch_tokens

    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return TokenTeacher(tokens, visual, 3, mean, std, data, renormalize=cfg.normalization == "teacher")
