"""Linear segmentation probe on frozen patch tokens (DINOv2's "linear" protocol, simplified; docs/evaluation.md).

Each token of the frozen encoder's grid goes through one linear layer (after a fixed per-channel standardisation,
the affine-free BatchNorm of DINOv2's head), the (classes, h, w) logits are upsampled bilinearly to the label map,
and cross-entropy is taken over the pixels that are not `IGNORE_INDEX`. As the linear probe, H heads, one per
learning rate, train together on the same batches (`LinearProbeSweep`): head h is the probe lr h alone would give.
Tokens are extracted once and kept in memory: (images, h, w, D) float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.progress import track
from torch import Tensor
from torch.utils.data import Dataset

from mimkit.data.info import DataError, UnreadableImage
from mimkit.data.loader import Skipped, eval_loader
from mimkit.data.sources import ImageSource, label_size_problem
from mimkit.data.views import EvalView
from mimkit.distributed import all_gather_cat, rank, world_size
from mimkit.eval.features import in_dataset_order
from mimkit.eval.linear import LinearProbeSweep, check_sweep, fit_sweep
from mimkit.eval.segmentation_scores import IGNORE_INDEX, SegmentationScores, confusion_matrix
from mimkit.models.encoder import Encoder

SEGMENT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""Absolute learning rates of the sweep, half a decade apart: a mean per-pixel loss of standardised tokens takes
larger steps than the linear probe's (its best lay at the top of `DEFAULT_LRS` on Fashion-MNIST)."""


@dataclass
class TokenMaps:
    """Frozen tokens of a split on their grid and the label maps of the same views."""

    tokens: Tensor
    """(N, h, w, D) float32."""
    targets: Tensor
    """(N, H, W) uint8 class ids, `IGNORE_INDEX` where not scored."""


class PatchPixels(Encoder):
    """The pixel baseline of dense probing: each token is its patch's normalised pixels, on the grid of the encoder
    it stands in for, so a linear probe of it sees exactly what the encoder saw and nothing learned."""

    num_prefix_tokens = 0

    def __init__(self, patch_size: int, image_size: int) -> None:
        super().__init__()
        self.patch_size, self.image_size = patch_size, image_size

    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, tokens, C * patch_size**2); an image whose sides the patch does not divide is padded with zeros (its
        mean, once normalised) to whole patches, as a CNN's strided grid covers its border."""
        p = self.patch_size
        padded = F.pad(images, (0, -images.shape[-1] % p, 0, -images.shape[-2] % p))
        return F.unfold(padded, p, stride=p).transpose(1, 2)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return -(-height // self.patch_size), -(-width // self.patch_size)


class LabelledViews(Dataset):
    """Each image's evaluation view with its label map through the same resize and crop; a label map that cannot
    serve (another size, ids beyond the classes) comes back as Skipped with the reason, so the consumer stops with
    it rather than a worker's traceback."""

    def __init__(self, source: ImageSource, view: EvalView, num_classes: int) -> None:
        self.source, self.view, self.num_classes = source, view, num_classes

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[tuple[Tensor, Tensor], int, int] | Skipped:
        index = key[1] if isinstance(key, tuple) else key  # the loaders' samplers yield (epoch, index)
        try:
            image, _ = self.source.load(index)
        except UnreadableImage as error:
            return Skipped(error.where, error.reason)
        where = self.source.label_map_where(index)
        try:
            labels = self.source.label_map(index)
        except DataError as error:
            return Skipped(where, str(error))
        if labels.shape != image.shape[-2:]:
            return Skipped(where, label_size_problem(tuple(labels.shape), tuple(image.shape[-2:])))
        wrong = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.num_classes))]
        if len(wrong):
            return Skipped(
                where,
                f"ids {sorted(set(wrong.tolist()))[:5]} lie outside the {self.num_classes} classes (0 to "
                f"{self.num_classes - 1}; {IGNORE_INDEX} is not scored); name every class in the class list, or "
                f"set such pixels to {IGNORE_INDEX}",
            )
        return (self.view(image), self.view.label_map(labels).to(torch.uint8)), -1, index


@torch.no_grad()
def extract_token_maps(
    encoder: Encoder,
    source: ImageSource,
    image_size: int,
    num_classes: int,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    description: str | None = None,
) -> TokenMaps:
    """Patch tokens of every image of `source` on their grid, with the label maps, in dataset order (shared out over
    the process group's ranks when distributed). Any unreadable image or unusable label map is a DataError."""
    was_training = encoder.training
    encoder.eval()
    dataset = LabelledViews(source, EvalView(source.info, image_size), num_classes)
    loader = eval_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, num_replicas=world_size(), rank=rank()
    )
    kept_on = device if world_size() > 1 else "cpu"  # the gather needs them on the device; alone, host memory
    tokens, targets, indices, problem = [], [], [], None
    for batch in track(loader, description=description, transient=True) if description else loader:
        problem = problem or (batch["skipped"] or [None])[0]
        if problem and world_size() == 1:
            break
        if problem:  # read on, without the encoder, so that every process reaches the check below
            continue
        images, maps = batch["views"]
        found = encoder(images.to(device, non_blocking=True))[:, encoder.num_prefix_tokens :]
        tokens.append(found.float().unflatten(1, encoder.grid(*images.shape[-2:])).to(kept_on))
        targets.append(maps.to(kept_on))
        indices.append(batch["index"].to(kept_on))
    encoder.train(was_training)
    failed = all_gather_cat(torch.tensor([problem is not None], device=device))
    if problem or failed.any():
        raise DataError(f"dense evaluation of {source.info.name}: {problem or 'another process found bad data'}")
    ordered = in_dataset_order((torch.cat(tokens), torch.cat(targets)), torch.cat(indices), len(source))
    return TokenMaps(*ordered)


@dataclass
class SegmentationProbeResult:
    """Scores of every head of a sweep on the evaluation split, and the lr chosen by its mIoU (ties: listed first)."""

    lrs: list[float]
    scores: list[SegmentationScores]
    best_lr: float
    best: SegmentationScores
    probe: LinearProbeSweep | None = field(default=None, repr=False, compare=False)
    """The trained sweep; head i was trained with lrs[i]."""

    def to_markdown(self) -> str:
        """One row per lr (scores in percent); the selected lr in bold."""
        lines = ["| lr | mIoU % | pixel acc. % |", "|---:|---:|---:|"]
        for lr, scores in zip(self.lrs, self.scores, strict=True):
            cells = [f"{lr:g}", f"{100 * scores.miou:.2f}", f"{100 * scores.pixel_accuracy:.2f}"]
            if lr == self.best_lr:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def bilinear_weights(size: int, grid: int, device: torch.device | str = "cpu") -> Tensor:
    """(size, grid) weights of bilinear upsampling along one axis (align_corners=False), as F.interpolate's."""
    basis = torch.eye(grid, device=device)[:, None, :]  # each grid cell's indicator as a 1-D signal
    return F.interpolate(basis, size=size, mode="linear", align_corners=False)[:, 0].T


def _upsampled_logits(probe: LinearProbeSweep, tokens: Tensor, size: Sequence[int]) -> Tensor:
    """(heads, B, classes, H, W) logits of (B, h, w, D) tokens, bilinearly upsampled to the label maps' size.

    Upsampling is separable: two small matrix products, whose backward pass is far cheaper on a CPU than that of
    F.interpolate (the same values, to float rounding)."""
    batch, (h, w) = tokens.shape[0], tokens.shape[1:3]
    logits = probe(tokens.flatten(0, 2)).unflatten(1, (batch, h, w))  # (heads, B, h, w, classes)
    rows, cols = (bilinear_weights(n, g, tokens.device) for n, g in zip(size, (h, w), strict=True))
    return torch.einsum("nbhwc,Hh,Ww->nbcHW", logits, rows, cols)


@torch.no_grad()
def predict_label_maps(probe: LinearProbeSweep, encoder: Encoder, images: Tensor) -> Tensor:
    """(B, H, W) class ids (on the CPU) that head 0 of `probe` predicts for evaluation views `images` (B, C, H, W)."""
    tokens = encoder(images)[:, encoder.num_prefix_tokens :]
    grid = encoder.grid(*images.shape[-2:])
    return _upsampled_logits(probe, tokens.float().unflatten(1, grid), images.shape[-2:])[0].argmax(1).cpu()


@torch.no_grad()
def score_heads(probe: LinearProbeSweep, split: TokenMaps, batch_size: int = 64) -> list[SegmentationScores]:
    """Every head's scores over the whole split (one confusion matrix per head, summed over images)."""
    num_classes = probe.bias.shape[1]
    device = probe.weight.device
    confusion = torch.zeros(probe.num_heads, num_classes, num_classes, dtype=torch.long, device=device)
    for start in range(0, len(split.tokens), batch_size):
        target = split.targets[start : start + batch_size].to(device)
        predicted = _upsampled_logits(probe, split.tokens[start : start + batch_size].to(device), target.shape[-2:])
        for head, guess in enumerate(predicted.argmax(2)):
            confusion[head] += confusion_matrix(guess, target, num_classes)
    return [SegmentationScores.from_confusion(counts.cpu()) for counts in confusion]


def train_segmentation_probes(
    train: TokenMaps,
    test: TokenMaps,
    num_classes: int,
    lrs: Sequence[float] = SEGMENT_LRS,
    epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    *,
    standardise: bool = True,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    description: str | None = None,
    device: torch.device | str | None = None,
) -> SegmentationProbeResult:
    """Train one linear head per lr on `train`'s tokens and label maps, in one pass, and score them on `test`.

    SGD with momentum, cosine decay of every lr to 0, per-pixel cross-entropy averaged over the scored pixels of a
    batch, shuffled batches of images. Runs on `device` (default: the tokens'), each batch moved there from wherever
    the token maps are kept (the CPU, for splits larger than the accelerator); deterministic given `seed`.
    `standardise` off: a plain linear layer of the raw tokens."""
    check_sweep(lrs, epochs, batch_size)
    if len(train.tokens) == 0 or len(test.tokens) == 0:
        raise ValueError("train and test need at least one image each")
    device = train.tokens.device if device is None else torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    probe = LinearProbeSweep(train.tokens.shape[-1], num_classes, len(lrs), generator=generator).to(device)
    if standardise:
        probe.standardise_with(train.tokens.flatten(0, 2))

    def batch_loss(batch: Tensor) -> Tensor | None:
        target = train.targets[batch.to(train.targets.device)].to(device).long()
        scored = int((target != IGNORE_INDEX).sum())
        if not scored:
            return None
        tokens = train.tokens[batch.to(train.tokens.device)].to(device)
        logits = _upsampled_logits(probe, tokens, target.shape[-2:])
        per_head = target.expand(probe.num_heads, *target.shape)
        summed = F.cross_entropy(
            logits.flatten(0, 1), per_head.flatten(0, 1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return summed / scored

    fit_sweep(
        probe, lrs, len(train.tokens), epochs, batch_size, generator, batch_loss, momentum, weight_decay, description
    )
    scores = score_heads(probe, test, batch_size)
    best = max(range(len(lrs)), key=lambda i: (_finite(scores[i].miou), -i))
    return SegmentationProbeResult([float(lr) for lr in lrs], scores, float(lrs[best]), scores[best], probe)


def _finite(value: float) -> float:
    return -1.0 if math.isnan(value) else value
