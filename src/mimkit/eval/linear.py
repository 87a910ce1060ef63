"""Linear probe on frozen features, with a learning-rate sweep trained in one pass over the data.

A linear probe's accuracy depends strongly on its learning rate, and the best one differs between backbones.
Rather than one run per lr, `LinearProbeSweep` holds H independent classifiers fed the same batches: one
(H, D, C) weight applied with a batched matmul. Summing the heads' losses gives every head exactly its own
gradient (the heads share no parameters), and the optimizer scales each head's update by its own lr, so head
h of a sweep is the classifier that training with lr h alone would give (same seed, same batches). All heads
start from the same initial weights, so they differ only in their lr.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.progress import track
from torch import Tensor, nn

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
"""Absolute learning rates (not scaled with the batch size), about half a decade apart."""

_STATS_CHUNK = 65536
_EVAL_CHUNK = 4096


class LinearProbeSweep(nn.Module):
    """H linear classifiers of standardised features, evaluated together: `forward` returns (H, B, C) logits.

    Features are standardised with fixed per-dimension statistics (`standardise_with`), the equivalent of
    MAE's affine-free BatchNorm before its probe head, so lrs carry over between backbones whose feature
    scales differ. The statistics are buffers, so a saved probe applies to raw features.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        num_heads: int,
        *,
        init_std: float = 0.01,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if min(in_features, num_classes, num_heads) < 1:
            raise ValueError(f"need >= 1 features, classes and heads; got {in_features}, {num_classes}, {num_heads}")
        init = torch.randn(in_features, num_classes, generator=generator) * init_std
        self.weight = nn.Parameter(init.expand(num_heads, -1, -1).clone())
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes))
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))

    @property
    def num_heads(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def standardise_with(self, features: Tensor, eps: float = 1e-6) -> None:
        """Set the standardisation to the mean and std (sqrt(var + eps), as BatchNorm) of `features`.

        Two passes over row chunks in float32: half-precision or very large feature sets are never copied
        whole, and centring before squaring keeps the variance accurate without float64 (which MPS lacks).
        """
        n = features.shape[0]
        chunks = range(0, n, _STATS_CHUNK)
        mean = sum(features[i : i + _STATS_CHUNK].float().sum(0) for i in chunks) / n
        var = sum((features[i : i + _STATS_CHUNK].float() - mean).square().sum(0) for i in chunks) / n
        self.mean.copy_(mean)
        self.std.copy_((var + eps).sqrt())

    def forward(self, features: Tensor) -> Tensor:
        x = (features.float() - self.mean) / self.std
        return torch.einsum("bd,hdc->hbc", x, self.weight) + self.bias[:, None, :]


class _SweepSGD:
    """SGD with momentum and per-head lrs: a (H, 1, ...) lr multiplies each head's update.

    Same update as `torch.optim.SGD` (dampening 0, no Nesterov) run on each head separately. Weight decay
    applies to the weights only, not the biases.
    """

    def __init__(self, probe: LinearProbeSweep, lrs: Tensor, momentum: float, weight_decay: float) -> None:
        self.params = (probe.weight, probe.bias)
        self.decays = (weight_decay, 0.0)
        self.lrs = lrs
        self.momentum = momentum
        self.buffers = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor], lr_factor: float) -> None:
        for param, grad, decay, buf in zip(self.params, grads, self.decays, self.buffers, strict=True):
            buf.mul_(self.momentum).add_(grad)
            if decay:
                buf.add_(param, alpha=decay)
            lr = (self.lrs * lr_factor).view(-1, *([1] * (param.ndim - 1)))
            param.sub_(lr * buf)


def check_sweep(lrs: Sequence[float], epochs: int, batch_size: int) -> None:
    """A ValueError naming the argument when a sweep cannot train."""
    if not lrs or min(lrs) <= 0:
        raise ValueError(f"lrs: need at least one lr, all > 0; got {tuple(lrs)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1; got {epochs}, {batch_size}")


def fit_sweep(
    probe: LinearProbeSweep,
    lrs: Sequence[float],
    num_samples: int,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    batch_loss: Callable[[Tensor], Tensor | None],
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    description: str | None = None,
) -> None:
    """Train every head of `probe` with its own lr: SGD with momentum over shuffled batches of sample indices (the
    last one may be smaller), every lr decayed to 0 by a cosine over all steps. `batch_loss(indices)` is the sum over
    heads of each head's mean loss on the batch, so each head's gradient is that of its own loss; None skips the
    step (it still counts in the schedule)."""
    if len(lrs) != probe.num_heads:
        raise ValueError(f"{len(lrs)} lrs for a probe of {probe.num_heads} heads")
    device = probe.weight.device
    optimizer = _SweepSGD(probe, torch.tensor(lrs, dtype=torch.float32, device=device), momentum, weight_decay)
    total_steps = epochs * math.ceil(num_samples / batch_size)
    step = 0
    passes = track(range(epochs), description=description, transient=True) if description else range(epochs)
    for _ in passes:
        order = torch.randperm(num_samples, generator=generator).to(device)
        for start in range(0, num_samples, batch_size):
            loss = batch_loss(order[start : start + batch_size])
            if loss is not None:
                grads = torch.autograd.grad(loss, [probe.weight, probe.bias])
                optimizer.step(grads, 0.5 * (1 + math.cos(math.pi * step / total_steps)))
            step += 1


@dataclass
class ProbeResult:
    """Accuracies (fractions in [0, 1]) of every head of a sweep, and the selected lr.

    `best_lr` is chosen by top-1 on the validation split when one was given, otherwise on the test split;
    `best_top1` is always the test top-1 of that lr. Ties go to the lr listed first.
    """

    lrs: list[float]
    top1: list[float]
    """Test top-1 per lr."""
    top5: list[float]
    """Test top-5 per lr (top-C when there are fewer than 5 classes, where it is 1)."""
    best_lr: float
    best_top1: float
    val_top1: list[float] | None = None
    """Validation top-1 per lr, when a validation split was given."""
    probe: LinearProbeSweep | None = field(default=None, repr=False, compare=False)
    """The trained sweep; head i was trained with lrs[i]."""

    def to_markdown(self) -> str:
        """One row per lr (accuracies in percent); the selected lr is in bold."""
        header = ["lr", "top-1 %", "top-5 %"] + (["val top-1 %"] if self.val_top1 is not None else [])
        lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        best = self.lrs.index(self.best_lr)
        for i, lr in enumerate(self.lrs):
            cells = [f"{lr:g}", f"{100 * self.top1[i]:.2f}", f"{100 * self.top5[i]:.2f}"]
            if self.val_top1 is not None:
                cells.append(f"{100 * self.val_top1[i]:.2f}")
            if i == best:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _check_split(x: Tensor, y: Tensor, name: str, dim: int, num_classes: int) -> None:
    if x.ndim != 2 or x.shape[1] != dim or not x.is_floating_point():
        raise ValueError(f"{name}_x: expected a float (N, {dim}) tensor; got {x.dtype} {tuple(x.shape)}")
    if y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"{name}_y: expected shape ({x.shape[0]},) with N >= 1; got {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"{name}_y: labels must lie in [0, {num_classes}); got [{int(y.min())}, {int(y.max())}]")


@torch.no_grad()
def _accuracies(probe: LinearProbeSweep, x: Tensor, y: Tensor) -> tuple[list[float], list[float]]:
    """Top-1 and top-5 (top-min(5, C)) accuracy of every head."""
    num_classes = probe.bias.shape[1]
    top1 = torch.zeros(probe.num_heads, device=probe.weight.device)
    top5 = torch.zeros_like(top1)
    for start in range(0, x.shape[0], _EVAL_CHUNK):
        logits = probe(x[start : start + _EVAL_CHUNK].to(probe.weight.device))
        target = y[start : start + _EVAL_CHUNK].to(logits.device, torch.long)
        ranked = logits.topk(min(5, num_classes), dim=2).indices
        hits = ranked == target[None, :, None]
        top1 += hits[:, :, 0].sum(1)
        top5 += hits.any(2).sum(1)
    return (top1 / x.shape[0]).tolist(), (top5 / x.shape[0]).tolist()


def train_linear_probes(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
    *,
    val_x: Tensor | None = None,
    val_y: Tensor | None = None,
    momentum: float = 0.9,
) -> ProbeResult:
    """Train one linear classifier per lr in `lrs` on standardised features, in one pass, and evaluate them.

    SGD with momentum, cosine decay of every lr to 0 over all steps, cross-entropy, shuffled batches (the last
    one may be smaller). Runs on `train_x`'s device; features may be any float dtype and are used in float32.
    Deterministic given `seed`, which fixes the initial weights and the batch order.

    Selecting the lr on the test split is what DINO and iBOT report; pass `val_x`/`val_y` to select on a
    held-out validation split instead (the reported `best_top1` is then an unbiased test accuracy).
    """
    dim = train_x.shape[1] if train_x.ndim == 2 else -1
    _check_split(train_x, train_y, "train", dim, num_classes)
    _check_split(test_x, test_y, "test", dim, num_classes)
    if (val_x is None) != (val_y is None):
        raise ValueError("val_x and val_y: give both or neither")
    if val_x is not None and val_y is not None:
        _check_split(val_x, val_y, "val", dim, num_classes)
    check_sweep(lrs, epochs, batch_size)
    device = train_x.device
    generator = torch.Generator().manual_seed(seed)
    probe = LinearProbeSweep(dim, num_classes, len(lrs), generator=generator).to(device)
    probe.standardise_with(train_x)
    train_y = train_y.to(device, torch.long)

    def batch_loss(batch: Tensor) -> Tensor:
        logits = probe(train_x[batch])
        targets = train_y[batch].repeat(probe.num_heads)
        return F.cross_entropy(logits.flatten(0, 1), targets, reduction="sum") / batch.numel()

    fit_sweep(probe, lrs, train_x.shape[0], epochs, batch_size, generator, batch_loss, momentum, weight_decay)
    top1, top5 = _accuracies(probe, test_x, test_y)
    val_top1 = _accuracies(probe, val_x, val_y)[0] if val_x is not None and val_y is not None else None
    selection = val_top1 if val_top1 is not None else top1
    best = max(range(len(lrs)), key=lambda i: (selection[i], -i))
    return ProbeResult(
        lrs=[float(lr) for lr in lrs],
        top1=top1,
        top5=top5,
        best_lr=float(lrs[best]),
        best_top1=top1[best],
        val_top1=val_top1,
        probe=probe,
    )
