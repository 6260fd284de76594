"""The engine: the one place where images become results.

A run fits its images B at a time, each image with its own parameters, in **one**
``Trainer.fit``:

- ``ImageBatches`` (a LightningDataModule) holds the run's images; every epoch it reads the next
  B of them and its data loader yields that batch once per optimisation step.
- ``Reconstruction`` (the LightningModule) holds the method, whose per-image tensors are its
  parameters. The first step of an epoch starts the batch (the method's set-up and a fresh
  per-image optimizer); every ``training_step`` is one ``step`` of all B images; the epoch ends
  when every image has finished its schedule (``on_train_batch_start`` returns -1).
- ``step`` is the one optimisation step: per-image learning rates, forward and loss, backward,
  the method's post-backward hook (DIP's backtracking), the update, the stage bookkeeping.
  Tests and benchmarks call it too.
- ``make_trainer`` is the one Trainer builder; ``run`` fits a list of images and returns one
  result row per image; a batch that raises is fitted again image by image, so one bad image
  never costs the others.

Images on different ranks never share gradients: evaluate.py starts one process per device and
each runs its own shard through ``run`` (no DDP wrapping).
"""

from __future__ import annotations

import logging
import math
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor

from genprior.callbacks import (
    ExtraMetrics,
    ImageFiles,
    LossFiles,
    LossLogger,
    ResultRows,
    SaveReconstructions,
    StageProgressBar,
    StageSnapshots,
    WandbReport,
    make_wandb_logger,
)
from genprior.device import fit_devices, pick_device
from genprior.items import ImageBatch, ImageItem, StepRecord
from genprior.methods.base import Method
from genprior.optim import StackedOptimizer, carry_state
from genprior.perf import auto_batch_size, perf_settings, resolve_batch_size

__all__ = [
    "BatchOutputs", "ImageBatches", "Reconstruction", "TaskRows", "edit_row", "make_loggers",
    "make_trainer", "run", "step",
]

log = logging.getLogger("genprior")

# Lightning warnings that say what genprior does on purpose: the method's networks stay in
# eval mode (DGP's frozen BN statistics, SPEC §6.2), the optimizer is made per batch of images
# (not in configure_optimizers), and the images come from memory (no loader workers).
_EXPECTED_WARNINGS = (
    ".*module\\(s\\) in eval mode.*",
    ".*configure_optimizers.*returned.*None.*",
    ".*does not have many workers.*",
    ".*GPU available but not used.*",
    ".*smaller than the logging interval.*",
    ".*isinstance\\(treespec, LeafSpec\\).*",
    ".*Total length of .* across ranks is zero.*",  # a batch whose images all failed to read
)


# --------------------------------------------------------------------------------- one step
def step(method: Method, optimizer: StackedOptimizer,
         backward: Callable[[Tensor], None] | None = None,
         frozen: Sequence[int] = ()) -> tuple[StepRecord, Tensor | None, list[bool]]:
    """One optimisation step of every running image of the method's batch.

    Returns the step's per-image record, the images of this forward pass and, per image,
    whether a stage ended. ``frozen`` images (failed ones) take no step; ``backward`` is
    ``loss.backward`` unless the LightningModule passes its ``manual_backward``.
    """
    active = method.progress.active()
    for b in frozen:
        active[b] = False
    optimizer.active = active
    optimizer.set_lrs(method.step_lrs())
    optimizer.masks = method.step_masks()
    evaluated: list[tuple[StepRecord, Tensor | None]] = []

    def evaluate() -> Tensor:  # the closure; L-BFGS (DIP) calls it from its own step
        optimizer.zero_grad(set_to_none=True)
        loss, record, x = method.loss()
        (backward or Tensor.backward)(loss)
        method.before_optimizer_step()  # DIP's backtracking restores weights here (after backward)
        evaluated.append((record, x))
        return loss

    method.optimizer_step(optimizer, evaluate)  # default: evaluate(), then optimizer.step()
    record, x = evaluated[-1]
    return record, x, method.end_step(record)


# --------------------------------------------------------------------------------- the data
class _Steps:
    """The loader of one epoch: the batch, once per optimisation step."""

    def __init__(self, batch: ImageBatch, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __iter__(self) -> Iterator[ImageBatch]:
        return (self.batch for _ in range(self.steps))

    def __len__(self) -> int:
        return self.steps


class ImageBatches(L.LightningDataModule):
    """The images of a run, B at a time: epoch e fits the e-th batch for ``steps`` steps.

    Items are read when their batch comes up (``read``: an ImageItem -> the same item with its
    tensor or its error), so an evaluation of thousands of images holds one batch in memory.
    Unusable images go to ``on_unusable`` and never enter a batch. ``retry_alone`` puts a
    batch's images back at the front of the queue, one per batch.
    """

    def __init__(self, items: Sequence[ImageItem], batch_size: int, steps: int,
                 read: Callable[[ImageItem], ImageItem] | None = None,
                 on_unusable: Callable[[ImageItem], None] | None = None) -> None:
        super().__init__()
        self.queue: deque[list[ImageItem]] = deque(
            list(items[i : i + batch_size]) for i in range(0, len(items), batch_size))
        self.steps = steps
        self.read = read
        self.on_unusable = on_unusable
        self.current: list[ImageItem] = []

    def next_batch(self) -> list[ImageItem]:
        """The next batch of usable images (reading them); [] when none is left."""
        while self.queue:
            items = [self.read(item) if self.read and item.image is None and not item.error else item
                     for item in self.queue.popleft()]
            for item in items:
                if not item.usable and self.on_unusable is not None:
                    self.on_unusable(item)
            usable = [item for item in items if item.usable]
            if usable:
                return usable
        return []

    def train_dataloader(self) -> _Steps:
        self.current = self.next_batch()
        if not self.current:
            # nothing was left after all: an empty epoch, after which the module stops the fit
            return _Steps(ImageBatch(torch.zeros(0), torch.zeros(0, dtype=torch.long), [], []), 0)
        return _Steps(ImageBatch.of(self.current), self.steps)

    def retry_alone(self, items: list[ImageItem]) -> None:
        for item in reversed(items):
            self.queue.appendleft([item])

    @property
    def exhausted(self) -> bool:
        return not self.queue


# --------------------------------------------------------------------------------- the module
@dataclass
class BatchOutputs:
    """A finished batch's final images and their scores (Reconstruction.outputs)."""

    final: Tensor  # the method's result, in its own value range
    result: Tensor  # the result for display, [B, C, H, W] in [0, 1]
    observation: Tensor  # the degraded observation for display
    target: Tensor | None  # the clean image for display (None when there is none)
    metrics: dict[str, Tensor]  # per-image [B] metrics of the result
    extra: dict[str, Tensor] = field(default_factory=dict)  # metrics.extra scores (ExtraMetrics)


class Reconstruction(L.LightningModule):
    """Fits the batches of a run: one epoch per batch of B images, one step per training_step.

    The method (an ``nn.Module``) is registered, with the shared prior and, once a batch has
    started, every image's own tensors as parameters. Per batch the module keeps what the
    callbacks read: ``records`` (every step), ``last_x``, ``last_record``, ``last_stage_ended``,
    ``failed`` (image -> reason: a non-finite loss) and ``items``.
    """

    def __init__(self, method: Method, fused_optimizer: bool = True, nan_check_every: int = 10) -> None:
        super().__init__()
        self.method = method
        self.automatic_optimization = False
        self.fused_optimizer = fused_optimizer
        self.nan_check_every = nan_check_every
        self.optimizer: StackedOptimizer | None = None
        self.items: list[ImageItem] = []
        self.records: list[StepRecord] = []
        self.failed: dict[int, str] = {}
        self.last_x: Tensor | None = None
        self.last_record: StepRecord | None = None
        self.last_stage_ended: list[bool] = []
        self.aborted: str | None = None  # why the current batch stopped (an exception), if it did
        self.steps_run = 0  # optimisation steps of this run, every batch's counted
        self.batch_started_at = 0.0
        self._outputs: BatchOutputs | None = None

    def configure_optimizers(self) -> None:
        # Each batch of images gets its own per-image optimizer when it starts (start_batch).
        return None

    # ------------------------------------------------------------------ per batch
    def start_batch(self, batch: ImageBatch) -> None:
        """The method's set-up for new images, and their optimizer (carrying the previous
        batch's Adam state only with ``dgp.carry_optimizer_state``, SPEC §6.1 quirk 3)."""
        self.method.start(batch)
        previous = self.optimizer if self.method.carry_optimizer_state else None
        self.optimizer = self.method.make_optimizer(fused=self.fused_optimizer)
        if previous is not None:
            carry_state(previous, self.optimizer)

    def on_train_epoch_start(self) -> None:
        """Every epoch is the next batch of images (ImageBatches): start it before any callback
        looks at its first step."""
        self.batch_started_at = time.perf_counter()
        self.records, self.failed, self.aborted = [], {}, None
        self.last_x, self.last_record, self.last_stage_ended = None, None, []
        self._outputs = None
        dm = self.trainer.datamodule
        self.items = list(dm.current) if dm is not None else []
        if not self.items:
            return
        try:
            self.start_batch(ImageBatch.of(self.items))
        except Exception as err:  # the batch is fitted again image by image (ResultRows)
            self._abort(err)

    def on_train_batch_start(self, batch: ImageBatch, batch_idx: int) -> int | None:
        if (not self.items or self.aborted is not None or self.method.progress.all_done()
                or len(self.failed) == len(self.items)):
            return -1  # this batch is finished: on to the next epoch (the next images)
        return None

    def training_step(self, batch: ImageBatch, batch_idx: int) -> None:
        assert self.optimizer is not None
        try:
            record, x, ended = step(self.method, self.optimizer, self.manual_backward, list(self.failed))
        except Exception as err:  # the batch is fitted again image by image (ResultRows)
            self._abort(err)
            return
        self.last_x, self.last_record, self.last_stage_ended = x, record, ended
        self.records.append(record)
        self.steps_run += 1
        if self.nan_check_every and (len(self.records) % self.nan_check_every == 0
                                     or self.method.progress.all_done()):
            self.check_finite()

    def _abort(self, err: Exception) -> None:
        self.aborted = f"{type(err).__name__}: {err}"
        log.debug("batch %s failed:\n%s", [i.id for i in self.items], traceback.format_exc())

    def check_finite(self) -> None:
        """A NaN/inf loss stops that image (recorded as failed); the others carry on."""
        if not self.records:
            return
        window = self.records[-self.nan_check_every:]
        finite = torch.isfinite(torch.stack([r.total for r in window]).cpu())  # [steps, B]
        first_step = len(self.records) - len(window) + 1  # the window's first step, from 1
        for b in torch.nonzero(~finite.all(0)).flatten().tolist():
            if b not in self.failed:
                step = first_step + int(torch.nonzero(~finite[:, b])[0])
                self.failed[b] = f"non-finite loss (NaN or inf) at step {step}"
                self.method.progress.done[b] = True

    def on_train_epoch_end(self) -> None:
        if self.aborted is None:
            self.check_finite()
        dm = self.trainer.datamodule
        if dm is None or dm.exhausted:
            self.trainer.should_stop = True

    @property
    def seconds_per_image(self) -> float:
        return (time.perf_counter() - self.batch_started_at) / max(len(self.items), 1)

    def outputs(self) -> BatchOutputs:
        """The finished batch's results, computed once for every callback that writes them."""
        if self._outputs is None:
            m = self.method
            with torch.no_grad():
                final = m.final_output()
                self._outputs = BatchOutputs(
                    final=final, result=m.display(final), observation=m.observation_for_display(),
                    target=m.clean_for_display(), metrics=m.metrics(final))
        return self._outputs


# --------------------------------------------------------------------------------- building
def make_loggers(cfg: Any, out: Path) -> list[Any]:
    """The run's Lightning loggers (``logger.kind``): CSV (the default), W&B (with the CSV log
    too: ``logs/metrics.csv`` is kept whatever the kind) or none."""
    kind = str(cfg.logger.kind)
    if kind == "none":
        return []
    if kind == "csv":
        return [CSVLogger(save_dir=str(out), name="logs", version="")]
    if kind == "wandb":
        return [CSVLogger(save_dir=str(out), name="logs", version=""), make_wandb_logger(cfg, out)]
    raise ValueError(f"unknown logger.kind {kind!r}; use csv, wandb or none")


def make_trainer(cfg: Any, out: Path | None, callbacks: Sequence[L.Callback] = (),
                 loggers: Sequence[Any] = (), quiet: bool = False) -> L.Trainer:
    """The one Trainer builder: one process's fit on its device, in ``trainer.precision``.

    ``quiet``: no progress bar and no loggers (the adversarial-defense purifier fits images
    hundreds of times inside an attack).
    """
    for pattern in _EXPECTED_WARNINGS:
        # only where Lightning warns (lightning.pytorch, lightning.fabric, lightning_fabric):
        # the same words from any other library still show
        warnings.filterwarnings("ignore", pattern, module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    bar = bool(cfg.trainer.enable_progress_bar) and not quiet
    accelerator = "cuda" if pick_device(cfg).type == "cuda" else "cpu"
    return L.Trainer(
        accelerator=accelerator,
        devices=fit_devices(cfg),
        precision=str(cfg.trainer.precision),
        max_epochs=-1,
        max_steps=-1,
        reload_dataloaders_every_n_epochs=1,
        logger=list(loggers) if loggers and not quiet else False,
        callbacks=[*callbacks, *([StageProgressBar()] if bar else [])],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bar,
        log_every_n_steps=max(1, int(cfg.logger.log_every_n_steps)),
        num_sanity_val_steps=0,
        deterministic=bool(cfg.trainer.deterministic),
        default_root_dir=str(out) if out is not None else None,
    )


def output_callbacks(cfg: Any, out: Path, method: Method, extra_metrics: dict[str, Any],
                     rows: ResultRows) -> list[L.Callback]:
    """What a run writes per image (docs: README "Outputs"), in the order the callbacks need:
    the frames are collected before the files are written; the extra metrics are scored before
    the rows are built; the W&B report (``logger.kind=wandb``) logs the rows' sheets, table and
    summary once they are built."""
    snapshots = StageSnapshots(print_interval=method.print_interval, save_interval=method.save_interval,
                               out_dir=out)
    callbacks: list[L.Callback] = [snapshots, LossLogger(int(cfg.logger.log_every_n_steps)),
                                   ImageFiles(out, snapshots), LossFiles(out)]
    if extra_metrics:
        callbacks.append(ExtraMetrics(extra_metrics))
    if cfg.output.save_G and method.saves_reconstructions:
        callbacks.append(SaveReconstructions(out, cfg))
    callbacks.append(rows)
    if str(cfg.logger.kind) == "wandb":
        callbacks.append(WandbReport(cfg, out, rows=rows, snapshots=snapshots))
    return callbacks


# --------------------------------------------------------------------------------- running
def run(cfg: Any, method: Method, items: Sequence[ImageItem], out: Path, *,
        read: Callable[[ImageItem], ImageItem] | None = None, loggers: Sequence[Any] | None = None,
        callbacks: Sequence[L.Callback] = (), extra_metrics: dict[str, Any] | None = None,
        batch_size: int | None = None, on_row: Callable[[dict[str, Any]], None] | None = None,
        outputs: bool = True, quiet: bool = False) -> list[dict[str, Any]]:
    """Fit every image of ``items`` B at a time; one row per image, in the order of ``items``.

    Items may be read already (``image`` set) or be read by ``read`` when their batch comes up.
    ``on_row`` gets every row as soon as its image is done (evaluate.py's durable results).
    ``outputs`` False writes no files; ``quiet`` shows no progress bar and logs nothing (the
    adversarial-defense purifier fits images hundreds of times inside an attack).
    """
    out = Path(out)
    rows = ResultRows(on_row=on_row, out_dir=out if outputs else None)
    items = list(items)
    B = batch_size or choose_batch_size(cfg, method, items, read)
    data = ImageBatches(items, B, method.total_steps(), read=read, on_unusable=rows.unusable)
    module = Reconstruction(method, fused_optimizer=perf_settings(cfg).fused_optimizer)
    own = output_callbacks(cfg, out, method, extra_metrics or {}, rows) if outputs else [rows]
    if loggers is None:
        loggers = [] if quiet else make_loggers(cfg, out)
    trainer = make_trainer(cfg, out, [*own, *callbacks], loggers, quiet=quiet)
    rows.requeue = data.retry_alone
    trainer.fit(module, datamodule=data)
    order = {item.id: k for k, item in enumerate(items)}
    return sorted(rows.rows, key=lambda r: order.get(r["id"], math.inf))


def choose_batch_size(cfg: Any, method: Method, items: Sequence[ImageItem],
                      read: Callable[[ImageItem], ImageItem] | None) -> int:
    """``trainer.batch_size``, with "auto" measured on a GPU (two short steps of the first image
    at B = 1 and B = 2, genprior.perf.auto_batch_size) and 1 on a CPU."""
    device = pick_device(cfg)
    value = cfg.trainer.batch_size
    cap = method.max_batch_size()  # DIP's L-BFGS: 1
    if cap is not None:
        return min(cap, resolve_batch_size(cap if str(value) == "auto" else value, device, len(items)))
    if str(value) != "auto" or device.type != "cuda" or len(items) < 2:
        return resolve_batch_size(value, device, len(items))
    first = next((i for i in ((read(x) if read and x.image is None else x) for x in items) if i.usable), None)
    if first is None:
        return 1

    def peak_bytes(batch: int) -> int:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        method.to(device)
        method.start(ImageBatch.of([first] * batch))
        optimizer = method.make_optimizer(fused=True)
        for _ in range(2):  # the second step holds the Adam state and the gradients together
            step(method, optimizer)
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
        del optimizer
        torch.cuda.empty_cache()
        return peak

    free, _ = torch.cuda.mem_get_info(device)
    return auto_batch_size(peak_bytes, free, len(items))


# --------------------------------------------------------------------------------------------
# The rows of the tasks that edit saved fits (manipulation, mgan_edit)
# --------------------------------------------------------------------------------------------


@dataclass
class TaskRows:
    """A task's rows in order; every row added also goes to ``on_row`` (evaluate.py's results)."""

    on_row: Callable[[dict[str, Any]], None] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)


@contextmanager
def edit_row(task: str, paths: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """The row of one edit of saved fits: ``id`` (the fits' folder names joined by _, which the
    block may replace by the image ids), ``task`` and ``path``; when the block ends, ``status``
    ok, or failed with the ``error`` if it raised (logged and printed, not raised: one bad file
    or pair must not cost the others); and ``seconds``."""
    start = time.perf_counter()
    row: dict[str, Any] = {"id": "_".join(p.parent.name for p in paths), "task": task,
                           "path": ",".join(str(p) for p in paths)}
    try:
        yield row
        row["status"] = "ok"
    except Exception as err:
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
        log.debug("%s of %s failed:\n%s", task, row["id"], traceback.format_exc())
        print(f"genprior: {task} of {row['id']} failed: {reason}")
        row.update(status="failed", error=reason)
    row["seconds"] = time.perf_counter() - start
