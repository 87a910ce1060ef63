"""CIM: Corrupted Image Modeling (Fang et al., ICLR 2023).

No code of CIM is public; the paper fixes the pipeline, and every number here is our documented assumption
(docs/methods/cim.md), each a config field.

Algorithm, per batch:
  views      one random-resized crop per image with a BEiT block mask on the token grid (40-50 % of the tokens)
  tokens     z = the frozen tokenizer's tokens of the crop, one per enhancer patch      (`Corrupter.tokenize`)
  generator  small ViT with a mask token on the masked crop -> logits over the vocabulary at masked positions
  corrupt    z' = z outside the mask, tokens sampled from the generator's softmax (temperature) inside, no
             gradient; the tokenizer renders the whole grid z' into the corrupted image  (`Corrupter.corrupt`)
  enhancer   any encoder (ViT, BEiT, CNN) on the corrupted image, no mask token:
             ResPix: all original pixels, sliding-window normalised (MSE over every pixel), or
             RevDet: per token, was it replaced (masked and z' != z)? (BCE over every position)
  generator  L_gen = cross-entropy of its logits against z at the masked positions
  loss       L_gen + L_enh; no gradient flows from the enhancer into the generator, each is clipped on its own
The enhancer is what evaluation and export use; the tokenizer and the sampling are the corruption part
(`mimkit.corruption`), fitting a missing tokenizer file is a procedure (`mimkit.procedures.tokenizer_fit`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

from mimkit.config import ConfigError, check
from mimkit.corruption import Corrupter, Corruption, Sampling
from mimkit.data.info import DataInfo
from mimkit.data.masking import MaskConfig, MaskGenerator
from mimkit.data.sources import ImageSource
from mimkit.data.views import AugmentOn, MaskedView, MaskedViewConfig, SeededViews
from mimkit.distributed import all_reduce_mean
from mimkit.health import feature_health, mask_health
from mimkit.losses.pixels import sliding_window_normalize, sliding_window_stats
from mimkit.methods.base import (
    ClipMode,
    Method,
    MethodConfig,
    Panel,
    ParamGroup,
    Reconstruction,
    StepOutput,
    register,
    split_weight_decay,
)
from mimkit.models.backbones import BackboneConfig, build_backbone
from mimkit.models.encoder import Encoder
from mimkit.models.heads import PixelShuffleHead
from mimkit.models.tokenizers.base import Tokenizer
from mimkit.models.tokenizers.files import load_tokenizer
from mimkit.models.tokenizers.registry import tokenizer_class
from mimkit.procedures.tokenizer_fit import describe_metrics, fit_tokenizer, load_tokenizer_recipe
from mimkit.schedules import Progress

log = logging.getLogger("mimkit")
TOKENIZER_FIX = "make it with: mimkit tokenizer fit -c tokenizers/<recipe> output={file}"
TOKENIZER_KEY = "corrupter.tokenizer"
"""Where the tokenizer's state lies in the method's state dict."""


@dataclass
class CIMConfig(MethodConfig):
    """CIM defaults for a ViT-B/16 enhancer at 224 px (METHODS.md section 3; every value is an ASSUMPTION)."""

    name: str = "cim"
    clip_mode: ClipMode = "per_module"
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="vit_base_patch16_224"))
    """The enhancer: any ViT, BEiT or CNN (it sees no mask token)."""
    generator: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(name="vit_base_patch16_224", depth=4, drop_path_rate=0.0)
    )
    """A small ViT or BEiT with a mask token: about a third of the enhancer's depth, its width."""
    objective: Literal["respix", "revdet"] = "respix"
    tokenizer: str = "tokenizers/dall_e.pt"
    """The tokenizer file (`mimkit tokenizer fit`)."""
    tokenizer_recipe: str | None = None
    """A tokenizer recipe that makes `tokenizer` when the file is missing (fitted before training starts)."""
    tokenizer_overrides: list[str] = field(default_factory=list)
    """Overrides of that recipe, e.g. ["data.root=${data.root}"]: fit it on the run's own folder of images."""
    token_patch: int | None = None
    """Pixels per token side at the enhancer's input; None: the enhancer's patch size (set it for CNNs, e.g. 16)."""
    views: MaskedViewConfig = field(default_factory=MaskedViewConfig)
    """BEiT's inputs: random resized crop, flip, ColorJitter(0.4, 0.4, 0.4) on every (RGB) image."""
    mask: MaskConfig = field(default_factory=lambda: MaskConfig(ratios=[(0.45, 0.05)]))
    """Generator mask: BEiT blocks over 40-50 % of the tokens, the smallest block 16 tokens on a 14 x 14 grid."""
    sampling: Sampling = "sample"
    temperature: float = 1.0
    """Softmax temperature of the sampled replacements."""
    window: int | None = None
    """ResPix: side of the sliding normalisation window in pixels; None: `token_patch`."""
    generator_weight: float = 1.0
    """Weight of the generator's cross-entropy in the summed loss (the two share no parameters)."""
    no_weight_decay: list[str] = field(default_factory=lambda: ["cls_token", "pos_embed"])
    """Parameters (by last name) without weight decay besides biases and 1-D ones: BEiT's skip list, which the
    paper's BEiT-based training would inherit."""

    runtime_fields: ClassVar[tuple[str, ...]] = ("tokenizer_recipe", "tokenizer_overrides")
    """Only used while the tokenizer file is missing: a resumed run may change it."""

    def validate(self, prefix: str = "method") -> None:
        super().validate(prefix)
        self.backbone.validate(f"{prefix}.backbone")
        self.generator.validate(f"{prefix}.generator")
        self.views.validate(f"{prefix}.views")
        self.mask.validate(f"{prefix}.mask")
        check(
            self.views.size == self.backbone.img_size,
            f"{prefix}.views.size",
            f"must equal the enhancer's img_size ({self.backbone.img_size}); got {self.views.size}",
        )
        check(
            self.generator.img_size == self.backbone.img_size,
            f"{prefix}.generator.img_size",
            f"the generator sees the enhancer's images: set it to {self.backbone.img_size}",
        )
        check(self.temperature > 0, f"{prefix}.temperature", f"must be positive; got {self.temperature}")
        check(self.window is None or self.window >= 2, f"{prefix}.window", f"must be >= 2; got {self.window}")
        check(self.token_patch is None or self.token_patch >= 1, f"{prefix}.token_patch", "must be >= 1")
        check(self.generator_weight >= 0, f"{prefix}.generator_weight", "must be >= 0")


@register("cim")
class CIM(Method):
    Config = CIMConfig
    cfg: CIMConfig
    renamed_state: ClassVar[dict[str, str]] = {"tokenizer": TOKENIZER_KEY}
    """The tokenizer moved into the corruption part: checkpoints written before still load."""

    @classmethod
    def prepare(cls, cfg: MethodConfig, source: ImageSource) -> None:
        """Fit the tokenizer from `tokenizer_recipe` (on that recipe's data, with `tokenizer_overrides`) when its file
        is missing; without a recipe, stop with the command that makes it."""
        assert isinstance(cfg, CIMConfig)
        if Path(cfg.tokenizer).expanduser().is_file():
            return
        if cfg.tokenizer_recipe is None:
            raise ConfigError(
                f"method.tokenizer: {cfg.tokenizer} does not exist; {TOKENIZER_FIX.format(file=cfg.tokenizer)} "
                "(or name a tokenizer recipe in method.tokenizer_recipe to fit it before training)"
            )
        log.info("method.tokenizer: %s does not exist; fitting it with %s", cfg.tokenizer, cfg.tokenizer_recipe)
        recipe = load_tokenizer_recipe(cfg.tokenizer_recipe, [*cfg.tokenizer_overrides, f"output={cfg.tokenizer}"])
        fitted = fit_tokenizer(recipe)
        log.info("tokenizer %s: %s", fitted.path, describe_metrics(fitted.metrics))

    @classmethod
    def from_saved(cls, cfg: MethodConfig, data: DataInfo, saved: Mapping[str, Any]) -> CIM:
        """With the tokenizer the run trained with, rebuilt from the saved state (its kind and constructor arguments
        travel in it; the weights load next), whatever became of the file since: gone, or refitted. Checkpoints
        written before the spec travelled read the file."""
        assert isinstance(cfg, CIMConfig)
        spec = saved.get(f"{TOKENIZER_KEY}._extra_state")
        if not isinstance(spec, Mapping):
            return cls(cfg, data)
        if not Path(cfg.tokenizer).expanduser().is_file():
            log.info(
                "method.tokenizer: %s is gone; using the %s tokenizer saved with the run", cfg.tokenizer, spec["kind"]
            )
        return cls(cfg, data, tokenizer_class(spec["kind"])(**spec["config"]).requires_grad_(False))

    def __init__(self, cfg: CIMConfig, data: DataInfo, tokenizer: Tokenizer | None = None) -> None:
        """`tokenizer`: the one to corrupt with (a saved run's); None reads `cfg.tokenizer`'s file."""
        super().__init__(cfg, data)
        if tokenizer is None:
            tokenizer, _ = load_tokenizer(cfg.tokenizer)
        self.enhancer = build_backbone(cfg.backbone, data.channels, mask_token=False)
        self.generator = build_backbone(cfg.generator, data.channels, mask_token=True, prefix="method.generator")
        size = cfg.backbone.img_size
        token_patch = cfg.token_patch or self.enhancer.patch_size
        check(
            size % token_patch == 0,
            "method.token_patch",
            f"image size {size} is not divisible by {token_patch} pixels per token; choose a divisor",
        )
        self.token_grid = (size // token_patch, size // token_patch)
        check(
            self.generator.grid(size, size) == self.token_grid,
            "method.generator.patch_size",
            f"the generator's grid {self.generator.grid(size, size)} must be the token grid {self.token_grid}: "
            f"give it patch size {token_patch}",
        )
        self.window = cfg.window or token_patch
        self.corrupter = Corrupter(tokenizer, self.token_grid, data.mean, data.std, cfg.sampling, cfg.temperature)
        self.generator_head = nn.Linear(self.generator.embed_dim, tokenizer.vocab_size)
        self.enhancer_grid = self.enhancer.grid(size, size)
        if cfg.objective == "respix":
            self.enhancer_head = PixelShuffleHead(
                self.enhancer.embed_dim, data.channels, self._upscale(size, "pixels of the image")
            )
        else:
            self.enhancer_head = PixelShuffleHead(
                self.enhancer.embed_dim, 1, self._upscale(self.token_grid[0], "tokens of the token grid")
            )

    def _upscale(self, side: int, what: str) -> int:
        grid = self.enhancer_grid
        check(
            grid[0] == grid[1] and side % grid[0] == 0,
            "method.backbone",
            f"the enhancer's {grid[0]}x{grid[1]} feature grid does not divide the {side} {what}; "
            "choose an image size, token_patch or CNN output_stride that lines them up",
        )
        return side // grid[0]

    def views(self, augment_on: AugmentOn = "worker") -> SeededViews:
        """A masked crop per image, with a seed for the draws of its replacement tokens."""
        masks = MaskGenerator(self.cfg.mask)
        return SeededViews(MaskedView(self.cfg.views, self.data, self.token_grid, masks, augment_on))

    def mask_configs(self) -> dict[str, tuple[MaskConfig, tuple[int, int]]]:
        """The generator's mask, on the token grid."""
        return {"method.mask": (self.cfg.mask, self.token_grid)}

    def training_step(self, batch: dict[str, Any], progress: Progress) -> StepOutput:
        views = batch["views"]
        images, masks = views["image"], views["mask"]
        corruption = self.corrupt(images, masks, views["seed"])
        prediction, tokens = self.enhance_tokens(corruption.images)
        if self.cfg.objective == "respix":
            loss_enhancer = F.mse_loss(prediction.float(), sliding_window_normalize(images, self.window))
        else:
            loss_enhancer = F.binary_cross_entropy_with_logits(prediction.float(), corruption.replaced.float())
        targets = corruption.tokens[masks]
        loss_generator = global_token_mean(F.cross_entropy(corruption.logits.float(), targets, reduction="none"))
        metrics = {
            "loss_generator": loss_generator.detach(),
            "loss_enhancer": loss_enhancer.detach(),
            "generator_accuracy": global_token_mean((corruption.logits.argmax(-1) == targets).float()),
            **mask_health(masks, self.cfg.mask.expected_ratio(progress.epoch), logged=progress.logged),
            "replaced_ratio": corruption.replaced.float().mean(),
            **(feature_health(self.enhancer.pooled(tokens)) if progress.logged else {}),
        }
        if self.cfg.objective == "revdet":
            metrics["detection_accuracy"] = ((prediction > 0) == corruption.replaced).float().mean()
        return StepOutput(self.cfg.generator_weight * loss_generator + loss_enhancer, metrics)

    def corrupt(self, images: torch.Tensor, masks: torch.Tensor, seeds: torch.Tensor) -> Corruption:
        """The images' tokens, the generator's logits at the masked positions, and the corrupted images rendered
        with those positions sampled by each image's own seed (`seeds`, (B,))."""
        tokens = self.corrupter.tokenize(images)
        logits = self.generate(images, masks)
        return self.corrupter.corrupt(tokens, masks, logits, seeds, images)

    def generate(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(M, vocab) the generator's logits at the M masked positions of the images it sees masked."""
        hidden = self.generator(images, mask=masks)[:, self.generator.num_prefix_tokens :]
        return self.generator_head(hidden[masks.flatten(1)])

    def enhance(self, corrupted: torch.Tensor) -> torch.Tensor:
        """ResPix: (B, C, H, W) sliding-window normalised pixels; RevDet: (B, h, w) replaced-token logits."""
        return self.enhance_tokens(corrupted)[0]

    def enhance_tokens(self, corrupted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`enhance`'s output and the enhancer's tokens it came from."""
        tokens = self.enhancer(corrupted)
        output = self.enhancer_head(tokens[:, self.enhancer.num_prefix_tokens :], self.enhancer_grid)
        return (output if self.cfg.objective == "respix" else output.squeeze(1)), tokens

    @torch.no_grad()
    def reconstruct(self, views: dict[str, Any]) -> Reconstruction | None:
        """ResPix: the enhancer's pixels from the corrupted image, de-normalised with each original pixel's window
        mean and standard deviation; the mask is the generator's."""
        if self.cfg.objective != "respix":
            return None
        images, masks = views["image"], views["mask"]
        prediction = self.enhance(self.corrupt(images, masks, views["seed"]).images)
        return Reconstruction(images, self._denormalize(prediction, images), masks)

    def _denormalize(self, prediction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """ResPix outputs back in the images' normalisation, with the original's window statistics."""
        mean, std = sliding_window_stats(images, self.window)
        return prediction * std + mean

    @torch.no_grad()
    def panels(self, views: dict[str, Any]) -> list[Panel]:
        images, masks = views["image"], views["mask"]
        corruption = self.corrupt(images, masks, views["seed"])
        rows = [
            Panel("original", images),
            Panel("generator mask", masks.float()),
            Panel("tokenizer reconstruction", self.corrupter.render(corruption.tokens, images)),
            Panel("corrupted (enhancer input)", corruption.images),
        ]
        prediction = self.enhance(corruption.images)
        if self.cfg.objective == "respix":
            rows.append(Panel("ResPix output", self._denormalize(prediction, images)))
        else:
            rows += [
                Panel("RevDet P(replaced)", torch.sigmoid(prediction.float())),
                Panel("replaced (true)", corruption.replaced.float()),
            ]
        return rows

    def param_groups(self) -> list[ParamGroup]:
        """The enhancer (with its head) and the generator (with its head) in groups of their own."""
        enhancer = nn.ModuleDict({"encoder": self.enhancer, "head": self.enhancer_head})
        generator = nn.ModuleDict({"encoder": self.generator, "head": self.generator_head})
        exempt = self.cfg.no_weight_decay
        return split_weight_decay(enhancer.named_parameters(), "enhancer_", exempt) + split_weight_decay(
            generator.named_parameters(), "generator_", exempt
        )

    def encoder(self) -> Encoder:
        return self.enhancer

    def networks(self) -> dict[str, nn.Module]:
        return {
            "enhancer": self.enhancer,
            "enhancer_head": self.enhancer_head,
            "generator": self.generator,
            "generator_head": self.generator_head,
            "tokenizer": self.corrupter.tokenizer,
        }


def global_token_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over the masked tokens of the *global* batch, however many processes share it: this process's sum
    over the mean count per process (DDP then averages gradients and logs over processes). Processes mask
    different numbers of tokens, so a per-process mean would weigh tokens by the process they landed on."""
    count = all_reduce_mean(values.new_tensor(float(values.numel())))
    return values.sum() / count.clamp(min=1.0)
