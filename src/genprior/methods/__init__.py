"""The papers' methods, one file each, behind the written ``Method`` interface (methods/base.py).

``method_class(kind)`` is the method that fits a prior of that kind (``prior.kind``: biggan ->
DGP, pggan -> mGANprior, dip -> Deep Image Prior); ``build(cfg)`` builds it from a composed
config (its prior, degradation and settings). Per-method behaviour the tasks and loaders need
(how images are preprocessed, whether fits can be saved) is read off the class, never branched
on the kind.
"""

from __future__ import annotations

from typing import Any

from genprior.methods.base import Method, Progress
from genprior.methods.dgp import DGP
from genprior.methods.dip import DIP
from genprior.methods.mganprior import MGANPrior

__all__ = ["DGP", "DIP", "METHODS", "MGANPrior", "Method", "Progress", "build", "method_class"]

METHODS: dict[str, type[Method]] = {"biggan": DGP, "dip": DIP, "pggan": MGANPrior}


def method_class(kind: str) -> type[Method]:
    if kind not in METHODS:
        raise ValueError(f"prior.kind must be one of {', '.join(METHODS)}, got {kind!r}")
    return METHODS[kind]


def build(cfg: Any) -> Method:
    """The method for ``cfg`` (its ``prior.kind``), ready to ``start`` batches of images."""
    return method_class(str(cfg.prior.kind)).from_config(cfg)
