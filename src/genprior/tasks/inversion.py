"""DIP's network-inversion experiments: natural pre-images, activation maximisation, enhancement.

Every fit goes through ``genprior.engine.run`` with ``genprior.methods.Inversion``; this module
only orchestrates several fits and assembles their labelled sheets (docs/inversion.md):

- ``dip_preimage`` / ``tv_preimage``: per image, one fit per prior of ``inversion.priors`` (rows)
  and layer of ``inversion.layers`` (columns); ``<out>/<id>/preimage.png`` shows the original
  image, then the pre-image of every layer, one row per prior;
- ``dip_activation_maximization`` / ``tv_activation_maximization``: one fit per class of
  ``inversion.classes`` (the items are the classes, there is no input image) and prior;
  ``<out>/activation_maximization.png`` has a column per class (its ImageNet name), a row per prior;
- ``dip_enhancement``: one DIP fit of each image to itself; ``<out>/<id>/enhancement.png`` shows
  the original, then per frame of ``inversion.frames`` the boosted image (top) and the coarse
  image (bottom).

Each fit's own files are under ``<out>/fits/<prior>_<layer>/`` (``fits/dip`` for enhancement).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor

from genprior import engine
from genprior.datamodules import imagenet_class_name, load_items
from genprior.errors import InvalidSettingError
from genprior.features import build_classifier, check_weights_file
from genprior.image_io import safe_name, write_grid_sheet
from genprior.items import ImageItem
from genprior.methods import Inversion
from genprior.methods.inversion import INVERSION_TASKS

__all__ = ["INVERSION_TASKS", "check", "class_items", "class_name", "reads_images", "run", "write_sheet"]

_PREIMAGE = ("dip_preimage", "tv_preimage")
_ACTIVATION = ("dip_activation_maximization", "tv_activation_maximization")


def check(cfg: Any) -> None:
    """The classifier's weights file (not for enhancement, which has none), checked before
    anything is written or logged. The images' files are the entry point's to list
    (``reads_images``), as for every task that reads ``data.*``."""
    settings = cfg.inversion
    if settings.objective != "reconstruction" and settings.classifier_weights != "random":
        check_weights_file(str(settings.classifier), settings.classifier_weights)


def reads_images(cfg: Any) -> bool:
    """Whether the task fits the images ``data.*`` names (activation maximisation has none:
    its items are ``inversion.classes``)."""
    return str(cfg.task.name) in INVERSION_TASKS and str(cfg.task.name) not in _ACTIVATION


def run(cfg: Any, out: Path, *, items: Sequence[ImageItem] | None = None, method: Any = None,
        loggers: Sequence[Any] | None = None, callbacks: Sequence[L.Callback] = (),
        on_row: Callable[[dict[str, Any]], None] | None = None,
        read: Callable[[ImageItem], ImageItem] | None = None) -> list[dict[str, Any]]:
    """One row per image (per class for activation maximisation); ``method`` is not used: every
    fit builds its own ``Inversion`` (one shared classifier)."""
    task = str(cfg.task.name)
    out = Path(out)
    fit = _Fits(cfg, out, loggers, callbacks, read)
    if task in _ACTIVATION:
        if items is not None:
            raise InvalidSettingError(f"task={task} has no input images (its items are "
                                      "inversion.classes): run it with train.py, not evaluate.py")
        rows = activation_maximization(cfg, out, fit)
    else:
        if items is None:
            items = load_items(cfg, Inversion)
        rows = preimages(cfg, out, list(items), fit) if task in _PREIMAGE else enhancement(cfg, out, list(items), fit)
    for row in rows:
        row["task"] = task
        if "sheet" in row:  # train.py's summary prints it
            row["outputs"] = {"sheet": row["sheet"]}
        if on_row is not None:
            on_row(row)
    return rows


# ------------------------------------------------------------------------------ the fits
class _Collect(L.Callback):
    """Keeps every finished image's displayed result, original and extra images (on the CPU)."""

    def __init__(self) -> None:
        self.result: dict[str, Tensor] = {}
        self.original: dict[str, Tensor] = {}
        self.extra: dict[str, dict[str, Tensor]] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if pl_module.aborted is not None or not pl_module.items:
            return
        method, outputs = pl_module.method, pl_module.outputs()
        for b, image_id in enumerate(method.ids):
            if b in pl_module.failed:
                continue
            self.result[image_id] = outputs.result[b].detach().float().cpu()
            self.original[image_id] = outputs.observation[b].detach().float().clamp(0, 1).cpu()
            self.extra[image_id] = {k: v.detach().float().cpu()
                                    for k, v in method.extra_images(outputs.final, b).items()}


class _Fits:
    """Runs one configuration of the method over the items through the engine."""

    def __init__(self, cfg: Any, out: Path, loggers: Sequence[Any] | None,
                 callbacks: Sequence[L.Callback], read: Callable[[ImageItem], ImageItem] | None) -> None:
        self.cfg, self.out, self.loggers, self.callbacks, self.read = cfg, out, loggers, callbacks, read
        self.classifier: Any = None

    def __call__(self, items: list[ImageItem], name: str, **overrides: Any) -> tuple[list[dict[str, Any]], _Collect]:
        cfg = OmegaConf.merge(self.cfg, OmegaConf.create(_nested(overrides)))
        settings = cfg.inversion
        if settings.objective != "reconstruction" and self.classifier is None:
            self.classifier = build_classifier(str(settings.classifier), settings.classifier_weights,
                                               int(cfg.seed))
        method = Inversion.from_config(cfg, classifier=self.classifier)
        collect = _Collect()
        rows = engine.run(cfg, method, items, self.out / "fits" / name, read=self.read,
                          loggers=self.loggers, callbacks=[*self.callbacks, collect])
        return rows, collect


def _nested(overrides: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    return tree


def _merge_rows(items: list[ImageItem], fits: dict[str, list[dict[str, Any]]],
                keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One row per item from the rows of every fit: ``<fit>_<key>`` values, summed seconds,
    failed when any fit failed (with the first error)."""
    merged: dict[str, dict[str, Any]] = {}
    for item in items:
        merged[item.id] = {"id": item.id, "path": item.path, "class": item.class_id, "status": "ok",
                           "error": None, "seconds": 0.0}
    for name, rows in fits.items():
        for row in rows:
            target = merged.setdefault(row["id"], {"id": row["id"], "status": "ok", "error": None,
                                                   "seconds": 0.0})
            target["seconds"] += float(row.get("seconds") or 0.0)
            if row.get("status") != "ok" and target["status"] == "ok":
                target.update(status="failed", error=f"{name}: {row.get('error')}")
            for key in keys:
                if key in row:
                    target[f"{name}_{key}"] = row[key]
    return merged


# ------------------------------------------------------------------------------ the tasks
def preimages(cfg: Any, out: Path, items: list[ImageItem], fit: _Fits) -> list[dict[str, Any]]:
    """Per image, the pre-image of every layer under every prior, and the sheet."""
    s = cfg.inversion
    priors, layers = [str(p) for p in s.priors], [str(name) for name in s.layers]
    runs: dict[str, list[dict[str, Any]]] = {}
    collected: dict[tuple[str, str], _Collect] = {}
    for prior in priors:
        for layer in layers:
            name = f"{prior}_{layer}"
            runs[name], collected[prior, layer] = fit(
                items, name, **{"prior.kind": prior, "inversion.layer": layer, "inversion.objective": "preimage"})
    rows = _merge_rows(items, runs, ["feature_loss"])
    for image_id, row in rows.items():
        first = next((c for c in collected.values() if image_id in c.result), None)
        if first is None:
            continue
        grid = [[first.original[image_id] if r == 0 else None]
                + [collected[prior, layer].result.get(image_id) for layer in layers]
                for r, prior in enumerate(priors)]
        path = out / safe_name(image_id) / "preimage.png"
        write_sheet(grid, ["original", *layers], [p.upper() for p in priors], path)
        row["sheet"] = str(path)
    return list(rows.values())


def activation_maximization(cfg: Any, out: Path, fit: _Fits) -> list[dict[str, Any]]:
    """One image per class and prior maximising the class unit; the sheet over classes."""
    s = cfg.inversion
    items = class_items([int(c) for c in s.classes], int(cfg.data.image_size))
    priors = [str(p) for p in s.priors]
    runs: dict[str, list[dict[str, Any]]] = {}
    collected: dict[str, _Collect] = {}
    for prior in priors:
        runs[prior], collected[prior] = fit(items, prior, **{"prior.kind": prior,
                                                            "inversion.objective": "activation"})
    rows = _merge_rows(items, runs, ["unit_activation"])
    grid = [[collected[p].result.get(item.id) for item in items] for p in priors]
    labels = [f"{item.class_id}: {class_name(item.class_id)}" for item in items]
    path = out / "activation_maximization.png"
    if any(x is not None for row in grid for x in row):  # no sheet when every fit failed
        write_sheet(grid, labels, [p.upper() for p in priors], path)
        for row in rows.values():
            row["sheet"] = str(path)
    return list(rows.values())


def enhancement(cfg: Any, out: Path, items: list[ImageItem], fit: _Fits) -> list[dict[str, Any]]:
    """One DIP fit of each image to itself; the coarse and boosted frames as a labelled strip."""
    frames = sorted(int(t) for t in cfg.inversion.frames)
    rows_of_fit, collect = fit(items, "dip", **{"prior.kind": "dip", "inversion.objective": "reconstruction"})
    rows = _merge_rows(items, {"dip": rows_of_fit}, ["psnr"])
    for image_id, row in rows.items():
        if image_id not in collect.result:
            continue
        extra, original = collect.extra[image_id], collect.original[image_id]
        top = [original] + [extra[f"enhanced_{t}"] for t in frames]
        bottom = [None] + [extra[f"coarse_{t}"] for t in frames]
        path = out / safe_name(image_id) / "enhancement.png"
        write_sheet([top, bottom], ["original", *(f"iteration {t}" for t in frames)], ["enhanced", "coarse"], path)
        row["sheet"] = str(path)
    return list(rows.values())


# ------------------------------------------------------------------------------ helpers
def class_name(index: int) -> str:
    """The ImageNet-1k class's first name (the index when it is not an ImageNet-1k class)."""
    try:
        return imagenet_class_name(index).split(",")[0]
    except Exception:  # a class index outside ImageNet-1k, or timm without the class files
        return f"class {index}"


def class_items(classes: Sequence[int], size: int) -> list[ImageItem]:
    """Activation maximisation's items: one per class, with a gray placeholder image (the fit
    never reads it; it sets the image size) and the class as the unit to maximise."""
    gray = torch.zeros(3, size, size)  # 0 in [-1, 1]: mid-gray
    return [ImageItem(id=f"class{c:04d}_{safe_name(class_name(c))}", path=f"imagenet_class:{c}",
                      class_id=int(c), image=gray) for c in classes]


def write_sheet(grid: Sequence[Sequence[Tensor | None]], col_labels: Sequence[str],
                row_labels: Sequence[str], path: Path, min_size: int = 128) -> Path:
    """The PNG of the [3, H, W] images in [0, 1] of ``grid`` (None: an empty cell), labelled
    (image_io.write_grid_sheet); small images are enlarged (nearest, by an integer factor) to at
    least ``min_size``."""
    h, w = next(x for row in grid for x in row if x is not None).shape[-2:]
    scale = max(1, -(-min_size // max(h, w)))
    return write_grid_sheet(grid, col_labels, row_labels, path, tile=(h * scale, w * scale),
                            resample=Image.Resampling.NEAREST)
