"""Manipulation after a reconstruction (SPEC §9): saved files, jitter, morphing, category transfer.

Everything runs on the tiny random BigGAN (prior=biggan_tiny) on the CPU. The unit tests use a
DGP whose per-image tensors were moved by hand (a "fit" without the optimisation); the
end-to-end tests run train.py (genprior.tasks.manipulation.run) with a few steps.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from PIL import Image

from genprior import engine
from genprior.callbacks import ResultRows, SaveReconstructions
from genprior.cli.train import run_train
from genprior.config import compose
from genprior.items import ImageBatch, ImageItem
from genprior.methods import DGP
from genprior.priors.registry import build_biggan
from genprior.saved import SavedReconstruction, SavedReconstructionError, weights_identity
from genprior.tasks import manipulation
from genprior.tasks.manipulation import (
    FittedPrior,
    category_transfer,
    interpolate_states,
    jitter,
    log_media,
    morph,
    resolve_classes,
)

TINY = ["prior=biggan_tiny", "trainer.accelerator=cpu", "dgp.select_num=0", "dgp.update_embed=true"]
# A frame rendered in a batch of several images (or by the fit's stacked renderer) runs other
# kernels than a batch-1 reconstruction: measured max 1.8e-6 apart (threads 1/2/4), so 3e-5 is a
# 17x margin; another image, class or state moves pixels by >1e-3. Two batch-1 renders of the
# same state, latent and class are the same computation and are compared bit for bit.
RENDER_ATOL = 3e-5


def _prior_dict(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.prior, resolve=True)  # type: ignore[return-value]


def _fresh_prior(cfg: Any) -> FittedPrior:
    """A prior built from the config alone, as a later run editing saved files does."""
    G, _ = build_biggan(cfg.prior, need_D=False)
    return FittedPrior(G, dict(G.state_dict()), _prior_dict(cfg))


@pytest.fixture(scope="module")
def fitted() -> dict[str, Any]:
    """Two images "fitted" by moving their tensors, z and class embeddings away from the prior."""
    cfg = compose([*TINY, "task=morphing"])
    method = DGP.from_config(cfg)
    gen = torch.Generator().manual_seed(0)
    items = [ImageItem(id=name, path=name, image=torch.rand(3, 128, 128, generator=gen) * 2 - 1,
                       class_id=cls) for name, cls in (("a", 3), ("b", 7))]
    method.start(ImageBatch.of(items))
    with torch.no_grad():
        for t in [*method.trainable.values(), method.embed_weight]:
            t.add_(0.02 * t.std() * torch.randn(t.shape, generator=gen))
        method.z.add_(torch.randn(method.z.shape, generator=gen))
    prior_cfg = _prior_dict(cfg)
    weights = weights_identity(prior_cfg, method.G_weight)
    recs = [SavedReconstruction.from_method(method, b, prior_cfg, weights, task="morphing")
            for b in range(2)]
    prior = FittedPrior(method.G, method.G_weight, prior_cfg, weights)
    return {"cfg": cfg, "method": method, "recs": recs, "prior": prior}


def test_saved_reconstruction_reloads_and_renders_identically(fitted: dict, tmp_path: Path) -> None:
    prior, method = fitted["prior"], fitted["method"]
    fresh = _fresh_prior(fitted["cfg"])
    stacked = method.final_render()
    for b, rec in enumerate(fitted["recs"]):
        before = prior.reconstruction(prior.fitted(rec))
        loaded = fresh.load(rec.save(tmp_path / rec.image_id / "reconstruction.pt"))
        assert loaded.class_id == int(method.y[b]) and torch.equal(loaded.z, method.z[b].detach())
        # the file round trip restores the same tensors, and both render a batch of 1
        assert torch.equal(fresh.reconstruction(loaded), before)
        # the batched (stacked) renderer of the fit agrees to float rounding (RENDER_ATOL)
        torch.testing.assert_close(before, stacked[b], atol=RENDER_ATOL, rtol=0)
    # only the tuned tensors are stored: never the output layer or the BN/SN buffers
    rec = fitted["recs"][0]
    assert "shared.weight" in rec.changed and "linear.weight" in rec.changed
    assert not any(k.startswith("output_layer.") or k.endswith((".u0", ".sv0", "stored_mean"))
                   for k in rec.changed)


def test_instance_norm_reconstruction_renders_identically_after_reload(fitted: dict, tmp_path: Path) -> None:
    """A fit whose last stage used IN keeps its initialised IN parameters in the file."""
    method, prior = fitted["method"], fitted["prior"]
    config = replace(method.config, use_in=[True] * len(method.config.iterations))
    with_in = DGP(method.G, method.D, config, method.degradation)
    with_in.start(ImageBatch(images=method.target_origin[:1].cpu(), classes=method.y[:1].cpu(),
                             ids=["c"], paths=["c"]))
    with torch.no_grad():
        with_in.loss()  # the first IN forward initialises in1/in2 from the BN path (SPEC §3.4)
    rec = SavedReconstruction.from_method(with_in, 0, prior.prior, prior.weights, task="reconstruct")
    assert rec.use_in and len(rec.in_initialized) == len(method.G.blocks)
    assert any(".in1." in k for k in rec.changed)
    loaded = prior.load(rec.save(tmp_path / "c.pt"))
    # one image on both sides, but the fit renders through its stacked tensors: measured 0
    # (threads 1/2/4), compared with RENDER_ATOL all the same
    torch.testing.assert_close(prior.reconstruction(loaded, use_in=True), with_in.final_render()[0],
                               atol=RENDER_ATOL, rtol=0)
    with pytest.raises(ValueError, match="not fitted with instance norm"):
        prior.reconstruction(prior.fitted(fitted["recs"][0]), use_in=True)


def test_morph_endpoints_are_the_two_reconstructions(fitted: dict) -> None:
    prior = fitted["prior"]
    a, b = (prior.fitted(r) for r in fitted["recs"])
    frames = morph(prior, a, b, [0.0, 0.5, 1.0])
    # At λ = 0 and 1 the interpolated state, latent and class vector are a's (b's) exactly, and
    # morph renders every frame as a batch of 1 like reconstruction(): the same computation.
    assert torch.equal(frames[0], prior.reconstruction(a))
    assert torch.equal(frames[2], prior.reconstruction(b))
    assert not torch.allclose(frames[1], frames[0], atol=1e-3)
    assert not torch.allclose(frames[1], frames[2], atol=1e-3)


def test_interpolation_covers_every_state_entry_buffers_included() -> None:
    a = {"w": torch.zeros(3), "bn.stored_mean": torch.zeros(2), "shared": torch.ones(1)}
    b = {"w": torch.ones(3) * 2, "bn.stored_mean": torch.ones(2) * 4, "shared": a["shared"]}
    mid = interpolate_states(a, b, 0.25)
    assert torch.equal(mid["w"], torch.full((3,), 0.5))
    assert torch.equal(mid["bn.stored_mean"], torch.ones(2))
    assert mid["shared"] is a["shared"]  # the same tensor in both stays untouched


def test_jitter_with_std_zero_returns_the_reconstruction(fitted: dict) -> None:
    prior = fitted["prior"]
    f = prior.fitted(fitted["recs"][0])
    recon = prior.reconstruction(f)
    gen = torch.Generator().manual_seed(1)
    # one sample at std 0 is z* itself in a batch of 1: the reconstruction's computation
    assert torch.equal(jitter(prior, f, [0.0], 1, gen)[0, 0], recon)
    out = jitter(prior, f, [0.0, 0.5], 3, torch.Generator().manual_seed(1))
    assert out.shape == (2, 3, 3, 128, 128)
    for k in range(3):  # in a batch of 6 the kernels round differently: RENDER_ATOL
        torch.testing.assert_close(out[0, k], recon, atol=RENDER_ATOL, rtol=0)
        assert not torch.allclose(out[1, k], recon, atol=1e-3)
    again = jitter(prior, f, [0.0, 0.5], 3, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # seeded


def test_category_transfer_to_the_original_class_returns_the_reconstruction(fitted: dict) -> None:
    prior = fitted["prior"]
    f = prior.fitted(fitted["recs"][0])
    recon = prior.reconstruction(f)
    # one class, the image's own: a batch of 1, the reconstruction's computation
    assert torch.equal(category_transfer(prior, f, [f.class_id])[0], recon)
    out = category_transfer(prior, f, [0, f.class_id, 500])
    # in a batch of 3 the kernels round differently: RENDER_ATOL
    torch.testing.assert_close(out[1], recon, atol=RENDER_ATOL, rtol=0)
    assert not torch.allclose(out[0], recon, atol=1e-3)


def test_class_names_indices_and_ranges() -> None:
    assert resolve_classes(["207", "151-153", "tabby cat", "n02099601"]) == [207, 151, 152, 153, 281, 207]
    with pytest.raises(ValueError, match=r"ambiguous.*134.*517"):
        resolve_classes(["crane"])
    with pytest.raises(ValueError, match="golden retriever"):
        resolve_classes(["golden retreiver"])
    with pytest.raises(ValueError, match="outside"):
        resolve_classes(["999-1000"])


def test_corrupt_or_foreign_files_give_clear_errors(fitted: dict, tmp_path: Path) -> None:
    prior, rec = fitted["prior"], fitted["recs"][0]
    good = rec.save(tmp_path / "good.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (garbage, truncated):
        with pytest.raises(SavedReconstructionError, match=f"cannot read saved reconstruction {path}"):
            prior.load(path)
    plain = tmp_path / "plain_state_dict.pt"
    torch.save(fitted["method"].G.state_dict(), plain)
    with pytest.raises(SavedReconstructionError, match="not a genprior saved reconstruction"):
        prior.load(plain)
    with pytest.raises(SavedReconstructionError, match="does not exist"):
        prior.load(tmp_path / "missing")
    payload = rec.to_payload()
    del payload["z"]
    torch.save(payload, tmp_path / "no_z.pt")
    with pytest.raises(SavedReconstructionError, match=r"damaged.*z \(missing\)"):
        prior.load(tmp_path / "no_z.pt")


def test_files_for_another_prior_are_refused(fitted: dict, tmp_path: Path) -> None:
    path = fitted["recs"][0].save(tmp_path / "a.pt")
    # other random weights (init_seed 1): same architecture, different digest
    other = _fresh_prior(compose([*TINY, "task=jitter", "prior.init_seed=1"]))
    with pytest.raises(SavedReconstructionError, match=r"other generator weights.*init_seed=0.*init_seed=1"):
        other.load(path)
    # another architecture (checked from the configs, before any tensor)
    wide = _prior_dict(compose([*TINY, "task=jitter", "prior.G_ch=16"]))
    with pytest.raises(SavedReconstructionError, match=r"a\.pt was fitted with prior 'biggan_tiny' \(G_ch=8\).*G_ch=16"):
        SavedReconstruction.load(path).check_architecture(wide)
    # tensors of the wrong shape
    rec = SavedReconstruction.load(path)
    rec.changed["linear.weight"] = rec.changed["linear.weight"][:, :5]
    rec.save(tmp_path / "bad_shape.pt")
    with pytest.raises(SavedReconstructionError, match=r"bad_shape\.pt does not fit.*linear\.weight"):
        fitted["prior"].load(tmp_path / "bad_shape.pt")


# ------------------------------------------------------------------------------- train.py

FAST = [*TINY, "dgp.iterations=[1,1,1]", "trainer.enable_progress_bar=false", "logger=csv",
        "manipulation.jitter_samples=2"]


def _durations(gif: Image.Image) -> list[int]:
    out = []
    for k in range(gif.n_frames):
        gif.seek(k)
        out.append(int(gif.info["duration"]))
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def morph_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.py task=morphing on two images of one class: fits both, saves them, morphs."""
    folder = tmp_path_factory.mktemp("morph")
    for name, colour in (("left", (200, 40, 30)), ("right", (20, 60, 220))):
        Image.new("RGB", (150, 130), colour).save(folder / f"{name}.png")
    (folder / "list.txt").write_text(f"{folder / 'left.png'} 5\n{folder / 'right.png'} 5\n")
    out = folder / "run"
    assert run_train([*FAST, "task=morphing", f"data.source={folder / 'list.txt'}",
                      "trainer.batch_size=2", "manipulation.interpolate_class=false",
                      f"output.dir={out}"]) == 0
    return out


def test_train_py_morphing_fits_saves_and_morphs(morph_run: Path) -> None:
    rows = _rows(morph_run)
    assert [r.get("task") for r in rows] == [None, None, "morphing"]
    assert all(r["status"] == "ok" for r in rows)
    pair = morph_run / "left_right"
    assert sorted(p.name for p in (pair / "morph").iterdir()) == [f"{k:03d}.png" for k in range(1, 12)]
    gif = Image.open(pair / "morphing.gif")
    # 11 frames there and 9 back (PIL merges identical neighbours, so count the time)
    assert sum(_durations(gif)) == 20 * 150
    assert (pair / "morphing.png").is_file()
    for name in ("left", "right"):
        assert (morph_run / name / "reconstruction.pt").is_file()
    # frame 001 is the first image's reconstruction, 011 the second's: morph renders each frame
    # as a batch of 1 from the saved state (λ = 0 and 1 are exact), as reconstruction() does,
    # so the 8-bit files match exactly
    prior = _fresh_prior(compose([*FAST, "task=morphing"]))
    for frame, name in (("001", "left"), ("011", "right")):
        x = prior.reconstruction(prior.load(morph_run / name))
        pixels = ((x + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        assert (np.asarray(Image.open(pair / "morph" / f"{frame}.png")) == pixels).all()


def test_train_py_edits_saved_reconstructions(morph_run: Path, tmp_path: Path) -> None:
    saved = f"manipulation.saved=[{morph_run / 'left'},{morph_run / 'right' / 'reconstruction.pt'}]"
    out = tmp_path / "jitter"
    assert run_train([*FAST, "task=jitter", saved, f"output.dir={out}"]) == 0
    for name in ("left", "right"):
        files = sorted(p.name for p in (out / name / "jitter").iterdir())
        assert files == [f"std{s}_{k}.png" for s in ("0.3", "0.5", "0.7") for k in range(2)]
        assert (out / name / "jitters.png").is_file() and (out / name / "reconstruction.png").is_file()
    out = tmp_path / "categories"
    assert run_train([*FAST, "task=category_transfer", saved, "manipulation.classes=[0,4-5,goldfish]",
                      f"output.dir={out}"]) == 0
    legend = json.loads((out / "left" / "categories.json").read_text())
    assert list(legend) == ["0", "4", "5", "1"] and legend["1"] == "goldfish, Carassius auratus"
    assert len(list((out / "left" / "categories").iterdir())) == 4
    # a mismatched prior fails with the reason in results.jsonl and exit code 1
    out = tmp_path / "mismatch"
    assert run_train([*FAST, "task=jitter", saved, "prior.init_seed=3", f"output.dir={out}"]) == 1
    errors = [r["error"] for r in _rows(out)]
    assert len(errors) == 2 and all("other generator weights" in e for e in errors)


def test_save_G_writes_a_reconstruction_for_restoration_tasks(fitted: dict, tmp_path: Path) -> None:
    cfg = compose([*TINY, "task=colorization", "output.save_G=true"])
    method = fitted["method"]
    (saver,) = [c for c in engine.output_callbacks(cfg, tmp_path, method, {}, ResultRows())
                if isinstance(c, SaveReconstructions)]
    # what the callback writes when a batch ends
    module = SimpleNamespace(method=method, failed={1: "NaN loss"}, aborted=None,
                             items=[ImageItem(id=i, path=i) for i in method.ids])
    saver.on_train_epoch_end(None, module)  # type: ignore[arg-type]
    assert saver.written == [tmp_path / "a" / "reconstruction.pt"]
    rec = SavedReconstruction.load(tmp_path / "a")
    assert rec.task == "colorization" and rec.class_id == 3 and rec.weights["source"] == "random"
    assert rec.info["seed"] == 0 and rec.info["dgp"]["update_embed"] is True


def test_media_go_to_loggers_that_take_them() -> None:
    class MediaLogger:  # the two methods of Lightning's WandbLogger that log_media uses
        def __init__(self) -> None:
            self.calls: list[tuple[str, str, list]] = []

        def log_image(self, key: str, images: list) -> None:
            self.calls.append(("image", key, images))

        def log_video(self, key: str, videos: list) -> None:
            self.calls.append(("video", key, videos))

    media = MediaLogger()
    log_media([CSVLogger("unused"), media], "morphing/a_b", images=["s.png"], videos=["m.gif"])
    assert media.calls == [("image", "morphing/a_b", ["s.png"]),
                           ("video", "morphing/a_b_animation", ["m.gif"])]


def test_morphing_two_classes_needs_interpolate_class(fitted: dict, tmp_path: Path) -> None:
    a, b = (rec.save(tmp_path / rec.image_id / "reconstruction.pt") for rec in fitted["recs"])
    saved = f"manipulation.saved=[{a},{b}]"  # classes 3 and 7; morphing.yaml interpolates classes
    out = tmp_path / "refused"
    assert run_train([*FAST, "task=morphing", saved, "manipulation.interpolate_class=false",
                      f"output.dir={out}"]) == 1
    (row,) = _rows(out)
    assert row["status"] == "failed" and "manipulation.interpolate_class=true" in row["error"]
    out = tmp_path / "morphed"
    assert run_train([*FAST, "task=morphing", saved, "manipulation.morph_steps=2", "manipulation.gif_bounce=false",
                      f"output.dir={out}"]) == 0
    (row,) = _rows(out)
    assert row["status"] == "ok" and row["class"] == [3, 7] and row["id"] == "a_b"
    assert sorted(p.name for p in (out / "a_b" / "morph").iterdir()) == ["001.png", "002.png", "003.png"]


def test_checks_fail_before_any_fit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_fit(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("fitted before the checks")

    monkeypatch.setattr(engine, "run", no_fit)
    item = ImageItem(id="x", path="x", image=torch.zeros(3, 128, 128), class_id=1)
    with pytest.raises(ValueError, match="golden retriever"):
        manipulation.run(compose([*FAST, "task=category_transfer", "manipulation.classes=[golden retreiver]"]),
                         tmp_path, items=[item], loggers=[])
    with pytest.raises(ValueError, match="needs two images"):
        manipulation.run(compose([*FAST, "task=morphing"]), tmp_path, items=[item], loggers=[])
    with pytest.raises(ValueError, match=r"prior\.kind is 'dip'"):
        manipulation.run(compose([*FAST, "task=jitter", "prior=dip_skip"]), tmp_path, items=[item], loggers=[])


def test_fit_with_save_G_saves_each_image_once_and_reports_rows(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """output.save_G=true must not add the engine's saver to the task's own; rows reach on_row."""
    written: list[Path] = []
    save = SavedReconstruction.save
    monkeypatch.setattr(SavedReconstruction, "save", lambda self, path: written.append(path) or save(self, path))
    gen = torch.Generator().manual_seed(0)
    items = [ImageItem(id="p", path="p", image=torch.rand(3, 128, 128, generator=gen) * 2 - 1, class_id=2)]
    seen: list[dict] = []
    rows = manipulation.run(compose([*FAST, "task=jitter", "output.save_G=true", "logger=none"]), tmp_path,
                            items=items, on_row=seen.append)
    assert written == [tmp_path / "p" / "reconstruction.pt"]
    assert [r.get("task") for r in rows] == [None, "jitter"] and all(r["status"] == "ok" for r in rows)
    assert seen == rows
    assert (tmp_path / "p" / "jitters.png").is_file()
