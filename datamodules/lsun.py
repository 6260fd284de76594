"""LSUN scenes read straight from the official LMDB export (any category, any split).

The LSUN release (``<category>_<split>_lmdb/`` with ``data.mdb`` and ``lock.mdb``) stores one
record per image: the key is the image id (40 hex characters, as bytes) and the value is the
encoded image (WebP in the official export; JPEG or PNG are read just as well). Keys are kept
in LMDB's byte order, which makes the listing deterministic.

Preprocessing defaults to ``"pggan"``: the centre crop with floor offsets and Lanczos resize of
PGGAN's ``dataset_tool.py create_lsun``, which is how the LSUN training sets of the PGGAN priors
used by mGANprior were produced. mGANprior itself never resizes and expects 256x256 targets
(its SPEC §3.4); on such images this preprocessing is the identity. Images are decoded with
PIL, whereas create_lsun used OpenCV first, so a decoder difference of a level or so is
possible.

The LMDB environment is opened lazily in each process (DataLoader workers included),
read-only, without locking and without readahead: safe for many concurrent readers of a
file on a shared filesystem, and it avoids reading ahead pages of a 40+ GB file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lmdb
from PIL import Image

from genprior.image_io import ImageLoadError, PreprocessMethod, decode_image
from genprior.items import ImageItem

from .records import (
    DataSourceError,
    ImageRecordDataModule,
    ImageRecordDataset,
    MissingDataError,
    examples,
)

__all__ = ["LMDBImageDataset", "LSUNDataModule", "open_lmdb"]


# py-lmdb refuses to open the same environment twice in one process, so two datamodules (or a
# listing and a dataset) over one LMDB must share it: one read-only handle per (process, file).
# The pid in the key makes a forked DataLoader worker open its own instead of using the
# parent's, which LMDB does not allow across fork.
_OPEN_ENVS: dict[tuple[int, str], Any] = {}


def open_lmdb(path: str | os.PathLike[str]) -> Any:
    """Open (or reuse) an LMDB read-only for concurrent readers; ``path`` is the export's
    folder or its data.mdb. The handle stays open for the life of the process."""
    path = Path(path)
    if not path.exists():
        raise MissingDataError(f"LMDB {path} does not exist")
    subdir = path.is_dir()
    if subdir and not (path / "data.mdb").is_file():
        raise MissingDataError(f"{path} is a folder without data.mdb, not an LMDB export")
    data_file = (path / "data.mdb" if subdir else path).resolve()
    cache_key = (os.getpid(), str(data_file))
    env = _OPEN_ENVS.get(cache_key)
    if env is not None:
        return env
    try:
        env = lmdb.open(
            str(data_file),
            subdir=False,
            readonly=True,
            lock=False,
            readahead=False,
            meminit=False,
            max_readers=256,
        )
    except lmdb.Error as err:
        raise DataSourceError(f"cannot open LMDB {path}: {err}") from err
    _OPEN_ENVS[cache_key] = env
    return env


def _key_to_id(key: bytes) -> str:
    # LSUN keys are ASCII hex; anything else is named by its hex so that ids stay file-safe.
    try:
        text = key.decode("ascii")
    except UnicodeDecodeError:
        return key.hex()
    return text if text.isprintable() and "/" not in text else key.hex()


class LMDBImageDataset(ImageRecordDataset):
    """`ImageRecordDataset` reading encoded images from an LMDB by key."""

    def __init__(
        self,
        lmdb_path: str | os.PathLike[str],
        items: list[ImageItem],
        resolution: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(items, resolution, **kwargs)
        self.lmdb_path = str(lmdb_path)
        self._env: Any = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # An open environment must not cross a fork/spawn: each worker opens its own.
        state = self.__dict__.copy()
        state["_env"], state["_pid"] = None, None
        return state

    def _environment(self) -> Any:
        # Opened on first read, in the process that reads (lazily per DataLoader worker).
        if self._env is None or self._pid != os.getpid():
            self._env = open_lmdb(self.lmdb_path)
            self._pid = os.getpid()
        return self._env

    def decode(self, item: ImageItem) -> Image.Image:
        assert item.key is not None
        with self._environment().begin(write=False, buffers=False) as txn:
            value = txn.get(item.key)
        if value is None:
            raise ImageLoadError(item.path, "key not found in the LMDB")
        return decode_image(value, name=item.path, alpha=self.alpha)


class LSUNDataModule(ImageRecordDataModule):
    """LSUN records (class always -1) from an LMDB export.

    ``subset``: a count (first N keys), ``{"count": N, "seed": s}`` (N random keys), or a key
    list / key file (``ids``). ``per_class`` is meaningless here (no labels) and refused.
    ``path`` in the records is ``<lmdb_path>#<key>``.
    """

    def __init__(
        self,
        lmdb_path: str | os.PathLike[str],
        resolution: int = 256,
        *,
        subset: Any = None,
        preprocessing: PreprocessMethod = "pggan",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("n_classes", None)
        super().__init__(resolution, subset=subset, preprocessing=preprocessing, **kwargs)
        if self.subset.per_class is not None:
            raise ValueError("LSUN has no labels; a per_class subset is not possible")
        self.lmdb_path = Path(lmdb_path)

    def _item(self, key: bytes) -> ImageItem:
        image_id = _key_to_id(key)
        return ImageItem(image_id, f"{self.lmdb_path}#{image_id}", key=key)

    def list_items(self) -> list[ImageItem]:
        spec = self.subset
        with open_lmdb(self.lmdb_path).begin(write=False) as txn:
            if spec.ids is not None and spec.count is None:
                # An explicit key list: look the keys up instead of walking millions of keys.
                # The subset step then puts them in the list's order.
                wanted, _, source = spec.id_list()
                missing = [k for k in wanted if txn.get(k.encode()) is None]
                if missing:
                    raise DataSourceError(
                        f"{len(missing)} key(s) of {source} are not in {self.lmdb_path}: "
                        f"{examples(missing)}"
                    )
                return [self._item(k.encode()) for k in sorted(set(wanted))]
            # "The first N" needs only N keys; the subset step then selects the same N.
            limit = spec.count if spec.ids is None and spec.seed is None else None
            keys: list[bytes] = []
            for key in txn.cursor().iternext(keys=True, values=False):
                if limit is not None and len(keys) >= limit:
                    break
                keys.append(bytes(key))
        if not keys and limit != 0:
            raise DataSourceError(f"LMDB {self.lmdb_path} holds no records")
        return [self._item(k) for k in keys]

    def make_dataset(self, items: list[ImageItem]) -> ImageRecordDataset:
        return LMDBImageDataset(
            self.lmdb_path,
            items,
            self.resolution,
            preprocessing=self.preprocessing,
            min_size_policy=self.min_size_policy,
            alpha=self.alpha,
            n_classes=self.n_classes,
        )
