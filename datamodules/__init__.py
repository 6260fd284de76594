"""Datamodules that feed images to the per-image fitting loop (installed as genprior.datamodules).

Each yields records ``{"image", "class", "id", "path", "error", "warning"}`` (see
`ImageRecordDataset`); an unreadable image becomes a record with ``error`` set, never an
exception. See docs/data.md.
"""

from .folder import ImageFolderDataModule, read_list_file
from .imagenet import (
    ImageNetLabels,
    ImageNetValDataModule,
    imagenet_wnids,
    read_devkit_meta,
    read_imagenet_labels,
)
from .lsun import LMDBImageDataset, LSUNDataModule, open_lmdb
from .records import (
    DGP_IMAGENET_1K_LIST,
    DataSourceError,
    ImageItem,
    ImageRecordDataModule,
    ImageRecordDataset,
    SubsetSpec,
    apply_subset,
    collate_records,
    select_shard,
)

__all__ = [
    "DGP_IMAGENET_1K_LIST",
    "DataSourceError",
    "ImageFolderDataModule",
    "ImageItem",
    "ImageNetLabels",
    "ImageNetValDataModule",
    "ImageRecordDataModule",
    "ImageRecordDataset",
    "LMDBImageDataset",
    "LSUNDataModule",
    "SubsetSpec",
    "apply_subset",
    "collate_records",
    "imagenet_wnids",
    "open_lmdb",
    "read_devkit_meta",
    "read_imagenet_labels",
    "read_list_file",
    "select_shard",
]
