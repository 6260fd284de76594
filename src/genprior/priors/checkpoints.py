"""The loader of the published prior checkpoints: files onto models, with explained mismatches.

Two published layouts (the names of the files of each prior are in ``genprior.priors.registry``):

* BigGAN, DGP release (DGP SPEC §5, manifest ``load_weights``): plain state dicts
  ``G_ema_<s>.pth`` (the EMA generator, loaded into the generator that is fine-tuned) and
  ``D_<s>.pth``, with s in {128, 256, ch64_256}. They are downloaded by hand from the Google
  Drive link in the README of github.com/XingangPan/deep-generative-prior into the directory
  named by the config key ``prior.weights_dir``. Unlike the reference (``strict=False``),
  loading is strict except for the DGP-only ``in1``/``in2`` instance-norm parameters, which the
  files do not contain.
* PGGAN, genforce's conversion used by mGANprior (mGANprior SPEC §1.3-1.4): plain state dicts
  of ``PGGANGeneratorNet`` in ``models/pretrain/pytorch/<file>.pth``. The mGANprior repository
  does not ship them: its ``models/README.md`` links mirrors of the official PGGAN TensorFlow
  pickles (``karras2018iclr-<dataset>.pkl``, github.com/tkarras/progressive_growing_of_gans),
  and the reference converts a pickle into the ``.pth`` the first time it builds the model
  (TensorFlow 1.x needed). genprior reads the converted file from ``prior.weights_dir`` (or
  ``prior.G_path``) strictly: every key, intermediate toRGBs and ``lod`` included, must fit.

Files are read by ``genprior.weights.read_state_dict`` (``torch.load(weights_only=True)``, no
pickled code runs). A file that does not fit its model is reported with its missing,
unexpected and misshapen keys and the configuration it does fit (``known``: the registry's
models, passed in by ``genprior.priors.registry``, which imports this module).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from genprior.priors.biggan import Discriminator, Generator
from genprior.priors.pggan import INIT_RESOLUTION, PGGANGenerator, pggan_channels
from genprior.weights import WeightsFileError, read_state_dict

__all__ = [
    "DGP_RELEASE",
    "DGP_SOURCE",
    "MGANPRIOR_RELEASE",
    "PATH_KEY",
    "PGGAN_OFFICIAL",
    "WEIGHTS_DIR_KEY",
    "CheckpointError",
    "KnownModels",
    "biggan_file_names",
    "find_biggan_files",
    "infer_biggan_config",
    "infer_pggan_config",
    "load_checkpoint_into",
    "mismatch_lines",
    "missing_biggan_files_error",
    "missing_pggan_file_error",
    "pggan_source",
]

DGP_RELEASE = "github.com/XingangPan/deep-generative-prior"
DGP_SOURCE = (
    "The DGP release publishes them: see the 'pretrained models' Google Drive link in the "
    f"README of https://{DGP_RELEASE}."
)
MGANPRIOR_RELEASE = "github.com/genforce/mganprior"
PGGAN_OFFICIAL = "github.com/tkarras/progressive_growing_of_gans"
WEIGHTS_DIR_KEY = "prior.weights_dir"
PATH_KEY = "prior.G_path"
_MAX_LISTED = 8

# A checkpoint problem is a weights-file problem: one class for every reader in genprior.
CheckpointError = WeightsFileError

# Registered configurations a file may fit: name -> role ("G", "D") -> constructor kwargs.
KnownModels = Mapping[str, Mapping[str, Mapping[str, Any]]]


# --------------------------------------------------------------------------------------------
# File names and where to get them
# --------------------------------------------------------------------------------------------


def biggan_file_names(suffix: str) -> dict[str, str]:
    """The DGP release's files for ``suffix`` by role: G_ema (what every DGP script loads, the
    reference's --use_ema), G and D: ``<role>_<suffix>.pth``."""
    return {role: f"{role}_{suffix}.pth" for role in ("G_ema", "G", "D")}


def find_biggan_files(
    weights_dir: str | Path, suffix: str, use_ema: bool = True, *, need_D: bool = True
) -> tuple[Path, Path]:
    """The reference's file paths for ``suffix``; raises CheckpointError if a needed one is missing."""
    weights_dir = Path(weights_dir).expanduser()
    names = biggan_file_names(suffix)
    g_path = weights_dir / names["G_ema" if use_ema else "G"]
    d_path = weights_dir / names["D"]
    missing = [p for p in ([g_path, d_path] if need_D else [g_path]) if not p.is_file()]
    if missing:
        raise missing_biggan_files_error(missing, weights_dir)
    return g_path, d_path


def missing_biggan_files_error(paths: list[Path], weights_dir: Path | None) -> CheckpointError:
    listing = "\n".join(f"  {p}" for p in paths)
    return CheckpointError(
        f"BigGAN checkpoint file(s) not found:\n{listing}\n"
        f"{DGP_SOURCE} Download them {_where(weights_dir)}, or pass explicit file paths."
    )


def pggan_source(tf_pickle: str, weight_file: str) -> str:
    """Where genforce's converted file ``weight_file`` comes from."""
    return (
        f"The file is genforce's PyTorch conversion of the official PGGAN pickle {tf_pickle} "
        f"({PGGAN_OFFICIAL}). The mGANprior release (https://{MGANPRIOR_RELEASE}, "
        f"models/README.md) links a mirror of that pickle; put it in the reference's "
        f"models/pretrain/tensorflow/ and build the model once with the reference code "
        f"(TensorFlow 1.x), which writes models/pretrain/pytorch/{weight_file}."
    )


def missing_pggan_file_error(
    path: Path, source: str | None, weights_dir: Path | None
) -> CheckpointError:
    where = (
        _where(weights_dir)
        if weights_dir is not None
        else f"where {PATH_KEY} points, or into a directory set as {WEIGHTS_DIR_KEY}=<dir>"
    )
    how = (
        f"{source} Copy that file {where}."
        if source
        else f"Put a converted PGGAN generator state dict {where}."
    )
    return CheckpointError(f"PGGAN checkpoint file not found: {path}\n{how}")


def _where(weights_dir: Path | None) -> str:
    if weights_dir is not None:
        return f"into {weights_dir} (the configured {WEIGHTS_DIR_KEY})"
    return f"into a directory and set {WEIGHTS_DIR_KEY}=<that directory>"


# --------------------------------------------------------------------------------------------
# What a state dict is
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


def infer_pggan_config(state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """Resolution, z_dim and widths of a PGGAN generator state dict, guessed from its shapes."""
    outputs = [int(m.group(1)) for k in state if (m := re.match(r"output(\d+)\.conv\.weight$", k))]
    first = state.get("layer0.conv.weight")
    if not outputs or first is None or first.dim() != 4:
        return None
    blocks = max(outputs) + 1
    widths = {}
    for b in range(blocks):
        w = state.get(f"layer{2 * b + 1}.conv.weight")
        if w is None:
            return None
        widths[INIT_RESOLUTION * 2**b] = int(w.shape[0])
    return {
        "resolution": INIT_RESOLUTION * 2 ** (blocks - 1),
        "z_dim": int(first.shape[1]),
        "channels": widths,
    }


def mismatch_lines(
    path: Any, label: str, missing: list[str], unexpected: list[str], wrong: list[str]
) -> list[str]:
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


def _biggan_fit_hint(state: Mapping[str, Tensor], role: str, known: KnownModels) -> str:
    guess = infer_biggan_config(state)
    if guess is None:
        if any(k.endswith(("weight_orig", "weight_u")) for k in state):
            return (
                "Its keys use torch.nn.utils.spectral_norm naming (weight_orig/weight_u), so it "
                "is not a BigGAN-PyTorch/DGP checkpoint."
            )
        return "It does not look like a BigGAN-PyTorch/DGP checkpoint."
    what = {"G": "generator", "D": "discriminator"}[guess["role"]]
    hint = (
        f"The file looks like a BigGAN {what} with resolution {guess['resolution']} and channel "
        f"width {guess['ch']}"
    )
    if guess["role"] != role:
        hint += f", but it was given as the {'generator' if role == 'G' else 'discriminator'} file"
    width = "G_ch" if guess["role"] == "G" else "D_ch"
    matches = [
        name
        for name, roles in known.items()
        if (kwargs := roles.get(guess["role"])) is not None
        and (kwargs.get("resolution"), kwargs.get(width)) == (guess["resolution"], guess["ch"])
    ]
    if matches:
        hint += f"; its registry name is {matches[0]!r} (e.g. prior={matches[0]})"
    else:
        hint += (
            f"; no registry entry has that shape, build the model with "
            f"resolution={guess['resolution']}, {width}={guess['ch']}"
        )
    return hint + "."


def _pggan_fit_hint(state: Mapping[str, Tensor], known: KnownModels) -> str:
    guess = infer_pggan_config(state)
    if guess is None:
        if any(k.startswith(("synthesis.", "mapping.")) for k in state):
            return "It looks like a StyleGAN generator, which mGANprior's multi-code path does not support."
        return (
            "It does not look like a genforce PGGAN generator (keys layer{i}.conv.weight, "
            "layer{i}.wscale.bias, output{b}.*, lod)."
        )
    res = guess["resolution"]
    hint = (
        f"The file looks like a PGGAN generator for {res}x{res} images (z_dim {guess['z_dim']}, "
        f"widths {guess['channels']})"
    )
    fits = [
        name
        for name, roles in known.items()
        if (kwargs := roles.get("G")) is not None
        and kwargs.get("resolution") == res
        and all(
            pggan_channels(r, kwargs.get("fmaps_base", 16384), kwargs.get("fmaps_max", 512)) == c
            for r, c in guess["channels"].items()
        )
    ]
    if fits:
        shown = ", ".join(fits[:4]) + (", ..." if len(fits) > 4 else "")
        hint += f"; registry configurations with that shape: {shown} (e.g. prior=... prior.name={fits[0]})"
    else:
        hint += "; no registry entry has that shape"
    return hint + "."


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_checkpoint_into(
    model: nn.Module,
    path: str | Path,
    *,
    role: str | None = None,
    strict: bool = True,
    map_location: Any = "cpu",
    label: str | None = None,
    known: KnownModels | None = None,
) -> None:
    """Load a published state-dict file into a BigGAN ``Generator``/``Discriminator`` or a
    ``PGGANGenerator``, with the checks described in the module doc.

    role: 'G' or 'D', which file this is meant to be (default: from the model's type).
    strict: every key must match, except the BigGAN generator's in1/in2 (DGP SPEC §5).
    strict=False behaves like the DGP reference: missing and unexpected keys are ignored,
    shapes are still checked. A PGGAN file must also hold lod=0 (a final checkpoint).
    label: how errors name the model. known: the registry's models (``registry.known_models``),
    which errors name when the file fits one of them.
    """
    if not isinstance(model, Generator | Discriminator | PGGANGenerator):
        raise TypeError(
            f"load_checkpoint_into takes a BigGAN Generator/Discriminator or a PGGANGenerator, "
            f"got {type(model).__name__}"
        )
    path = Path(path).expanduser()
    pggan = isinstance(model, PGGANGenerator)
    role = role or ("D" if isinstance(model, Discriminator) else "G")
    label = label or ("PGGAN generator" if pggan else type(model).__name__)
    if not path.is_file():
        if pggan:
            raise missing_pggan_file_error(path, None, None)
        raise missing_biggan_files_error([path], None)
    state = read_state_dict(
        path,
        f"checkpoint for the {label}",
        map_location=map_location,
        nested=("state_dict", "model", role, f"{role}_ema"),
    )
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
        lines = mismatch_lines(path, label, missing, unexpected, wrong)
        known = known or {}
        lines.append(_pggan_fit_hint(state, known) if pggan else _biggan_fit_hint(state, role, known))
        raise CheckpointError("\n".join(lines))
    if pggan and "lod" in state and float(state["lod"]) != 0.0:
        raise CheckpointError(
            f"checkpoint {path} has lod={float(state['lod'])}; the converted final PGGAN "
            "checkpoints hold lod=0 (a snapshot taken during progressive growing is not supported)"
        )
    model.load_state_dict(state, strict=False)
