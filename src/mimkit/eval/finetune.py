"""Fine-tuning (and augmented linear probing) as a training run on the engine: `finetune(init, protocol)`.

A protocol (`configs/finetune/*.yaml`, `mimkit recipes finetune`) is a partial run config: the task's settings
(`method`: head, layer decay, drop path, augmentation, mixing), AdamW's schedule (`optim`), the length (`train`)
and the global batch (`data.global_batch`). `finetune_config` puts it on a pretrained encoder: the timm model and
weights of a mimkit run (its `encoder()`) or of a `mimkit export` folder, the run's data, and a run folder of its
own (`RUN/finetune/<protocol>`). The engine then trains it like pretraining (processes, precision, atomic
checkpoints, exact resume, metrics.csv, TensorBoard), and `FinetuneScoring` scores top-1 / top-5 on the eval
split after every epoch, sharded over the processes, keeping the best epoch's weights beside the checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mimkit.config import ConfigError, read_yaml, to_dict
from mimkit.data.loader import ViewDataset, eval_loader
from mimkit.data.sources import ImageSource, build_source
from mimkit.data.views import EvalView
from mimkit.engine.logs import log, read_metrics
from mimkit.engine.train import pretrain
from mimkit.eval.results import replace_atomically
from mimkit.export import CONFIG_FILE, WEIGHTS_FILE
from mimkit.methods.base import Method
from mimkit.methods.finetune import Finetune
from mimkit.recipes import find_recipe
from mimkit.runs import RunConfig, load_run, load_run_config

BEST_WEIGHTS, BEST_RECORD = "best.safetensors", "best.json"


@dataclass
class FinetuneResult:
    """Per-epoch rows of a fine-tune's metrics.csv that hold its scores (fractions in [0, 1])."""

    run_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def read(cls, run_dir: Path) -> FinetuneResult:
        return cls(run_dir, [row for row in read_metrics(run_dir) if "top1" in row])

    @property
    def top1(self) -> float:
        """Top-1 after the last epoch: the number to report (no selection on the eval split)."""
        return self.history[-1]["top1"]

    @property
    def top5(self) -> float:
        return self.history[-1]["top5"]

    @property
    def best(self) -> dict[str, float]:
        """The epoch with the highest top-1 (selected on the eval split, so optimistic; MAE reports it)."""
        return max(self.history, key=lambda row: row["top1"])

    def scores(self) -> dict[str, Any]:
        """What a fine-tune's result file records: the last and best epochs and the whole history."""
        return {"top1": self.top1, "top5": self.top5, "best": self.best, "history": self.history}


@dataclass(frozen=True)
class Pretrained:
    """The encoder a fine-tune starts from: its timm model, where its weights are, and what it was trained on."""

    init: str | None
    """A mimkit run's checkpoint or an export folder; None for the random-init baseline."""
    name: str
    model_args: dict[str, Any]
    image_size: int
    data: dict[str, Any]
    seed: int
    folder: Path
    """Where the fine-tune's run folder goes by default (`folder/finetune/<protocol>`)."""


def pretrained(init: str | Path, *, random_init: bool = False) -> Pretrained:
    """Read what a fine-tune needs from a run folder, a checkpoint, or a `mimkit export` folder."""
    folder = Path(init)
    if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        config = json.loads((folder / CONFIG_FILE).read_text())
        args = dict(config.get("model_args") or {})
        size = int(config["pretrained_cfg"]["input_size"][-1])
        return Pretrained(None if random_init else str(folder), config["architecture"], args, size, {}, 0, folder)
    run = load_run(init, random_init=True)  # the weights are loaded by the task, from the checkpoint
    encoder = run.encoder()
    name, args = encoder.timm_spec()
    data = {**to_dict(run.cfg.data), "limit": None}
    weights = None if random_init else str(run.checkpoint)  # the checkpoint read (another if last.ckpt is damaged)
    return Pretrained(weights, name, args, encoder.image_size, data, run.cfg.seed, run.run_dir)


def protocol_name(protocol: str) -> str:
    return Path(protocol).with_suffix("").name


def finetune_config(
    start: Pretrained,
    protocol: str,
    overrides: Sequence[str] = (),
    *,
    output_dir: str | Path | None = None,
    resume: bool = False,
) -> RunConfig:
    """The run config of `protocol` on `start`: the protocol over the pretrained encoder's model and data, then
    `overrides` (e.g. `train.epochs=1`, `data.root=...`). Validation refuses a protocol written for another
    encoder family (`method.families`)."""
    recipe = read_yaml(find_recipe(protocol))
    method = dict(recipe.get("method") or {})
    backbone = {
        **dict(method.get("backbone") or {}),
        "name": start.name,
        "img_size": start.image_size,
        "model_args": {k: v for k, v in start.model_args.items() if k not in ("in_chans", "img_size")},
    }
    label = protocol_name(protocol) + ("" if start.init else "_random_init")
    base = {
        **recipe,
        "method": {**method, "name": "finetune", "backbone": backbone, "init": start.init},
        "data": {**start.data, **dict(recipe.get("data") or {})},
        "seed": recipe.get("seed", start.seed),
        "output_dir": str(output_dir or start.folder / "finetune" / label),
        "resume": "auto" if resume else None,
    }
    return load_run_config(None, overrides, base=base)


class FinetuneScoring:
    """The engine's epoch callback: top-1 / top-5 of each of the task's classifiers on the eval split, the images
    shared out over the processes; rank 0 keeps the best epoch's weights (`best.safetensors`, `best.json`)."""

    def __init__(self, source: ImageSource, cfg: RunConfig) -> None:
        self.source, self.run_dir, self.cfg = source, Path(cfg.output_dir), cfg
        record = self.run_dir / BEST_RECORD
        self.best = json.loads(record.read_text()) if record.is_file() else {"top1": -1.0}

    @torch.no_grad()
    def __call__(self, method: Method, epoch: int, fabric: Any) -> dict[str, float]:
        row: dict[str, float] = {}
        assert isinstance(method, Finetune), "FinetuneScoring scores the fine-tuning task"
        for prefix, model in method.classifiers().items():
            top1, top5 = self.accuracy(model, method.encoder().image_size, fabric)
            row |= {f"{prefix}top1": top1, f"{prefix}top5": top5}
        log.info("epoch %d: top-1 %.2f%%, top-5 %.2f%%", epoch, 100 * row["top1"], 100 * row["top5"])
        if row["top1"] > self.best["top1"]:
            self.best = {"epoch": epoch, **row}
            if fabric.global_rank == 0:
                self._keep_best(method.classifier)
        return row

    def accuracy(self, model: torch.nn.Module, size: int, fabric: Any) -> tuple[float, float]:
        """Every eval image scored once: each rank marks its hits in a vector over all images, then the ranks'
        vectors are combined by max (the sampler pads the last ranks with repeats)."""
        data = ViewDataset(self.source, EvalView(self.source.info, size), seed=0)
        training_batch = self.cfg.data.process_batch(fabric.world_size, self.cfg.optim.accumulate_grad_batches)
        loader = eval_loader(
            data,
            batch_size=2 * training_batch,  # no gradients: twice a training micro-batch fits
            num_workers=self.cfg.data.num_workers,
            num_replicas=fabric.world_size,
            rank=fabric.global_rank,
        )
        hits = torch.zeros(2, len(data), device=fabric.device)
        was_training = model.training
        model.eval()
        for batch in loader:
            if batch["views"] is None:
                continue
            with fabric.autocast():
                logits = model(batch["views"].to(fabric.device))
            target = batch["label"].to(fabric.device)
            ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
            index = batch["index"].to(fabric.device)
            hits[0, index] = (ranked[:, 0] == target).float()
            hits[1, index] = (ranked == target[:, None]).any(1).float()
        model.train(was_training)
        if fabric.world_size > 1:
            torch.distributed.all_reduce(hits, op=torch.distributed.ReduceOp.MAX)
        top1, top5 = (hits.sum(dim=1) / max(len(data), 1)).tolist()
        return top1, top5

    def _keep_best(self, model: torch.nn.Module) -> None:
        """The weights and scores of the best epoch so far, each file replaced atomically."""
        weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
        for name, write in (
            (BEST_WEIGHTS, lambda path: save_file(weights, str(path))),
            (BEST_RECORD, lambda path: path.write_text(json.dumps(self.best, indent=2))),
        ):
            replace_atomically(self.run_dir / name, write)


def eval_source(cfg: RunConfig) -> ImageSource:
    """The labelled eval split a fine-tune scores on; a ConfigError before any work when it has no labels."""
    source = build_source(cfg.data, cfg.data.eval_split)
    if not source.info.num_classes:
        raise ConfigError(
            f"data.eval_split: {cfg.data.eval_split!r} of {cfg.data.source} has no labels, and fine-tuning scores "
            "on it; name a labelled split (data.eval_split=...) or hold out labelled images (data.val_fraction=0.1)"
        )
    return source


def run_finetune_config(cfg: RunConfig, source: ImageSource, *, force: bool = False) -> FinetuneResult:
    """Train a fine-tune's run config on the engine, scoring on `source` (its eval split) after every epoch."""
    return FinetuneResult.read(pretrain(cfg, [FinetuneScoring(source, cfg)], force=force))


def finetune(
    init: str | Path,
    protocol: str = "finetune/vit_base_mae",
    overrides: Sequence[str] = (),
    *,
    output_dir: str | Path | None = None,
    random_init: bool = False,
    resume: bool = False,
    force: bool = False,
) -> FinetuneResult:
    """Fine-tune the encoder of `init` (a run folder, checkpoint or export folder) with `protocol`; returns the
    per-epoch scores. `random_init` trains the same model from its random initialisation (the baseline);
    `resume` continues the fine-tune's own run folder (its config must not change)."""
    start = pretrained(init, random_init=random_init)
    cfg = finetune_config(start, protocol, overrides, output_dir=output_dir, resume=resume)
    return run_finetune_config(cfg, eval_source(cfg), force=force)
