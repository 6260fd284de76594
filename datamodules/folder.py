"""Arbitrary images: one file, a folder of images, or a list file.

List files follow the reference's ``ImageDataset`` format (data/dgp/README.md): one image per
line, ``<path> [class]``, the path relative to ``root`` (default: the list file's folder), the
id being the file's stem. Differences from the reference, all for robustness:

* blank lines and lines starting with ``#`` are skipped (the reference would crash on them);
* the class is the *last* field when it is an integer, and the path is everything before it,
  so paths with spaces work (the reference uses only the first field when there are more
  than two);
* a class that is not an integer, or (with ``n_classes``) outside -1..n_classes-1, becomes an
  error record for that image instead of stopping the run.

Ids must be unique because they name the output folders; two files with the same stem are a
setup error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from genprior.image_io import IMAGE_EXTENSIONS
from genprior.items import ImageItem

from .records import DataSourceError, ImageRecordDataModule, MissingDataError, examples, text_lines

__all__ = ["LIST_SUFFIXES", "ImageFolderDataModule", "read_list_file"]

#: Suffixes that make a file a list file rather than an image (with ``kind="auto"``).
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})

SourceKind = Literal["auto", "image", "folder", "list"]


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def read_list_file(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    default_class: int = -1,
) -> list[ImageItem]:
    """Items of a ``<path> [class]`` list file, in file order (see the module docstring)."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    items: list[ImageItem] = []
    for lineno, raw in enumerate(text_lines(path), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        error: str | None = None
        label = default_class
        name = line
        if len(fields) >= 2:
            head, last = line.rsplit(maxsplit=1)
            if _is_int(last):
                name, label = head.strip(), int(last)
            elif not (base / line).is_file():
                # Two or more fields, the last not an integer, and not a file name with
                # spaces either: report this line, keep going with the others.
                name = fields[0]
                error = (
                    f"{path} line {lineno}: the last field {last!r} is not an integer class "
                    f"and {line!r} is not a file either (expected '<path> [class]')"
                )
        image_path = Path(name) if Path(name).is_absolute() else base / name
        items.append(ImageItem(Path(name).stem, str(image_path), class_id=label, error=error))
    return items


class ImageFolderDataModule(ImageRecordDataModule):
    """Records from a single image, a folder of images, or a list file.

    ``kind="auto"`` decides from ``path``: a folder, a list file (suffix .txt/.lst/.list), or
    else a single image. Folders are read non-recursively (``recursive=True`` walks
    subfolders), sorted by file name; files without an image suffix are ignored.
    ``default_class`` is the class of images that have none (single image, folder, list lines
    without a class column); -1 means unknown. Pass ``n_classes`` (1000 for a BigGAN prior) to
    turn a class outside -1..n_classes-1 into a per-image error. ``preprocess=False`` is
    shorthand for ``preprocessing="none"``: images keep their own size (for DIP).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        resolution: int = 256,
        *,
        root: str | os.PathLike[str] | None = None,
        kind: SourceKind = "auto",
        default_class: int = -1,
        recursive: bool = False,
        preprocess: bool = True,
        **kwargs: Any,
    ) -> None:
        if not preprocess:
            if kwargs.get("preprocessing", "none") != "none":
                raise ValueError(
                    "preprocess=False contradicts preprocessing=" + repr(kwargs["preprocessing"])
                )
            kwargs["preprocessing"] = "none"
        super().__init__(resolution, **kwargs)
        if kind not in ("auto", "image", "folder", "list"):
            raise ValueError(f"kind must be auto, image, folder or list, got {kind!r}")
        self.path = Path(path)
        self.root = root
        self.kind: SourceKind = kind
        self.default_class = default_class
        self.recursive = recursive

    def resolved_kind(self) -> SourceKind:
        if self.kind != "auto":
            return self.kind
        if self.path.is_dir():
            return "folder"
        return "list" if self.path.suffix.lower() in LIST_SUFFIXES else "image"

    def list_items(self) -> list[ImageItem]:
        if not self.path.exists():
            what = "list file" if self.resolved_kind() == "list" else "image source"
            raise MissingDataError(f"{what} {self.path} does not exist")
        kind = self.resolved_kind()
        if kind == "image":
            items = [ImageItem(self.path.stem, str(self.path), self.default_class)]
        elif kind == "list":
            if self.root is not None and not Path(self.root).is_dir():
                raise MissingDataError(f"list root {self.root} (data.root) does not exist")
            items = read_list_file(self.path, self.root, self.default_class)
            if not items:
                raise DataSourceError(f"list file {self.path} names no images")
        else:
            pattern = "**/*" if self.recursive else "*"
            files = sorted(
                p
                for p in self.path.glob(pattern)
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            if not files:
                raise DataSourceError(
                    f"folder {self.path} holds no images (suffixes {sorted(IMAGE_EXTENSIONS)})"
                )
            items = [ImageItem(p.stem, str(p), self.default_class) for p in files]
        seen: dict[str, str] = {}
        clashes = []
        for item in items:
            if item.id in seen:
                clashes.append(f"{seen[item.id]} / {item.path}")
            seen[item.id] = item.path
        if clashes:
            raise DataSourceError(
                f"{self.path}: several images share an id (file stem), which names their output "
                f"folder: {examples(clashes)}"
            )
        return items
