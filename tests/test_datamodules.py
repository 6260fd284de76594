"""Datamodules on real files built in tmp_path: ImageNet val layouts and label files, an LSUN
LMDB, image folders and list files; subsets, resume skips, shards and per-image errors."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genprior.datamodules import (
    DataSourceError,
    ImageFolderDataModule,
    ImageNetValDataModule,
    LSUNDataModule,
    SubsetSpec,
    imagenet_wnids,
    select_shard,
)
from genprior.image_io import SmallImageWarning, load_image, preprocess
from genprior.items import ImageItem

pytestmark = pytest.mark.shared

# Standard 0..999 classes of the example JPEGs (shared/data/dgp/README.md).
CLASSES = {
    "ILSVRC2012_val_00000525": 863,
    "ILSVRC2012_val_00001172": 269,
    "ILSVRC2012_val_00001970": 737,
    "ILSVRC2012_val_00003004": 693,
    "ILSVRC2012_val_00004291": 442,
    "ILSVRC2012_val_00008229": 174,
    "ILSVRC2012_val_00020814": 185,
    "ILSVRC2012_val_00022130": 511,
    "ILSVRC2012_val_00042095": 260,
    "ILSVRC2012_val_00044065": 425,
    "ILSVRC2012_val_00044640": 425,
}
IDS = sorted(CLASSES)
RES = 32  # small working size: the tests are about bookkeeping, parity is checked at 128


def _records(dm) -> list[dict]:
    dm.setup()
    return [dm.dataset[i] for i in range(len(dm.dataset))]


def _ids(dm) -> list[str]:
    dm.setup()
    return [item.id for item in dm.dataset.items]


# --------------------------------------------------------------------------------------------
# ImageNet val
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def val_dir(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official flat layout with the 11 example JPEGs (plus a stray file to ignore)."""
    root = tmp_path_factory.mktemp("imagenet") / "val"
    root.mkdir()
    for image_id in IDS:
        shutil.copy(shared_dir / "data" / "dgp" / f"{image_id}.JPEG", root)
    (root / "README.txt").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def devkit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A devkit folder: meta.mat with the WNIDs in a shuffled (non-sorted) ILSVRC2012_ID order,
    plus non-leaf synsets, and the 50,000-line ground truth in those ids."""
    import scipy.io

    wnids = list(imagenet_wnids())
    order = wnids[:]
    random.Random(0).shuffle(order)
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.zeros((1002,), dtype=fields)
    for k, wnid in enumerate(order):
        synsets[k] = (k + 1, wnid, f"synset {wnid}", 0)
    synsets[1000] = (1001, "n00001740", "entity", 3)
    synsets[1001] = (1002, "n00002137", "abstraction", 2)
    data = tmp_path_factory.mktemp("devkit") / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    scipy.io.savemat(data / "meta.mat", {"synsets": synsets.reshape(-1, 1)})
    devkit_id = {w: k + 1 for k, w in enumerate(order)}
    lines = ["1"] * 50000
    for image_id, cls in CLASSES.items():
        lines[int(image_id[-8:]) - 1] = str(devkit_id[wnids[cls]])
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(lines) + "\n")
    return data.parent


def _loc_csv(path: Path, ids: list[str]) -> Path:
    wnids = imagenet_wnids()
    rows = ["ImageId,PredictionString"]
    rows += [f"{i},{wnids[CLASSES[i]]} 10 20 300 400 {wnids[CLASSES[i]]} 5 5 50 60 " for i in ids]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_imagenet_flat_folder_without_labels(val_dir: Path) -> None:
    dm = ImageNetValDataModule(val_dir, RES)
    records = _records(dm)
    assert [r["id"] for r in records] == IDS
    assert all(r["class"] == -1 and r["error"] == "" for r in records)
    assert records[0]["image"].shape == (3, RES, RES)
    assert records[0]["path"] == str(val_dir / "ILSVRC2012_val_00000525.JPEG")


def test_imagenet_dgp_list_file(val_dir: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    # Lines as in imagenet_val_1k.txt, in list order (not sorted).
    listing.write_text(
        "ILSVRC2012_val_00003004.JPEG 693\nILSVRC2012_val_00000525.JPEG 863\n"
        "ILSVRC2012_val_00001970.JPEG 737\n"
    )
    dm = ImageNetValDataModule(val_dir, RES, labels=listing)
    dm.setup()
    assert [(i.id, i.class_id) for i in dm.dataset.items] == [
        ("ILSVRC2012_val_00003004", 693),
        ("ILSVRC2012_val_00000525", 863),
        ("ILSVRC2012_val_00001970", 737),
    ]
    # The same lines in the shipped reference list.
    shipped = {}
    for line in (
        (Path(__file__).parents[1] / "datamodules" / "imagenet_val_1k.txt").read_text().splitlines()
    ):
        name, cls = line.split()
        shipped[Path(name).stem] = int(cls)
    assert all(shipped[i.id] == i.class_id for i in dm.dataset.items)


def test_imagenet_list_file_naming_absent_images(val_dir: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("ILSVRC2012_val_00000525.JPEG 863\nILSVRC2012_val_00000001.JPEG 65\n")
    with pytest.raises(
        DataSourceError, match=r"1 of the 2 images named by .*list\.txt.*ILSVRC2012_val_00000001"
    ):
        ImageNetValDataModule(val_dir, RES, labels=listing).setup()
    # The shipped 1k list as a subset: 997 of its images are not in this folder.
    with pytest.raises(DataSourceError, match=r"997 id\(s\) of .*imagenet_val_1k\.txt"):
        ImageNetValDataModule(val_dir, RES, subset="dgp1k").setup()


def test_imagenet_subset_file_supplies_classes(val_dir: Path, tmp_path: Path) -> None:
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("ILSVRC2012_val_00001970.JPEG 737\nILSVRC2012_val_00000525.JPEG 863\n")
    dm = ImageNetValDataModule(val_dir, RES, subset=str(ids_file))
    dm.setup()
    assert [(i.id, i.class_id) for i in dm.dataset.items] == [
        ("ILSVRC2012_val_00001970", 737),
        ("ILSVRC2012_val_00000525", 863),
    ]
    ids_file.write_text("ILSVRC2012_val_00001970.JPEG 5\n")
    with pytest.raises(DataSourceError, match=r"contradicts.*ILSVRC2012_val_00001970"):
        ImageNetValDataModule(
            val_dir, RES, labels=_loc_csv(tmp_path / "l.csv", IDS), subset=str(ids_file)
        ).setup()


def test_imagenet_devkit_labels_via_meta_mat(val_dir: Path, devkit: Path) -> None:
    gt = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    for labels in (gt, devkit):  # the file, or the devkit folder
        dm = ImageNetValDataModule(val_dir, RES, labels=labels)
        dm.setup()
        assert {i.id: i.class_id for i in dm.dataset.items} == CLASSES


def test_imagenet_devkit_without_meta_is_refused(
    val_dir: Path, devkit: Path, tmp_path: Path
) -> None:
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    shutil.copy(devkit / "data" / gt.name, gt)
    with pytest.raises(DataSourceError, match=r"not the standard 0\.\.999 class index.*meta\.mat"):
        ImageNetValDataModule(val_dir, RES, labels=gt).setup()
    dm = ImageNetValDataModule(val_dir, RES, labels=gt, devkit_meta=devkit / "data" / "meta.mat")
    dm.setup()
    assert len(dm.dataset) == 11


def test_imagenet_devkit_file_too_short(val_dir: Path, devkit: Path, tmp_path: Path) -> None:
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("\n".join((devkit / "data" / gt.name).read_text().splitlines()[:5000]) + "\n")
    with pytest.raises(
        DataSourceError,
        match=r"ground_truth\.txt has no label for 6 of the 11 images .*5000 labels.*ILSVRC2012_val_00008229",
    ):
        ImageNetValDataModule(
            val_dir, RES, labels=gt, devkit_meta=devkit / "data" / "meta.mat"
        ).setup()


def test_imagenet_loc_csv_and_mismatch(val_dir: Path, tmp_path: Path) -> None:
    dm = ImageNetValDataModule(
        val_dir, RES, labels=_loc_csv(tmp_path / "LOC_val_solution.csv", IDS)
    )
    dm.setup()
    assert {i.id: i.class_id for i in dm.dataset.items} == CLASSES
    short = _loc_csv(tmp_path / "short.csv", IDS[1:])
    with pytest.raises(
        DataSourceError,
        match=r"short\.csv has no label for 1 of the 11 images.*ILSVRC2012_val_00000525",
    ):
        ImageNetValDataModule(val_dir, RES, labels=short).setup()
    bad = tmp_path / "bad.csv"
    bad.write_text("ImageId,PredictionString\nILSVRC2012_val_00000525,n99999999 1 2 3 4\n")
    with pytest.raises(DataSourceError, match=r"bad\.csv line 2.*n99999999"):
        ImageNetValDataModule(val_dir, RES, labels=bad).setup()


def test_imagenet_class_subfolders(shared_dir: Path, tmp_path: Path) -> None:
    wnids = imagenet_wnids()
    picks = ["ILSVRC2012_val_00000525", "ILSVRC2012_val_00044065", "ILSVRC2012_val_00044640"]
    for image_id in picks:
        folder = tmp_path / "wnid" / wnids[CLASSES[image_id]]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_dir / "data" / "dgp" / f"{image_id}.JPEG", folder)
    dm = ImageNetValDataModule(tmp_path / "wnid", RES)
    dm.setup()
    assert {i.id: i.class_id for i in dm.dataset.items} == {i: CLASSES[i] for i in picks}
    # Folders that are not WNIDs are numbered in sorted order, like torchvision's ImageFolder.
    for name, image_id in (("b_totem", picks[0]), ("a_barn", picks[1])):
        (tmp_path / "named" / name).mkdir(parents=True)
        shutil.copy(shared_dir / "data" / "dgp" / f"{image_id}.JPEG", tmp_path / "named" / name)
    dm = ImageNetValDataModule(tmp_path / "named", RES)
    dm.setup()
    assert {i.id: i.class_id for i in dm.dataset.items} == {picks[1]: 0, picks[0]: 1}


def test_imagenet_subsets(val_dir: Path, tmp_path: Path) -> None:
    labels = _loc_csv(tmp_path / "LOC_val_solution.csv", IDS)
    per_class = _ids(ImageNetValDataModule(val_dir, RES, labels=labels, subset={"per_class": 1}))
    assert len(per_class) == 10 and "ILSVRC2012_val_00044640" not in per_class
    assert _ids(ImageNetValDataModule(val_dir, RES, subset=3)) == IDS[:3]
    seeded = _ids(ImageNetValDataModule(val_dir, RES, subset={"count": 4, "seed": 7}))
    assert seeded == sorted(seeded) and len(set(seeded)) == 4
    assert seeded == _ids(ImageNetValDataModule(val_dir, RES, subset={"count": 4, "seed": 7}))
    others = [
        _ids(ImageNetValDataModule(val_dir, RES, subset={"count": 4, "seed": s})) for s in range(3)
    ]
    assert any(o != seeded for o in others)
    explicit = ["ILSVRC2012_val_00042095", "ILSVRC2012_val_00000525"]
    assert _ids(ImageNetValDataModule(val_dir, RES, subset=explicit)) == explicit
    with pytest.raises(DataSourceError, match="asks for 12 images but only 11"):
        ImageNetValDataModule(val_dir, RES, subset=12).setup()
    with pytest.raises(DataSourceError, match="per_class subset needs a class"):
        ImageNetValDataModule(val_dir, RES, subset={"per_class": 1}).setup()


def test_imagenet_skip_shard_and_loader(val_dir: Path, tmp_path: Path) -> None:
    labels = _loc_csv(tmp_path / "LOC_val_solution.csv", IDS)
    skip = {"ILSVRC2012_val_00000525", "ILSVRC2012_val_00008229"}
    shards = [
        _ids(
            ImageNetValDataModule(
                val_dir, RES, labels=labels, ids_to_skip=skip, rank=r, world_size=4
            )
        )
        for r in range(4)
    ]
    assert [len(s) for s in shards] == [2, 2, 2, 3]
    assert [i for s in shards for i in s] == [i for i in IDS if i not in skip]
    dm = ImageNetValDataModule(val_dir, RES, labels=labels, batch_size=4, subset=6)
    batches = list(dm.predict_dataloader())
    assert [b["image"].shape[0] for b in batches] == [4, 2]
    assert batches[0]["class"].dtype == torch.long
    assert batches[0]["class"].tolist() == [CLASSES[i] for i in IDS[:4]]
    assert batches[1]["id"] == IDS[4:6] and batches[1]["error"] == ["", ""]


def test_imagenet_record_matches_dgp_fixture(val_dir: Path, dgp_ref: Path) -> None:
    real = torch.load(dgp_ref / "biggan_tiny_parity.pt", weights_only=True)["D_images"]["real"]
    dm = ImageNetValDataModule(val_dir, 128, subset=["ILSVRC2012_val_00000525"])
    # PIL's uint8 resizing and to_tensor are data ops: bit for bit on any CPU (test_image_io.py)
    assert torch.equal(_records(dm)[0]["image"], real[0])


def test_imagenet_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ImageNet val folder .*nowhere does not exist"):
        ImageNetValDataModule(tmp_path / "nowhere", RES).setup()


# --------------------------------------------------------------------------------------------
# LSUN LMDB
# --------------------------------------------------------------------------------------------

CORRUPT_KEY = "f" * 40


@pytest.fixture(scope="module")
def lsun_lmdb(
    shared_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Path]]:
    """An LMDB like the official export: 40-hex keys, lossless WebP values, one corrupt value,
    and one non-square image to exercise the crop."""
    import lmdb

    sources = {
        p.stem: p
        for p in sorted((shared_dir / "data" / "lsun").rglob("*.png"))
        if len(p.stem) == 40 and "superresolution" not in p.parts
    }
    assert len(sources) >= 8
    path = tmp_path_factory.mktemp("lsun") / "bedroom_val_lmdb"
    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for key, src in sources.items():
            img = Image.open(src).convert("RGB")
            if key.startswith("0001b"):
                img = img.crop((0, 10, 256, 211))  # 256x201: wide, gets a centre crop
            txn.put(key.encode(), _webp(img))
        # A record cut short, as a failed download or a damaged copy would leave it.
        truncated = _webp(Image.open(src).convert("RGB"))
        txn.put(CORRUPT_KEY.encode(), truncated[: len(truncated) // 2])
    env.close()
    return path, sources


def _webp(img: Image.Image) -> bytes:
    import io

    out = io.BytesIO()
    img.save(out, format="WEBP", lossless=True, method=0)  # method 0: fast to encode
    return out.getvalue()


def test_lsun_reads_every_record_in_key_order(lsun_lmdb: tuple[Path, dict[str, Path]]) -> None:
    path, sources = lsun_lmdb
    dm = LSUNDataModule(path, 256)
    with pytest.warns(SmallImageWarning, match=r"#0001b.*256x201"):
        records = _records(dm)
    assert [r["id"] for r in records] == sorted([*sources, CORRUPT_KEY])
    by_id = {r["id"]: r for r in records}
    assert "corrupt or truncated" in by_id[CORRUPT_KEY]["error"]
    assert by_id[CORRUPT_KEY]["image"].abs().sum() == 0
    assert by_id[CORRUPT_KEY]["path"] == f"{path}#{CORRUPT_KEY}"
    for key, src in sources.items():
        rec = by_id[key]
        assert rec["error"] == "" and rec["class"] == -1
        if not key.startswith("0001b"):
            # Lossless WebP of a 256x256 target: identical to reading the PNG, unresized.
            assert torch.equal(rec["image"], preprocess(load_image(src), 256, method="pggan"))
    wide = next(k for k in sources if k.startswith("0001b"))
    assert "smaller than the resolution 256" in by_id[wide]["warning"]


def test_lsun_subsets(lsun_lmdb: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    path, sources = lsun_lmdb
    keys = sorted([*sources, CORRUPT_KEY])
    assert _ids(LSUNDataModule(path, 64, subset=3)) == keys[:3]
    seeded = _ids(LSUNDataModule(path, 64, subset={"count": 4, "seed": 1}))
    assert seeded == sorted(seeded) and len(seeded) == 4
    assert seeded == _ids(LSUNDataModule(path, 64, subset=SubsetSpec(count=4, seed=1)))
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"{keys[5]}\n{keys[2]}\n")
    assert _ids(LSUNDataModule(path, 64, subset=str(key_file))) == [keys[5], keys[2]]
    with pytest.raises(DataSourceError, match=r"1 key\(s\) of .*keys\.txt are not in"):
        key_file.write_text(f"{keys[0]}\n{'0' * 40}\n")
        LSUNDataModule(path, 64, subset=str(key_file)).setup()
    with pytest.raises(ValueError, match="no labels"):
        LSUNDataModule(path, 64, subset={"per_class": 1})


def test_lsun_data_mdb_path_shards_and_workers(lsun_lmdb: tuple[Path, dict[str, Path]]) -> None:
    path, sources = lsun_lmdb
    keys = sorted([*sources, CORRUPT_KEY])
    shard = _ids(LSUNDataModule(path / "data.mdb", 64, rank=1, world_size=2, ids_to_skip={keys[0]}))
    assert shard == select_shard(keys[1:], 1, 2)
    # Two worker processes open their own environment (the dataset pickles without it).
    dm = LSUNDataModule(path, 64, batch_size=3, num_workers=2)
    dm.setup()
    dm.dataset[0]  # open it here first: the workers must not inherit it
    ids = [i for batch in dm.predict_dataloader() for i in batch["id"]]
    assert ids == keys


def test_lsun_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"LMDB .*absent_lmdb does not exist"):
        LSUNDataModule(tmp_path / "absent_lmdb", 64).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"without data\.mdb"):
        LSUNDataModule(tmp_path / "empty", 64).setup()


# --------------------------------------------------------------------------------------------
# Image folders and list files
# --------------------------------------------------------------------------------------------


def test_reference_list_file_without_classes(shared_dir: Path) -> None:
    others = shared_dir / "data" / "dgp" / "others"
    dm = ImageFolderDataModule(others / "list.txt", RES)
    records = _records(dm)
    assert [r["id"] for r in records] == [
        "window1",
        "window2",
        "window3",
        "library1",
        "library2",
        "stones",
    ]
    assert all(r["class"] == -1 and r["error"] == "" for r in records)


def test_folder_and_single_image(shared_dir: Path) -> None:
    others = shared_dir / "data" / "dgp" / "others"
    dm = ImageFolderDataModule(others, RES, default_class=7)
    assert _ids(dm) == ["library1", "library2", "stones", "window1", "window2", "window3"]
    assert {i.class_id for i in dm.dataset.items} == {7}
    single = ImageFolderDataModule(
        shared_dir / "data" / "dgp" / "ILSVRC2012_val_00003004.JPEG", 128, default_class=693
    )
    (rec,) = _records(single)
    pipeline = torch.load(
        shared_dir / "reference" / "dgp" / "dgp_pipeline_parity.pt", weights_only=True
    )
    assert torch.equal(rec["image"], pipeline["preprocess"]["ILSVRC2012_val_00003004_128"][0])
    assert rec["class"] == 693 and rec["id"] == "ILSVRC2012_val_00003004"


def test_list_file_with_bad_entries_costs_only_those(shared_dir: Path, tmp_path: Path) -> None:
    data = shared_dir / "data" / "dgp"
    (tmp_path / "imgs").mkdir()
    shutil.copy(data / "ILSVRC2012_val_00000525.JPEG", tmp_path / "imgs" / "good.JPEG")
    shutil.copy(data / "ILSVRC2012_val_00001172.JPEG", tmp_path / "imgs" / "spaced name.JPEG")
    Image.new("L", (20, 12), 128).save(tmp_path / "imgs" / "tiny.png")
    jpeg = (data / "ILSVRC2012_val_00003004.JPEG").read_bytes()
    (tmp_path / "imgs" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (tmp_path / "imgs" / "text.png").write_text("hello")
    (tmp_path / "list.txt").write_text(
        "# id class\n\n"
        "imgs/good.JPEG 863\n"
        "imgs/spaced name.JPEG 269\n"
        "imgs/tiny.png\n"
        "imgs/cut.jpg 693\n"
        "imgs/text.png 1\n"
        "imgs/missing.jpg 2\n"
        f"{tmp_path / 'imgs' / 'good2.JPEG'} 1003\n"  # absolute path, class out of range
        "imgs/oops.jpg abc def\n"
    )
    shutil.copy(data / "ILSVRC2012_val_00000525.JPEG", tmp_path / "imgs" / "good2.JPEG")
    dm = ImageFolderDataModule(tmp_path / "list.txt", RES, n_classes=1000, batch_size=8)
    with pytest.warns(SmallImageWarning, match=r"tiny\.png: image is 20x12"):
        (batch,) = list(dm.predict_dataloader())
    got = dict(zip(batch["id"], zip(batch["class"].tolist(), batch["error"], batch["warning"])))
    assert got["good"] == (863, "", "")
    assert got["spaced name"][:2] == (269, "")
    assert (
        got["tiny"][:2] == (-1, "") and "20x12" in got["tiny"][2] and "tiny.png" in got["tiny"][2]
    )
    assert "corrupt or truncated" in got["cut"][1]
    assert "not a recognised image format" in got["text"][1]
    assert got["missing"][1] == "file does not exist"
    assert "class 1003 is outside 0..999" in got["good2"][1]
    assert "not an integer class" in got["oops"][1] and "line 10" in got["oops"][1]
    ok = [i for i, e in zip(batch["id"], batch["error"]) if not e]
    assert ok == ["good", "spaced name", "tiny"]
    assert all(batch["image"][batch["id"].index(i)].abs().sum() == 0 for i in ("cut", "missing"))
    # The same list with root= and min_size_policy="error" refuses the tiny image.
    (tmp_path / "rel.txt").write_text("good.JPEG\ntiny.png\n")
    dm = ImageFolderDataModule(
        tmp_path / "rel.txt", RES, root=tmp_path / "imgs", min_size_policy="error"
    )
    recs = _records(dm)
    assert recs[0]["error"] == "" and "smaller than the resolution" in recs[1]["error"]


def test_read_gives_each_item_its_image_or_its_error(shared_dir: Path, tmp_path: Path) -> None:
    """``dataset.read`` (what the engine calls when a batch comes up) gives genprior's one
    ImageItem, read, as a copy: the listing keeps no tensors; indexing gives the same as a record."""
    data = shared_dir / "data" / "dgp"
    shutil.copy(data / "ILSVRC2012_val_00000525.JPEG", tmp_path / "good.JPEG")
    shutil.copy(data / "ILSVRC2012_val_00000525.JPEG", tmp_path / "good2.JPEG")
    Image.new("L", (20, 12), 128).save(tmp_path / "tiny.png")
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "list.txt").write_text("good.JPEG 863\ntiny.png\ntext.png 1\ngood2.JPEG 1003\nx.jpg a b\n")
    dm = ImageFolderDataModule(tmp_path / "list.txt", RES, n_classes=1000)
    dm.setup()
    listed = list(dm.dataset.items)
    assert all(type(i) is ImageItem and i.image is None for i in listed)
    assert [i.error is None for i in listed] == [True, True, True, True, False]  # x.jpg: listing
    with pytest.warns(SmallImageWarning):
        read = [dm.dataset.read(i) for i in listed]
    assert all(i.image is None for i in dm.dataset.items)  # the listing is left as it was
    assert [i.usable for i in read] == [True, True, False, False, False]
    good, tiny, text, out_of_range, unparsable = read
    assert (good.id, good.class_id, good.error, good.warning) == ("good", 863, None, None)
    assert good.image.dtype == torch.float32 and good.image.shape == (3, RES, RES)
    assert "20x12" in tiny.warning
    assert "not a recognised image format" in text.error and text.image is None
    assert "class 1003 is outside 0..999" in out_of_range.error
    assert unparsable.error == listed[4].error and "not an integer class" in unparsable.error
    with pytest.warns(SmallImageWarning):
        records = _records(dm)
    for item, record in zip(read, records):
        assert (record["id"], record["class"], record["path"]) == (item.id, item.class_id, item.path)
        assert record["error"] == (item.error or "") and record["warning"] == (item.warning or "")
        expected = item.image if item.usable else torch.zeros(3, RES, RES)
        assert torch.equal(record["image"], expected)


def test_folder_without_preprocessing(shared_dir: Path) -> None:
    others = shared_dir / "data" / "dgp" / "others"
    dm = ImageFolderDataModule(others, RES, preprocess=False, subset=["library2", "window3"])
    assert [tuple(r["image"].shape) for r in _records(dm)] == [(3, 183, 275), (3, 389, 554)]
    with pytest.raises(ValueError, match="different sizes"):
        next(
            iter(
                ImageFolderDataModule(
                    others, RES, preprocess=False, batch_size=2
                ).predict_dataloader()
            )
        )


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"image source .*nothing does not exist"):
        ImageFolderDataModule(tmp_path / "nothing", RES).setup()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    with pytest.raises(DataSourceError, match="holds no images"):
        ImageFolderDataModule(tmp_path / "d", RES).setup()
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "x.jpg")
    with pytest.raises(DataSourceError, match=r"share an id.*x\.jpg / .*x\.png"):
        ImageFolderDataModule(tmp_path / "d", RES).setup()


# --------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,world", [(0, 3), (1, 4), (5, 4), (10, 3), (1000, 4), (7, 7)])
def test_select_shard_is_a_balanced_contiguous_partition(n: int, world: int) -> None:
    items = list(range(n))
    shards = [select_shard(items, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    if n % world == 0:  # then identical to the reference's padded sampler
        c = n // world
        assert shards == [items[r * c : (r + 1) * c] for r in range(world)]
    with pytest.raises(ValueError):
        select_shard(items, world, world)
