"""Network inversion with Deep Image Prior or the TV-norm prior (DIP paper §4.5-4.7), B at a time.

Three objectives (``inversion.objective``) on an image x in [0, 1]:

- ``preimage``: the natural pre-image of Mahendran & Vedaldi (CVPR 2015): minimise
  ‖Φ_L(x) − Φ_L(x0)‖² / ‖Φ_L(x0)‖² (their normalised data term) for a classifier's layer L;
- ``activation``: activation maximisation: minimise −Φ(x)_m, m the image's class (``fc``:
  the m-th output; conv: the central pixel of channel m), the fc8 logits before the soft-max;
- ``reconstruction``: ‖x − x0‖² (mean), the paper's eq. 2 with the image itself as target,
  for image enhancement: the output after t steps is the coarse image x_c(t), and
  ``extra_images`` adds the boosted image x_e = x0 + (x0 − x_c) (clipped to [0, 1]).

Two parametrisations (``prior.kind``):

- ``dip``: x = f_θ(z̃), a ``skip`` network per image (stacked, genprior.priors.dip_nets), fixed
  z ~ U(0, 0.1) and z̃ = z + σ_p ε; the network works at the image size rounded up to a
  multiple of 2^levels and x is its top-left image_size × image_size crop (SPEC §8.7);
- ``tv``: x itself is optimised (M&V's TV-norm baseline): the objective plus
  λ · mean over pixels of ((∂_h x)² + (∂_v x)²)^(β/2) with M&V's β = 2, and x projected on
  [0, 1] after every step (their bounded-range constraint, in place of their α-norm term).

One step (genprior.engine.step): ``step_lrs`` (constant Adam rate), ``loss``, backward, the
per-image Adam step, ``end_step`` (the TV projection, the enhancement frames, the schedule).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from genprior.errors import InvalidSettingError
from genprior.features import FeatureExtractor, build_classifier, select_unit
from genprior.items import ImageBatch, StepRecord, step_seed
from genprior.methods.base import Method, Progress
from genprior.metrics import psnr
from genprior.optim import PerImageAdam
from genprior.precision import run_dtype
from genprior.priors.dip_nets import (
    StackedNets,
    get_noise,
    skip,
    skip_kwargs_from,
    skip_output_size_for,
    to_dtype,
    tv_loss,
)

__all__ = ["INVERSION_TASKS", "OBJECTIVES", "PARAMETRISATIONS", "Inversion", "InversionConfig"]

OBJECTIVES = ("preimage", "activation", "reconstruction")
PARAMETRISATIONS = ("dip", "tv")
# task.name values run by genprior.tasks.inversion (prior.kind dip or tv picks this method)
INVERSION_TASKS = ("dip_preimage", "dip_activation_maximization", "dip_enhancement",
                   "tv_preimage", "tv_activation_maximization")
ALEXNET_LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]


@dataclass
class InversionConfig:
    """The ``inversion`` config section. Defaults: the feature-inversion notebook (SPEC §8.7,
    DIP supplementary "Natural pre-image") on AlexNet's fc6."""

    objective: str = "preimage"  # preimage | activation | reconstruction (enhancement)
    classifier: str = "alexnet"  # alexnet | vgg16 | vgg19 (genprior.features)
    # torchvision's published file; None: <torch hub dir>/checkpoints/<file>; "random": seeded init
    classifier_weights: str | None = None
    layer: str = "fc6"  # Φ's layer of one fit (the tasks set it from ``layers``)

    # What the tasks fit (genprior.tasks.inversion)
    layers: list[str] = field(default_factory=lambda: list(ALEXNET_LAYERS))  # pre-image columns
    priors: list[str] = field(default_factory=lambda: ["dip", "tv"])  # sheet rows
    # activation maximisation: one unit per entry (fc: class index; conv: channel)
    classes: list[int] = field(default_factory=lambda: [130, 309, 417, 980])
    frames: list[int] = field(default_factory=lambda: [250, 500, 2500, 7000])  # enhancement

    num_iter: int = 3100
    lr: float = 0.001  # DIP's Adam rate (0.01 for fc8 activation maximisation)

    # DIP: z and the skip network (SPEC §8.7, feature inversion)
    input_depth: int = 32
    input_var: float = 0.1  # z ~ U(0, input_var)
    reg_noise_std: float = 0.0  # σ_p (activation maximisation: 0.03)
    num_channels_down: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 128, 128])
    num_channels_up: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 128, 128])
    num_channels_skip: list[int] = field(default_factory=lambda: [4] * 6)
    filter_size_down: list[int] = field(default_factory=lambda: [7, 7, 5, 5, 3, 3])
    filter_size_up: list[int] = field(default_factory=lambda: [7, 7, 5, 5, 3, 3])
    filter_skip_size: int = 1
    pad: str = "zero"
    upsample_mode: list[str] = field(default_factory=lambda: ["nearest"])
    downsample_mode: list[str] = field(default_factory=lambda: ["avg"])
    act_fun: str = "LeakyReLU"
    need1x1_up: bool = True

    # TV-norm baseline (Mahendran & Vedaldi): x optimised directly
    tv_weight: float = 1.0  # λ on the per-pixel mean TV^β (see docs/inversion.md)
    tv_beta: float = 2.0  # M&V's β
    tv_lr: float = 0.01  # Adam rate on the pixels
    tv_init: float = 0.1  # x starts at 0.5 + U(-tv_init, tv_init)

    batched_forward: str = "auto"  # StackedNets: auto | loop | vmap (execution only)

    def skip_kwargs(self, num_output_channels: int = 3) -> dict[str, Any]:
        """Keyword arguments of ``genprior.priors.dip_nets.skip`` (input: ``input_depth``)."""
        return skip_kwargs_from(self, self.input_depth, num_output_channels, "inversion")

    def net_size(self, size: int) -> int:
        """The DIP network's working size: ``size`` rounded up to a multiple of 2^levels (the
        notebook runs its net at 256 for AlexNet's 227 and crops the output), and at least
        2^(levels+1), so that the deepest level's train-mode BatchNorm sees 2x2 values; the
        next multiple while the net cannot map that size to itself (reflection pads need room)."""
        multiple = 2 ** len(self.num_channels_down)
        net = max(-(-size // multiple) * multiple, 2 * multiple)
        kwargs = self.skip_kwargs()
        for _ in range(16):
            try:
                if skip_output_size_for(net, net, kwargs) == (net, net):
                    return net
            except ValueError:
                pass
            net += multiple
        raise InvalidSettingError(f"the inversion skip network cannot map any size from {size} to "
                                  f"{net} to itself; change its filters or levels")


class Inversion(Method):
    """Fits B images (or B units) at once with per-image DIP networks or per-image pixels.

    ``extractor`` is Φ_L (None for ``reconstruction``), shared and frozen; ``parametrisation``
    is "dip" or "tv". Every image's network, z and TV start are drawn under the run's seed, so
    an image's result does not depend on its batch.
    """

    preprocessing: ClassVar[str] = "none"  # images at data.image_size, as DIP's

    def __init__(self, settings: InversionConfig, parametrisation: str = "dip",
                 extractor: FeatureExtractor | None = None, dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> None:
        super().__init__()
        if settings.objective not in OBJECTIVES:
            raise InvalidSettingError(f"inversion.objective must be one of {', '.join(OBJECTIVES)}, "
                                      f"got {settings.objective!r}")
        if parametrisation not in PARAMETRISATIONS:
            raise InvalidSettingError(f"network inversion takes prior.kind dip or tv, got {parametrisation!r}")
        if settings.objective != "reconstruction" and extractor is None:
            raise ValueError(f"objective {settings.objective!r} needs a feature extractor")
        if settings.objective == "reconstruction" and any(t > settings.num_iter for t in settings.frames):
            raise InvalidSettingError(f"inversion.frames {list(settings.frames)} must not exceed "
                                      f"inversion.num_iter={settings.num_iter}")
        self.settings = settings
        self.parametrisation = parametrisation
        self.dtype = dtype
        self.seed = int(seed)
        self.extractor = extractor.to(dtype) if extractor is not None else None
        self.ids: list[str] = []

    @classmethod
    def from_config(cls, cfg: Any, classifier: nn.Module | None = None) -> Inversion:
        """The method for ``cfg``: the ``inversion`` section, ``prior.kind`` (dip | tv), the run's
        dtype and seed. ``classifier``: an already built network (the tasks load it once)."""
        settings = InversionConfig(**OmegaConf.to_container(cfg.inversion, resolve=True))  # type: ignore[arg-type]
        extractor = None
        if settings.objective != "reconstruction":
            if classifier is None:
                classifier = build_classifier(settings.classifier, settings.classifier_weights, int(cfg.seed))
            extractor = FeatureExtractor(settings.classifier, classifier, settings.layer)
        return cls(settings, str(cfg.prior.kind), extractor, dtype=run_dtype(cfg), seed=int(cfg.seed))

    @classmethod
    def image_size(cls, cfg: Any) -> int:
        return int(cfg.data.image_size)

    def stage_lengths(self) -> list[int]:
        return [int(self.settings.num_iter)]

    @property
    def print_interval(self) -> int:
        return max(1, int(self.settings.num_iter) // 10)

    # ============================================================== one step
    def step_lrs(self) -> dict[str, Tensor]:
        """Constant Adam rate (no schedule in the notebooks); 0 once an image is done."""
        lr = self.settings.lr if self.parametrisation == "dip" else self.settings.tv_lr
        return {"params": self.progress.active().to(torch.float64) * lr}

    def loss(self) -> tuple[Tensor, StepRecord, Tensor | None]:
        """x (``render``), the objective's data term per image, + λ·TV^β for the TV prior."""
        x = self.render(self.step_count)
        self.step_count += 1
        data = self.data_term(x)
        terms: dict[str, Tensor] = {}
        total = data
        if self.parametrisation == "tv":
            tv = self.tv_term(x)
            total = data + self.settings.tv_weight * tv
            terms["tv"] = tv.detach()
        terms = {"loss": total.detach(), "data": data.detach(), **terms}
        record = StepRecord(total=total.detach(), active=self.progress.active(), terms=terms)
        return total.sum(), record, x.detach()

    def end_step(self, record: StepRecord) -> list[bool]:
        """The TV prior's projection on [0, 1]; the enhancement frames after t updates."""
        with torch.no_grad():
            if self.parametrisation == "tv":
                self.pixels.clamp_(0.0, 1.0)
            if self.settings.objective == "reconstruction" and self.step_count in self.settings.frames:
                self.frames[self.step_count] = self.render(None).detach().clamp(0, 1)
        return self.progress.advance([False] * self.batch_size)

    def render(self, step: int | None) -> Tensor:
        """x for this step: f_θ(z + σ_p ε_step) cropped top-left (DIP), or the pixels (TV).
        ``step`` None: the unperturbed z (the final output and the frames)."""
        if self.parametrisation == "tv":
            return self.pixels
        z = self.net_input
        if step is not None and self.settings.reg_noise_std > 0:
            z = z + self.perturbation(step) * self.settings.reg_noise_std
        size = self.size
        return self.nets(z)[..., :size, :size]

    def perturbation(self, step: int) -> Tensor:
        """ε ~ N(0, 1) of a step, a function of (seed, step) only, drawn in float32."""
        gen = torch.Generator().manual_seed(step_seed(self.seed, step))
        eps = torch.randn(self.net_input.shape[1:], generator=gen, dtype=torch.float32)
        return eps.to(self.net_input.device, self.net_input.dtype).expand_as(self.net_input)

    def data_term(self, x: Tensor) -> Tensor:
        objective = self.settings.objective
        if objective == "reconstruction":
            return (x - self.x0).square().flatten(1).mean(1)
        assert self.extractor is not None
        phi = self.extractor(x)
        if objective == "activation":
            return -select_unit(phi, self.units)
        return (phi - self.phi0).square().flatten(1).sum(1) / self.phi0_norm

    def tv_term(self, x: Tensor) -> Tensor:
        """Per image, the mean of ((∂_h x)² + (∂_v x)²)^(β/2) (tv_loss's exponent is on the sum
        of squares, hence β/2), over channels and the (H−1)×(W−1) positions."""
        count = x.shape[1] * (x.shape[2] - 1) * (x.shape[3] - 1)
        return torch.stack([tv_loss(xb[None], self.settings.tv_beta / 2) for xb in x]) / count

    def make_optimizer(self, fused: bool = True) -> PerImageAdam:
        """Adam (betas (0.9, 0.999), eps 1e-8) per image, over the network weights (DIP) or
        the pixels (TV)."""
        params = list(self.nets.parameters()) if self.parametrisation == "dip" else [self.pixels]
        return PerImageAdam([{"name": "params", "params": params}], batch_size=self.batch_size,
                            betas=(0.9, 0.999), eps=1e-8, fused=fused)

    # ============================================================== a new batch
    def start(self, batch: ImageBatch) -> None:
        """The images' targets (x0, Φ(x0)) or units, and their networks / pixels."""
        s, device, dtype = self.settings, self.device, self.dtype
        images = batch.images.detach().to(device, dtype)
        b, c, h, w = images.shape
        if h != w:
            raise ValueError(f"network inversion takes square images, got {h}x{w}")
        self.ids = list(batch.ids)
        self.size = h
        self.register_buffer("x0", ((images + 1) / 2).clamp(0, 1))
        self.register_buffer("units", batch.classes.to(device))
        if s.objective == "preimage":
            assert self.extractor is not None
            with torch.no_grad():
                phi0 = self.extractor(self.x0)
            self.register_buffer("phi0", phi0)
            self.register_buffer("phi0_norm", phi0.square().flatten(1).sum(1).clamp_min(1e-30))
        elif s.objective == "activation":
            assert self.extractor is not None
            with torch.no_grad():
                width = self.extractor(self.x0[:1]).shape[1]
            bad = [int(u) for u in batch.classes if not 0 <= int(u) < width]
            if bad:
                raise InvalidSettingError(f"units {bad} are out of range for {s.classifier} "
                                          f"{s.layer} ({width} units)")

        if self.parametrisation == "dip":
            kwargs = s.skip_kwargs(c)
            net_size = s.net_size(h)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)  # net first, then z (the notebooks' order)
                net = to_dtype(skip(**kwargs, dtype=torch.float32), dtype)
                z = get_noise(s.input_depth, "noise", (net_size, net_size), "u", s.input_var,
                              dtype=torch.float32)
            self.nets = StackedNets.replicate(net, b, s.batched_forward).to(device)
            self.register_buffer("net_input", z.to(device, dtype).expand(b, -1, -1, -1).clone())
        else:
            gen = torch.Generator().manual_seed(self.seed)
            start = 0.5 + (torch.rand((1, c, h, w), generator=gen) * 2 - 1) * s.tv_init
            self.pixels = nn.Parameter(start.to(device, dtype).expand(b, -1, -1, -1).clone())
        self.frames: dict[int, Tensor] = {}
        self.step_count = 0
        self.progress = Progress(self.stage_lengths(), b)

    # ============================================================== results
    @torch.no_grad()
    def final_output(self) -> Tensor:
        return self.render(None).detach()

    def display(self, x: Tensor) -> Tensor:
        return x.detach().clamp(0, 1)

    def observation_for_display(self) -> Tensor:
        return self.x0

    def clean_for_display(self) -> Tensor | None:
        return None if self.settings.objective == "activation" else self.x0

    @torch.no_grad()
    def metrics(self, x: Tensor) -> dict[str, Tensor]:
        """preimage: the normalised feature loss; activation: the unit; reconstruction: PSNR."""
        objective = self.settings.objective
        if objective == "reconstruction":
            return {"psnr": psnr(x.clamp(0, 1), self.x0)}
        value = self.data_term(x)
        return {"feature_loss": value} if objective == "preimage" else {"unit_activation": -value}

    def extra_images(self, x: Tensor, b: int) -> dict[str, Tensor]:
        """Enhancement: the coarse image x_c(t) and the boosted x0 + (x0 − x_c(t)) per frame."""
        out: dict[str, Tensor] = {}
        for t, frame in sorted(self.frames.items()):
            out[f"coarse_{t}"] = frame[b]
            out[f"enhanced_{t}"] = enhance(self.x0[b], frame[b])
        return out

    def image_info(self, b: int) -> dict[str, Any]:
        s = self.settings
        info: dict[str, Any] = {"objective": s.objective, "prior_kind": self.parametrisation}
        if s.objective != "reconstruction":
            info.update(classifier=s.classifier, layer=s.layer)
        if s.objective == "activation":
            info["unit"] = int(self.units[b])
        return info

    def extra_repr(self) -> str:
        return f"{self.parametrisation}, images={self.batch_size}, dtype={self.dtype}, settings={asdict(self.settings)}"


def enhance(x0: Tensor, coarse: Tensor) -> Tensor:
    """The paper's detail enhancement: x_f = x0 − x_c, x_e = x0 + x_f, clipped to [0, 1]."""
    return (x0 + (x0 - coarse)).clamp(0, 1)
