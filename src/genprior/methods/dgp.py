"""Deep Generative Prior (Pan et al., ECCV 2020, Section 3), for B images at a time.

DGP restores an image x by fine-tuning a pretrained BigGAN G and its latent z so that the
degraded output φ(G(z)) matches the observation. One optimisation step, as this file writes it
from the top (genprior.engine.step calls these in this order):

1. ``step_lrs``: the per-stage learning rates of progressive unfreezing: group i of G (0 is the
   first linear layer, 1.. the GBlocks) gets G_lr · lr_ratio^i while i < ft_num, else 0 (the
   frozen groups stay in the optimizer and keep building Adam state, SPEC quirk 2);
2. ``loss``: x = G(z, shared(y)) with the image's own tensors, x_map = φ(x), and
   loss = w_D · Σ_{last ftr_num D features} |D(x_map) - D(target)|₁ + w_mse · MSE(x_map, target)
   + w_nll · mean(z²/2), all in the degraded space;
3. backward and the per-image Adam update (betas (0, 0.999), eps 1e-8; genprior.optim);
4. ``end_step``: the stage ends after its iterations, or early when MSE < stop_mse or the
   D-feature loss < stop_ftr (only that image's current stage ends, SPEC §6.2.9).

Below them: a new batch (``start``: reset G, degrade the targets, select_z), the batched
machinery (every image's tensors stacked with the image as dimension 0 and run through the shared
G with ``torch.func.functional_call``), the results, and ``build`` (a DGP from the config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.func import functional_call

from genprior.degradations import Degradation, build_degradation
from genprior.errors import InvalidSettingError
from genprior.items import ImageBatch, StepRecord, image_generator
from genprior.losses import PerceptualLoss, feature_l1_terms, l1_per_image, mse_per_image
from genprior.methods.base import Method, Progress
from genprior.metrics import IMAGE_KEYS, lab_recombine, psnr, restoration_metrics
from genprior.optim import PerImageAdam
from genprior.perf import PerfConfig, autocast, maybe_compile, perf_settings, to_device_async
from genprior.precision import run_dtype
from genprior.priors.biggan import (
    Discriminator,
    Generator,
    cache_frozen_spectral_norms,
    use_fused_attention,
    use_output_scaled_spectral_norms,
)
from genprior.priors.registry import build_biggan

__all__ = ["DGP", "DGP_TASKS", "DGPConfig", "DGPStepRecord", "Stage", "group_lrs"]

# Task name -> (degradation for build_degradation, metric convention of SPEC §8 or None).
# The reference scores hybrid not at all (SPEC §9); genprior scores it like the others, against
# the clean image, the whole image (no Lab recombination: the observation has no full-size L)
# and its hole.
DGP_TASKS: dict[str, tuple[str, str | None]] = {
    "reconstruct": ("identity", "reconstruct"),
    "defence": ("identity", None),
    "colorization": ("colorization", "colorization"),
    "inpainting": ("inpainting", "inpainting"),
    "sr": ("sr", "sr"),
    "hybrid": ("hybrid", "hybrid"),
    "random_mask": ("random_mask", "random_mask"),
    "mask_image": ("mask_image", "mask_image"),
    # Manipulation tasks fit the clean image, then edit it (tasks/manipulation.py, SPEC §9).
    "jitter": ("identity", None),
    "morphing": ("identity", None),
    "category_transfer": ("identity", None),
}
# Tasks with a hole: scored on the whole image and on the hole (psnr_hole, ssim_hole).
HOLE_TASKS = ("inpainting", "hybrid")


# ------------------------------------------------------------------------------ the settings
@dataclass
class DGPConfig:
    """The ``dgp`` config section: the reference's per-stage lists and scalars under its flag
    names (SPEC §10). One entry per stage in every per-stage list."""

    iterations: list[int] = field(default_factory=lambda: [200, 200, 200, 200, 200])
    G_lrs: list[float] = field(default_factory=lambda: [5e-5, 5e-5, 2e-5, 1e-5, 1e-5])
    z_lrs: list[float] = field(default_factory=lambda: [2e-3, 1e-3, 2e-5, 1e-5, 1e-5])
    ftr_num: list[int] = field(default_factory=lambda: [8, 8, 8, 8, 8])
    ft_num: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])
    lr_ratio: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0, 1.0])
    w_D_loss: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0, 1.0])
    w_mse: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0, 1.0])
    # Loss ablations of DGP Table 4 (0 in every reference script).
    w_percep: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0, 0.0])
    use_in: list[bool] = field(default_factory=lambda: [False, False, False, False, False])
    w_nll: float = 0.02
    select_num: int = 500
    sample_std: float = 0.3
    update_G: bool = True
    update_embed: bool = False
    warm_up: int = 0
    stop_mse: float = 0.0
    stop_ftr: float = 0.0
    G_B1: float = 0.0
    G_B2: float = 0.999
    adam_eps: float = 1e-8  # the reference hard-codes 1e-8 (its --adam_eps flag is unused)
    # Reference bug (SPEC §6.1, quirk 3): main.py carries Adam state from one image to the next.
    # Off by default; turn on to reproduce main.py's numbers beyond the first image.
    carry_optimizer_state: bool = False
    print_interval: int = 100
    save_interval: list[int] | None = None
    perceptual_weights: str | None = None  # local VGG-16 file for w_percep (timm vgg16)
    select_chunk: int = 50  # candidates rendered at once by select_z (speed only)

    STAGE_KEYS: ClassVar[tuple[str, ...]] = ("iterations", "G_lrs", "z_lrs", "ftr_num", "ft_num",
                                             "lr_ratio", "w_D_loss", "w_mse", "w_percep", "use_in")

    @property
    def stages(self) -> list[Stage]:
        """The per-stage lists zipped into stages."""
        return [Stage(iterations=int(self.iterations[s]), G_lr=float(self.G_lrs[s]), z_lr=float(self.z_lrs[s]),
                      ftr_num=int(self.ftr_num[s]), ft_num=int(self.ft_num[s]),
                      lr_ratio=float(self.lr_ratio[s]), w_D_loss=float(self.w_D_loss[s]),
                      w_mse=float(self.w_mse[s]), w_percep=float(self.w_percep[s]),
                      use_in=bool(self.use_in[s]))
                for s in range(len(self.iterations))]


@dataclass(frozen=True)
class Stage:
    """One stage of the schedule (SPEC §6.2, §10)."""

    iterations: int
    G_lr: float
    z_lr: float
    ftr_num: int
    ft_num: int
    lr_ratio: float
    w_D_loss: float
    w_mse: float
    w_percep: float
    use_in: bool


def group_lrs(stage: Stage, t: int, warm_up: int, n_groups: int) -> tuple[list[float], float]:
    """Learning rates of G's groups (shallow to deep) and of z at global step t (from 1).

    For t < warm_up the base rate is scaled by t / warm_up (SPEC §6.2.1). Group i gets
    ``G_lr * warm * lr_ratio**i`` while ``i < ft_num`` and 0 otherwise.
    """
    warm = t / warm_up if t < warm_up else 1.0
    g = [stage.G_lr * warm * stage.lr_ratio**i if i < stage.ft_num else 0.0 for i in range(n_groups)]
    return g, stage.z_lr * warm


@dataclass
class DGPStepRecord(StepRecord):
    """A DGP step's per-image values: the loss terms unscaled ([-1, 1] images, as optimised);
    ``reported()`` gives the reference's loss dict (mse / 4 and l1 / 2: [0, 1] images, SPEC §1)."""

    ftr_loss: Tensor | None = None
    mse_raw: Tensor | None = None
    l1_raw: Tensor | None = None
    nll: Tensor | None = None
    percep: Tensor | None = None

    def reported(self) -> dict[str, Tensor]:
        return {"ftr_loss": self.ftr_loss, "nll": self.nll, "mse_loss": self.mse_raw / 4,  # type: ignore[operator]
                "l1_loss": self.l1_raw / 2, "loss": self.total}  # type: ignore[operator,dict-item]


# ------------------------------------------------------------------------------ the method
class DGP(Method):
    """Fits B images at once; holds the shared G and D and every image's own tensors."""

    preprocessing: ClassVar[str] = "dgp"
    saves_reconstructions: ClassVar[bool] = True

    def __init__(self, G: Generator, D: Discriminator | None, config: DGPConfig, degradation: Degradation,
                 perceptual: nn.Module | None = None, metric_task: str | None = None,
                 ssim_data_range: float = 2.0, perf: PerfConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.stages = config.stages
        self.degradation = degradation
        self.perceptual = perceptual
        self.metric_task = metric_task
        self.ssim_data_range = ssim_data_range
        self.seed = int(seed)
        # Execution options (genprior.perf, docs/performance.md); every default keeps each
        # image's result to float rounding of the plain path (proven in float64).
        self.perf = perf if perf is not None else PerfConfig()
        self.G, self.D = G, D
        self._prepare_networks()
        if any(s.w_D_loss > 0 for s in self.stages) and D is None:
            raise ValueError("the schedule uses the D-feature loss (w_D_loss > 0) but no D is loaded")
        if any(s.w_percep > 0 for s in self.stages) and perceptual is None:
            raise ValueError("the schedule uses the perceptual loss (w_percep > 0) but no network is loaded")
        # The pretrained state every image starts from (the reference's G_weight, SPEC §5).
        self.G_weight = {k: v.detach().clone() for k, v in G.state_dict().items()}
        groups = G.param_group_names(config.update_embed)
        self.num_groups = len(G.blocks) + 1  # groups 0..B; the output layer is never tuned
        self.group_names = [[n for n in names if n != "shared.weight" and not _is_in_param(n)]
                            for names in groups[: self.num_groups]]
        self.in_names = [n for names in groups for n in names if _is_in_param(n)]
        self.in_flag_names = [n for n, _ in G.named_buffers() if n.endswith("in_initialized")]
        self.ids: list[str] = []
        #: image id -> the latent that image starts from instead of select_z's (a replayed
        #: trace's initial z; a fit resumed from a saved reconstruction)
        self.initial_latents: dict[str, Tensor] = {}
        self.carry_optimizer_state = bool(config.carry_optimizer_state)
        self.save_interval = list(config.save_interval) if config.save_interval else None

    @property
    def dtype(self) -> torch.dtype:
        """Every image's tensors, losses and metrics are in G's dtype (float64 for
        ``trainer.precision=64-true``, docs/faithfulness.md)."""
        return self.G.linear.weight.dtype

    @property
    def print_interval(self) -> int:
        return int(self.config.print_interval)

    def stage_lengths(self) -> list[int]:
        return [s.iterations for s in self.stages]

    # ============================================================== one step (Section 3)
    def step_lrs(self) -> dict[str, Tensor]:
        """1. Progressive unfreezing: every group's learning rate for the next step, per image
        (0 for finished images; the reference increments its global step first, §6.2)."""
        B = self.batch_size
        lrs = {f"G{i}": torch.zeros(B, dtype=torch.float64) for i in range(self.num_groups)}
        lrs["z"] = torch.zeros(B, dtype=torch.float64)
        for b in range(B):
            if self.progress.done[b]:
                continue
            g, z_lr = group_lrs(self.stage_of(b), self.progress.t[b] + 1, self.config.warm_up, self.num_groups)
            for i, lr in enumerate(g):
                lrs[f"G{i}"][b] = lr
            lrs["z"][b] = z_lr
        lrs["embed"] = lrs["G0"].clone()  # the embedding is in group 0 (get_params(0, update_embed))
        return lrs

    def loss(self) -> tuple[Tensor, DGPStepRecord, Tensor]:
        """2. G forward, degradation and the loss in the degraded space (SPEC §6.2.3-5)."""
        B = self.batch_size
        stages = [self.stage_of(b) for b in range(B)]
        weights, active_dev, use_in = self._step_values(stages)  # [4, B]: ftr_num, w_D, w_mse, w_percep
        ftr_num, w_D, w_mse, w_percep = weights.unbind(0)
        x = self.render(self.z, self.y, use_in)
        x_map = self.degradation.apply(x, ids=self.ids)
        zeros = torch.zeros(B, device=x.device, dtype=self.dtype)
        # The terms in the reference's order (D features, mse, nll, l1): autograd then sums the
        # gradients reaching x_map in the reference's order too.
        ftr = zeros
        if self.D is not None:
            terms = feature_l1_terms(self._d_features(x_map), self.real_features)  # from the last feature
            keep = (torch.arange(terms.shape[1], device=x.device)[None, :] < ftr_num[:, None]).to(terms.dtype)
            for j in range(terms.shape[1]):  # summed one feature at a time from 0, as DiscriminatorLoss
                ftr = ftr + terms[:, j] * keep[:, j]
        mse = mse_per_image(x_map, self.target)
        nll = self.z.pow(2).div(2).mean(1)
        l1 = l1_per_image(x_map, self.target)
        with_percep = self.perceptual is not None and any(s.w_percep > 0 for s in stages)
        percep = self.perceptual(x_map, self.target) if with_percep else zeros
        per_image = w_D * ftr + w_mse * mse + self.config.w_nll * nll + w_percep * percep
        total = (per_image * active_dev).sum()  # every image's gradient is its own
        record = DGPStepRecord(total=per_image.detach(), active=self.progress.active(),
                               ftr_loss=ftr.detach(), mse_raw=mse.detach(), l1_raw=l1.detach(),
                               nll=nll.detach(), percep=percep.detach())
        # The reference saves the x of the last forward, before the last update (quirk 5).
        self.last_x = torch.where(active_dev.bool().view(B, 1, 1, 1), x.detach(), self.last_x)
        return total, record, x.detach()

    def end_step(self, record: DGPStepRecord) -> list[bool]:  # type: ignore[override]
        """4. Stage end, or early stop of that image's current stage only (SPEC §6.2.9)."""
        c = self.config
        stop = [False] * self.batch_size
        if c.stop_mse > 0 or c.stop_ftr > 0:
            mse, ftr = record.mse_raw.cpu(), record.ftr_loss.cpu()  # type: ignore[union-attr]
            stop = [bool(mse[b] < c.stop_mse or ftr[b] < c.stop_ftr) for b in range(self.batch_size)]
        return self.progress.advance(stop)

    def stage_of(self, b: int) -> Stage:
        return self.stages[self.progress.current(b)]

    # ============================================================== a new batch
    def start(self, batch: ImageBatch, initial_z: Tensor | None = None) -> None:
        """reset_G, set_target and select_z of the reference (SPEC §6.1), for every image."""
        device = self.G.linear.weight.device
        B = len(batch)
        n_classes = self.G.n_classes
        for image_id, c in zip(batch.ids, batch.classes.tolist()):
            if not -1 <= c < n_classes:
                raise ValueError(f"class {c} of image {image_id!r} is out of range "
                                 f"(use -1 for unknown, or 0..{n_classes - 1})")
        self.ids = list(batch.ids)
        # Images are preprocessed in float32 (as the reference does) and cast here.
        self.target_origin = batch.images.to(device=device, dtype=self.dtype)
        self.target = self.degradation.target(self.target_origin, ids=self.ids)
        self.real_features = self._d_features(self.target, "none") if self.D is not None else None
        # reset_G: every image starts from the pretrained weights (stacked copies).
        self.G.load_state_dict(self.G_weight, strict=False)
        self.G.reset_in_init()
        self.G.eval()
        tuned: dict[str, Tensor] = {}
        if self.config.update_G:
            for names in self.group_names:
                for n in names:
                    tuned[n] = _stack(self.G_weight[n], B, device)
        # The embedding is in G's optimizer (group 0), which steps only with update_G (SPEC
        # §6.2.6): update_G=false (latent-only inversion) leaves it fixed even with update_embed.
        if self.config.update_embed and self.config.update_G:
            tuned["shared.weight"] = _stack(self.G_weight["shared.weight"], B, device)
        # The per-image tensors are the module's parameters (ParameterDict keys cannot hold '.').
        self.tuned = nn.ParameterDict({_key(n): nn.Parameter(t) for n, t in tuned.items()})
        # Instance-norm parameters and their "initialised" flags are per-image state, not
        # trained (requires_grad False in the reference, SPEC §3.4).
        self.in_state = {n: _stack(self.G_weight[n], B, device) for n in self.in_names}
        self.in_state.update({n: torch.zeros(B, dtype=torch.bool, device=device) for n in self.in_flag_names})
        z, y = self.select_z(batch.classes.to(device), [image_generator(self.seed, i) for i in self.ids])
        if initial_z is not None:
            z = initial_z.to(device=device, dtype=self.dtype)
        for b, image_id in enumerate(self.ids):  # given latents replace select_z's choice
            if image_id in self.initial_latents:
                z[b] = self.initial_latents[image_id].reshape(-1).to(device=device, dtype=self.dtype)
        self.z = nn.Parameter(z.detach().clone())
        self.y = y
        self.progress = Progress(self.stage_lengths(), B)
        self.last_x = torch.zeros_like(self.target_origin)

    @property
    def trainable(self) -> dict[str, Tensor]:
        """The per-image generator tensors by their reference names (without the embedding)."""
        return {_name(k): p for k, p in self.tuned.items() if _name(k) != "shared.weight"}

    @property
    def embed_weight(self) -> Tensor | None:
        return self.tuned[_key("shared.weight")] if _key("shared.weight") in self.tuned else None

    def make_optimizer(self, fused: bool = True) -> PerImageAdam:
        """One per-image Adam: a group per generator block, then z (and the embedding)."""
        c = self.config
        groups: list[dict[str, Any]] = []
        if c.update_G:
            trainable = self.trainable
            for i, names in enumerate(self.group_names):
                groups.append({
                    "name": f"G{i}", "params": [trainable[n] for n in names],
                    # Under use_in the conditional-BN linears get no gradient at all in the
                    # reference (grad None), so Adam skips them: no moment decay, no step.
                    "mask_keys": ["uses_bn" if (".bn1." in n or ".bn2." in n) else None for n in names],
                })
        groups.append({"name": "z", "params": [self.z]})
        if self.embed_weight is not None:
            # It only feeds the conditional BNs, so it too gets no gradient under use_in.
            groups.append({"name": "embed", "params": [self.embed_weight], "mask_keys": ["uses_bn"]})
        return PerImageAdam(groups, batch_size=self.batch_size, betas=(c.G_B1, c.G_B2), eps=c.adam_eps,
                            fused=fused and self.perf.fused_optimizer)

    def step_masks(self) -> dict[str, Tensor]:
        """Images whose tensors keyed "uses_bn" receive a gradient at the next step."""
        return {"uses_bn": torch.tensor([not self.stage_of(b).use_in for b in range(self.batch_size)],
                                        dtype=torch.bool)}

    @torch.no_grad()
    def select_z(self, classes: Tensor, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
        """SPEC §6.1.3: the best of select_num random latents (and classes, if unknown)."""
        c = self.config
        device = classes.device
        dim_z = self.G.dim_z
        zs, ys = [], []
        for b in range(classes.shape[0]):
            gen = generators[b]
            select_y = int(classes[b]) < 0
            if c.select_num <= 1:
                if select_y:
                    raise ValueError(
                        f"image {self.ids[b]!r} has no class (-1) and dgp.select_num={c.select_num}: "
                        "the class is chosen by select_z, which needs dgp.select_num >= 2")
                zs.append(torch.zeros(dim_z) if c.select_num == 0
                          else torch.randn(dim_z, generator=gen, dtype=torch.float32))
                ys.append(int(classes[b]))
                continue
            cand_z, cand_y = [], []
            for _ in range(c.select_num):  # per candidate: z first, then y (SPEC §6.1.3)
                # drawn in float32 whatever the run's dtype: a float64 run starts from the
                # same latents as a float32 one (docs/faithfulness.md)
                cand_z.append(torch.randn(dim_z, generator=gen, dtype=torch.float32) * c.sample_std)
                cand_y.append(int(torch.randint(0, self.G.n_classes, (1,), generator=gen))
                              if select_y else int(classes[b]))
            losses = self.score_candidates(torch.stack(cand_z).to(device, self.dtype),
                                           torch.tensor(cand_y, device=device), b)
            best = int(torch.argmin(losses))  # first index on ties, as the reference
            zs.append(cand_z[best])
            ys.append(cand_y[best])
        return torch.stack(zs).to(device, self.dtype), torch.tensor(ys, dtype=torch.long, device=device)

    @torch.no_grad()
    def score_candidates(self, z: Tensor, y: Tensor, b: int) -> Tensor:
        """3-feature D loss of G(z, y) degraded by the *target* path against image b's target."""
        if self.D is None:
            raise ValueError("select_z scores candidates with D features; load a discriminator")
        self.G.load_state_dict(self.G_weight, strict=False)
        losses = []
        real = [f[b : b + 1] for f in self.real_features]
        chunk = self.config.select_chunk
        for start in range(0, z.shape[0], chunk):
            zc, yc = z[start : start + chunk], y[start : start + chunk]
            x = self.degradation.target(self.G(zc, self.G.shared(yc), use_in=False), ids=[self.ids[b]] * zc.shape[0])
            terms = feature_l1_terms(self._d_features(x, "none"), [r.expand(x.shape[0], *r.shape[1:]) for r in real])
            losses.append(terms[:, :3].sum(1))
        self.G.reset_in_init()
        return torch.cat(losses)

    # ============================================================== the batched machinery
    def render(self, z: Tensor, y: Tensor, use_in: Tensor | bool = False) -> Tensor:
        """G(z, shared(y)) with every image's own fine-tuned tensors (stacked, functional_call)."""
        tensors = {**self.trainable, **self.in_state}
        with autocast(z.device, self.perf.autocast):
            x = self._g_call(self.G, tensors, z, self.embed(y), use_in)
        return x.to(self.dtype)  # back from bf16 under perf.autocast

    def embed(self, y: Tensor) -> Tensor:
        weight = self.embed_weight
        if weight is not None:
            return weight[torch.arange(y.shape[0], device=y.device), y]
        return self.G.shared(y)

    def _d_features(self, x: Tensor, precision: str | None = None) -> list[Tensor]:
        """D's features of x; ``precision`` "none" switches autocast off (the target's features
        and select_z's ranking of candidates are computed once and must not move with it)."""
        if self.perf.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, self.perf.autocast if precision is None else precision):
            features = self._d_forward(x)[1]
        return [f.to(self.dtype) for f in features]  # L1 means over whole maps, in the run's dtype

    def _step_values(self, stages: list[Stage]) -> tuple[Tensor, Tensor, Tensor | bool]:
        """Per-image ftr_num and loss weights [4, B], the active mask and use_in, on the device.

        Decided on the host and sent in one copy (``perf.sync_free``: non-blocking, so the step
        never waits for the device); use_in is one flag when every image agrees (GBlock then
        needs no mask)."""
        device = self.z.device
        host = torch.tensor([[float(s.ftr_num) for s in stages], [s.w_D_loss for s in stages],
                             [s.w_mse for s in stages], [s.w_percep for s in stages],
                             [float(a) for a in self.progress.active().tolist()]], dtype=self.dtype)
        rows = to_device_async(host, device) if self.perf.sync_free else host.to(device)
        flags = [s.use_in for s in stages]
        use_in: Tensor | bool = flags[0] if len(set(flags)) == 1 else torch.tensor(flags).to(device)
        return rows[:4], rows[4], use_in

    def _prepare_networks(self) -> None:
        """Freeze G and D and apply the speed options (genprior.perf)."""
        for p in self.G.parameters():
            p.requires_grad_(False)
        if self.D is not None:
            self.D.eval()
            for p in self.D.parameters():
                p.requires_grad_(False)
            cache_frozen_spectral_norms(self.D, self.perf.cache_frozen_sn)
            use_fused_attention(self.D, self.perf.fused_attention)
            if self.perf.channels_last:
                self.D.to(memory_format=torch.channels_last)
        # G's output layer is shared by all images and never tuned (SPEC §6.2, quirk 1).
        cache_frozen_spectral_norms(self.G.output_layer, self.perf.cache_frozen_sn)
        use_fused_attention(self.G, self.perf.fused_attention)
        use_output_scaled_spectral_norms(self.G, self.perf.sn_scale_outputs)
        # Kept out of the module tree (a compiled D would otherwise be registered twice).
        self.__dict__["_d_forward"] = maybe_compile(self.D, self.perf.compile) if self.D is not None else None
        self._g_call = maybe_compile(_generator_call, self.perf.compile)

    # ============================================================== results
    @torch.no_grad()
    def final_render(self) -> Tensor:
        """One more forward with the final tensors, in the last stage's normalisation."""
        flag = self.stages[-1].use_in
        use_in = torch.tensor([flag] * self.batch_size, device=self.z.device) if self.batch_size > 1 else flag
        return self.render(self.z, self.y, use_in)

    def final_output(self) -> Tensor:
        """The x of each image's last forward pass, before its last update (SPEC quirk 5)."""
        return self.last_x

    def image_state(self, b: int) -> dict[str, Tensor]:
        """Image b's full fine-tuned generator state_dict (reference keys)."""
        state = {k: v.clone() for k, v in self.G_weight.items()}
        for n, t in {**self.trainable, **self.in_state}.items():
            if n in state:
                state[n] = t[b].detach().clone()
        if self.embed_weight is not None:
            state["shared.weight"] = self.embed_weight[b].detach().clone()
        return state

    def display(self, x: Tensor) -> Tensor:
        return ((x.detach() + 1) / 2).clamp(0, 1)

    def observation_for_display(self) -> Tensor:
        return self.display(self.target)

    def clean_for_display(self) -> Tensor:
        return self.display(self.target_origin)

    @torch.no_grad()
    def metrics(self, x: Tensor) -> dict[str, Tensor]:
        """SPEC §8 metrics of x against the clean image (per image, [B]).

        genprior's naming rule (docs/degradations_and_metrics.md): ``psnr``/``ssim`` are always
        the whole image and ``psnr_hole``/``ssim_hole`` the hole only. The reference's
        inpainting ``psnr``/``ssim`` (the hole crop, DGP Table 2) are ``psnr_hole``/``ssim_hole``.
        """
        if self.metric_task is None:
            return {"mse_loss_origin": (x - self.target_origin).pow(2).flatten(1).mean(1) / 4,
                    "l1_loss_origin": (x - self.target_origin).abs().flatten(1).mean(1) / 2}
        # In the run's dtype, as the reference hands float32 (float64 runs: float64) to skimage.
        whole = "reconstruct" if self.metric_task in HOLE_TASKS else self.metric_task
        out = restoration_metrics(x.detach(), self.target_origin, whole, ssim_data_range=self.ssim_data_range)
        out = {k: v for k, v in out.items() if k not in IMAGE_KEYS}
        if self.metric_task in HOLE_TASKS:
            box = self.degradation.metric_box(*x.shape[-2:])
            hole = restoration_metrics(x.detach(), self.target_origin, "inpainting", hole_box=box,
                                       ssim_data_range=self.ssim_data_range)
            out.update(psnr_hole=hole["psnr"], ssim_hole=hole["ssim"])
        return out

    @torch.no_grad()
    def extra_images(self, x: Tensor, b: int) -> dict[str, Tensor]:
        if self.metric_task != "colorization":
            return {}
        rgb = lab_recombine(self.display(x[b : b + 1]).double(), self.display(self.target_origin[b : b + 1]).double())
        return {"colorization2": rgb[0].to(x.dtype)}

    @torch.no_grad()
    def observation_metrics(self, b: int) -> dict[str, float]:
        obs, clean = self.display(self.target[b : b + 1]), self.display(self.target_origin[b : b + 1])
        return {"observation_psnr": float(psnr(obs.double(), clean.double(), data_range=1.0)[0])}

    def image_info(self, b: int) -> dict[str, Any]:
        return {"class": int(self.y[b]), "stopped_early_in_stages": [s + 1 for s in self.progress.stopped_early[b]]}


    # ============================================================== from the config
    @classmethod
    def from_config(cls, cfg: DictConfig) -> DGP:  # type: ignore[override]
        """A DGP for ``cfg``: the prior (genprior.priors.registry) in the run's dtype, the task's
        degradation and metric convention, the perceptual network when a stage uses it."""
        task = str(cfg.task.name)
        if task not in DGP_TASKS:
            raise InvalidSettingError(
                f"prior={cfg.prior.name} (a BigGAN, fitted with DGP) cannot run task.name={task!r}; "
                f"it supports the tasks {', '.join(sorted(DGP_TASKS))}: pick one with a task preset, "
                f"e.g. task=colorization, task=inpainting, task=sr4 or task=reconstruct "
                f"(presets in configs/task/, list them with --help)")
        deg_name, metric_task = DGP_TASKS[task]
        params: dict[str, Any] = {}
        if deg_name == "sr":
            params["factor"] = int(cfg.task.sr_factor)
        if deg_name == "random_mask":
            params.update(drop_fraction=float(cfg.task.mask_fraction), seed=int(cfg.seed))
        if deg_name == "mask_image":
            params["path"] = cfg.task.mask_path
        degradation = build_degradation(deg_name, int(cfg.prior.resolution), **params)
        dtype = run_dtype(cfg)
        G, D = build_biggan(cfg.prior, dtype=dtype)
        config: DGPConfig = OmegaConf.to_object(cfg.dgp)  # type: ignore[assignment]
        perceptual = None
        if any(w > 0 for w in config.w_percep):
            perceptual = PerceptualLoss(config.perceptual_weights).to(dtype)
        return cls(G, D, config, degradation, perceptual=perceptual, metric_task=metric_task,
                   ssim_data_range=float(cfg.metrics.ssim_data_range), perf=perf_settings(cfg), seed=int(cfg.seed))

def _generator_call(G: Generator, tensors: dict[str, Tensor], z: Tensor, e: Tensor,
                    use_in: Tensor | bool) -> Tensor:
    return functional_call(G, tensors, (z, e), {"use_in": use_in})


def _is_in_param(name: str) -> bool:
    return ".in1." in name or ".in2." in name


def _key(name: str) -> str:
    return name.replace(".", "__")


def _name(key: str) -> str:
    return key.replace("__", ".")


def _stack(t: Tensor, B: int, device: torch.device) -> Tensor:
    return t.detach().to(device).unsqueeze(0).repeat(B, *([1] * t.dim())).contiguous()
