"""Editing a fitted image: random jittering, morphing and category transfer (SPEC §9).

After DGP has fitted a generator G_θ* and latent z* to an image (DGP paper, Section 4.2):

- **jitter** renders G_θ*(z* + std·n, y) for n ~ N(0, I), 30 samples at each std in
  (0.3, 0.5, 0.7), without instance norm: variations of the image around the fit;
- **morphing** renders, for λ = 0, 0.1, …, 1, the generator whose every state entry (buffers
  included) is (1-λ)·θ_a + λ·θ_b, at (1-λ)·z_a + λ·z_b and the class vector
  (1-λ)·e_a + λ·e_b, where e = shared(y) under each image's own (possibly fine-tuned) embedding;
- **category transfer** renders G_θ*(z*, c) for a list of other classes c.

Every edit starts from a :class:`genprior.saved.SavedReconstruction`: ``task=jitter`` /
``morphing`` / ``category_transfer`` fit the images first and save them, or read the files given
in ``manipulation.saved``. Deliberate differences from the reference:

- morph frames run from the *first* image of the pair (frame 001, λ = 0) to the second
  (frame 011); the reference's frame 001 is its second image;
- morphing two images of different classes needs ``manipulation.interpolate_class=true``
  (example.py always interpolates the class vectors; main.py only morphs same-class pairs);
- the jitter noise comes from the image's own seeded stream (``seed`` and the image id), not
  from the global CUDA generator, so it is the same on any device and batch.
"""

from __future__ import annotations

import difflib
import importlib.util
import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio.v2 as imageio
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor
from torch.func import functional_call

from genprior import engine
from genprior.callbacks import SaveReconstructions
from genprior.datamodules import imagenet_class_name, imagenet_info, load_items
from genprior.device import pick_device
from genprior.image_io import (
    ImageLoadError,
    labelled_sheet,
    load_image,
    safe_name,
    save_image,
    to_tensor,
)
from genprior.items import ImageItem, image_generator
from genprior.methods import DGP
from genprior.metrics import build_metrics
from genprior.precision import run_dtype
from genprior.priors.registry import build_biggan
from genprior.saved import SavedReconstruction, resolve_saved_path, weights_identity

__all__ = [
    "MANIPULATION_TASKS",
    "Fitted",
    "FittedPrior",
    "Manipulation",
    "category_transfer",
    "interpolate_states",
    "jitter",
    "morph",
    "resolve_classes",
    "run",
]

MANIPULATION_TASKS = ("jitter", "morphing", "category_transfer")


# --------------------------------------------------------------------------------------------
# Rendering fitted generators
# --------------------------------------------------------------------------------------------


@dataclass
class Fitted:
    """One reconstruction ready to render: the full generator state, z and the class."""

    image_id: str
    state: dict[str, Tensor]
    z: Tensor  # [dim_z]
    class_id: int
    use_in: bool = False
    in_initialized: tuple[str, ...] = ()
    path: Path | None = None

    def embedding(self) -> Tensor:
        """shared(y) under this image's own class embedding (fine-tuned with update_embed)."""
        return self.state["shared.weight"][self.class_id]


class FittedPrior:
    """The shared pretrained generator, its state and weights identity, and a renderer."""

    def __init__(self, G: torch.nn.Module, base: dict[str, Tensor], prior: dict[str, Any],
                 weights: dict[str, Any] | None = None, chunk: int = 32) -> None:
        if G.training:
            # Train-mode BN/SN (prior.random_G) would make every render depend on its batch
            # and write the spectral-norm vectors of the state being rendered.
            raise ValueError("manipulation renders the generator in eval mode; prior.random_G "
                             "(train mode) is not supported")
        self.G = G
        self.base = base
        self.prior = prior
        self.weights = weights or weights_identity(prior, base)
        self.chunk = max(1, int(chunk))
        self.device = next(iter(base.values())).device

    def fitted(self, rec: SavedReconstruction) -> Fitted:
        """Check a saved reconstruction against this prior and make it renderable."""
        rec.check_architecture(self.prior)
        rec.check_against(self.base, self.weights, self.G.dim_z, self.G.n_classes)
        dtype = next(self.G.parameters()).dtype  # the run's precision, whatever the file's
        return Fitted(image_id=rec.image_id, state=rec.state(self.base), z=rec.z.to(self.device, dtype),
                      class_id=rec.class_id, use_in=rec.use_in,
                      in_initialized=tuple(rec.in_initialized), path=rec.path)

    def load(self, path: str | Path) -> Fitted:
        return self.fitted(SavedReconstruction.load(path))

    @torch.no_grad()
    def generate(self, state: dict[str, Tensor], z: Tensor, cond: Tensor, use_in: bool = False,
                 in_initialized: Sequence[str] = ()) -> Tensor:
        """G_state(z, cond) in chunks; cond is class indices [N] or class vectors [N, dim]."""
        tensors = dict(state)
        if use_in:
            # Render with the IN parameters the fit initialised. Initialising them here would
            # write into the state (the pretrained tensors included), so that is refused.
            missing = [n for n in self.G.in_state_names() if n not in in_initialized]
            if missing:
                raise ValueError("this reconstruction was not fitted with instance norm "
                                 f"(no initialised IN parameters for {missing[0]}, ...); "
                                 "render it with use_in=False")
            tensors.update({n: torch.tensor(True, device=self.device)
                            for n in self.G.in_state_names()})
        z, cond = z.to(self.device), cond.to(self.device)
        out = [functional_call(self.G, tensors, (z[i : i + self.chunk], cond[i : i + self.chunk]),
                               {"use_in": use_in})
               for i in range(0, z.shape[0], self.chunk)]
        return torch.cat(out)

    def reconstruction(self, f: Fitted, use_in: bool = False) -> Tensor:
        """The fitted image G_θ*(z*, y), [3, H, W] in [-1, 1] (without IN unless asked)."""
        y = torch.tensor([f.class_id], device=self.device)
        return self.generate(f.state, f.z[None], y, use_in, f.in_initialized)[0]


def jitter(prior: FittedPrior, f: Fitted, stds: Sequence[float], samples: int,
           generator: torch.Generator) -> Tensor:
    """G_θ*(z* + std·n, y) without IN, n ~ N(0, I); returns [len(stds), samples, 3, H, W]."""
    # drawn in float32 in every precision, so a float64 run jitters along the same directions
    noise = torch.randn(len(stds), samples, f.z.shape[0], generator=generator, dtype=torch.float32)
    noise = noise.to(prior.device, f.z.dtype)
    std = torch.tensor([float(s) for s in stds], device=prior.device, dtype=f.z.dtype).view(-1, 1, 1)
    z = (f.z.view(1, 1, -1) + std * noise).flatten(0, 1)
    y = torch.full((z.shape[0],), f.class_id, dtype=torch.long, device=prior.device)
    x = prior.generate(f.state, z, y)
    return x.view(len(stds), samples, *x.shape[1:])


def interpolate_states(a: dict[str, Tensor], b: dict[str, Tensor], lam: float) -> dict[str, Tensor]:
    """(1-λ)·a + λ·b for every entry, buffers included (SPEC §9); exact at λ = 0 and 1.

    Entries that are the same tensor object in both (the untouched pretrained ones) are kept.
    """
    if a.keys() != b.keys():
        raise ValueError("the two generator states have different keys")
    return {k: a[k] if a[k] is b[k] else a[k] * (1.0 - lam) + b[k] * lam for k in a}


def morph(prior: FittedPrior, a: Fitted, b: Fitted, lambdas: Sequence[float]) -> Tensor:
    """One frame per λ: the interpolated generator, latent and class vector; [L, 3, H, W]."""
    e_a, e_b = a.embedding(), b.embedding()
    frames = []
    for lam in lambdas:
        state = interpolate_states(a.state, b.state, lam)
        z = a.z * (1.0 - lam) + b.z * lam
        e = e_a * (1.0 - lam) + e_b * lam
        frames.append(prior.generate(state, z[None], e[None])[0])
    return torch.stack(frames)


def category_transfer(prior: FittedPrior, f: Fitted, classes: Sequence[int]) -> Tensor:
    """G_θ*(z*, c) for every class c, without IN; [C, 3, H, W]."""
    y = torch.tensor(list(classes), dtype=torch.long, device=prior.device)
    return prior.generate(f.state, f.z[None].expand(len(classes), -1), y)


# --------------------------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------------------------


def _name_table(n_classes: int) -> dict[str, list[int]]:
    info = imagenet_info()
    table: dict[str, list[int]] = {}
    for k in range(min(n_classes, info.num_classes())):
        description = str(info.index_to_description(k))
        keys = {description, info.index_to_label_name(k), *description.split(",")}
        for key in keys:
            table.setdefault(key.strip().lower(), []).append(k)
    return {k: sorted(set(v)) for k, v in table.items()}


def resolve_classes(specs: Sequence[str | int], n_classes: int = 1000) -> list[int]:
    """Class indices from indices ("207"), inclusive ranges ("151-293") or ImageNet names."""
    out: list[int] = []
    for spec in specs:
        text = str(spec).strip()
        if re.fullmatch(r"\d+", text):
            found = [int(text)]
        elif m := re.fullmatch(r"(\d+)\s*-\s*(\d+)", text):
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise ValueError(f"class range {text!r} is empty (write low-high)")
            found = list(range(lo, hi + 1))
        else:
            if n_classes != 1000:
                raise ValueError(f"class {text!r}: names are ImageNet-1k classes, but this prior "
                                 f"has {n_classes} classes; give indices")
            table = _name_table(n_classes)
            found = table.get(text.lower(), [])
            if not found:
                close = difflib.get_close_matches(text.lower(), list(table), n=3, cutoff=0.7)
                hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(f"unknown ImageNet class name {text!r}.{hint} Give an index "
                                 "0..999, a range such as 151-293, a name or a WordNet id")
            if len(found) > 1:
                which = ", ".join(f"{k} ({imagenet_class_name(k)})" for k in found)
                raise ValueError(f"class name {text!r} is ambiguous: {which}; give the index")
        bad = [k for k in found if not 0 <= k < n_classes]
        if bad:
            raise ValueError(f"class {bad[0]} (from {text!r}) is outside 0..{n_classes - 1}")
        out.extend(found)
    if not out:
        raise ValueError("manipulation.classes is empty: give at least one target class")
    return out


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _display(x: Tensor) -> Tensor:
    return ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)


def _sheet(images: Sequence[Tensor | None], path: Path, ncol: int, labels: Sequence[str] | None = None,
           row_labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """A labelled sheet of [-1, 1] images (None: an empty cell), written as ``save_image`` would."""
    frames = [None if x is None else _display(x) for x in images]
    labelled_sheet(frames, ncol, labels=labels, row_labels=row_labels, title=title).save(path)
    return path


def _target(f: Fitted) -> Tensor | None:
    """The clean image a fit was made from (its ``target.png`` beside ``reconstruction.pt``,
    written by the fit), in [-1, 1]; None when there is none or it has another size."""
    path = f.path.parent / "target.png" if f.path is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return to_tensor(load_image(path))
    except ImageLoadError:  # a sheet without its target column is still a sheet
        return None


def _first_row(recon: Tensor, target: Tensor | None) -> tuple[list[Tensor], list[str]]:
    if target is None or target.shape != recon.shape:
        return [recon], ["reconstruction"]
    return [recon, target.to(recon.dtype)], ["reconstruction", "target"]


def _uint8(x: Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] to HWC uint8, truncating like ``save_image`` (SPEC §11)."""
    arr = ((x.detach().float().cpu() + 1) / 2 * 255.0).clamp(0, 255).to(torch.uint8)
    return arr.permute(1, 2, 0).contiguous().numpy()


def write_jitter(folder: Path, recon: Tensor, images: Tensor, stds: Sequence[float],
                 per_row: int, target: Tensor | None = None, title: str | None = None) -> dict[str, str]:
    """``jitter/std<s>_<k>.png`` and ``jitters.png``: the reconstruction (and the clean image
    when there is one), then one block of rows per std (its samples ``per_row`` to a row,
    labelled "std s")."""
    for s, std in enumerate(stds):
        for k in range(images.shape[1]):
            save_image(images[s, k], folder / "jitter" / f"std{float(std):g}_{k}.png")
    first, labels = _first_row(recon, target)
    ncol = max(1, min(int(per_row), images.shape[1]), len(first))
    cells: list[Tensor | None] = [*first, *[None] * (ncol - len(first))]
    row_labels = [""]
    for s, std in enumerate(stds):
        rows = math.ceil(images.shape[1] / ncol)
        block = list(images[s])
        cells += [*block, *[None] * (rows * ncol - len(block))]
        row_labels += [f"std {float(std):g}"] + [""] * (rows - 1)
    cell_labels = [*labels, *[""] * (len(cells) - len(labels))]
    sheet = _sheet(cells, folder / "jitters.png", ncol, labels=cell_labels, row_labels=row_labels, title=title)
    return {"sheet": str(sheet), "images": str(folder / "jitter")}


def write_morph(folder: Path, frames: Tensor, frame_ms: int, bounce: bool,
                mp4: bool) -> dict[str, str]:
    """``morph/001.png``…, the sheet ``morphing.png``, ``morphing.gif`` and maybe ``.mp4``."""
    for k, frame in enumerate(frames):
        save_image(frame, folder / "morph" / f"{k + 1:03d}.png")
    lambdas = [k / max(1, len(frames) - 1) for k in range(len(frames))]
    sheet = _sheet(list(frames), folder / "morphing.png", len(frames),
                   labels=[f"lambda {lam:.2g}" for lam in lambdas])
    out = {"frames": str(folder / "morph"), "sheet": str(sheet)}
    pictures = [_uint8(f) for f in frames]
    if bounce and len(pictures) > 2:
        pictures = pictures + pictures[-2:0:-1]
    gif = folder / "morphing.gif"
    first, *rest = [Image.fromarray(p) for p in pictures]
    first.save(gif, save_all=True, append_images=rest, duration=int(frame_ms), loop=0)
    out["gif"] = str(gif)
    if mp4:
        if importlib.util.find_spec("imageio_ffmpeg") is None:
            out["mp4_skipped"] = "no video encoder: pip install imageio-ffmpeg to also get morphing.mp4"
        else:
            video = folder / "morphing.mp4"
            imageio.mimwrite(video, pictures, fps=1000.0 / max(1, int(frame_ms)), codec="libx264",
                             macro_block_size=16)
            out["mp4"] = str(video)
    return out


def write_categories(folder: Path, recon: Tensor, images: Tensor, classes: Sequence[int],
                     target: Tensor | None = None, title: str | None = None) -> dict[str, str]:
    """``categories/class<c>.png``, ``categories.png`` (the reconstruction and the clean image
    first, every transfer labelled "<c> <name>") and the legend ``categories.json``."""
    names = {}
    for c, x in zip(classes, images):
        save_image(x, folder / "categories" / f"class{c}.png")
        try:
            names[str(c)] = imagenet_class_name(c)
        except (ValueError, IndexError):
            names[str(c)] = ""
    (folder / "categories.json").write_text(json.dumps(names, indent=1))
    first, labels = _first_row(recon, target)
    # the first synonym of the ImageNet description ("tench, Tinca tinca" -> "tench")
    labels += [f"{c} {names[str(c)].split(',')[0]}".strip() for c in classes]
    n = len(classes) + len(first)
    sheet = _sheet([*first, *images], folder / "categories.png", max(1, math.isqrt(n)), labels=labels,
                   title=title)
    return {"sheet": str(sheet), "images": str(folder / "categories"),
            "legend": str(folder / "categories.json")}


def log_media(loggers: Sequence[Any], key: str, images: Sequence[str] = (),
              videos: Sequence[str] = ()) -> None:
    """Sheets and animations to the loggers that take media (W&B); CSV runs only keep files."""
    for lg in loggers:
        if images and hasattr(lg, "log_image"):
            lg.log_image(key=key, images=list(images))
        if videos and hasattr(lg, "log_video"):
            lg.log_video(key=f"{key}_animation", videos=list(videos))




# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


@dataclass
class Manipulation:
    """What ``task=jitter|morphing|category_transfer`` does with every fit: checked from the
    config before any fitting, so that a typo fails in seconds."""

    task: str
    settings: DictConfig  # the ``manipulation`` config section
    seed: int  # with an image id, the image's jitter noise (items.image_generator)
    saved: list[Path]  # ``manipulation.saved``, resolved; empty: fit the images first
    classes: list[int]  # category transfer's target classes

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Manipulation:
        task = str(cfg.task.name)
        if task not in MANIPULATION_TASKS:
            raise ValueError(f"task {task!r} is not a manipulation task; valid: {MANIPULATION_TASKS}")
        saved = [resolve_saved_path(p) for p in cfg.manipulation.saved]
        if cfg.prior.kind != "biggan":
            made_with = SavedReconstruction.load(saved[0]).prior.get("name") if saved else "biggan256"
            raise ValueError(f"task={task} edits a fitted BigGAN, but prior.kind is "
                             f"{cfg.prior.kind!r}: add prior={made_with}"
                             + (" (the prior the saved reconstruction was made with)" if saved else ""))
        if cfg.prior.random_G:
            raise ValueError("manipulation renders the generator in eval mode; prior.random_G "
                             "(a train-mode generator) is not supported")
        m = cfg.manipulation
        classes = resolve_classes(list(m.classes), int(cfg.prior.n_classes)) if task == "category_transfer" else []
        if task == "jitter" and (not m.jitter_stds or m.jitter_samples < 1):
            raise ValueError("task=jitter needs manipulation.jitter_stds and jitter_samples >= 1")
        if task == "morphing" and m.morph_steps < 1:
            raise ValueError("manipulation.morph_steps must be >= 1")
        if task == "morphing" and saved and len(saved) < 2:
            raise ValueError("task=morphing needs two saved reconstructions: "
                             "manipulation.saved=[a/reconstruction.pt,b/reconstruction.pt]")
        return cls(task=task, settings=m, seed=int(cfg.seed), saved=saved, classes=classes)

    def jobs(self, paths: Sequence[Path]) -> list[list[Path]]:
        """The files each edit reads: one per fit, or every consecutive pair for morphing."""
        if self.task == "morphing":
            return [[a, b] for a, b in itertools.pairwise(paths)]
        return [[p] for p in paths]

    def edit(self, prior: FittedPrior, paths: list[Path], out: Path, loggers: Sequence[Any]) -> dict[str, Any]:
        """One edit's row; its files go to ``<out>/<id>/`` (id: the image ids joined by _)."""
        with engine.edit_row(self.task, paths) as row:
            fitted = [prior.load(p) for p in paths]
            row["id"] = "_".join(safe_name(f.image_id) for f in fitted)
            row["class"] = [f.class_id for f in fitted] if len(fitted) > 1 else fitted[0].class_id
            row["outputs"] = self.write(prior, fitted, out / row["id"], loggers)
            if "mp4_skipped" in row["outputs"]:
                print(f"genprior: {row['outputs']['mp4_skipped']}")
        return row

    def write(self, prior: FittedPrior, fitted: list[Fitted], folder: Path,
              loggers: Sequence[Any]) -> dict[str, str]:
        m = self.settings
        recon = [prior.reconstruction(f) for f in fitted]
        if self.task == "jitter":
            (f,), (x,) = fitted, recon
            save_image(x, folder / "reconstruction.png")
            gen = image_generator(self.seed, f"{f.image_id}/jitter")
            images = jitter(prior, f, list(m.jitter_stds), int(m.jitter_samples), gen)
            files = write_jitter(folder, x, images, list(m.jitter_stds), int(m.jitter_per_row),
                                 target=_target(f), title=f"{f.image_id}: jitter of z")
            log_media(loggers, f"jitter/{f.image_id}", images=[files["sheet"]])
            return files
        if self.task == "category_transfer":
            (f,), (x,) = fitted, recon
            save_image(x, folder / "reconstruction.png")
            images = category_transfer(prior, f, self.classes)
            files = write_categories(folder, x, images, self.classes, target=_target(f),
                                     title=f"{f.image_id}: category transfer")
            log_media(loggers, f"category_transfer/{f.image_id}", images=[files["sheet"]])
            return files
        a, b = fitted
        if a.class_id != b.class_id and not m.interpolate_class:
            raise ValueError(
                f"{a.image_id} (class {a.class_id}) and {b.image_id} (class {b.class_id}) have "
                "different classes; morphing keeps one class unless "
                "manipulation.interpolate_class=true, which also interpolates the class vectors "
                "(as the reference's example.py)")
        steps = int(m.morph_steps)
        frames = morph(prior, a, b, [k / steps for k in range(steps + 1)])
        files = write_morph(folder, frames, int(m.gif_frame_ms), bool(m.gif_bounce), bool(m.mp4))
        log_media(loggers, f"morphing/{a.image_id}_{b.image_id}", images=[files["sheet"]],
                  videos=[files["gif"]])
        return files


def fit_and_save(cfg: DictConfig, edit: Manipulation, out: Path, *, items: Sequence[ImageItem] | None,
                 read: Callable[[ImageItem], ImageItem] | None, loggers: Sequence[Any],
                 callbacks: Sequence[L.Callback], on_row: Callable[[dict[str, Any]], None] | None,
                 ) -> tuple[list[dict[str, Any]], FittedPrior, list[Path]]:
    """DGP fits the images (``items``, else ``data.*``'s) through the engine and saves each fit
    as ``<out>/<id>/reconstruction.pt``. Returns the fits' rows, the fit's prior (G and its
    pretrained state, on the run's device) and the files written."""
    if items is None:
        items = load_items(cfg, DGP)
    if edit.task == "morphing" and sum(item.error is None for item in items) < 2:
        raise ValueError("task=morphing needs two images: data.source=<a list file with "
                         "two images and their classes> (or manipulation.saved=[a,b])")
    method = DGP.from_config(cfg)
    saver = SaveReconstructions(out, cfg)
    # The edits read this saver's files and weights identity: the engine must not add a second
    # saver of its own (it does with output.save_G).
    fit_cfg = cfg.copy()
    fit_cfg.output.save_G = False
    extra = build_metrics(cfg.metrics, value_range=(0.0, 1.0)) if cfg.metrics.extra else {}
    rows = engine.run(fit_cfg, method, items, out, read=read, loggers=loggers, callbacks=[saver, *callbacks],
                      extra_metrics=extra, on_row=on_row)
    # Lightning's teardown leaves the module on the CPU; the edits render on the run's device.
    # The pretrained state is never written: a render substitutes each fit's tensors.
    device = pick_device(cfg)
    base = {k: v.to(device) for k, v in method.G_weight.items()}
    prior = FittedPrior(method.G.to(device), base, _prior_section(cfg), saver.weights,
                        chunk=int(cfg.manipulation.render_chunk))
    return rows, prior, list(dict.fromkeys(saver.written))


def run(cfg: DictConfig, out: Path, *, items: Sequence[ImageItem] | None = None,
        on_row: Callable[[dict[str, Any]], None] | None = None,
        read: Callable[[ImageItem], ImageItem] | None = None,
        loggers: Sequence[Any] | None = None, callbacks: Sequence[L.Callback] = ()) -> list[dict[str, Any]]:
    """``task=jitter|morphing|category_transfer``: fit and save the images (or read the files
    of ``manipulation.saved``), then edit every fit. The fits' rows, then one row per edit.

    ``callbacks`` join the fit's (evaluate.py's W&B progress); ``loggers`` default to
    ``logger.kind``'s, and also get the edits' sheets and animations."""
    edit = Manipulation.from_config(cfg)
    out = Path(out)
    loggers = list(engine.make_loggers(cfg, out) if loggers is None else loggers)
    rows = engine.TaskRows(on_row)
    if edit.saved:
        G, _ = build_biggan(cfg.prior, dtype=run_dtype(cfg), device=pick_device(cfg), need_D=False)
        prior = FittedPrior(G, dict(G.state_dict()), _prior_section(cfg),
                            chunk=int(cfg.manipulation.render_chunk))
        paths = edit.saved
    else:
        fit_rows, prior, paths = fit_and_save(cfg, edit, out, items=items, read=read, loggers=loggers,
                                              callbacks=callbacks, on_row=on_row)
        rows.rows.extend(fit_rows)  # on_row has had them from the engine
    jobs = edit.jobs(paths)
    if edit.task == "morphing" and not jobs:
        rows.add({"id": "morphing", "task": edit.task, "status": "failed",
             "error": f"morphing needs two reconstructions, {len(paths)} fitted"})
    for job in jobs:
        rows.add(edit.edit(prior, job, out, loggers))
    return rows.rows


def _prior_section(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.prior, resolve=True)  # type: ignore[return-value]
