"""What every genprior datamodule shares: items, records, subsets, resume skips and shards.

A datamodule first *lists* its images as `ImageItem`s (id, class, where to read it) in a
deterministic order, then narrows the list in three steps that are always applied in this
order:

1. ``subset`` (`SubsetSpec`): an id list, first N per class, first N, or N random with a seed.
   It is computed on the full listing, so it does not change when images are skipped.
2. ``ids_to_skip``: ids already finished by an earlier run (resume).
3. sharding (`select_shard`): rank r of w distributed processes takes a contiguous slice.

Skipping before sharding keeps the remaining work balanced between ranks on resume; the price
is that an image may land on a different rank than in the interrupted run, which does not
matter because every image is fitted independently.

The dataset then reads each item (``ImageRecordDataset.read``: the item with its tensor), and
never raises for one bad image: the item carries the reason in ``error`` instead. ``ImageItem``
is genprior's one item type (genprior.items), from the listing to the result row.
"""

from __future__ import annotations

import os
import random
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from genprior.errors import UserError
from genprior.image_io import (
    AlphaPolicy,
    ImageLoadError,
    MinSizePolicy,
    PreprocessMethod,
    load_image,
    preprocess,
)
from genprior.items import ImageItem

__all__ = [
    "DGP_IMAGENET_1K_LIST",
    "DataSourceError",
    "ImageRecordDataModule",
    "ImageRecordDataset",
    "MissingDataError",
    "SubsetSpec",
    "apply_subset",
    "collate_records",
    "examples",
    "select_shard",
    "text_lines",
]

T = TypeVar("T")

#: The reference's list of 1,000 ImageNet val images (one per class) used by
#: experiments/imagenet1k_128, shipped with the package; ``subset="dgp1k"`` selects it.
DGP_IMAGENET_1K_LIST: Path = Path(__file__).with_name("imagenet_val_1k.txt")


class DataSourceError(ValueError, UserError):
    """A data source that cannot be used as a whole: a label file that does not match the
    images, an id list naming absent images, a subset larger than the data, ..."""


class MissingDataError(UserError, FileNotFoundError):
    """A data file or folder the run names (image source, list file, list root, ImageNet val
    folder, label file, LMDB export, id file, listed images) is not there. ``load.list_images``
    adds where the data comes from and the config key to set."""


def text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a list file, an id list); a line that is not UTF-8 is a
    DataSourceError naming the file and the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        lineno = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataSourceError(
            f"{path} line {lineno} is not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
            f"{column}): save the file as UTF-8, or fix or remove that line"
        ) from None


def examples(values: Iterable[Any], k: int = 5) -> str:
    """'a, b, c (and 7 more)': a short sample of offending values for an error message."""
    values = list(values)
    shown = ", ".join(str(v) for v in values[:k])
    return shown + (f" (and {len(values) - k} more)" if len(values) > k else "")


# --------------------------------------------------------------------------------------------
# Subsets, resume skips, shards
# --------------------------------------------------------------------------------------------


@dataclass
class SubsetSpec:
    """Which of the listed images to use; all fields optional and combined in this order.

    * ``ids``: explicit ids (file stems / LMDB keys), or a path to a file with one id per line.
      Only the first column of each line is read and reduced to its stem, so a DGP list file
      (``<path> <class>``) works too; its class column is then checked against (or, where the
      data has no labels, used as) the image's class. The selection keeps the file's order.
      ``"dgp1k"`` names the reference's 1,000-image ImageNet list shipped with the package.
    * ``per_class``: the first N images of every class (needs labels).
    * ``count``: N images; the first N, or N drawn at random with ``seed`` (the draw is then
      put back into listing order, so the order stays deterministic).
    """

    ids: list[str] | str | None = None
    per_class: int | None = None
    count: int | None = None
    seed: int | None = None

    @classmethod
    def parse(cls, spec: Any) -> SubsetSpec:
        """Accept a SubsetSpec, None / "all", "dgp1k", an int (count), a list of ids, a path
        to an id file, or a mapping with the field names (as a config would give it)."""
        if spec is None or (isinstance(spec, str) and spec in ("", "all")):
            return cls()
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, bool):
            raise TypeError(f"subset cannot be a bool ({spec!r})")
        if isinstance(spec, int):
            return cls(count=spec)
        if isinstance(spec, str | os.PathLike):
            return cls(ids=str(spec))
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"ids", "per_class", "count", "seed"}
            if unknown:
                raise TypeError(f"unknown subset field(s) {sorted(unknown)}")
            ids = spec.get("ids")
            if ids is not None and not isinstance(ids, str | os.PathLike):
                ids = [str(i) for i in ids]
            return cls(
                ids=str(ids) if isinstance(ids, os.PathLike) else ids,
                per_class=spec.get("per_class"),
                count=spec.get("count"),
                seed=spec.get("seed"),
            )
        if isinstance(spec, Sequence):
            return cls(ids=[str(i) for i in spec])
        raise TypeError(f"cannot read a subset from {spec!r}")

    def is_all(self) -> bool:
        return self.ids is None and self.per_class is None and self.count is None

    def id_list(self) -> tuple[list[str], dict[str, int], str]:
        """(ids in order, classes given by the id file, a name for error messages)."""
        if self.ids is None:
            return [], {}, ""
        if not isinstance(self.ids, str):
            return list(self.ids), {}, "the subset id list"
        path = DGP_IMAGENET_1K_LIST if self.ids == "dgp1k" else Path(self.ids)
        if not path.is_file():
            raise MissingDataError(f"subset id file {path} does not exist")
        ids: list[str] = []
        classes: dict[str, int] = {}
        for line in text_lines(path):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            image_id = Path(fields[0]).stem
            ids.append(image_id)
            # The reference's list-file rule (data README): exactly two fields = path, class.
            if len(fields) == 2 and _is_int(fields[1]):
                classes[image_id] = int(fields[1])
        return ids, classes, str(path)


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def apply_subset(items: list[ImageItem], spec: SubsetSpec) -> list[ImageItem]:
    """Narrow ``items`` (in listing order) as `SubsetSpec` describes; see its docstring."""
    if spec.is_all():
        return items
    if spec.ids is not None:
        wanted, classes, source = spec.id_list()
        by_id = {item.id: item for item in items}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise DataSourceError(
                f"{len(missing)} id(s) of {source} are not among the {len(items)} listed "
                f"images: {examples(missing)}"
            )
        dupes = sorted(i for i, n in Counter(wanted).items() if n > 1)
        if dupes:
            raise DataSourceError(f"{source} names some ids twice: {examples(dupes)}")
        items = [by_id[i] for i in wanted]
        if classes:
            items = _merge_classes(items, classes, source)
    if spec.per_class is not None:
        if spec.per_class <= 0:
            raise ValueError(f"per_class must be positive, got {spec.per_class}")
        unlabeled = [item.id for item in items if item.class_id < 0]
        if unlabeled:
            raise DataSourceError(
                f"a per_class subset needs a class for every image; {len(unlabeled)} have "
                f"none: {examples(unlabeled)}"
            )
        taken: dict[int, int] = {}
        kept = []
        for item in items:
            if taken.get(item.class_id, 0) < spec.per_class:
                taken[item.class_id] = taken.get(item.class_id, 0) + 1
                kept.append(item)
        items = kept
    if spec.count is not None:
        if spec.count < 0:
            raise ValueError(f"count must be >= 0, got {spec.count}")
        if spec.count > len(items):
            raise DataSourceError(
                f"subset asks for {spec.count} images but only {len(items)} are available"
            )
        if spec.seed is None:
            items = items[: spec.count]
        else:
            picked = sorted(random.Random(spec.seed).sample(range(len(items)), spec.count))
            items = [items[i] for i in picked]
    elif spec.seed is not None:
        raise ValueError("subset seed given without count")
    return items


def _merge_classes(items: list[ImageItem], classes: dict[str, int], source: str) -> list[ImageItem]:
    """Fill unknown classes from an id file's class column; refuse contradictions."""
    conflicts = [
        f"{item.id} (data {item.class_id}, list {classes[item.id]})"
        for item in items
        if item.id in classes and item.class_id >= 0 and item.class_id != classes[item.id]
    ]
    if conflicts:
        raise DataSourceError(
            f"the class column of {source} contradicts the data's labels for "
            f"{len(conflicts)} image(s): {examples(conflicts)}"
        )
    return [
        replace(item, class_id=classes[item.id]) if item.class_id < 0 and item.id in classes else item
        for item in items
    ]


def select_shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """The contiguous slice of ``items`` that rank ``rank`` of ``world`` processes.

    Rank r gets items[floor(r*N/w) : floor((r+1)*N/w)]: disjoint, covering everything once, in
    order, with sizes that differ by at most one. The reference's sampler (DGP SPEC §11)
    instead pads the list to a multiple of w by repeating its first items, so that every rank
    does the same number of images (its per-image all-reduce needs that); here no image is
    done twice and ranks may differ by one image. When w divides N both give the same slices.
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    n = len(items)
    return list(items[rank * n // world : (rank + 1) * n // world])


# --------------------------------------------------------------------------------------------
# Dataset and records
# --------------------------------------------------------------------------------------------


class ImageRecordDataset(Dataset):
    """Reads and preprocesses `ImageItem`s. Never raises for a bad image.

    ``read(item)`` is the item read: a copy with its ``image`` (float32 [3, R, R] in [-1, 1]),
    or with ``error`` saying why it cannot be used, and ``warning`` what reading it warned about
    (e.g. an upsampled small image; the warnings are also emitted with `warnings.warn`). The
    engine calls it when the item's batch comes up. Indexing gives the same as a *record*, a
    dict with the same keys for every image, so that a data loader's batches collate:

    * ``"image"``: the image (zeros when ``error`` is set);
    * ``"class"``: int, -1 when unknown;
    * ``"id"``: str, the name used for output folders (file stem, or LMDB key);
    * ``"path"``: str, the file (``<lmdb>#<key>`` for LMDB records);
    * ``"error"``: str, empty when the image is usable, else why it is not;
    * ``"warning"``: str, empty unless reading it warned.
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        resolution: int,
        *,
        preprocessing: PreprocessMethod = "dgp",
        min_size_policy: MinSizePolicy = "upsample",
        alpha: AlphaPolicy = "drop",
        n_classes: int | None = None,
    ) -> None:
        self.items = list(items)
        self.resolution = resolution
        self.preprocessing: PreprocessMethod = preprocessing
        self.min_size_policy: MinSizePolicy = min_size_policy
        self.alpha: AlphaPolicy = alpha
        self.n_classes = n_classes

    def __len__(self) -> int:
        return len(self.items)

    def decode(self, item: ImageItem) -> Image.Image:
        """Decode one item to RGB; subclasses read from elsewhere than the file system."""
        return load_image(item.path, alpha=self.alpha)

    def read(self, item: ImageItem) -> ImageItem:
        """``item`` read and preprocessed (a copy: the listed item keeps no tensor)."""
        if item.error:
            return replace(item, image=None)
        if self.n_classes is not None and not -1 <= item.class_id < self.n_classes:
            return replace(item, image=None, error=(
                f"class {item.class_id} is outside 0..{self.n_classes - 1} "
                f"(n_classes={self.n_classes}; -1 means unknown)"
            ))
        image, error = None, None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                image = preprocess(
                    self.decode(item),
                    self.resolution,
                    method=self.preprocessing,
                    min_size_policy=self.min_size_policy,
                    name=item.path,
                )
            except ImageLoadError as err:
                error = err.reason
            except Exception as err:
                # One undecodable image must not cost the others: whatever PIL or the reader
                # raised is recorded for this image and the evaluation goes on.
                error = f"{type(err).__name__}: {err}"
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        warning = "; ".join(str(w.message) for w in caught) or None
        return replace(item, image=image, error=error, warning=warning)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.read(self.items[index])
        return {
            "image": item.image if item.image is not None
            else torch.zeros(3, self.resolution, self.resolution),
            "class": item.class_id,
            "id": item.id,
            "path": item.path,
            "error": item.error or "",
            "warning": item.warning or "",
        }


def collate_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch records: ``image`` [B,3,R,R], ``class`` int64 [B], the strings as lists."""
    shapes = {tuple(r["image"].shape) for r in records}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot batch images of different sizes {sorted(shapes)} (preprocessing='none' "
            "keeps each image's own size); use batch_size=1"
        )
    return {
        "image": torch.stack([r["image"] for r in records]),
        "class": torch.tensor([r["class"] for r in records], dtype=torch.long),
        "id": [r["id"] for r in records],
        "path": [r["path"] for r in records],
        "error": [r["error"] for r in records],
        "warning": [r["warning"] for r in records],
    }


# --------------------------------------------------------------------------------------------
# DataModule base
# --------------------------------------------------------------------------------------------


@dataclass
class _Selection:
    listed: int = 0
    after_subset: int = 0
    skipped: int = 0
    ids: list[str] = field(default_factory=list)


class ImageRecordDataModule(LightningDataModule):
    """Base of the image datamodules: subset -> skip -> shard, then a record loader.

    Subclasses implement `list_items` (the full, deterministically ordered listing) and may
    override `make_dataset`. The loader is returned by `predict_dataloader` (and, as the same
    loader, `test_dataloader` and `val_dataloader`); it never shuffles. ``rank`` and
    ``world_size`` default to the attached Trainer's, else to torch.distributed's, else 0/1.
    """

    def __init__(
        self,
        resolution: int,
        *,
        subset: Any = None,
        ids_to_skip: Iterable[str] = (),
        batch_size: int = 1,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        preprocessing: PreprocessMethod = "dgp",
        min_size_policy: MinSizePolicy = "upsample",
        alpha: AlphaPolicy = "drop",
        n_classes: int | None = None,
    ) -> None:
        super().__init__()
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if min_size_policy not in ("upsample", "error"):
            raise ValueError(
                f"min_size_policy must be 'upsample' or 'error', got {min_size_policy!r}"
            )
        if preprocessing not in ("dgp", "pggan", "none"):
            raise ValueError(
                f"preprocessing must be 'dgp', 'pggan' or 'none', got {preprocessing!r}"
            )
        if alpha not in ("drop", "white"):
            raise ValueError(f"alpha must be 'drop' or 'white', got {alpha!r}")
        self.resolution = resolution
        self.subset = SubsetSpec.parse(subset)
        self.ids_to_skip = frozenset(ids_to_skip)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._rank = rank
        self._world_size = world_size
        self.preprocessing: PreprocessMethod = preprocessing
        self.min_size_policy: MinSizePolicy = min_size_policy
        self.alpha: AlphaPolicy = alpha
        self.n_classes = n_classes
        self.dataset: ImageRecordDataset | None = None
        self.selection = _Selection()

    # -- to implement --------------------------------------------------------------------

    def list_items(self) -> list[ImageItem]:
        raise NotImplementedError

    def check_items(self, items: list[ImageItem]) -> None:
        """Check the chosen items' files before any is read (after the subset, so that a
        subset of a partial copy of a dataset works); the default checks nothing."""

    def make_dataset(self, items: list[ImageItem]) -> ImageRecordDataset:
        return ImageRecordDataset(
            items,
            self.resolution,
            preprocessing=self.preprocessing,
            min_size_policy=self.min_size_policy,
            alpha=self.alpha,
            n_classes=self.n_classes,
        )

    # -- Lightning hooks -----------------------------------------------------------------

    def rank_and_world(self) -> tuple[int, int]:
        if self._rank is not None or self._world_size is not None:
            return (self._rank or 0, self._world_size or 1)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def select_items(self) -> list[ImageItem]:
        """The items this process will read: subset, then resume skips, then its shard."""
        items = self.list_items()
        listed = len(items)
        items = apply_subset(items, self.subset)
        self.check_items(items)
        after_subset = len(items)
        items = [item for item in items if item.id not in self.ids_to_skip]
        skipped = after_subset - len(items)
        rank, world = self.rank_and_world()
        items = select_shard(items, rank, world)
        self.selection = _Selection(listed, after_subset, skipped, [i.id for i in items])
        return items

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = self.make_dataset(self.select_items())

    def predict_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup()
        assert self.dataset is not None
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_records,
        )

    test_dataloader = predict_dataloader
    val_dataloader = predict_dataloader
