"""Builds mGANprior from a config (``prior.kind=pggan``) and fits batches through train.py.

The PGGAN and the VGG of the perceptual term are built in the run's dtype
(``trainer.precision``; ``genprior.precision.run_dtype``); the method follows its generator's
dtype, so ``64-true`` runs mGANprior in float64 end to end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from genprior.methods.mganprior import (
    MGANPrior,
    MGANSettings,
    VGGFeatureLoss,
    build_mgan_degradation,
)
from genprior.precision import run_dtype
from genprior.priors.pggan import PGGANGenerator
from genprior.train import ImageItem, image_generator, run_batches


def settings_from_config(m: Any) -> MGANSettings:
    return MGANSettings(
        composing_layer=int(m.composing_layer), z_number=int(m.z_number), iterations=int(m.iterations),
        optimization=str(m.optimization), lr=float(m.lr), l2_lambda=float(m.l2_lambda),
        l1_lambda=float(m.l1_lambda), vgg_lambda=float(m.vgg_lambda), train_alpha=bool(m.train_alpha),
        average_codes=bool(m.average_codes),
        alpha_init=None if m.alpha_init is None else float(m.alpha_init),
        init_type=str(m.init_type), print_interval=int(m.print_interval),
    )


def load_pggan_prior(cfg: DictConfig, device: torch.device) -> PGGANGenerator:
    """The configured PGGAN on ``device`` in the run's dtype (float32 weights copied exactly
    into a float64 network for ``trainer.precision=64-true``)."""
    from genprior.priors.pggan_checkpoints import get_entry, load_pggan

    p = cfg.prior
    entry = get_entry(str(p.name))
    if int(p.resolution) != entry.resolution:
        raise ValueError(f"prior.resolution={p.resolution} but {p.name} is a {entry.resolution}-pixel "
                         f"model; set prior.resolution={entry.resolution} (or pick another prior)")
    dtype = run_dtype(cfg)
    if p.weights == "random":
        G = load_pggan(str(p.name), random_init_seed=int(p.init_seed), dtype=dtype)
    elif p.weights == "pretrained":
        G = load_pggan(str(p.name), weights_dir=p.weights_dir, path=p.G_path, dtype=dtype)
    else:
        raise ValueError(f"prior.weights must be 'pretrained' or 'random', got {p.weights!r}")
    return G.to(device)


class MGANRunner:
    """mGANprior's multi-code inversion (or the single-code baseline) for every batch of images."""

    def __init__(self, cfg: DictConfig) -> None:
        from genprior.factory import pick_device

        self.cfg = cfg
        self.device = pick_device(cfg)
        m = cfg.mganprior
        task = str(cfg.task.name)
        resolution = int(cfg.prior.resolution)
        degradation = build_mgan_degradation(
            task, resolution, sr_factor=int(cfg.task.sr_factor), hole_size=int(m.hole_size),
            mask_path=cfg.task.mask_path, mask_fraction=float(cfg.task.mask_fraction),
            noise_sigma=float(cfg.task.noise_sigma), seed=int(cfg.seed),
        )
        settings = settings_from_config(m)
        perceptual = None
        if settings.vgg_lambda > 0:
            perceptual = VGGFeatureLoss.from_file(
                m.vgg_weights, str(m.vgg_layer), image_size=int(m.image_size),
                loss_type=str(m.vgg_loss_type), scale=float(m.vgg_scale),
            ).to(self.device, run_dtype(cfg))
        G = load_pggan_prior(cfg, self.device)
        self.method = MGANPrior(G, settings, degradation, perceptual=perceptual, task=task,
                                ssim_data_range=float(m.ssim_data_range),
                                ssim_window=str(m.ssim_window))

    def prepare(self, batch: list[ImageItem]) -> MGANPrior:
        images = torch.stack([item.image for item in batch]).to(self.device)
        res = int(self.cfg.prior.resolution)
        if tuple(images.shape[-2:]) != (res, res):
            raise ValueError(f"images are {tuple(images.shape[-2:])} but {self.cfg.prior.name} makes "
                             f"{res}x{res} images")
        gens = [image_generator(int(self.cfg.seed), item.id) for item in batch]
        self.method.start(images, None, [item.id for item in batch], gens)
        return self.method

    def run(self, items: list[ImageItem], out: Path) -> list[dict[str, Any]]:
        return run_batches(self.cfg, items, out, self.prepare)
