"""Helpers of the end-to-end run tests (tests/test_evaluate.py, tests/test_multinode.py,
tests/test_wandb_train.py): the tiny run's arguments, a folder of synthetic images to run on,
an evaluation's rows, a clean subprocess environment, and the records of an offline run's
``.wandb`` file.
Imported by those test modules directly: pytest's default "prepend" import mode puts tests/
(no package) on ``sys.path``."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from PIL import Image

from genprior.results import iter_rows

REPO = Path(__file__).resolve().parents[1]
#: The tiny random BigGAN, two optimisation steps per image, one image at a time, on the CPU.
TINY = [
    "prior=biggan_tiny", "task=colorization", "dgp.iterations=[1,1,0,0,0]", "dgp.select_num=2",
    "trainer.accelerator=cpu", "trainer.batch_size=1", "trainer.enable_progress_bar=false",
    "logger=none",
]
#: Row fields that say where/when an image ran, not what it gave.
RUN_FIELDS = {"seconds", "rank", "world_size", "host", "pid", "finished_at", "run_started_at"}


def raw_rows(out: Path) -> list[dict[str, Any]]:
    """Every rank's rows of an evaluation in ``out`` (``results/rank*.jsonl``)."""
    return list(iter_rows(out / "results"))


def by_id(out: Path) -> dict[str, dict[str, Any]]:
    """The merged ``results.jsonl`` of ``out``, by image id."""
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def result_fields(row: dict[str, Any]) -> dict[str, Any]:
    """What an image gave (the row without RUN_FIELDS)."""
    return {k: v for k, v in row.items() if k not in RUN_FIELDS}


def subprocess_env() -> dict[str, str]:
    """The environment of an evaluate.py subprocess: no launcher, SLURM or W&B variables of the
    test session, one thread (Lightning picks a free port when MASTER_PORT is unset)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "WANDB_"))
           and k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                         "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def synthetic_folder(folder: Path, good: int, corrupt: int = 0) -> Path:
    """``good`` 150x140 PNGs (img0.png, ...) and ``corrupt`` files that are not images
    (broken0.jpg, ...) in a new ``folder``."""
    folder.mkdir(parents=True)
    for k in range(good):
        img = Image.new("RGB", (150, 140), (40 + 60 * k, 90, 200 - 50 * k))
        for x in range(0, 150, 10):  # some structure, so the metrics differ between images
            for y in range(140):
                img.putpixel((x, y), (255 - 30 * k, 20 * k, 128))
        img.save(folder / f"img{k}.png")
    for k in range(corrupt):
        (folder / f"broken{k}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    return folder


def read_wandb_records(path: Path) -> list[Any]:
    """Records of a ``.wandb`` file: a 7-byte header (":W&B", 0xBEE1, version), then 32 KiB
    blocks of chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)
    carrying serialized ``wandb_internal_pb2.Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2  # wandb is optional: only its tests need it

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            records.append(record)
            pending = b""
        elif kind in (2, 3):
            pending += chunk
    return records


def of_type(records: list[Any], kind: str) -> list[Any]:
    """The payloads of the records of one type (``history``, ``summary``, ``run``, ...)."""
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]
