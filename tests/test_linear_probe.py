"""Linear-probe sweep: learns separable blobs, picks the right lr, heads train independently, reporting."""

from __future__ import annotations

import pytest
import torch

from mimkit.eval.linear import LinearProbeSweep, ProbeResult, train_linear_probes

ABSURD_LRS = (1e-8, 1e-7)
LRS = (*ABSURD_LRS, 0.01, 0.1, 1.0)


def _blobs(n: int, seed: int, dim: int = 16, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs, shifted and scaled away from zero mean / unit variance so that standardisation matters."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return 50 + 10 * (centres[y] + torch.randn(n, dim, generator=g)), y


@pytest.fixture(scope="module")
def blobs() -> dict[str, torch.Tensor]:
    (train_x, train_y), (test_x, test_y), (val_x, val_y) = _blobs(800, 1), _blobs(400, 2), _blobs(400, 3)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "val_x": val_x, "val_y": val_y}


@pytest.fixture(scope="module")
def result(blobs: dict[str, torch.Tensor]) -> ProbeResult:
    return train_linear_probes(
        blobs["train_x"], blobs["train_y"], blobs["test_x"], blobs["test_y"], 4, lrs=LRS, epochs=10, batch_size=64
    )


def test_sweep_learns_and_picks_a_working_lr(result: ProbeResult) -> None:
    assert result.best_top1 > 0.95
    assert result.best_lr not in ABSURD_LRS
    assert result.best_lr == LRS[max(range(len(LRS)), key=result.top1.__getitem__)]
    assert result.best_top1 == max(result.top1)
    for lr in ABSURD_LRS:
        assert result.top1[LRS.index(lr)] < result.best_top1 - 0.2


def test_head_in_sweep_equals_head_trained_alone(blobs: dict[str, torch.Tensor], result: ProbeResult) -> None:
    alone = train_linear_probes(
        blobs["train_x"], blobs["train_y"], blobs["test_x"], blobs["test_y"], 4, lrs=(0.1,), epochs=10, batch_size=64
    )
    assert result.probe is not None and alone.probe is not None
    h = LRS.index(0.1)
    torch.testing.assert_close(result.probe.weight[h], alone.probe.weight[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.probe.bias[h], alone.probe.bias[0], rtol=1e-5, atol=1e-6)
    assert alone.top1[0] == pytest.approx(result.top1[h], abs=1 / 400)


def test_sweep_step_matches_torch_sgd_per_head(blobs: dict[str, torch.Tensor]) -> None:
    """Each head follows torch.optim.SGD (momentum 0.9, weight decay on the weight only, cosine lr)."""
    x, y = blobs["train_x"][:64], blobs["train_y"][:64]
    lrs, epochs = (0.3, 0.05), 3
    result = train_linear_probes(x, y, x, y, 4, lrs=lrs, epochs=epochs, batch_size=64, weight_decay=0.01, seed=5)
    for h, lr in enumerate(lrs):
        probe = LinearProbeSweep(16, 4, 1, generator=torch.Generator().manual_seed(5))
        probe.standardise_with(x)
        optimizer = torch.optim.SGD(
            [{"params": [probe.weight], "weight_decay": 0.01}, {"params": [probe.bias], "weight_decay": 0.0}],
            lr=lr,
            momentum=0.9,
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        for _ in range(epochs):  # one full batch per epoch, so shuffling does not matter
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(probe(x)[0], y).backward()
            optimizer.step()
            schedule.step()
        assert result.probe is not None
        torch.testing.assert_close(result.probe.weight[h], probe.weight[0].detach(), rtol=1e-5, atol=1e-6)


def test_validation_split_selects_the_lr(blobs: dict[str, torch.Tensor]) -> None:
    result = train_linear_probes(**blobs, num_classes=4, lrs=LRS, epochs=3, batch_size=64)
    assert result.val_top1 is not None and len(result.val_top1) == len(LRS)
    best = max(range(len(LRS)), key=lambda i: (result.val_top1[i], -i))
    assert result.best_lr == LRS[best]
    assert result.best_top1 == result.top1[best]
    assert "val top-1" in result.to_markdown()


def test_markdown_has_one_row_per_lr(result: ProbeResult) -> None:
    rows = [line for line in result.to_markdown().splitlines() if line.startswith("|")][2:]
    assert len(rows) == len(LRS)
    assert sum("**" in row for row in rows) == 1
    assert f"**{result.best_lr:g}**" in result.to_markdown()


def test_top5_at_least_top1(result: ProbeResult) -> None:
    assert all(t5 >= t1 for t1, t5 in zip(result.top1, result.top5, strict=True))
    assert all(t5 == 1.0 for t5 in result.top5)  # 4 classes: every class is in the top 5


def test_deterministic_given_seed(blobs: dict[str, torch.Tensor]) -> None:
    args = (blobs["train_x"][:200], blobs["train_y"][:200], blobs["test_x"], blobs["test_y"], 4)
    a, b = (train_linear_probes(*args, lrs=(0.01, 0.1), epochs=2, batch_size=32, seed=3) for _ in range(2))
    c = train_linear_probes(*args, lrs=(0.01, 0.1), epochs=2, batch_size=32, seed=4)
    assert a.probe is not None and b.probe is not None and c.probe is not None
    assert torch.equal(a.probe.weight, b.probe.weight)
    assert not torch.equal(a.probe.weight, c.probe.weight)


def test_standardisation_uses_training_statistics(blobs: dict[str, torch.Tensor]) -> None:
    probe = LinearProbeSweep(16, 4, 2)
    probe.standardise_with(blobs["train_x"].half())
    z = (blobs["train_x"] - probe.mean) / probe.std
    torch.testing.assert_close(z.mean(0), torch.zeros(16), atol=2e-3, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(16), atol=2e-3, rtol=0)
    assert probe(blobs["train_x"][:5]).shape == (2, 5, 4)


def test_rejects_bad_input(blobs: dict[str, torch.Tensor]) -> None:
    x, y = blobs["train_x"], blobs["train_y"]
    with pytest.raises(ValueError, match="lrs"):
        train_linear_probes(x, y, x, y, 4, lrs=())
    with pytest.raises(ValueError, match="test_x"):
        train_linear_probes(x, y, x[:, :3], y, 4)
    with pytest.raises(ValueError, match="train_y"):
        train_linear_probes(x, y, x, y, 3)
    with pytest.raises(ValueError, match="val_x and val_y"):
        train_linear_probes(x, y, x, y, 4, val_x=x)
