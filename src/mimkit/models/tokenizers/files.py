"""The tokenizer file: a torch file of plain tensors and values (`kind`, `config`, `state`, `metrics`), written
atomically, read with `weights_only` (never code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mimkit.config import ConfigError, short_reason
from mimkit.models.tokenizers.base import Tokenizer
from mimkit.models.tokenizers.registry import tokenizer_class, tokenizer_kinds

FORMAT = "mimkit-tokenizer/1"


def save_tokenizer(
    tokenizer: Tokenizer,
    path: str | Path,
    metrics: dict[str, float] | None = None,
    fitted_on: dict[str, Any] | None = None,
) -> Path:
    """Write the tokenizer file atomically (a temporary file renamed into place: never a half-written file), with
    the data it was `fitted_on` (source, folder, split, image count), so a refit on other data can say what it
    replaces."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items() if isinstance(v, torch.Tensor)}
    payload = {
        "format": FORMAT,
        "kind": tokenizer.kind,
        "config": tokenizer.config(),
        "state": state,
        "metrics": dict(metrics or {}),
        "fitted_on": dict(fitted_on or {}),
    }
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    partial.replace(path)
    return path


def read_tokenizer_file(path: str | Path, field_name: str = "method.tokenizer") -> dict[str, Any]:
    """The payload of a tokenizer file (`FORMAT`), or a ConfigError on `field_name` saying how to make one."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{field_name}: tokenizer file {file} does not exist")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, pickle and torch errors alike: the file is not a tokenizer file
        raise ConfigError(f"{field_name}: {file} is not a mimkit tokenizer file ({short_reason(error)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(
            f"{field_name}: {file} is not a mimkit tokenizer file; make one with "
            "mimkit tokenizer fit -c tokenizers/<name>"
        )
    return payload


def load_tokenizer(path: str | Path, field_name: str = "method.tokenizer") -> tuple[Tokenizer, dict[str, float]]:
    """The frozen tokenizer of a file and the metrics it was saved with (PSNR, codebook usage)."""
    payload = read_tokenizer_file(path, field_name)
    if payload.get("kind") not in tokenizer_kinds():
        raise ConfigError(
            f"{field_name}: {path} holds an unknown tokenizer kind {payload.get('kind')!r}; the registered kinds are "
            f"{', '.join(tokenizer_kinds())}"
        )
    tokenizer = tokenizer_class(payload["kind"])(**payload["config"])
    tokenizer.load_state_dict(payload["state"])
    tokenizer.requires_grad_(False).eval()
    return tokenizer, payload["metrics"]
