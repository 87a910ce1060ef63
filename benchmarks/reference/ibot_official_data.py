"""The official iBOT data path (github.com/bytedance/ibot): its `ImageFolderMask` dataset (`loader.py`) with its
`DataAugmentationiBOT` transform (`main_ibot.py`), at the settings of a mimkit iBOT recipe, for
`data_throughput.py --reference PATH`.

Both come from the checkout at PATH (imported as `ibot_official.py` imports it, without its extra dependencies);
nothing of them is copied here. `main_ibot.py` builds them as

    transform = DataAugmentationiBOT(global_crops_scale, local_crops_scale, global_crops_number, local_crops_number)
    dataset = ImageFolderMask(data_path, transform=transform, patch_size=..., pred_ratio=..., pred_ratio_var=...,
                              pred_aspect_ratio=(0.3, 1/0.3), pred_shape=..., pred_start_epoch=...)

and this file does the same with the recipe's values. The official transform fixes what it does not take as an
argument (224- and 96-pixel crops, the colour jitter, grayscale, blur and solarization probabilities, bicubic
resizing, two global crops), so a recipe whose views differ there is refused rather than compared at other settings.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from reference.ibot_official import _import_checkout

OFFICIAL_VIEWS = {
    "global_size": 224,
    "local_size": 96,
    "flip_p": 0.5,
    "color_jitter": (0.4, 0.4, 0.2, 0.1),
    "color_jitter_p": 0.8,
    "grayscale_p": 0.2,
    "blur_sigma": (0.1, 2.0),
    "blur_p": (1.0, 0.1, 0.5),
    "solarize_p": 0.2,
}
"""What `DataAugmentationiBOT` hard-codes, in the fields of mimkit's `MultiCropConfig`."""
OFFICIAL_ASPECT = (0.3, 1 / 0.3)
"""`main_ibot.py`'s `pred_aspect_ratio`."""


class NotComparable(ValueError):
    """The recipe's views or masks are not what the official code can be set to."""


def differences(cfg: Any) -> list[str]:
    """Where a run config's iBOT views and masks differ from what the official data path can do."""
    views, mask = cfg.method.views, cfg.method.mask
    found = [
        f"method.views.{name}={getattr(views, name)!r} (official: {value!r})"
        for name, value in OFFICIAL_VIEWS.items()
        if not _same(getattr(views, name), value)
    ]
    if mask.shape not in ("block", "rand"):
        found.append(f"method.mask.shape={mask.shape} (official: block or rand)")
    if not _same(mask.aspect_ratio, OFFICIAL_ASPECT):
        found.append(f"method.mask.aspect_ratio={mask.aspect_ratio!r} (official: {OFFICIAL_ASPECT!r})")
    if mask.min_block_patches is not None or mask.exact:
        found.append("method.mask.min_block_patches / exact set (official: BEiT's smallest block, not topped up)")
    if cfg.data.channels not in (None, 3):
        found.append(f"data.channels={cfg.data.channels} (official: RGB)")
    return found


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return math.isclose(float(a), float(b), rel_tol=1e-9)


def reference_dataset(checkout: Path, folder: Path, cfg: Any, method: Any, epoch: int) -> Any:
    """The official `ImageFolderMask` over `folder` (class sub-folders, as torchvision's ImageFolder wants) with its
    `DataAugmentationiBOT`, at `cfg`'s crops, scales, local crop count, mask ratios and the method's patch size;
    `dataset[index]` is one image's (crops, label, masks) as a worker of the official code makes it.
    Raises NotComparable when the recipe asks for what the official code cannot do."""
    problems = differences(cfg)
    if problems:
        raise NotComparable("; ".join(problems))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of the checkout's timm and torch imports
        ref = _import_checkout(checkout)
    views, mask = cfg.method.views, cfg.method.mask
    patch_size = views.global_size // method.grid[0]  # the token grid mimkit draws the masks on
    transform = ref.main.DataAugmentationiBOT(tuple(views.global_scale), tuple(views.local_scale), 2, views.num_local)
    dataset = ref.main.ImageFolderMask(
        str(folder),
        transform=transform,
        patch_size=patch_size,
        pred_ratio=[float(mean) for mean, _ in mask.ratios],
        pred_ratio_var=[float(var) for _, var in mask.ratios],
        pred_aspect_ratio=OFFICIAL_ASPECT,
        pred_shape=mask.shape,
        pred_start_epoch=mask.start_epoch,
    )
    dataset.set_epoch(epoch)
    return dataset


def settings(cfg: Any, method: Any) -> dict[str, Any]:
    """The arguments the reference was built with, for the report."""
    views, mask = cfg.method.views, cfg.method.mask
    return {
        "global_crops_scale": list(views.global_scale),
        "local_crops_scale": list(views.local_scale),
        "global_crops_number": 2,
        "local_crops_number": views.num_local,
        "patch_size": views.global_size // method.grid[0],
        "pred_ratio": [mean for mean, _ in mask.ratios],
        "pred_ratio_var": [var for _, var in mask.ratios],
        "pred_aspect_ratio": list(OFFICIAL_ASPECT),
        "pred_shape": mask.shape,
        "pred_start_epoch": mask.start_epoch,
    }
