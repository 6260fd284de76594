"""ImageNet (ILSVRC2012) validation images with their class indices.

The class index everywhere in genprior is the *standard* 0..999 index that BigGAN and
torchvision use: the position of the image's WordNet id (WNID) in the sorted list of the
1000 ILSVRC2012 WNIDs. The devkit's own ``ILSVRC2012_ID`` (1..1000) is a different order, so a
devkit ground-truth file is only usable together with the devkit's ``meta.mat``, which maps
ILSVRC2012_ID to WNID. That mapping is not shipped by torch, torchvision or timm, so it cannot
be derived offline; the sorted WNID list itself is read from timm's package data
(``timm/data/_info/imagenet_synsets.txt``, a declared dependency) without importing timm.

Accepted label sources (``labels=``):

* a DGP list file, ``<path> <class>`` per line (``scripts/imagenet_val_1k.txt`` format, or
  ``"dgp1k"`` for the shipped copy). The list names the images to use, in its order.
* the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (line k = ILSVRC2012_ID of
  ``ILSVRC2012_val_{k:08d}``) plus ``devkit_meta=meta.mat`` (looked up next to the file, or in
  ``../data`` when a devkit folder is given instead of the file).
* Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the first token of the
  prediction string is the WNID).
* none: a class-subfolder layout ``<root>/<wnid>/*.JPEG`` gives the classes (WNID folders are
  mapped to the standard index; other folder names get their sorted position, like
  torchvision's ImageFolder); a flat folder without labels gives class -1 (unknown; DGP then
  picks the class itself, SPEC §6 select_z).
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from timm.data import ImageNetInfo

from genprior.image_io import IMAGE_EXTENSIONS
from genprior.items import ImageItem

from .records import (
    DGP_IMAGENET_1K_LIST,
    DataSourceError,
    ImageRecordDataModule,
    MissingDataError,
    examples,
    text_lines,
)

__all__ = [
    "ImageNetLabels",
    "ImageNetValDataModule",
    "imagenet_class_name",
    "imagenet_info",
    "imagenet_wnids",
    "read_devkit_meta",
    "read_imagenet_labels",
]

VAL_ID = re.compile(r"^ILSVRC2012_val_(\d{8})$")
DEVKIT_GT_NAME = "ILSVRC2012_validation_ground_truth.txt"


@functools.lru_cache(maxsize=1)
def imagenet_info() -> ImageNetInfo:
    """timm's ImageNet-1k class table (descriptions, label names), read once."""
    return ImageNetInfo()


def imagenet_class_name(index: int) -> str:
    """The ImageNet-1k description of class ``index`` ("golden retriever"; some hold several
    names, "tench, Tinca tinca")."""
    return str(imagenet_info().index_to_description(int(index)))


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC2012 WNIDs in sorted order: position = standard class index."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the ImageNet WNID table is read from timm's package data; install timm"
        )
    path = (
        Path(next(iter(spec.submodule_search_locations)))
        / "data"
        / "_info"
        / "imagenet_synsets.txt"
    )
    wnids = tuple(line.strip() for line in text_lines(path) if line.strip())
    # The standard index *is* the sorted order; refuse a file that breaks that assumption.
    if len(wnids) != 1000 or list(wnids) != sorted(set(wnids)):
        raise RuntimeError(f"{path} is not the sorted list of 1000 ImageNet WNIDs")
    return wnids


@functools.lru_cache(maxsize=1)
def _wnid_index() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(imagenet_wnids())}


def read_devkit_meta(path: str | os.PathLike[str]) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID for the 1000 leaf synsets of the devkit's ``meta.mat``."""
    try:
        synsets = scipy.io.loadmat(str(path), squeeze_me=True)["synsets"]
    except (OSError, ValueError, KeyError) as err:
        raise DataSourceError(f"cannot read the devkit meta file {path}: {err}") from err
    synsets = np.atleast_1d(synsets)
    try:
        ids = [int(v) for v in synsets["ILSVRC2012_ID"]]
        wnids = [str(v) for v in synsets["WNID"]]
        children = [int(v) for v in synsets["num_children"]]
    except (ValueError, KeyError) as err:
        raise DataSourceError(
            f"{path} lacks the synsets fields ILSVRC2012_ID / WNID / num_children: {err}"
        ) from err
    mapping = {i: w for i, w, c in zip(ids, wnids, children) if c == 0}
    index = _wnid_index()
    unknown = [w for w in mapping.values() if w not in index]
    if len(mapping) != 1000 or unknown:
        raise DataSourceError(
            f"{path} should list the 1000 ILSVRC2012 leaf synsets; it has {len(mapping)} "
            f"leaves, {len(unknown)} of them unknown WNIDs ({examples(unknown)})"
        )
    return mapping


@dataclass
class ImageNetLabels:
    """Class indices (0..999) by image id, read from one label source.

    ``order`` is set when the source names the images to use (a list file): then ``paths``
    holds each id's path as written in the list (relative to the image root).
    """

    classes: dict[str, int]
    source: str
    order: list[str] | None = None
    paths: dict[str, str] = field(default_factory=dict)


def read_imagenet_labels(
    labels: str | os.PathLike[str], devkit_meta: str | os.PathLike[str] | None = None
) -> ImageNetLabels:
    """Read a label source; the format is recognised from the name and the first line."""
    if str(labels) == "dgp1k":
        return _read_list_file(DGP_IMAGENET_1K_LIST)
    path = Path(labels)
    if path.is_dir():
        # A devkit folder (ILSVRC2012_devkit_t12): its data/ holds both files.
        for candidate in (path / "data" / DEVKIT_GT_NAME, path / DEVKIT_GT_NAME):
            if candidate.is_file():
                return _read_devkit(candidate, devkit_meta)
        raise MissingDataError(f"label folder {path} holds no data/{DEVKIT_GT_NAME}")
    if not path.is_file():
        raise MissingDataError(f"label file {path} does not exist")
    if path.suffix.lower() == ".csv":
        return _read_loc_csv(path)
    first = next((line.split() for line in text_lines(path) if line.strip()), [])
    if len(first) == 1 and first[0].isdigit():
        return _read_devkit(path, devkit_meta)
    return _read_list_file(path)


def _read_list_file(path: Path) -> ImageNetLabels:
    classes: dict[str, int] = {}
    order: list[str] = []
    paths: dict[str, str] = {}
    for lineno, line in enumerate(text_lines(path), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        image_id = Path(fields[0]).stem
        if image_id in paths:
            raise DataSourceError(f"{path} line {lineno}: {fields[0]} is listed twice")
        # The reference's rule: exactly two fields are <path> <class>, anything else is a path
        # without class (data/dgp/README.md).
        label = -1
        if len(fields) == 2:
            if not fields[1].lstrip("-").isdigit() or not -1 <= int(fields[1]) < 1000:
                raise DataSourceError(
                    f"{path} line {lineno}: class {fields[1]!r} is not an index in 0..999 (or -1)"
                )
            label = int(fields[1])
        order.append(image_id)
        paths[image_id] = fields[0]
        classes[image_id] = label
    if not order:
        raise DataSourceError(f"list file {path} names no images")
    return ImageNetLabels(classes, str(path), order, paths)


def _read_devkit(path: Path, devkit_meta: str | os.PathLike[str] | None) -> ImageNetLabels:
    meta = Path(devkit_meta) if devkit_meta is not None else path.with_name("meta.mat")
    if not meta.is_file():
        raise DataSourceError(
            f"{path} holds devkit ILSVRC2012_IDs (1..1000), which are not the standard 0..999 "
            f"class index; mapping them needs the devkit's meta.mat (not found at {meta}; pass "
            "devkit_meta=). That mapping is not available offline otherwise. Alternatively use "
            "LOC_val_solution.csv or a '<file> <class>' list file."
        )
    devkit_to_wnid = read_devkit_meta(meta)
    index = _wnid_index()
    classes: dict[str, int] = {}
    for lineno, line in enumerate(text_lines(path), start=1):
        text = line.strip()
        if not text:
            continue
        if not text.isdigit() or int(text) not in devkit_to_wnid:
            raise DataSourceError(f"{path} line {lineno}: {text!r} is not an ILSVRC2012_ID 1..1000")
        classes[f"ILSVRC2012_val_{lineno:08d}"] = index[devkit_to_wnid[int(text)]]
    return ImageNetLabels(classes, str(path))


def _read_loc_csv(path: Path) -> ImageNetLabels:
    index = _wnid_index()
    classes: dict[str, int] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise DataSourceError(
                f"{path}: expected the LOC_val_solution.csv columns ImageId,PredictionString, "
                f"found {reader.fieldnames}"
            )
        for lineno, row in enumerate(reader, start=2):
            tokens = (row["PredictionString"] or "").split()
            if not tokens or tokens[0] not in index:
                raise DataSourceError(
                    f"{path} line {lineno}: prediction {row['PredictionString']!r} does not "
                    "start with an ILSVRC2012 WNID"
                )
            classes[row["ImageId"].strip()] = index[tokens[0]]
    return ImageNetLabels(classes, str(path))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def _unique_ids(files: list[Path], where: Path) -> dict[str, Path]:
    by_id: dict[str, Path] = {}
    clashes = []
    for p in files:
        if p.stem in by_id:
            clashes.append(f"{by_id[p.stem].name} / {p.name}")
        by_id[p.stem] = p
    if clashes:
        raise DataSourceError(
            f"{where} has several files with the same id (stem): {examples(clashes)}"
        )
    return by_id


class ImageNetValDataModule(ImageRecordDataModule):
    """ImageNet val images as records (see `ImageRecordDataset`); classes in 0..999.

    ``root`` is the official flat folder of ``ILSVRC2012_val_*.JPEG`` (other files there are
    ignored) or a class-subfolder layout. ``labels`` is one of the sources in the module
    docstring. ``subset`` is a `SubsetSpec` or anything `SubsetSpec.parse` reads, e.g.
    ``"dgp1k"``, ``{"per_class": 1}`` or ``{"count": 100, "seed": 0}``. Images are listed in id
    order, except that a list file keeps its own order. The remaining keyword arguments are
    those of `ImageRecordDataModule` (``ids_to_skip``, ``batch_size``, ``rank``, ...).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        resolution: int = 128,
        labels: str | os.PathLike[str] | None = None,
        *,
        devkit_meta: str | os.PathLike[str] | None = None,
        subset: Any = None,
        n_classes: int | None = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(resolution, subset=subset, n_classes=n_classes, **kwargs)
        self.root = Path(root)
        self.labels = labels
        self.devkit_meta = devkit_meta
        self._list_source: str | None = None  # the list file that named the images, if one did

    def list_items(self) -> list[ImageItem]:
        if not self.root.is_dir():
            raise MissingDataError(f"ImageNet val folder {self.root} does not exist")
        if self.labels is None:
            return self._list_unlabeled()
        table = read_imagenet_labels(self.labels, self.devkit_meta)
        if table.order is not None:
            return self._list_from_list_file(table)
        files = self._flat_files() or [p for d in self._class_dirs() for p in _image_files(d)]
        by_id = _unique_ids(sorted(files, key=lambda p: p.stem), self.root)
        if not by_id:
            raise DataSourceError(f"{self.root} holds no images")
        unlabeled = [i for i in by_id if i not in table.classes]
        if unlabeled:
            raise DataSourceError(
                f"{table.source} has no label for {len(unlabeled)} of the {len(by_id)} images "
                f"in {self.root} ({len(table.classes)} labels in the file): {examples(unlabeled)}"
            )
        return [ImageItem(i, str(p), table.classes[i]) for i, p in by_id.items()]

    def _flat_files(self) -> list[Path]:
        return [p for p in _image_files(self.root) if VAL_ID.match(p.stem)]

    def _class_dirs(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _list_unlabeled(self) -> list[ImageItem]:
        flat = self._flat_files()
        if flat:
            by_id = _unique_ids(flat, self.root)
            return [ImageItem(i, str(p), -1) for i, p in sorted(by_id.items())]
        dirs = [d for d in self._class_dirs() if _image_files(d)]
        if not dirs:
            raise DataSourceError(
                f"{self.root} holds neither ILSVRC2012_val_*.JPEG files nor class subfolders "
                "with images"
            )
        index = _wnid_index()
        if all(d.name in index for d in dirs):
            class_of = {d.name: index[d.name] for d in dirs}
        else:
            # Not WNIDs: number the folders in sorted order, like torchvision's ImageFolder.
            class_of = {d.name: i for i, d in enumerate(dirs)}
        files = [p for d in dirs for p in _image_files(d)]
        by_id = _unique_ids(sorted(files, key=lambda p: p.stem), self.root)
        return [ImageItem(i, str(p), class_of[p.parent.name]) for i, p in by_id.items()]

    def _list_from_list_file(self, table: ImageNetLabels) -> list[ImageItem]:
        assert table.order is not None
        # The reference joins root_dir + '/' + the list's path (data/dgp/README.md). The files
        # are checked after the subset (check_items): a partial copy serves a subset of it.
        self._list_source = table.source
        return [ImageItem(i, str(self.root / table.paths[i]), table.classes[i]) for i in table.order]

    def check_items(self, items: list[ImageItem]) -> None:
        """Every image a list file names (of those the subset chose) must be in ``root``."""
        if self._list_source is None:
            return  # listed from the folder itself: every item is a file found there
        # named as the list writes them (relative to root)
        missing = [os.path.relpath(item.path, self.root) for item in items
                   if not Path(item.path).is_file()]
        if missing:
            raise DataSourceError(
                f"{len(missing)} of the {len(items)} images named by {self._list_source} (those "
                f"the subset chose) are not in {self.root}: {examples(missing)}"
            )
