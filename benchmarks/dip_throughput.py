"""DIP denoising throughput: one image at a time against B images fitted at once (issue 8).

The workload is configs/task/dip_denoising.yaml (the F16 notebook: 512 x 512, skip network with
128 channels on 5 levels, Adam, output EMA and backtracking) on scikit-image's astronaut
resized to ``--size`` with the preset's noise. B = 1 is the notebook's loop for one image; the
batched runs fit B noisy copies at once with their own networks and Adam states. Every run is
genprior's ``DIP`` stepped by ``genprior.engine.step``, the step ``Reconstruction`` takes
(``dip.batched_forward=auto``: a loop over the nets on the CPU, vmap on CUDA; the optimizer as
``perf.fused_optimizer`` sets it). Steps are interleaved (one step of every run per round) so
that other jobs slow all runs alike.

    python benchmarks/dip_throughput.py                                  # CPU: 2 steps at 512
    python benchmarks/dip_throughput.py --device cuda --batch-sizes 4 8 16 --steps 50

Writes its table into docs/performance.md (``--out``) between markers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from skimage import data as skdata

from genprior import engine
from genprior.methods.dip import DIP, DIPConfig
from genprior.perf import PerfConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dgp_throughput import REPO, machine, write_section

PRESET = REPO / "configs" / "task" / "dip_denoising.yaml"


class Run:
    """B noisy copies of the image, fitted at once by one DIP on ``device``."""

    def __init__(self, batch: int, settings: DIPConfig, clean: torch.Tensor, device: torch.device,
                 fused: bool) -> None:
        self.batch = batch
        gen = torch.Generator().manual_seed(0)
        noisy = (clean + torch.randn(clean.shape, generator=gen) * settings.noise_std).clamp(0, 1)
        self.method = DIP(settings, seed=0).to(device)
        self.method.start_observed([str(b) for b in range(batch)], noisy.expand(batch, -1, -1, -1),
                                   clean=clean.expand(batch, -1, -1, -1))
        self.optimizer = self.method.make_optimizer(fused=fused)
        self.seconds: list[float] = []

    def step(self) -> None:
        start = time.perf_counter()
        engine.step(self.method, self.optimizer)
        if self.method.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512, help="image side (the preset: 512)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="batched runs (default: 2 on CPU, 4 8 16 on GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 2 on CPU, 50 on GPU)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sizes = args.batch_sizes or ([4, 8, 16] if gpu else [2])
    steps = args.steps or (50 if gpu else 2)
    settings = DIPConfig(**OmegaConf.to_container(OmegaConf.load(PRESET).dip))  # type: ignore[arg-type]
    img = Image.fromarray(skdata.astronaut()).resize((args.size, args.size), Image.Resampling.LANCZOS)
    clean = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    fused = PerfConfig().fused_optimizer
    runs = [Run(b, settings, clean, device, fused) for b in [1, *sizes]]
    load_before = os.getloadavg()
    for run in runs:  # warm-up, not timed
        run.step()
        run.seconds.clear()
    started = time.perf_counter()
    for _ in range(steps):
        for run in runs:
            run.step()
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    base = statistics.median(runs[0].seconds)
    cmd = "python benchmarks/dip_throughput.py " + " ".join(sys.argv[1:])
    lines = [
        f"### DIP denoising, {args.size}² skip network (configs/task/dip_denoising.yaml), {device.type}",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {machine(device)}. Load average before: {', '.join(f'{v:.2f}' for v in load_before)}; "
        f"after: {', '.join(f'{v:.2f}' for v in load_after)} ({wall:.0f} s, {steps} interleaved steps per run "
        f"after one warm-up, median; {time.strftime('%Y-%m-%d')}).",
        "",
        "| B | s / step | image-iterations / s | speed-up per image vs B = 1 |",
        "|---|---|---|---|",
    ]
    for run in runs:
        s = statistics.median(run.seconds)
        lines.append(f"| {run.batch} | {s:.3f} | {run.batch / s:.3f} | {run.batch * base / s:.2f}x |")
    text = "\n".join(lines)
    print(text)
    write_section(args.out, "dip", text)


if __name__ == "__main__":
    main()
