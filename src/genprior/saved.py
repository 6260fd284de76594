"""A saved reconstruction: one image's fine-tuned generator, latent and class, in one file.

``<output.dir>/<image id>/reconstruction.pt`` is written by ``train.py`` with
``output.save_G=true`` and by the manipulation tasks (``task=jitter`` / ``morphing`` /
``category_transfer``), which edit it. It replaces the reference's ``G_<name>_<mode>.pth`` and
``z_<name>_<mode>.pth`` (SPEC §11) with one file that says what it was made from.

File layout (a plain dict, so ``torch.load(weights_only=True)`` reads it and no pickled code
runs; every value is a tensor, str, int, float, bool, None, list or dict):

=================  ==============================================================================
``format``         ``"genprior.reconstruction"``; ``format_version`` is 1
``image_id``       the image id (file name without extension)
``task``           the task the image was fitted for (``reconstruct``, ``colorization``, ...)
``class``          y, the class index the generator was conditioned on
``z``              the fitted latent ``[dim_z]``, in the run's dtype (float32; float64 from a
                   ``trainer.precision=64-true`` run, whose ``G_changed`` are float64 too)
``G_changed``      the generator tensors (reference ``state_dict`` keys) that differ from the
                   pretrained state, on the CPU; every other tensor *is* the pretrained one
``prior``          the resolved ``prior`` config section (architecture, weights source)
``weights``        the identity of the pretrained state: ``state_sha256`` (a digest of every
                   tensor of ``G.state_dict()``, in key order) and ``source``: ``random``
                   (``init_seed``) or ``pretrained`` (``G_path`` and the sha256 of that file)
``use_in``         whether the last stage ran instance norm; ``in_initialized`` names the
                   GBlocks whose IN parameters were initialised (needed to render with IN)
``genprior``       the genprior version; ``seed``, ``source`` (the image path), ``dgp`` (the
                   schedule) are informational
=================  ==============================================================================

Why only the changed tensors: the pretrained generator is needed anyway to rebuild the model,
and its digest makes the file refuse to load onto any other weights, so storing the unchanged
tensors again buys nothing. The shipped schedules unfreeze every block (groups 0..B), so the
saving is small: 328 MB at 256/ch96, 148 MB at 256/ch64 (the output layer, BN statistics,
spectral-norm vectors and, without ``update_embed``, the class embedding are left out). Blocks
a schedule never unfreezes stay bit-identical and are not stored.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import genprior
from genprior.errors import UserError
from genprior.priors import registry
from genprior.priors.checkpoints import find_biggan_files

__all__ = [
    "FILE_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "SavedReconstruction",
    "SavedReconstructionError",
    "check_header",
    "describe_weights",
    "field_problems",
    "file_sha256",
    "plain_config",
    "read_payload",
    "resolve_saved_path",
    "state_fingerprint",
    "weights_identity",
    "write_payload",
]

FORMAT = "genprior.reconstruction"
FORMAT_VERSION = 1
FILE_NAME = "reconstruction.pt"
# Prior config keys that decide the generator's architecture: they must match to load a file.
ARCH_KEYS = ("kind", "resolution", "G_ch", "dim_z", "shared_dim", "n_classes")
_WRITERS = "train.py with output.save_G=true, or task=jitter / morphing / category_transfer"
_WHAT = "saved reconstruction"


class SavedReconstructionError(ValueError, UserError):
    """A saved reconstruction that is missing, unreadable, or made for another prior."""


# --------------------------------------------------------------------------------------------
# Weights identity
# --------------------------------------------------------------------------------------------


def state_fingerprint(state: Mapping[str, Tensor]) -> str:
    """sha256 of a state dict: every key, dtype, shape and the tensor bytes, in key order.

    float64 tensors are hashed as float32: a float64 run's pretrained state is the published
    float32 weights cast exactly, and must be recognised as the same weights (a fit saved in
    one precision can be edited in the other)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach()
        if t.dtype == torch.float64:
            t = t.float()
        digest.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_identity(prior: Mapping[str, Any], base_state: Mapping[str, Tensor]) -> dict[str, Any]:
    """What the pretrained generator state was built from, and its digest."""
    identity: dict[str, Any] = {"state_sha256": state_fingerprint(base_state)}
    if prior.get("weights") == "random" or prior.get("random_G"):
        identity.update(source="random", init_seed=int(prior.get("init_seed", 0)))
        return identity
    g_path = prior.get("G_path")
    if g_path is None:
        suffix = registry.get(str(prior["name"])).suffix
        if suffix is not None:
            g_path = find_biggan_files(prior.get("weights_dir", "pretrained"), suffix,
                                       bool(prior.get("use_ema", True)), need_D=False)[0]
    identity["source"] = "pretrained"
    if g_path is not None and Path(g_path).is_file():
        identity.update(G_path=str(Path(g_path).resolve()), G_sha256=file_sha256(g_path))
    return identity


def describe_weights(identity: Mapping[str, Any]) -> str:
    digest = str(identity.get("state_sha256", "?"))[:12]
    if identity.get("source") == "random":
        return f"random init with prior.init_seed={identity.get('init_seed')} (state sha256 {digest}…)"
    where = identity.get("G_path", "an unrecorded file")
    return f"pretrained weights from {where} (state sha256 {digest}…)"


# --------------------------------------------------------------------------------------------
# Saved-fit files: one plain dict with a format/version header (shared with genprior.multicode)
# --------------------------------------------------------------------------------------------


def write_payload(payload: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write atomically (a temporary file, then a rename), so a crash leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)
    return path


def read_payload(path: Path, error_cls: type[Exception], what: str) -> Any:
    """``torch.load(weights_only=True)`` on the CPU; any failure is one ``error_cls`` line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad files: report them alike
        detail = " ".join(str(err).split())[:300]
        raise error_cls(f"cannot read {what} {path} (corrupt, truncated or not a torch file): "
                        f"{type(err).__name__}: {detail}") from err


def check_header(payload: Any, where: str, fmt: str, version: int, error_cls: type[Exception],
                 what: str, writers: str) -> None:
    """The payload must be a dict of format ``fmt`` at a version up to ``version``."""
    if not isinstance(payload, Mapping) or payload.get("format") != fmt:
        found = (f"a dict with keys {sorted(map(str, payload))[:8]}"
                 if isinstance(payload, Mapping) else type(payload).__name__)
        raise error_cls(f"{where} is not a genprior {what} (expected format {fmt!r}, found "
                        f"{found}); these files are written by {writers}")
    found_version = payload.get("format_version")
    if not isinstance(found_version, int) or found_version > version:
        raise error_cls(f"{where} has format_version {found_version!r}; this genprior "
                        f"({genprior.__version__}) reads versions up to {version}")


def field_problems(payload: Mapping[str, Any], expect: Mapping[str, type]) -> list[str]:
    """``key (missing)`` / ``key (a T, expected U)`` for every field not of its expected type."""
    return [f"{k} (missing)" if k not in payload else
            f"{k} (a {type(payload[k]).__name__}, expected {t.__name__})"
            for k, t in expect.items() if k not in payload or not isinstance(payload[k], t)]


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------


@dataclass
class SavedReconstruction:
    """One image's fitted generator (as changes to the pretrained state), z and class."""

    image_id: str
    z: Tensor
    class_id: int
    changed: dict[str, Tensor]
    prior: dict[str, Any]
    weights: dict[str, Any]
    task: str = "reconstruct"
    use_in: bool = False
    in_initialized: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the file it was read from

    # ---------------------------------------------------------------- building
    @classmethod
    def from_method(
        cls, method: Any, b: int, prior: Mapping[str, Any], weights: Mapping[str, Any],
        task: str, info: Mapping[str, Any] | None = None,
    ) -> SavedReconstruction:
        """Image b of a fitted :class:`genprior.methods.dgp.DGP` (its final tensors)."""
        base = method.G_weight
        state = method.image_state(b)
        changed = {k: v.detach().cpu().contiguous() for k, v in state.items()
                   if not torch.equal(v, base[k])}
        flags = [n for n, t in method.in_state.items()
                 if n.endswith("in_initialized") and bool(t[b])]
        return cls(
            image_id=str(method.ids[b]), z=method.z[b].detach().cpu().clone(),
            class_id=int(method.y[b]), changed=changed, prior=dict(prior), weights=dict(weights),
            task=task, use_in=bool(method.stages[-1].use_in), in_initialized=flags,
            info=dict(info or {}),
        )

    def state(self, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The full fine-tuned state dict: the pretrained tensors with this file's changes.

        Unchanged entries are the very tensors of ``base`` (not copies), which morphing uses to
        skip them.
        """
        device = next(iter(base.values())).device
        state = dict(base)
        for k, v in self.changed.items():
            state[k] = v.to(device=device, dtype=base[k].dtype)  # the run's precision
        return state

    # ---------------------------------------------------------------- writing
    def to_payload(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "genprior": genprior.__version__,
            "image_id": self.image_id,
            "task": self.task,
            "class": self.class_id,
            "z": self.z.detach().cpu().contiguous(),
            "G_changed": {k: v.detach().cpu().contiguous() for k, v in self.changed.items()},
            "prior": _plain(self.prior),
            "weights": _plain(self.weights),
            "use_in": self.use_in,
            "in_initialized": list(self.in_initialized),
            **{k: _plain(v) for k, v in self.info.items() if k not in _RESERVED},
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        self.path = write_payload(self.to_payload(), path)
        return self.path

    # ---------------------------------------------------------------- reading
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SavedReconstruction:
        """Read and check the structure of a file (not yet against a prior: see ``check``)."""
        path = resolve_saved_path(path)
        return cls.from_payload(read_payload(path, SavedReconstructionError, _WHAT), path)

    @classmethod
    def from_payload(cls, payload: Any, path: Path | None = None) -> SavedReconstruction:
        where = str(path) if path is not None else _WHAT
        check_header(payload, where, FORMAT, FORMAT_VERSION, SavedReconstructionError, _WHAT,
                     _WRITERS)
        problems = field_problems(payload, {
            "image_id": str, "task": str, "class": int, "z": Tensor, "G_changed": Mapping,
            "prior": Mapping, "weights": Mapping, "use_in": bool, "in_initialized": list})
        z = payload.get("z")
        if isinstance(z, Tensor) and (z.dim() != 1 or not z.is_floating_point()):
            problems.append(f"z (shape {list(z.shape)} {z.dtype}, expected a 1-d float tensor)")
        changed = payload.get("G_changed")
        if isinstance(changed, Mapping):
            bad = [str(k) for k, v in changed.items()
                   if not isinstance(k, str) or not isinstance(v, Tensor)]
            if bad:
                problems.append(f"G_changed (entries that are not named tensors: {bad[:5]})")
        if problems:
            raise SavedReconstructionError(f"{where} is damaged: bad fields " + "; ".join(problems))
        return cls(
            image_id=payload["image_id"], z=payload["z"], class_id=payload["class"],
            changed=dict(payload["G_changed"]), prior=dict(payload["prior"]),
            weights=dict(payload["weights"]), task=payload["task"], use_in=payload["use_in"],
            in_initialized=list(payload["in_initialized"]),
            info={k: v for k, v in payload.items() if k not in _RESERVED}, path=path,
        )

    # ---------------------------------------------------------------- checking
    def check_architecture(self, prior: Mapping[str, Any]) -> None:
        """The run's prior config must build the generator this file was fitted with."""
        diff = [k for k in ARCH_KEYS if str(self.prior.get(k)) != str(prior.get(k))]
        if diff:
            mine = ", ".join(f"{k}={self.prior.get(k)}" for k in diff)
            theirs = ", ".join(f"{k}={prior.get(k)}" for k in diff)
            raise SavedReconstructionError(
                f"{self.path or _WHAT} was fitted with prior "
                f"{self.prior.get('name')!r} ({mine}), but this run builds prior "
                f"{prior.get('name')!r} ({theirs}); run with prior={self.prior.get('name')} "
                "(and the same prior.* overrides as the run that wrote it)"
            )

    def check_against(
        self, base: Mapping[str, Tensor], weights: Mapping[str, Any], dim_z: int, n_classes: int
    ) -> None:
        """Keys, shapes, z, class and the digest of the pretrained state must all fit."""
        where = self.path or _WHAT
        unknown = [k for k in self.changed if k not in base]
        # A floating-point tensor may come from a run of the other precision (state() casts it);
        # anything else must match exactly.
        wrong = [f"{k} (file {list(v.shape)} {v.dtype}, model {list(base[k].shape)} {base[k].dtype})"
                 for k, v in self.changed.items()
                 if k in base and (v.shape != base[k].shape or (v.dtype != base[k].dtype and not (
                     v.is_floating_point() and base[k].is_floating_point())))]
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} tensors the generator does not have: {_listing(unknown)}")
        if wrong:
            problems.append(f"{len(wrong)} tensors of the wrong shape or type: {_listing(wrong)}")
        if self.z.shape[0] != dim_z:
            problems.append(f"z has {self.z.shape[0]} entries, the generator takes {dim_z}")
        if not 0 <= self.class_id < n_classes:
            problems.append(f"class {self.class_id} is outside 0..{n_classes - 1}")
        if problems:
            raise SavedReconstructionError(
                f"{where} does not fit the generator of prior {self.prior.get('name')!r}: "
                + "; ".join(problems)
            )
        if self.weights.get("state_sha256") != weights.get("state_sha256"):
            raise SavedReconstructionError(
                f"{where} was fitted from other generator weights: it records "
                f"{describe_weights(self.weights)}, but this run's generator is "
                f"{describe_weights(weights)}. Load the weights it was made with "
                "(prior.G_path / prior.weights_dir / prior.init_seed / prior.use_ema)."
            )


_RESERVED = frozenset({
    "format", "format_version", "genprior", "image_id", "task", "class", "z", "G_changed",
    "prior", "weights", "use_in", "in_initialized",
})


def resolve_saved_path(path: str | os.PathLike[str]) -> Path:
    """A reconstruction file, or an image folder holding ``reconstruction.pt``."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / FILE_NAME
    if not p.is_file():
        raise SavedReconstructionError(
            f"saved reconstruction {p} does not exist; these files are written by {_WRITERS} "
            f"as <output.dir>/<image id>/{FILE_NAME}"
        )
    return p


def _plain(value: Any) -> Any:
    """Config values as the builtin types weights_only accepts (no OmegaConf containers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str | Tensor):
        return value
    return str(value)


def plain_config(value: Any) -> Any:
    """Config values as the builtin types ``weights_only`` accepts (other saved formats use it:
    genprior.multicode)."""
    return _plain(value)


def _listing(items: Sequence[str], limit: int = 6) -> str:
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f", ... ({more} more)" if more > 0 else "")
