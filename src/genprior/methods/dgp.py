"""Deep Generative Prior (Pan et al., ECCV 2020, Section 3) for a batch of B images.

Every image gets its own copy of the fine-tuned generator tensors (groups 0..num_blocks of
``G.get_params``: the first linear layer, every GBlock; plus the class embedding with
``update_embed``), its own latent z and its own Adam state. The copies are stacked with the
image as dimension 0 and the shared pretrained generator is run with them through
``torch.func.functional_call`` (see docs/architecture.md). The discriminator, the output layer
and all BN/SN buffers are shared: DGP never changes them (SPEC §6.2, quirk 1).

One call of :meth:`DGP.loss` plus an optimizer step is one iteration of the reference's
``DGP.run`` (SPEC §6.2) for every image still running; :class:`genprior.schedule.Progress`
moves each image through the stages on its own, so early stopping of one image does not change
the others (B > 1 gives every image its B = 1 result).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from genprior.degradations import Degradation
from genprior.losses import feature_l1_terms, l1_per_image, mse_per_image
from genprior.methods.base import SettingsAccessors
from genprior.metrics import IMAGE_KEYS, lab_recombine, psnr, restoration_metrics
from genprior.perf import PerfConfig, autocast, maybe_compile, to_device_async
from genprior.priors.biggan import (
    Discriminator,
    Generator,
    cache_frozen_spectral_norms,
    use_fused_attention,
    use_output_scaled_spectral_norms,
)
from genprior.schedule import Progress, Stage, group_lrs


@dataclass
class DGPSettings:
    """Scalars of the reference (SPEC §6, §10); per-stage values live in ``stages``."""

    stages: list[Stage]
    w_nll: float = 0.02
    select_num: int = 500
    sample_std: float = 0.3
    update_G: bool = True
    update_embed: bool = False
    warm_up: int = 0
    stop_mse: float = 0.0
    stop_ftr: float = 0.0
    betas: tuple[float, float] = (0.0, 0.999)
    eps: float = 1e-8
    select_chunk: int = 50  # candidates rendered at once by select_z
    print_interval: int = 100


@dataclass
class StepRecord:
    """Per-image values of one iteration, all ``[B]`` tensors on the host."""

    ftr_loss: Tensor
    mse_raw: Tensor
    l1_raw: Tensor
    nll: Tensor
    percep: Tensor
    total: Tensor
    active: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    def reported(self) -> dict[str, Tensor]:
        """The reference's loss dict: mse and l1 rescaled to [0,1] images (SPEC §1)."""
        return {
            "ftr_loss": self.ftr_loss,
            "nll": self.nll,
            "mse_loss": self.mse_raw / 4,
            "l1_loss": self.l1_raw / 2,
            "loss": self.total,
        }


class DGP(SettingsAccessors, nn.Module):
    """Fits B images at once; holds the shared G, D and the per-image tensors."""

    def __init__(
        self,
        G: Generator,
        D: Discriminator | None,
        settings: DGPSettings,
        degradation: Degradation,
        perceptual: nn.Module | None = None,
        metric_task: str | None = None,
        ssim_data_range: float = 2.0,
        perf: PerfConfig | None = None,
    ) -> None:
        super().__init__()
        # Execution options (genprior.perf, docs/performance.md); the defaults keep every
        # image's result to float rounding of the plain fp32 path.
        self.perf = perf if perf is not None else PerfConfig()
        self.metric_task = metric_task
        self.ssim_data_range = ssim_data_range
        self.G = G
        self.D = D
        self.settings = settings
        self.degradation = degradation
        self.perceptual = perceptual
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
        if any(s.w_D_loss > 0 for s in settings.stages) and D is None:
            raise ValueError("the schedule uses the D-feature loss (w_D_loss > 0) but no D is loaded")
        if any(s.w_percep > 0 for s in settings.stages) and perceptual is None:
            raise ValueError("the schedule uses the perceptual loss (w_percep > 0) but no network is loaded")
        # The pretrained state every image starts from (the reference's G_weight, SPEC §5).
        self.G_weight = {k: v.detach().clone() for k, v in G.state_dict().items()}
        groups = G.param_group_names(settings.update_embed)
        self.num_groups = len(G.blocks) + 1  # groups 0..B; the output layer is never tuned
        self.group_names = [
            [n for n in names if n != "shared.weight" and not _is_in_param(n)]
            for names in groups[: self.num_groups]
        ]
        self.in_names = [n for names in groups for n in names if _is_in_param(n)]
        self.in_flag_names = [n for n, _ in G.named_buffers() if n.endswith("in_initialized")]
        self.batch_size = 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype every image's tensors, losses and metrics are computed in: G's (float64
        for ``trainer.precision=64-true``, docs/faithfulness.md)."""
        return self.G.linear.weight.dtype

    # ------------------------------------------------------------------ per-batch set-up
    def start(
        self,
        images: Tensor,
        classes: Tensor,
        ids: list[str],
        generators: list[torch.Generator],
        initial_z: Tensor | None = None,
    ) -> None:
        """reset_G, set_target and select_z of the reference for a new batch (SPEC §6.1)."""
        B = images.shape[0]
        device = images.device
        # Images are preprocessed in float32 (as the reference does) and cast here.
        images = images.to(self.dtype)
        self.batch_size = B
        self.ids = list(ids)
        self.target_origin = images
        self.target = self.degradation.target(images, ids=self.ids)
        self.real_features = self._d_features(self.target, "none") if self.D is not None else None
        # reset_G: every image starts from the pretrained weights (stacked copies).
        self.G.load_state_dict(self.G_weight, strict=False)
        self.G.reset_in_init()
        self.G.eval()
        self.trainable: dict[str, Tensor] = {}
        if self.settings.update_G:
            for names in self.group_names:
                for n in names:
                    self.trainable[n] = _stack(self.G_weight[n], B, device).requires_grad_(True)
        self.embed_weight: Tensor | None = None
        # The embedding is in G's optimizer (group 0), which steps only with update_G (SPEC
        # §6.2.6): update_G=false (latent-only inversion) leaves it fixed even with update_embed.
        if self.settings.update_embed and self.settings.update_G:
            self.embed_weight = _stack(self.G_weight["shared.weight"], B, device).requires_grad_(True)
        # Instance-norm parameters and their "initialised" flags are per-image state, not
        # trained (requires_grad False in the reference, SPEC §3.4).
        self.in_state = {n: _stack(self.G_weight[n], B, device) for n in self.in_names}
        self.in_state.update(
            {n: torch.zeros(B, dtype=torch.bool, device=device) for n in self.in_flag_names}
        )
        z, y = self.select_z(classes.to(device), generators)
        if initial_z is not None:
            z = initial_z.to(device=device, dtype=self.dtype).clone()
        self.z = z.detach().clone().requires_grad_(True)
        self.y = y
        self.progress = Progress(self.settings.stages, B)
        self.last_x = torch.zeros_like(images)
        self.last_record: StepRecord | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimizer group per generator block, then the latent (and the embedding)."""
        groups: list[dict[str, Any]] = []
        if self.settings.update_G:
            for i, names in enumerate(self.group_names):
                groups.append({
                    "name": f"G{i}",
                    "params": [self.trainable[n] for n in names],
                    # Under use_in the conditional-BN linears get no gradient at all in the
                    # reference (grad None), so Adam skips them: no moment decay, no step.
                    "mask_keys": ["uses_bn" if (".bn1." in n or ".bn2." in n) else None for n in names],
                })
        groups.append({"name": "z", "params": [self.z]})
        if self.embed_weight is not None:
            # In the reference the embedding is part of group 0 (get_params(0, update_embed));
            # it only feeds the conditional BNs, so it too gets no gradient under use_in.
            groups.append({"name": "embed", "params": [self.embed_weight], "mask_keys": ["uses_bn"]})
        return groups

    def step_masks(self) -> dict[str, Tensor]:
        """Images whose tensors keyed "uses_bn" receive a gradient at the next step."""
        return {"uses_bn": torch.tensor(
            [not self.progress.current(b).use_in for b in range(self.batch_size)], dtype=torch.bool)}

    def step_lrs(self) -> dict[str, Tensor]:
        """Per-image learning rate of every group for the next step (0 for finished images)."""
        B = self.batch_size
        lrs = {f"G{i}": torch.zeros(B, dtype=torch.float64) for i in range(self.num_groups)}
        lrs["z"] = torch.zeros(B, dtype=torch.float64)
        for b in range(B):
            if self.progress.done[b]:
                continue
            # The reference increments its global step before computing the rates (§6.2).
            g, z_lr = group_lrs(self.progress.current(b), self.progress.t[b] + 1,
                                self.settings.warm_up, self.num_groups)
            for i, lr in enumerate(g):
                lrs[f"G{i}"][b] = lr
            lrs["z"][b] = z_lr
        lrs["embed"] = lrs["G0"].clone()
        return lrs

    # ------------------------------------------------------------------ forward passes
    def embed(self, y: Tensor) -> Tensor:
        if self.embed_weight is not None:
            return self.embed_weight[torch.arange(y.shape[0], device=y.device), y]
        return self.G.shared(y)

    def render(self, z: Tensor, y: Tensor, use_in: Tensor | bool = False) -> Tensor:
        """G(z, shared(y)) with every image's own fine-tuned tensors."""
        tensors = {**self.trainable, **self.in_state}
        with autocast(z.device, self.perf.autocast):
            x = self._g_call(self.G, tensors, z, self.embed(y), use_in)
        return x.to(self.dtype)  # back from bf16 under perf.autocast

    def _d_features(self, x: Tensor, precision: str | None = None) -> list[Tensor]:
        """D's features of x; ``precision`` "none" switches autocast off (the target's features
        and select_z's ranking of candidates are computed once and must not move with it)."""
        assert self._d_forward is not None
        if self.perf.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, self.perf.autocast if precision is None else precision):
            features = self._d_forward(x)[1]
        # The L1 terms are means over whole feature maps: reduce them in the run's dtype.
        return [f.to(self.dtype) for f in features]

    def loss(self) -> tuple[Tensor, StepRecord, Tensor]:
        """One iteration's forward pass: returns the summed loss, the per-image record, x."""
        B = self.batch_size
        device = self.z.device
        active = self.progress.active()
        stages = [self.progress.current(b) for b in range(B)]
        if self.perf.sync_free:
            return self._loss_sync_free(active, stages)
        use_in = torch.tensor([s.use_in for s in stages], device=device)
        weights = torch.tensor([[float(s.ftr_num) for s in stages], [s.w_D_loss for s in stages],
                                [s.w_mse for s in stages], [s.w_percep for s in stages]],
                               dtype=self.dtype, device=device)
        return self._loss_terms(weights, active.to(device), active,
                                use_in if B > 1 else bool(use_in[0]),
                                self.perceptual is not None and bool((weights[3] > 0).any()))

    def _loss_sync_free(self, active: Tensor, stages: list[Stage]) -> tuple[Tensor, StepRecord, Tensor]:
        """:meth:`loss` with every per-image schedule value decided on the host and moved to
        the device in one non-blocking copy, so the step never waits for the device (a
        blocking host-to-device copy or a ``bool(device tensor)`` drains the CUDA queue)."""
        device = self.z.device
        host = torch.tensor([
            [float(s.ftr_num) for s in stages],
            [s.w_D_loss for s in stages],
            [s.w_mse for s in stages],
            [s.w_percep for s in stages],
            [float(a) for a in active.tolist()],
        ], dtype=self.dtype)
        rows = to_device_async(host, device)
        flags = [s.use_in for s in stages]
        # One flag for the whole batch when every image agrees: GBlock then needs no mask.
        use_in: Tensor | bool = flags[0] if len(set(flags)) == 1 else to_device_async(torch.tensor(flags), device)
        return self._loss_terms(rows[:4], rows[4], active, use_in,
                                self.perceptual is not None and any(s.w_percep > 0 for s in stages))

    def _loss_terms(self, weights: Tensor, active_dev: Tensor, active: Tensor, use_in: Tensor | bool,
                    with_percep: bool) -> tuple[Tensor, StepRecord, Tensor]:
        """The step's arithmetic, shared by both paths. ``weights`` = per-image rows ftr_num,
        w_D_loss, w_mse, w_percep on the device; ``active_dev`` the active mask there (bool or
        0/1), ``active`` the host mask the record keeps."""
        B = self.batch_size
        device = self.z.device
        ftr_num, w_D, w_mse, w_percep = weights.unbind(0)
        x = self.render(self.z, self.y, use_in)
        x_map = self.degradation.apply(x, ids=self.ids)
        zeros = torch.zeros(B, device=device, dtype=self.dtype)
        # The terms in the reference's order (D features, mse, nll, l1; SPEC §6.2.5): autograd
        # then sums the gradients that reach x_map in the reference's order too.
        if self.D is not None:
            terms = feature_l1_terms(self._d_features(x_map), self.real_features)
            keep = (torch.arange(terms.shape[1], device=device)[None, :] < ftr_num[:, None]).to(terms.dtype)
            # Summed one feature at a time from 0, as DiscriminatorLoss does; each image keeps
            # its own ftr_num first features (a factor of 1 or 0 changes no rounding).
            ftr = zeros
            for j in range(terms.shape[1]):
                ftr = ftr + terms[:, j] * keep[:, j]
        else:
            ftr = zeros
        mse = mse_per_image(x_map, self.target)
        nll = self.z.pow(2).div(2).mean(1)
        l1 = l1_per_image(x_map, self.target)
        percep = self.perceptual(x_map, self.target) if with_percep else zeros
        per_image = w_D * ftr + w_mse * mse + self.settings.w_nll * nll + w_percep * percep
        total = (per_image * active_dev).sum()
        record = StepRecord(
            ftr_loss=ftr.detach(), mse_raw=mse.detach(), l1_raw=l1.detach(), nll=nll.detach(),
            percep=percep.detach(), total=per_image.detach(), active=active,
        )
        # The reference saves the x of the last forward, before the last update (quirk 5).
        keep_x = active_dev.bool().view(B, 1, 1, 1)
        self.last_x = torch.where(keep_x, x.detach(), self.last_x)
        self.last_record = record
        return total, record, x.detach()

    def end_step(self, record: StepRecord) -> list[bool]:
        """Early stopping (ends only the current stage, SPEC §6.2.9) and stage bookkeeping."""
        s = self.settings
        stop = [False] * self.batch_size
        if s.stop_mse > 0 or s.stop_ftr > 0:
            mse = record.mse_raw.cpu()
            ftr = record.ftr_loss.cpu()
            stop = [bool(mse[b] < s.stop_mse or ftr[b] < s.stop_ftr) for b in range(self.batch_size)]
        return self.progress.end_step(stop)

    # ------------------------------------------------------------------ select_z
    @torch.no_grad()
    def select_z(self, classes: Tensor, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
        """SPEC §6.1.3: pick the best of select_num random latents (and classes if unknown)."""
        s = self.settings
        B = classes.shape[0]
        device = classes.device
        dim_z = self.G.dim_z
        zs, ys = [], []
        for b in range(B):
            gen = generators[b]
            select_y = int(classes[b]) < 0
            if s.select_num <= 1:
                if select_y:
                    raise ValueError(
                        f"image {self.ids[b]!r} has no class (-1) and dgp.select_num={s.select_num}: "
                        "the class is chosen by select_z, which needs dgp.select_num >= 2"
                    )
                z = (torch.zeros(dim_z) if s.select_num == 0
                     else torch.randn(dim_z, generator=gen, dtype=torch.float32))
                zs.append(z)
                ys.append(int(classes[b]))
                continue
            cand_z, cand_y = [], []
            for _ in range(s.select_num):  # per candidate: z first, then y (SPEC §6.1.3)
                # drawn in float32 whatever the run's dtype: a float64 run starts from the
                # same latents as a float32 one (docs/faithfulness.md)
                cand_z.append(torch.randn(dim_z, generator=gen, dtype=torch.float32) * s.sample_std)
                cand_y.append(int(torch.randint(0, self.G.n_classes, (1,), generator=gen))
                              if select_y else int(classes[b]))
            losses = self.score_candidates(
                torch.stack(cand_z).to(device, self.dtype), torch.tensor(cand_y, device=device), b)
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
        for start in range(0, z.shape[0], self.settings.select_chunk):
            zc, yc = z[start : start + self.settings.select_chunk], y[start : start + self.settings.select_chunk]
            x = self.G(zc, self.G.shared(yc), use_in=False)
            x = self.degradation.target(x, ids=[self.ids[b]] * x.shape[0])
            terms = feature_l1_terms(self._d_features(x, "none"), [r.expand(x.shape[0], *r.shape[1:]) for r in real])
            losses.append(terms[:, :3].sum(1))
        self.G.reset_in_init()
        return torch.cat(losses)

    # ------------------------------------------------------------------ results
    @torch.no_grad()
    def final_render(self) -> Tensor:
        """One more forward with the final tensors, in the last stage's normalisation."""
        use_in = torch.tensor([self.settings.stages[-1].use_in] * self.batch_size, device=self.z.device)
        return self.render(self.z, self.y, use_in if self.batch_size > 1 else bool(use_in[0]))

    def image_state(self, b: int) -> dict[str, Tensor]:
        """Image b's full fine-tuned generator state_dict (reference keys), z and y."""
        state = {k: v.clone() for k, v in self.G_weight.items()}
        for n, t in {**self.trainable, **self.in_state}.items():
            if n in state:
                state[n] = t[b].detach().clone()
        if self.embed_weight is not None:
            state["shared.weight"] = self.embed_weight[b].detach().clone()
        return state


    # ------------------------------------------------------------------ reporting
    @staticmethod
    def display(x: Tensor) -> Tensor:
        return ((x.detach() + 1) / 2).clamp(0, 1)

    def observation_for_display(self) -> Tensor:
        return self.display(self.target)

    def clean_for_display(self) -> Tensor:
        return self.display(self.target_origin)

    def final_output(self) -> Tensor:
        """The x of each image's last forward pass, before its last update (SPEC quirk 5)."""
        return self.last_x

    @torch.no_grad()
    def metrics(self, x: Tensor) -> dict[str, Tensor]:
        """SPEC §8 metrics of x against the clean image (per image, [B])."""
        if self.metric_task is None:
            return {
                "mse_loss_origin": (x - self.target_origin).pow(2).flatten(1).mean(1) / 4,
                "l1_loss_origin": (x - self.target_origin).abs().flatten(1).mean(1) / 2,
            }
        hole = self.degradation.metric_box(*x.shape[-2:]) if self.metric_task == "inpainting" else None
        # In the run's dtype, as the reference hands float32 (float64 runs: float64) to skimage.
        out = restoration_metrics(x.detach(), self.target_origin, self.metric_task,
                                  hole_box=hole, ssim_data_range=self.ssim_data_range)
        return {k: v for k, v in out.items() if k not in IMAGE_KEYS}

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
        return {
            "class": int(self.y[b]),
            "stopped_early_in_stages": [s + 1 for s in self.progress.stopped_early[b]],
        }


def _generator_call(G: Generator, tensors: dict[str, Tensor], z: Tensor, e: Tensor,
                    use_in: Tensor | bool) -> Tensor:
    return functional_call(G, tensors, (z, e), {"use_in": use_in})


def _is_in_param(name: str) -> bool:
    return ".in1." in name or ".in2." in name


def _stack(t: Tensor, B: int, device: torch.device) -> Tensor:
    return t.detach().to(device).unsqueeze(0).repeat(B, *([1] * t.dim())).contiguous()
