"""The papers' methods, one file each, behind the written ``Method`` interface (methods/base.py).

``method_class(kind)`` is the method that fits a prior of that kind (``prior.kind``: biggan ->
DGP, pggan -> mGANprior, dip -> Deep Image Prior, tv -> the TV-norm baseline of network
inversion); ``method_class(kind, task)`` also sees the task: a dip prior with one of DIP's
network-inversion tasks (``INVERSION_TASKS``) is fitted by ``Inversion``, whose objective is a
classifier's features rather than a degraded observation. ``build(cfg)`` builds it from a
composed config (its prior, degradation and settings). Per-method behaviour the tasks and loaders need
(how images are preprocessed, whether fits can be saved) is read off the class, never branched
on the kind.
"""

from __future__ import annotations

from typing import Any

from genprior.methods.base import Method, Progress
from genprior.methods.dgp import DGP
from genprior.methods.dip import DIP
from genprior.methods.inversion import INVERSION_TASKS, Inversion
from genprior.methods.mganprior import MGANPrior

__all__ = ["DGP", "DIP", "METHODS", "Inversion", "MGANPrior", "Method", "Progress", "build", "method_class"]

METHODS: dict[str, type[Method]] = {"biggan": DGP, "dip": DIP, "pggan": MGANPrior, "tv": Inversion}


def method_class(kind: str, task: str | None = None) -> type[Method]:
    if kind == "dip" and task in INVERSION_TASKS:
        return Inversion
    if kind not in METHODS:
        raise ValueError(f"prior.kind must be one of {', '.join(METHODS)}, got {kind!r}")
    return METHODS[kind]


def build(cfg: Any) -> Method:
    """The method for ``cfg`` (its ``prior.kind``), ready to ``start`` batches of images."""
    return method_class(str(cfg.prior.kind), str(cfg.task.name)).from_config(cfg)
