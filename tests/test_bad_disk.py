"""The full-disk part of docs/troubleshooting.md's catalogue: a run folder whose disk is, or becomes, too full exits
2 with one message that names the folder, the free and the needed space and how to continue, never with a
traceback, and leaves no unfinished checkpoint behind. Each case's id is a heading of that page."""

from __future__ import annotations

import errno
import io
import re
import shutil
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mimkit.cli import main
from mimkit.engine.logs import MetricsCSV
from mimkit.engine.train import pretrain
from mimkit.methods.saved import read_checkpoint
from mimkit.runs import load_run_config
from support import ROOT, assert_same_losses

TOY = str(ROOT / "tests" / "recipes" / "toy.yaml")
DOC = ROOT / "docs" / "troubleshooting.md"
Usage = namedtuple("Usage", "total used free")


def full_after(monkeypatch: pytest.MonkeyPatch, writes: int) -> None:
    """Checkpoint writes after the first `writes` find the disk full halfway through the file."""
    real_save, done = torch.save, []

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if not (isinstance(f, io.BufferedWriter) and f.name.endswith(".ckpt.tmp")):
            return real_save(obj, f, *args, **kwargs)
        done.append(f.name)
        if len(done) <= writes:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


def free_space(monkeypatch: pytest.MonkeyPatch, free: Callable[[Path], int]) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**40, 2**40 - free(Path(path)), free(Path(path))))


def full_disk(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    free_space(monkeypatch, lambda _path: 1024)
    return ["pretrain", "-c", TOY, f"output_dir={tmp}"]


def disk_fills_during_a_run(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    full_after(monkeypatch, writes=2)  # epoch 0's last.ckpt and epoch_0000.ckpt fit, epoch 1's last.ckpt not
    return ["pretrain", "-c", TOY, f"output_dir={tmp}"]


def no_room_for_the_next_checkpoint(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    free_space(monkeypatch, lambda _path: 0 if (tmp / "checkpoints" / "last.ckpt").exists() else 2**40)
    return ["pretrain", "-c", TOY, f"output_dir={tmp}"]


Case = Callable[[Path, pytest.MonkeyPatch], list[str]]
CASES: dict[str, tuple[Case, str]] = {
    "full-disk": (
        full_disk,
        r"output_dir: .*checkpoints has 0\.0 MiB free, and this needs about [\d.]+ MiB; choose another output_dir",
    ),
    "disk-full-during-a-run": (
        disk_fills_during_a_run,
        r"output_dir: the disk is full: writing .*out/checkpoints/last\.ckpt failed \(No space left on device; the "
        r"unfinished file is removed\); .*out/checkpoints has [\d.]+ [MG]iB free, and a checkpoint needs about "
        r"[\d.]+ MiB\. The run is saved in .*out/checkpoints/last\.ckpt: free space \(or move the run folder to a "
        r"larger disk\), then continue it with: mimkit pretrain --resume .*out$",
    ),
    "no-room-for-the-next-checkpoint": (
        no_room_for_the_next_checkpoint,
        r"output_dir: .*out/checkpoints has 0\.0 MiB free, and the next checkpoint \(epoch_0000\.ckpt\) needs about "
        r"[\d.]+ MiB\. The run is saved in .*out/checkpoints/last\.ckpt: free space .*mimkit pretrain --resume .*out$",
    ),
    "keep-epoch-checkpoints": (
        lambda tmp, monkeypatch: ["pretrain", "-c", TOY, "train.keep_epoch_checkpoints=-1", "--print-config"],
        r"train\.keep_epoch_checkpoints: must be >= 0 \(0 keeps every epoch checkpoint\); got -1",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_full_disk_exits_2_with_a_message_that_says_how_to_continue(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    build, expected = CASES[case]
    argv = build(tmp_path / "out", monkeypatch)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out + err)[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("mimkit: error: ") and re.search(expected, last), err
    assert "Traceback" not in err and "Logging error" not in err
    assert not list(tmp_path.rglob("*.tmp"))


def test_every_case_is_in_the_troubleshooting_page() -> None:
    headings = set(re.findall(r"^### `?([a-z0-9-]+)`?", DOC.read_text(), flags=re.M))
    assert set(CASES) <= headings, sorted(set(CASES) - headings)


def test_a_disk_that_fills_during_a_run_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    every_3_steps = "train.checkpoint_every_steps=3"
    reference = pretrain(load_run_config(TOY, [f"output_dir={tmp_path / 'reference'}", every_3_steps]))
    run = tmp_path / "run"
    full_after(monkeypatch, writes=4)  # steps 3 and 6, epoch 0's last.ckpt and epoch_0000.ckpt; not step 9's
    assert main(["pretrain", "-c", TOY, f"output_dir={run}", every_3_steps]) == 2
    assert "the disk is full" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0000.ckpt", "last.ckpt"]
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["position"]["step"] == 8
    monkeypatch.undo()  # space freed
    assert main(["pretrain", "--resume", str(run)]) == 0
    assert_same_losses(run, reference)


def test_a_full_disk_under_the_logs_is_the_same_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    full: list[bool] = []

    def log_metrics(self: MetricsCSV, metrics: dict[str, float], step: int | None = None) -> None:
        if step is not None and step > 10:
            full.append(True)
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MetricsCSV, "log_metrics", log_metrics)
    free_space(monkeypatch, lambda _path: 0 if full else 2**40)
    assert main(["pretrain", "-c", TOY, f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full: writing the run's logs failed (No space left on device); " in err
    assert f"The run is saved in {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}" in err and "Traceback" not in err


def test_a_full_disk_elsewhere_is_not_blamed_on_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def log_metrics(self: MetricsCSV, metrics: dict[str, float], step: int | None = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # /dev/shm, say: the run folder's disk has room

    monkeypatch.setattr(MetricsCSV, "log_metrics", log_metrics)
    with pytest.raises(OSError, match="No space left on device") as raised:
        pretrain(load_run_config(TOY, [f"output_dir={tmp_path / 'run'}"]))
    assert type(raised.value) is OSError
