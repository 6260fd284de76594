"""The command line's run folders and flags: --print-config, --dry-run, output.overwrite, a
full disk, SIGTERM, and the data checks made before anything is fitted (docs/data.md, README).

The SIGTERM case runs ``train.py`` as a real subprocess; the others call the entry points in
this process.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from genprior.cli.evaluate import run_evaluate
from genprior.cli.train import run_train
from genprior.config import compose
from genprior.datamodules import DataSourceError, MissingDataError, list_images
from genprior.errors import DEBUG_ENV
from genprior.methods import method_class

REPO_ROOT = Path(__file__).resolve().parents[1]
QUIET = ["logger=none", "trainer.enable_progress_bar=false"]
# DIP on 64x64 images (its crop multiple is 32), two steps: the cheapest real fit
DIP_FAST = ["prior=dip_skip", "task=dip_denoising_quick", "dip.num_iter=2", "trainer.batch_size=1"]


def _images(folder: Path, names: tuple[str, ...] = ("a", "b"), size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def _one_line(capsys: pytest.CaptureFixture[str], program: str = "train.py") -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"{program}: error: "), err
    return err


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ --print-config, --dry-run
def test_print_config_prints_the_resolved_yaml_and_runs_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert run_train(["--print-config", "prior=pggan_tiny", "task=mgan_inversion", f"output.dir={out}"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["prior"]["name"] == "pggan_tiny" and printed["output"]["dir"] == str(out)
    assert printed["mganprior"]["vgg_weights"] == "random" and not out.exists()
    # the default output.dir interpolation is resolved
    assert run_evaluate(["--print-config", "prior=biggan_tiny", "task=colorization"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output"]["dir"] == "outputs/biggan_tiny-colorization"


def test_dry_run_lists_the_images_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _images(tmp_path / "imgs", ("x", "y", "z"))
    out = tmp_path / "out"
    assert run_train(["--dry-run", *DIP_FAST, f"data.source={folder}", "data.limit=2", f"output.dir={out}"]) == 0
    text = capsys.readouterr().out
    assert "2 image(s) would be fitted" in text and str(folder / "x.png") in text and "z.png" not in text
    assert not out.exists()
    # the checks still run: a missing source is the one-line error, exit 2
    assert run_train(["--dry-run", *DIP_FAST, f"data.source={tmp_path / 'none'}", f"output.dir={out}"]) == 2
    assert "none does not exist" in _one_line(capsys)


# ------------------------------------------------------------------------------ data paths
@pytest.mark.parametrize("args, says", [
    (["data.source={tmp}/missing.png"], ["image source", "missing.png does not exist", "data.source=<path>"]),
    (["data.source={tmp}/missing.txt"], ["list file", "missing.txt does not exist", "data.source=<path>"]),
    (["data.source={tmp}/list.txt", "data.root={tmp}/noroot"], ["list root", "noroot", "data.root"]),
    (["data.source={tmp}/empty"], ["empty holds no images"]),
    (["experiment=dip_denoising_1800", "data.source=data/dip/denoising/nothere.png"],
     ["nothere.png does not exist", "github.com/DmitryUlyanov/deep-image-prior", "data.source=<path>"]),
    (["data=imagenet_val_1k", "data.root={tmp}/val"],
     ["ImageNet val folder", "image-net.org", "data.root=<path>", "docs/data.md"]),
    (["data=lsun_church_300", "data.lmdb={tmp}/church_lmdb"],
     ["LMDB", "church_lmdb does not exist", "github.com/fyu/lsun", "data.lmdb=<path>"]),
    (["data=celebahq_300", "data.source={tmp}/faces"], ["faces does not exist", "CelebA-HQ", "data.source"]),
])
def test_data_path_errors_are_one_line_before_anything_is_written(
        args: list[str], says: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.txt").write_text("a.png\n")
    out = tmp_path / "out"
    argv = [*DIP_FAST, *(a.format(tmp=tmp_path) for a in args), f"output.dir={out}", *QUIET]
    assert run_train(argv) == 2
    err = _one_line(capsys)
    assert all(s in err for s in says), err
    assert not out.exists()  # nothing was written, nothing logged
    assert run_evaluate(argv) == 2  # evaluate.py lists the same way
    err = _one_line(capsys, "evaluate.py")
    assert all(s in err for s in says), err


def test_missing_data_of_a_catalogue_preset_says_where_it_comes_from(tmp_path: Path) -> None:
    """``train.py experiment=dip_denoising_1800`` as a user runs it, from a folder without data/."""
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "experiment=dip_denoising_1800",
                           "--dry-run", *QUIET], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "data/dip/denoising/F16_GT.png does not exist" in err
    assert "deep-image-prior" in err and "data.source=<path>" in err


def test_imagenet_subset_checks_only_the_chosen_files(tmp_path: Path) -> None:
    """A partial copy of ImageNet val serves a subset of the 1k list: the subset is picked
    first, then only its files are checked (and the missing ones named)."""
    val = tmp_path / "val"
    _images(val, ("ILSVRC2012_val_00000293",))  # the first image of the shipped 1k list
    (val / "ILSVRC2012_val_00000293.png").rename(val / "ILSVRC2012_val_00000293.JPEG")
    base = ["prior=dip_skip", "data=imagenet_val_1k", f"data.root={val}"]
    _, items = list_images(compose([*base, "data.subset.count=1"]), method_class("dip"))
    assert [(i.id, i.class_id) for i in items] == [("ILSVRC2012_val_00000293", 0)]
    with pytest.raises(DataSourceError, match=r"1 of the 2 images .* ILSVRC2012_val_00000236\.JPEG"):
        list_images(compose([*base, "data.subset.count=2"]), method_class("dip"))
    with pytest.raises(MissingDataError, match=r"ImageNet val folder .*nowhere does not exist"):
        list_images(compose([*base, f"data.root={tmp_path / 'nowhere'}"]), method_class("dip"))


# ---------------------------------------------------------------------------- run folders
def test_an_output_dir_with_results_is_not_reused_silently(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text('{"id": "earlier", "status": "ok"}\n')
    folder = _images(tmp_path / "imgs", ("a",))
    args = [*DIP_FAST, f"data.source={folder}", f"output.dir={out}", *QUIET]
    assert run_train(args) == 2
    err = _one_line(capsys)
    assert str(out) in err and "output.overwrite=true" in err and "output.dir=" in err
    assert _rows(out) == [{"id": "earlier", "status": "ok"}]  # untouched
    assert run_train([*args, "output.overwrite=true"]) == 0
    assert [r["id"] for r in _rows(out)] == ["a"]
    # a run that stopped before any image finished left nothing to lose: its folder is reused
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.yaml").write_text("seed: 0\n")
    (stopped / "results.jsonl").write_text("")
    assert run_train([*DIP_FAST, f"data.source={folder}", f"output.dir={stopped}", *QUIET]) == 0
    assert [r["id"] for r in _rows(stopped)] == ["a"]


# ------------------------------------------------------------------------------ full disk
def test_full_disk_on_the_results_file_is_one_line_and_keeps_the_rows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"

    def no_space(rows: list, where: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where / "results.jsonl"))

    monkeypatch.setattr("genprior.cli.train.write_results", no_space)
    folder = _images(tmp_path / "imgs", ("a",))
    assert run_train([*DIP_FAST, f"data.source={folder}", f"output.dir={out}", *QUIET]) == 2
    err = _one_line(capsys)
    assert f"{out / 'results.jsonl'}" in err and "No space left on device (ENOSPC)" in err
    # what was written per image before the failing write stays
    assert (out / "a" / "metrics.json").is_file()
    assert [r["id"] for r in _rows(out)] == ["a"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_output_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        folder = _images(tmp_path / "imgs", ("a",))
        assert run_train([*DIP_FAST, f"data.source={folder}", f"output.dir={locked / 'out'}", *QUIET]) == 2
        err = _one_line(capsys)
        assert "locked" in err and "(EACCES)" in err
    finally:
        locked.chmod(0o755)


# ------------------------------------------------------------------------------ the tiny prior
def test_pggan_tiny_needs_no_downloaded_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no pretrained/ folder here
    out = tmp_path / "out"
    assert run_train(["prior=pggan_tiny", "task=mgan_inversion", "mganprior.iterations=1",
                      "mganprior.z_number=2", "mganprior.composing_layer=2", f"output.dir={out}", *QUIET]) == 0
    row = _rows(out)[0]
    assert row["status"] == "ok" and row["final_vgg_loss"] > 0  # the (random) VGG term is on
    assert not (tmp_path / "pretrained").exists()


# ------------------------------------------------------------------------------ SIGTERM
def test_sigterm_records_the_image_in_flight_and_exits_143(tmp_path: Path) -> None:
    folder = _images(tmp_path / "imgs", ("a", "b"))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train.py"), "prior=dip_skip", "task=dip_denoising_quick",
         "dip.num_iter=100000", "trainer.batch_size=1", f"data.source={folder}", "logger=none",
         f"output.dir={out}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = bytearray()

    def read_stdout() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(4096):
            seen.extend(chunk)

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        # the progress bar's count after the first optimisation step: "| 1/100000 ["
        while not re.search(rb"\| 1/100000 \[", bytes(seen)):
            assert proc.poll() is None and time.monotonic() < deadline, bytes(seen)[-2000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read().decode() if proc.stderr is not None else ""
    assert code == 143, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("train.py: interrupted by SIGTERM"), stderr
    rows = _rows(out)
    assert [(r["id"], r["status"], r["error"]) for r in rows] == [("a", "interrupted", "interrupted by SIGTERM")]


def test_full_disk_on_the_evaluate_summary_is_one_line_and_keeps_the_rows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"

    def no_space(where: Path, *args: object, **kwargs: object) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where / "summary.csv"))

    monkeypatch.setattr("genprior.cli.evaluate.write_summary_files", no_space)
    folder = _images(tmp_path / "imgs", ("a",))
    assert run_evaluate([*DIP_FAST, f"data.source={folder}", f"output.dir={out}", *QUIET]) == 2
    err = _one_line(capsys, "evaluate.py")
    assert f"{out / 'summary.csv'}" in err and "No space left on device (ENOSPC)" in err
    # the durable row of the fitted image stays: a rerun after freeing space resumes from it
    rows = [json.loads(line) for line in (out / "results" / "rank0.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"]) for r in rows] == [("a", "ok")]
