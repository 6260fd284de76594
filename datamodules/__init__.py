"""Datamodules that list and read the images of a run (installed as genprior.datamodules).

Each lists its images as `genprior.items.ImageItem`s (subset, resume skips, shard) and reads
them with its dataset (``ImageRecordDataset.read``: the item with its tensor); an unreadable
image gets ``error`` set, never an exception. See docs/data.md.
"""

from .folder import ImageFolderDataModule, read_list_file
from .imagenet import (
    ImageNetLabels,
    ImageNetValDataModule,
    imagenet_class_name,
    imagenet_info,
    imagenet_wnids,
    read_devkit_meta,
    read_imagenet_labels,
)
from .load import (
    DATA_ORIGINS,
    build_datamodule,
    image_reader,
    list_images,
    load_items,
    sample_item,
    where_from,
)
from .lsun import LMDBImageDataset, LSUNDataModule, open_lmdb
from .records import (
    DGP_IMAGENET_1K_LIST,
    DataSourceError,
    ImageRecordDataModule,
    ImageRecordDataset,
    MissingDataError,
    SubsetSpec,
    apply_subset,
    collate_records,
    select_shard,
)

__all__ = [
    "DATA_ORIGINS",
    "DGP_IMAGENET_1K_LIST",
    "DataSourceError",
    "ImageFolderDataModule",
    "ImageNetLabels",
    "ImageNetValDataModule",
    "ImageRecordDataModule",
    "ImageRecordDataset",
    "LMDBImageDataset",
    "LSUNDataModule",
    "MissingDataError",
    "SubsetSpec",
    "apply_subset",
    "build_datamodule",
    "collate_records",
    "image_reader",
    "imagenet_class_name",
    "imagenet_info",
    "imagenet_wnids",
    "list_images",
    "load_items",
    "open_lmdb",
    "read_devkit_meta",
    "read_imagenet_labels",
    "read_list_file",
    "sample_item",
    "select_shard",
    "where_from",
]
