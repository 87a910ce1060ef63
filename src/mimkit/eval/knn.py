"""Weighted k-NN classification of frozen features (the DINO/iBOT protocol).

Features are L2-normalised, so similarity is cosine. Each of the k nearest training features votes for its
label with weight exp(similarity / T); the class with the largest summed weight wins. The test set is
processed in chunks, and the bank too (`bank_chunk_size` rows at a time, a running top-k merged across them), so
memory is chunk_size x bank_chunk_size similarities rather than N_test x N_train, and the top-max(k) neighbours of
a chunk are found once and serve every requested k.

At ImageNet size (1.28M x 768) the normalised bank is 3.9 GB in float32; `bank_dtype=torch.float16` halves it
(each bank chunk is widened to float32 for its product, so only the stored features are rounded: similarities move
by ~1e-3, a few near-tie votes may flip). The bank is normalised chunk by chunk into its own storage, never as a
second full float32 copy.

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


def normalised_bank(features: Tensor, dtype: torch.dtype = torch.float32, chunk_size: int = 65536) -> Tensor:
    """L2-normalised rows of `features` stored as `dtype`, normalised `chunk_size` rows at a time (no full-size
    float32 temporary besides the result)."""
    if not dtype.is_floating_point:
        raise ValueError(f"bank_dtype: must be a floating-point dtype; got {dtype}")
    bank = torch.empty(features.shape, dtype=dtype, device=features.device)
    for start in range(0, features.shape[0], chunk_size):
        bank[start : start + chunk_size] = F.normalize(features[start : start + chunk_size].float(), dim=1)
    return bank


def _chunk_topk(bank: Tensor, queries: Tensor, k: int, bank_chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Top-k of `queries` (any float dtype) against a normalised `bank` (any float dtype; products in float32),
    `bank_chunk_size` bank rows at a time with a running top-k."""
    queries = F.normalize(queries.to(bank.device, torch.float32), dim=1)
    step = bank.shape[0] if bank_chunk_size is None else bank_chunk_size
    best: tuple[Tensor, Tensor] | None = None
    for start in range(0, bank.shape[0], step):
        rows = bank[start : start + step]
        sim, idx = (queries @ rows.float().T).topk(min(k, rows.shape[0]), dim=1)
        found = (sim, idx + start)
        best = found if best is None else merge_topk([best[0], found[0]], [best[1], found[1]], k)
    assert best is not None
    return best


def topk_neighbours(
    bank: Tensor,
    queries: Tensor,
    k: int,
    chunk_size: int = 512,
    *,
    index_offset: int = 0,
    bank_chunk_size: int | None = None,
    bank_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """The k most cosine-similar bank rows of every query, most similar first.

    Returns (similarities (Q, k), indices (Q, k)); indices are `index_offset` + row in `bank`, so a shard of a
    larger bank reports global indices. k is clamped to the bank size. Products in float32 on the bank's device,
    `chunk_size` queries against `bank_chunk_size` bank rows (None: all) at a time; the normalised bank is stored
    as `bank_dtype`.
    """
    _check_features(bank, "bank")
    _check_features(queries, "queries")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"feature dimensions differ: bank {bank.shape[1]}, queries {queries.shape[1]}")
    if bank.shape[0] == 0:
        raise ValueError("bank: empty")
    if k < 1 or chunk_size < 1 or (bank_chunk_size is not None and bank_chunk_size < 1):
        raise ValueError(f"k and chunk sizes must be >= 1; got k={k}, chunk_size={chunk_size}, {bank_chunk_size=}")
    k = min(k, bank.shape[0])
    bank = normalised_bank(bank, bank_dtype)
    similarities, indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        sim, idx = _chunk_topk(bank, queries[start : start + chunk_size], k, bank_chunk_size)
        similarities.append(sim)
        indices.append(idx + index_offset)
    if not similarities:
        return bank.new_empty(0, k, dtype=torch.float32), torch.empty(0, k, dtype=torch.long, device=bank.device)
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
    bank_chunk_size: int | None = None,
    bank_dtype: torch.dtype = torch.float32,
) -> dict[int, Tensor]:
    """Predicted labels (int64, on the training features' device) of every test feature, per k in `ks`
    (`bank_chunk_size`, `bank_dtype`: see the module docstring).

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
    if chunk_size < 1 or (bank_chunk_size is not None and bank_chunk_size < 1):
        raise ValueError(f"chunk sizes: must be >= 1; got chunk_size={chunk_size}, {bank_chunk_size=}")
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
    bank = normalised_bank(train_features, bank_dtype)
    ascending = sorted(set(ks))
    kmax = min(ascending[-1], bank.shape[0])
    predictions: dict[int, list[Tensor]] = {k: [] for k in ascending}
    for start in range(0, test_features.shape[0], chunk_size):
        sim, idx = _chunk_topk(bank, test_features[start : start + chunk_size], kmax, bank_chunk_size)
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
    bank_chunk_size: int | None = None,
    bank_dtype: torch.dtype = torch.float32,
) -> dict[int, float]:
    """Top-1 accuracy (a fraction in [0, 1]) of the weighted k-NN classifier, per k in `ks`."""
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"test_labels: expected shape ({test_features.shape[0]},); got {tuple(test_labels.shape)}")
    if test_features.shape[0] == 0:
        raise ValueError("test_features: empty")
    predictions = knn_predict(
        train_features,
        train_labels,
        test_features,
        num_classes,
        ks,
        temperature,
        chunk_size,
        bank_chunk_size,
        bank_dtype,
    )
    target = test_labels.to(device=train_features.device, dtype=torch.long)
    return {k: (pred == target).float().mean().item() for k, pred in predictions.items()}
