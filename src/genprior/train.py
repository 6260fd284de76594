"""``train.py``: restore the given images by fitting a prior to each one.

Reads top to bottom like the experiment: compose the config, load the images, build the prior,
degradation and method, then for every batch of B images run a Lightning ``Trainer.fit`` in
which one training step is one optimisation step, and write each image's files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from genprior.config import compose_or_exit, to_yaml

log = logging.getLogger("genprior")


@dataclass
class ImageItem:
    """One input image: its tensor (or the reason it cannot be used), class and id."""

    id: str
    path: str
    image: torch.Tensor | None
    class_id: int = -1
    error: str | None = None


def image_generator(seed: int, image_id: str) -> torch.Generator:
    """Each image's own RNG stream, independent of batch size, order and rank."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def run_train(argv: Sequence[str]) -> int:
    cfg = compose_or_exit(argv, "train.py")
    if cfg is None:
        return 0
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    from genprior.factory import build_runner, load_items

    items = load_items(cfg)
    runner = build_runner(cfg)
    rows = runner.run(items, out)
    _write_results(rows, out)
    _print_summary(rows, out, cfg)
    return 0 if any(r["status"] == "ok" for r in rows) or not rows else 1


def fit_batch(
    cfg: DictConfig, method: Any, out: Path, previous_optimizer: Any = None,
    loggers: list[Any] | None = None, extra_callbacks: list[Any] | None = None,
    extra_metrics: dict[str, Any] | None = None, labels: list[int] | None = None,
) -> tuple[list[dict[str, Any]], Any]:
    """Fit one batch of images already loaded into ``method``; returns rows and the optimizer.

    ``extra_metrics`` (``metrics.extra``: LPIPS, NIQE, accuracy, AuC) score each final image
    against its target and ``labels`` (the images' classes) into its row.
    """
    from genprior.callbacks.outputs import ImageOutputs, LossLogger, StageSnapshots
    from genprior.callbacks.progress import StageProgressBar
    from genprior.reconstruction import Reconstruction, StepLoader

    save_interval = list(cfg.dgp.save_interval) if cfg.prior.kind == "biggan" and cfg.dgp.save_interval else None
    snapshots = StageSnapshots(print_interval=method.print_interval, save_interval=save_interval, out_dir=out)
    outputs = ImageOutputs(out, snapshots, extra_metrics=extra_metrics, labels=labels)
    betas = tuple(method.betas)
    from genprior.perf import perf_settings

    module = Reconstruction(method, betas=betas, eps=method.eps, previous_optimizer=previous_optimizer,
                            fused_optimizer=perf_settings(cfg).fused_optimizer)
    callbacks = [snapshots, LossLogger(cfg.logger.log_every_n_steps), outputs, *(extra_callbacks or [])]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(StageProgressBar())
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator if cfg.trainer.accelerator != "auto" else "auto",
        devices=fit_devices(cfg),
        precision=cfg.trainer.precision,
        max_steps=method.total_steps(),
        max_epochs=1,
        logger=loggers if loggers else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        log_every_n_steps=max(1, cfg.logger.log_every_n_steps),
        num_sanity_val_steps=0,
        deterministic=cfg.trainer.deterministic,
        default_root_dir=str(out),
    )
    trainer.fit(module, train_dataloaders=StepLoader(method.total_steps()))
    restore_device(cfg, module)
    return outputs.results, module.optimizer


def restore_device(cfg: DictConfig, module: Any) -> None:
    """Undo the move to the CPU that Lightning's teardown does at the end of every fit.

    The prior (BigGAN G and D, PGGAN) lives inside the module and serves the next batch, and a
    carried optimizer (dgp.carry_optimizer_state) keeps its state: both go back to the device.
    """
    from lightning.fabric.utilities.optimizer import _optimizers_to_device

    from genprior.factory import pick_device

    device = pick_device(cfg)
    if device.type == "cpu":
        return
    module.to(device)
    if getattr(module, "optimizer", None) is not None:
        _optimizers_to_device([module.optimizer], device)


def fit_devices(cfg: DictConfig) -> Any:
    """The one device a batch is fitted on: the process's current CUDA device on a GPU (each
    evaluate.py rank has its own; ``devices=1`` would put every rank on cuda:0), else 1."""
    from genprior.factory import pick_device

    if pick_device(cfg).type == "cuda":
        return [torch.cuda.current_device()]
    return 1


def make_loggers(cfg: DictConfig, out: Path) -> list[Any]:
    kind = cfg.logger.kind
    if kind == "none":
        return []
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return [CSVLogger(save_dir=str(out), name="logs", version="")]
    if kind == "wandb":
        from genprior.wandb_utils import make_wandb_logger

        return [make_wandb_logger(cfg, out)]
    raise ValueError(f"unknown logger.kind {kind!r}; use csv, wandb or none")


def _write_results(rows: list[dict[str, Any]], out: Path) -> None:
    with (out / "results.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=str) + "\n")


def _print_summary(rows: list[dict[str, Any]], out: Path, cfg: DictConfig) -> None:
    print(f"\ngenprior: {cfg.prior.name} / {cfg.task.name} on {len(rows)} image(s)")
    for row in rows:
        if row["status"] != "ok":
            print(f"  {row['id']}: FAILED - {row.get('error')}")
            continue
        parts = []
        if "observation_psnr" in row:
            parts.append(f"observation PSNR {row['observation_psnr']:.2f} dB")
        if "psnr" in row:
            parts.append(f"result PSNR {row['psnr']:.2f} dB")
        if "ssim" in row:
            parts.append(f"SSIM {row['ssim']:.4f}")
        if isinstance(row.get("outputs"), dict):  # manipulation rows (genprior.manipulation)
            parts.append(f"{row['task']}: {row['outputs'].get('gif') or row['outputs'].get('sheet')}")
        print(f"  {row['id']}: " + ", ".join(parts) + f" ({row.get('seconds', 0):.1f} s)")
    print(f"outputs: {out.resolve()}")


_EXTRA_METRICS_CACHE: dict[str, dict[str, Any]] = {}


def build_extra_metrics(cfg: DictConfig) -> dict[str, Any]:
    """``metrics.extra`` built once per process and metric settings (their networks are loaded
    from local files; a missing file gives a metric that reports NaN with instructions)."""
    from omegaconf import OmegaConf

    if not cfg.metrics.extra:
        return {}
    key = OmegaConf.to_yaml(cfg.metrics)
    if key not in _EXTRA_METRICS_CACHE:
        from genprior.metrics_extra import build_metrics

        # Scored on the displayed images, which are in [0, 1] for every prior.
        _EXTRA_METRICS_CACHE[key] = build_metrics(cfg.metrics, value_range=(0.0, 1.0))
    return _EXTRA_METRICS_CACHE[key]


def failed_row(item: ImageItem, error: str) -> dict[str, Any]:
    return {"id": item.id, "path": item.path, "class": item.class_id, "status": "failed", "error": error}


def run_batches(
    cfg: DictConfig, items: list[ImageItem], out: Path, prepare: Any,
    loggers: list[Any] | None = None, callbacks: list[Any] | None = None,
) -> list[dict[str, Any]]:
    """Group usable images into batches of B, fit each, and never let one image sink the rest.

    ``prepare(batch_items)`` returns a method loaded with those images. A batch that raises is
    retried image by image, so the error lands on the image that caused it. ``loggers`` (made
    from the config if None) and extra ``callbacks`` serve every batch.
    """
    rows: list[dict[str, Any]] = []
    usable = []
    for item in items:
        if item.error is not None:
            print(f"genprior: skipping {item.path}: {item.error}")
            rows.append(failed_row(item, item.error))
        else:
            usable.append(item)
    from genprior.perf import batch_size_for

    B = batch_size_for(cfg, usable, prepare)  # trainer.batch_size, "auto" resolved
    loggers = make_loggers(cfg, out) if loggers is None else loggers
    previous_optimizer = None
    extra_metrics = build_extra_metrics(cfg)
    carry = bool(cfg.prior.kind == "biggan" and cfg.dgp.carry_optimizer_state)
    queue = [usable[i : i + B] for i in range(0, len(usable), B)]
    while queue:
        batch = queue.pop(0)
        start = time.perf_counter()
        try:
            method = prepare(batch)
            batch_rows, opt = fit_batch(cfg, method, out, previous_optimizer if carry else None, loggers,
                                        callbacks, extra_metrics, [item.class_id for item in batch])
            previous_optimizer = opt
        except Exception as err:  # one bad image must not cost the others
            if len(batch) > 1:
                queue = [[item] for item in batch] + queue
                continue
            reason = f"{type(err).__name__}: {err}"
            log.debug("image %s failed:\n%s", batch[0].id, traceback.format_exc())
            print(f"genprior: image {batch[0].path} failed: {reason}")
            rows.append(failed_row(batch[0], reason))
            continue
        seconds = (time.perf_counter() - start) / len(batch)
        for item, row in zip(batch, batch_rows):
            row.update({"path": item.path, "seconds": seconds})
            rows.append(row)
    return rows
