"""Projection heads: the DINO/iBOT prototype head (MLP -> L2 norm -> weight-normalised prototypes), and MoCo v3's
projector and predictor MLPs with batch norm, and CIM's pixel-shuffle heads."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.distributed import all_reduce_sum_grad, world_size


class WeightNormLinear(nn.Module):
    """Linear map without bias whose rows are `magnitude * direction / ||direction||` (weight normalisation).

    With `fixed_norm` the magnitudes stay 1 and are not trained (DINO's `norm_last_layer`), which keeps the
    prototypes on the unit sphere and stabilises training of large models.
    """

    def __init__(self, in_features: int, out_features: int, fixed_norm: bool) -> None:
        super().__init__()
        self.direction = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.direction, a=math.sqrt(5))  # nn.Linear's default
        self.magnitude = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fixed_norm)

    def weight(self) -> torch.Tensor:
        return self.magnitude * F.normalize(self.direction, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class PrototypeHead(nn.Module):
    """MLP (in -> hidden -> hidden -> bottleneck, GELU, no norm) -> L2 normalise -> prototype logits.

    The MLP is always shared between [CLS] and patch tokens; the prototype layer is shared too unless
    `shared_prototypes` is False, in which case patch tokens get their own (iBOT's `shared_head`).
    Callers run `embed` once on every token they need, then the prototype layer(s) only where needed.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        patch_out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
        shared_prototypes: bool = True,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.prototypes = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)
        self.patch_prototypes = (
            None if shared_prototypes else WeightNormLinear(bottleneck_dim, patch_out_dim, fixed_norm=norm_last_layer)
        )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(tokens), dim=-1)

    def cls_logits(self, embedded: torch.Tensor) -> torch.Tensor:
        return self.prototypes(embedded)

    def patch_logits(self, embedded: torch.Tensor) -> torch.Tensor:
        return (self.patch_prototypes or self.prototypes)(embedded)

    def last_layers(self) -> list[nn.Module]:
        """The prototype layers, which iBOT freezes during the first epoch(s)."""
        return [m for m in (self.prototypes, self.patch_prototypes) if m is not None]


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the global batch of all processes (SyncBatchNorm for (B, D) features, on any device): N
    processes normalise like one process at the same global batch. One process: plain BatchNorm1d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if world_size() == 1 or not self.training:
            return super().forward(x)
        sums = all_reduce_sum_grad(torch.cat([x.sum(0), x.new_tensor([float(len(x))])]))
        total = sums[-1]
        mean = sums[:-1] / total
        # two passes, as one process computes it: features whose spread is small next to their mean (the [CLS]
        # of a fresh network) lose E[x^2] - E[x]^2 to cancellation
        var = all_reduce_sum_grad((x - mean).square().sum(0)) / total
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * total / (total - 1), momentum)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def batch_norm_mlp(
    in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_norm: bool = True
) -> nn.Sequential:
    """MoCo v3's MLP: Linear (no bias) -> BatchNorm -> ReLU between layers, an affine-free BatchNorm after the last
    (`last_norm`); the norms use the global batch (MoCo v3's SyncBatchNorm). Projector: 3 layers to 256;
    predictor: 2 layers."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
        if not last:
            layers += [GlobalBatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        elif last_norm:
            layers.append(GlobalBatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class PixelShuffleHead(nn.Module):
    """Tokens on an encoder's grid -> a map `upscale` times finer: a 1 x 1 convolution to out * upscale**2
    channels, then a pixel shuffle (CIM's enhancer heads).

    On a ViT's patch tokens with upscale = patch size this is exactly a per-token linear layer to p x p x C
    pixels put back in place; on a CNN's last feature map it is the 1 x 1 conv + PixelShuffle head."""

    def __init__(self, in_dim: int, out_channels: int, upscale: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_channels * upscale * upscale, 1)
        self.shuffle = nn.PixelShuffle(upscale)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h * w, D) tokens in row-major order -> (B, out, h * upscale, w * upscale)."""
        feature_map = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        return self.shuffle(self.proj(feature_map))
