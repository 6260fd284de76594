"""Registry of PGGAN generators and the loader for genforce's converted checkpoints.

mGANprior (github.com/genforce/mganprior) loads ``models/pretrain/pytorch/<file>.pth``, plain
state dicts of ``PGGANGeneratorNet`` (mGANprior SPEC §1.3-1.4). The repository does not ship
the ``.pth`` files: its ``models/README.md`` links mirrors of the official PGGAN TensorFlow
pickles (``karras2018iclr-<dataset>.pkl``, first released at
github.com/tkarras/progressive_growing_of_gans), and the reference converts a pickle into the
``.pth`` the first time it builds the model (TensorFlow 1.x needed). genprior reads the
converted file from the directory named by ``prior.weights_dir`` (or a path in
``prior.G_path``), with ``torch.load(weights_only=True)``, strictly: every key of the file,
intermediate toRGBs and ``lod`` included, must fit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genprior.priors.checkpoints import CheckpointError, _read_state_dict, mismatch_lines
from genprior.priors.pggan import INIT_RESOLUTION, PGGANGenerator, pggan_channels

__all__ = [
    "MGANPRIOR_RELEASE",
    "REGISTRY",
    "PGGANEntry",
    "find_pggan_file",
    "get_entry",
    "infer_pggan_config",
    "load_pggan",
    "load_pggan_checkpoint_into",
]

MGANPRIOR_RELEASE = "github.com/genforce/mganprior"
PGGAN_OFFICIAL = "github.com/tkarras/progressive_growing_of_gans"
WEIGHTS_DIR_KEY = "prior.weights_dir"
PATH_KEY = "prior.G_path"


@dataclass(frozen=True)
class PGGANEntry:
    """A named PGGAN: its architecture and the reference's file names (None: no published file)."""

    name: str
    resolution: int
    dataset: str
    weight_file: str | None
    tf_pickle: str | None
    fmaps_base: int = 16384
    fmaps_max: int = 512

    def generator_kwargs(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "fmaps_base": self.fmaps_base, "fmaps_max": self.fmaps_max}

    def describe(self) -> str:
        return f"{self.name} ({self.dataset}, {self.resolution}x{self.resolution})"


def _lsun(word: str, pickle_word: str | None = None) -> PGGANEntry:
    return PGGANEntry(f"pggan_{word}", 256, f"lsun-{word}", f"pggan_{word}256_generator.pth",
                      f"karras2018iclr-lsun-{pickle_word or word}-256x256.pkl")


# The PGGAN part of models/model_settings.py (mGANprior SPEC §1.4). mGANprior's scripts use
# pggan_bedroom, pggan_churchoutdoor and pggan_celebahq.
REGISTRY: dict[str, PGGANEntry] = {
    e.name: e
    for e in (
        PGGANEntry("pggan_celebahq", 1024, "celebahq", "pggan_celebahq1024_generator.pth",
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
        PGGANEntry("pggan_tiny", 256, "random", None, None, fmaps_base=1024, fmaps_max=32),
    )
}


def get_entry(name: str) -> PGGANEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(REGISTRY), n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise CheckpointError(
            f"unknown PGGAN {name!r}.{hint} Known: {', '.join(REGISTRY)}"
        ) from None


def _where_to_get(entry: PGGANEntry | None) -> str:
    if entry is None or entry.weight_file is None:
        return ""
    return (
        f"The file is genforce's PyTorch conversion of the official PGGAN pickle "
        f"{entry.tf_pickle} ({PGGAN_OFFICIAL}). The mGANprior release "
        f"(https://{MGANPRIOR_RELEASE}, models/README.md) links a mirror of that pickle; put it "
        f"in the reference's models/pretrain/tensorflow/ and build the model once with the "
        f"reference code (TensorFlow 1.x), which writes models/pretrain/pytorch/"
        f"{entry.weight_file}. Copy that file"
    )


def _missing_file_error(path: Path, entry: PGGANEntry | None, weights_dir: Path | None) -> CheckpointError:
    where = (
        f"into {weights_dir} (the configured {WEIGHTS_DIR_KEY})"
        if weights_dir is not None
        else f"where {PATH_KEY} points, or into a directory set as {WEIGHTS_DIR_KEY}=<dir>"
    )
    get = _where_to_get(entry)
    how = f"{get} {where}." if get else f"Put a converted PGGAN generator state dict {where}."
    return CheckpointError(f"PGGAN checkpoint file not found: {path}\n{how}")


def find_pggan_file(name: str, weights_dir: str | Path) -> Path:
    """``<weights_dir>/<the reference's file name>``; raises CheckpointError if it is missing."""
    entry = get_entry(name)
    if entry.weight_file is None:
        raise CheckpointError(f"{entry.describe()} has no published checkpoint; use prior.weights=random")
    weights_dir = Path(weights_dir).expanduser()
    path = weights_dir / entry.weight_file
    if not path.is_file():
        raise _missing_file_error(path, entry, weights_dir)
    return path


# --------------------------------------------------------------------------------------------
# Checking a state dict against a model
# --------------------------------------------------------------------------------------------


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
    return {"resolution": INIT_RESOLUTION * 2 ** (blocks - 1), "z_dim": int(first.shape[1]),
            "channels": widths}


def _fit_hint(state: Mapping[str, Tensor]) -> str:
    guess = infer_pggan_config(state)
    if guess is None:
        if any(k.startswith(("synthesis.", "mapping.")) for k in state):
            return "It looks like a StyleGAN generator, which mGANprior's multi-code path does not support."
        return ("It does not look like a genforce PGGAN generator (keys layer{i}.conv.weight, "
                "layer{i}.wscale.bias, output{b}.*, lod).")
    res = guess["resolution"]
    hint = (f"The file looks like a PGGAN generator for {res}x{res} images (z_dim {guess['z_dim']}, "
            f"widths {guess['channels']})")
    fits = [e.name for e in REGISTRY.values()
            if e.resolution == res and all(
                pggan_channels(r, e.fmaps_base, e.fmaps_max) == c
                for r, c in guess["channels"].items())]
    if fits:
        shown = ", ".join(fits[:4]) + (", ..." if len(fits) > 4 else "")
        hint += f"; registry configurations with that shape: {shown} (e.g. prior=... prior.name={fits[0]})"
    else:
        hint += "; no registry entry has that shape"
    return hint + "."


def load_pggan_checkpoint_into(
    model: PGGANGenerator,
    path: str | Path,
    *,
    map_location: Any = "cpu",
    label: str | None = None,
) -> None:
    """Strictly load a converted PGGAN state dict into ``model``; explain any mismatch."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise _missing_file_error(path, None, None)
    state = _read_state_dict(path, "G", map_location)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        lines = mismatch_lines(path, label or "PGGAN generator", missing, unexpected, wrong)
        lines.append(_fit_hint(state))
        raise CheckpointError("\n".join(lines))
    lod = float(state["lod"])
    if lod != 0.0:
        raise CheckpointError(
            f"checkpoint {path} has lod={lod}; the converted final PGGAN checkpoints hold lod=0 "
            "(a snapshot taken during progressive growing is not supported)"
        )
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------
# The public loader
# --------------------------------------------------------------------------------------------


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
    entry: PGGANEntry | None = None
    if isinstance(name, str):
        entry = get_entry(name)
        kwargs = entry.generator_kwargs()
        label = f"PGGAN generator {entry.describe()}"
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
        if weights_dir is None or entry is None or entry.weight_file is None:
            raise CheckpointError(
                f"no checkpoint file for {label}: set {PATH_KEY}=<file>"
                + (f" or {WEIGHTS_DIR_KEY}=<dir holding {entry.weight_file}>"
                   if entry is not None and entry.weight_file else
                   " (this configuration has no published file; prior.weights=random runs it "
                   "with random weights)")
            )
        path = Path(weights_dir).expanduser() / entry.weight_file
    path = Path(path).expanduser()
    if not path.is_file():
        raise _missing_file_error(path, entry, Path(weights_dir).expanduser() if weights_dir else None)
    # Every tensor comes from the file: allocate without the random init of 23M weights.
    with torch.device("meta"):
        G = PGGANGenerator(**kwargs)
    # In the run's dtype before loading: the file's values are copied, not rounded via float32.
    G = G.to_empty(device=device or "cpu").to(dtype)
    load_pggan_checkpoint_into(G, path, map_location=map_location, label=label)
    return _freeze(G)


def _freeze(G: PGGANGenerator) -> PGGANGenerator:
    for p in G.parameters():
        p.requires_grad_(False)
    return G.eval()
