"""Stopping a run by signal without losing work, as Lightning does: the first Ctrl-C (SIGINT) or SIGTERM asks the
loop to stop after its current step, which then saves a checkpoint and says how to resume; a second one stops
at once. DataLoader workers ignore SIGINT (`mimkit.data.loader.ignore_interrupts`), so the terminal's Ctrl-C
reaches only the loop.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch

from mimkit.engine.logs import log

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """The run stopped on a signal after saving a checkpoint; the message says how to continue."""

    def __init__(self, signal_name: str, signal_number: int, checkpoint: Path, run_dir: Path) -> None:
        super().__init__(
            f"stopped by {signal_name}; the run is saved in {checkpoint}. Continue it with: "
            f"mimkit pretrain --resume {run_dir}"
        )
        self.exit_code = 128 + signal_number


class StopRequest:
    """Context manager that turns the first SIGINT/SIGTERM into a request the loop polls (`requested`)."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.getsignal(number) for number in SIGNALS}
            for number in SIGNALS:
                signal.signal(number, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.signal_number is not None:  # the second one: stop now
            self.__exit__(None, None, None)
            raise KeyboardInterrupt
        self.signal_number = number
        log.warning(
            "%s: stopping after this step with a checkpoint (again to stop at once, without one)",
            signal.Signals(number).name,
        )

    def requested(self, fabric: Any, step: int, every: int) -> bool:
        """Whether a process got a stop signal. One process: at every step. Several: they agree every `every`
        steps (one all-reduce, no host sync at the others), so all stop at the same step."""
        if fabric.world_size == 1:
            return self.signal_number is not None
        if step % every:
            return False
        flag = torch.tensor(float(self.signal_number is not None), device=fabric.device)
        return bool(fabric.all_reduce(flag, reduce_op="max").item())

    @property
    def name(self) -> str:
        return signal.Signals(self.signal_number or signal.SIGTERM).name
