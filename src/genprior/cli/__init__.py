"""Command-line entry points: ``train.py`` (cli/train.py) and ``evaluate.py`` (cli/evaluate.py),
and the console scripts genprior-train and genprior-evaluate.

They compose the config (genprior.config) and dispatch a task (genprior.tasks); nothing in
genprior imports them.
"""
