"""The pretraining loop on Lightning Fabric. It knows the Method interface and nothing about any method."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from lightning.fabric import Fabric

from mimkit.config import ConfigError, dump_yaml
from mimkit.data.info import DataError
from mimkit.data.output_folder import check_output_folder
from mimkit.data.sources import build_source, describe, same_images_notice
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.feed import FeedMeter, build_feed
from mimkit.engine.health import HealthWatch, read_health
from mimkit.engine.lock import own_run_folder
from mimkit.engine.logs import MetricsCSV, ProgressDisplay, log, log_start_up, setup_logging
from mimkit.engine.optim import Hyperparameters, build_optimizer
from mimkit.engine.resume import check_resume_changes, readable_resume, resolve_resume
from mimkit.engine.runtime import environment, make_fabric, process_group_released, setup_for_training
from mimkit.engine.step import StepResult, train_step
from mimkit.engine.stop import StopRequest, TrainingStopped
from mimkit.methods.base import Method, method_class
from mimkit.runs import RunConfig
from mimkit.schedules import Progress

OUTPUT_FIX = "choose another output_dir (or free space, or fix its permissions)"
OWN_FOLDER_FIX = "give the run a folder of its own, e.g. output_dir=runs/<name>"


class EpochCallback(Protocol):
    """Called on every rank when an epoch ends (online evaluation, say); returns values for that epoch's log row."""

    def __call__(self, method: Method, epoch: int, fabric: Fabric) -> dict[str, float]: ...


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good state was saved before stopping."""


@dataclass
class Position:
    """Where the loop stands: the epoch, optimizer steps done, batches of the epoch already consumed, and the
    seconds spent training so far (summed over resumed segments; epoch-end evaluations not counted)."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0
    skipped_images: int = 0
    train_seconds: float = 0.0


def pretrain(cfg: RunConfig, callbacks: Sequence[EpochCallback] = (), *, force: bool = False) -> Path:
    """Train `cfg.method` on `cfg.data`; returns the run folder (checkpoints, metrics.csv, logs, config).

    `callbacks` run at the end of every epoch, before its checkpoint (`mimkit pretrain` passes the online k-NN).
    A resumed run takes only the config changes it can (see `mimkit.engine.resume`; `force` for the
    optimisation's); its config.yaml is rewritten only once its checkpoint is restored. The run folder is refused
    when it holds images or lies inside data.root, and is owned by this run while it trains (`mimkit.engine.lock`).
    """
    started = time.perf_counter()
    resume_path, saved = readable_resume(resume) if (resume := resolve_resume(cfg)) is not None else (None, None)
    notices = check_resume_changes(saved["config"], cfg, force) if saved is not None else []
    run_dir = Path(cfg.output_dir)
    check_output_folder(run_dir, "output_dir", OWN_FOLDER_FIX, {"data.root": cfg.data.root})
    ckpt.ensure_writable(run_dir, "output_dir", OUTPUT_FIX)
    fabric = make_fabric(cfg.train, run_dir)
    fabric.launch()
    with process_group_released(), own_run_folder(run_dir, fabric) as lock_warnings:  # one process per run folder
        setup_logging(run_dir, fabric.global_rank)
        for notice in [*notices, *lock_warnings]:
            log.warning("%s", notice)
        trainer = Trainer(cfg, fabric, resume_path, callbacks, saved=saved)
        del saved  # a memory-mapped checkpoint holds its file's disk space while it lives
        if fabric.global_rank == 0:
            (run_dir / "config.yaml").write_text(dump_yaml(cfg))
            (run_dir / "environment.yaml").write_text(
                yaml.safe_dump(environment(fabric, cfg.train.precision), sort_keys=False)
            )
        log_start_up(started)
        return trainer.fit()


class Trainer:
    """One run: builds data, method and optimizer, restores a checkpoint, then loops over epochs."""

    def __init__(
        self,
        cfg: RunConfig,
        fabric: Fabric,
        resume_path: Path | None,
        callbacks: Sequence[EpochCallback] = (),
        saved: Mapping[str, Any] | None = None,
    ) -> None:
        """`saved`: the checkpoint a resumed run restores (memory-mapped; not kept), from whose method state the
        method rebuilds what it made from files when it started (a CIM tokenizer), so that resuming needs neither
        those files nor making them again."""
        saved_method = None if saved is None else saved["method"]
        self.cfg, self.fabric, self.run_dir = cfg, fabric, Path(cfg.output_dir)
        self.callbacks = list(callbacks)
        self.last_skipped = ""
        self.stop = StopRequest()
        fabric.seed_everything(cfg.seed, verbose=False)  # identical initial weights on every rank
        method_cls = method_class(cfg.method.name)
        with fabric.rank_zero_first():
            source = build_source(cfg.data)
            if saved_method is None:
                method_cls.prepare(cfg.method, source)
        log.info("data  %s", describe(source))
        if (notice := same_images_notice(cfg.data)) is not None:
            log.warning("data  %s", notice)
        self.method: Method = (
            method_cls(cfg.method, source.info)
            if saved_method is None
            else method_cls.from_saved(cfg.method, source.info, saved_method)
        )
        self.method.check_masks()
        size, image = self.method.encoder().image_size, source.info.image_size
        if image is not None and size > min(image):
            log.warning(
                "the images are %dx%d and the encoder trains at %d px: every crop is upsampled (set "
                "method.backbone.img_size and the crop sizes to the data's size to train at its resolution)",
                *image,
                size,
            )
        if fabric.global_rank == 0:
            if saved is not None:  # a smaller train.keep_epoch_checkpoints makes room before the space check
                resumed_epoch = int(saved.get("position", {}).get("epoch", 0))
                ckpt.remove_old_epochs(self.run_dir, resumed_epoch - 1, cfg.train.keep_epoch_checkpoints)
            ckpt.ensure_writable(
                ckpt.checkpoint_dir(self.run_dir), "output_dir", OUTPUT_FIX, ckpt.checkpoint_bytes(self.method)
            )
        self.accumulate = cfg.optim.accumulate_grad_batches
        self.batch_size = cfg.data.process_batch(fabric.world_size, self.accumulate)
        feed = build_feed(cfg.data, cfg.seed, fabric, source, self.method, self.batch_size)
        self.views, self.loader = feed.views, feed.loader
        self.feed_meter = FeedMeter(cfg.data, feed.augment_on, warn=fabric.global_rank == 0)
        self.sampler = self.loader.sampler
        self.steps_per_epoch = len(self.loader) // self.accumulate
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"optim.accumulate_grad_batches: {self.accumulate} exceeds the {len(self.loader)} batches of an epoch"
            )
        self.global_batch = self.batch_size * fabric.world_size * self.accumulate
        self.hyperparameters = Hyperparameters.from_config(cfg.optim, self.global_batch)
        log.info(
            "method %s: %.2fM trainable parameters; global batch %d, lr %.3g, %d steps/epoch x %d epochs",
            cfg.method.name,
            _count(self.method) / 1e6,
            self.global_batch,
            self.hyperparameters.lr.start,
            self.steps_per_epoch,
            cfg.train.epochs,
        )
        self.module, self.optimizer = setup_for_training(
            fabric,
            self.method,
            build_optimizer(self.method, cfg.optim, cfg.train.precision),
            cfg.train.compile,
            cfg.train.sync_batchnorm,
        )
        self.position = Position()
        self.clock = time.perf_counter()  # start of the training time not yet in position.train_seconds
        self.health = HealthWatch(cfg.train.health_window_steps, read_health(self.run_dir) if resume_path else [])
        if resume_path is not None:
            self._restore(resume_path)
        else:
            fabric.seed_everything(cfg.seed + fabric.global_rank, verbose=False)  # each rank its own stream
        for logger in fabric.loggers:
            if isinstance(logger, MetricsCSV):
                logger.start_at(self.position.step if resume_path is not None else None)
        self.method.on_train_start()

    # ------------------------------------------------------------------------------------------------
    def fit(self) -> Path:
        cfg, pos = self.cfg, self.position
        if pos.epoch >= cfg.train.epochs:
            log.info("run %s is already complete (%d epochs)", self.run_dir, cfg.train.epochs)
            return self.run_dir
        total = self.steps_per_epoch * cfg.train.epochs
        display = ProgressDisplay(
            total,
            pos.step,
            enabled=cfg.train.progress_bar and self.fabric.global_rank == 0,
            log_every=cfg.train.log_every_steps,
        )
        epoch_batches = self.steps_per_epoch * self.accumulate
        self.clock = time.perf_counter()
        try:
            with self.stop:
                while pos.epoch < cfg.train.epochs:
                    self._epoch(display)
                    if pos.batch_in_epoch < epoch_batches:  # _epoch returns early only when asked to stop
                        self._stop_with_checkpoint()
                    self._end_of_epoch()
        except OSError as error:  # metrics.csv or train.log on a full disk; checkpoints raise DiskFullError
            raise ckpt.full_run_folder(error, self.run_dir, ckpt.state_bytes([self.module, self.optimizer])) from None
        finally:
            display.close()
        log.info("finished %d epochs; checkpoints in %s", cfg.train.epochs, ckpt.checkpoint_dir(self.run_dir))
        return self.run_dir

    def _epoch(self, display: ProgressDisplay) -> None:
        pos, fabric = self.position, self.fabric
        self.sampler.set_position(pos.epoch, start=pos.batch_in_epoch * self.batch_size)
        self.feed_meter.start_epoch(pos.step + 1)
        readable = 0
        batches = iter(self.loader)
        while pos.batch_in_epoch < self.steps_per_epoch * self.accumulate:
            progress = Progress(
                pos.epoch, pos.step, self.steps_per_epoch, self.cfg.train.epochs, self._logs_step(pos.step + 1)
            )
            micro_batches = []
            for _ in range(self.accumulate):
                batch = self.feed_meter.fetch(batches, fabric)
                pos.batch_in_epoch += 1
                for where in batch["skipped"]:
                    pos.skipped_images += 1
                    self.last_skipped = where
                    log.warning("skipped unreadable image %s", where)
                if batch["views"] is not None:
                    batch["views"] = self.views.on_device(batch["views"])
                    self.feed_meter.count(len(batch["label"]) * fabric.world_size)
                micro_batches.append(batch)
            result = train_step(
                fabric, self.module, self.method, self.optimizer, self.hyperparameters, micro_batches, progress
            )
            step_loss, metrics, norms = result.loss, result.metrics, result.norms
            readable += result.images
            if result.images == 0:
                self._check_readable(readable)
            if norms is None:
                self._on_nonfinite(result, progress)
                continue
            pos.step += 1
            images_per_second, data_wait = self.feed_meter.rates()
            if self._logs_step(pos.step):
                self._log_step(step_loss, {**metrics, "data_wait_fraction": data_wait}, norms, images_per_second)
                self.feed_meter.end_window(pos.step)
            display.update(pos.step, pos.epoch, step_loss, self._current_lr(), images_per_second, data_wait)
            if self.stop.requested(fabric, pos.step, self.cfg.train.log_every_steps):
                if pos.batch_in_epoch < self.steps_per_epoch * self.accumulate:
                    return
                self._end_of_epoch()
                self._stop_with_checkpoint(saved=True)
            every = self.cfg.train.checkpoint_every_steps
            if every and pos.step % every == 0 and pos.batch_in_epoch < self.steps_per_epoch * self.accumulate:
                self.save(ckpt.last_path(self.run_dir))

    def _stop_with_checkpoint(self, saved: bool = False) -> None:
        """Save where the loop stands (unless the epoch's end just did) and stop with how to resume."""
        path = ckpt.last_path(self.run_dir)
        if not saved:
            self.save(path)
        raise TrainingStopped(self.stop.name, self.stop.signal_number or 15, path, self.run_dir)

    def _end_of_epoch(self) -> None:
        pos, cfg = self.position, self.cfg
        if pos.skipped_images:
            log.warning(
                "epoch %d: skipped %d unreadable image(s) so far (names in train.log warnings; "
                "data.strict=true makes them fatal)",
                pos.epoch,
                pos.skipped_images,
            )
        finished = pos.epoch
        pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
        self._count_training_time()
        row = {
            "epoch": finished,
            "skipped_images": pos.skipped_images,
            "skipped_steps": pos.skipped_steps,
            "train_minutes": pos.train_seconds / 60,
        }
        for callback in self.callbacks:
            row |= callback(self.method, finished, self.fabric)
        self.clock = time.perf_counter()  # the callbacks' evaluation is not training time
        self.fabric.log_dict(row, step=pos.step)
        self.save(ckpt.last_path(self.run_dir))
        every = cfg.train.checkpoint_every_epochs
        if every and (finished + 1) % every == 0:
            self.save(ckpt.epoch_checkpoint(self.run_dir, finished))
            if self.fabric.global_rank == 0:
                ckpt.remove_old_epochs(self.run_dir, finished, cfg.train.keep_epoch_checkpoints)

    # ------------------------------------------------------------------------------------------------
    def _logs_step(self, step: int) -> bool:
        """Whether the metrics of the step that completes `step` steps are logged."""
        return step % self.cfg.train.log_every_steps == 0 or step == self.steps_per_epoch * self.cfg.train.epochs

    def _current_lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _check_readable(self, readable: int) -> None:
        """A DataError once three global batches of this epoch brought not one readable image (every image of the
        data unreadable, say), instead of a run of NaN losses."""
        pos, batch = self.position, self.batch_size * self.fabric.world_size
        seen = pos.batch_in_epoch * batch
        if readable == 0 and seen >= min(3 * batch, self.steps_per_epoch * self.accumulate * batch):
            raise DataError(
                f"none of the first {seen} images of epoch {pos.epoch} could be read (the last: {self.last_skipped}); "
                "check the files of the data source (data.root), or set data.strict=true to stop at the first one"
            )

    def _on_nonfinite(self, result: StepResult, progress: Progress) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        pos = self.position
        if result.images == 0:  # every image of this step was unreadable: nothing to learn from, nothing wrong
            pos.step += 1
            log.warning("epoch %d step %d: no readable image in the batch; step skipped", pos.epoch, pos.step)
            return
        loss = result.loss
        bad = [k for k, v in result.metrics.items() if k.startswith("loss") and not math.isfinite(float(v))]
        terms = f" (non-finite: {', '.join(bad)})" if bad else ""
        if self.cfg.train.on_nonfinite == "skip":
            pos.skipped_steps += 1
            pos.step += 1
            log.warning(
                "non-finite loss (%s%s) at epoch %d step %d: step skipped (%d so far)",
                float(loss),
                terms,
                pos.epoch,
                pos.step,
                pos.skipped_steps,
            )
            return
        pos.batch_in_epoch -= self.accumulate  # the saved state re-runs this step when resumed
        path = ckpt.last_path(self.run_dir)
        self.save(path)
        raise NonFiniteLossError(
            f"loss is {float(loss)}{terms} at epoch {progress.epoch}, step {progress.step}. The last good state is "
            f"saved in {path}. Lower optim.lr, clip harder (method.clip_grad) or use train.precision=32-true, then "
            "continue with --resume; or set train.on_nonfinite=skip to skip such steps."
        )

    def _log_step(
        self, loss: torch.Tensor, metrics: dict[str, Any], norms: dict[str, torch.Tensor], images_per_second: float
    ) -> None:
        """One row of metrics.csv: the metrics are means over the ranks, `images_per_second` the global rate."""
        values = {"loss": loss, **metrics, **norms}
        if self.fabric.world_size > 1:
            values = {
                k: self.fabric.all_reduce(torch.as_tensor(v, device=self.fabric.device, dtype=torch.float32))
                for k, v in values.items()
            }
        row = {k: float(v) for k, v in values.items()}
        row.update(
            epoch=self.position.epoch,
            lr=self._current_lr(),
            images_per_second=images_per_second,
            weight_decay=max(g["weight_decay"] for g in self.optimizer.param_groups),
        )
        self.fabric.log_dict(row, step=self.position.step)
        warnings = self.health.observe(self.position.step, row)
        for warning in warnings:
            log.warning("%s", warning.message())
        if warnings and self.fabric.global_rank == 0:
            self.health.save(self.run_dir)

    # ------------------------------------------------------------------------------------------------
    def _count_training_time(self) -> None:
        now = time.perf_counter()
        self.position.train_seconds += now - self.clock
        self.clock = now

    def save(self, path: Path) -> None:
        self._count_training_time()
        state = {"method": self.module, "optimizer": self.optimizer, "precision": self.fabric.strategy.precision}
        ckpt.save_run_state(self.fabric, path, state, dict(self.position.__dict__), self.cfg, self.method.data)

    def _restore(self, path: Path) -> None:
        state = {"method": self.module, "optimizer": self.optimizer, "precision": self.fabric.strategy.precision}
        rest = self.fabric.load(path, state, strict=False)
        self.position = Position(**rest["position"])
        rng = rest["rng"]
        if len(rng) == self.fabric.world_size:
            ckpt.set_rng_state(rng[self.fabric.global_rank])
        else:
            log.warning(
                "checkpoint was written by %d process(es), this run has %d: random streams restart",
                len(rng),
                self.fabric.world_size,
            )
            self.fabric.seed_everything(self.cfg.seed + self.position.step + self.fabric.global_rank, verbose=False)
        log.info("resumed from %s at epoch %d, step %d", path, self.position.epoch, self.position.step)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
