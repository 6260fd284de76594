"""A saved mGANprior fit and the InterFaceGAN boundaries it is edited with.

``<output.dir>/<image id>/mgan_fit.pt`` holds one image's multi-code inversion: its N codes z,
its channel importances α and the composing layer, plus the identity of the PGGAN weights it
was fitted on. ``task=mgan_semantic`` and ``task=mgan_style_mixing`` (genprior.tasks.mgan_edit)
write these files after fitting, or read them (``mgan_edit.saved``), so that one inversion can
be edited many times. The file is a plain dict that ``torch.load(weights_only=True)`` reads:

=================  ==============================================================================
``format``         ``"genprior.mgan_fit"``; ``format_version`` is 1
``image_id``       the image id; ``task`` the task the codes were fitted for (``inversion``)
``z``              the codes ``[N, z_dim]`` in the run's dtype (float64 from ``64-true``)
``alpha``          the channel importances ``[N, C]``, C the channels at the composing layer
``composing_layer``  l, an index into layer0 .. layer{2K-1}, toRGB (mGANprior SPEC §2)
``average_codes``  whether the composition divides by N (``mganprior.average_codes``)
``target``         the fitted (clean) image, ``[3, H, W]`` uint8, for the edit sheets
``prior``          the resolved ``prior`` config section
``weights``        ``state_sha256`` (genprior.saved.state_fingerprint of ``G.state_dict()``) and
                   the source (``random`` with ``init_seed``; ``pretrained`` with the file's path
                   and sha256)
=================  ==============================================================================

InterFaceGAN boundaries (Shen et al., CVPR 2020; mGANprior's face editing uses them, SPEC §3.5)
are ``.npy`` files of shape ``[1, 512]``: the unit normal of a linear attribute boundary in
PGGAN's z space, published as ``boundaries/pggan_celebahq_<attribute>_boundary.npy``.
``load_boundary`` reads one with ``allow_pickle=False``, checks its length against the
generator's latent size and **refuses** a vector whose norm is not 1 within ``UNIT_TOLERANCE``
(an edit strength is a distance along a unit normal; a direction of another length would
silently rescale every strength). A norm within the tolerance is renormalised in float64.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import genprior
from genprior.errors import MissingFileError, UserError
from genprior.items import image_generator
from genprior.priors import registry
from genprior.priors.pggan import PGGANGenerator
from genprior.saved import (
    check_header,
    describe_weights,
    field_problems,
    file_sha256,
    plain_config,
    read_payload,
    state_fingerprint,
    write_payload,
)

__all__ = [
    "BOUNDARY_DIR",
    "FIT_FILE",
    "FIT_FORMAT",
    "INTERFACEGAN_URL",
    "RANDOM_BOUNDARIES",
    "UNIT_TOLERANCE",
    "BoundaryError",
    "MissingBoundaryError",
    "MultiCodeFitError",
    "SavedMultiCode",
    "boundary_file",
    "load_boundary",
    "pggan_weights_identity",
    "random_boundary",
    "resolve_fit_path",
]

FIT_FORMAT = "genprior.mgan_fit"
FIT_VERSION = 1
FIT_FILE = "mgan_fit.pt"
BOUNDARY_DIR = "pretrained/interfacegan"
INTERFACEGAN_URL = "https://github.com/genforce/interfacegan/tree/master/boundaries"
# |‖n‖ − 1| above this is refused; the published boundaries are unit vectors (float64).
UNIT_TOLERANCE = 1e-3
_WRITERS = "task=mgan_semantic or task=mgan_style_mixing"
_WHAT = "saved mGANprior fit"


class MultiCodeFitError(ValueError, UserError):
    """A saved mGANprior fit that is missing, unreadable, or made for another generator."""


class BoundaryError(ValueError, UserError):
    """An InterFaceGAN boundary file that cannot be used (wrong shape, not a unit vector)."""


class MissingBoundaryError(MissingFileError):
    """An InterFaceGAN boundary file that is not there."""


# --------------------------------------------------------------------------------------------
# Weights identity
# --------------------------------------------------------------------------------------------


def pggan_weights_identity(prior: Mapping[str, Any], G: PGGANGenerator) -> dict[str, Any]:
    """What a PGGAN's weights were built from, and the digest of its state."""
    identity: dict[str, Any] = {"state_sha256": state_fingerprint(G.state_dict())}
    if prior.get("weights") == "random":
        identity.update(source="random", init_seed=int(prior.get("init_seed", 0)))
        return identity
    identity["source"] = "pretrained"
    path = prior.get("G_path")
    if path is None:
        spec = registry.get(str(prior.get("name")), "pggan")
        if spec.published:
            path = Path(str(prior.get("weights_dir", "pretrained"))).expanduser() / spec.files["G"]
    if path is not None and Path(path).is_file():
        identity.update(G_path=str(Path(path).resolve()), G_sha256=file_sha256(path))
    return identity


# --------------------------------------------------------------------------------------------
# The saved fit
# --------------------------------------------------------------------------------------------


@dataclass
class SavedMultiCode:
    """One image's multi-code inversion: x = G2(Σ_n G1(z_n) ⊙ α_n [/ N]) at ``composing_layer``."""

    image_id: str
    z: Tensor  # [N, z_dim]
    alpha: Tensor  # [N, C]
    composing_layer: int
    prior: dict[str, Any]
    weights: dict[str, Any]
    average_codes: bool = True
    task: str = "inversion"
    target: Tensor | None = None  # [3, H, W] uint8
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the file it was read from

    @classmethod
    def from_method(cls, method: Any, b: int, prior: Mapping[str, Any], weights: Mapping[str, Any],
                    task: str = "inversion", info: Mapping[str, Any] | None = None) -> SavedMultiCode:
        """Image b of a fitted :class:`genprior.methods.mganprior.MGANPrior`."""
        codes = method.latents(b)
        clean = method.clean_for_display()[b].detach().float().cpu()
        target = (clean * 255.0).round().clamp(0, 255).to(torch.uint8)
        return cls(image_id=str(method.ids[b]), z=codes["z"], alpha=codes["alpha"],
                   composing_layer=int(codes["composing_layer"]), prior=dict(prior),
                   weights=dict(weights), average_codes=bool(method.config.average_codes),
                   task=task, target=target, info=dict(info or {}))

    # ---------------------------------------------------------------- writing
    def to_payload(self) -> dict[str, Any]:
        return {
            "format": FIT_FORMAT,
            "format_version": FIT_VERSION,
            "genprior": genprior.__version__,
            "image_id": self.image_id,
            "task": self.task,
            "z": self.z.detach().cpu().contiguous(),
            "alpha": self.alpha.detach().cpu().contiguous(),
            "composing_layer": int(self.composing_layer),
            "average_codes": bool(self.average_codes),
            "target": None if self.target is None else self.target.detach().cpu().contiguous(),
            "prior": plain_config(self.prior),
            "weights": plain_config(self.weights),
            "info": plain_config(self.info),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        self.path = write_payload(self.to_payload(), path)
        return self.path

    # ---------------------------------------------------------------- reading
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SavedMultiCode:
        path = resolve_fit_path(path)
        return cls.from_payload(read_payload(path, MultiCodeFitError, _WHAT), path)

    @classmethod
    def from_payload(cls, payload: Any, path: Path | None = None) -> SavedMultiCode:
        where = str(path) if path is not None else _WHAT
        check_header(payload, where, FIT_FORMAT, FIT_VERSION, MultiCodeFitError, "mGANprior fit",
                     f"{_WRITERS} as <output.dir>/<image id>/{FIT_FILE}")
        problems = field_problems(payload, {
            "image_id": str, "task": str, "z": Tensor, "alpha": Tensor, "composing_layer": int,
            "average_codes": bool, "prior": Mapping, "weights": Mapping, "info": Mapping})
        z, alpha, target = payload.get("z"), payload.get("alpha"), payload.get("target")
        if isinstance(z, Tensor) and (z.dim() != 2 or not z.is_floating_point()):
            problems.append(f"z (shape {list(z.shape)} {z.dtype}, expected [N, z_dim] float)")
        if isinstance(alpha, Tensor) and (alpha.dim() != 2 or not alpha.is_floating_point()):
            problems.append(f"alpha (shape {list(alpha.shape)} {alpha.dtype}, expected [N, C] float)")
        if (isinstance(z, Tensor) and isinstance(alpha, Tensor) and z.dim() == alpha.dim() == 2
                and z.shape[0] != alpha.shape[0]):
            problems.append(f"z has {z.shape[0]} codes but alpha {alpha.shape[0]}")
        if target is not None and (not isinstance(target, Tensor) or target.dim() != 3
                                   or target.dtype != torch.uint8):
            problems.append("target (expected a [3, H, W] uint8 tensor or None)")
        if problems:
            raise MultiCodeFitError(f"{where} is damaged: bad fields " + "; ".join(problems))
        return cls(image_id=payload["image_id"], z=payload["z"], alpha=payload["alpha"],
                   composing_layer=payload["composing_layer"], prior=dict(payload["prior"]),
                   weights=dict(payload["weights"]), average_codes=payload["average_codes"],
                   task=payload["task"], target=target, info=dict(payload["info"]), path=path)

    # ---------------------------------------------------------------- checking
    def check(self, G: PGGANGenerator, weights: Mapping[str, Any]) -> None:
        """The codes must fit G (latent size, layer, channels) and G must be the fit's weights."""
        where = self.path or _WHAT
        problems = []
        if self.z.shape[1] != G.z_dim:
            problems.append(f"codes of size {self.z.shape[1]}, the generator takes {G.z_dim}")
        if not 0 <= self.composing_layer < G.num_layers:
            problems.append(f"composing layer {self.composing_layer} outside 0..{G.num_layers - 1}")
        elif self.alpha.shape[1] != G.feature_shape(self.composing_layer)[0]:
            problems.append(f"alpha has {self.alpha.shape[1]} channels, layer {self.composing_layer} "
                            f"has {G.feature_shape(self.composing_layer)[0]}")
        if problems:
            raise MultiCodeFitError(f"{where} does not fit the generator of prior "
                                    f"{self.prior.get('name')!r}: " + "; ".join(problems))
        if self.weights.get("state_sha256") != weights.get("state_sha256"):
            raise MultiCodeFitError(
                f"{where} was fitted on other generator weights: it records {describe_weights(self.weights)}, "
                f"but this run's generator is {describe_weights(weights)}; run with prior="
                f"{self.prior.get('name')} and the prior.* settings of the run that wrote it")

    def codes(self, device: torch.device | str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """z [N, z_dim] and α [N, C] on ``device`` in the run's dtype."""
        return self.z.to(device, dtype), self.alpha.to(device, dtype)


def resolve_fit_path(path: str | os.PathLike[str]) -> Path:
    """An ``mgan_fit.pt`` file, or an image folder holding one."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / FIT_FILE
    if not p.is_file():
        raise MultiCodeFitError(f"saved mGANprior fit {p} does not exist; these files are written by "
                                f"{_WRITERS} as <output.dir>/<image id>/{FIT_FILE}")
    return p


# --------------------------------------------------------------------------------------------
# InterFaceGAN boundaries
# --------------------------------------------------------------------------------------------


def boundary_file(folder: str | os.PathLike[str], prefix: str, attribute: str) -> Path:
    """``<folder>/<prefix>_<attribute>_boundary.npy`` (InterFaceGAN's published naming)."""
    return Path(folder).expanduser() / f"{prefix}_{attribute}_boundary.npy"


#: ``mgan_edit.boundaries_dir=random``: seeded random unit normals instead of files, for the
#: random-weight tiny prior (meaningless directions, the same code path; never a default).
RANDOM_BOUNDARIES = "random"


def random_boundary(attribute: str, z_dim: int, seed: int = 0) -> Tensor:
    """A seeded random unit normal for ``attribute`` (float64 ``[z_dim]``): the same attribute
    name and seed give the same vector on any machine."""
    normal = torch.randn(z_dim, generator=image_generator(seed, attribute), dtype=torch.float64)
    return normal / normal.norm()


def load_boundary(folder: str | os.PathLike[str], prefix: str, attribute: str, z_dim: int,
                  seed: int = 0) -> Tensor:
    """The unit normal of an attribute's boundary in z space, float64 ``[z_dim]``
    (``folder`` = ``RANDOM_BOUNDARIES``: ``random_boundary(attribute, z_dim, seed)``)."""
    if str(folder) == RANDOM_BOUNDARIES:
        return random_boundary(attribute, z_dim, seed)
    path = boundary_file(folder, prefix, attribute)
    if not path.is_file():
        raise MissingBoundaryError(
            f"InterFaceGAN boundary file not found: {path}. Download {path.name} from "
            f"{INTERFACEGAN_URL} and put it into {path.parent} (mgan_edit.boundaries_dir)")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:  # not an .npy file, or a pickled object array
        raise BoundaryError(f"cannot read boundary {path} as a numeric .npy array: "
                            f"{type(err).__name__}: {' '.join(str(err).split())[:200]}") from err
    if array.dtype.kind != "f" or array.size != z_dim or array.squeeze().ndim != 1:
        raise BoundaryError(f"boundary {path} has shape {list(array.shape)} ({array.dtype}); the "
                            f"generator's latent space needs a float [1, {z_dim}] normal vector")
    normal = torch.from_numpy(array.astype(np.float64).reshape(-1))
    norm = float(normal.norm())
    if not np.isfinite(norm) or abs(norm - 1.0) > UNIT_TOLERANCE:
        raise BoundaryError(f"boundary {path} has norm {norm:.6g}, not 1: an InterFaceGAN boundary "
                            "is a unit normal (edit strengths are distances along it); divide it "
                            "by its norm if it is meant as a direction")
    return normal / normal.norm()
