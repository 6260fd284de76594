"""DGP colorization throughput: sequential B = 1 fp32 against the batched engine (issue 8).

The workload is the ImageNet-1k colorization preset at 128 (configs/task/colorization.yaml:
1400 iterations in 5 stages, ftr_num 7, progressive ft_num, lr_ratio) on a BigGAN-128 with
random, seeded weights (G_ch = D_ch = --width) and real images.

* **Sequential baseline** (``seq``): the reference's loop, written plainly below: one image
  at a time, an unstacked G, ``torch.optim.Adam`` for G's groups and one for z, the losses read
  back with ``.item()`` every iteration as the reference records them (the reference also
  computes PSNR/SSIM on the CPU every iteration; that is left out, which favours the baseline).
* **Batched engine**: genprior's ``DGP`` method and ``PerImageAdam`` stepped as
  ``Reconstruction.training_step`` steps them, B images with their own parameters, with the
  ``perf`` defaults (fused optimizer, cached frozen spectral norms, sync-free steps) and the
  given autocast dtype.

Runs are interleaved step by step: every round makes B_max baseline iterations and one
iteration of every batched run, so a machine shared with other jobs slows all of them alike.
The same images, initial latents and weights go through every run; the final PSNR of each
image is compared with its baseline run. The runs use the preset's 5 stages compressed into
``--steps`` iterations (the same lr rules, fewer iterations per stage); images/hour is
extrapolated to the full 1400 iterations from the median time per iteration (select_z, the
same per-image candidate search in both, is not counted).

    python benchmarks/dgp_throughput.py                       # CPU, width 16, B = 8
    python benchmarks/dgp_throughput.py --device cuda --width 96 --batch-sizes 8 32 64 auto

Writes the table to docs/performance.md (``--out``) between markers, keeping the other parts.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_IMAGES = REPO.parent / "shared" / "data" / "dgp"
PRESET_STEPS = 1400  # sum of configs/task/colorization.yaml's iterations
# Dense peak TFLOP/s (no sparsity) by device name: bf16 tensor cores, and fp32 without TF32.
PEAKS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5)}


# ----------------------------------------------------------------------------- workload
def colorization_stages(steps: int) -> Any:
    """The preset's 5 stages (a DGPConfig), ``steps`` iterations shared out in the preset's ratios."""
    from omegaconf import OmegaConf

    from genprior.methods.dgp import DGPConfig

    preset = OmegaConf.load(REPO / "configs" / "task" / "colorization.yaml").dgp
    total = sum(preset.iterations)
    iterations = [max(1, round(steps * n / total)) for n in preset.iterations]
    lists = {k: list(preset[k]) for k in DGPConfig.STAGE_KEYS if k in preset and k != "iterations"}
    return DGPConfig(iterations=iterations, **lists, w_nll=0.02, select_num=0)


def load_images(n: int) -> tuple[torch.Tensor, list[str]]:
    """n real images in [-1, 1] at 128 (the DGP val JPEGs in ../shared, else scikit-image's)."""
    from PIL import Image

    from genprior.image_io import preprocess

    images, names = [], []
    files = sorted(SHARED_IMAGES.glob("*.JPEG")) if SHARED_IMAGES.is_dir() else []
    if files:
        for path in files:
            images.append(preprocess(Image.open(path), 128, name=path.name))
            names.append(path.stem)
    else:
        from skimage import data as skdata

        for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
            images.append(preprocess(Image.fromarray(getattr(skdata, name)()), 128, name=name))
            names.append(name)
    picks = [k % len(images) for k in range(n)]  # cycled when B exceeds the set
    return torch.stack([images[k] for k in picks]), [f"{names[k]}#{i}" for i, k in enumerate(picks)]


def build_models(width: int, device: torch.device) -> tuple[Any, Any]:
    from genprior.priors.biggan import Discriminator, Generator, orthogonal_init_

    torch.manual_seed(0)
    G = orthogonal_init_(Generator(resolution=128, G_ch=width)).eval().to(device)
    D = orthogonal_init_(Discriminator(resolution=128, D_ch=width)).eval().to(device)
    return G, D


def initial_latents(n: int, dim_z: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(n, dim_z, generator=gen) * 0.5  # the preset's sample_std


# ------------------------------------------------------------------- sequential baseline
class Sequential:
    """The reference's DGP.run for one image after the other (SPEC §6.2), plain torch."""

    def __init__(self, G: Any, D: Any, stages: Any, images: torch.Tensor, z0: torch.Tensor,
                 classes: torch.Tensor) -> None:
        from genprior.degradations import build_degradation

        self.G, self.D, self.stages = G, D, stages
        self.G_weight = {k: v.detach().clone() for k, v in G.state_dict().items()}
        self.degradation = build_degradation("colorization", 128)
        self.images, self.z0, self.classes = images, z0, classes
        for p in D.parameters():
            p.requires_grad_(False)
        n_groups = len(G.blocks) + 1
        named = dict(G.named_parameters())
        for p in G.parameters():
            p.requires_grad_(False)
        self.groups = []
        for names in G.param_group_names()[:n_groups]:
            params = [named[n] for n in names if ".in1." not in n and ".in2." not in n]
            for p in params:
                p.requires_grad_(True)
            self.groups.append({"params": params})
        self.schedule = [(s, i) for s in stages.stages for i in range(s.iterations)]
        self.image = -1
        self.position = len(self.schedule)
        self.finals: list[torch.Tensor] = []
        self.step_seconds: list[float] = []

    def done(self) -> bool:
        return self.image >= len(self.images) - 1 and self.position >= len(self.schedule)

    def _start_image(self) -> None:
        self.image += 1
        b = self.image
        self.G.load_state_dict(self.G_weight)  # reset_G
        self.target_origin = self.images[b : b + 1]
        self.target = self.degradation.target(self.target_origin, ids=[str(b)])
        with torch.no_grad():
            self.real = self.D(self.target)[1]
        self.z = self.z0[b : b + 1].clone().to(self.target.device).requires_grad_(True)
        self.y = self.classes[b : b + 1].to(self.target.device)
        self.G_optim = torch.optim.Adam(self.groups, lr=0.0, betas=(0.0, 0.999), eps=1e-8)
        self.z_optim = torch.optim.Adam([self.z], lr=0.0, betas=(0.0, 0.999), eps=1e-8)
        self.position = 0
        self.t = 0

    def step(self) -> None:
        from genprior.losses import d_feature_loss

        if self.position >= len(self.schedule):
            self._start_image()
        start = time.perf_counter()
        stage, _ = self.schedule[self.position]
        self.t += 1
        for i, group in enumerate(self.G_optim.param_groups):
            group["lr"] = stage.G_lr * stage.lr_ratio**i if i < stage.ft_num else 0.0
        self.z_optim.param_groups[0]["lr"] = stage.z_lr
        self.z_optim.zero_grad()
        self.G_optim.zero_grad()
        x = self.G(self.z, self.G.shared(self.y), use_in=stage.use_in)
        x_map = self.degradation.apply(x, ids=[str(self.image)])
        ftr = d_feature_loss(self.D(x_map)[1], self.real, stage.ftr_num)
        mse = torch.mean((x_map - self.target) ** 2)
        nll = torch.mean(self.z**2 / 2)
        l1 = torch.mean(torch.abs(x_map - self.target))
        loss = stage.w_D_loss * ftr.sum() + stage.w_mse * mse + 0.02 * nll
        loss.backward()
        self.z_optim.step()
        self.G_optim.step()
        self.losses = {"ftr_loss": ftr.item(), "nll": nll.item(), "mse_loss": mse.item() / 4,
                       "l1_loss": l1.item() / 2}  # the reference's loss dict, read every step
        self.last_x = x.detach()
        self.position += 1
        if self.position >= len(self.schedule):
            self.finals.append(self.last_x)
        self.step_seconds.append(time.perf_counter() - start)


# ------------------------------------------------------------------------ batched engine
@dataclass
class Batched:
    """genprior's engine: the DGP method and PerImageAdam, stepped as training_step does."""

    label: str
    batch: int
    dtype: str
    method: Any = None
    opt: Any = None
    steps_left: int = 0
    step_seconds: list[float] = field(default_factory=list)

    def setup(self, G: Any, D: Any, stages: Any, images: torch.Tensor, z0: torch.Tensor,
              classes: torch.Tensor, perf: Any) -> None:
        from genprior.degradations import build_degradation
        from genprior.items import ImageBatch
        from genprior.methods.dgp import DGP

        self.method = DGP(G, D, stages, build_degradation("colorization", 128), metric_task="colorization",
                          perf=perf)
        B = self.batch
        ids = [str(b) for b in range(B)]
        self.method.start(ImageBatch(images[:B], classes[:B], ids, ids), initial_z=z0[:B])
        self.opt = self.method.make_optimizer(fused=perf.fused_optimizer)  # per-image Adam (0, 0.999)
        self.steps_left = self.method.total_steps()

    def done(self) -> bool:
        return self.steps_left <= 0

    def step(self) -> None:
        from genprior.engine import step

        start = time.perf_counter()
        method, opt = self.method, self.opt
        step(method, opt)  # the engine's one step, as Reconstruction.training_step runs it
        if method.z.device.type == "cuda":
            torch.cuda.synchronize()
        self.steps_left -= 1
        self.step_seconds.append(time.perf_counter() - start)


# ------------------------------------------------------------------------------ measures
def final_psnr(x: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    from genprior.metrics import restoration_metrics

    return restoration_metrics(x.float().cpu(), clean.float().cpu(), "colorization")["psnr"]


def step_flops(run: Any) -> float:
    """FLOPs of one iteration (forward and backward), counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run.step()
    return float(counter.get_total_flops())


def memory_per_image(device: str, width: int, batch: int, dtype: str) -> dict[str, float]:
    """Peak memory of a B-image run, in a fresh process so that it is this run's alone."""
    cmd = [sys.executable, __file__, "--memory-probe", str(batch), "--device", device, "--width", str(width),
           "--dtypes", dtype, "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ}).stdout
    peak, floor = (float(v) for v in out.strip().splitlines()[-1].split())
    return {"peak": peak, "floor": floor}  # peak: the whole run's; floor: per image


def memory_probe(batch: int, device: str, width: int, dtype: str) -> None:
    from genprior.perf import PerfConfig

    dev = torch.device(device)
    G, D = build_models(width, dev)
    images, _ = load_images(batch)
    stages = colorization_stages(10)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sampler = RssSampler()
    if batch == 1 and dtype == "seq":
        run: Any = Sequential(G, D, stages, images.to(dev), initial_latents(1, G.dim_z), torch.arange(1))
    else:
        run = Batched("probe", batch, dtype)
        run.setup(G, D, stages, images.to(dev), initial_latents(batch, G.dim_z), torch.arange(batch) * 7,
                  PerfConfig(autocast=dtype))
    with sampler:
        for _ in range(2):
            run.step()
    trainable = sum(p.numel() for g in (run.groups if isinstance(run, Sequential) else run.opt.param_groups)
                    for p in g["params"])
    floor = trainable * 4 * 4  # weights, gradients, two Adam moments, fp32
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = sampler.peak - sampler.start
    print(f"{peak} {floor / batch}")


class RssSampler:
    """Peak resident memory over a block, sampled every 2 ms from /proc/self/statm (Linux)."""

    def __init__(self) -> None:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> RssSampler:
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def resolve_auto(device: torch.device, width: int) -> int:
    """B for trainer.batch_size=auto, by genprior.perf's rule (GPU: measured; CPU: fixed)."""
    from genprior.perf import CPU_AUTO_BATCH, auto_batch_size

    if device.type != "cuda":
        return CPU_AUTO_BATCH

    def peak(batch: int) -> int:
        return int(memory_per_image("cuda", width, batch, "none")["peak"])

    free, _ = torch.cuda.mem_get_info(device)
    return auto_batch_size(peak, free, n_items=10**6)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in PEAKS.items():
        if key in name:
            return bf16 if dtype == "bf16" else fp32
    return None


# ---------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=None, help="G_ch = D_ch (default: 16 on CPU, 96 on GPU)")
    parser.add_argument("--batch-sizes", nargs="+", default=None,
                        help="batched runs (ints or 'auto'; default: 8 on CPU, 8 32 64 auto on GPU)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], help="fp32 and/or bf16 (autocast)")
    parser.add_argument("--steps", type=int, default=None,
                        help="iterations per image (the 5 stages compressed; default 10 on CPU, 200 on GPU)")
    parser.add_argument("--images", type=int, default=None,
                        help="images run by the sequential baseline for the PSNR comparison (default: min(B_max, 8))")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory probes")
    parser.add_argument("--compile", action="store_true",
                        help="also run every batched configuration with perf.compile=true (compiled in the "
                             "untimed warm-up iteration; implies --no-memory; own docs section)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="CPU: keep glibc's allocator defaults (perf.cpu_malloc_tuning=false); "
                             "the tuning, on by default as in genprior, serves every run of the process")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    parser.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    width = args.width or (96 if gpu else 16)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu" and not args.no_malloc_tuning:
        from genprior.perf import tune_cpu_malloc

        tune_cpu_malloc()
    if args.memory_probe is not None:
        memory_probe(args.memory_probe, args.device, width, {"fp32": "none", "bf16": "bf16", "none": "none",
                                                               "seq": "seq"}[args.dtypes[0]])
        return
    from genprior.perf import PerfConfig

    if not set(args.dtypes) <= {"fp32", "bf16"}:
        parser.error("--dtypes takes fp32 and/or bf16")
    device = torch.device(args.device)
    steps = args.steps or (200 if gpu else 10)
    sizes = args.batch_sizes or (["8", "32", "64", "auto"] if gpu else ["8"])
    batches = []
    for size in sizes:
        b = resolve_auto(device, width) if size == "auto" else int(size)
        batches.append((b, size == "auto"))
    b_max = max(b for b, _ in batches)
    n_seq = args.images or min(b_max, 8)
    G, D = build_models(width, device)
    images, names = load_images(b_max)
    images = images.to(device)
    z0 = initial_latents(b_max, G.dim_z)
    classes = (torch.arange(b_max) * 97 + 13) % 1000
    stages = colorization_stages(steps)
    load_before = os.getloadavg()

    runs: list[Batched] = []
    for b, auto in batches:
        for dtype in args.dtypes:
            for compiled in (False, True) if args.compile else (False,):
                label = f"B={b}{' (auto)' if auto else ''} {dtype}{' compiled' if compiled else ''}"
                run = Batched(label, b, dtype)
                run.setup(G, D, stages, images, z0, classes,
                          PerfConfig(autocast="bf16" if dtype == "bf16" else "none", compile=compiled))
                runs.append(run)
    # The baseline's modules are its own (it changes G's parameters in place).
    G_seq, D_seq = build_models(width, device)
    seq = Sequential(G_seq, D_seq, stages, images[:n_seq], z0[:n_seq], classes[:n_seq])

    # Warm-up: one iteration each (allocations, oneDNN/cuDNN plans), not timed; it is also
    # the iteration whose FLOPs are counted.
    seq_flops = step_flops(seq)
    for run in runs:
        run.step()
    # Useful FLOPs of a batched iteration: B x those of a one-image iteration of the engine
    # (images share no work; FlopCounterMode overcounts grouped-convolution backward).
    one_image = {}
    for dtype in args.dtypes:
        probe = Batched("flops", 1, dtype)
        probe.setup(G, D, stages, images, z0, classes, PerfConfig(autocast="bf16" if dtype == "bf16" else "none"))
        one_image[dtype] = step_flops(probe)
    run_flops = [one_image[run.dtype] * run.batch for run in runs]
    seq.step_seconds.clear()
    for run in runs:
        run.step_seconds.clear()
    started = time.perf_counter()
    while not seq.done() or any(not r.done() for r in runs):
        for _ in range(n_seq):  # one round: n_seq baseline iterations, one of every batched run
            if not seq.done():
                seq.step()
        for run in runs:
            if not run.done():
                run.step()
    wall = time.perf_counter() - started
    load_after = os.getloadavg()

    seq_s = statistics.median(seq.step_seconds)
    seq_psnr = final_psnr(torch.cat(seq.finals), images[:n_seq])
    rows = [{
        "label": "sequential B=1 fp32 (baseline)", "batch": 1, "dtype": "fp32", "s": seq_s,
        "flops": seq_flops, "psnr": seq_psnr, "dpsnr": torch.zeros(n_seq),
    }]
    for run, flops in zip(runs, run_flops):
        x = run.method.final_output()
        psnr = final_psnr(x, images[: run.batch])
        n = min(n_seq, run.batch)
        rows.append({
            "label": run.label, "batch": run.batch, "dtype": run.dtype, "s": statistics.median(run.step_seconds),
            "flops": flops, "psnr": psnr, "dpsnr": psnr[:n] - seq_psnr[:n],
        })
    if not args.no_memory and not args.compile:
        rows[0]["memory"] = memory_per_image(args.device, width, 1, "seq")
        one = {d: memory_per_image(args.device, width, 1, "bf16" if d == "bf16" else "none") for d in args.dtypes}
        for row, run in zip(rows[1:], runs):
            mem = memory_per_image(args.device, width, run.batch, "bf16" if run.dtype == "bf16" else "none")
            # Per image: the growth from the engine's one-image run, per added image.
            mem["marginal"] = (mem["peak"] - one[run.dtype]["peak"]) / max(run.batch - 1, 1)
            row["memory"] = mem

    text = report(args, device, width, steps, n_seq, rows, load_before, load_after, wall, names)
    print(text)
    section = f"dgp-{device.type}-{torch.get_num_threads() if device.type == 'cpu' else 'gpu'}"
    write_section(args.out, section + ("-compile" if args.compile else ""), text)


def report(args: Any, device: torch.device, width: int, steps: int, n_seq: int, rows: list[dict[str, Any]],
           load_before: tuple[float, ...], load_after: tuple[float, ...], wall: float, names: list[str]) -> str:
    base_ips = 3600 / (PRESET_STEPS * rows[0]["s"])
    cmd = "python benchmarks/dgp_throughput.py " + " ".join(sys.argv[1:])
    mem_kind = "max CUDA memory allocated" if device.type == "cuda" else "resident-memory growth (sampled every 2 ms)"
    lines = [
        f"### DGP colorization, BigGAN-128 ch {width} (random weights), {device.type}",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {machine(device)}. Load average (1, 5, 15 min) before: "
        f"{', '.join(f'{v:.2f}' for v in load_before)}; after: {', '.join(f'{v:.2f}' for v in load_after)} "
        f"({wall:.0f} s of interleaved runs, {time.strftime('%Y-%m-%d')}).",
        "",
        f"{steps} iterations per image (the preset's 5 stages compressed), {n_seq} images through the "
        f"sequential baseline; images/hour extrapolated to the preset's {PRESET_STEPS} iterations from the "
        "median seconds per iteration. ΔPSNR: final PSNR minus the baseline's, same image, latent and weights "
        f"(mean and largest |Δ| over the first {n_seq} images). Memory: {mem_kind} over two iterations in a "
        "fresh process, for the whole run and per image (the growth from the engine's B = 1 run per added "
        "image); the floor is the fine-tuned G tensors, their gradients and two Adam moments (fp32). TFLOP/s: "
        "FlopCounterMode's count of one iteration (B x a one-image iteration for the batched runs) over the "
        "median time.",
        "",
        "| run | s / iteration | iterations / s | images / hour | speed-up vs baseline | TFLOP/s | "
        "% of peak | memory: run / per image (GiB) | floor / image (GiB) | ΔPSNR mean (dB) | max abs ΔPSNR (dB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ips = 3600 * row["batch"] / (PRESET_STEPS * row["s"])
        tflops = row["flops"] / row["s"] / 1e12
        peak = peak_tflops(device, row["dtype"])
        share = f"{100 * tflops / peak:.1f}" if peak else "n/a"
        mem = row.get("memory")
        mem_s = f"{mem['peak'] / 2**30:.3f} / {mem.get('marginal', mem['peak']) / 2**30:.3f}" if mem else "-"
        floor_s = f"{mem['floor'] / 2**30:.3f}" if mem else "-"
        d = row["dpsnr"]
        lines.append(
            f"| {row['label']} | {row['s']:.3f} | {row['batch'] / row['s']:.2f} | {ips:.1f} | "
            f"{ips / base_ips:.2f}x | {tflops:.4f} | {share} | {mem_s} | {floor_s} | "
            f"{float(d.mean()):+.3f} | {float(d.abs().max()):.3f} |")
    lines += ["", f"Baseline final PSNR per image (dB): {', '.join(f'{v:.2f}' for v in rows[0]['psnr'].tolist())}."]
    return "\n".join(lines)


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in path."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    body = path.read_text() if path.is_file() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in body and end in body:
        head, rest = body.split(begin, 1)
        body = head + block + rest.split(end, 1)[1]
    else:
        body = body.rstrip("\n") + ("\n\n" if body else "") + block + "\n"
    path.write_text(body)


if __name__ == "__main__":
    main()
