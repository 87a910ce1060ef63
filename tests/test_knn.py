"""Weighted k-NN: agreement with a brute-force reference, sharded banks, toy accuracy, edge cases."""

from __future__ import annotations

import itertools

import pytest
import torch

from mimkit.eval.knn import knn_accuracy, knn_predict, merge_topk, topk_neighbours

NUM_CLASSES = 7


def _random_problem(seed: int, n_train: int = 300, n_test: int = 77, dim: int = 24) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n_train,), generator=g)
    test = torch.randn(n_test, dim, generator=g)
    return train, labels, test


def _reference_predict(
    train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, k: int, temperature: float
) -> torch.Tensor:
    """Full similarity matrix in float64, a full sort, and an explicit vote loop per query."""
    train = train.double() / train.double().norm(dim=1, keepdim=True)
    test = test.double() / test.double().norm(dim=1, keepdim=True)
    sim = test @ train.T
    k = min(k, train.shape[0])
    predictions = []
    for row in sim:
        order = row.argsort(descending=True)[:k]
        votes = torch.zeros(NUM_CLASSES, dtype=torch.float64)
        for j in order.tolist():
            votes[labels[j]] += torch.exp(row[j] / temperature)
        predictions.append(int(votes.argmax()))
    return torch.tensor(predictions)


@pytest.mark.parametrize("temperature", [0.07, 0.5, 0.01])
@pytest.mark.parametrize("chunk_size", [1, 13, 32, 512])
def test_predictions_match_brute_force(temperature: float, chunk_size: int) -> None:
    train, labels, test = _random_problem(seed=int(temperature * 1000) + chunk_size)
    ks = (1, 5, 20, 100)
    got = knn_predict(train, labels, test, NUM_CLASSES, ks=ks, temperature=temperature, chunk_size=chunk_size)
    for k in ks:
        torch.testing.assert_close(got[k], _reference_predict(train, labels, test, k, temperature), rtol=0, atol=0)


@pytest.mark.parametrize("bank_chunk_size", [1, 10, 64, 299])
def test_a_bank_in_chunks_gives_the_whole_banks_predictions(bank_chunk_size: int) -> None:
    train, labels, test = _random_problem(seed=11)
    ks = (1, 5, 20, 100)
    got = knn_predict(train, labels, test, NUM_CLASSES, ks=ks, chunk_size=32, bank_chunk_size=bank_chunk_size)
    for k in ks:
        torch.testing.assert_close(got[k], _reference_predict(train, labels, test, k, 0.07), rtol=0, atol=0)


def test_a_float16_bank_keeps_the_neighbours_up_to_its_rounding() -> None:
    train, labels, test = _random_problem(seed=12, n_train=2000, n_test=200, dim=64)
    sim32, idx32 = topk_neighbours(train, test, k=20)
    sim16, idx16 = topk_neighbours(train, test, k=20, bank_dtype=torch.float16, bank_chunk_size=300)
    assert (sim16 - sim32).abs().max() < 2e-3  # float16 rounds a unit vector's entries by ~5e-4 relative
    assert (idx16 == idx32).float().mean() > 0.97  # only near-ties swap places
    votes32 = knn_predict(train, labels, test, NUM_CLASSES, ks=(20,))[20]
    votes16 = knn_predict(train, labels, test, NUM_CLASSES, ks=(20,), bank_dtype=torch.float16)[20]
    assert (votes16 == votes32).float().mean() > 0.97


@pytest.mark.parametrize("chunk_size", [7, 100])
def test_topk_neighbours_match_full_sort(chunk_size: int) -> None:
    train, _, test = _random_problem(seed=3)
    sim, idx = topk_neighbours(train, test.half(), k=15, chunk_size=chunk_size)
    full = torch.nn.functional.normalize(test.half().float(), dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    ref_sim, ref_idx = full.sort(dim=1, descending=True)
    torch.testing.assert_close(idx, ref_idx[:, :15], rtol=0, atol=0)
    torch.testing.assert_close(sim, ref_sim[:, :15])


def test_sharded_bank_merges_to_single_bank_result() -> None:
    train, _, test = _random_problem(seed=4, n_train=301)
    k = 40
    single_sim, single_idx = topk_neighbours(train, test, k, chunk_size=16)
    bounds = [0, 90, 200, 301]  # uneven shards; the middle one alone is larger than k
    shards = [
        topk_neighbours(train[a:b], test, k, chunk_size=16, index_offset=a) for a, b in itertools.pairwise(bounds)
    ]
    merged_sim, merged_idx = merge_topk([s for s, _ in shards], [i for _, i in shards], k)
    torch.testing.assert_close(merged_idx, single_idx, rtol=0, atol=0)
    torch.testing.assert_close(merged_sim, single_sim)  # a shard's matmul may round differently


def test_clustered_problem_is_solved() -> None:
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(NUM_CLASSES, 32, generator=g) * 5

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        return centres[y] + torch.randn(n, 32, generator=g), y

    (train, train_y), (test, test_y) = sample(700), sample(300)
    accuracy = knn_accuracy(train, train_y, test.double(), test_y, NUM_CLASSES, ks=(10, 20))
    assert all(a >= 0.99 for a in accuracy.values()), accuracy


def test_k_larger_than_bank_uses_whole_bank() -> None:
    train, labels, test = _random_problem(seed=6, n_train=30, n_test=9)
    got = knn_predict(train, labels, test, NUM_CLASSES, ks=(20, 30, 500), chunk_size=4)
    assert list(got) == [20, 30, 500]
    torch.testing.assert_close(got[500], got[30], rtol=0, atol=0)
    torch.testing.assert_close(got[500], _reference_predict(train, labels, test, 500, 0.07), rtol=0, atol=0)
    sim, idx = topk_neighbours(train, test, k=500)
    assert sim.shape == idx.shape == (9, 30)


def test_accuracy_keys_are_the_requested_ks() -> None:
    train, labels, test = _random_problem(seed=7)
    test_labels = torch.randint(0, NUM_CLASSES, (test.shape[0],))
    accuracy = knn_accuracy(train, labels, test, test_labels, NUM_CLASSES, ks=(200, 10, 20))
    assert list(accuracy) == [200, 10, 20]
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())


def test_rejects_bad_input() -> None:
    train, labels, test = _random_problem(seed=8)
    with pytest.raises(ValueError, match="ks"):
        knn_predict(train, labels, test, NUM_CLASSES, ks=())
    with pytest.raises(ValueError, match="dimensions"):
        knn_predict(train, labels, test[:, :5], NUM_CLASSES)
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(train, labels, test, num_classes=3)
    with pytest.raises(ValueError, match="chunk sizes"):
        knn_predict(train, labels, test, NUM_CLASSES, bank_chunk_size=0)
    with pytest.raises(ValueError, match="bank_dtype"):
        knn_predict(train, labels, test, NUM_CLASSES, bank_dtype=torch.int8)
