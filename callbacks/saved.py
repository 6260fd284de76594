"""``SaveReconstructions``: every fitted image's saved fit when its batch ends.

By default the fit is a DGP ``reconstruction.pt``, used by ``output.save_G=true`` and by the
manipulation tasks, which edit these files (the file format is described in
``genprior.saved``). The mGANprior edit tasks pass their own builder, weights identity and file
name to save ``mgan_fit.pt`` (``genprior.multicode``) the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from genprior.image_io import safe_name
from genprior.saved import FILE_NAME, SavedReconstruction, weights_identity

# build(method, b, prior, weights, task=..., info=...) -> an object with save(path) -> Path
BuildFit = Callable[..., Any]
# identify(prior, method) -> the identity of the method's pretrained generator weights
IdentifyWeights = Callable[[Mapping[str, Any], Any], dict[str, Any]]


def dgp_weights_identity(prior: Mapping[str, Any], method: Any) -> dict[str, Any]:
    return weights_identity(prior, method.G_weight)


class SaveReconstructions(L.Callback):
    """Writes ``<out_dir>/<image id>/<file_name>`` for every image of a batch that did not fail.

    ``section`` is the config section recorded with the fit (its method's settings), next to
    the seed and the image's source path.
    """

    def __init__(self, out_dir: Path, cfg: DictConfig, *, file_name: str = FILE_NAME,
                 build: BuildFit = SavedReconstruction.from_method,
                 identify: IdentifyWeights = dgp_weights_identity, section: str = "dgp") -> None:
        self.out_dir = Path(out_dir)
        self.file_name = file_name
        self.build = build
        self.identify = identify
        self.task = str(cfg.task.name)
        self.prior: dict[str, Any] = OmegaConf.to_container(cfg.prior, resolve=True)  # type: ignore[assignment]
        self.info = {"seed": int(cfg.seed), section: OmegaConf.to_container(cfg[section], resolve=True)}
        self.weights: dict[str, Any] | None = None  # computed once, at the first save
        self.written: list[Path] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if pl_module.aborted is not None or not pl_module.items:
            return
        method = pl_module.method
        if self.weights is None:
            self.weights = self.identify(self.prior, method)
        for b, item in enumerate(pl_module.items):
            if b in pl_module.failed:
                continue
            fit = self.build(method, b, self.prior, self.weights, task=self.task,
                             info={**self.info, "source": str(item.path)})
            self.written.append(fit.save(self.out_dir / safe_name(method.ids[b]) / self.file_name))
