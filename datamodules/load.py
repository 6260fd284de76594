"""The images of a run, from the ``data.*`` config: listed, checked, then read for the method.

``list_images(cfg, method)`` builds the datamodule ``data.kind`` names (``build_datamodule``: a
file, a folder or a list file; ImageNet val; an LSUN LMDB export, also when ``data.source``
points at one; ``sample``: scikit-image's astronaut, shipped with the package) and lists its
images, unread: ``data.subset`` then ``data.limit``. That is where every file-level problem of
the data shows up (a missing source, list file, root or LMDB; an empty folder; listed images
absent), as a one-line ``UserError`` that says where the data comes from (``data.get_from`` of
the preset, else ``DATA_ORIGINS``) and which key to set. train.py and evaluate.py call it before
anything is fitted or logged. ``method`` is the method class (genprior.methods): its
``preprocessing`` and ``image_size(cfg)`` say how the images are prepared. ``image_reader``
reads an item when its batch comes up; ``load_items`` lists and reads them all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from PIL import Image
from skimage import data as skdata

from genprior.image_io import preprocess
from genprior.items import ImageItem

from .folder import ImageFolderDataModule
from .imagenet import ImageNetValDataModule
from .lsun import LSUNDataModule
from .records import DataSourceError, ImageRecordDataModule, MissingDataError

__all__ = ["DATA_ORIGINS", "build_datamodule", "image_reader", "list_images", "load_items",
           "sample_item", "where_from"]

SAMPLE_PATH = "skimage.data.astronaut"

#: Where the data of the paths that the presets use comes from, by path prefix (the data
#: presets say it themselves with ``data.get_from``; experiments that set ``data.source``
#: directly are covered here). docs/data.md, "Where the data comes from".
DATA_ORIGINS = {
    "data/dip": "the DIP repository's data/ folder (github.com/DmitryUlyanov/deep-image-prior, "
                "folder data/; copy or link it to data/dip; docs/reproduction.md, 'Deep Image Prior')",
    "data/dgp": "the DGP repository's data/ folder (github.com/XingangPan/deep-generative-prior, "
                "folder data/; copy or link it to data/dgp)",
    "data/Set5": "Set5 (e.g. the LapSRN or EDSR benchmark downloads; the DIP paper's SR table)",
    "data/imagenet": "ImageNet ILSVRC2012 validation images (image-net.org, after registering)",
    "data/lsun": "the LSUN LMDB exports (github.com/fyu/lsun, download.py -c <category> -s val)",
    "data/celebahq": "CelebA-HQ (github.com/tkarras/progressive_growing_of_gans, dataset_tool.py "
                     "create_celebahq)",
}


def build_datamodule(cfg: Any, method: Any) -> ImageRecordDataModule | None:
    """The datamodule ``data.kind`` names (rank 0 of 1: evaluate.py shards the list itself),
    preparing images as ``method`` wants them (its ``image_size``, its ``preprocessing``
    unless ``data.preprocessing`` says otherwise); None for the embedded sample."""
    d = cfg.data
    kind = str(d.kind)
    source = str(d.source)
    if kind == "auto" and _is_lmdb(source):
        kind = "lsun"
    if kind == "auto" and source == "sample":
        return None
    spec = OmegaConf.to_container(d.subset, resolve=True) if OmegaConf.is_config(d.subset) else d.subset
    subset = {k: v for k, v in (spec or {}).items() if v is not None} or None
    common: dict[str, Any] = {"subset": subset, "num_workers": int(d.num_workers), "rank": 0,
                              "world_size": 1}
    # "dgp" is every datamodule's default recipe except LSUN's, whose default is PGGAN's (how
    # those training sets were made): a DGP run keeps each datamodule's own default.
    preprocessing = d.preprocessing or (None if method.preprocessing == "dgp" else method.preprocessing)
    if preprocessing is not None:
        common["preprocessing"] = str(preprocessing)
    # the DGP recipe's BigGAN is class-conditional: a class outside its range is an image's error
    n_classes = int(cfg.prior.n_classes) if method.preprocessing == "dgp" else None
    resolution = int(method.image_size(cfg))
    if kind in ("auto", "image", "folder", "list"):
        return ImageFolderDataModule(source, resolution, root=d.root, kind=kind,
                                     default_class=int(d.class_id), n_classes=n_classes, **common)
    if kind == "imagenet_val":
        if not d.root:
            raise MissingDataError("data.kind=imagenet_val needs data.root=<ImageNet val folder>. "
                                   + where_from(cfg, "data.root", ""))
        return ImageNetValDataModule(str(d.root), resolution, labels=d.labels,
                                     devkit_meta=d.devkit_meta, n_classes=n_classes, **common)
    if kind == "lsun":
        lmdb_path = d.lmdb or (source if _is_lmdb(source) else None)
        if not lmdb_path:
            raise MissingDataError("data.kind=lsun needs data.lmdb=<category>_<split>_lmdb. "
                                   + where_from(cfg, "data.lmdb", "data/lsun"))
        return LSUNDataModule(str(lmdb_path), resolution, **common)
    raise DataSourceError(f"data.kind must be auto, image, folder, list, imagenet_val or lsun, "
                          f"got {kind!r}")


def list_images(cfg: Any, method: Any) -> tuple[ImageRecordDataModule | None, list[ImageItem]]:
    """(the datamodule, None for the embedded sample; the run's items, unread, in order).

    The subset is computed on the full listing, then ``data.limit`` keeps its first N, so a
    resumed evaluation sees the same images. A missing file or folder is a MissingDataError
    that says where the data comes from and which key to set."""
    try:
        dm = build_datamodule(cfg, method)
        items = (dm.select_items() if dm is not None
                 else [ImageItem("astronaut", SAMPLE_PATH, int(cfg.data.class_id))])
    except MissingDataError as err:
        key, path = _data_key(cfg)
        raise MissingDataError(f"{err}. {where_from(cfg, key, path)}") from None
    except (TypeError, ValueError) as err:  # data.* values the datamodule refuses (subset, ...)
        if isinstance(err, DataSourceError):
            raise
        raise DataSourceError(f"data: {err}") from None
    if cfg.data.limit is not None:
        items = items[: int(cfg.data.limit)]
    return dm, items


def image_reader(cfg: Any, method: Any, dm: ImageRecordDataModule | None,
                 items: list[ImageItem]) -> Callable[[ImageItem], ImageItem]:
    """How an item of ``items`` is read when its batch comes up: the datamodule's dataset, or
    the embedded sample prepared for ``method``."""
    if dm is not None:
        return dm.make_dataset(items).read
    size = int(method.image_size(cfg))
    return lambda item: sample_item(size, method.preprocessing, item.class_id)


def load_items(cfg: Any, method: Any) -> list[ImageItem]:
    """The images to fit, listed and read (errors kept per item), for the tasks that hold
    their images in memory (manipulation, defense)."""
    dm, items = list_images(cfg, method)
    read = image_reader(cfg, method, dm, items)
    return [read(item) for item in items]


def sample_item(size: int, preprocessing: str, class_id: int = -1) -> ImageItem:
    """scikit-image's astronaut (needs no download), prepared as ``preprocessing`` says."""
    img = Image.fromarray(skdata.astronaut())
    if preprocessing == "none":
        # DIP works at the image's own size: a whole-image Lanczos resize to data.image_size.
        x = preprocess(img.resize((size, size), Image.Resampling.LANCZOS), size, name="skimage:astronaut")
    else:
        x = preprocess(img, size, name="skimage:astronaut")
    return ImageItem(id="astronaut", path=SAMPLE_PATH, image=x, class_id=class_id)


def where_from(cfg: Any, key: str, path: str) -> str:
    """'<where the data comes from>; set <key>=<path> (docs/data.md)': the preset's
    ``data.get_from``, else the origin of ``path`` in DATA_ORIGINS."""
    origin = cfg.data.get("get_from") or next(
        (text for prefix, text in DATA_ORIGINS.items()
         if Path(path).as_posix().startswith(prefix + "/") or Path(path).as_posix() == prefix), None)
    told = f"Get it from {origin}, or set" if origin else "Set"
    return f"{told} {key}=<path> (docs/data.md, 'Where the data comes from')"


def _data_key(cfg: Any) -> tuple[str, str]:
    """The config key (and its value) that names the data of ``data.kind``."""
    d = cfg.data
    if str(d.kind) == "imagenet_val":
        return "data.root", str(d.root)
    if str(d.kind) == "lsun" or (d.lmdb and str(d.kind) == "auto"):
        return "data.lmdb", str(d.lmdb or d.source)
    return "data.source", str(d.source)


def _is_lmdb(source: str) -> bool:
    path = Path(source)
    return path.name == "data.mdb" or (path.is_dir() and (path / "data.mdb").is_file())
