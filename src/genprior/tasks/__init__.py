"""What a run does with its images: restore them, manipulate them, or defend a classifier.

``run(cfg, out)`` dispatches on ``task.name``: ``defense`` (tasks/defense.py), the DGP
manipulations (tasks/manipulation.py: jitter, morphing, category transfer), and every other
task name restores (tasks/restore.py). The tasks sit on top of the engine and the methods;
only the command-line entry points import them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genprior.device import pick_device
from genprior.methods import Inversion, Method, build
from genprior.perf import perf_settings, tune_cpu_malloc
from genprior.tasks import defense, inversion, manipulation, mgan_edit, prior_samples, restore

__all__ = ["build_method", "defense", "input_method", "inversion", "manipulation", "mgan_edit", "prior_samples", "restore", "run"]


def run(cfg: Any, out: Path, **kwargs: Any) -> list[dict[str, Any]]:
    """The rows of the task ``cfg`` asks for, one per image (per pair for morphing).

    ``kwargs`` go to the task's ``run`` (every task takes ``items``, ``on_row`` and ``read``:
    evaluate.py's shards, durable rows and lazy reading)."""
    if pick_device(cfg).type == "cpu" and perf_settings(cfg).cpu_malloc_tuning:
        tune_cpu_malloc()
    task = str(cfg.task.name)
    if task == "defense":
        return defense.run(cfg, out, **kwargs)
    if task in manipulation.MANIPULATION_TASKS:
        return manipulation.run(cfg, out, **kwargs)
    if task in mgan_edit.MGAN_EDIT_TASKS:  # mGANprior's edits (tasks/mgan_edit.py)
        return mgan_edit.run(cfg, out, **kwargs)
    if task in inversion.INVERSION_TASKS:  # DIP's network inversion (tasks/inversion.py)
        return inversion.run(cfg, out, **kwargs)
    if task in prior_samples.PRIOR_SAMPLE_TASKS:  # DIP's samples at initialisation (tasks/prior_samples.py)
        return prior_samples.run(cfg, out, **kwargs)
    return restore.run(cfg, out, **kwargs)


def build_method(cfg: Any) -> Method | None:
    """The method a restoration task fits with (``run(cfg, out, method=...)`` takes it), built
    before anything is logged so that a missing file or a wrong setting stops the run first;
    None for the tasks that build their own (defense, manipulation, network inversion)."""
    task = str(cfg.task.name)
    if task in inversion.INVERSION_TASKS:
        inversion.check(cfg)  # the classifier's weights: before any output
        return None
    if task == "defense" or task in manipulation.MANIPULATION_TASKS:
        return None
    if task in mgan_edit.MGAN_EDIT_TASKS:
        mgan_edit.MGANEdit.from_config(cfg)  # boundary files, layers, saved fits: before any output
    if task in mgan_edit.MGAN_EDIT_TASKS or task in prior_samples.PRIOR_SAMPLE_TASKS:
        return None
    return build(cfg)


def input_method(cfg: Any, method: Method | None) -> type[Method] | None:
    """The method class whose preprocessing the run's input images (``data.*``) take, when the
    entry point lists them before anything is written (their files checked) and hands them to
    ``run`` as ``items``: the restoration's method (``build_method``), Inversion for the
    network-inversion tasks with input images; None for the tasks that find their own inputs
    (manipulation, mGANprior edits, defense) or have none."""
    if method is not None:
        return type(method)
    if inversion.reads_images(cfg):
        return Inversion
    return None
