"""Which device a run computes on (core layer)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["fit_devices", "pick_device"]


def pick_device(cfg: Any) -> torch.device:
    """``trainer.accelerator``: auto (CUDA when there is one), gpu/cuda (must be there), cpu."""
    accel = str(cfg.trainer.accelerator)
    if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accel in ("gpu", "cuda"):
        raise ValueError("trainer.accelerator=gpu but no CUDA device is available; use trainer=auto or "
                         "trainer.accelerator=cpu")
    return torch.device("cpu")


def fit_devices(cfg: Any) -> Any:
    """The Trainer's ``devices`` for one process's fit: its current CUDA device on a GPU (each
    evaluate.py rank has its own; ``devices=1`` would put every rank on cuda:0), else 1."""
    if pick_device(cfg).type == "cuda":
        return [torch.cuda.current_device()]
    return 1
