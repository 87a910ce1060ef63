"""Features of an encoder over a dataset: [CLS], average-pooled patches, or both, for k-NN and linear probes.

Any encoder of the contract (`mimkit.models.encoder.Encoder`) works: it maps images (B, C, H, W) to tokens
(B, prefix + N, D), says how many prefix tokens it has, and gives its image-level feature (`pooled`: a ViT's
[CLS], a CNN's pooled map), which is the "cls" feature here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from rich.progress import track

from mimkit.data.info import DataError
from mimkit.data.loader import ViewDataset, eval_loader
from mimkit.data.sources import ImageSource
from mimkit.data.views import EvalView
from mimkit.distributed import all_gather_cat, rank, world_size
from mimkit.engine.logs import log
from mimkit.models.encoder import Encoder

Pooling = Literal["cls", "avg", "cls+avg"]


@dataclass
class Features:
    features: torch.Tensor
    """(N, D) float32, in dataset order."""
    labels: torch.Tensor
    """(N,) int64, -1 where unknown."""


class RawPixels(Encoder):
    """The identity "encoder": the normalised pixels as one token (the raw-pixel baseline).

    One token and no prefix, so every pooling yields the pixels themselves.
    """

    num_prefix_tokens = 0
    image_size = 0
    """No training resolution: features are taken at the data's own size."""

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return images.flatten(1).unsqueeze(1)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]


def encoder_image_size(encoder: Encoder, source: ImageSource) -> int:
    """The encoder's training resolution; the data's own size for encoders without one (raw pixels)."""
    return encoder.image_size or (source.info.image_size or (224, 224))[0]


def pool_tokens(tokens: torch.Tensor, encoder: Encoder, pooling: Pooling) -> torch.Tensor:
    """The encoder's image feature ("cls"), the mean of its patch tokens ("avg"), or both concatenated."""
    patches = tokens[:, encoder.num_prefix_tokens :].mean(1)
    if pooling == "avg":
        return patches
    cls = encoder.pooled(tokens)
    return cls if pooling == "cls" else torch.cat([cls, patches], dim=-1)


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    source: ImageSource,
    image_size: int,
    pooling: Pooling = "cls",
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    description: str | None = None,
) -> Features:
    """Run `encoder` over every image of `source` (sharded across the process group's ranks when distributed).

    `description` shows a progress bar with that label.
    """
    was_training = encoder.training
    encoder.eval()
    dataset = ViewDataset(source, EvalView(source.info, image_size), seed=0)
    loader = eval_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, num_replicas=world_size(), rank=rank()
    )
    features, labels, indices, skipped = [], [], [], []
    batches = track(loader, description=description, transient=True) if description else loader
    for batch in batches:
        skipped += batch["skipped"]
        if batch["views"] is None:
            continue
        tokens = encoder(batch["views"].to(device, non_blocking=True))
        features.append(pool_tokens(tokens, encoder, pooling).float())
        labels.append(batch["label"].to(device))
        indices.append(batch["index"].to(device))
    encoder.train(was_training)
    if not features:
        raise DataError(
            f"none of the {len(source)} images of {source.info.name} could be read (e.g. {skipped[0]})"
            if skipped
            else f"none of the {len(source)} images of {source.info.name} could be read"
        )
    if skipped:
        log.warning(
            "%s: skipped %d unreadable image(s), e.g. %s", source.info.name, len(skipped), ", ".join(skipped[:3])
        )
    ordered, ordered_labels = in_dataset_order(
        (torch.cat(features), torch.cat(labels)), torch.cat(indices), len(source)
    )
    return Features(ordered, ordered_labels)


def in_dataset_order(tensors: tuple[torch.Tensor, ...], indices: torch.Tensor, total: int) -> tuple[torch.Tensor, ...]:
    """Rows of `tensors` (this process's share, image `indices[i]` in row i) gathered from every process, in
    dataset order, on the CPU; the duplicates DistributedSampler pads with are dropped."""
    if world_size() > 1:
        tensors = tuple(_gather_uneven(t) for t in tensors)
        indices = _gather_uneven(indices)
    order = torch.full((total,), -1, dtype=torch.long, device=indices.device)
    order[indices] = torch.arange(len(indices), device=indices.device)
    kept = order[order >= 0]
    return tuple(t[kept].cpu() for t in tensors)


def _gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """all_gather for tensors whose first dimension differs by rank (unreadable images are skipped)."""
    length = torch.tensor([len(tensor)], device=tensor.device)
    longest = int(all_gather_cat(length).max())
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: len(tensor)] = tensor
    lengths = all_gather_cat(length)
    return torch.cat(
        [part[: int(n)] for part, n in zip(all_gather_cat(padded).chunk(len(lengths)), lengths, strict=True)]
    )
