"""What flows through genprior: images in, per-step records out (the core layer).

- ``ImageItem``: one input image, listed (where to read it, its class) and then read (its
  tensor, or why it cannot be used). The one item type of the datamodules, the engine and
  the tasks.
- ``ImageBatch``: B read images fitted together, as the engine's data loader yields them.
- ``StepRecord``: what one optimisation step of a batch did, per image.
- ``image_generator``: each image's own random stream, so that its result does not depend on
  the batch, the order or the rank it is fitted in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["ImageBatch", "ImageItem", "StepRecord", "image_generator", "step_seed"]


@dataclass
class ImageItem:
    """One input image.

    ``path`` is the file it comes from (``<lmdb>#<key>`` for an LSUN record, whose LMDB key is
    ``key``). Once read, ``image`` is the preprocessed tensor ([3, R, R] in the prior's value
    range, float32) or None with ``error`` saying why the image cannot be used; ``warning``
    records what reading it warned about (e.g. an upsampled small image). ``class_id`` is -1
    when unknown.
    """

    id: str
    path: str
    class_id: int = -1
    image: Tensor | None = None
    error: str | None = None
    key: bytes | None = None
    warning: str | None = None

    @property
    def usable(self) -> bool:
        return self.error is None and self.image is not None


@dataclass
class ImageBatch:
    """B images fitted together: [B, C, H, W] images (as read, float32), classes, ids, paths."""

    images: Tensor
    classes: Tensor
    ids: list[str]
    paths: list[str]

    @classmethod
    def of(cls, items: list[ImageItem]) -> ImageBatch:
        shapes = {tuple(item.image.shape) for item in items if item.image is not None}
        if len(shapes) != 1 or any(item.image is None for item in items):
            raise ValueError(f"a batch needs read images of one size; got {sorted(shapes)} "
                             "(use trainer.batch_size=1 for images of different sizes)")
        return cls(images=torch.stack([item.image for item in items]),  # type: ignore[misc]
                   classes=torch.tensor([item.class_id for item in items], dtype=torch.long),
                   ids=[item.id for item in items], paths=[item.path for item in items])

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class StepRecord:
    """Per-image values of one optimisation step, all ``[B]`` tensors.

    ``total`` is each image's loss, ``active`` which images took the step (finished and failed
    images do not), ``terms`` the named loss terms a method reports (losses.csv, the loggers).
    """

    total: Tensor
    active: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)

    def reported(self) -> dict[str, Tensor]:
        return {**self.terms, "loss": self.total}


def image_generator(seed: int, image_id: str) -> torch.Generator:
    """Each image's own RNG stream (seeded by the run's seed and the image id)."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def step_seed(seed: int, step: int) -> int:
    """The seed of one optimisation step's random draw (DIP's input perturbation ε) for an
    image of seed ``seed``: a function of (seed, step) only, so results do not depend on the
    batch an image lands in, and a resumed run draws the same perturbations."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, step]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1
