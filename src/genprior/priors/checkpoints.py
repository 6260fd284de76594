"""Registry of BigGAN configurations and the loader for the published DGP checkpoints.

The DGP release publishes plain state dicts (SPEC §5, manifest ``load_weights``):
``G_ema_<s>.pth`` (the EMA generator, loaded into the generator that is fine-tuned) and
``D_<s>.pth``, with s in {128, 256, ch64_256}. They are downloaded by hand from the Google
Drive link in the README of github.com/XingangPan/deep-generative-prior into the directory
named by the config key ``prior.weights_dir``.

Unlike the reference (``strict=False``), loading is strict except for the DGP-only
``in1``/``in2`` instance-norm parameters, which the files do not contain; a file that does not
fit is reported with the configuration it does fit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from genprior.priors.biggan import (
    Discriminator,
    Generator,
    build_discriminator,
    build_generator,
    orthogonal_init_,
)

__all__ = [
    "REGISTRY",
    "BigGANEntry",
    "CheckpointError",
    "find_biggan_files",
    "get_entry",
    "infer_biggan_config",
    "load_biggan",
    "load_checkpoint_into",
]

DGP_RELEASE = "github.com/XingangPan/deep-generative-prior"
WEIGHTS_DIR_KEY = "prior.weights_dir"
_MAX_LISTED = 8


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


@dataclass(frozen=True)
class BigGANEntry:
    """A named BigGAN configuration and the suffix of its published files (None: none)."""

    name: str
    resolution: int
    ch: int
    suffix: str | None
    has_discriminator: bool = True

    def generator_kwargs(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "G_ch": self.ch}

    def discriminator_kwargs(self) -> dict[str, Any]:
        if not self.has_discriminator:
            raise CheckpointError(
                f"{self.name} has no discriminator: the reference defines D only for 128 and "
                "256 (SPEC §4); use a loss without D features or need_D=False"
            )
        return {"resolution": self.resolution, "D_ch": self.ch}

    def describe(self) -> str:
        return f"{self.name} (resolution {self.resolution}, channel width {self.ch})"


REGISTRY: dict[str, BigGANEntry] = {
    e.name: e
    for e in (
        BigGANEntry("biggan128", 128, 96, "128"),
        BigGANEntry("biggan256", 256, 96, "256"),
        BigGANEntry("biggan256_ch64", 256, 64, "ch64_256"),
        BigGANEntry("biggan512", 512, 96, "512", has_discriminator=False),
        BigGANEntry("biggan_tiny", 128, 8, None),  # tests only: no published files
    )
}


def get_entry(name: str) -> BigGANEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise CheckpointError(
            f"unknown BigGAN configuration {name!r}; known: {', '.join(REGISTRY)}"
        ) from None


def _file_names(suffix: str, use_ema: bool) -> tuple[str, str]:
    # <prefix>_<suffix>.pth with prefix G_ema (all DGP scripts pass --use_ema), G or D.
    return (f"G_ema_{suffix}.pth" if use_ema else f"G_{suffix}.pth"), f"D_{suffix}.pth"


def _missing_files_error(paths: list[Path], weights_dir: Path | None) -> CheckpointError:
    listing = "\n".join(f"  {p}" for p in paths)
    where = (
        f"into {weights_dir} (the configured {WEIGHTS_DIR_KEY})"
        if weights_dir is not None
        else f"into a directory and set {WEIGHTS_DIR_KEY}=<that directory>"
    )
    return CheckpointError(
        f"BigGAN checkpoint file(s) not found:\n{listing}\n"
        f"The DGP release publishes them: see the 'pretrained models' Google Drive link in the "
        f"README of https://{DGP_RELEASE}. Download them {where}, or pass explicit file paths."
    )


def find_biggan_files(
    weights_dir: str | Path, suffix: str, use_ema: bool = True, *, need_D: bool = True
) -> tuple[Path, Path]:
    """The reference's file paths for ``suffix``; raises CheckpointError if a needed one is missing."""
    weights_dir = Path(weights_dir).expanduser()
    g_name, d_name = _file_names(suffix, use_ema)
    g_path, d_path = weights_dir / g_name, weights_dir / d_name
    missing = [p for p in ([g_path, d_path] if need_D else [g_path]) if not p.is_file()]
    if missing:
        raise _missing_files_error(missing, weights_dir)
    return g_path, d_path


# --------------------------------------------------------------------------------------------
# Reading a file
# --------------------------------------------------------------------------------------------


def _short_error(err: Exception) -> str:
    """The informative line of torch's long weights_only messages, else the whole message."""
    text = str(err)
    match = re.search(r"(Unsupported (?:global|operand)[^\n]*)", text)
    detail = match.group(1) if match else " ".join(text.split())
    return f"{type(err).__name__}: {detail}"


def _read_state_dict(path: Path, role: str, map_location: Any) -> dict[str, Tensor]:
    if not path.is_file():
        raise _missing_files_error([path], None)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for bad files: report them all alike
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects besides tensors, and genprior "
                f"only loads checkpoints with torch.load(weights_only=True) so that no pickled "
                f"code runs. Re-save it as a plain state dict: "
                f"torch.save(model.state_dict(), path). Underlying error: {_short_error(err)}"
            ) from err
        raise CheckpointError(
            f"cannot read checkpoint {path} (corrupt, truncated or not a torch file): "
            f"{_short_error(err)}"
        ) from err
    return _unwrap(obj, role, path)


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _unwrap(obj: Any, role: str, path: Path) -> dict[str, Tensor]:
    """The published files are the state dict itself; also accept a trivial wrapper."""
    if not _is_state_dict(obj) and isinstance(obj, Mapping):
        for key in ("state_dict", role, f"{role}_ema"):
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        keys = list(obj)[:_MAX_LISTED] if isinstance(obj, Mapping) else None
        raise CheckpointError(
            f"{path} does not hold a state dict (found {type(obj).__name__}"
            + (f" with keys {keys}" if keys is not None else "")
            + f"); expected the published layout, a dict of tensors, or one under "
            f"'state_dict' or '{role}'"
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from (Distributed)DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------------------------
# Checking a state dict against a model
# --------------------------------------------------------------------------------------------


def _block_count(state: Mapping[str, Tensor]) -> int:
    found = {
        int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.0\.conv1\.weight$", k))
    }
    return max(found) + 1 if found else 0


def infer_biggan_config(state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """Guess role ('G'/'D'), resolution and channel width of a BigGAN state dict from shapes."""
    n_blocks = _block_count(state)
    if "linear.weight" in state and "shared.weight" in state and n_blocks:
        # linear maps a z chunk to 16ch x 4 x 4; one upsampling block per doubling from 4x4.
        rows = state["linear.weight"].shape[0]
        return {"role": "G", "resolution": 4 * 2**n_blocks, "ch": rows // 256}
    if "embed.weight" in state and "blocks.0.0.conv1.weight" in state and n_blocks:
        # D's first block maps RGB to ch; every block but the last halves the resolution.
        ch = state["blocks.0.0.conv1.weight"].shape[0]
        return {"role": "D", "resolution": 2 ** (n_blocks + 1), "ch": ch}
    return None


def mismatch_lines(path: Any, label: str, missing: list[str], unexpected: list[str],
                   wrong: list[str]) -> list[str]:
    """The body of a "file does not fit" error: the missing, unexpected and misshapen keys."""
    lines = [f"checkpoint {path} does not fit the {label}:"]
    if missing:
        lines.append(f"  {len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if wrong:
        lines.append(f"  {len(wrong)} keys with the wrong shape: {_listing(wrong)}")
    return lines


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _fit_hint(state: Mapping[str, Tensor], role: str) -> str:
    guess = infer_biggan_config(state)
    if guess is None:
        if any(k.endswith(("weight_orig", "weight_u")) for k in state):
            return (
                "Its keys use torch.nn.utils.spectral_norm naming (weight_orig/weight_u), so it "
                "is not a BigGAN-PyTorch/DGP checkpoint."
            )
        return "It does not look like a BigGAN-PyTorch/DGP checkpoint."
    what = {"G": "generator", "D": "discriminator"}[guess["role"]]
    hint = f"The file looks like a BigGAN {what} with resolution {guess['resolution']} and channel width {guess['ch']}"
    if guess["role"] != role:
        hint += f", but it was given as the {'generator' if role == 'G' else 'discriminator'} file"
    matches = [
        e.name
        for e in REGISTRY.values()
        if (e.resolution, e.ch) == (guess["resolution"], guess["ch"])
        and (guess["role"] == "G" or e.has_discriminator)
    ]
    if matches:
        hint += f"; its registry name is {matches[0]!r} (e.g. prior={matches[0]})"
    else:
        width = "G_ch" if guess["role"] == "G" else "D_ch"
        hint += (
            f"; no registry entry has that shape, build the model with "
            f"resolution={guess['resolution']}, {width}={guess['ch']}"
        )
    return hint + "."


def load_checkpoint_into(
    model: nn.Module,
    path: str | Path,
    *,
    role: str | None = None,
    strict: bool = True,
    map_location: Any = "cpu",
    label: str | None = None,
) -> None:
    """Load a BigGAN state-dict file into ``model`` with the checks described in the module doc.

    strict: every key must match except the generator's in1/in2 (SPEC §5). strict=False
    behaves like the reference: missing and unexpected keys are ignored, shapes still checked.
    """
    path = Path(path).expanduser()
    role = role or ("G" if isinstance(model, Generator) else "D")
    state = _read_state_dict(path, role, map_location)
    own = model.state_dict()
    allowed_missing = set(model.in_param_names()) if isinstance(model, Generator) else set()
    missing = [k for k in own if k not in state and k not in allowed_missing]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if wrong or (strict and (missing or unexpected)):
        lines = mismatch_lines(path, label or type(model).__name__, missing, unexpected, wrong)
        lines.append(_fit_hint(state, role))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------
# The public loader
# --------------------------------------------------------------------------------------------


def _build(
    kind: str, spec: str | Mapping[str, Any], device: torch.device | None, fast: bool
) -> nn.Module:
    builder = build_generator if kind == "G" else build_discriminator
    if not fast:
        with torch.device(device or "cpu"):
            return builder(spec)
    # Every tensor comes from the file: skip the random init of ~100M weights and allocate
    # uninitialised storage instead. Only G's in1/in2 and IN flags are absent from the file.
    with torch.device("meta"):
        model = builder(spec)
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
        entry = get_entry(name)
        g_spec: str | Mapping[str, Any] = name
        d_spec: str | Mapping[str, Any] = name
        label = entry.describe()
        suffix = entry.suffix
        if need_D and not entry.has_discriminator:
            entry.discriminator_kwargs()  # raises the explanatory error
    else:
        g_spec = dict(name)
        d_spec = {"resolution": g_spec.get("resolution", 128), "D_ch": g_spec.get("G_ch", 96)}
        label = f"BigGAN (resolution {d_spec['resolution']}, channel width {d_spec['D_ch']})"
        suffix = None
    device = torch.device(map_location) if isinstance(map_location, str | torch.device) else None

    if random_G:
        G = cast(Generator, _build("G", g_spec, device, fast=False))
        orthogonal_init_(G)
        G.train()
        D = cast(Discriminator, _build("D", d_spec, device, fast=False)).eval() if need_D else None
        return G, D

    if g_path is None or (need_D and d_path is None):
        if weights_dir is None or suffix is None:
            raise CheckpointError(
                f"no checkpoint files for {label}: pass g_path/d_path"
                + (
                    f", or set {WEIGHTS_DIR_KEY} to the directory holding the files published by "
                    f"https://{DGP_RELEASE}"
                    if suffix is not None
                    else " (this configuration has no published files)"
                )
            )
        g_name, d_name = _file_names(suffix, use_ema)
        g_path = g_path or Path(weights_dir).expanduser() / g_name
        d_path = d_path or Path(weights_dir).expanduser() / d_name
    needed = [Path(g_path)] + ([Path(d_path)] if need_D and d_path is not None else [])
    absent = [p for p in needed if not p.is_file()]
    if absent:
        raise _missing_files_error(absent, Path(weights_dir) if weights_dir else None)

    G = cast(Generator, _build("G", g_spec, device, fast=strict))
    load_checkpoint_into(
        G, g_path, role="G", strict=strict, map_location=map_location, label=f"generator {label}"
    )
    G.eval()
    D: Discriminator | None = None
    if need_D:
        assert d_path is not None
        D = cast(Discriminator, _build("D", d_spec, device, fast=strict))
        load_checkpoint_into(
            D,
            d_path,
            role="D",
            strict=strict,
            map_location=map_location,
            label=f"discriminator {label}",
        )
        D.eval()
    return G, D
