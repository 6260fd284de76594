"""Seconds per DGP iteration and peak memory, BigGAN-128 ch 96 with random weights.

DGP colorization (the ImageNet-1k 128 preset's first stage: ftr_num 7, ft_num 2) for a batch
of B images fitted at once, each with its own generator copy and Adam state, through the real
``Reconstruction`` LightningModule step. Each B runs in its own process so that peak memory
is that B's alone.

    python benchmarks/dgp_step.py --batch-sizes 1 8 --steps 3
    python benchmarks/dgp_step.py --device cuda --batch-sizes 1 8 32 --steps 20

Prints a markdown table (also written with --out FILE) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(batch: int, steps: int, device: str, width: int) -> dict[str, float]:
    import torch

    from genprior.degradations import build_degradation
    from genprior.engine import step as engine_step
    from genprior.items import ImageBatch
    from genprior.methods.dgp import DGP, DGPConfig
    from genprior.priors.biggan import Discriminator, Generator, orthogonal_init_

    torch.manual_seed(0)
    dev = torch.device(device)
    G = orthogonal_init_(Generator(resolution=128, G_ch=width)).eval().to(dev)
    D = orthogonal_init_(Discriminator(resolution=128, D_ch=width)).eval().to(dev)
    config = DGPConfig(iterations=[10_000], G_lrs=[5e-5], z_lrs=[2e-3], ftr_num=[7], ft_num=[2], lr_ratio=[0.7],
                       w_D_loss=[1.0], w_mse=[0.0], w_percep=[0.0], use_in=[False], select_num=0)
    method = DGP(G, D, config, build_degradation("colorization", 128))
    images = torch.rand(batch, 3, 128, 128, device=dev) * 2 - 1
    classes = torch.arange(batch) % 1000
    ids = [f"img{b}" for b in range(batch)]
    method.start(ImageBatch(images, classes, ids, ids))
    opt = method.make_optimizer()

    def step() -> None:
        engine_step(method, opt)

    step()  # warm-up (allocates the Adam state)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    return {"batch": batch, "s_per_iter": seconds, "s_per_image_iter": seconds / batch,
            "peak_GiB": peak, "peak_GiB_per_image": peak / batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=96, help="G_ch = D_ch")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.steps, args.device, args.width)))
        return
    rows = []
    for b in args.batch_sizes:
        cmd = [sys.executable, __file__, "--one", str(b), "--steps", str(args.steps),
               "--device", args.device, "--width", str(args.width)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    import torch

    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [
        f"DGP colorization step, BigGAN-128 ch {args.width} (random weights), {args.device} ({where}), "
        f"mean of {args.steps} steps after 1 warm-up; peak = {'max CUDA memory allocated' if args.device == 'cuda' else 'peak process RSS'}",
        "",
        "| B | s / iteration | s / image-iteration | peak GiB | peak GiB / image |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['s_per_iter']:.3f} | {r['s_per_image_iter']:.3f} | "
                     f"{r['peak_GiB']:.2f} | {r['peak_GiB_per_image']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
