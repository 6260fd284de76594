"""Editing an mGANprior inversion: semantic manipulation (paper Fig. 9) and style mixing.

Both tasks start from multi-code fits (genprior.multicode.SavedMultiCode): they invert the
images of ``data.source`` through the engine with the mGANprior method (``mganprior.*``, the
identity degradation, batched like any fit) and save every fit as ``<id>/mgan_fit.pt``, or they
read the files of ``mgan_edit.saved``.

- **Semantic manipulation** (``task=mgan_semantic``). The paper applies InterFaceGAN's latent
  editing to the inverted codes (Sec. 4.3); the released face_semantic_editing.py moves **every
  code** z_n by the same offset t·n̂ along the unit normal n̂ of an attribute's boundary and keeps
  α (SPEC §3.5): x(t) = G2(Σ_n G1(z_n + t·n̂) ⊙ α_n / N). One row of the sheet per attribute,
  one column per strength t, after the target and the inversion.
- **Style mixing** (``task=mgan_style_mixing``). The paper names it (Sec. 4.3) but gives no
  operation and the released code has none, so this is genprior's interpretation. A PGGAN has
  one input (z, at layer 0): unlike StyleGAN it has no per-layer codes to swap, and the
  composed map at layer l is the only thing that reaches G2. "Image B gives layers k and
  above" is therefore realised on the features: both fits run through G2 side by side from
  their composed maps, and at the input of every module j ≥ k, A's map takes B's per-channel
  mean and standard deviation over space (adaptive instance normalisation, Huang & Belongie
  2017: channel statistics carry colour and texture, the normalised map keeps A's layout).
  Layers below k are A's alone, so k = (number of layers) renders A's inversion exactly.

Every image (every pair) gets its own row; an image that cannot be edited fails alone.
Rendering is chunked (``mgan_edit.render_chunk`` edited images per generator pass, each with
its N codes through G1).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from genprior import engine
from genprior.callbacks import SaveReconstructions
from genprior.datamodules import load_items
from genprior.device import pick_device
from genprior.errors import InvalidSettingError
from genprior.image_io import safe_name, save_image, to_uint8, write_grid_sheet
from genprior.items import ImageItem
from genprior.methods import Method, MGANPrior
from genprior.metrics import build_metrics
from genprior.multicode import (
    FIT_FILE,
    SavedMultiCode,
    load_boundary,
    pggan_weights_identity,
    resolve_fit_path,
)
from genprior.precision import run_dtype
from genprior.priors.pggan import PGGANGenerator, compose_features
from genprior.priors.registry import get, load_pggan

__all__ = [
    "MGAN_EDIT_TASKS",
    "CodeRenderer",
    "MGANEdit",
    "adain",
    "run",
    "save_multicode_fits",
    "shift_codes",
    "write_sheet",
]

MGAN_EDIT_TASKS = ("mgan_semantic", "mgan_style_mixing")
ADAIN_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# The edits
# --------------------------------------------------------------------------------------------


def shift_codes(z: Tensor, normal: Tensor, strengths: Sequence[float]) -> Tensor:
    """Every code moved along the unit normal: [S, N, D] with entry s = z + t_s·n̂ (SPEC §3.5)."""
    n = normal.to(z.device, z.dtype).reshape(1, 1, -1)
    t = torch.tensor([float(s) for s in strengths], device=z.device, dtype=z.dtype).view(-1, 1, 1)
    return z[None] + t * n


def adain(x: Tensor, style: Tensor, eps: float = ADAIN_EPS) -> Tensor:
    """x with style's per-channel mean and standard deviation over space ([B, C, H, W])."""
    mu_x, mu_s = x.mean((2, 3), keepdim=True), style.mean((2, 3), keepdim=True)
    sd_x = x.var((2, 3), keepdim=True, unbiased=False).add(eps).sqrt()
    sd_s = style.var((2, 3), keepdim=True, unbiased=False).add(eps).sqrt()
    return (x - mu_x) / sd_x * sd_s + mu_s


class CodeRenderer:
    """A fixed PGGAN rendering multi-code fits, in chunks of ``chunk`` images."""

    def __init__(self, G: PGGANGenerator, weights: dict[str, Any], chunk: int = 8) -> None:
        self.G = G.eval()
        self.weights = weights
        self.chunk = max(1, int(chunk))
        self.device = G.lod.device

    def load(self, path: str | Path) -> SavedMultiCode:
        fit = SavedMultiCode.load(path)
        fit.check(self.G, self.weights)
        return fit

    @torch.no_grad()
    def render(self, fit: SavedMultiCode, z: Tensor | None = None) -> Tensor:
        """G2(Σ_n G1(z_n) ⊙ α_n [/N]) for codes z [M, N, D] (default: the fit's own, M = 1),
        α the fit's; [M, 3, H, W] in [-1, 1] (raw)."""
        z0, alpha = fit.codes(self.device, self.G.dtype)
        z = z0[None] if z is None else z.to(self.device, self.G.dtype)
        out = []
        for i in range(0, z.shape[0], self.chunk):
            part = z[i : i + self.chunk]
            a = alpha[None].expand(part.shape[0], -1, -1)
            out.append(self.G.multi_code(part, a, fit.composing_layer, fit.average_codes))
        return torch.cat(out)

    def composed(self, fit: SavedMultiCode) -> Tensor:
        """The composed feature map at the fit's layer, [1, C, H, W] (as ``multi_code``)."""
        z, alpha = fit.codes(self.device, self.G.dtype)
        features = self.G.head(z, fit.composing_layer)
        return compose_features(features[None], alpha[None], fit.average_codes)

    @torch.no_grad()
    def mix(self, a: SavedMultiCode, b: SavedMultiCode, crossover: int) -> Tensor:
        """A's inversion whose feature maps take B's channel statistics at every module input
        j ≥ ``crossover``; [1, 3, H, W]. ``crossover`` = the number of layers renders A."""
        layers = self.G.sequence()
        lowest = max(a.composing_layer, b.composing_layer)
        if not lowest <= crossover <= len(layers):
            raise InvalidSettingError(
                f"mgan_edit.mix_layers: crossover layer {crossover} must be in {lowest}.."
                f"{len(layers)} (from the fits' composing layer to the number of layers; "
                f"{len(layers)} = nothing from B)")
        styles: dict[int, Tensor] = {}  # B's own map at the input of every module j >= crossover
        if crossover < len(layers):
            g = self.composed(b)
            for j in range(b.composing_layer, len(layers)):
                if j >= crossover:
                    styles[j] = g
                g = layers[j](g)
        h = self.composed(a)
        for j in range(a.composing_layer, len(layers)):
            if j in styles:
                h = adain(h, styles[j])
            h = layers[j](h)
        return h


# --------------------------------------------------------------------------------------------
# Sheets with labels
# --------------------------------------------------------------------------------------------


def write_sheet(rows: Sequence[Sequence[Tensor | None]], row_labels: Sequence[str],
                col_labels: Sequence[str], tile: int, path: Path) -> Path:
    """The PNG of ``rows`` ([3, H, W] in [-1, 1], uint8, or None: an empty cell), each resized
    to ``tile`` x ``tile``, labelled (image_io.write_grid_sheet)."""
    return write_grid_sheet(rows, col_labels, row_labels, path, value_range=(-1.0, 1.0), tile=tile)


def _strength_label(t: float) -> str:
    return f"{t:+g}" if t else "0"


def _write_gif(frames: Sequence[Tensor], tile: int, frame_ms: int, path: Path) -> Path:
    pictures = [Image.fromarray(to_uint8(f)).resize((tile, tile), Image.Resampling.LANCZOS) for f in frames]
    if len(pictures) > 2:
        pictures = pictures + pictures[-2:0:-1]  # there and back, so that it loops smoothly
    first, *rest = pictures
    first.save(path, save_all=True, append_images=rest, duration=int(frame_ms), loop=0)
    return path


# --------------------------------------------------------------------------------------------
# Saving the fits
# --------------------------------------------------------------------------------------------


def _pggan_identity(prior: Mapping[str, Any], method: Any) -> dict[str, Any]:
    return pggan_weights_identity(prior, method.G)


def save_multicode_fits(out_dir: Path, cfg: DictConfig) -> SaveReconstructions:
    """A callback that writes every fitted image's ``mgan_fit.pt`` when its batch ends
    (genprior.multicode), with the ``mganprior`` settings."""
    return SaveReconstructions(out_dir, cfg, file_name=FIT_FILE, build=SavedMultiCode.from_method,
                               identify=_pggan_identity, section="mganprior")


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


@dataclass
class MGANEdit:
    """What ``task=mgan_semantic|mgan_style_mixing`` does, checked from the config before any
    fitting (a missing boundary file or a bad layer stops the run in seconds)."""

    task: str
    settings: DictConfig  # the ``mgan_edit`` section
    saved: list[Path]
    boundaries: dict[str, Tensor]  # attribute -> unit normal (mgan_semantic)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> MGANEdit:
        task = str(cfg.task.name)
        if task not in MGAN_EDIT_TASKS:
            raise InvalidSettingError(f"task {task!r} is not an mGANprior edit; valid: {MGAN_EDIT_TASKS}")
        if cfg.prior.kind != "pggan":
            raise InvalidSettingError(f"task={task} edits an mGANprior (PGGAN) inversion, but "
                                      f"prior.kind is {cfg.prior.kind!r}: add prior=pggan_celebahq "
                                      "(or another pggan_* prior)")
        m = cfg.mgan_edit
        saved = [resolve_fit_path(p) for p in m.saved]
        spec = get(str(cfg.prior.name), "pggan")
        z_dim = int(spec.kwargs.get("z_dim", 512))
        boundaries: dict[str, Tensor] = {}
        if task == "mgan_semantic":
            if not m.attributes or not m.strengths:
                raise InvalidSettingError("task=mgan_semantic needs mgan_edit.attributes and mgan_edit.strengths")
            prefix = str(m.boundary_prefix) if m.boundary_prefix else str(cfg.prior.name)
            boundaries = {str(a): load_boundary(m.boundaries_dir, prefix, str(a), z_dim, seed=int(cfg.seed))
                          for a in m.attributes}
        else:
            if not m.mix_layers:
                raise InvalidSettingError("task=mgan_style_mixing needs mgan_edit.mix_layers")
            num_layers = 2 * (int(np.log2(spec.resolution)) - 1) + 1
            # saved fits say their own composing layer (checked per pair when they are read)
            layer = 0 if saved else int(cfg.mganprior.composing_layer)
            bad = [int(k) for k in m.mix_layers if not layer <= int(k) <= num_layers]
            if bad:
                raise InvalidSettingError(
                    f"mgan_edit.mix_layers {bad} outside {layer}..{num_layers}: from the composing "
                    f"layer (mganprior.composing_layer) to {num_layers}, the number of layers of "
                    f"{cfg.prior.name} ({num_layers} = nothing from the other image)")
            if saved and len(saved) < 2:
                raise InvalidSettingError("task=mgan_style_mixing needs two saved fits: "
                                          "mgan_edit.saved=[a/mgan_fit.pt,b/mgan_fit.pt]")
        if int(m.tile_size) < 8 or int(m.render_chunk) < 1:
            raise InvalidSettingError("mgan_edit.tile_size must be >= 8 and render_chunk >= 1")
        return cls(task=task, settings=m, saved=saved, boundaries=boundaries)

    def jobs(self, paths: Sequence[Path]) -> list[list[Path]]:
        """One fit per semantic edit; every consecutive pair for style mixing."""
        if self.task == "mgan_style_mixing":
            return [[a, b] for a, b in itertools.pairwise(paths)]
        return [[p] for p in paths]

    def edit(self, renderer: CodeRenderer, paths: list[Path], out: Path) -> dict[str, Any]:
        """One edit's row; its files go to ``<out>/<id>/`` (pairs: the ids joined by _)."""
        with engine.edit_row(self.task, paths) as row:
            fits = [renderer.load(p) for p in paths]
            row["id"] = "_".join(safe_name(f.image_id) for f in fits)
            folder = out / row["id"]
            if self.task == "mgan_semantic":
                row["outputs"] = self.semantic(renderer, fits[0], folder)
            else:
                row["outputs"] = self.mixing(renderer, fits[0], fits[1], folder)
        return row

    def semantic(self, renderer: CodeRenderer, fit: SavedMultiCode, folder: Path) -> dict[str, str]:
        """``semantic/<attribute>/<t>.png``, one GIF per attribute and the sheet ``semantic.png``."""
        m = self.settings
        strengths = [float(t) for t in m.strengths]
        tile = int(m.tile_size)
        inversion = renderer.render(fit)[0]
        save_image(inversion, folder / "inversion.png")
        grid, out = [], {"images": str(folder / "semantic")}
        for attribute, normal in self.boundaries.items():
            z = shift_codes(fit.codes(renderer.device, renderer.G.dtype)[0], normal, strengths)
            images = renderer.render(fit, z)
            for t, x in zip(strengths, images):
                save_image(x, folder / "semantic" / safe_name(attribute) / f"{_strength_label(t)}.png")
            out[f"gif_{attribute}"] = str(_write_gif(list(images), tile, int(m.gif_frame_ms),
                                                     folder / f"semantic_{safe_name(attribute)}.gif"))
            grid.append([fit.target, inversion, *images])
        columns = ["target", "inversion", *(f"t = {_strength_label(t)}" for t in strengths)]
        out["sheet"] = str(write_sheet(grid, list(self.boundaries), columns, tile, folder / "semantic.png"))
        return out

    def mixing(self, renderer: CodeRenderer, a: SavedMultiCode, b: SavedMultiCode,
               folder: Path) -> dict[str, str]:
        """``mixing/<A>_from<k>.png`` (A with B's statistics from layer k on) and the reverse,
        and the sheet ``mixing.png``: one row per direction."""
        layers = [int(k) for k in self.settings.mix_layers]
        inv_a, inv_b = renderer.render(a)[0], renderer.render(b)[0]
        grid = []
        for first, second, inv_first, inv_second in ((a, b, inv_a, inv_b), (b, a, inv_b, inv_a)):
            mixed = [renderer.mix(first, second, k)[0] for k in layers]
            for k, x in zip(layers, mixed):
                save_image(x, folder / "mixing" / f"{safe_name(first.image_id)}_from{k}.png")
            grid.append([first.target, inv_first, *mixed, inv_second, second.target])
        # column k: the row's image with the other's statistics from layer k on
        columns = ["target", "inversion", *(f"k={k}" for k in layers), "other inv", "other"]
        rows = [f"A={a.image_id} +B", f"B={b.image_id} +A"]
        sheet = write_sheet(grid, rows, columns, int(self.settings.tile_size), folder / "mixing.png")
        return {"sheet": str(sheet), "images": str(folder / "mixing")}


def build_generator(cfg: DictConfig) -> PGGANGenerator:
    """The run's PGGAN (as the mGANprior method builds it), on the run's device and dtype."""
    p = cfg.prior
    dtype = run_dtype(cfg)
    if p.weights == "random":
        G = load_pggan(str(p.name), random_init_seed=int(p.init_seed), dtype=dtype)
    else:
        G = load_pggan(str(p.name), weights_dir=p.weights_dir, path=p.G_path, dtype=dtype)
    return G.to(pick_device(cfg))


def fit_and_save(cfg: DictConfig, out: Path, *, items: Sequence[ImageItem] | None,
                 method: Method | None, read: Callable[[ImageItem], ImageItem] | None,
                 loggers: Sequence[Any] | None, callbacks: Sequence[L.Callback],
                 on_row: Callable[[dict[str, Any]], None] | None,
                 ) -> tuple[list[dict[str, Any]], CodeRenderer, list[Path]]:
    """mGANprior inverts the images through the engine (batched, ``trainer.batch_size``) and
    each fit is saved as ``<out>/<id>/mgan_fit.pt``."""
    fit_cfg = cfg.copy()
    fit_cfg.task.name = "inversion"  # the identity degradation: the codes reconstruct the image
    if items is None:
        items = load_items(fit_cfg, MGANPrior)
    if cfg.task.name == "mgan_style_mixing" and sum(item.error is None for item in items) < 2:
        raise InvalidSettingError("task=mgan_style_mixing needs two images: data.source=<a folder "
                                  "of two or more images> (or mgan_edit.saved=[a,b])")
    if not isinstance(method, MGANPrior):
        method = MGANPrior.from_config(fit_cfg)
    saver = save_multicode_fits(out, fit_cfg)
    extra = build_metrics(cfg.metrics, value_range=(0.0, 1.0)) if cfg.metrics.extra else {}
    rows = engine.run(fit_cfg, method, items, out, read=read, loggers=loggers,
                      callbacks=[saver, *callbacks], extra_metrics=extra, on_row=on_row)
    G = method.G.to(pick_device(cfg))  # Lightning's teardown leaves the module on the CPU
    weights = saver.weights or pggan_weights_identity(saver.prior, G)
    renderer = CodeRenderer(G, weights, chunk=int(cfg.mgan_edit.render_chunk))
    return rows, renderer, list(dict.fromkeys(saver.written))


def run(cfg: DictConfig, out: Path, *, items: Sequence[ImageItem] | None = None,
        method: Method | None = None, on_row: Callable[[dict[str, Any]], None] | None = None,
        read: Callable[[ImageItem], ImageItem] | None = None,
        loggers: Sequence[Any] | None = None, callbacks: Sequence[L.Callback] = ()) -> list[dict[str, Any]]:
    """``task=mgan_semantic|mgan_style_mixing``: invert and save the images (or read
    ``mgan_edit.saved``), then edit every fit (every consecutive pair). The fits' rows, then one
    row per edit."""
    edit = MGANEdit.from_config(cfg)
    out = Path(out)
    rows = engine.TaskRows(on_row)
    if edit.saved:
        G = build_generator(cfg)
        prior = OmegaConf.to_container(cfg.prior, resolve=True)
        renderer = CodeRenderer(G, pggan_weights_identity(prior, G),  # type: ignore[arg-type]
                                chunk=int(cfg.mgan_edit.render_chunk))
        paths = edit.saved
    else:
        fit_rows, renderer, paths = fit_and_save(cfg, out, items=items, method=method, read=read,
                                                 loggers=loggers, callbacks=callbacks, on_row=on_row)
        rows.rows.extend(fit_rows)  # on_row has had them from the engine
    jobs = edit.jobs(paths)
    if edit.task == "mgan_style_mixing" and not jobs:
        rows.add({"id": "mgan_style_mixing", "task": edit.task, "status": "failed",
             "error": f"style mixing needs two fits, {len(paths)} fitted"})
    # an edit of one image also carries its inversion's metrics (psnr, ssim, ...): evaluate.py
    # keeps the latest row of every id, which is the edit's
    fitted = {r["id"]: r for r in rows.rows if r.get("status") == "ok"}
    for job in jobs:
        row = edit.edit(renderer, job, out)
        inversion = fitted.get(row["id"], {})
        rows.add({**{k: v for k, v in inversion.items() if k not in ("status", "error", "seconds")}, **row})
    return rows.rows
