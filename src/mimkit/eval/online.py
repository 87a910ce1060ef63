"""k-NN accuracy of a method's encoder during pretraining, as an epoch callback that `mimkit pretrain` hands to
the engine (every `train.knn_every_epochs` epochs, when the data has labels)."""

from __future__ import annotations

from typing import Any

import torch

from mimkit.data.config import DataConfig
from mimkit.data.sources import ImageSource, build_source
from mimkit.engine.logs import log
from mimkit.eval.features import encoder_image_size, extract_features
from mimkit.eval.knn import knn_accuracy
from mimkit.methods.base import Method
from mimkit.models.encoder import Encoder
from mimkit.runs import RunConfig


class OnlineKNN:
    """Builds the (possibly limited) train and eval splits on first use; each call extracts features and scores
    k-NN."""

    def __init__(
        self, data: DataConfig, limit: int | None, every: int = 1, k: int = 20, temperature: float = 0.07
    ) -> None:
        self.data = DataConfig(**{**data.__dict__, "limit": limit})
        self.every, self.k, self.temperature = every, k, temperature
        self.batch_size, self.num_workers = data.batch_size * 2, data.num_workers
        self.splits: tuple[ImageSource, ImageSource] | None = None

    def __call__(self, method: Method, epoch: int, fabric: Any) -> dict[str, float]:
        """The engine's epoch callback: `{"knn_top1": ...}` after every `every`-th epoch, else nothing."""
        if (epoch + 1) % self.every or not self.labelled():
            return {}
        with fabric.autocast():
            accuracy = self.accuracy(method.encoder(), fabric.device)
        log.info("epoch %d: online k-NN top-1 %.2f%%", epoch, 100 * accuracy)
        return {"knn_top1": accuracy}

    def labelled(self) -> bool:
        """Whether the data has labels; the first time it has none, a warning says there is no online k-NN."""
        if self.splits is None:
            self.splits = build_source(self.data, self.data.split), build_source(self.data, self.data.eval_split)
            if not self.splits[0].info.num_classes:
                log.warning("train.knn_every_epochs is set but %s has no labels: no online k-NN", self.data.source)
        return bool(self.splits[0].info.num_classes)

    @torch.no_grad()
    def accuracy(self, encoder: Encoder, device: torch.device) -> float:
        """Top-1 accuracy (a fraction) of the weighted k-NN on [CLS] features; every rank gets the same value."""
        self.labelled()
        assert self.splits is not None
        train_source, test_source = self.splits
        args = (encoder_image_size(encoder, train_source), "cls", self.batch_size, self.num_workers, device)
        train = extract_features(encoder, train_source, *args)
        test = extract_features(encoder, test_source, *args)
        classes = train_source.info.num_classes or 0
        return knn_accuracy(
            train.features, train.labels, test.features, test.labels, classes, (self.k,), self.temperature
        )[self.k]


def online_knn(cfg: RunConfig) -> list[OnlineKNN]:
    """The callbacks `train.knn_every_epochs` asks for: one OnlineKNN, or none."""
    every = cfg.train.knn_every_epochs
    return [OnlineKNN(cfg.data, cfg.train.knn_limit, every)] if every else []
