"""The images of a ``train.py`` run, read and preprocessed for the method that fits them.

``load_items(cfg, method)`` reads ``data.source`` (a file, a folder, a list file or an LSUN LMDB
export; ``sample``: scikit-image's astronaut, shipped with the package) and returns one
``ImageItem`` per image, with its tensor or the reason it cannot be used. ``method`` is the
method class (genprior.methods): its ``preprocessing`` and ``image_size(cfg)`` say how the
images are prepared. evaluate.py lists the same datamodules' items and has them read lazily
(``ImageRecordDataset.read``) when their batch comes up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image
from skimage import data as skdata

from genprior.image_io import preprocess
from genprior.items import ImageItem

from .folder import ImageFolderDataModule
from .lsun import LSUNDataModule

__all__ = ["load_items", "sample_item"]


def load_items(cfg: Any, method: Any) -> list[ImageItem]:
    """The images to fit, preprocessed to the method's working size (errors kept per item)."""
    source = str(cfg.data.source)
    size = int(method.image_size(cfg))
    # An LSUN LMDB export (<category>_<split>_lmdb/): data.kind=lsun with data.lmdb, as in
    # evaluate.py, or data.source pointing at one. The first data.limit keys, in key order.
    lmdb_path = cfg.data.lmdb if cfg.data.kind == "lsun" else (source if _is_lmdb(source) else None)
    if source == "sample" and not lmdb_path:
        return [sample_item(size, method.preprocessing, int(cfg.data.class_id))]
    dm: Any
    if lmdb_path:
        dm = LSUNDataModule(str(lmdb_path), resolution=size, subset=cfg.data.limit,
                            preprocessing="pggan" if method.preprocessing == "pggan" else "dgp")
    else:
        n_classes = cfg.prior.get("n_classes") if method.preprocessing == "dgp" else None
        dm = ImageFolderDataModule(
            source, resolution=size, default_class=int(cfg.data.class_id),
            n_classes=int(n_classes) if n_classes is not None else None,
            preprocess=method.preprocessing != "none",
            # PGGAN's LSUN recipe (floor-offset centre crop, Lanczos); the identity on
            # mGANprior's 256x256 / 1024x1024 targets.
            **({"preprocessing": "pggan"} if method.preprocessing == "pggan" else {}),
        )
    dm.setup("predict")
    listed = dm.dataset.items
    if cfg.data.limit is not None:
        listed = listed[: int(cfg.data.limit)]
    return [dm.dataset.read(item) for item in listed]


def sample_item(size: int, preprocessing: str, class_id: int = -1) -> ImageItem:
    """scikit-image's astronaut (needs no download), prepared as ``preprocessing`` says."""
    img = Image.fromarray(skdata.astronaut())
    if preprocessing == "none":
        # DIP works at the image's own size: a whole-image Lanczos resize to data.image_size.
        x = preprocess(img.resize((size, size), Image.Resampling.LANCZOS), size, name="skimage:astronaut")
    else:
        x = preprocess(img, size, name="skimage:astronaut")
    return ImageItem(id="astronaut", path="skimage.data.astronaut", image=x, class_id=class_id)


def _is_lmdb(source: str) -> bool:
    path = Path(source)
    return path.name == "data.mdb" or (path.is_dir() and (path / "data.mdb").is_file())
