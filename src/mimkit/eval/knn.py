"""Weighted k-NN classification of frozen features (the DINO/iBOT protocol).

Features are L2-normalised, so similarity is cosine. Each of the k nearest training features votes for its
label with weight exp(similarity / T); the class with the largest summed weight wins. The test set is
processed in chunks, so memory is chunk_size x N_train rather than N_test x N_train, and the top-max(k)
neighbours of a chunk are found once and serve every requested k.

A bank sharded across processes gives the single-bank result: each rank calls `topk_neighbours` on its
shard with `index_offset` set to the shard's first global index, the candidates are gathered, and
`merge_topk` keeps the best k of them. Ties between equal similarities are broken arbitrarily, so
"exactly" holds for distinct similarities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_KS = (10, 20, 100, 200)


def _check_features(features: Tensor, name: str) -> None:
    if features.ndim != 2:
        raise ValueError(f"{name}: expected a (N, D) tensor; got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor; got {features.dtype}")


def _chunk_topk(bank: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of `queries` (any float dtype) against an already normalised float32 `bank`; one chunk."""
    return (F.normalize(queries.to(bank.device, torch.float32), dim=1) @ bank.T).topk(k, dim=1)


def topk_neighbours(
    bank: Tensor, queries: Tensor, k: int, chunk_size: int = 512, *, index_offset: int = 0
) -> tuple[Tensor, Tensor]:
    """The k most cosine-similar bank rows of every query, most similar first.

    Returns (similarities (Q, k), indices (Q, k)); indices are `index_offset` + row in `bank`, so a shard of a
    larger bank reports global indices. k is clamped to the bank size. Computed in float32 on the bank's
    device, `chunk_size` queries at a time.
    """
    _check_features(bank, "bank")
    _check_features(queries, "queries")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"feature dimensions differ: bank {bank.shape[1]}, queries {queries.shape[1]}")
    if bank.shape[0] == 0:
        raise ValueError("bank: empty")
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be >= 1; got k={k}, chunk_size={chunk_size}")
    k = min(k, bank.shape[0])
    bank = F.normalize(bank.float(), dim=1)
    similarities, indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        sim, idx = _chunk_topk(bank, queries[start : start + chunk_size], k)
        similarities.append(sim)
        indices.append(idx + index_offset)
    if not similarities:
        return bank.new_empty(0, k), torch.empty(0, k, dtype=torch.long, device=bank.device)
    return torch.cat(similarities), torch.cat(indices)


def merge_topk(similarities: Sequence[Tensor], indices: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The best k of several candidate lists per query (e.g. one per bank shard), most similar first.

    Each list is (Q, k_i) as returned by `topk_neighbours`; k is clamped to the number of candidates.
    """
    if len(similarities) != len(indices) or not similarities:
        raise ValueError("merge_topk: need as many index lists as similarity lists, at least one")
    sim = torch.cat(list(similarities), dim=1)
    idx = torch.cat(list(indices), dim=1)
    best, order = sim.topk(min(k, sim.shape[1]), dim=1)
    return best, idx.gather(1, order)


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    chunk_size: int = 512,
) -> dict[int, Tensor]:
    """Predicted labels (int64, on the training features' device) of every test feature, per k in `ks`.

    A k larger than the training bank uses the whole bank (still reported under the requested k). Weights are
    computed as exp((sim - max sim) / T): the per-query shift leaves the argmax unchanged but keeps small
    temperatures from overflowing.
    """
    _check_features(train_features, "train_features")
    _check_features(test_features, "test_features")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels: expected shape ({train_features.shape[0]},); got {tuple(train_labels.shape)}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks: need at least one k, all >= 1; got {tuple(ks)}")
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0; got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1; got {chunk_size}")
    if train_features.shape[0] == 0:
        raise ValueError("train_features: empty")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature dimensions differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise ValueError(
            f"train_labels: must lie in [0, {num_classes}); got [{train_labels.min()}, {train_labels.max()}]"
        )
    device = train_features.device
    labels = train_labels.to(device=device, dtype=torch.long)
    bank = F.normalize(train_features.float(), dim=1)
    ascending = sorted(set(ks))
    kmax = min(ascending[-1], bank.shape[0])
    predictions: dict[int, list[Tensor]] = {k: [] for k in ascending}
    for start in range(0, test_features.shape[0], chunk_size):
        sim, idx = _chunk_topk(bank, test_features[start : start + chunk_size], kmax)
        weights = ((sim - sim[:, :1]) / temperature).exp()
        neighbour_labels = labels[idx]
        votes = torch.zeros(sim.shape[0], num_classes, device=device)
        done = 0
        for k in ascending:
            # ks ascend, so each k adds only the neighbours between the previous k and itself to the votes.
            upto = min(k, kmax)
            votes.scatter_add_(1, neighbour_labels[:, done:upto], weights[:, done:upto])
            done = upto
            predictions[k].append(votes.argmax(dim=1))
    empty = torch.empty(0, dtype=torch.long, device=device)
    return {k: torch.cat(predictions[k]) if predictions[k] else empty for k in ks}


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    chunk_size: int = 512,
) -> dict[int, float]:
    """Top-1 accuracy (a fraction in [0, 1]) of the weighted k-NN classifier, per k in `ks`."""
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"test_labels: expected shape ({test_features.shape[0]},); got {tuple(test_labels.shape)}")
    if test_features.shape[0] == 0:
        raise ValueError("test_features: empty")
    predictions = knn_predict(train_features, train_labels, test_features, num_classes, ks, temperature, chunk_size)
    target = test_labels.to(device=train_features.device, dtype=torch.long)
    return {k: (pred == target).float().mean().item() for k, pred in predictions.items()}
