"""Restore (or manipulate) images by fitting a prior to each one.

    python train.py                                  # embedded default: DIP denoising, CPU
    python train.py prior=biggan128 task=colorization data.source=img.JPEG data.class_id=693

Run ``python train.py --help`` for the config groups and presets.
"""

import sys

from genprior.cli.train import train_main

if __name__ == "__main__":
    sys.exit(train_main())
