"""Supervised fine-tuning (and augmented linear probing) of a pretrained encoder: the task the engine trains for
`mimkit eval finetune`, so that a paper's headline number gets the pretraining run's Fabric set-up (processes,
precision, atomic checkpoints, exact resume, logs).

The recipe is BEiT's and MAE's: the encoder's timm model with a fresh linear head, AdamW with layer-wise lr decay
(timm's layer grouping: block i of L gets decay^(L - i) of the lr, the embeddings decay^(L + 1), the head the full
lr), stochastic depth rising linearly to the last block, RandAugment and random erasing,
mixup / CutMix, label smoothing, and optionally an EMA of the weights (DeiT). Drop path and mixing are drawn per
image in the workers (`mimkit.data.classify`), so a run gives the same losses on any number of processes.
With `freeze`, only the head trains on the frozen encoder (iBOT's augmented linear protocol).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim._param_groups import param_groups_layer_decay
from torch import nn

from mimkit.config import ConfigError, check, short_reason
from mimkit.data.classify import NO_PARTNER, ClassifyViewConfig, ClassifyViews
from mimkit.data.info import DataInfo
from mimkit.data.mixing import soft_targets
from mimkit.data.views import AugmentOn
from mimkit.methods.base import (
    ClipMode,
    Method,
    MethodConfig,
    ParamGroup,
    StepOutput,
    register_task,
    split_weight_decay,
)
from mimkit.methods.saved import open_encoder
from mimkit.models.backbone_config import BackboneConfig
from mimkit.models.backbones import build_backbone, load_weights
from mimkit.models.classifier import Classifier, Pool
from mimkit.models.drop_path import seed_drop_paths
from mimkit.models.encoder import Encoder
from mimkit.models.families import family_of
from mimkit.models.teachers import EMA, frozen_copy
from mimkit.schedules import Progress


@dataclass
class FinetuneConfig(MethodConfig):
    """A classification protocol; defaults: MAE's ViT-B/16 fine-tuning (docs/evaluation.md gives each source)."""

    name: str = "finetune"
    clip_mode: ClipMode = "none"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The pretrained encoder's timm model (filled from the run by `mimkit eval finetune`); `drop_path_rate` is the
    protocol's stochastic depth."""
    init: str | None = None
    """The pretrained weights: a mimkit checkpoint (its `encoder()`) or a `mimkit export` folder; None: random init,
    the from-scratch baseline."""
    families: list[str] = field(default_factory=list)
    """Encoder families this protocol is written for (empty: any): a ViT protocol refuses a ResNet run."""
    num_classes: int = 0
    """0: the training data's number of classes."""
    pool: Pool = "patch_mean"
    head_norm: bool = True
    blocks: int = 1
    """Concatenate the [CLS] of the last `blocks` blocks (linear probing of ViTs; 1: `pool` decides)."""
    freeze: bool = False
    """Train only the head on the frozen encoder (linear probing)."""
    head_init_std: float = 2e-5
    layer_decay: float = 0.65
    label_smoothing: float = 0.1
    ema_decay: float = 0.0
    """EMA of the weights, evaluated beside them (0: none)."""
    views: ClassifyViewConfig = field(default_factory=ClassifyViewConfig)

    def validate(self, prefix: str = "method") -> None:
        super().validate(prefix)
        self.backbone.validate(f"{prefix}.backbone")
        self.views.validate(f"{prefix}.views")
        check(self.num_classes >= 0, f"{prefix}.num_classes", f"must be >= 0 (0: the data's); got {self.num_classes}")
        check(self.blocks >= 1, f"{prefix}.blocks", f"must be >= 1; got {self.blocks}")
        check(0 < self.layer_decay <= 1, f"{prefix}.layer_decay", f"must lie in (0, 1]; got {self.layer_decay}")
        check(0 <= self.label_smoothing < 1, f"{prefix}.label_smoothing", "must lie in [0, 1)")
        check(0 <= self.ema_decay < 1, f"{prefix}.ema_decay", f"must lie in [0, 1); got {self.ema_decay}")
        check(self.head_init_std > 0, f"{prefix}.head_init_std", "must be positive")
        family = family_of(self.backbone.name, f"{prefix}.backbone").family
        check(
            not self.families or family in self.families,
            f"{prefix}.families",
            f"this protocol is for {', '.join(self.families)} encoders and {self.backbone.name} is a {family}; "
            "pick a protocol for its family (`mimkit recipes finetune` lists them) or write one of your own",
        )


def load_pretrained(encoder: Encoder, init: str) -> None:
    """The weights of a `mimkit export` folder, or of the encoder of a mimkit run or checkpoint, into `encoder`."""
    folder = Path(init)
    if (folder / "model.safetensors").is_file():
        load_weights(encoder.timm_model(), str(folder / "model.safetensors"), "method.init")
        return
    pretrained, _ = open_encoder(init)
    state = pretrained.timm_state_dict()
    try:
        encoder.timm_model().load_state_dict(state)
    except RuntimeError as error:
        raise ConfigError(
            f"method.init: the encoder of {init} does not fit method.backbone ({short_reason(error)}); fine-tune "
            "with `mimkit eval finetune RUN`, which reads the model from the run"
        ) from None


@register_task("finetune")
class Finetune(Method):
    Config = FinetuneConfig

    def __init__(self, cfg: FinetuneConfig, data: DataInfo) -> None:
        super().__init__(cfg, data)
        self.cfg: FinetuneConfig = cfg
        check(
            bool(cfg.num_classes or data.num_classes),
            "data",
            f"{data.name} has no labels; fine-tuning needs a labelled source (or set method.num_classes and labels)",
        )
        self.num_classes = cfg.num_classes or int(data.num_classes or 0)
        encoder = build_backbone(cfg.backbone, data.channels, mask_token=False, prefix="method.backbone")
        if cfg.init is not None:
            load_pretrained(encoder, cfg.init)
        self.draws = seed_drop_paths(encoder)
        self.classifier = Classifier(
            encoder,
            self.num_classes,
            pool=cfg.pool,
            norm=cfg.head_norm,
            blocks=cfg.blocks,
            init_std=cfg.head_init_std,
        )
        if cfg.freeze:
            encoder.requires_grad_(False)
        self.ema = frozen_copy(self.classifier) if cfg.ema_decay else None
        self._averaging = EMA(self.classifier, self.ema) if self.ema is not None else None

    @classmethod
    def from_saved(cls, cfg: MethodConfig, data: DataInfo, saved: Any) -> Method:
        """A saved fine-tune holds its own weights: it resumes without the file it started from."""
        assert isinstance(cfg, FinetuneConfig)
        return cls(replace(cfg, init=None), data)

    def train(self, mode: bool = True) -> Finetune:
        """A frozen encoder stays in eval mode (no dropout, BatchNorm statistics kept), as linear probing wants."""
        super().train(mode)
        if self.cfg.freeze:
            self.classifier.encoder.eval()
        if self.ema is not None:
            self.ema.eval()
        return self

    def views(self, augment_on: AugmentOn = "worker") -> ClassifyViews:
        return ClassifyViews(self.data, self.encoder().image_size, self.cfg.views, self.draws.count)

    def training_step(self, batch: dict[str, Any], progress: Progress) -> StepOutput:
        views, labels = batch["views"], batch["label"]
        partner = views["partner_label"]
        partner = torch.where(partner == NO_PARTNER, labels, partner)
        targets = soft_targets(labels, partner, views["lam"], self.num_classes, self.cfg.label_smoothing)
        self.draws.uniforms = views["drops"]  # kept until the next step: a checkpointed block recomputes with them
        logits = self.classifier(views["image"])
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return StepOutput(loss)

    def encoder(self) -> Encoder:
        return self.classifier.encoder

    def networks(self) -> dict[str, nn.Module]:
        found: dict[str, nn.Module] = {"encoder": self.classifier.encoder, "head": self.classifier.head}
        if self.ema is not None:
            found["ema"] = self.ema
        return found

    def classifiers(self) -> dict[str, nn.Module]:
        """What the evaluation scores after each epoch: the trained classifier, and its EMA when there is one."""
        return {"": self.classifier} if self.ema is None else {"": self.classifier, "ema_": self.ema}

    def param_groups(self) -> list[ParamGroup]:
        """timm's layer-wise decay groups of the encoder's timm model (its `no_weight_decay()` names, such as
        pos_embed and cls_token, undecayed, as in BEiT and MAE), one factor below the head, which gets the full lr:
        block i of L at decay^(L - i), the embeddings at decay^(L + 1). timm puts the final norm with the last
        block (BEiT and MAE with the head)."""
        head = [(f"head.{n}", p) for n, p in self.classifier.named_parameters() if not n.startswith("encoder.")]
        groups = split_weight_decay(iter(head), "head_")
        if self.cfg.freeze:
            return groups
        model = self.encoder().timm_model()
        exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        layered = param_groups_layer_decay(
            model, weight_decay=1.0, no_weight_decay_list=exempt, layer_decay=self.cfg.layer_decay
        )
        for i, group in enumerate(layered):  # timm's top layer is the last block: one factor below the head
            scale = group.get("lr_scale", 1.0) * self.cfg.layer_decay
            groups.append(ParamGroup(f"encoder_{i}", list(group["params"]), group["weight_decay"], scale))
        grouped = {id(p) for g in groups for p in g.params}
        rest = [(n, p) for n, p in self.encoder().named_parameters() if p.requires_grad and id(p) not in grouped]
        return groups + split_weight_decay(iter(rest), "encoder_rest_")

    @torch.no_grad()
    def after_step(self, progress: Progress) -> None:
        """The EMA of the weights; BatchNorm statistics are copied, not averaged."""
        if self._averaging is None:
            return
        self._averaging.update(self.cfg.ema_decay)
        for kept, current in zip(self.ema.buffers(), self.classifier.buffers(), strict=True):
            kept.copy_(current)
