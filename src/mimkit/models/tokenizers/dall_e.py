"""The DALL-E dVAE (Ramesh et al., 2021) as a frozen tokenizer: the visual tokenizer of the CIM paper.

CIM's generator predicts dVAE tokens of the masked patches and the dVAE decoder renders its samples into the
corrupted image that the enhancer sees. One token covers 8 x 8 pixels, so a 224-pixel image with 16-pixel patches
is resized to 112 pixels (14 x 14 tokens) at the tokenizer's input.

The architecture is written out here with the parameter names of the published `encoder.pkl` and `decoder.pkl`.
Those files are whole pickled modules whose classes live in the `dall_e` package, which mimkit never imports:
`read_dall_e_file` takes their tensors out without running any pickled code (every class outside a short
allow-list of torch's tensor rebuilders is replaced by an inert stand-in), so no file can execute code here.
"""

from __future__ import annotations

import copyreg
import math
import pickle
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.config import ConfigError, check, short_reason
from mimkit.models.tokenizers.base import Status, Tokenizer, TokenizerConfig
from mimkit.models.tokenizers.registry import register_tokenizer

EPS = 0.1
"""The dVAE works on pixels squeezed into [EPS, 1 - EPS] (its logit-Laplace likelihood is undefined at 0 and 1)."""

FIX = (
    "download encoder.pkl and decoder.pkl of the DALL-E dVAE yourself and give their paths; "
    "mimkit never downloads weights"
)


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [EPS, 1 - EPS], the encoder's input range."""
    return (1 - 2 * EPS) * x + EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `map_pixels`, clamped to [0, 1]."""
    return ((x - EPS) / (1 - 2 * EPS)).clamp(0, 1)


class Conv(nn.Module):
    """A conv of weight `w` (n_out, n_in, k, k) and bias `b` (n_out,), padded to keep the size ((k - 1) // 2)."""

    def __init__(self, n_in: int, n_out: int, kernel: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kernel, kernel) / math.sqrt(n_in * kernel**2))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class Block(nn.Module):
    """A residual block: id_path(x) + res_path(x) / n_layers**2, its res_path four ReLU + conv pairs through a
    bottleneck of n_out // 4 channels (kernels 3, 3, 3, 1 in the encoder; 1, 3, 3, 3 in the decoder)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]) -> None:
        super().__init__()
        hidden = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, hidden, hidden, hidden, n_out]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, kernel in enumerate(kernels, 1):
            layers[f"relu_{i}"] = nn.ReLU()
            layers[f"conv_{i}"] = Conv(widths[i - 1], widths[i], kernel)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _groups(
    widths: list[int],
    n_first: int,
    n_blk_per_group: int,
    kernels: tuple[int, int, int, int],
    resize: tuple[str, Callable[[], nn.Module]],
) -> OrderedDict[str, nn.Module]:
    """`group_1`... of `n_blk_per_group` blocks each, of the given widths (the first block takes `n_first`
    channels); every group but the last ends in the named `resize` (a pool or an upsample)."""
    n_layers = len(widths) * n_blk_per_group
    groups: OrderedDict[str, nn.Module] = OrderedDict()
    n_in = n_first
    for g, width in enumerate(widths, 1):
        group: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(1, n_blk_per_group + 1):
            group[f"block_{i}"] = Block(n_in, width, n_layers, kernels)
            n_in = width
        if g < len(widths):
            group[resize[0]] = resize[1]()
        groups[f"group_{g}"] = nn.Sequential(group)
    return groups


class DallEEncoder(nn.Module):
    """(B, channels, H, W) mapped pixels -> (B, vocab_size, H / p, W / p) logits, p = 2**(group_count - 1)."""

    def __init__(self, vocab_size: int, n_hid: int, n_blk_per_group: int, group_count: int, channels: int) -> None:
        super().__init__()
        widths = [2**g * n_hid for g in range(group_count)]
        blocks: OrderedDict[str, nn.Module] = OrderedDict(input=Conv(channels, n_hid, 7))
        blocks.update(_groups(widths, n_hid, n_blk_per_group, (3, 3, 3, 1), ("pool", lambda: nn.MaxPool2d(2))))
        blocks["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv(widths[-1], vocab_size, 1)))
        self.blocks = nn.Sequential(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class DallEDecoder(nn.Module):
    """(B, h, w) token ids -> (B, 2 * channels, h * p, w * p) statistics, the first `channels` the pixel logits.

    Its `input` conv (kernel 1 over the one-hot tokens) is computed as a lookup of its weight columns: the same
    numbers, without a (B, vocab_size, h, w) one-hot in memory."""

    def __init__(
        self, vocab_size: int, n_hid: int, n_init: int, n_blk_per_group: int, group_count: int, channels: int
    ) -> None:
        super().__init__()
        widths = [2**g * n_hid for g in reversed(range(group_count))]
        blocks: OrderedDict[str, nn.Module] = OrderedDict(input=Conv(vocab_size, n_init, 1))
        upsample = ("upsample", lambda: nn.Upsample(scale_factor=2, mode="nearest"))
        blocks.update(_groups(widths, n_init, n_blk_per_group, (1, 3, 3, 3), upsample))
        blocks["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv(n_hid, 2 * channels, 1)))
        self.blocks = nn.Sequential(blocks)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        conv = self.blocks.input
        x = F.embedding(tokens, conv.w[:, :, 0, 0].T).permute(0, 3, 1, 2).contiguous() + conv.b[:, None, None]
        return self.blocks[1:](x)


@dataclass
class DallEConfig(TokenizerConfig):
    """The dVAE's files; its widths, vocabulary and patch come from their tensors."""

    kind: str = "dall-e"
    encoder_file: str | None = None
    """The dVAE's encoder.pkl (or a state dict of it), downloaded by you; mimkit never downloads."""
    decoder_file: str | None = None
    """The dVAE's decoder.pkl."""

    def validate(self, prefix: str = "tokenizer") -> None:
        super().validate(prefix)
        check(
            bool(self.encoder_file and self.decoder_file),
            f"{prefix}.encoder_file",
            "dall-e needs tokenizer.encoder_file and tokenizer.decoder_file: the dVAE's encoder.pkl and "
            "decoder.pkl, downloaded by you (mimkit never downloads weights)",
        )


@register_tokenizer
class DallETokenizer(Tokenizer):
    """The DALL-E dVAE; its defaults are the published one's widths (8192 tokens of 8 x 8 RGB pixels)."""

    kind = "dall-e"
    Config = DallEConfig

    def __init__(
        self,
        vocab_size: int = 8192,
        n_hid: int = 256,
        n_init: int = 128,
        n_blk_per_group: int = 2,
        group_count: int = 4,
        channels: int = 3,
    ) -> None:
        super().__init__()
        self.vocab_size, self.channels = vocab_size, channels
        self.n_hid, self.n_init, self.n_blk_per_group, self.group_count = n_hid, n_init, n_blk_per_group, group_count
        self.patch_size = 2 ** (group_count - 1)
        self.encoder = DallEEncoder(vocab_size, n_hid, n_blk_per_group, group_count, channels)
        self.decoder = DallEDecoder(vocab_size, n_hid, n_init, n_blk_per_group, group_count, channels)

    @classmethod
    def build(cls, cfg: TokenizerConfig, channels: int) -> DallETokenizer:
        """The dVAE of the recipe's files, which must take the data's channels."""
        assert isinstance(cfg, DallEConfig)
        tokenizer = dall_e_from_files(cfg.encoder_file or "", cfg.decoder_file or "", "tokenizer")
        if tokenizer.channels != channels:
            raise ConfigError(
                f"tokenizer: the dVAE takes {tokenizer.channels}-channel images; the data has {channels} "
                f"(set data.channels={tokenizer.channels})"
            )
        return tokenizer

    def fit(
        self, cfg: TokenizerConfig, batches: Iterable[torch.Tensor], generator: torch.Generator, status: Status
    ) -> None:
        """Imported whole from its files: nothing to fit (the batches are never read)."""

    def config(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "n_hid": self.n_hid,
            "n_init": self.n_init,
            "n_blk_per_group": self.n_blk_per_group,
            "group_count": self.group_count,
            "channels": self.channels,
        }

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.encoder(map_pixels(images.to(self.encoder.blocks.input.w.dtype))).argmax(1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        stats = self.decoder(tokens)
        return unmap_pixels(torch.sigmoid(stats[:, : self.channels].float()))


# ---------------------------------------------------------------------------------------------------
# Reading the published files


class _Inert:
    """Stands in for every class or function outside the allow-list: takes any arguments and any state and runs
    nothing; a pickled module becomes one whose `__dict__` holds its state (`_parameters`, `_modules`...)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        for part in state if isinstance(state, tuple) else (state,):  # a dict, or (dict, slots dict)
            if isinstance(part, dict):
                self.__dict__.update(part)


_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter")
_ALLOWED: dict[tuple[str, str], Any] = {
    **{("torch._utils", name): getattr(torch._utils, name) for name in _REBUILDERS},
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): OrderedDict,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
}
"""All that a DALL-E file may name and get: torch's tensor rebuilders, dtypes, sizes, devices, ordered dicts."""


class _InertUnpickler(pickle.Unpickler):
    """Resolves the allow-listed names only; any other name becomes a new `_Inert` subclass. (torch.load
    subclasses it and resolves storage names to its own inert `StorageType` before asking this.)"""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        return type(str(name), (_Inert,), {"__module__": str(module)})


def _inert_load(file: Any, **kwargs: Any) -> Any:
    return _InertUnpickler(file, **kwargs).load()


_INERT_PICKLE = types.ModuleType("mimkit_inert_pickle")
"""The `pickle_module` given to torch.load: its `Unpickler` reads zip files, its `load` pre-1.6 ones."""
_INERT_PICKLE.Unpickler = _InertUnpickler  # type: ignore[attr-defined]
_INERT_PICKLE.load = _inert_load  # type: ignore[attr-defined]


def _module_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    """The tensors of a stubbed module tree, under their dotted state-dict names."""
    state = getattr(obj, "__dict__", None)
    if id(obj) in seen or not isinstance(state, dict):
        return
    seen.add(id(obj))
    for group in ("_parameters", "_buffers"):
        tensors = state.get(group)
        if isinstance(tensors, Mapping):
            out.update({prefix + k: v.detach() for k, v in tensors.items() if isinstance(v, torch.Tensor)})
    children = state.get("_modules")
    if isinstance(children, Mapping):
        for name, child in children.items():
            _module_tensors(child, f"{prefix}{name}.", out, seen)


def read_dall_e_file(path: str | Path, field_name: str = "tokenizer", role: str = "encoder") -> dict[str, torch.Tensor]:
    """The `{name: tensor}` state of a DALL-E dVAE file, a whole pickled module (as published) or a state dict,
    read without running pickled code; `role` ("encoder" or "decoder") words the errors."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{field_name}: {role} file {file} does not exist; {FIX}")
    try:
        with warnings.catch_warnings():  # pre-1.6 files: torch finds no source of the stubs to compare with
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            loaded = torch.load(file, map_location="cpu", weights_only=False, pickle_module=_INERT_PICKLE)
    except Exception as error:  # zip, pickle and torch errors alike: the file is not a torch file
        raise ConfigError(
            f"{field_name}: {role} file {file} is not a torch file ({short_reason(error)}); {FIX}"
        ) from None
    if isinstance(loaded, Mapping):
        return {str(k): v.detach() for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    state: dict[str, torch.Tensor] = {}
    _module_tensors(loaded, "", state, set())
    return state


def _input_shape(state: dict[str, torch.Tensor], file: Path, field_name: str, role: str, kernel: int) -> torch.Size:
    """The shape of the `input` conv of a DALL-E dVAE `role` state (kernel 7 in the encoder, 1 in the decoder)."""
    for key in ("blocks.input.w", "blocks.group_1.block_1.res_path.conv_1.w", "blocks.output.conv.w"):
        if key not in state:
            raise ConfigError(
                f"{field_name}: {role} file {file} has no tensor {key}: it is no DALL-E dVAE {role}; {FIX}"
            )
    shape = state["blocks.input.w"].shape
    if len(shape) != 4 or shape[-2:] != (kernel, kernel):
        other = "decoder" if role == "encoder" else "encoder"
        raise ConfigError(
            f"{field_name}: {role} file {file}: blocks.input.w has shape {tuple(shape)}, a {role}'s is "
            f"(width, channels, {kernel}, {kernel}); is it the {other} file? {FIX}"
        )
    return shape


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many of `prefix`1, `prefix`2... (in order) name modules of `state`."""
    n = 0
    while any(k.startswith(f"{prefix}{n + 1}.") for k in state):
        n += 1
    return n


def _check_layout(module: nn.Module, state: dict[str, torch.Tensor], file: Path, field_name: str, role: str) -> None:
    """A ConfigError naming the first missing tensor, wrong shape or unexpected tensor of `state`."""
    own = module.state_dict()
    where = f"{field_name}: {role} file {file} does not match the DALL-E dVAE {role} layout"
    missing = [k for k in own if k not in state]
    if missing:
        raise ConfigError(f"{where}: {len(missing)} missing tensors, e.g. {missing[0]}; {FIX}")
    for key, value in own.items():
        if state[key].shape != value.shape:
            raise ConfigError(
                f"{where}: {key} has shape {tuple(state[key].shape)}, the layout needs {tuple(value.shape)}; {FIX}"
            )
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ConfigError(f"{where}: {len(unexpected)} unexpected tensors, e.g. {unexpected[0]}; {FIX}")


def dall_e_from_files(
    encoder_path: str | Path, decoder_path: str | Path, field_name: str = "tokenizer"
) -> DallETokenizer:
    """The frozen DALL-E dVAE tokenizer of the published `encoder.pkl` and `decoder.pkl` (or state dicts of the
    same layout), its widths read from the tensors' shapes."""
    files = {"encoder": Path(encoder_path).expanduser(), "decoder": Path(decoder_path).expanduser()}
    states = {role: read_dall_e_file(file, field_name, role) for role, file in files.items()}
    encoder = states["encoder"]
    n_hid, channels = _input_shape(encoder, files["encoder"], field_name, "encoder", 7)[:2]
    n_init = _input_shape(states["decoder"], files["decoder"], field_name, "decoder", 1)[0]
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        tokenizer = DallETokenizer(
            vocab_size=encoder["blocks.output.conv.w"].shape[0],
            n_hid=n_hid,
            n_init=n_init,
            n_blk_per_group=_count(encoder, "blocks.group_1.block_"),
            group_count=_count(encoder, "blocks.group_"),
            channels=channels,
        )
    for role, file in files.items():
        module = getattr(tokenizer, role)
        _check_layout(module, states[role], file, field_name, role)
        module.load_state_dict({k: v.float().contiguous() for k, v in states[role].items()}, assign=True)
    return tokenizer.requires_grad_(False).eval()
