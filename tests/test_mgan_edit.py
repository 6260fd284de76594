"""mGANprior's edits (genprior.tasks.mgan_edit): the saved multi-code fit, InterFaceGAN
boundaries, moving codes along a boundary, style mixing, and both tasks through train.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from genprior import engine
from genprior.cli.train import run_train
from genprior.degradations import Identity
from genprior.errors import MissingFileError, UserError
from genprior.image_io import labelled_sheet_size
from genprior.items import ImageBatch
from genprior.methods.mganprior import MGANConfig, MGANPrior
from genprior.multicode import (
    FIT_FILE,
    RANDOM_BOUNDARIES,
    BoundaryError,
    MultiCodeFitError,
    SavedMultiCode,
    load_boundary,
    pggan_weights_identity,
    random_boundary,
)
from genprior.priors.pggan import PGGANGenerator
from genprior.tasks.mgan_edit import CodeRenderer, adain, shift_codes

PRIOR = {"name": "pggan_small", "kind": "pggan", "weights": "random", "init_seed": 0}


def _fitted(G: PGGANGenerator, ids: list[str], layer: int = 4) -> MGANPrior:
    """An mGANprior method after two SGD steps on random images (through engine.step)."""
    method = MGANPrior(G, MGANConfig(composing_layer=layer, z_number=3, iterations=2, vgg_lambda=0),
                       Identity())
    g = torch.Generator().manual_seed(1)
    images = torch.rand(len(ids), 3, 32, 32, generator=g) * 2 - 1
    method.start(ImageBatch(images=images, classes=torch.full((len(ids),), -1), ids=ids,
                            paths=[f"memory:{i}" for i in ids]))
    optimizer = method.make_optimizer()
    while not method.progress.all_done():
        engine.step(method, optimizer)
    return method


def _fit(G: PGGANGenerator, method: MGANPrior, b: int) -> SavedMultiCode:
    return SavedMultiCode.from_method(method, b, PRIOR, pggan_weights_identity(PRIOR, G))


def _unit(path: Path, seed: int, dim: int = 512) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((1, dim))
    v /= np.linalg.norm(v)
    np.save(path, v)
    return v


# ------------------------------------------------------------------------------ the saved fit
def test_saved_fit_round_trips_and_rerenders_the_inversion_exactly(small_pggan: PGGANGenerator,
                                                                    tmp_path: Path) -> None:
    method = _fitted(small_pggan, ["a"])
    expected = method.final_output()
    fit = _fit(small_pggan, method, 0)
    path = fit.save(tmp_path / "a" / FIT_FILE)
    loaded = SavedMultiCode.load(tmp_path / "a")  # the folder finds mgan_fit.pt
    assert torch.equal(loaded.z, method.z[0].detach()) and torch.equal(loaded.alpha, method.alpha[0].detach())
    assert loaded.composing_layer == 4 and loaded.average_codes and loaded.path == path
    assert loaded.target is not None and loaded.target.dtype == torch.uint8
    assert tuple(loaded.target.shape) == (3, 32, 32)
    renderer = CodeRenderer(small_pggan, pggan_weights_identity(PRIOR, small_pggan))
    renderer.load(path)  # checked against the generator and its digest
    # the same codes through the same kernels at the same batch size: bit for bit
    assert torch.equal(renderer.render(loaded), expected)


def test_bad_fit_files_give_one_line_errors(small_pggan: PGGANGenerator, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(MultiCodeFitError, match=r"cannot read saved mGANprior fit .*garbage\.pt"):
        SavedMultiCode.load(garbage)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(MultiCodeFitError, match="is not a genprior mGANprior fit"):
        SavedMultiCode.load(tmp_path / "other.pt")
    with pytest.raises(MultiCodeFitError, match="does not exist"):
        SavedMultiCode.load(tmp_path / "nowhere")
    fit = _fit(small_pggan, _fitted(small_pggan, ["a"]), 0)
    payload = fit.to_payload()
    payload["alpha"] = payload["alpha"][:2]
    with pytest.raises(MultiCodeFitError, match="z has 3 codes but alpha 2"):
        SavedMultiCode.from_payload(payload)
    # other weights: the digest differs
    other = PGGANGenerator(32, fmaps_base=256, fmaps_max=16).requires_grad_(False)
    renderer = CodeRenderer(other, pggan_weights_identity(PRIOR, other))
    with pytest.raises(MultiCodeFitError, match="fitted on other generator weights"):
        renderer.load(fit.save(tmp_path / "a" / FIT_FILE))
    assert issubclass(MultiCodeFitError, UserError)


# ------------------------------------------------------------------------------ boundaries
def test_boundary_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError) as missing:
        load_boundary(tmp_path, "pggan_celebahq", "age", 512)
    message = str(missing.value)
    assert "pggan_celebahq_age_boundary.npy" in message and str(tmp_path) in message
    assert "github.com/genforce/interfacegan" in message and "\n" not in message
    np.save(tmp_path / "p_wide_boundary.npy", np.ones((1, 256)) / 16)
    with pytest.raises(BoundaryError, match=r"shape \[1, 256\]"):
        load_boundary(tmp_path, "p", "wide", 512)
    np.save(tmp_path / "p_long_boundary.npy", 2 * _unit(tmp_path / "x.npy", 0))
    with pytest.raises(BoundaryError, match="norm 2, not 1"):
        load_boundary(tmp_path, "p", "long", 512)
    np.save(tmp_path / "p_obj_boundary.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BoundaryError, match="cannot read boundary"):
        load_boundary(tmp_path, "p", "obj", 512)
    v = _unit(tmp_path / "p_ok_boundary.npy", 1)
    np.save(tmp_path / "p_near_boundary.npy", v.astype(np.float32))  # float32 rounding of a unit
    normal = load_boundary(tmp_path, "p", "near", 512)
    assert normal.dtype == torch.float64 and tuple(normal.shape) == (512,)
    # renormalised in float64: unit up to float64 rounding of a 512-term sum (~1e-16 each)
    assert abs(float(normal.norm()) - 1.0) < 1e-12


def test_moving_along_a_boundary_changes_the_projection_by_the_strength(tmp_path: Path) -> None:
    _unit(tmp_path / "p_age_boundary.npy", 2)
    normal = load_boundary(tmp_path, "p", "age", 512)
    z = torch.randn(5, 512, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    strengths = [-3.0, -0.5, 0.0, 1.0, 4.2]
    moved = shift_codes(z, normal, strengths)
    assert moved.shape == (5, 5, 512) and torch.equal(moved[2], z)  # t = 0 leaves the codes
    for s, t in enumerate(strengths):
        change = (moved[s] - z) @ normal
        # float64 dot products of 512 terms of size ~|t|/sqrt(512): rounding ~1e-15
        torch.testing.assert_close(change, torch.full((5,), t, dtype=torch.float64), rtol=0, atol=1e-12)
        # and nothing moves orthogonally to the boundary
        rest = (moved[s] - z) - change[:, None] * normal
        assert float(rest.abs().max()) < 1e-12


def test_strength_zero_renders_the_inversion(small_pggan: PGGANGenerator) -> None:
    fit = _fit(small_pggan, _fitted(small_pggan, ["a"]), 0)
    normal = torch.randn(512, dtype=torch.float64)
    normal /= normal.norm()
    alone = CodeRenderer(small_pggan, fit.weights).render(fit)
    # one edit per generator pass: the same kernels as the inversion's, so bit for bit
    images = CodeRenderer(small_pggan, fit.weights, chunk=1).render(fit, shift_codes(fit.z, normal, [0.0, 2.0]))
    assert torch.equal(images[0:1], alone)
    assert not torch.allclose(images[1], alone[0], atol=1e-3)  # a real move changes the image
    # chunked (both edits in one pass): batched kernels may round differently, float32 ~1e-6
    chunked = CodeRenderer(small_pggan, fit.weights, chunk=2).render(fit, shift_codes(fit.z, normal, [0.0, 2.0]))
    torch.testing.assert_close(chunked, images, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ style mixing
def test_style_mixing_with_every_layer_from_a_is_a(small_pggan: PGGANGenerator) -> None:
    method = _fitted(small_pggan, ["a", "b"])
    a, b = _fit(small_pggan, method, 0), _fit(small_pggan, method, 1)
    renderer = CodeRenderer(small_pggan, a.weights)
    inv_a = renderer.render(a)
    n_layers = small_pggan.num_layers
    assert torch.equal(renderer.mix(a, b, n_layers), inv_a)  # nothing from B: exactly A
    mixed = renderer.mix(a, b, a.composing_layer)
    assert not torch.allclose(mixed, inv_a, atol=1e-3)  # B's statistics change the image
    # A with its own statistics is A: AdaIN(h, h) = h up to rounding (values O(1), float32)
    torch.testing.assert_close(renderer.mix(a, a, a.composing_layer), inv_a, rtol=1e-4, atol=1e-4)
    x, s = torch.randn(2, 4, 8, 8), 3 * torch.randn(2, 4, 8, 8) + 1
    y = adain(x, s)
    torch.testing.assert_close(y.mean((2, 3)), s.mean((2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.var((2, 3), unbiased=False), s.var((2, 3), unbiased=False),
                               rtol=1e-4, atol=1e-4)  # the eps 1e-5 in both deviations
    with pytest.raises(UserError, match="crossover layer 2"):
        renderer.mix(a, b, 2)


# ------------------------------------------------------------------------------ train.py
def _data(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(folder / f"im{k}.png")
    return folder


BASE = ["prior=pggan_tiny", "mganprior.iterations=2", "mganprior.z_number=3", "mganprior.vgg_lambda=0",
        "mganprior.composing_layer=6", "trainer.enable_progress_bar=false", "logger=none",
        "mgan_edit.tile_size=32"]


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_semantic_task_through_train_py(tmp_path: Path) -> None:
    data = _data(tmp_path / "data", 1)
    bdir = tmp_path / "boundaries"
    bdir.mkdir()
    for k, attribute in enumerate(("age", "smile")):
        _unit(bdir / f"pggan_tiny_{attribute}_boundary.npy", k)
    args = [*BASE, "task=mgan_semantic", f"mgan_edit.boundaries_dir={bdir}",
            "mgan_edit.attributes=[age,smile]", "mgan_edit.strengths=[-2,0,2]"]
    out = tmp_path / "out"
    assert run_train([*args, f"data.source={data}", f"output.dir={out}"]) == 0
    fit_row, edit_row = _rows(out)
    assert fit_row["status"] == edit_row["status"] == "ok" and edit_row["task"] == "mgan_semantic"
    assert edit_row["psnr"] == fit_row["psnr"]  # the inversion's metrics ride on the edit row
    folder = out / "im0"
    sheet = Image.open(edit_row["outputs"]["sheet"])
    # rows: attributes; columns: target, inversion, t; one band of column titles
    assert sheet.size == labelled_sheet_size(2, 2 + 3, 32, labelled_rows=1, row_labels=["age", "smile"])
    # the saved fit re-renders the engine's result, and t = 0 is the inversion
    result = np.asarray(Image.open(folder / "result.png"))
    assert np.array_equal(np.asarray(Image.open(folder / "inversion.png")), result)
    zero = np.asarray(Image.open(folder / "semantic" / "age" / "0.png")).astype(int)
    # t = 0 is rendered in a batch of 3 edits, the inversion alone: batched conv kernels may round
    # differently (~1e-7), which can move a truncated uint8 pixel by one level
    assert np.abs(zero - result).max() <= 1
    assert (folder / "semantic_smile.gif").is_file()
    # the saved fit edited again, with a broken file beside it that fails alone
    broken = tmp_path / "broken" / FIT_FILE
    broken.parent.mkdir()
    broken.write_bytes(b"garbage")
    again = tmp_path / "again"
    assert run_train([*args, f"mgan_edit.saved=[{folder},{broken}]", f"output.dir={again}"]) == 0
    ok, failed = _rows(again)
    assert ok["status"] == "ok" and failed["status"] == "failed" and "garbage" not in ok["path"]
    assert "cannot read saved mGANprior fit" in failed["error"]
    assert np.array_equal(np.asarray(Image.open(again / "im0" / "semantic.png")), np.asarray(sheet))


def test_style_mixing_task_through_train_py(tmp_path: Path) -> None:
    data = _data(tmp_path / "data", 2)
    out = tmp_path / "out"
    assert run_train([*BASE, "task=mgan_style_mixing", "mgan_edit.mix_layers=[6,10,15]",
                      "trainer.batch_size=2", f"data.source={data}", f"output.dir={out}"]) == 0
    rows = _rows(out)
    assert [r["id"] for r in rows] == ["im0", "im1", "im0_im1"] and all(r["status"] == "ok" for r in rows)
    sheet = Image.open(rows[-1]["outputs"]["sheet"])
    assert sheet.size == labelled_sheet_size(2, 2 + 3 + 2, 32, labelled_rows=1,
                                             row_labels=["A=im0 +B", "B=im1 +A"])
    # k = 15 (the number of layers): nothing from the other image, so A's inversion
    a15 = np.asarray(Image.open(out / "im0_im1" / "mixing" / "im0_from15.png")).astype(int)
    result = np.asarray(Image.open(out / "im0" / "result.png")).astype(int)
    # the engine rendered both images in one batch, the mix one image: batched conv kernels may
    # round differently (~1e-7), which can move a truncated uint8 pixel by one level
    assert np.abs(a15 - result).max() <= 1


def test_missing_boundary_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GENPRIOR_DEBUG", raising=False)
    code = run_train([*BASE, "task=mgan_semantic", f"mgan_edit.boundaries_dir={tmp_path}",
                      f"output.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "pggan_tiny_age_boundary.npy" in err and "github.com/genforce/interfacegan" in err
    assert not (tmp_path / "out").exists()  # stopped before anything is fitted or written


def test_random_boundaries_make_the_tiny_preset_self_contained(tmp_path: Path) -> None:
    """boundaries_dir=random: seeded unit normals (the same for an attribute and seed), so
    prior=pggan_tiny task=mgan_semantic_quick runs with no file at all."""
    a = load_boundary(RANDOM_BOUNDARIES, "ignored", "age", 512, seed=0)
    assert a.dtype == torch.float64 and abs(float(a.norm()) - 1.0) < 1e-12  # float64 rounding
    assert torch.equal(a, random_boundary("age", 512, seed=0))
    assert not torch.equal(a, random_boundary("smile", 512, seed=0))
    assert not torch.equal(a, random_boundary("age", 512, seed=1))
    out = tmp_path / "out"
    assert run_train(["prior=pggan_tiny", "task=mgan_semantic_quick", "mganprior.iterations=2", "mgan_edit.tile_size=32",
                      "trainer.enable_progress_bar=false", f"output.dir={out}"]) == 0
    sheet = Image.open(out / "astronaut" / "semantic.png")
    # rows age, smile; columns target, inversion, t = -2, 0, +2
    assert sheet.size == labelled_sheet_size(2, 5, 32, labelled_rows=1, row_labels=["age", "smile"])
