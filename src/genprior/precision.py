"""The floating-point type a run computes in, from ``trainer.precision`` (Lightning's names).

``32-true`` (the default) runs every prior, degradation, loss, metric and optimizer state in
float32; ``64-true`` runs all of them in float64. Float64 is how genprior proves that it
computes what the original code computes (docs/faithfulness.md): float32 traces of these
optimisations are chaotic, float64 ones are not.

Images are always preprocessed in float32 exactly as the references do (JPEG -> uint8 -> /255
in float32 -> normalise), and only then cast to the run's dtype: a float64 run therefore starts
from the same numbers as a float32 run.
"""

from __future__ import annotations

from typing import Any

import torch

FLOAT32_PRECISIONS = ("32-true", "32")
FLOAT64_PRECISIONS = ("64-true", "64")
# Lightning's mixed-precision names: the step runs under its autocast, the state stays float32.
MIXED_PRECISIONS = ("bf16-mixed", "16-mixed")
PRECISIONS = FLOAT32_PRECISIONS + FLOAT64_PRECISIONS + MIXED_PRECISIONS


def check_precision(value: Any) -> str:
    """``trainer.precision`` as a string, or a ValueError naming the valid values."""
    text = str(value)
    if text not in PRECISIONS:
        raise ValueError(
            f"trainer.precision={value!r} is not supported; use one of {', '.join(PRECISIONS)} "
            "(64-true runs every method in float64, docs/faithfulness.md)"
        )
    return text


def compute_dtype(precision: Any) -> torch.dtype:
    """The dtype of priors, images, losses and optimizer state for ``trainer.precision``."""
    return torch.float64 if check_precision(precision) in FLOAT64_PRECISIONS else torch.float32


def run_dtype(cfg: Any) -> torch.dtype:
    """:func:`compute_dtype` of a composed config's ``trainer.precision``."""
    return compute_dtype(cfg.trainer.precision)
