"""Builds what a config asks for: the images, the prior, the degradation and the method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from genprior.train import ImageItem, image_generator, run_batches

# Task name -> (degradation name for build_degradation, metric convention of SPEC §8 or None).
DGP_TASKS: dict[str, tuple[str, str | None]] = {
    "reconstruct": ("identity", "reconstruct"),
    "defence": ("identity", None),
    "colorization": ("colorization", "colorization"),
    "inpainting": ("inpainting", "inpainting"),
    "sr": ("sr", "sr"),
    "hybrid": ("hybrid", None),
    "random_mask": ("random_mask", "random_mask"),
    "mask_image": ("mask_image", "mask_image"),
    # Manipulation tasks fit the clean image, then edit it (genprior.manipulation, SPEC §9).
    "jitter": ("identity", None),
    "morphing": ("identity", None),
    "category_transfer": ("identity", None),
}


def pick_device(cfg: DictConfig) -> torch.device:
    accel = str(cfg.trainer.accelerator)
    if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accel in ("gpu", "cuda"):
        raise ValueError("trainer.accelerator=gpu but no CUDA device is available")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------- images
def load_items(cfg: DictConfig) -> list[ImageItem]:
    """The images to restore, preprocessed to the prior's working size (errors kept per item)."""
    source = str(cfg.data.source)
    if cfg.manipulation.saved:
        return []  # editing saved reconstructions: nothing to load or fit
    # An LSUN LMDB export (<category>_<split>_lmdb/): data.kind=lsun with data.lmdb, as in
    # evaluate.py, or data.source pointing at one. The first data.limit keys, in key order.
    lmdb_path = cfg.data.lmdb if cfg.data.kind == "lsun" else (source if _is_lmdb(source) else None)
    if source == "sample" and not lmdb_path:
        return [_sample_item(cfg)]
    from genprior.datamodules.folder import ImageFolderDataModule

    if lmdb_path:
        from genprior.datamodules.lsun import LSUNDataModule

        dm: Any = LSUNDataModule(
            str(lmdb_path), resolution=_resolution(cfg), subset=cfg.data.limit,
            preprocessing="pggan" if cfg.prior.kind == "pggan" else "dgp",
        )
    else:
        dm = ImageFolderDataModule(
            source, resolution=_resolution(cfg), default_class=int(cfg.data.class_id),
            n_classes=int(cfg.prior.n_classes) if cfg.prior.kind == "biggan" else None,
            preprocess=cfg.prior.kind != "dip",
            # PGGAN's LSUN recipe (floor-offset centre crop, Lanczos); the identity on
            # mGANprior's 256x256 / 1024x1024 targets.
            **({"preprocessing": "pggan"} if cfg.prior.kind == "pggan" else {}),
        )
    dm.setup("predict")
    items = []
    for k, rec in enumerate(dm.dataset):
        if cfg.data.limit is not None and k >= int(cfg.data.limit):
            break
        items.append(ImageItem(
            id=rec["id"], path=rec["path"], image=None if rec["error"] else rec["image"],
            class_id=int(rec["class"]), error=rec["error"] or None,
        ))
    return items


def _is_lmdb(source: str) -> bool:
    path = Path(source)
    return path.name == "data.mdb" or (path.is_dir() and (path / "data.mdb").is_file())


def _resolution(cfg: DictConfig) -> int:
    return int(cfg.prior.resolution) if cfg.prior.kind in ("biggan", "pggan") else int(cfg.data.image_size)


def _sample_item(cfg: DictConfig) -> ImageItem:
    """scikit-image's astronaut, shipped inside the package: needs no download."""
    from PIL import Image
    from skimage import data as skdata

    from genprior.image_io import preprocess

    img = Image.fromarray(skdata.astronaut())
    if cfg.prior.kind == "dip":
        # DIP works at the image's own size: a whole-image Lanczos resize to data.image_size.
        size = int(cfg.data.image_size)
        x = preprocess(img.resize((size, size), Image.Resampling.LANCZOS), size, name="skimage:astronaut")
    else:
        x = preprocess(img, _resolution(cfg), name="skimage:astronaut")
    return ImageItem(id="astronaut", path="skimage.data.astronaut", image=x, class_id=int(cfg.data.class_id))


# ---------------------------------------------------------------------------------- priors
def load_biggan_prior(cfg: DictConfig, device: torch.device, need_D: bool | None = None) -> tuple[Any, Any]:
    """BigGAN G (and D) on ``device`` in the run's dtype (``trainer.precision``); the published
    float32 weights are copied exactly into a float64 model."""
    from genprior.precision import run_dtype
    from genprior.priors.biggan import Discriminator, Generator, orthogonal_init_

    p = cfg.prior
    need_D = p.resolution != 512 if need_D is None else need_D
    if p.weights == "random" or p.random_G:
        torch.manual_seed(int(p.init_seed))
        G = orthogonal_init_(Generator(resolution=p.resolution, G_ch=p.G_ch, dim_z=p.dim_z,
                                       shared_dim=p.shared_dim, n_classes=p.n_classes))
        D = orthogonal_init_(Discriminator(resolution=p.resolution, D_ch=p.D_ch,
                                           n_classes=p.n_classes)) if need_D else None
        if p.random_G:
            G.train()  # the reference's --random_G runs G in train mode (SPEC §9)
        else:
            G.eval()
    elif p.weights == "pretrained":
        from genprior.priors.checkpoints import load_biggan

        G, D = load_biggan(p.name, weights_dir=p.weights_dir, g_path=p.G_path, d_path=p.D_path,
                           use_ema=p.use_ema, need_D=need_D)
    else:
        raise ValueError(f"prior.weights must be 'pretrained' or 'random', got {p.weights!r}")
    dtype = run_dtype(cfg)
    return G.to(device, dtype), (D.to(device, dtype) if D is not None else None)


class DGPRunner:
    def __init__(self, cfg: DictConfig) -> None:
        from genprior.degradations import build_degradation
        from genprior.methods.dgp import DGP, DGPSettings
        from genprior.schedule import stages_from_config

        self.cfg = cfg
        self.device = pick_device(cfg)
        task = str(cfg.task.name)
        if task not in DGP_TASKS:
            raise ValueError(f"task.name={task!r} is not a DGP restoration task; valid: {sorted(DGP_TASKS)}")
        deg_name, self.metric_task = DGP_TASKS[task]
        params: dict[str, Any] = {}
        if deg_name == "sr":
            params["factor"] = int(cfg.task.sr_factor)
        if deg_name == "random_mask":
            params["drop_fraction"] = float(cfg.task.mask_fraction)
            params["seed"] = int(cfg.seed)
        if deg_name == "mask_image":
            params["path"] = cfg.task.mask_path
        degradation = build_degradation(deg_name, int(cfg.prior.resolution), **params)
        G, D = load_biggan_prior(cfg, self.device)
        d = cfg.dgp
        settings = DGPSettings(
            stages=stages_from_config(d), w_nll=float(d.w_nll), select_num=int(d.select_num),
            sample_std=float(d.sample_std), update_G=bool(d.update_G), update_embed=bool(d.update_embed),
            warm_up=int(d.warm_up), stop_mse=float(d.stop_mse), stop_ftr=float(d.stop_ftr),
            betas=(float(d.G_B1), float(d.G_B2)), eps=float(d.adam_eps),
            print_interval=int(d.print_interval),
        )
        perceptual = None
        if any(w > 0 for w in d.w_percep):
            from genprior.losses import PerceptualLoss

            perceptual = PerceptualLoss(d.perceptual_weights).to(self.device, G.linear.weight.dtype)
        from genprior.perf import perf_settings

        self.method = DGP(G, D, settings, degradation, perceptual=perceptual,
                          metric_task=self.metric_task, ssim_data_range=float(cfg.metrics.ssim_data_range),
                          perf=perf_settings(cfg))

    def prepare(self, batch: list[ImageItem]) -> Any:
        n_classes = int(self.cfg.prior.n_classes)
        for item in batch:
            if not -1 <= item.class_id < n_classes:
                raise ValueError(f"class {item.class_id} of image {item.id!r} is out of range "
                                 f"(use -1 for unknown, or 0..{n_classes - 1})")
        images = torch.stack([item.image for item in batch]).to(self.device)
        classes = torch.tensor([item.class_id for item in batch], dtype=torch.long)
        gens = [image_generator(int(self.cfg.seed), item.id) for item in batch]
        self.method.start(images, classes, [item.id for item in batch], gens)
        return self.method

    def run(self, items: list[ImageItem], out: Path, loggers: list[Any] | None = None,
            callbacks: list[Any] | None = None) -> list[dict[str, Any]]:
        callbacks = list(callbacks or [])
        if self.cfg.output.save_G and not callbacks:
            callbacks.append(self.reconstruction_saver(out))
        return run_batches(self.cfg, items, out, self.prepare, loggers=loggers, callbacks=callbacks)

    def reconstruction_saver(self, out: Path) -> Any:
        """Writes ``<out>/<id>/reconstruction.pt`` per fitted image (genprior.saved)."""
        from genprior.callbacks.saved import SaveReconstructions

        return SaveReconstructions(out, self.cfg)


def build_runner(cfg: DictConfig) -> Any:
    from genprior.manipulation import MANIPULATION_TASKS
    from genprior.perf import perf_settings, tune_cpu_malloc

    if pick_device(cfg).type == "cpu" and perf_settings(cfg).cpu_malloc_tuning:
        tune_cpu_malloc()

    if str(cfg.task.name) == "defense":  # attacks, purification by the prior (docs/defense.md)
        from genprior.defense import DefenseRunner

        return DefenseRunner(cfg)
    if str(cfg.task.name) in MANIPULATION_TASKS:
        from genprior.manipulation import ManipulationRunner

        return ManipulationRunner(cfg)
    if cfg.prior.kind == "biggan":
        return DGPRunner(cfg)
    if cfg.prior.kind == "dip":
        from genprior.methods.dip_runner import DIPRunner

        return DIPRunner(cfg)
    if cfg.prior.kind == "pggan":
        from genprior.methods.mganprior_runner import MGANRunner

        return MGANRunner(cfg)
    raise ValueError(f"prior.kind must be 'biggan', 'dip' or 'pggan', got {cfg.prior.kind!r}")
