"""Command-line entry points shared by ``train.py``, ``evaluate.py`` and the console scripts."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def train_main(argv: Sequence[str] | None = None) -> int:
    from genprior.train import run_train

    return run_train(sys.argv[1:] if argv is None else list(argv))


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    from genprior.evaluate import run_evaluate

    return run_evaluate(sys.argv[1:] if argv is None else list(argv))
