"""The one reader of weight files genprior did not write itself.

Published checkpoints (BigGAN, PGGAN), downloaded backbones (LPIPS, VGG-16) and any file a
user points a config key at are untrusted: :func:`read_state_dict` reads ``.safetensors`` files
with safetensors and everything else with ``torch.load(weights_only=True)``, so no pickled code
ever runs. It returns a plain ``{name: Tensor}`` dict, also when the file nests it under
``state_dict``/``model`` (or other keys the caller names) or was saved from a
``(Distributed)DataParallel`` wrapper (every key prefixed ``module.``).

Every problem is one :class:`WeightsFileError` with a one-line message that names the file and
what it was for: the file is missing (with the caller's hint on where to get it), holds pickled
code, is corrupt or truncated, or holds something other than a state dict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genprior.errors import UserError

__all__ = ["WeightsFileError", "is_state_dict", "read_state_dict"]

DEFAULT_NESTED_KEYS = ("state_dict", "model")
_MAX_LISTED = 8
_MAX_DETAIL = 200


class WeightsFileError(ValueError, UserError):
    """A weights file is missing, unreadable, not a state dict, or does not fit its model."""


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of str to Tensor."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def read_state_dict(
    path: str | Path,
    what: str,
    *,
    hint: str | None = None,
    map_location: Any = "cpu",
    nested: Sequence[str] = DEFAULT_NESTED_KEYS,
) -> dict[str, Tensor]:
    """The state dict held by ``path``, read without running pickled code.

    ``what`` says what the file is for ("LPIPS backbone weights", "checkpoint of the BigGAN
    generator ..."); every error message names it with the path. ``hint`` is added to the
    missing-file message: where to get the file and where to put it. ``nested``: keys under
    which a wrapper dict may hold the state dict, tried in order. ``map_location`` is torch's
    (a device for .safetensors files).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        problem = "is not a file" if path.exists() else "not found"
        raise WeightsFileError(
            f"{what} {problem}: {path}" + (f". {_one_line(hint)}" if hint else "")
        )
    obj = _read_safetensors(path, what, map_location) if path.suffix == ".safetensors" else (
        _read_torch(path, what, map_location)
    )
    return _unwrap(obj, path, what, nested)


def _read_torch(path: Path, what: str, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for bad files: report them all alike
        text = str(err)
        code = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.<>]+)", text, re.IGNORECASE)
        if code:
            raise WeightsFileError(
                f"{what} {path} refused: the file contains pickled code, which genprior never "
                f"executes from an untrusted file (it reads weights with "
                f"torch.load(weights_only=True), and the file needs the Python object "
                f"{code.group(1)}). Accepted: a dict of tensors only, saved with "
                f"torch.save(model.state_dict(), path), or a .safetensors file"
            ) from err
        raise WeightsFileError(
            f"cannot read {what} {path}: it is corrupt, truncated or not a torch or "
            f"safetensors file ({_torch_detail(err)})"
        ) from err


def _read_safetensors(path: Path, what: str, map_location: Any) -> dict[str, Tensor]:
    from safetensors.torch import load_file  # optional file format: imported only to read one

    device = str(map_location) if isinstance(map_location, str | torch.device) else "cpu"
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # SafetensorError, OSError, ...
        raise WeightsFileError(
            f"cannot read {what} {path}: it is corrupt, truncated or not a safetensors file "
            f"({type(err).__name__}: {_one_line(str(err))})"
        ) from err


def _torch_detail(err: Exception) -> str:
    """The informative part of torch's error: never its advice to load with weights_only=False."""
    text = str(err)
    match = re.search(r"(Unsupported (?:operand|class|opcode)[^\n]*)", text, re.IGNORECASE)
    if match:
        detail = match.group(1)
    elif "weights_only" in text:
        detail = ""  # the rest is torch's advice on unsafe loading
    else:
        detail = text.split(". ")[0]  # torch's first sentence; the rest is advice
    detail = _one_line(detail)
    return f"{type(err).__name__}: {detail}" if detail else type(err).__name__


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _unwrap(obj: Any, path: Path, what: str, nested: Sequence[str]) -> dict[str, Tensor]:
    if not is_state_dict(obj) and isinstance(obj, Mapping):
        for key in nested:
            if is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not is_state_dict(obj):
        if isinstance(obj, Mapping):
            keys = [str(k) for k in list(obj)[:_MAX_LISTED]]
            found = f"a {type(obj).__name__} with keys {keys}" if keys else "an empty dict"
        else:
            found = f"a {type(obj).__name__}"
        under = " or ".join(repr(k) for k in nested)
        raise WeightsFileError(
            f"{what} {path} does not hold a state dict: found {found}; expected a dict of "
            f"tensors" + (f", at the top level or under {under}" if nested else "")
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from (Distributed)DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state
