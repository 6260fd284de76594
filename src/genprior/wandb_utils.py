"""W&B: offline unless the user is logged in; the API key is never read into logs or configs."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def wandb_logged_in() -> bool:
    """True if an API key is available (env var or ~/.netrc entry), without reading it out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def resolve_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if wandb_logged_in() else "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.mode must be auto, online, offline or disabled, got {mode!r}")
    return mode


def make_wandb_logger(cfg: DictConfig, out: Path) -> Any:
    from lightning.pytorch.loggers import WandbLogger

    mode = resolve_mode(str(cfg.logger.mode))
    logger = WandbLogger(
        project=cfg.logger.project, entity=cfg.logger.entity, save_dir=str(out), mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    return logger
