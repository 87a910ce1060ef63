"""CIM's corruption part: tokens of normalised images at the tokenizer's side and channels, replacements drawn per
image with its own seed, renderings back in the networks' normalisation, and the corrupted grid."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from mimkit.corruption import Corrupter, Sampling, match_channels, resize
from mimkit.models.tokenizers.dall_e import DallETokenizer
from mimkit.models.tokenizers.kmeans import KMeansTokenizer

LEVELS = 8
MEAN, STD = 0.5, 0.25


def corrupter(
    tokenizer_channels: int = 1, data_channels: int = 1, sampling: Sampling = "sample", temperature: float = 1.0
) -> Corrupter:
    """A 4 x 4 token grid over a tokenizer of 2-pixel patches (8-pixel images) whose codes are flat patches of
    LEVELS gray levels from 0 to 1: a constant image at level k is token k everywhere."""
    tokenizer = KMeansTokenizer(vocab_size=LEVELS, patch_size=2, channels=tokenizer_channels)
    tokenizer.centroids.copy_(torch.linspace(0, 1, LEVELS)[:, None].expand(-1, 4 * tokenizer_channels))
    return Corrupter(tokenizer, (4, 4), [MEAN] * data_channels, [STD] * data_channels, sampling, temperature)


def constant_images(levels: list[int], channels: int = 1, size: int = 28) -> torch.Tensor:
    """Normalised images, image b a constant gray at code `levels[b]`."""
    pixels = torch.tensor(levels, dtype=torch.float) / (LEVELS - 1)
    return ((pixels[:, None, None, None] - MEAN) / STD).expand(-1, channels, size, size).contiguous()


def test_tokens_are_those_of_the_images_pixels_at_the_tokenizers_side() -> None:
    part = corrupter()
    images = constant_images([0, 3, 7])
    tokens = part.tokenize(images)
    assert tokens.shape == (3, 4, 4) and part.tokenizer_size == (8, 8)
    assert torch.equal(tokens, torch.tensor([0, 3, 7])[:, None, None].expand(-1, 4, 4))
    textured = torch.randn(2, 1, 28, 28)
    pixels = F.interpolate((textured * STD + MEAN).clamp(0, 1), size=(8, 8), mode="bilinear", antialias=True)
    assert torch.equal(part.tokenize(textured), part.tokenizer.encode(pixels))


def test_channels_are_matched_to_the_tokenizer() -> None:
    gray_to_rgb = corrupter(tokenizer_channels=3, data_channels=1)
    assert torch.equal(gray_to_rgb.tokenize(constant_images([5])), torch.full((1, 4, 4), 5))
    rgb_to_gray = corrupter(tokenizer_channels=1, data_channels=3)
    rgb = torch.cat([constant_images([level]) for level in (1, 2, 6)], 1)  # channel mean: level 3
    assert torch.equal(rgb_to_gray.tokenize(rgb), torch.full((1, 4, 4), 3))
    gray = torch.rand(1, 1, 2, 2)
    assert torch.equal(match_channels(gray, 3), gray.expand(-1, 3, -1, -1)) and match_channels(gray, 1) is gray


def test_images_already_at_the_size_are_not_resampled() -> None:
    images = torch.rand(2, 1, 8, 6)
    assert resize(images, (8, 6)) is images
    assert resize(images, (4, 3)).shape == (2, 1, 4, 3)


def test_rendering_returns_to_the_networks_size_channels_and_normalisation() -> None:
    part = corrupter(tokenizer_channels=1, data_channels=3)
    images = constant_images([2, 6], channels=3).to(torch.float64)
    rendered = part.render(part.tokenize(images), images)
    assert rendered.shape == images.shape and rendered.dtype == torch.float64
    torch.testing.assert_close(rendered, images.float(), check_dtype=False)


def test_samples_are_drawn_image_by_image_with_each_images_seed() -> None:
    part = corrupter(temperature=0.7)
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, 0, :3] = True
    masks[2, 1:3, 1:3] = True  # image 1 has no masked token
    logits = torch.randn(int(masks.sum()), LEVELS)
    seeds = torch.tensor([11, 12, 13])
    expected = []
    for rows, seed in zip(logits.split([3, 0, 4]), (11, 12, 13), strict=True):
        if len(rows):
            generator = torch.Generator().manual_seed(seed)
            expected.append(torch.multinomial(F.softmax(rows / 0.7, -1), 1, generator=generator).squeeze(-1))
    assert torch.equal(part.sample(logits, masks, seeds), torch.cat(expected))
    alone = part.sample(logits[3:], masks[2:], seeds[2:])  # the last image in a batch of its own
    assert torch.equal(alone, part.sample(logits, masks, seeds)[3:])
    assert torch.equal(corrupter(sampling="argmax").sample(logits, masks, seeds), logits.argmax(-1))


def test_the_corrupted_grid_keeps_unmasked_tokens_and_is_rendered_whole() -> None:
    part = corrupter(sampling="argmax")
    images = constant_images([0, 4])
    tokens = part.tokenize(images)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, 1, 1:3] = True
    logits = torch.full((4, LEVELS), -5.0, requires_grad=True)
    chosen = torch.tensor([4, 1, 7, 4])  # image 1's first draw is its own token: masked but not replaced
    logits.data[torch.arange(4), chosen] = 5.0
    corruption = part.corrupt(tokens, masks, logits, torch.tensor([0, 1]), images)
    assert torch.equal(corruption.corrupted_tokens[~masks], tokens[~masks])
    assert torch.equal(corruption.corrupted_tokens[masks], chosen)
    assert torch.equal(corruption.replaced, masks & (corruption.corrupted_tokens != tokens))
    assert corruption.replaced.sum() == 3
    torch.testing.assert_close(corruption.images, part.render(corruption.corrupted_tokens, images))
    assert corruption.logits is logits and not corruption.images.requires_grad


def test_the_tokenizer_is_frozen_and_stays_in_eval_mode() -> None:
    part = corrupter().train()
    assert part.training and not part.tokenizer.training
    assert not any(p.requires_grad for p in part.parameters())
    # the normalisation is the data's; the tokenizer's kind and arguments travel with its weights
    assert set(part.state_dict()) == {"tokenizer.centroids", "tokenizer.counts", "tokenizer._extra_state"}
    assert part.state_dict()["tokenizer._extra_state"] == {"kind": "kmeans", "config": part.tokenizer.config()}


def test_a_cold_softmax_samples_the_argmax() -> None:
    masks = torch.ones(2, 4, 4, dtype=torch.bool)
    logits = torch.randn(32, LEVELS) * 3
    sampled = corrupter(temperature=1e-4).sample(logits, masks, torch.tensor([0, 1]))
    assert torch.equal(sampled, logits.argmax(-1))


def test_under_a_bf16_autocast_the_dall_e_tokens_and_images_are_those_of_float32() -> None:
    """The tokenizer runs with autocast off: on a random-weight dVAE of the published layout (8192 tokens, widths
    256-2048), the tokens and the rendered images of a bf16-mixed step are the float32 ones; the same encoder
    under the autocast (the control) gives other tokens."""
    torch.manual_seed(0)
    tokenizer = DallETokenizer()
    corrupter = Corrupter(tokenizer, (14, 14), (0.5,) * 3, (0.25,) * 3)
    images = torch.randn(1, 3, 224, 224)
    tokens = corrupter.tokenize(images)
    rendered = corrupter.render(tokens, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(corrupter.tokenize(images), tokens)
        assert torch.equal(corrupter.render(tokens, images), rendered)
        pixels = resize((images * 0.25 + 0.5).clamp(0, 1), (112, 112))
        assert (tokenizer.encode(pixels) != tokens).float().mean() > 0.01
