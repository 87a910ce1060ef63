"""What a method needs to know about its data before it builds its networks."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class DataError(RuntimeError):
    """Data cannot be used as configured; the message names the file or folder and the fix."""


class UnreadableImage(Exception):
    """One image could not be decoded; the loader skips it (or fails under `data.strict`)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass(frozen=True)
class DataInfo:
    name: str
    channels: int
    num_images: int
    image_size: tuple[int, int] | None
    """Height and width shared by every image, or None when sizes vary (folders of photos)."""
    num_classes: int | None
    """None when the images carry no labels."""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain values for checkpoints (so a run can be rebuilt without its data at hand)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataInfo:
        def restore(value: Any) -> Any:
            return tuple(value) if isinstance(value, list) else value

        return cls(**{key: restore(value) for key, value in values.items()})
