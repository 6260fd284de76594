"""task=defense: attacks, BPDA/EOT, purification, saved adversarial images, report, resume.

Tiny random networks only (timm's test_vit classifier with random weights, a 2-level DIP of a
few steps as the prior), 32x32 images: the whole file runs in well under two minutes on CPU.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("torchattacks")

from genprior import engine
from genprior.config import compose
from genprior.items import ImageBatch, ImageItem
from genprior.methods import DGP
from genprior.metrics import WeightsUnavailable
from genprior.perf import perf_settings
from genprior.tasks import defense
from genprior.tasks.defense import (
    AdversarialMismatch,
    AdversarialStore,
    PriorPurifier,
    PurifiedClassifier,
    attack_with_restarts,
    build_defense_classifier,
)

EPS = 16 / 255

TINY = [
    "prior=dip_skip", "task=defense", "trainer=cpu", "trainer.enable_progress_bar=false",
    "dip.num_iter=4", "dip.input_depth=4", "dip.num_channels_down=[4,4]",
    "dip.num_channels_up=[4,4]", "dip.num_channels_skip=[2,2]", "dip.exp_weight=null",
    'dip.backtracking="off"', "dip.crop_multiple=8",
    "defense.classifier=test_vit", "defense.classifier_weights=random",
    "defense.num_classes=10", "defense.input_size=32", "defense.labels=classifier",
    "defense.eot_samples=2", "defense.eps_sweep=[0.0,0.03]", "defense.sweep_steps=5",
    "defense.attacks=[{name: fgsm, eps: 0.0627}, {name: pgd, eps: 0.0627, steps: 2, restarts: 2},"
    " {name: square, eps: 0.0627, n_queries: 5, settings: [transfer]}]",
]


def _quiet() -> None:
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth random images (upsampled noise), more image-like than white noise
    return F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(32, 32), mode="bilinear",
                         align_corners=False).clamp(0, 1)


def _items(x: torch.Tensor) -> list[ImageItem]:
    return [ImageItem(id=f"img{k}", path="", image=xb * 2 - 1, class_id=-1) for k, xb in enumerate(x)]


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return build_defense_classifier(compose(TINY).defense)


def test_attacks_lower_accuracy_within_their_budget(classifier) -> None:
    x = _images()
    with torch.no_grad():
        labels = classifier(x).argmax(1)
    for name in ("fgsm", "pgd", "pgdl2", "square"):
        eps = 2.0 if name == "pgdl2" else EPS
        spec = {"name": name, "eps": eps, "steps": 5, "alpha": None, "restarts": 2,
                "norm": "Linf", "n_queries": 50}
        adv = attack_with_restarts(spec, classifier, x, labels, seed=0)
        assert adv.min() >= 0 and adv.max() <= 1
        delta = (adv - x).flatten(1)
        # the projection onto the budget is float32 arithmetic: measured excess 0 for the L2
        # norm (1.1e-7 with the norm taken in float64) and 2.2e-8 for Linf (threads 1/2/4);
        # 1e-4 on eps = 2 (a float32 norm of 3072 values may be ~1e-6 relative off) and 1e-6 on
        # eps = 0.063 (45x) still fail any step that leaves the ball
        if name == "pgdl2":
            assert float(delta.norm(dim=1).max()) <= eps + 1e-4
        else:
            assert float(delta.abs().max()) <= eps + 1e-6
        with torch.no_grad():
            acc = float((classifier(adv).argmax(1) == labels).float().mean())
        assert acc < 1.0, f"{name} did not lower the accuracy of the bare classifier"


def test_identity_purifier_restores_nothing(tmp_path: Path, classifier) -> None:
    cfg = compose([*TINY, "defense.purifier=identity", f"output.dir={tmp_path}"])
    seen: list[dict[str, Any]] = []
    rows = defense.run(cfg, tmp_path, items=_items(_images(3)), classifier=classifier, on_row=seen.append)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert seen == rows  # every row reaches on_row (evaluate.py's durable results)
    for r in rows:
        assert r["clean_top1"] == 100.0  # labels = the classifier's own clean predictions
        for label in ("fgsm", "pgd", "square"):
            assert r[f"{label}_transfer_top1"] == r[f"{label}_adv_top1"]
            assert r[f"{label}_transfer_top5"] == r[f"{label}_adv_top5"]
        for label in ("fgsm", "pgd"):
            assert r[f"{label}_adaptive_top1"] == r[f"{label}_adaptive_unpurified_top1"]
        assert r["worst_transfer_top1"] == r["worst_adv_top1"]
    assert sum(r["pgd_adv_top1"] for r in rows) < 300.0  # the attacks worked


def test_bpda_gradient_flows_through_a_non_differentiable_purifier(classifier) -> None:
    x = _images(2)
    labels = torch.tensor([1, 2])
    seen: list[int] = []

    def quantise(images, ids, classes, seed):  # no gradient at all: rounding, detached
        seen.append(seed)
        return (images * 4).round().detach() / 4, [{"steps": 0.0, "mse": 0.0}] * len(ids)

    model = PurifiedClassifier(classifier, quantise, ["a", "b"], [-1, -1], seeds=[11, 12, 13])
    xg = x.clone().requires_grad_(True)
    F.cross_entropy(model(xg), labels).backward()
    assert seen == [11, 12, 13]  # EOT: one purifier run per seed
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0
    # BPDA: the gradient is the classifier's gradient at the purified image
    p = ((x * 4).round() / 4).requires_grad_(True)
    F.cross_entropy(classifier(p), labels).backward()
    # the mean of three identical logits and the sum of three backward passes against one:
    # measured max 1.5e-8 on gradients up to 1.8e-2 (threads 1/2/4), 0.09 of the tolerance;
    # a missing 1/3 or a gradient at the unpurified image is off by >1e-3
    torch.testing.assert_close(xg.grad, p.grad, rtol=1e-4, atol=1e-7)


def test_bpda_gradient_flows_through_the_dip_purifier(tmp_path: Path, classifier) -> None:
    _quiet()
    cfg = compose([*TINY, f"output.dir={tmp_path}"])
    purifier = PriorPurifier(cfg)
    model = PurifiedClassifier(classifier, purifier, ["a"], [-1], seeds=[1, 2])
    xg = _images(1).requires_grad_(True)
    F.cross_entropy(model(xg), torch.tensor([3])).backward()
    assert purifier.runs == 2
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and float(xg.grad.abs().sum()) > 0
    out, info = purifier(_images(1), ["a"], [-1], 0)
    out2, _ = purifier(_images(1), ["a"], [-1], 0)
    # same seed, same purification: the same computation twice (measured 0, threads 1/2/4)
    torch.testing.assert_close(out, out2)
    assert info[0]["steps"] == 4.0 and 0 <= info[0]["mse"] < 1


def test_adversarial_images_save_reload_and_refuse_another_config(tmp_path: Path) -> None:
    store = AdversarialStore(tmp_path)
    meta = {"setting": "transfer", "attack": {"name": "pgd", "eps": 4 / 255}}
    image = torch.rand(3, 16, 16)
    path = store.save("transfer/pgd", "ILSVRC2012_val_00000001", image, meta)
    assert path.is_file()
    torch.load(path, weights_only=True)  # plain tensors and strings only
    assert torch.equal(store.load("transfer/pgd", "ILSVRC2012_val_00000001", meta), image)
    assert store.load("transfer/pgd", "other", meta) is None
    other = {"setting": "transfer", "attack": {"name": "pgd", "eps": 8 / 255}}
    with pytest.raises(AdversarialMismatch, match="another attack configuration"):
        store.load("transfer/pgd", "ILSVRC2012_val_00000001", other)


def test_missing_classifier_weights_say_what_to_do(tmp_path: Path) -> None:
    cfg = compose([*TINY, "defense.classifier=resnet50.tv_in1k",
                   f"defense.classifier_weights={tmp_path / 'missing.pth'}"])
    with pytest.raises(WeightsUnavailable) as err:
        build_defense_classifier(cfg.defense)
    message = str(err.value)
    assert "missing.pth" in message and "defense.classifier_weights" in message
    assert "download" in message


def _folder(tmp_path: Path, n: int = 3) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for k, x in enumerate(_images(n, seed=1)):
        arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"im{k}.png")
    return folder


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_evaluate_writes_the_report_and_resumes(tmp_path: Path, evaluate_one_thread) -> None:
    out = tmp_path / "out"
    args = [*TINY, f"data.source={_folder(tmp_path)}", f"output.dir={out}"]
    assert evaluate_one_thread(args) == 0
    report = (out / "defense_report.md").read_text()
    for field in ("Threat model", "transfer", "adaptive", "BPDA", "EOT", "eps", "steps",
                  "restarts", "EOT samples: 2", "Seeds", "seed 0", "attack seed 0", "Compute",
                  "s per image", "purifier runs per image", "Sanity checks",
                  "does not increase with eps", "reaches 0 %", "worst case", "clean",
                  "purified", "fgsm", "pgd", "square", "test_vit", "dip.stop_mse"):
        assert field in report, field
    assert report.count("**PASS**") + report.count("**FAIL**") >= 2 + 3
    summary = json.loads((out / "summary.json").read_text())["metrics"]
    for key in ("clean_top1", "clean_top5", "clean_purified_top1", "pgd_adv_top1",
                "pgd_transfer_top1", "pgd_adaptive_top1", "square_transfer_top5",
                "worst_adv_top1", "worst_transfer_top1", "worst_adaptive_top1",
                "worst_purified_top1", "sweep0_top1", "sweep2_top1", "seconds", "purifier_runs"):
        assert key in summary, key
    assert summary["clean_top1"]["mean"] == 100.0
    assert summary["pgd_adv_top1"]["mean"] < 100.0  # the attack lowers accuracy
    assert summary["sweep2_top1"]["mean"] == 0.0  # unbounded eps
    first = _rows(out)
    saved = sorted((out / "adversarial").rglob("*.pt"))
    assert len(saved) == 3 * (3 + 2)  # 3 transfer + 2 adaptive attacks per image
    stamps = {p: p.stat().st_mtime_ns for p in saved}

    # a run killed after two images: drop the last row, run the same command again
    rank_file = out / "results" / "rank0.jsonl"
    lines = rank_file.read_text().splitlines(keepends=True)
    rank_file.write_text("".join(lines[:-1]))
    assert evaluate_one_thread(args) == 0
    counts = json.loads((out / "summary.json").read_text())["counts"]
    assert counts["skipped"] == 2 and counts["this_run"] == 1 and counts["missing"] == 0
    again = _rows(out)
    assert {p: p.stat().st_mtime_ns for p in saved} == stamps  # adversarial images reloaded
    redone = json.loads(lines[-1])["id"]
    # the same result; less compute (the adversarial images were not made again)
    compute = {"seconds", "purifier_seconds", "purifier_runs", "finished_at", "run_started_at",
               "pid"}
    assert {k: v for k, v in again[redone].items() if k not in compute} == \
        {k: v for k, v in first[redone].items() if k not in compute}
    assert again[redone]["purifier_runs"] < first[redone]["purifier_runs"]


DGP_TINY = ["prior=biggan_tiny", "task=defense", "trainer=cpu", "trainer.enable_progress_bar=false",
            "dgp.select_num=1", "dgp.iterations=[1,1]", "dgp.G_lrs=[1e-4,1e-4]", "dgp.z_lrs=[1e-2,1e-2]",
            "dgp.ftr_num=[8,8]", "dgp.ft_num=[2,3]", "dgp.lr_ratio=[1,1]", "dgp.w_D_loss=[1,1]",
            "dgp.w_mse=[1,1]", "dgp.w_percep=[0,0]", "dgp.use_in=[false,false]"]


def test_dgp_purifier_is_the_plain_fit_of_its_seed(tmp_path: Path) -> None:
    """The purified images are DGP's final images of a plain fit (engine.step until every image
    is done) with the given seed: bit for bit, and the same again for the same seed."""
    _quiet()
    purifier = PriorPurifier(compose([*DGP_TINY, f"output.dir={tmp_path}"]))
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 128, 128, generator=g)
    out, info = purifier(x, ["a", "b"], [4, 9], seed=5)
    assert purifier.runs == 1 and [i["steps"] for i in info] == [2.0, 2.0]
    assert out.shape == x.shape and out.dtype == x.dtype
    # the same fit by hand: a DGP of the purifier's config, seed 5, the images as one batch
    method = DGP.from_config(purifier.cfg)
    method.seed = 5
    method.start(ImageBatch.of([ImageItem(id=i, path="", image=xb * 2 - 1, class_id=c)
                                for i, xb, c in zip(["a", "b"], x, [4, 9])]))
    optimizer = method.make_optimizer(fused=perf_settings(purifier.cfg).fused_optimizer)
    while not method.progress.all_done():
        engine.step(method, optimizer)
    assert torch.equal(out, method.display(method.final_output()))
    assert [i["mse"] for i in info] == (out - x).pow(2).flatten(1).mean(1).tolist()
    again, _ = purifier(x, ["a", "b"], [4, 9], seed=5)
    assert torch.equal(again, out)  # the method is reused: nothing of the last fit carries over
    other, _ = purifier(x, ["a", "b"], [4, 9], seed=6)
    assert not torch.equal(other, out)  # the seed drives the latent sampling (EOT)
