"""k-NN accuracy of a method's encoder during pretraining (every few epochs, when the data has labels)."""

from __future__ import annotations

import torch
from torch import nn

from mimkit.config import DataConfig
from mimkit.data.sources import ImageSource, build_source
from mimkit.eval.features import extract_features
from mimkit.eval.knn import knn_accuracy


class OnlineKNN:
    """Builds the (possibly limited) train and eval splits once; each call extracts features and scores k-NN."""

    def __init__(self, data: DataConfig, limit: int | None, k: int = 20, temperature: float = 0.07) -> None:
        limited = DataConfig(**{**data.__dict__, "limit": limit})
        self.train: ImageSource = build_source(limited, data.split)
        self.test: ImageSource = build_source(limited, data.eval_split)
        self.k, self.temperature = k, temperature
        self.batch_size, self.num_workers = data.batch_size * 2, data.num_workers

    @torch.no_grad()
    def __call__(self, encoder: nn.Module, device: torch.device, rank: int = 0) -> float:
        """Top-1 accuracy (a fraction) of the weighted k-NN on [CLS] features; every rank gets the same value."""
        size = getattr(encoder, "image_size", None) or (self.train.info.image_size or (224, 224))[0]
        args = (size, "cls", self.batch_size, self.num_workers, device, rank)
        train = extract_features(encoder, self.train, *args)
        test = extract_features(encoder, self.test, *args)
        classes = self.train.info.num_classes or 0
        return knn_accuracy(
            train.features, train.labels, test.features, test.labels, classes, (self.k,), self.temperature
        )[self.k]
