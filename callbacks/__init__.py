"""Lightning callbacks of a fit, one concern each (installed as genprior.callbacks).

The engine (genprior.engine) builds them in this order, because later ones read what earlier
ones made: ``StageSnapshots`` collects frames, ``LossLogger`` logs, ``ImageFiles`` and
``LossFiles`` write each image's files, ``ExtraMetrics`` scores ``metrics.extra``,
``SaveReconstructions`` writes ``reconstruction.pt``, and ``ResultRows`` builds the rows.
``StageProgressBar`` is the progress bar and ``WandbReport`` the W&B report of train.py (last,
after the rows) and of evaluate.py.
"""

from .files import ImageFiles, LossFiles, loss_rows
from .loss_logger import LossLogger
from .metrics import ExtraMetrics
from .progress import StageProgressBar
from .rows import ResultRows, failed_row
from .saved import SaveReconstructions
from .snapshots import StageSnapshots
from .wandb import WandbReport, make_wandb_logger, resolve_mode, wandb_init_args

__all__ = [
    "ExtraMetrics",
    "ImageFiles",
    "LossFiles",
    "LossLogger",
    "ResultRows",
    "SaveReconstructions",
    "StageProgressBar",
    "StageSnapshots",
    "WandbReport",
    "failed_row",
    "loss_rows",
    "make_wandb_logger",
    "resolve_mode",
    "wandb_init_args",
]
