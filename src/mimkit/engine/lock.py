"""One process per run folder: `mimkit pretrain` holds an OS lock on `RUN/.lock` while it runs.

Two runs writing into one folder would interleave metrics.csv, overwrite each other's config and checkpoints and
both exit 0. `fcntl.flock` is released by the kernel when its process dies however it dies (SIGKILL, OOM killer,
node reboot), so a crashed run never leaves the folder stuck and `--resume` simply takes the lock again. The file
records who holds it (host, pid, start time, command) for the refusal message; it is never deleted (removing a
lock file while another process waits on it would give two owners).

On a file system without locks (Lustre without `-o flock`, NFS without a lock daemon) the run warns and goes on.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from mimkit.config import ConfigError

LOCK_FILE = ".lock"
UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
"""What flock raises where the file system has no locks (rather than: someone else holds it)."""

OPEN_FIX = "check the run folder's permissions (or choose another output_dir)"
_held: set[int] = set()


def _close_in_child() -> None:
    """A forked child (a DataLoader worker) drops its copy of every held lock descriptor: only the process that
    took the lock owns it, so the lock goes with that process and not with workers that outlive it briefly."""
    for descriptor in _held:
        os.close(descriptor)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """The lock of one run folder; `acquire` takes it without waiting, `release` (or the process's end) frees it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.descriptor: int | None = None
        self.warnings: list[str] = []

    def acquire(self) -> str | None:
        """Take the lock; returns None when this process owns the folder now (or the file system has no locks: then
        a warning in `warnings`), else the refusal message naming the owner and what to do."""
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:  # a lock file of another user's, a read-only folder: said, and every rank stops
            return f"output_dir: cannot open {self.path} ({error.strerror}); {OPEN_FIX}"
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return self._refusal()
        except OSError as error:
            os.close(descriptor)
            if error.errno not in UNSUPPORTED:
                raise
            self.warnings.append(
                f"output_dir: cannot lock {self.path} ({error.strerror}): this file system has no file locks, so "
                f"nothing stops a second mimkit pretrain from writing into {self.run_dir} at the same time; "
                "run one process per output_dir"
            )
            return None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, (json.dumps(holder()) + "\n").encode())
        self.descriptor = descriptor
        _held.add(descriptor)
        return None

    def release(self) -> None:
        """Clear the owner's record and free the lock (a no-op when it is not held)."""
        if self.descriptor is None:
            return
        descriptor, self.descriptor = self.descriptor, None
        _held.discard(descriptor)
        try:
            os.ftruncate(descriptor, 0)
        except OSError:
            pass  # the record stays behind; the lock is freed all the same
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            os.close(descriptor)

    def owner(self) -> dict[str, Any] | None:
        """What the current owner wrote into the lock file (None when unreadable or not yet written)."""
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _refusal(self) -> str:
        owner = self.owner()
        who = (
            f"host {owner.get('host')}, pid {owner.get('pid')}, since {owner.get('since')}: {owner.get('command')}"
            if owner
            else "its owner has not written its details yet"
        )
        return (
            f"output_dir: {self.run_dir} is in use by another mimkit pretrain ({who}); wait for it to end, then "
            f"continue that run with `mimkit pretrain --resume {self.run_dir}`; for a separate run choose another "
            "output_dir"
        )


def holder() -> dict[str, Any]:
    """Who this process is, as the lock file records it."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program == "__main__.py":  # python -m mimkit
        program = "mimkit"
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([program, *sys.argv[1:]]),
    }


class Ranks(Protocol):
    """What the lock needs of Fabric: this process's rank and a broadcast from rank 0."""

    @property
    def global_rank(self) -> int: ...

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...


@contextmanager
def own_run_folder(run_dir: str | Path, ranks: Ranks) -> Iterator[list[str]]:
    """Hold `run_dir`'s lock for the block (yields the warnings to log). Only global rank 0 takes it; its answer is
    broadcast, so under DDP every rank stops with the same message instead of waiting for a rank 0 that left."""
    lock = RunLock(run_dir)
    refusal = lock.acquire() if ranks.global_rank == 0 else None
    refusal = ranks.broadcast(refusal, src=0)
    if refusal is not None:
        lock.release()
        raise ConfigError(refusal)
    try:
        yield lock.warnings
    finally:
        lock.release()
