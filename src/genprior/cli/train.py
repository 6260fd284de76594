"""``train.py``: restore (or manipulate) the given images by fitting a prior to each one.

Reads top to bottom like the experiment: compose the config; check everything the user must
fix before anything is fitted, written or logged (the output folder, the weights and VGG-16
files: the method is built; the data files: the images are listed); then run the task
(tasks.run: fit the images through the engine), append each image's row to results.jsonl as
it finishes, and print a line per image.

Exit codes: 0 when an image was fitted, 1 when every image failed, 2 for a user error (one
line on stderr, genprior.errors; a full disk or a read-only output folder too), 128 + the
signal for SIGTERM / SIGINT (143 / 130): the images in flight get an "interrupted" row, and
results.jsonl and the summary of what finished are written first.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import lightning as L

from genprior import errors, tasks
from genprior.config import compose_or_exit, to_yaml
from genprior.datamodules import image_reader, list_images
from genprior.items import ImageItem
from genprior.methods import Method

__all__ = ["OutputDirInUseError", "check_output_dir", "run_train", "train", "train_main"]

#: The file whose rows mark a folder as another run's results (train.py's and evaluate.py's).
RESULTS_FILE = "results.jsonl"


class OutputDirInUseError(errors.UserError, FileExistsError):
    """output.dir holds the results of an earlier run and output.overwrite is false."""


def train_main(argv: Sequence[str] | None = None) -> int:
    return run_train(sys.argv[1:] if argv is None else list(argv))


def run_train(argv: Sequence[str]) -> int:
    """Exit code 0 when an image was fitted, 1 when every image failed, 2 for a user error
    (one line on stderr, no traceback unless GENPRIOR_DEBUG=1; genprior.errors), 128 + the
    signal's number when SIGTERM or SIGINT ended the run."""
    cfg = compose_or_exit(argv, "train.py")  # --help, --print-config: printed, None
    if cfg is None:
        return 0
    return errors.run_reported("train.py", lambda: train(cfg, dry_run="--dry-run" in argv))


def train(cfg: Any, dry_run: bool = False) -> int:
    out = Path(cfg.output.dir)
    # 1. what the user must fix, before anything is fitted, written or logged
    check_output_dir(cfg, out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    method = tasks.build_method(cfg)  # the weights and VGG-16 files; None: the task builds its own
    run_kwargs: dict[str, Any] = {} if method is None else {"method": method}
    reads = tasks.input_method(cfg, method)
    if reads is not None:  # the images are listed (their files checked) here
        source, items = list_images(cfg, reads)
        run_kwargs.update(items=items, read=image_reader(cfg, reads, source, items))
    if dry_run:
        print_dry_run(cfg, out, reads, run_kwargs.get("items"))
        return 0

    # 2. the run: one row per image in results.jsonl as soon as it is done
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    rows: list[dict[str, Any]] = []
    with (out / "results.jsonl").open("w") as results, interrupts_raise():
        try:
            rows = tasks.run(cfg, out, on_row=_appender(rows, results), **run_kwargs)
        except errors.Interrupted as stop:
            return interrupted(stop, rows, out, cfg)
    write_results(rows, out)  # again, in the order of the images
    print_summary(rows, out, cfg)
    return 0 if any(r["status"] == "ok" for r in rows) or not rows else 1


def check_output_dir(cfg: Any, out: Path) -> None:
    """A folder that holds another run's results (a results.jsonl with a row) is not reused
    silently (output.overwrite). A run that stopped before any image finished (its config.yaml
    and an empty results.jsonl: a missing file found late, an interrupt) left nothing to lose."""
    if bool(cfg.output.overwrite):
        return
    results = out / RESULTS_FILE
    try:
        has_rows = results.is_file() and any(line.strip() for line in results.open(errors="replace"))
    except OSError:
        has_rows = True  # unreadable: do not write over it
    if has_rows:
        raise OutputDirInUseError(
            f"output.dir {out} holds the results of an earlier run ({results.name}); give a "
            "new output.dir=<folder>, or output.overwrite=true to write over them")


def print_dry_run(cfg: Any, out: Path, reads: type[Method] | None, items: list[ImageItem] | None) -> None:
    """--dry-run: what the checks found and what would be fitted."""
    print(f"train.py --dry-run: config, output folder and the files of {cfg.prior.name} are in "
          f"order; outputs would go to {out}")
    if items is None:
        print(f"  task {cfg.task.name} lists its own images when it runs")
        return
    print(f"  {len(items)} image(s) would be fitted ({reads.__name__ if reads else cfg.task.name}):")
    for item in items[:50]:
        print(f"  {item.id}  {item.path}")
    if len(items) > 50:
        print(f"  ... and {len(items) - 50} more")


def _appender(rows: list[dict[str, Any]], fh: TextIO) -> Callable[[dict[str, Any]], None]:
    def append(row: dict[str, Any]) -> None:
        rows.append(row)
        fh.write(json.dumps(row, default=str) + "\n")
        fh.flush()

    return append


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGTERM and SIGINT raise errors.Interrupted in the main thread, so the fit ends through
    Lightning's on_exception hooks (ResultRows gives the images in flight an "interrupted" row)
    instead of Lightning's own SIGTERM handling (which ends the fit with exit code 0) or a
    KeyboardInterrupt (exit 1). A second signal while the run winds down is ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        raise errors.Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def interrupted(stop: errors.Interrupted, rows: list[dict[str, Any]], out: Path, cfg: Any) -> int:
    """The rows so far (finished, and the images in flight as "interrupted") in results.jsonl,
    the summary, one line on stderr; 128 + the signal's number."""
    write_results(rows, out)
    print_summary(rows, out, cfg)
    cut = sum(r.get("status") == "interrupted" for r in rows)
    print(f"train.py: {stop}: {len(rows) - cut} image(s) finished, {cut} in flight recorded as "
          f"interrupted in {out / 'results.jsonl'}", file=sys.stderr)
    return stop.exit_code


def write_results(rows: list[dict[str, Any]], out: Path) -> None:
    with (out / "results.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=str) + "\n")


def print_summary(rows: list[dict[str, Any]], out: Path, cfg: Any) -> None:
    def finite(row: dict[str, Any], key: str) -> bool:  # inf and nan are never printed as numbers
        value = row.get(key)
        return isinstance(value, (int, float)) and abs(value) != float("inf") and value == value

    # a manipulation's edit row shares its image's id with the fit's row: images, not rows
    print(f"\ngenprior: {cfg.prior.name} / {cfg.task.name} on {len({r['id'] for r in rows})} image(s)")
    for row in rows:
        if row["status"] != "ok":
            print(f"  {row['id']}: FAILED - {row.get('error')}")
            continue
        parts = []
        if finite(row, "observation_psnr"):
            parts.append(f"observation PSNR {row['observation_psnr']:.2f} dB")
        elif row.get("observation_psnr") == float("inf"):
            parts.append("lossless observation")  # reconstruct, jitter, ...: nothing to restore
        if finite(row, "psnr"):
            hole = f" (hole {row['psnr_hole']:.2f} dB)" if finite(row, "psnr_hole") else ""
            parts.append(f"result PSNR {row['psnr']:.2f} dB{hole}")
        elif row.get("psnr") == float("inf"):
            parts.append("result equals the target")
        if finite(row, "ssim"):
            parts.append(f"SSIM {row['ssim']:.4f}")
        if isinstance(row.get("outputs"), dict):  # manipulation rows (tasks/manipulation.py)
            parts.append(f"{row['task']}: {row['outputs'].get('gif') or row['outputs'].get('sheet')}")
        print(f"  {row['id']}: " + ", ".join(parts) + f" ({row.get('seconds', 0):.1f} s)")
    print(f"outputs: {out.resolve()}")
