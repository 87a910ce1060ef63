"""No silent corruption: one process per run folder (RUN/.lock), no command writes among images or into what it
reads, and evaluation results record the data they were computed on. The messages are catalogue cases of
docs/troubleshooting.md ("Run folders and outputs"), run through `mimkit.cli.main` like tests/test_bad_input.py."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.data.config import DataConfig
from mimkit.data.output_folder import check_output_folder, first_image
from mimkit.engine.lock import LOCK_FILE, RunLock, own_run_folder
from mimkit.engine.logs import read_metrics
from mimkit.engine.train import pretrain
from mimkit.eval.results import evaluated_data, read_history, replaced_notice, save_result
from mimkit.runs import load_run_config
from support import QUIET_CPU_RUN, ROOT, logged_step

TOY = str(ROOT / "tests" / "recipes" / "toy.yaml")
TOKENIZER = str(ROOT / "tests" / "tiny" / "tokenizer.yaml")
DOC = ROOT / "docs" / "troubleshooting.md"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path, format="PNG")
    return path


def toy_run(out: Path, *overrides: str) -> Path:
    return pretrain(load_run_config(TOY, [*QUIET_CPU_RUN, "train.epochs=1", f"output_dir={out}", *overrides]))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_run(tmp_path_factory.mktemp("toy") / "run")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of images with two class folders (images one level down, as in most datasets)."""
    root = tmp_path_factory.mktemp("data") / "photos"
    for name in ("a/0.png", "a/1.png", "b/0.png", "b/1.png"):
        png(root / name)
    return root


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A run folder whose lock another owner holds for the whole module."""
    folder = tmp_path_factory.mktemp("busy") / "run"
    folder.mkdir()
    held = RunLock(folder)
    assert held.acquire() is None
    yield folder
    held.release()


# ---------------------------------------------------------------------------------------------- the run folder lock
def test_a_held_folder_is_refused_with_its_owner_then_free_once_released(tmp_path: Path) -> None:
    first = RunLock(tmp_path)
    assert first.acquire() is None
    owner = json.loads((tmp_path / LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] and owner["since"] and owner["command"]
    refusal = RunLock(tmp_path).acquire()  # another open file: flock refuses it even within one process
    assert refusal is not None and f"pid {os.getpid()}" in refusal and f"--resume {tmp_path}" in refusal
    first.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # no stale owner shown afterwards
    second = RunLock(tmp_path)
    assert second.acquire() is None
    second.release()


def test_a_killed_owner_frees_the_folder_even_while_its_forked_workers_live(tmp_path: Path) -> None:
    owner = f"""
import os, signal, time
from mimkit.engine.lock import RunLock
assert RunLock({str(tmp_path)!r}).acquire() is None
worker = os.fork()  # a DataLoader worker, which outlives its killed parent for a moment
if worker == 0:
    for stream in (1, 2):  # let the test read its parent's output to the end
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream)
    time.sleep(60)
    os._exit(0)
print(worker, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", owner], env=ENV, capture_output=True, text=True, timeout=60)
    worker = int(done.stdout)
    try:
        assert done.returncode == -signal.SIGKILL
        after = RunLock(tmp_path)
        assert after.acquire() is None, "the forked worker still holds the lock"
        after.release()
    finally:
        os.kill(worker, signal.SIGKILL)


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_locks(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = RunLock(tmp_path)
    assert lock.acquire() is None and lock.descriptor is None
    expected = r"output_dir: cannot lock .*\.lock \(No locks available\): this file system has no file locks, so"
    assert re.match(expected, lock.warnings[0]), lock.warnings


@dataclass
class FakeRanks:
    global_rank: int
    answer: str | None = None
    """What rank 0 broadcast, as another rank receives it."""

    def broadcast(self, obj: str | None, src: int = 0) -> str | None:
        return obj if self.global_rank == 0 else self.answer


def test_only_rank_zero_takes_the_lock_and_its_refusal_stops_every_rank(busy: Path) -> None:
    with own_run_folder(busy, FakeRanks(1)) as warnings:  # another rank never tries (rank 0 said: go on)
        assert warnings == []
    with pytest.raises(ConfigError, match="is in use by another mimkit pretrain"), own_run_folder(busy, FakeRanks(0)):
        pass
    refused = FakeRanks(1, answer="refused on rank 0")
    with pytest.raises(ConfigError, match="refused on rank 0"), own_run_folder(busy, refused):
        pass


def test_pretrain_owns_its_folder_while_it_trains_and_frees_it_after(tmp_path: Path) -> None:
    out, seen = tmp_path / "run", []

    def probe(method: object, epoch: int, fabric: object) -> dict[str, float]:
        seen.append(RunLock(out).acquire())
        return {}

    pretrain(load_run_config(TOY, [*QUIET_CPU_RUN, "train.epochs=1", f"output_dir={out}"]), [probe])
    assert seen[0] is not None and f"pid {os.getpid()}" in seen[0]
    after = RunLock(out)
    assert after.acquire() is None
    after.release()


def test_a_second_launch_is_refused_while_the_first_runs_and_a_killed_run_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["pretrain", "-c", TOY, f"output_dir={out}", "train.checkpoint_every_steps=2", "data.synthetic.images=96"]
    first = subprocess.Popen(
        [sys.executable, "-m", "mimkit", *argv, "method.step_delay=0.15"], env=ENV, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not logged_step(out, at_least=3):
            time.sleep(0.05)
        capsys.readouterr()
        assert main([*argv, "--resume", "train.log_every_steps=2"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another mimkit pretrain (host {os.uname().nodename}, pid {first.pid}, since " in err
        assert yaml.safe_load((out / "config.yaml").read_text())["train"]["log_every_steps"] == 1  # not rewritten
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert main([*argv, "--resume"]) == 0  # the kernel freed the killed run's lock
    steps = [int(row["step"]) for row in read_metrics(out) if "loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # one run's rows: no step twice
    assert (out / LOCK_FILE).read_text() == ""


@pytest.mark.slow
@pytest.mark.distributed
def test_under_ddp_rank_zero_alone_locks_and_a_refusal_stops_every_rank(tmp_path: Path, busy: Path) -> None:
    command = [sys.executable, "-m", "mimkit", "pretrain", "-c", TOY, "--devices", "2", "--strategy", "ddp"]
    command += ["train.epochs=1"]
    done = subprocess.run(
        [*command, f"output_dir={tmp_path / 'run'}"], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    refused = subprocess.run([*command, f"output_dir={busy}"], env=ENV, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "is in use by another mimkit pretrain" in refused.stderr, refused.stderr[-3000:]


# ------------------------------------------------------------------------------------------------- output folders
def test_a_folder_of_images_has_them_at_its_top_or_one_level_down_not_counting_mimkit_figures(tmp_path: Path) -> None:
    assert first_image(png(tmp_path / "top" / "x.JPG").parent) == tmp_path / "top" / "x.JPG"
    png(tmp_path / "classes" / "cat" / "1.png")
    assert first_image(tmp_path / "classes") == tmp_path / "classes" / "cat" / "1.png"
    png(tmp_path / "deep" / "a" / "b" / "1.png")
    png(tmp_path / "run" / "report" / "curves.png")  # mimkit viz's figures of a run
    (tmp_path / "tokenizers").mkdir()
    (tmp_path / "tokenizers" / "kmeans.pt").touch()
    png(tmp_path / "tokenizers" / "kmeans.png")  # the picture a tokenizer fit draws beside its file
    (tmp_path / "file.txt").touch()
    for mine in ("deep", "run", "tokenizers", "missing", "file.txt"):
        assert first_image(tmp_path / mine) is None, mine


def test_an_output_that_is_or_lies_inside_what_the_command_reads_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (tmp_path / "link").symlink_to(source)
    inside = [(source, "is SRC"), (source / "a" / "b", r"lies inside SRC \(.*\)"), (tmp_path / "link", "is SRC")]
    for out, relation in inside:  # a symbolic link to SRC is SRC
        expected = f"^OUT: {re.escape(str(out))} {relation}, which this command reads; fix$"
        with pytest.raises(ConfigError, match=expected):
            check_output_folder(out, "OUT", "fix", {"SRC": source})
    check_output_folder(tmp_path / "src_shards", "OUT", "fix", {"SRC": source, "data.root": None})


def test_a_resumed_run_with_figures_is_its_own_folder_not_one_of_images(tmp_path: Path) -> None:
    out = toy_run(tmp_path / "run")
    png(out / "report" / "curves.png")
    png(out / "figures_epoch1" / "attention.png")  # `mimkit viz RUN --out RUN/figures_epoch1`
    assert main(["pretrain", "--resume", str(out), "train.epochs=2", *QUIET_CPU_RUN]) == 0


# ------------------------------------------------------------------------------------- results record their data
def test_a_result_records_its_data_and_a_replacement_on_other_data_is_said(tmp_path: Path) -> None:
    data = DataConfig(source="synthetic")
    whole = evaluated_data(data, [("train", range(8)), ("test", range(4))], None)
    save_result(tmp_path, "knn", {"accuracy": {}}, "k=20: pretrained 50.00", 0.5, whole)
    assert json.loads((tmp_path / "eval" / "knn.json").read_text())["data"] == whole
    assert read_history(tmp_path)[-1]["result"]["data"] == whole
    assert replaced_notice(tmp_path, "knn", whole) is None
    part = evaluated_data(data, [("train", range(4)), ("test", range(4))], 4)
    notice = replaced_notice(tmp_path, "knn", part) or ""
    assert re.fullmatch(
        r".*knn\.json: replaces the knn result of \S+ on synthetic \(train 8 \+ test 4 images\) with one on synthetic "
        r"\(train 4 \+ test 4 images, limit 4\); the old one stays in .*history\.jsonl",
        notice,
    ), notice
    save_result(tmp_path, "linear", {"best_top1": 0.5}, "older result", 0.5)  # as written before data records
    assert replaced_notice(tmp_path, "linear", part) is None


def test_eval_records_its_data_and_says_when_it_replaces_a_result_on_other_data(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "knn", str(run), "--k", "1", "--batch-size", "16"]) == 0
    data = json.loads((run / "eval" / "knn.json").read_text())["data"]
    assert data["source"] == "synthetic" and data["limit"] is None
    assert data["splits"] == [{"split": "train", "images": 64}, {"split": "test", "images": 64}]
    capsys.readouterr()
    assert main(["eval", "knn", str(run), "--k", "1", "--limit", "8"]) == 0
    err = capsys.readouterr().err
    assert "replaces the knn result of" in err and "(train 64 + test 64 images) with one on synthetic" in err
    assert json.loads((run / "eval" / "knn.json").read_text())["data"]["limit"] == 8


# ------------------------------------------------------------------------------------------------------ catalogue
@dataclass
class Folders:
    run: Path
    images: Path
    busy: Path
    tmp: Path


Case = Callable[[Folders], list[str]]
CASES: dict[str, tuple[Case, str]] = {
    "run-folder-in-use": (
        lambda f: ["pretrain", "-c", TOY, f"output_dir={f.busy}", *QUIET_CPU_RUN],
        r"output_dir: .*busy\d*/run is in use by another mimkit pretrain \(host \S+, pid \d+, since \S+: .*\); wait "
        r"for it to end, then continue that run with `mimkit pretrain --resume .*busy\d*/run`; for a separate run "
        r"choose another output_dir",
    ),
    "output-dir-holds-images": (
        lambda f: ["pretrain", "-c", TOY, f"output_dir={f.images}"],
        r"output_dir: .*photos holds images \(.*photos/\w/\d\.png\); mimkit never writes into a folder of images: "
        r"give the run a folder of its own, e.g. output_dir=runs/<name>",
    ),
    "output-dir-inside-data-root": (
        lambda f: [
            *["pretrain", "-c", TOY, "data.source=imagefolder", "data.synthetic=null", f"data.root={f.images}"],
            f"output_dir={f.images / 'runs' / 'try'}",
        ],
        r"output_dir: .*photos/runs/try lies inside data.root \(.*photos\), which this command reads; give the run "
        r"a folder of its own",
    ),
    "eval-inside-data-root": (
        lambda f: ["eval", "knn", str(f.run), f"data.root={f.run.parent}"],
        r"eval: .*run/eval lies inside data.root \(.*\), which this command reads; move the run folder out of the "
        r"data folder and evaluate it there",
    ),
    "export-over-checkpoints": (
        lambda f: ["export", str(f.run), "--out", str(f.run / "checkpoints")],
        r"out: .*run/checkpoints is the run's checkpoints, which this command reads; choose another folder "
        r"with --out \(the default is RUN/export/timm\)",
    ),
    "shard-inside-its-source": (
        lambda f: ["data", "shard", str(f.images), str(f.images / "shards")],
        r"OUT: .*photos/shards lies inside SRC \(.*photos\), which this command reads; give OUT a new folder "
        r"outside SRC, e.g. .*photos_shards",
    ),
    "tokenizer-output-among-images": (
        lambda f: ["tokenizer", "fit", "-c", TOKENIZER, f"output={f.images / 'a' / 'tokenizer.pt'}"],
        r"output: .*photos/a holds images \(.*\.png\); mimkit never writes into a folder of images: give the "
        r"tokenizer file a folder of its own, e.g. output=tokenizers/<name>.pt",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_write_where_it_does_not_belong_exits_2_with_the_fix(
    case: str, run: Path, images: Path, busy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build, expected = CASES[case]
    before = sorted(p.relative_to(images) for p in images.rglob("*"))
    capsys.readouterr()
    code = main(build(Folders(run, images, busy, tmp_path)))
    out, err = capsys.readouterr()
    assert code == 2, (out + err)[-2000:]
    assert re.search(expected, err), err
    assert "Traceback" not in err and err.count("\n") <= 3, err
    assert sorted(p.relative_to(images) for p in images.rglob("*")) == before  # nothing written among the images


def test_every_case_is_in_the_troubleshooting_page() -> None:
    headings = set(re.findall(r"^### `?([a-z0-9-]+)`?", DOC.read_text(), flags=re.M))
    documented = {"run-folder-without-locks", "eval-result-on-other-data"}
    assert set(CASES) | documented <= headings, sorted((set(CASES) | documented) - headings)
