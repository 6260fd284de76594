"""Run a W&B sweep YAML locally with Optuna, no W&B server (docs/evaluation.md, "Sweeps").

    python sweep.py configs/sweep/dip_denoising.yaml --trials 20 logger=csv
    python sweep.py configs/sweep/dip_denoising.yaml --storage sqlite:///outputs/sweeps/dip.db \
        --study dip1 data.source=my_images/          # run again to resume; one worker per GPU

Run ``python sweep.py --help`` for the options.
"""

import sys

from genprior.cli.sweep import sweep_main

if __name__ == "__main__":
    sys.exit(sweep_main())
