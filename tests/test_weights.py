"""genprior.weights.read_state_dict: the one reader of untrusted weight files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from genprior.priors.checkpoints import CheckpointError
from genprior.weights import WeightsFileError, read_state_dict

WHAT = "LPIPS backbone weights"


class _Payload:
    """A pickled custom object: weights_only loading must refuse it."""


class _RunsCode:
    """Unpickling this calls os.getcwd: a code payload."""

    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def _state() -> dict[str, torch.Tensor]:
    return {"features.0.weight": torch.arange(6.0).view(2, 3), "features.0.bias": torch.ones(2)}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_plain_nested_prefixed_and_safetensors_files(tmp_path: Path) -> None:
    state = _state()
    torch.save(state, tmp_path / "plain.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "nested.pth")
    torch.save({"model": state, "optimizer": {}}, tmp_path / "model.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    save_file(state, str(tmp_path / "st.safetensors"))
    for name in ("plain.pth", "legacy.pth", "nested.pth", "model.pth", "ddp.pth", "st.safetensors"):
        assert _equal(read_state_dict(tmp_path / name, WHAT), state), name
    # other wrapper keys only when the caller names them
    torch.save({"G_ema": state}, tmp_path / "g.pth")
    assert _equal(read_state_dict(tmp_path / "g.pth", WHAT, nested=("G_ema",)), state)
    with pytest.raises(WeightsFileError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "g.pth", WHAT)


def test_the_priors_checkpoint_error_is_the_same_class() -> None:
    assert CheckpointError is WeightsFileError
    assert issubclass(WeightsFileError, ValueError)


def test_missing_file_names_it_and_the_hint(tmp_path: Path) -> None:
    with pytest.raises(WeightsFileError) as info:
        read_state_dict(tmp_path / "alexnet.pth", WHAT, hint="Download it from example.org into ~/x.")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{WHAT} not found: {tmp_path / 'alexnet.pth'}")
    assert "Download it from example.org into ~/x." in message
    with pytest.raises(WeightsFileError, match="is not a file"):
        read_state_dict(tmp_path, WHAT)


@pytest.mark.parametrize("payload", [_Payload(), _RunsCode()], ids=["object", "reduce"])
def test_pickled_code_is_refused_without_running_it(tmp_path: Path, payload: object) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as fh:  # protocol 2, what torch.save writes
        pickle.dump({"w": torch.zeros(1), "x": payload}, fh, protocol=2)
    torch.save({"w": torch.zeros(1), "x": _Payload()}, tmp_path / "evil_torch.pth")
    for p in (path, tmp_path / "evil_torch.pth"):
        with pytest.raises(WeightsFileError) as info:
            read_state_dict(p, WHAT)
        message = str(info.value)
        assert "\n" not in message and str(p) in message and WHAT in message
        assert "refused: the file contains pickled code, which genprior never executes" in message
        assert "weights_only=False" not in message


def test_corrupt_and_truncated_files(tmp_path: Path) -> None:
    torch.save(_state(), tmp_path / "good.pth")
    good = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(good[: len(good) // 2])
    (tmp_path / "random.pth").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    for name in ("truncated.pth", "random.pth", "empty.pth", "bad.safetensors"):
        with pytest.raises(WeightsFileError) as info:
            read_state_dict(tmp_path / name, WHAT)
        message = str(info.value)
        assert "\n" not in message and "weights_only=False" not in message
        assert message.startswith(f"cannot read {WHAT} {tmp_path / name}: it is corrupt"), message


def test_files_that_are_not_state_dicts(tmp_path: Path) -> None:
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    torch.save({}, tmp_path / "empty_dict.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_tensors.pth")
    expected = {"list.pth": "found a list", "empty_dict.pth": "found an empty dict",
                "no_tensors.pth": "found a dict with keys ['epoch', 'lr']"}
    for name, found in expected.items():
        with pytest.raises(WeightsFileError) as info:
            read_state_dict(tmp_path / name, WHAT)
        message = str(info.value)
        assert "\n" not in message and str(tmp_path / name) in message and found in message
