"""Evaluate a task and prior over a dataset subset, on one or many GPUs, resumably.

Run ``python evaluate.py --help`` for the config groups and presets.
"""

import sys

from genprior.cli.evaluate import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
