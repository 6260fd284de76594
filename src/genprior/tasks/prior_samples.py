"""Sampling from the prior (DIP paper, supplementary): what each architecture draws before any
fitting.

For every net_type of ``dip.sample_nets`` (the rows) and every seed of ``dip.sample_seeds``
(the columns) the task builds the network of the ``dip`` section with that net_type under
``torch.manual_seed(seed)`` (its random θ) and renders f_θ(z) at ``data.image_size`` with a
train-mode forward, as every DIP fit starts. z is the DIP input of the ``dip`` section
(``input_type``, ``input_depth``, ``input_noise_type``, ``input_var``), drawn once from the
run's ``seed``: as in the paper's figure, every image has the same z and the columns differ in
θ only.

Outputs: ``<output.dir>/prior_samples.png`` (a labelled sheet: one row per architecture with
its label, one column per seed) and one result row per architecture (its parameter count and
the samples' mean, standard deviation and mean absolute neighbour difference, a smoothness
measure: the hourglass without skips draws smoother images than the skip net).

There are no input images, so evaluate.py does not apply: the task raises when given items.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from genprior.device import pick_device
from genprior.errors import InvalidSettingError
from genprior.image_io import labelled_sheet
from genprior.items import ImageItem
from genprior.methods.dip import DIPConfig, check_input_size
from genprior.priors.dip_nets import get_noise

__all__ = ["PRIOR_SAMPLE_TASKS", "SHEET", "draw_input", "render", "run"]

PRIOR_SAMPLE_TASKS = ("dip_prior_samples",)
SHEET = "prior_samples.png"
_LABELS = {"skip": "skip (with skips)", "UNet": "UNet", "ResNet": "ResNet", "texture_nets": "texture nets"}


def _label(net_type: str) -> str:
    if net_type.startswith("skip_depth"):
        return f"hourglass depth {net_type[len('skip_depth'):]}"
    return _LABELS.get(net_type, net_type)


def draw_input(settings: DIPConfig, size: int, seed: int) -> Tensor:
    """The DIP input z ([1, C, size, size], float32) of ``settings``, from its own generator."""
    generator = torch.Generator().manual_seed(int(seed))
    return get_noise(settings.input_depth, settings.input_type, size, settings.input_noise_type,
                     settings.input_var, generator=generator, dtype=torch.float32)


@torch.no_grad()
def render(settings: DIPConfig, z: Tensor, seed: int, device: torch.device | str = "cpu") -> tuple[Tensor, int]:
    """f_θ(z) of ``settings``' network at initialisation: ([3, H, W], parameter count).

    θ is drawn under ``torch.manual_seed(seed)`` in float32 (the global RNG is restored after);
    the forward runs in train mode (BatchNorm with the image's own statistics)."""
    check_input_size(z.shape[-2], z.shape[-1], settings, z.shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = settings.build_net(z.shape[1], 3, dtype=torch.float32)
    net.train().to(device)
    count = sum(p.numel() for p in net.parameters())
    return net(z.to(device))[0].float().cpu(), count


def run(cfg: Any, out: Path, *, items: Sequence[ImageItem] | None = None, method: Any = None,
        on_row: Callable[[dict[str, Any]], None] | None = None, **_: Any) -> list[dict[str, Any]]:
    """One row per architecture and the sheet; ``method`` and the other kwargs of the tasks'
    ``run`` (loggers, callbacks, read) have nothing to act on here (no fit, no images)."""
    if items is not None:
        raise InvalidSettingError("task=dip_prior_samples draws from untrained networks and has no input "
                                  "images: run it with train.py, not evaluate.py")
    base = DIPConfig(**OmegaConf.to_container(cfg.dip, resolve=True))  # type: ignore[arg-type]
    if base.input_type == "image":
        raise InvalidSettingError("task=dip_prior_samples needs dip.input_type noise or meshgrid")
    if not base.sample_nets or not base.sample_seeds:
        raise InvalidSettingError("task=dip_prior_samples needs at least one dip.sample_nets and dip.sample_seeds")
    size, seeds = int(cfg.data.image_size), [int(s) for s in base.sample_seeds]
    device = pick_device(cfg)
    z = draw_input(base, size, int(cfg.seed))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames: list[Tensor] = []
    rows: list[dict[str, Any]] = []
    for net_type in base.sample_nets:
        settings = dataclasses.replace(base, net_type=str(net_type))
        try:
            settings.check()
            started = time.perf_counter()
            samples, count = zip(*(render(settings, z, s, device) for s in seeds))
        except ValueError as err:  # a size the network cannot take, an unknown net_type
            raise InvalidSettingError(f"dip.sample_nets {net_type}: {err}") from None
        x = torch.stack(samples)
        # Networks without a final sigmoid (dip.need_sigmoid=false) are shown min-max normalised.
        shown = x if bool(settings.need_sigmoid) else _min_max(x)
        frames.extend(shown.clamp(0, 1))
        rows.append({
            "id": str(net_type), "status": "ok", "task": "dip_prior_samples", "label": _label(str(net_type)),
            "parameters": int(count[0]), "seeds": seeds, "input_seed": int(cfg.seed), "image_size": size,
            "sample_mean": float(x.mean()), "sample_std": float(x.std()),
            # mean |x(i, j) − x(i, j+1)| and |x(i, j) − x(i+1, j)|: lower is smoother
            "neighbour_difference": float(((x[..., :, 1:] - x[..., :, :-1]).abs().mean()
                                           + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()) / 2),
            "seconds": time.perf_counter() - started,
        })
    sheet = labelled_sheet(frames, len(seeds), labels=[f"seed {s}" for s in seeds] * len(rows),
                           row_labels=[r["label"] for r in rows],
                           title=f"f(z) at initialisation, one z (seed {int(cfg.seed)}), columns: seeds of the weights")
    sheet.save(out / SHEET)
    for row in rows:
        row["outputs"] = {"sheet": str(out / SHEET)}
        if on_row is not None:
            on_row(row)
    return rows


def _min_max(x: Tensor) -> Tensor:
    lo = x.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = x.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return (x - lo) / (hi - lo).clamp(min=1e-8)
