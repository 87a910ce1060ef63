"""The DALL-E dVAE tokenizer: its layout, its outputs against a reference model, and the safe reading of its files.

The published `encoder.pkl` / `decoder.pkl` are whole modules pickled from the `dall_e` package. The tests write
tiny files of that kind: the reference classes below are put in a fake `dall_e` package while they are saved, so
the pickles name `dall_e.encoder.Encoder` and friends as the real ones do, and the package is gone when they load.
"""

from __future__ import annotations

import math
import os
import sys
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.models.tokenizers.dall_e import (
    DallEConfig,
    DallETokenizer,
    dall_e_from_files,
    map_pixels,
    read_dall_e_file,
    unmap_pixels,
)
from mimkit.models.tokenizers.files import load_tokenizer, save_tokenizer
from mimkit.procedures.tokenizer_fit import fit_tokenizer, load_tokenizer_recipe
from support import ROOT

# Tiny widths: 3 groups (4 x 4-pixel tokens), 2 blocks per group, 16 tokens.
TINY = {"group_count": 3, "n_hid": 8, "n_blk_per_group": 2, "vocab_size": 16}
N_INIT = 4
EPS = 0.1


# ---------------------------------------------------------------------------------------------------
# A reference dVAE written from the published description, with its classes' names and attributes


class Conv2d(nn.Module):
    __module__ = "dall_e.utils"

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.use_float16, self.device, self.requires_grad = False, torch.device("cpu"), False
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(0.1 * torch.randn(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class ResidualBlock(nn.Module):
    """The published blocks: id_path + res_path / n_layers**2, four ReLU + conv pairs through n_out // 4 channels;
    only the kernels differ between the encoder's blocks and the decoder's."""

    kernels: tuple[int, int, int, int]

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, kernel in enumerate(self.kernels, 1):
            layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", Conv2d(widths[i - 1], widths[i], kernel))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class EncoderBlock(ResidualBlock):
    __module__ = "dall_e.encoder"
    kernels = (3, 3, 3, 1)


class Encoder(nn.Module):
    __module__ = "dall_e.encoder"

    def __init__(self, group_count: int, n_hid: int, n_blk_per_group: int, vocab_size: int) -> None:
        super().__init__()
        self.group_count, self.n_hid, self.n_blk_per_group, self.vocab_size = (
            group_count,
            n_hid,
            n_blk_per_group,
            vocab_size,
        )
        self.input_channels, self.device, self.use_mixed_precision = 3, torch.device("cpu"), False
        n_layers = group_count * n_blk_per_group
        layers = [("input", Conv2d(3, n_hid, 7))]
        width = n_hid
        for g in range(group_count):
            group = []
            for i in range(n_blk_per_group):
                group.append((f"block_{i + 1}", EncoderBlock(width, 2**g * n_hid, n_layers)))
                width = 2**g * n_hid
            if g < group_count - 1:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        layers.append(
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(width, vocab_size, 1))])))
        )
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class DecoderBlock(ResidualBlock):
    __module__ = "dall_e.decoder"
    kernels = (1, 3, 3, 3)


class Decoder(nn.Module):
    __module__ = "dall_e.decoder"

    def __init__(self, group_count: int, n_hid: int, n_blk_per_group: int, vocab_size: int, n_init: int) -> None:
        super().__init__()
        self.group_count, self.n_hid, self.n_blk_per_group, self.vocab_size = (
            group_count,
            n_hid,
            n_blk_per_group,
            vocab_size,
        )
        self.n_init, self.output_channels, self.device = n_init, 3, torch.device("cpu")
        n_layers = group_count * n_blk_per_group
        layers = [("input", Conv2d(vocab_size, n_init, 1))]
        width = n_init
        for g in range(group_count):
            group = []
            for i in range(n_blk_per_group):
                out = 2 ** (group_count - 1 - g) * n_hid
                group.append((f"block_{i + 1}", DecoderBlock(width, out, n_layers)))
                width = out
            if g < group_count - 1:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(width, 6, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


FAKE_PACKAGE = {
    "dall_e": {},
    "dall_e.utils": {"Conv2d": Conv2d},
    "dall_e.encoder": {"Encoder": Encoder, "EncoderBlock": EncoderBlock},
    "dall_e.decoder": {"Decoder": Decoder, "DecoderBlock": DecoderBlock},
}


@contextmanager
def fake_dall_e() -> Iterator[None]:
    """The reference classes importable as `dall_e.*` (as the published pickles name them), then gone again."""
    for name, classes in FAKE_PACKAGE.items():
        module = types.ModuleType(name)
        vars(module).update(classes)
        sys.modules[name] = module
    try:
        yield
    finally:
        for name in FAKE_PACKAGE:
            del sys.modules[name]


def save_published(obj: object, path: Path, zip_format: bool = True) -> Path:
    with fake_dall_e(), warnings.catch_warnings():  # pre-1.6 files: torch finds no source of the fake package
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return path


@pytest.fixture
def reference() -> tuple[Encoder, Decoder]:
    torch.manual_seed(0)
    encoder = Encoder(TINY["group_count"], TINY["n_hid"], TINY["n_blk_per_group"], TINY["vocab_size"])
    decoder = Decoder(TINY["group_count"], TINY["n_hid"], TINY["n_blk_per_group"], TINY["vocab_size"], N_INIT)
    return encoder.eval(), decoder.eval()


@pytest.fixture
def published(tmp_path: Path, reference: tuple[Encoder, Decoder]) -> tuple[Path, Path]:
    encoder, decoder = reference
    return save_published(encoder, tmp_path / "encoder.pkl"), save_published(decoder, tmp_path / "decoder.pkl")


def images(batch: int = 2, side: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(1))


def reference_outputs(encoder: Encoder, decoder: Decoder, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Logits, tokens and reconstructions the reference way: map pixels, argmax, one-hot, sigmoid, unmap."""
    with torch.no_grad():
        logits = encoder((1 - 2 * EPS) * x + EPS)
        tokens = logits.argmax(1)
        one_hot = F.one_hot(tokens, TINY["vocab_size"]).permute(0, 3, 1, 2).float()
        stats = decoder(one_hot)
        rec = ((torch.sigmoid(stats[:, :3]) - EPS) / (1 - 2 * EPS)).clamp(0, 1)
    return logits, tokens, rec


# ---------------------------------------------------------------------------------------------------
# Layout and outputs


def test_default_widths_have_the_published_layout() -> None:
    with torch.device("meta"):
        tokenizer = DallETokenizer()
    encoder = {k: tuple(v.shape) for k, v in tokenizer.encoder.state_dict().items()}
    decoder = {k: tuple(v.shape) for k, v in tokenizer.decoder.state_dict().items()}
    assert (tokenizer.patch_size, tokenizer.vocab_size, tokenizer.channels) == (8, 8192, 3)
    assert encoder["blocks.input.w"] == (256, 3, 7, 7)
    assert "blocks.group_1.block_1.id_path.w" not in encoder
    assert encoder["blocks.group_2.block_1.id_path.w"] == (512, 256, 1, 1)
    assert encoder["blocks.group_4.block_2.res_path.conv_1.w"] == (512, 2048, 3, 3)
    assert encoder["blocks.group_4.block_2.res_path.conv_4.w"] == (2048, 512, 1, 1)
    assert encoder["blocks.output.conv.w"] == (8192, 2048, 1, 1)
    assert decoder["blocks.input.w"] == (128, 8192, 1, 1)
    assert decoder["blocks.group_1.block_1.id_path.w"] == (2048, 128, 1, 1)
    assert decoder["blocks.group_1.block_1.res_path.conv_1.w"] == (512, 128, 1, 1)
    assert decoder["blocks.group_4.block_2.res_path.conv_4.w"] == (256, 64, 3, 3)
    assert decoder["blocks.output.conv.w"] == (6, 256, 1, 1)
    assert len(encoder) == 74 and len(decoder) == 76


def test_pixel_mapping_squeezes_into_eps_and_back() -> None:
    x = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(map_pixels(x), torch.tensor([0.1, 0.3, 0.9]))
    torch.testing.assert_close(unmap_pixels(map_pixels(x)), x)
    assert torch.equal(unmap_pixels(torch.tensor([0.0, 0.05, 0.95, 1.0])), torch.tensor([0.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "pre-1.6"])
def test_published_files_load_and_match_the_reference(
    tmp_path: Path, reference: tuple[Encoder, Decoder], zip_format: bool
) -> None:
    encoder, decoder = reference
    paths = [
        save_published(m, tmp_path / f"{n}.pkl", zip_format)
        for n, m in zip(("encoder", "decoder"), reference, strict=True)
    ]
    if zip_format:  # the pickle names the dall_e package's classes, which are not importable now
        with zipfile.ZipFile(paths[0]) as archive:
            pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        assert b"dall_e.encoder" in pickled and b"dall_e.utils" in pickled
    assert "dall_e" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        torch.load(paths[0], weights_only=False)

    tokenizer = dall_e_from_files(*paths)
    assert tokenizer.config() == {**TINY, "n_init": N_INIT, "channels": 3}
    assert tokenizer.patch_size == 4 and not any(p.requires_grad for p in tokenizer.parameters())
    x = images()
    logits, tokens, rec = reference_outputs(encoder, decoder, x)
    assert tokens.unique().numel() > 1  # the comparison below is not trivial
    with torch.no_grad():
        torch.testing.assert_close(tokenizer.encoder((1 - 2 * EPS) * x + EPS), logits, rtol=0, atol=1e-6)
        ours = tokenizer.encode(x)
        assert ours.shape == (2, 4, 4) and ours.dtype == torch.long
        assert torch.equal(ours, tokens)
        decoded = tokenizer.decode(ours)
    assert decoded.shape == (2, 3, 16, 16)
    torch.testing.assert_close(decoded, rec, rtol=0, atol=1e-6)


def test_state_dict_files_load_too(tmp_path: Path, reference: tuple[Encoder, Decoder]) -> None:
    encoder, decoder = reference
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
    torch.save({k: v.half() for k, v in decoder.state_dict().items()}, tmp_path / "decoder.pt")
    tokenizer = dall_e_from_files(tmp_path / "encoder.pt", tmp_path / "decoder.pt")
    assert tokenizer.decoder.blocks.input.w.dtype == torch.float32
    torch.testing.assert_close(
        tokenizer.decoder.state_dict(), {k: v.half().float() for k, v in decoder.state_dict().items()}
    )
    assert torch.equal(tokenizer.encode(images()), reference_outputs(encoder, decoder, images())[1])


def test_images_of_the_wrong_size_are_refused(published: tuple[Path, Path]) -> None:
    tokenizer = dall_e_from_files(*published)
    with pytest.raises(ValueError, match="divisible by 4"):
        tokenizer.encode(torch.rand(1, 3, 18, 16))


def test_save_and_load_tokenizer_round_trip(tmp_path: Path, published: tuple[Path, Path]) -> None:
    tokenizer = dall_e_from_files(*published)
    loaded, metrics = load_tokenizer(save_tokenizer(tokenizer, tmp_path / "dall_e.pt", {"psnr": 20.0}))
    assert isinstance(loaded, DallETokenizer) and loaded.config() == tokenizer.config()
    assert metrics == {"psnr": 20.0}
    x = images()
    with torch.no_grad():
        tokens = tokenizer.encode(x)
        assert torch.equal(loaded.encode(x), tokens)
        assert torch.equal(loaded.decode(tokens), tokenizer.decode(tokens))


# ---------------------------------------------------------------------------------------------------
# Reading never runs pickled code


class ExecPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class SystemPayload(ExecPayload):
    def __reduce__(self) -> tuple:
        return (os.system, (f"touch '{self.marker}'",))


class SetStatePayload(ExecPayload):
    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).write_text("ran")


PAYLOADS = [ExecPayload, SystemPayload, SetStatePayload]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.__name__)
def test_pickled_code_in_a_module_never_runs(
    tmp_path: Path, reference: tuple[Encoder, Decoder], payload: type[ExecPayload]
) -> None:
    encoder, decoder = reference
    marker = tmp_path / "marker"
    encoder.payload = payload(marker)  # a plain attribute: pickled in the module's __dict__
    paths = save_published(encoder, tmp_path / "encoder.pkl"), save_published(decoder, tmp_path / "decoder.pkl")
    with fake_dall_e():  # the payload is live: an ordinary load runs it
        torch.load(paths[0], weights_only=False)
    assert marker.exists()
    marker.unlink()

    tokenizer = dall_e_from_files(*paths)
    assert not marker.exists()
    assert torch.equal(tokenizer.encode(images()), reference_outputs(encoder, decoder, images())[1])


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.__name__)
def test_a_pickled_payload_alone_is_inert_and_refused(
    tmp_path: Path, published: tuple[Path, Path], payload: type[ExecPayload]
) -> None:
    marker = tmp_path / "marker"
    torch.save(payload(marker), tmp_path / "evil.pkl")
    torch.load(tmp_path / "evil.pkl", weights_only=False)  # the payload is live: an ordinary load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ConfigError, match=r"encoder file .*evil\.pkl has no tensor blocks\.input\.w"):
        dall_e_from_files(tmp_path / "evil.pkl", published[1])
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Clear errors


def test_a_missing_file_is_a_config_error_naming_it(tmp_path: Path, published: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match=r"method\.tokenizer: encoder file .*nowhere\.pkl does not exist") as error:
        dall_e_from_files(tmp_path / "nowhere.pkl", published[1], field_name="method.tokenizer")
    assert "mimkit never downloads" in str(error.value) and "encoder.pkl and decoder.pkl" in str(error.value)
    with pytest.raises(ConfigError, match=r"decoder file .*nowhere\.pkl does not exist"):
        dall_e_from_files(published[0], tmp_path / "nowhere.pkl")


def test_a_file_that_is_no_torch_file_is_a_config_error(tmp_path: Path, published: tuple[Path, Path]) -> None:
    (tmp_path / "junk.pkl").write_bytes(b"not a torch file at all")
    with pytest.raises(ConfigError, match=r"tokenizer: decoder file .*junk\.pkl is not a torch file.*never downloads"):
        dall_e_from_files(published[0], tmp_path / "junk.pkl")


def test_swapped_files_are_named(published: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match=r"encoder file .*decoder\.pkl: blocks\.input\.w has shape .*decoder file"):
        dall_e_from_files(published[1], published[0])


def test_a_missing_tensor_is_named(tmp_path: Path, reference: tuple[Encoder, Decoder]) -> None:
    encoder, decoder = reference
    del encoder.blocks.group_2.block_2.res_path.conv_4.b
    paths = save_published(encoder, tmp_path / "encoder.pkl"), save_published(decoder, tmp_path / "decoder.pkl")
    with pytest.raises(
        ConfigError, match=r"encoder file .* missing tensors, e\.g\. blocks\.group_2\.block_2\.res_path\.conv_4\.b"
    ):
        dall_e_from_files(*paths)


def test_a_wrong_shape_is_named(tmp_path: Path, reference: tuple[Encoder, Decoder]) -> None:
    encoder, decoder = reference
    decoder.blocks.group_1.block_2.res_path.conv_3.w = nn.Parameter(torch.zeros(2, 2, 3, 3))
    paths = save_published(encoder, tmp_path / "encoder.pkl"), save_published(decoder, tmp_path / "decoder.pkl")
    with pytest.raises(
        ConfigError, match=r"decoder file .*: blocks\.group_1\.block_2\.res_path\.conv_3\.w has shape \(2, 2, 3, 3\)"
    ):
        dall_e_from_files(*paths)


def test_an_unexpected_tensor_is_named(tmp_path: Path, reference: tuple[Encoder, Decoder]) -> None:
    encoder, decoder = reference
    state = {**encoder.state_dict(), "blocks.group_1.block_1.extra.w": torch.zeros(1)}
    torch.save(state, tmp_path / "encoder.pt")
    decoder_path = save_published(decoder, tmp_path / "decoder.pkl")
    with pytest.raises(ConfigError, match=r"unexpected tensors, e\.g\. blocks\.group_1\.block_1\.extra\.w"):
        dall_e_from_files(tmp_path / "encoder.pt", decoder_path)


def test_an_encoder_and_decoder_of_different_vocabularies_are_refused(
    tmp_path: Path, reference: tuple[Encoder, Decoder]
) -> None:
    encoder, _ = reference
    decoder = Decoder(TINY["group_count"], TINY["n_hid"], TINY["n_blk_per_group"], 32, N_INIT)
    paths = save_published(encoder, tmp_path / "encoder.pkl"), save_published(decoder, tmp_path / "decoder.pkl")
    with pytest.raises(
        ConfigError,
        match=r"decoder file .*: blocks\.input\.w has shape \(4, 32, 1, 1\), the layout needs \(4, 16, 1, 1\)",
    ):
        dall_e_from_files(*paths)


def test_read_dall_e_file_gives_the_state_dict_names(
    published: tuple[Path, Path], reference: tuple[Encoder, Decoder]
) -> None:
    state = read_dall_e_file(published[0])
    expected = reference[0].state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_fit_command_imports_the_files_and_draws_them(tmp_path: Path, published: tuple[Path, Path]) -> None:
    out = tmp_path / "dall_e.pt"
    recipe = ROOT / "tests" / "tiny" / "tokenizer.yaml"
    files = [f"tokenizer.encoder_file={published[0]}", f"tokenizer.decoder_file={published[1]}"]
    gray = load_tokenizer_recipe(recipe, ["tokenizer.kind=dall-e", *files, f"output={out}"])
    assert isinstance(gray.tokenizer, DallEConfig) and gray.tokenizer.encoder_file == str(published[0])
    with pytest.raises(ConfigError, match=r"the dVAE takes 3-channel images; the data has 1 \(set data.channels=3\)"):
        fit_tokenizer(gray)
    assert (
        main(
            ["tokenizer", "fit", "-c", str(recipe), "tokenizer.kind=dall-e", *files, "data.channels=3", f"output={out}"]
        )
        == 0
    )
    assert isinstance(load_tokenizer(out)[0], DallETokenizer) and out.with_suffix(".png").is_file()
