"""Every prior genprior knows, by name: one name -> spec table and the builders (timm-style).

A :class:`PriorSpec` says which method fits the prior (``kind``: "biggan" for DGP, "pggan"
for mGANprior, "dip" for Deep Image Prior), the resolution it generates, its networks'
constructor kwargs, and the names of its published files with where to get them. ``prior.name``
in a config is a key of :data:`REGISTRY`::

    from genprior.priors import registry

    registry.names("pggan")                       # ['pggan_celebahq', 'pggan_bedroom', ...]
    spec = registry.get("biggan256")              # PriorSpec(kind='biggan', resolution=256, ...)
    G = registry.build("biggan_tiny")             # the network, constructor (random) init
    G, D = registry.load_biggan("biggan128", weights_dir="pretrained")   # published weights
    G = registry.load_pggan("pggan_bedroom", weights_dir="pretrained")

The registry sits on top of the priors package: it imports the networks (``biggan``,
``pggan``, ``dip_nets``) and the checkpoint loader (``checkpoints``); none of them imports it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import torch
from torch import nn

from genprior.errors import UserError
from genprior.priors.biggan import Discriminator, Generator, orthogonal_init_
from genprior.priors.checkpoints import (
    DGP_RELEASE,
    DGP_SOURCE,
    PATH_KEY,
    WEIGHTS_DIR_KEY,
    CheckpointError,
    KnownModels,
    biggan_file_names,
    load_checkpoint_into,
    missing_biggan_files_error,
    missing_pggan_file_error,
    pggan_source,
)
from genprior.priors.dip_nets import skip
from genprior.priors.pggan import PGGANGenerator

__all__ = [
    "KINDS",
    "REGISTRY",
    "PriorSpec",
    "UnknownPriorError",
    "build",
    "build_biggan",
    "build_dip",
    "build_discriminator",
    "build_generator",
    "build_pggan",
    "find_pggan_file",
    "get",
    "known_models",
    "load_biggan",
    "load_pggan",
    "names",
]

KINDS = ("biggan", "pggan", "dip", "tv")


class UnknownPriorError(ValueError, UserError):
    """A prior name that is not in the registry (or not of the kind asked for)."""


@dataclass(frozen=True)
class PriorSpec:
    """One named prior.

    kind: the method that fits it ("biggan": DGP, "pggan": mGANprior, "dip": DIP, "tv": the
    TV-norm baseline of DIP's network inversion, methods/inversion.py).
    resolution: the generated image size; None for DIP, which works at the image's own size.
    kwargs: constructor kwargs of the generator (``Generator``, ``PGGANGenerator``; DIP:
    ``dip_nets.skip``, whose widths the DIP method sets per task).
    d_kwargs: the BigGAN discriminator's constructor kwargs; None when there is none.
    files: the published files by role ("G_ema", "G", "D" for BigGAN; "G" for PGGAN); empty
    when nothing is published (the tiny test models, DIP). source: where to get them.
    suffix: BigGAN's file suffix (the reference's --load_weights). original: the official
    PGGAN TensorFlow pickle the published file is converted from.
    """

    name: str
    kind: str
    resolution: int | None
    kwargs: Mapping[str, Any]
    d_kwargs: Mapping[str, Any] | None = None
    files: Mapping[str, str] = field(default_factory=dict)
    source: str | None = None
    summary: str = ""
    dataset: str | None = None
    suffix: str | None = None
    original: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"prior kind must be one of {KINDS}, got {self.kind!r}")
        # Read-only views: a builder's overrides never leak into the table.
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))
        if self.d_kwargs is not None:
            object.__setattr__(self, "d_kwargs", MappingProxyType(dict(self.d_kwargs)))
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))

    @property
    def has_discriminator(self) -> bool:
        return self.d_kwargs is not None

    @property
    def published(self) -> bool:
        """Whether files with pretrained weights exist for this prior."""
        return bool(self.files)

    def describe(self) -> str:
        return f"{self.name} ({self.summary})" if self.summary else self.name


def _biggan(name: str, resolution: int, ch: int, suffix: str | None, with_d: bool = True) -> PriorSpec:
    files = biggan_file_names(suffix) if suffix is not None else {}
    if not with_d:
        files.pop("D", None)
    return PriorSpec(
        name,
        "biggan",
        resolution,
        {"resolution": resolution, "G_ch": ch},
        d_kwargs={"resolution": resolution, "D_ch": ch} if with_d else None,
        files=files,
        source=DGP_SOURCE if suffix is not None else None,
        summary=f"resolution {resolution}, channel width {ch}",
        dataset="imagenet",
        suffix=suffix,
    )


def _pggan(
    name: str,
    resolution: int,
    dataset: str,
    weight_file: str | None,
    tf_pickle: str | None,
    fmaps_base: int = 16384,
    fmaps_max: int = 512,
) -> PriorSpec:
    return PriorSpec(
        name,
        "pggan",
        resolution,
        {"resolution": resolution, "fmaps_base": fmaps_base, "fmaps_max": fmaps_max},
        files={"G": weight_file} if weight_file else {},
        source=pggan_source(tf_pickle, weight_file) if weight_file and tf_pickle else None,
        summary=f"{dataset}, {resolution}x{resolution}",
        dataset=dataset,
        original=tf_pickle,
    )


def _lsun(word: str, pickle_word: str | None = None) -> PriorSpec:
    return _pggan(f"pggan_{word}", 256, f"lsun-{word}", f"pggan_{word}256_generator.pth",
                  f"karras2018iclr-lsun-{pickle_word or word}-256x256.pkl")


REGISTRY: dict[str, PriorSpec] = {
    s.name: s
    for s in (
        # BigGAN, DGP release (DGP SPEC §5): G_ema_<suffix>.pth, G_<suffix>.pth, D_<suffix>.pth.
        _biggan("biggan128", 128, 96, "128"),
        _biggan("biggan256", 256, 96, "256"),
        _biggan("biggan256_ch64", 256, 64, "ch64_256"),
        # The reference defines no discriminator at 512 (DGP SPEC §4).
        _biggan("biggan512", 512, 96, "512", with_d=False),
        _biggan("biggan_tiny", 128, 8, None),  # tests only: no published files
        # PGGAN: the PGGAN part of mGANprior's models/model_settings.py (mGANprior SPEC §1.4).
        # mGANprior's scripts use pggan_bedroom, pggan_churchoutdoor and pggan_celebahq.
        _pggan("pggan_celebahq", 1024, "celebahq", "pggan_celebahq1024_generator.pth",
               "karras2018iclr-celebahq-1024x1024.pkl"),
        _lsun("bedroom"),
        _lsun("livingroom"),
        _lsun("diningroom", "dining_room"),
        _lsun("kitchen"),
        _lsun("churchoutdoor"),
        _lsun("tower"),
        _lsun("bridge"),
        _lsun("restaurant"),
        _lsun("classroom"),
        _lsun("conferenceroom"),
        *(_lsun(w) for w in ("person", "cat", "dog", "bird", "horse", "sheep", "cow", "car",
                             "bicycle", "motorbike", "bus", "train", "boat", "airplane", "bottle",
                             "chair", "pottedplant", "tvmonitor", "diningtable", "sofa")),
        # Tests only: the parity fixture's widths (1/16 of the real ones), no published file.
        _pggan("pggan_tiny", 256, "random", None, None, fmaps_base=1024, fmaps_max=32),
        # DIP: an untrained network, no weights. kwargs {} are skip()'s defaults (the
        # reference's models/skip.py); the DIP method passes each task's widths (DIPConfig).
        PriorSpec("dip_skip", "dip", None, {}, summary="Deep Image Prior skip network, untrained"),
        # Mahendran & Vedaldi's TV-norm prior: no network, the image's pixels are optimised
        PriorSpec("tv", "tv", None, {}, summary="TV-norm prior (no network: the pixels are optimised)"),
    )
}


# --------------------------------------------------------------------------------------------
# Looking up
# --------------------------------------------------------------------------------------------


def names(kind: str | None = None) -> list[str]:
    """The registered names, all or those of one ``kind``, in table order."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"prior kind must be one of {KINDS}, got {kind!r}")
    return [n for n, s in REGISTRY.items() if kind is None or s.kind == kind]


def get(name: str, kind: str | None = None) -> PriorSpec:
    """The spec of ``name``; with ``kind``, it must be a prior of that kind."""
    spec = REGISTRY.get(name)
    known = names(kind)
    if spec is not None and (kind is None or spec.kind == kind):
        return spec
    if spec is not None:
        raise UnknownPriorError(
            f"{name!r} is a {spec.kind} prior, not a {kind} one; {kind} priors: {', '.join(known)}"
        )
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    what = f"{kind} prior" if kind else "prior"
    raise UnknownPriorError(f"unknown {what} {name!r}.{hint} Known: {', '.join(known)}")


def known_models(kind: str) -> KnownModels:
    """name -> role -> constructor kwargs of the priors of ``kind``: what the checkpoint
    loader names when a file fits another registered configuration."""
    return {
        n: {"G": s.kwargs, **({"D": s.d_kwargs} if s.d_kwargs is not None else {})}
        for n, s in REGISTRY.items()
        if s.kind == kind
    }


# --------------------------------------------------------------------------------------------
# Building with the constructors' random init
# --------------------------------------------------------------------------------------------


def build(name: str, **overrides: Any) -> nn.Module:
    """The named prior's network (BigGAN or PGGAN generator, DIP ``skip`` net) with its
    constructor's random init; ``overrides`` update the spec's constructor kwargs. The TV prior
    has no network (its method optimises the pixels): ValueError."""
    spec = get(name)
    if spec.kind == "tv":
        raise ValueError(f"prior {name!r} has no network: the TV-norm baseline optimises the image's "
                         "pixels (methods/inversion.py)")
    factory: Callable[..., nn.Module] = {
        "biggan": Generator,
        "pggan": PGGANGenerator,
        "dip": skip,
    }[spec.kind]
    return factory(**{**spec.kwargs, **overrides})


def _discriminator_kwargs(spec: PriorSpec) -> Mapping[str, Any]:
    if spec.d_kwargs is None:
        raise CheckpointError(
            f"{spec.name} has no discriminator: the reference defines D only for 128 and "
            "256 (SPEC §4); use a loss without D features or need_D=False"
        )
    return spec.d_kwargs


def build_generator(name_or_kwargs: str | Mapping[str, Any]) -> Generator:
    """A BigGAN Generator from a registry name (``biggan128``, ...) or from constructor kwargs."""
    if isinstance(name_or_kwargs, str):
        return Generator(**get(name_or_kwargs, "biggan").kwargs)
    return Generator(**dict(name_or_kwargs))


def build_discriminator(name_or_kwargs: str | Mapping[str, Any]) -> Discriminator:
    """A BigGAN Discriminator from a registry name or from constructor kwargs."""
    if isinstance(name_or_kwargs, str):
        return Discriminator(**_discriminator_kwargs(get(name_or_kwargs, "biggan")))
    return Discriminator(**dict(name_or_kwargs))


def build_pggan(spec: str | Mapping[str, Any] | None = None, **kwargs: Any) -> PGGANGenerator:
    """A PGGAN generator from a registry name or constructor kwargs (``kwargs`` override)."""
    if isinstance(spec, str):
        return PGGANGenerator(**{**get(spec, "pggan").kwargs, **kwargs})
    return PGGANGenerator(**{**(spec or {}), **kwargs})


def build_dip(name: str = "dip_skip", **overrides: Any) -> nn.Sequential:
    """The DIP ``skip`` network of ``name``, ``overrides`` updating its constructor kwargs."""
    return skip(**{**get(name, "dip").kwargs, **overrides})


# --------------------------------------------------------------------------------------------
# Building with published weights
# --------------------------------------------------------------------------------------------


def _build_biggan(
    role: str, spec: Mapping[str, Any], device: torch.device | None, fast: bool
) -> nn.Module:
    cls = Generator if role == "G" else Discriminator
    if not fast:
        with torch.device(device or "cpu"):
            return cls(**spec)
    # Every tensor comes from the file: skip the random init of ~100M weights and allocate
    # uninitialised storage instead. Only G's in1/in2 and IN flags are absent from the file.
    with torch.device("meta"):
        model = cls(**spec)
    model = model.to_empty(device=device or "cpu")
    if isinstance(model, Generator):
        model.reset_instance_norm_()
    return model


def load_biggan(
    name: str | Mapping[str, Any],
    weights_dir: str | Path | None = None,
    g_path: str | Path | None = None,
    d_path: str | Path | None = None,
    use_ema: bool = True,
    need_D: bool = True,
    strict: bool = True,
    map_location: Any = "cpu",
    random_G: bool = False,
) -> tuple[Generator, Discriminator | None]:
    """Build the named BigGAN and load its published weights.

    ``name`` is a registry name or Generator kwargs (D then gets the same resolution and width).

    Files come from ``g_path``/``d_path`` if given, else from ``weights_dir`` with the
    reference's names. Both models end in eval mode (SPEC §5). With ``random_G`` nothing is
    loaded: G is orthogonally initialised and left in train mode, and D keeps its random
    constructor init (SPEC §5, §12.16).
    """
    if isinstance(name, str):
        spec = get(name, "biggan")
        g_kwargs: Mapping[str, Any] = spec.kwargs
        d_kwargs = spec.d_kwargs
        label = spec.describe()
        files = spec.files
        if need_D:
            d_kwargs = _discriminator_kwargs(spec)  # raises the explanatory error
    else:
        g_kwargs = dict(name)
        d_kwargs = {"resolution": g_kwargs.get("resolution", 128), "D_ch": g_kwargs.get("G_ch", 96)}
        label = f"BigGAN (resolution {d_kwargs['resolution']}, channel width {d_kwargs['D_ch']})"
        files = {}
    device = torch.device(map_location) if isinstance(map_location, str | torch.device) else None

    if random_G:
        G = cast(Generator, _build_biggan("G", g_kwargs, device, fast=False))
        orthogonal_init_(G)
        G.train()
        D = None
        if need_D:
            assert d_kwargs is not None
            D = cast(Discriminator, _build_biggan("D", d_kwargs, device, fast=False)).eval()
        return G, D

    if g_path is None or (need_D and d_path is None):
        if weights_dir is None or not files:
            raise CheckpointError(
                f"no checkpoint files for {label}: set prior.G_path and prior.D_path to "
                f"state dict files (or use prior.weights=random)"
                + (
                    f", or set {WEIGHTS_DIR_KEY} to the directory holding the files published by "
                    f"https://{DGP_RELEASE}"
                    if files
                    else " (this configuration has no published files)"
                )
            )
        root = Path(weights_dir).expanduser()
        g_path = g_path or root / files["G_ema" if use_ema else "G"]
        if need_D:
            d_path = d_path or root / files["D"]
    needed = [Path(g_path)] + ([Path(d_path)] if need_D and d_path is not None else [])
    absent = [p for p in needed if not p.is_file()]
    if absent:
        raise missing_biggan_files_error(absent, Path(weights_dir) if weights_dir else None)

    known = known_models("biggan")
    G = cast(Generator, _build_biggan("G", g_kwargs, device, fast=strict))
    load_checkpoint_into(G, g_path, role="G", strict=strict, map_location=map_location,
                         label=f"generator {label}", known=known)
    G.eval()
    D: Discriminator | None = None
    if need_D:
        assert d_path is not None and d_kwargs is not None
        D = cast(Discriminator, _build_biggan("D", d_kwargs, device, fast=strict))
        load_checkpoint_into(D, d_path, role="D", strict=strict, map_location=map_location,
                             label=f"discriminator {label}", known=known)
        D.eval()
    return G, D


def build_biggan(
    prior: Mapping[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    need_D: bool | None = None,
) -> tuple[Generator, Discriminator | None]:
    """BigGAN G (and D) for a ``prior`` config section, on ``device`` in ``dtype``.

    ``prior.weights``: "pretrained" loads the published files (:func:`load_biggan` with
    ``name``, ``weights_dir``, ``G_path``, ``D_path``, ``use_ema``); "random" seeds torch's
    global generator with ``init_seed`` and draws the reference's orthogonal init for G and D
    built from the section's ``resolution``, ``G_ch``, ``D_ch``, ``dim_z``, ``shared_dim``,
    ``n_classes``. ``random_G`` (the reference's --random_G) does the same and leaves G in train
    mode. need_D: default all but 512 (no D exists there). The float32 weights are copied
    exactly into a float64 model.
    """
    p = prior
    need_D = int(p["resolution"]) != 512 if need_D is None else need_D
    if p["weights"] == "random" or p["random_G"]:
        torch.manual_seed(int(p["init_seed"]))
        G = orthogonal_init_(Generator(
            resolution=p["resolution"], G_ch=p["G_ch"], dim_z=p["dim_z"],
            shared_dim=p["shared_dim"], n_classes=p["n_classes"]))
        D = orthogonal_init_(Discriminator(
            resolution=p["resolution"], D_ch=p["D_ch"], n_classes=p["n_classes"])) if need_D else None
        # the reference's --random_G runs G in train mode (DGP SPEC §9)
        G.train(bool(p["random_G"]))
    elif p["weights"] == "pretrained":
        G, D = load_biggan(str(p["name"]), weights_dir=p["weights_dir"], g_path=p["G_path"],
                           d_path=p["D_path"], use_ema=bool(p["use_ema"]), need_D=need_D)
    else:
        raise ValueError(f"prior.weights must be 'pretrained' or 'random', got {p['weights']!r}")
    G = cast(Generator, G.to(device, dtype))
    return G, (cast(Discriminator, D.to(device, dtype)) if D is not None else None)


def find_pggan_file(name: str, weights_dir: str | Path) -> Path:
    """``<weights_dir>/<the reference's file name>``; raises CheckpointError if it is missing."""
    spec = get(name, "pggan")
    if not spec.published:
        raise CheckpointError(f"{spec.describe()} has no published checkpoint; use prior.weights=random")
    weights_dir = Path(weights_dir).expanduser()
    path = weights_dir / spec.files["G"]
    if not path.is_file():
        raise missing_pggan_file_error(path, spec.source, weights_dir)
    return path


def load_pggan(
    name: str | Mapping[str, Any],
    weights_dir: str | Path | None = None,
    path: str | Path | None = None,
    map_location: Any = "cpu",
    random_init_seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> PGGANGenerator:
    """Build the named PGGAN and load its converted weights; the result is in eval mode.

    ``name`` is a registry name or ``PGGANGenerator`` kwargs. The file is ``path`` if given,
    else the reference's file name inside ``weights_dir``. With ``random_init_seed`` nothing is
    loaded: conv weights ~ N(0, 1) (stored unscaled, as PGGAN initialises them), biases 0.
    Parameters never require grad: mGANprior keeps G fixed. ``dtype`` float64 (a
    ``trainer.precision=64-true`` run) copies the float32 weights, file or random, exactly into
    a float64 network, so both precisions run the same generator.
    """
    spec: PriorSpec | None = None
    if isinstance(name, str):
        spec = get(name, "pggan")
        kwargs = dict(spec.kwargs)
        label = f"PGGAN generator {spec.describe()}"
    else:
        kwargs = dict(name)
        label = f"PGGAN generator ({kwargs})"
    device = torch.device(map_location) if isinstance(map_location, str | torch.device) else None
    if random_init_seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(random_init_seed))
            G = PGGANGenerator(**kwargs)
        return _freeze(G.to(device or "cpu", dtype))

    if path is None:
        if weights_dir is None or spec is None or not spec.published:
            raise CheckpointError(
                f"no checkpoint file for {label}: set {PATH_KEY}=<file>"
                + (f" or {WEIGHTS_DIR_KEY}=<dir holding {spec.files['G']}>"
                   if spec is not None and spec.published else
                   " (this configuration has no published file; prior.weights=random runs it "
                   "with random weights)")
            )
        path = Path(weights_dir).expanduser() / spec.files["G"]
    path = Path(path).expanduser()
    if not path.is_file():
        raise missing_pggan_file_error(
            path, spec.source if spec else None, Path(weights_dir).expanduser() if weights_dir else None
        )
    # Every tensor comes from the file: allocate without the random init of 23M weights.
    with torch.device("meta"):
        G = PGGANGenerator(**kwargs)
    # In the run's dtype before loading: the file's values are copied, not rounded via float32.
    G = G.to_empty(device=device or "cpu").to(dtype)
    load_checkpoint_into(G, path, map_location=map_location, label=label,
                         known=known_models("pggan"))
    return _freeze(G)


def _freeze(G: PGGANGenerator) -> PGGANGenerator:
    for p in G.parameters():
        p.requires_grad_(False)
    return G.eval()
