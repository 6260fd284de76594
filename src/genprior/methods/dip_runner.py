"""Deep Image Prior as a method of the reconstruction LightningModule.

``DIPMethod`` (methods/dip.py) is the notebooks' loop for B images in plain torch. ``DIPFit``
gives it the interface the module and callbacks use (the same as DGP's): one stage of
``num_iter`` iterations, one optimizer group with the stacked network weights, per-image
records. ``DIPRunner`` turns loaded images into observations (AWGN for denoising, PIL-Lanczos
LR images for super-resolution, a mask image for inpainting, the image itself for JPEG
artifact removal) and fits them through ``genprior.train.run_batches``.

Observations are made in float32 exactly as the notebooks make them (uint8 / 255 in float32,
noise added, LR images resized), then cast to the run's dtype (``trainer.precision``): with
``64-true`` the nets, z, observation, mask, forward model, losses, EMA and Adam state are all
float64 (TRACES_F64.md, dtype rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from genprior.methods.dip import MASK_SHAPES, DIPMethod, DIPSettings, crop_tensor_to_multiple, psnr
from genprior.metrics import ssim
from genprior.precision import run_dtype
from genprior.schedule import Progress, Stage
from genprior.train import ImageItem, image_generator, run_batches


def unit_range(image: Tensor) -> Tensor:
    """A loaded image ([-1, 1] float32, u8 / 255 normalised) as the notebooks' ``pil_to_np``
    gives it: u8 / 255 in float32, bit for bit.

    Mapping back with (x + 1) / 2 is one ulp off for 63 of the 256 values, so the 8-bit values
    are recovered first (exactly: they are within 1e-5 of integers after the scaling).
    """
    u8 = ((image.to(torch.float32) + 1) * 127.5).round().clamp(0, 255)
    return u8 / 255


@dataclass
class DIPRecord:
    """Per-image values of one DIP step ([B] tensors), in the shape the callbacks expect."""

    logs: dict[str, Tensor]
    total: Tensor
    active: Tensor

    def reported(self) -> dict[str, Tensor]:
        return dict(self.logs)


class DIPFit:
    """Adapter: a ``DIPMethod`` driven one Lightning step at a time."""

    def __init__(self, dip: DIPMethod, ids: list[str], observation_display: Tensor,
                 hole_box: tuple[int, int, int, int] | None = None,
                 ssim_data_range: float | None = None) -> None:
        self.dip = dip
        self.hole_box = hole_box
        self.ssim_data_range = ssim_data_range
        self.ids = ids
        self.batch_size = dip.num_images
        s = dip.settings
        stage = Stage(iterations=int(s.num_iter), G_lr=0.0, z_lr=0.0, ftr_num=0, ft_num=0,
                      lr_ratio=1.0, w_D_loss=0.0, w_mse=1.0, w_percep=0.0, use_in=False)
        self.progress = Progress([stage], self.batch_size)
        self.step = 0
        self._observation_display = observation_display
        self.last_output: Tensor | None = None

    # --- optimisation -------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        return [{"name": "net", "params": list(self.dip.nets.parameters())}]

    def step_lrs(self) -> dict[str, Tensor]:
        lr = self.dip.lr_for_step(self.step)
        active = self.progress.active().to(torch.float64)
        return {"net": active * lr}

    def loss(self) -> tuple[Tensor, DIPRecord, Tensor | None]:
        total, logs = self.dip.step_loss(self.step)
        record = DIPRecord(logs=logs, total=logs["loss"], active=self.progress.active())
        # Snapshots show the averaged output (what DIP reports); none without averaging.
        return total, record, self.dip.output_ema

    def before_optimizer_step(self) -> None:
        self.dip.before_optimizer_step()  # backtracking restores after backward (SPEC §8.1)

    def end_step(self, record: DIPRecord) -> list[bool]:
        self.step += 1
        stop = [False] * self.batch_size
        if self.dip.settings.stop_mse > 0:  # ends the fit: DIP has one stage
            stop = (self.dip.last_mse < self.dip.settings.stop_mse).tolist()
        return self.progress.end_step(stop)

    def total_steps(self) -> int:
        return self.progress.total_steps()

    @property
    def print_interval(self) -> int:
        return int(self.dip.settings.show_every)

    betas = (0.9, 0.999)  # the notebooks' Adam defaults
    eps = 1e-8

    # --- reporting ----------------------------------------------------------------------
    def final_output(self) -> Tensor:
        out, ema = self.dip.result()
        self.last_output = out.detach()
        final = (ema if ema is not None else out).detach()
        if self.dip.task == "colorization" and self.dip.clean is not None:
            # As mGANprior's colorization result: the target's Y with the output's CbCr.
            from genprior.methods.mganprior import ycbcr_recombine

            final = ycbcr_recombine(final.clamp(0, 1), self.dip.clean)
        return final

    @staticmethod
    def display(x: Tensor) -> Tensor:
        return x.detach().clamp(0, 1)  # in the run's dtype; the PNG writer quantises

    def observation_for_display(self) -> Tensor:
        return self._observation_display

    def clean_for_display(self) -> Tensor | None:
        return self.dip.clean

    @torch.no_grad()
    def metrics(self, x: Tensor | None) -> dict[str, Tensor]:
        if self.dip.clean is None or x is None:
            return {}
        clean, result = self.dip.clean, x.clamp(0, 1)
        out = {"psnr": psnr(clean, result)}
        # SSIM (metrics.ssim_data_range) and the hole's PSNR/SSIM, for the DIP columns of the
        # DGP and mGANprior tables; the notebooks report PSNR only.
        if self.ssim_data_range is not None and min(clean.shape[-2:]) >= 7:
            out["ssim"] = ssim(result, clean, data_range=self.ssim_data_range)
        if self.hole_box is not None:
            top, bottom, left, right = self.hole_box
            crop_r, crop_c = result[..., top:bottom, left:right], clean[..., top:bottom, left:right]
            out["psnr_hole"] = psnr(crop_c, crop_r)
            if self.ssim_data_range is not None:
                out["ssim_hole"] = ssim(crop_r, crop_c, data_range=self.ssim_data_range)
        return out

    def extra_images(self, x: Tensor, b: int) -> dict[str, Tensor]:
        if self.last_output is None:
            return {}
        return {"result_last_iterate": self.last_output[b].clamp(0, 1)}

    @torch.no_grad()
    def observation_metrics(self, b: int) -> dict[str, float]:
        clean = self.dip.clean
        obs = self._observation_display
        if clean is None or obs.shape != clean.shape:
            return {}
        out = {"observation_psnr": float(psnr(clean[b : b + 1], obs[b : b + 1])[0])}
        if self.dip.task == "super_resolution":
            # The DIP paper's "bicubic" row: PIL bicubic upsampling of the LR image (the SR
            # notebook's baseline); observation_psnr above is the nearest-neighbour one.
            from genprior.methods.dip import sr_baselines

            # values k/255 in any dtype: * 255 and round give back the uint8 LR image exactly
            lr = self.dip.observation[b].detach().cpu().clamp(0, 1)
            lr_img = Image.fromarray((lr.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            bicubic = sr_baselines(lr_img, (clean.shape[-1], clean.shape[-2]))["bicubic"]
            out["bicubic_psnr"] = float(psnr(clean[b : b + 1].cpu(), bicubic[None].to(clean.dtype))[0])
        return out

    def image_info(self, b: int) -> dict[str, Any]:
        return {"fell_back_steps": None}


class DIPRunner:
    """Builds DIP observations from loaded images and fits them batch by batch."""

    def __init__(self, cfg: DictConfig) -> None:
        from genprior.factory import pick_device

        self.cfg = cfg
        self.device = pick_device(cfg)
        self.dtype = run_dtype(cfg)  # float64 for trainer.precision=64-true
        self.settings = DIPSettings(**OmegaConf.to_container(cfg.dip, resolve=True))  # type: ignore[arg-type]

    def _observation(self, clean: Tensor, item: ImageItem) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """(observation, mask, ground truth, observation shown next to the result) for one image,
        in float32 as the notebooks make them (``prepare`` casts them to the run's dtype)."""
        s = self.settings
        task = s.task
        if task == "denoising":
            gen = image_generator(int(self.cfg.seed), item.id)
            noise = torch.randn(clean.shape, generator=gen, dtype=torch.float32)
            noisy = (clean + noise * s.noise_std).clamp(0, 1)
            return noisy, None, clean, noisy
        if task == "super_resolution":
            f = int(s.sr_factor)
            h, w = clean.shape[-2:]
            hr = clean[..., : h - h % f, : w - w % f]
            img = Image.fromarray((hr.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            lr_img = img.resize((hr.shape[-1] // f, hr.shape[-2] // f), Image.Resampling.LANCZOS)
            lr = torch.from_numpy(np.asarray(lr_img, dtype=np.float32) / 255).permute(2, 0, 1)
            shown = torch.nn.functional.interpolate(lr[None], scale_factor=f, mode="nearest")[0]
            return lr, None, hr, shown
        if task == "jpeg_artifacts":
            return clean, None, None, clean
        if task == "colorization":
            from genprior.degradations import MGANPRIOR_GRAY_WEIGHTS, Gray

            gray = Gray(MGANPRIOR_GRAY_WEIGHTS, value_range=(0.0, 1.0)).apply(clean[None])[0]
            return gray, None, clean, gray
        if task in ("inpainting", "restoration"):
            if task == "restoration":
                gen = image_generator(int(self.cfg.seed), item.id)
                draw = torch.rand(clean.shape[-2:], generator=gen, dtype=torch.float32)
                mask = (draw > s.mask_keep_above).to(torch.float32)[None]
            elif s.mask_shape != "file":
                top, bottom, left, right = self.hole_box(*clean.shape[-2:])
                mask = torch.ones(1, *clean.shape[-2:], dtype=torch.float32)
                mask[:, top:bottom, left:right] = 0.0
            else:
                path = self.cfg.task.mask_path
                if not path:
                    raise ValueError("DIP inpainting needs a mask image: set task.mask_path=<file> (white = known)")
                m = Image.open(path).convert("L")
                if m.size != (clean.shape[-1], clean.shape[-2]):
                    m = m.resize((clean.shape[-1], clean.shape[-2]), Image.Resampling.NEAREST)
                mask = torch.from_numpy((np.asarray(m) > 127).astype(np.float32))[None]
            return clean * mask, mask, clean, clean * mask
        raise ValueError(f"DIP task {task!r} is not available in train.py (flash_no_flash needs two images)")

    def hole_box(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """(top, bottom, left, right) of the generated inpainting hole, None for other masks."""
        from genprior.degradations import CenterSquareMask, center_hole_box

        s = self.settings
        if s.task != "inpainting" or s.mask_shape == "file":
            return None
        if s.mask_shape == "dgp_center_hole":
            return center_hole_box(height, width)
        if s.mask_shape == "center_square":
            return CenterSquareMask(int(s.hole_size)).metric_box(height, width)
        raise ValueError(f"dip.mask_shape must be one of {', '.join(MASK_SHAPES)}, got {s.mask_shape!r}")

    def prepare(self, batch: list[ImageItem]) -> DIPFit:
        obs, masks, cleans, shown = [], [], [], []
        for item in batch:
            x01 = unit_range(item.image)
            x01 = crop_tensor_to_multiple(x01[None], int(self.settings.crop_multiple))[0]
            o, m, c, d = self._observation(x01, item)
            obs.append(o)
            masks.append(m)
            cleans.append(c)
            shown.append(d)
        if len({tuple(o.shape) for o in obs}) > 1:
            raise ValueError("images of different sizes cannot share a DIP batch; use trainer.batch_size=1")
        # The one cast to the run's dtype; DIPMethod computes in the observation's dtype.
        device, dtype = self.device, self.dtype
        observation = torch.stack(obs).to(device, dtype)
        mask = torch.stack(masks).to(device, dtype) if masks[0] is not None else None
        clean = torch.stack(cleans).to(device, dtype) if cleans[0] is not None else None
        seed = int(self.cfg.seed)
        dip = DIPMethod(self.settings, None, observation, mask=mask, clean=clean, seed=seed).to(device)
        return DIPFit(dip, [item.id for item in batch], torch.stack(shown).to(device, dtype),
                      hole_box=self.hole_box(*observation.shape[-2:]),
                      ssim_data_range=float(self.settings.ssim_data_range))

    def run(self, items: list[ImageItem], out: Path) -> list[dict[str, Any]]:
        return run_batches(self.cfg, items, out, self.prepare)
