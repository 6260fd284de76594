"""DGP in float64 against the original code's float64 traces (dgp_traces_f64.pt).

The traces are the original ``DGP.run`` on the tiny BigGAN, run in float64 (TRACES_F64.md).
Every trace is replayed through the real Reconstruction LightningModule and a Lightning Trainer
with ``precision="64-true"``, alone (B = 1) and inside batches of other images, and matched at
TRACES_F64.md §5's tolerances: 1e-9 relative on losses, z, images and metrics, exact learning
rates, step counts and early-stop steps. The original agrees with itself across 1, 2 and 4
threads to 6e-15 on losses and 2e-14 on images (§4), so 1e-9 leaves room for another op order
and none for a semantic difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor

from genprior.config import compose
from genprior.degradations import build_degradation
from genprior.engine import ImageBatches, Reconstruction, make_trainer
from genprior.image_io import load_image, preprocess
from genprior.items import ImageItem
from genprior.methods.dgp import DGP, DGPConfig
from genprior.priors.biggan import Discriminator, Generator

pytestmark = pytest.mark.shared

RTOL = 1e-9  # TRACES_F64.md §5
IN_BIAS_ATOL = 1e-8  # IN-cancelled conv1 biases of use_in traces: absolute (§4, §5)
MODES = {"hybrid": ("hybrid", None), "SR": ("sr", "sr"), "colorization": ("colorization", "colorization"),
         "inpainting": ("inpainting", "inpainting"), "reconstruct": ("identity", "reconstruct")}
# Images that share a batch with a traced one: (file, class), none of them a traced image.
OTHERS = [("ILSVRC2012_val_00004291.JPEG", 442), ("ILSVRC2012_val_00008229.JPEG", 174),
          ("ILSVRC2012_val_00022130.JPEG", 511), ("ILSVRC2012_val_00042095.JPEG", 260)]


@pytest.fixture(scope="module")
def traces(dgp_ref: Path) -> dict[str, Any]:
    return torch.load(dgp_ref / "dgp_traces_f64.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny(dgp_ref: Path) -> dict[str, Any]:
    return torch.load(dgp_ref / "biggan_tiny_parity.pt", weights_only=True)


@pytest.fixture(scope="module")
def others(shared_dir: Path) -> list[tuple[Tensor, int]]:
    """Other ImageNet images, preprocessed as genprior does (float32), with their classes."""
    folder = shared_dir / "data" / "dgp"
    return [(preprocess(load_image(folder / name), 128), cls) for name, cls in OTHERS]


# ------------------------------------------------------------------------------- building
def settings_of(trace: dict[str, Any]) -> DGPConfig:
    h = trace["hyperparameters"]
    n = len(h["iterations"])
    return DGPConfig(
        iterations=[int(v) for v in h["iterations"]], G_lrs=[float(v) for v in h["G_lrs"]],
        z_lrs=[float(v) for v in h["z_lrs"]], ftr_num=[int(v) for v in h["ftr_num"]],
        ft_num=[int(v) for v in h["ft_num"]], lr_ratio=[float(v) for v in h["lr_ratio"]],
        w_D_loss=[float(v) for v in h["w_D_loss"]], w_mse=[float(v) for v in h["w_mse"]],
        w_percep=[0.0] * n, use_in=[bool(v) for v in h["use_in"]], w_nll=float(h["w_nll"]), select_num=0,
        update_G=bool(h["update_G"]), update_embed=bool(h["update_embed"]), warm_up=int(h["warm_up"]),
        stop_mse=float(h["stop_mse"]), stop_ftr=float(h["stop_ftr"]), G_B1=float(h["G_B1"]),
        G_B2=float(h["G_B2"]))


def build(tiny: dict[str, Any], trace: dict[str, Any]) -> DGP:
    """The tiny G/D with their float32 weights copied into float64 modules (an exact cast)."""
    G = Generator(resolution=128, G_ch=8).double()
    G.load_state_dict(tiny["G_state_dict"])
    D = Discriminator(resolution=128, D_ch=8).double()
    D.load_state_dict(tiny["D_state_dict"])
    degradation, metric_task = MODES[trace["mode"]]
    return DGP(G.eval(), D.eval(), settings_of(trace), build_degradation(degradation, 128),
               metric_task=metric_task)


# ------------------------------------------------------------------------------- replaying
@dataclass
class Replay:
    """What one image did, step by step (its own steps only: a finished image takes none)."""

    lrs: list[list[float]] = field(default_factory=list)
    z_before: list[Tensor] = field(default_factory=list)
    position: list[tuple[int, int]] = field(default_factory=list)  # (stage, iteration), 0-based
    losses: dict[str, list[Tensor]] = field(default_factory=dict)
    metrics: dict[str, list[Tensor]] = field(default_factory=dict)
    stage_end_x: list[Tensor] = field(default_factory=list)
    x: list[Tensor] = field(default_factory=list)


class Recorder(L.Callback):
    def __init__(self, batch_size: int) -> None:
        self.images = [Replay() for _ in range(batch_size)]
        self._stepping: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        method = pl_module.method
        self._stepping = [b for b in range(method.batch_size) if not method.progress.done[b]]
        for b in self._stepping:
            self.images[b].z_before.append(method.z[b].detach().clone())
            self.images[b].position.append((method.progress.stage[b], method.progress.iteration[b]))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        method = pl_module.method
        groups = {g["name"]: g["lr"] for g in pl_module.optimizer.param_groups}
        record = pl_module.last_record
        metrics = method.metrics(pl_module.last_x) if method.metric_task else {}
        for b in self._stepping:
            image = self.images[b]
            image.lrs.append([float(groups[f"G{i}"][b]) for i in range(method.num_groups)] + [float(groups["z"][b])])
            for key, value in {"ftr": record.ftr_loss, "mse": record.mse_raw, "l1": record.l1_raw,
                               "nll": record.nll, "total": record.total}.items():
                image.losses.setdefault(key, []).append(value[b].detach().clone())
            for key, value in metrics.items():
                image.metrics.setdefault(key, []).append(value[b].detach().clone())
            image.x.append(pl_module.last_x[b].detach().clone())
            if pl_module.last_stage_ended[b]:
                image.stage_end_x.append(pl_module.last_x[b].detach().clone())


# A float64 run on the CPU, as ``trainer.precision=64-true`` asks for; no files, no loggers.
CFG = compose(["trainer.precision=64-true", "trainer.accelerator=cpu", "logger=none",
               "trainer.enable_progress_bar=false"])


def fit(method: DGP, images: Tensor, classes: list[int], initial_z: Tensor,
        module: Reconstruction | None = None) -> tuple[Reconstruction, Recorder]:
    """One batch of images through the engine's LightningModule, datamodule and Trainer, as
    train.py fits it, each image starting from its given z. ``module``: a module that already
    fitted a batch (its optimizer carries over with dgp.carry_optimizer_state)."""
    ids = [f"image{b}" for b in range(images.shape[0])]
    items = [ImageItem(id=i, path=i, class_id=c, image=img) for i, c, img in zip(ids, classes, images)]
    method.initial_latents = dict(zip(ids, initial_z))
    recorder = Recorder(images.shape[0])
    module = module or Reconstruction(method, fused_optimizer=method.perf.fused_optimizer)
    trainer = make_trainer(CFG, None, [recorder], quiet=True)
    trainer.fit(module, datamodule=ImageBatches(items, len(items), method.total_steps()))
    return module, recorder


def batch_with_others(trace: dict[str, Any], others: list[tuple[Tensor, int]], count: int,
                      first: int = 0, position: int = 0) -> tuple[Tensor, list[int], Tensor]:
    """The traced image at ``position`` among ``count`` other images, each with its own z."""
    gen = torch.Generator().manual_seed(100 + first)
    rows = [(img.double(), cls, torch.randn(1, 120, generator=gen, dtype=torch.float32).double() * 0.5)
            for img, cls in others[first : first + count]]
    rows.insert(position, (trace["target_origin"][0], int(trace["class_y"]), trace["initial_z"]))
    return (torch.stack([r[0] for r in rows]), [r[1] for r in rows], torch.cat([r[2] for r in rows]))


# ------------------------------------------------------------------------------- checking
def rel(a: Tensor, b: Tensor) -> float:
    """max|a - b| / max|b| (TRACES_F64.md §4's tensor measure); 0 when both are 0."""
    scale = b.abs().max()
    diff = (a - b).abs().max()
    return float(diff / scale) if scale > 0 else float(diff)


def elementwise_rel(a: Tensor, b: Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def measure(method: DGP, b: int, replay: Replay, trace: dict[str, Any]) -> dict[str, float]:
    """Image b's largest relative deviations from its trace, by TRACES_F64.md §4's groups."""
    n = min(len(replay.lrs), int(trace["num_steps"]))
    losses = max(elementwise_rel(torch.stack(replay.losses[key])[:n], trace[ref][:n]) for key, ref in (
        ("ftr", "per_step_ftr_loss"), ("mse", "per_step_mse_loss_raw"), ("l1", "per_step_l1_loss_raw"),
        ("nll", "per_step_nll"), ("total", "per_step_total_loss")))
    z = max([rel(replay.z_before[k], trace["per_step_z_before_update"][k]) for k in range(n)]
            + [rel(method.z[b].detach(), trace["final_z"][0])])
    images = [rel(method.final_output()[b], trace["last_forward_x"][0]),
              rel(method.final_render()[b], trace["final_G_output_after_last_step"][0])]
    if len(replay.stage_end_x) == len(trace["G_output_at_stage_ends"]):
        images.append(rel(torch.stack(replay.stage_end_x), trace["G_output_at_stage_ends"]))
    if "final_colorization_x2_lab_merged" in trace:
        x2 = method.extra_images(method.final_output(), b)["colorization2"]
        images.append(rel(x2 * 2 - 1, trace["final_colorization_x2_lab_merged"][0]))
    out = {"losses": losses, "z": z, "images": max(images)}
    if "per_step_metrics" in trace and replay.metrics:
        # the reference's inpainting psnr/ssim are of the hole: genprior's psnr_hole/ssim_hole
        names = {"psnr": "psnr_hole", "ssim": "ssim_hole"} if trace["mode"] == "inpainting" else {}
        out["metrics"] = max(elementwise_rel(torch.stack(replay.metrics[names.get(key, key)])[:n], ref[:n])
                             for key, ref in trace["per_step_metrics"].items())
    deltas, in_biases = [0.0], [0.0]
    use_in = any(st.use_in for st in method.stages)
    for key, delta in trace["G_state_delta_l2_per_key"].items():
        got = float((method.image_state(b)[key] - method.G_weight[key]).norm())
        if use_in and key.endswith(".0.conv1.bias"):
            in_biases.append(abs(got - delta))  # IN-cancelled: absolute (§4)
        else:
            deltas.append(abs(got - delta) / delta if delta else got)
    out["G_deltas"] = max(deltas)
    if use_in:
        out["IN_cancelled_biases_abs"] = max(in_biases)
    return out


def check(method: DGP, b: int, replay: Replay, trace: dict[str, Any], metrics: bool = True) -> dict[str, float]:
    """Image b against its trace at TRACES_F64.md §5's tolerances; returns the deviations."""
    n = int(trace["num_steps"])
    assert len(replay.lrs) == n, f"{len(replay.lrs)} steps run, the original ran {n}"
    assert replay.position == list(zip(trace["per_step_stage"].tolist(), trace["per_step_iter_in_stage"].tolist()))
    # Learning rates are Python floats computed the same way: exact.
    assert torch.equal(torch.tensor(replay.lrs, dtype=torch.float64), trace["per_step_lrs_G_groups_then_z"])
    # Early stopping: the global steps where the condition held, and the stages it ended.
    s = method.config
    held = [k + 1 for k in range(n) if float(replay.losses["mse"][k]) < s.stop_mse
            or float(replay.losses["ftr"][k]) < s.stop_ftr]
    assert held == list(trace["stop_condition_global_steps"])
    stopped = [p["stage"] for p in trace["per_stage"] if p["early_stopped"]]
    assert method.progress.stopped_early[b] == stopped
    assert len(replay.stage_end_x) == len(trace["G_output_at_stage_ends"])
    measured = measure(method, b, replay, trace)
    if not metrics:
        measured.pop("metrics", None)
    # Losses, z, images (the last forward, which the reference saves; the stage ends; one more
    # forward; colorization's Lab merge), metrics and how far every generator tensor moved.
    for key, value in measured.items():
        limit = IN_BIAS_ATOL if key == "IN_cancelled_biases_abs" else RTOL
        assert value < limit, (key, value, measured)
    print(f"\n{trace['mode']} ({method.batch_size} images, image {b}): "
          + ", ".join(f"{k} {v:.1e}" for k, v in measured.items()))  # pytest -s shows it
    # Tensors the reference never changes stay exactly unchanged.
    for key, delta in trace["G_state_delta_l2_per_key"].items():
        if delta == 0:
            assert torch.equal(method.image_state(b)[key], method.G_weight[key]), key
    return measured


# ------------------------------------------------------------------------------- tests
B1_TRACES = ["trace_hybrid", "trace_SR", "trace_SR_second_image_fresh_DGP_object", "trace_colorization",
             "trace_inpainting", "trace_reconstruct_early_stop"]


@pytest.mark.parametrize("name", B1_TRACES)
def test_trace_alone(traces: dict[str, Any], tiny: dict[str, Any], name: str, threads: int) -> None:
    """B = 1: the original's loop, step for step, to 1e-9 (measured: at most 9e-13)."""
    trace = traces[name]
    method = build(tiny, trace)
    _, recorder = fit(method, trace["target_origin"], [int(trace["class_y"])], trace["initial_z"])
    check(method, 0, recorder.images[0], trace)


def test_carried_adam_state_alone(traces: dict[str, Any], tiny: dict[str, Any]) -> None:
    """main.py's second image, optimised with the first image's Adam state (quirk 3), through
    ``dgp.carry_optimizer_state`` (the module keeps the previous batch's optimizer)."""
    first, second = traces["trace_SR"], traces["trace_SR_second_image_same_DGP_object"]
    method = build(tiny, first)
    module, recorder = fit(method, first["target_origin"], [int(first["class_y"])], first["initial_z"])
    check(method, 0, recorder.images[0], first, metrics=False)
    method.carry_optimizer_state = True
    _, recorder = fit(method, second["target_origin"], [int(second["class_y"])], second["initial_z"],
                      module=module)
    check(method, 0, recorder.images[0], second)


def test_two_traces_share_a_batch_with_other_images(traces: dict[str, Any], tiny: dict[str, Any],
                                                    others: list[tuple[Tensor, int]]) -> None:
    """Batching is per image: the two fresh SR traces (other images, other classes) in one batch
    of four with two more images, each matches its own trace at the B = 1 tolerance."""
    first, second = traces["trace_SR"], traces["trace_SR_second_image_fresh_DGP_object"]
    images, classes, z = batch_with_others(first, others, 2)
    images = torch.cat([images[:1], second["target_origin"], images[1:]])
    classes = [classes[0], int(second["class_y"]), *classes[1:]]
    z = torch.cat([z[:1], second["initial_z"], z[1:]])
    method = build(tiny, first)
    _, recorder = fit(method, images, classes, z)
    check(method, 0, recorder.images[0], first)
    check(method, 1, recorder.images[1], second)


def test_early_stop_inside_a_batch(traces: dict[str, Any], tiny: dict[str, Any],
                                   others: list[tuple[Tensor, int]]) -> None:
    """stop_mse ends the traced image's stages 2 and 3 at its own steps (20 and 21) while the
    other images of the batch stop elsewhere or not at all."""
    trace = traces["trace_reconstruct_early_stop"]
    images, classes, z = batch_with_others(trace, others, 2, position=1)
    method = build(tiny, trace)
    _, recorder = fit(method, images, classes, z)
    check(method, 1, recorder.images[1], trace)
    steps = [len(r.lrs) for r in recorder.images]
    assert steps[1] == 21 and steps != [21, 21, 21], steps


@pytest.mark.parametrize("name", [
    "trace_inpainting",  # use_in and update_embed: per-image IN state and embedding rows
    "trace_hybrid",  # warm_up, per-stage ftr_num, use_in switched on in stage 2
    pytest.param("trace_colorization", marks=pytest.mark.slow),  # 40 steps
])
def test_trace_inside_a_batch(traces: dict[str, Any], tiny: dict[str, Any],
                              others: list[tuple[Tensor, int]], name: str) -> None:
    """The other traces at the end of a batch of three, at the B = 1 tolerance."""
    trace = traces[name]
    images, classes, z = batch_with_others(trace, others, 2, first=2, position=2)
    method = build(tiny, trace)
    _, recorder = fit(method, images, classes, z)
    check(method, 2, recorder.images[2], trace)


@pytest.mark.slow
def test_carried_adam_state_inside_batches(traces: dict[str, Any], tiny: dict[str, Any],
                                           others: list[tuple[Tensor, int]]) -> None:
    """main.py's carry-over, batched: image k of batch 2 inherits image k of batch 1's state."""
    first, second = traces["trace_SR"], traces["trace_SR_second_image_same_DGP_object"]
    method = build(tiny, first)
    images, classes, z = batch_with_others(first, others, 2)
    module, _ = fit(method, images, classes, z)
    images, classes, z = batch_with_others(second, others, 2, first=2)
    method.carry_optimizer_state = True
    _, recorder = fit(method, images, classes, z, module=module)
    check(method, 0, recorder.images[0], second)
