"""Adversarial-defense benchmark: attack a classifier, purify with a prior, report honestly.

DGP (Table 5) and DIP defend a classifier by reconstructing the attacked image with the prior
before classifying it, stopping the fit early (MSE 5e-3). Such purification defenses look far
more robust against *transfer* attacks (made against the bare classifier) than they are, so
``task=defense`` measures both (docs/defense.md):

- **transfer**: adversarial images made against the bare classifier, then purified (the
  paper's setting; the paper's attack was a black-box ATN, which genprior cannot make);
- **adaptive**: the attacker attacks the whole pipeline ``classifier ∘ purifier``. The
  purifier (hundreds of optimisation steps) has no useful gradient, so its backward is the
  identity (BPDA, Athalye et al. 2018), and its randomness (latent sampling, network init,
  input noise) is averaged over ``eot_samples`` runs with different seeds (EOT).

Attacks come from torchattacks (FGSM, PGD-Linf, PGD-L2, Square). One image's row holds the
top-1/top-5 correctness (100 or 0) of the clean, adversarial and purified images for every
attack and setting, the per-example worst case over attacks, a sanity sweep over eps on the bare
classifier, and the compute spent; ``write_defense_report`` turns the rows into
``<output.dir>/defense_report.md`` and the W&B table.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from genprior import engine, methods
from genprior.callbacks import failed_row
from genprior.datamodules import load_items
from genprior.device import pick_device
from genprior.image_io import safe_name
from genprior.items import ImageItem
from genprior.metrics import ImageClassifier, WeightsUnavailable, build_classifier, topk_correct
from genprior.perf import resolve_batch_size
from genprior.results import atomic_write_text

__all__ = [
    "SETTINGS",
    "AdversarialMismatch",
    "AdversarialStore",
    "Defense",
    "FinalImages",
    "PriorPurifier",
    "PurifiedClassifier",
    "attack_with_restarts",
    "bpda",
    "build_attack",
    "build_defense_classifier",
    "defense_report",
    "require_torchattacks",
    "run",
    "write_defense_report",
]

SETTINGS = ("transfer", "adaptive")
ATTACKS = ("fgsm", "pgd", "pgdl2", "square")
# The identity task each prior kind reconstructs the attacked image with.
PURIFIER_TASKS = {"biggan": "defence", "pggan": "inversion", "dip": "purify"}  # DIP: dip.task too


def require_torchattacks() -> Any:
    try:
        import torchattacks  # optional: only task=defense needs it (pyproject's "defense" extra)
    except ImportError as err:
        raise ImportError(
            "task=defense needs torchattacks: pip install --no-deps 'torchattacks==3.5.1' "
            "(scripts/setup.sh does this; --no-deps because its metadata pins an old requests "
            f"that would break wandb, while its real dependencies are already installed): {err}"
        ) from None
    return torchattacks


# ---------------------------------------------------------------------------- classifier
def build_defense_classifier(d: DictConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The classifier under attack, taking images in [0, 1] (normalisation inside the model).

    ``d.classifier_weights="random"`` builds a seeded random-init timm model with
    ``d.num_classes`` outputs: for tests and smoke runs only, its accuracies mean nothing.
    """
    if str(d.classifier_weights) == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(d.attack_seed))
            model = timm.create_model(str(d.classifier), pretrained=False,
                                      num_classes=int(d.num_classes))
        clf: nn.Module = ImageClassifier(model, d.input_size, value_range=(0.0, 1.0))
    else:
        try:
            clf = build_classifier(str(d.classifier), d.classifier_weights, d.input_size,
                                   value_range=(0.0, 1.0))
        except WeightsUnavailable as err:
            raise WeightsUnavailable(
                f"task=defense: the classifier under attack has no weights. {err} For "
                "task=defense the key is defense.classifier_weights=<file> (or "
                "defense.classifier_weights=random for a smoke run).") from None
    return clf.to(device).eval()


def topk_rows(logits: Tensor, labels: Tensor) -> dict[str, list[float]]:
    """Per image 100.0 / 0.0 for top-1 and top-5 (top-k capped at the number of classes)."""
    k5 = min(5, logits.shape[1])
    hits = topk_correct(logits.detach().float(), labels, (1, k5))
    return {"top1": hits["top1"].tolist(), "top5": hits[f"top{k5}"].tolist()}


# ------------------------------------------------------------------------------ purifier
class IdentityPurifier:
    """No defense: returns its input (the baseline; also what the tests check BPDA with)."""

    runs = 0
    seconds = 0.0
    description = "identity (no purification)"

    def __call__(self, x: Tensor, ids: Sequence[str], classes: Sequence[int],
                 seed: int) -> tuple[Tensor, list[dict[str, float]]]:
        self.runs += 1
        return x.detach().clone(), [{"steps": 0.0, "mse": 0.0} for _ in ids]


class PriorPurifier:
    """The configured prior fitted to the (attacked) image itself, identity degradation.

    ``purify(x, ids, classes, seed)``: x in [0, 1] -> the prior's reconstruction in [0, 1]
    and, per image, the steps taken and the final MSE to x. DGP reconstructs (task defence)
    with its early stop ``dgp.stop_mse``, DIP fits the image as its observation
    (dip.task=jpeg_artifacts) with ``dip.stop_mse``, mGANprior inverts it. ``seed`` replaces the
    run's seed for this fit: it drives the prior's randomness (DGP's latent sampling, DIP's
    init and input noise), which EOT averages over.

    The method is built once; every purification is one ``engine.run`` of the images as one
    batch, with no files, loggers or progress bar (an adaptive attack purifies hundreds of
    times, and only the final images are needed).
    """

    def __init__(self, cfg: DictConfig) -> None:
        pcfg = cfg.copy()
        kind = str(pcfg.prior.kind)
        pcfg.task.name = PURIFIER_TASKS[kind]
        pcfg.dip.task = "jpeg_artifacts"  # DIP: the observation is the image, forward model identity
        pcfg.output.save_G = False
        self.cfg = pcfg
        self.method = methods.build(pcfg)
        self.out = Path(pcfg.output.dir)
        self.runs = 0
        self.seconds = 0.0
        stop = {"biggan": f"dgp.stop_mse={pcfg.dgp.stop_mse:g} (reference [-1,1] scale)",
                "dip": f"dip.stop_mse={pcfg.dip.stop_mse:g}"}.get(kind, "no early stop")
        self.description = f"{pcfg.prior.name} ({kind}), {stop}"

    def __call__(self, x: Tensor, ids: Sequence[str], classes: Sequence[int],
                 seed: int) -> tuple[Tensor, list[dict[str, float]]]:
        start = time.perf_counter()
        items = [ImageItem(id=str(i), path="", image=(xb.detach().cpu() * 2 - 1), class_id=int(c))
                 for i, xb, c in zip(ids, x, classes)]
        self.method.seed = int(seed)
        final = FinalImages()
        with torch.enable_grad():  # torchattacks may call the model under no_grad
            engine.run(self.cfg, self.method, items, self.out, outputs=False, quiet=True,
                       batch_size=len(items), callbacks=[final])
        purified, steps = final.of([item.id for item in items])
        purified = purified.to(x.device, x.dtype)
        if purified.shape != x.shape:
            raise ValueError(f"the purifier returned {tuple(purified.shape)} for images of "
                             f"{tuple(x.shape)}; use a prior of the images' resolution")
        mse = (purified - x.detach()).pow(2).flatten(1).mean(1).tolist()
        self.runs += 1
        self.seconds += time.perf_counter() - start
        return purified, [{"steps": float(s), "mse": float(m)} for s, m in zip(steps, mse)]


class FinalImages(L.Callback):
    """Keeps what the purifier needs of every fitted batch when it ends: each image's final
    display image (the method's result in [0, 1]), its steps taken, or why it failed."""

    def __init__(self) -> None:
        self.images: dict[str, Tensor] = {}
        self.steps: dict[str, int] = {}
        self.errors: dict[str, str] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        items = pl_module.items
        if not items:
            return
        if pl_module.aborted is not None:
            if len(items) == 1:  # a batch of several is fitted again image by image (engine.run)
                self.errors[items[0].id] = pl_module.aborted
            return
        result = pl_module.outputs().result
        for b, item in enumerate(items):
            if b in pl_module.failed:
                self.errors[item.id] = pl_module.failed[b]
            else:
                self.images[item.id] = result[b]
                self.steps[item.id] = int(pl_module.method.progress.t[b])

    def of(self, ids: Sequence[str]) -> tuple[Tensor, list[int]]:
        """The images ``ids`` in that order ([B, C, H, W]) and their steps; raises if any failed."""
        errors = {i: self.errors.get(i, "no result") for i in ids if i not in self.images}
        if errors:
            raise RuntimeError("purification failed: " + "; ".join(f"{i}: {why}" for i, why in errors.items()))
        return torch.stack([self.images[i] for i in ids]), [self.steps[i] for i in ids]


def build_purifier(cfg: DictConfig) -> Any:
    kind = str(cfg.defense.purifier)
    if kind == "identity":
        return IdentityPurifier()
    if kind == "prior":
        return PriorPurifier(cfg)
    raise ValueError(f"defense.purifier must be 'prior' or 'identity', got {kind!r}")


# ------------------------------------------------------------------------- BPDA and EOT
class _StraightThrough(torch.autograd.Function):
    """Forward: the purified image; backward: the identity (d purify(x) / dx ≈ I)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, purified: Tensor) -> Tensor:
        return purified.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def bpda(x: Tensor, purified: Tensor) -> Tensor:
    """BPDA (Athalye, Carlini, Wagner 2018): ``purified`` forward, gradient to ``x`` unchanged."""
    return _StraightThrough.apply(x, purified)


class PurifiedClassifier(nn.Module):
    """``classifier ∘ purifier`` as a module torchattacks can attack (the adaptive setting).

    Forward runs the real purifier ``len(seeds)`` times (one seed each) and returns the mean of
    the classifier's logits on the purified images (EOT over the purifier's randomness); the
    gradient reaches the input through BPDA, so it is the mean of the classifier's input
    gradients at the purified images. A batch of other images than ``ids`` (Square attacks a
    subset of the batch) must be attacked one image at a time.
    """

    def __init__(self, classifier: nn.Module, purifier: Callable[..., Any], ids: Sequence[str],
                 classes: Sequence[int], seeds: Sequence[int]) -> None:
        super().__init__()
        self.classifier = classifier
        self.purifier = purifier
        self.ids = list(ids)
        self.classes = list(classes)
        self.seeds = list(seeds)
        if not self.seeds:
            raise ValueError("EOT needs at least one purifier sample (defense.eot_samples >= 1)")

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self.ids):
            raise ValueError(f"PurifiedClassifier holds {len(self.ids)} image(s), got a batch "
                             f"of {x.shape[0]}")
        logits: Tensor | None = None
        for seed in self.seeds:
            purified, _ = self.purifier(x.detach(), self.ids, self.classes, seed)
            out = self.classifier(bpda(x, purified))
            logits = out if logits is None else logits + out
        assert logits is not None
        return logits / len(self.seeds)


# -------------------------------------------------------------------------------- attacks
def _attack_value(spec: Any, key: str) -> Any:
    return spec[key] if isinstance(spec, dict | DictConfig) else getattr(spec, key)


def attack_label(spec: Any) -> str:
    return str(_attack_value(spec, "label") or _attack_value(spec, "name"))


def step_size(spec: Any) -> float:
    alpha = _attack_value(spec, "alpha")
    if alpha is not None:
        return float(alpha)
    return 2.5 * float(_attack_value(spec, "eps")) / max(1, int(_attack_value(spec, "steps")))


def build_attack(spec: Any, model: nn.Module, seed: int = 0) -> Any:
    """The torchattacks attack ``spec`` (an AttackConfig) names, against ``model``."""
    ta = require_torchattacks()
    name = str(_attack_value(spec, "name")).lower()
    eps = float(_attack_value(spec, "eps"))
    steps = int(_attack_value(spec, "steps"))
    if name == "fgsm":
        return ta.FGSM(model, eps=eps)
    if name == "pgd":
        return ta.PGD(model, eps=eps, alpha=step_size(spec), steps=steps, random_start=True)
    if name == "pgdl2":
        return ta.PGDL2(model, eps=eps, alpha=step_size(spec), steps=steps, random_start=True)
    if name == "square":
        norm = str(_attack_value(spec, "norm"))
        if norm not in ("Linf", "L2"):
            raise ValueError(f"square attack: norm must be Linf or L2, got {norm!r}")
        return ta.Square(model, norm=norm, eps=eps, n_queries=int(_attack_value(spec, "n_queries")),
                         n_restarts=1, seed=int(seed), verbose=False)
    raise ValueError(f"unknown attack {name!r}; defense.attacks names are {', '.join(ATTACKS)}")


def attack_norm(spec: Any) -> str:
    name = str(_attack_value(spec, "name")).lower()
    return {"fgsm": "Linf", "pgd": "Linf", "pgdl2": "L2"}.get(name, str(_attack_value(spec, "norm")))


def attack_steps(spec: Any) -> str:
    """Gradient steps of an attack, as the report shows them."""
    name = str(_attack_value(spec, "name")).lower()
    return {"fgsm": "1", "square": "-"}.get(name, str(_attack_value(spec, "steps")))


def attack_with_restarts(spec: Any, model: nn.Module, x: Tensor, labels: Tensor,
                         seed: int) -> Tensor:
    """``spec.restarts`` runs of the attack; per image the first run that fools ``model`` is
    kept, else the run with the highest cross-entropy. The global RNG is left untouched."""
    restarts = max(1, int(_attack_value(spec, "restarts")))
    devices = [x.device] if x.device.type == "cuda" else []
    best = x.detach().clone()
    best_loss = torch.full((x.shape[0],), -math.inf, device=x.device)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for r in range(restarts):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + r)
            adv = build_attack(spec, model, seed + r)(x, labels).detach()
        if restarts == 1:
            return adv
        with torch.no_grad():
            logits = model(adv)
        loss = F.cross_entropy(logits, labels, reduction="none")
        now_fooled = logits.argmax(1) != labels
        take = ~fooled & (now_fooled | (loss > best_loss))
        best[take] = adv[take]
        best_loss = torch.where(take, loss, best_loss)
        fooled |= now_fooled
        if bool(fooled.all()):
            break
    return best


# ----------------------------------------------------------------- saved adversarial images
class AdversarialMismatch(ValueError):
    """A saved adversarial image was made with another attack configuration."""


def config_hash(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


class AdversarialStore:
    """Adversarial images as ``<root>/<folder>/<id>.pt`` (float [3, H, W] in [0, 1], the
    attack's configuration and its hash), so that several defenses, or a resumed run, use the
    same inputs. Loaded with ``weights_only=True``; a file of another configuration is refused."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, folder: str, image_id: str) -> Path:
        return self.root / folder / f"{safe_name(image_id)}.pt"

    def load(self, folder: str, image_id: str, meta: dict[str, Any]) -> Tensor | None:
        path = self.path(folder, image_id)
        if not path.is_file():
            return None
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("hash") != config_hash(meta):
            saved = json.loads(data.get("meta", "{}"))
            differ = sorted(k for k in set(saved) | set(meta) if saved.get(k) != meta.get(k))
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {meta.get(k)!r}" for k in differ[:6])
            raise AdversarialMismatch(
                f"{path} holds an adversarial image made with another attack configuration "
                f"({shown}); give another defense.adversarial_dir, a new attack label, or "
                "delete the folder to make them again")
        return data["image"].float()

    def save(self, folder: str, image_id: str, image: Tensor, meta: dict[str, Any]) -> Path:
        path = self.path(folder, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save({"image": image.detach().float().cpu().contiguous(), "hash": config_hash(meta),
                    "meta": json.dumps(meta, sort_keys=True, default=str), "id": str(image_id)},
                   tmp)
        os.replace(tmp, path)
        return path


# --------------------------------------------------------------------------------- the task
@dataclass
class _Batch:
    ids: list[str]
    x: Tensor  # [B, 3, H, W] in [0, 1]
    labels: Tensor  # [B] long
    classes: list[int]  # the class the purifier reconstructs with (-1: chosen by the prior)


class Defense:
    """What every batch of a ``task=defense`` run shares: the classifier under attack, the
    purifier, the saved adversarial images (``defense.adversarial_dir``, else
    ``<out>/adversarial``) and the seeds. The settings are checked here, before any fit."""

    def __init__(self, cfg: DictConfig, out: Path, purifier: Any = None,
                 classifier: nn.Module | None = None) -> None:
        require_torchattacks()
        self.cfg = cfg
        self.d = cfg.defense
        self.device = pick_device(cfg)
        labels = [attack_label(a) for a in self.d.attacks]
        if len(set(labels)) != len(labels):
            raise ValueError(f"defense.attacks need distinct labels, got {labels}; give each a label")
        for a in self.d.attacks:
            build_attack(a, nn.Linear(1, 1))  # unknown names and norms fail before any fit
            for s in a.settings or []:
                if s not in SETTINGS:
                    raise ValueError(f"attack {attack_label(a)}: unknown setting {s!r}; use {SETTINGS}")
        for s in self.d.settings:
            if s not in SETTINGS:
                raise ValueError(f"defense.settings: unknown setting {s!r}; use {list(SETTINGS)}")
        if str(self.d.labels) not in ("data", "classifier"):
            raise ValueError(f"defense.labels must be data or classifier, got {self.d.labels!r}")
        if str(self.d.purifier_class) not in ("select", "label"):
            raise ValueError(f"defense.purifier_class must be select or label, got {self.d.purifier_class!r}")
        self.classifier = classifier if classifier is not None else build_defense_classifier(self.d, self.device)
        self.purifier = purifier if purifier is not None else build_purifier(cfg)
        root = self.d.adversarial_dir or str(Path(out) / "adversarial")
        self.store = AdversarialStore(root)
        self.seed = int(cfg.seed)
        self.eot_seeds = [self.seed + 1 + j for j in range(int(self.d.eot_samples))]

    # ---- what the saved adversarial images depend on
    def _meta(self, setting: str, spec: Any, shape: Sequence[int]) -> dict[str, Any]:
        attack = {k: _attack_value(spec, k) for k in
                  ("name", "norm", "eps", "steps", "alpha", "restarts", "n_queries")}
        meta = {"setting": setting, "attack": attack, "classifier": str(self.d.classifier),
                "classifier_weights": str(self.d.classifier_weights),
                "num_classes": int(self.d.num_classes), "input_size": self.d.input_size,
                "labels": str(self.d.labels), "attack_seed": int(self.d.attack_seed),
                "shape": list(shape)}
        if setting == "adaptive":
            meta["purifier"] = self._purifier_fingerprint()
        return meta

    def _purifier_fingerprint(self) -> str:
        sections = {k: OmegaConf.to_container(self.cfg[k], resolve=True)
                    for k in ("prior", "dgp", "dip", "mganprior")}
        sections.update(purifier=str(self.d.purifier), purifier_class=str(self.d.purifier_class),
                        eot_seeds=self.eot_seeds)
        return config_hash(sections)[:12]

    def _folder(self, setting: str, spec: Any) -> str:
        if setting == "transfer":
            return f"transfer/{attack_label(spec)}"
        return f"adaptive-{self.cfg.prior.name}-{self._purifier_fingerprint()}/{attack_label(spec)}"

    # ---- rows
    def rows(self, batch: list[ImageItem]) -> list[dict[str, Any]]:
        """One row per image of a batch of read images; a batch that raises is scored again
        image by image, so one bad image never costs the others."""
        rows: list[dict[str, Any]] = []
        queue = [batch] if batch else []
        while queue:
            batch = queue.pop(0)
            try:
                rows.extend(self._run_batch(batch))
            except Exception as err:  # one bad image must not cost the others
                if len(batch) > 1:
                    queue = [[item] for item in batch] + queue
                    continue
                if isinstance(err, AdversarialMismatch | ImportError):
                    raise
                print(f"genprior defense: image {batch[0].id} failed: {type(err).__name__}: {err}")
                rows.append(failed_row(batch[0], f"{type(err).__name__}: {err}"))
        return rows

    def _prepare(self, items: list[ImageItem]) -> _Batch:
        x = torch.stack([((item.image + 1) / 2).clamp(0, 1) for item in items]).to(self.device)
        ids = [item.id for item in items]
        if str(self.d.labels) == "classifier":
            with torch.no_grad():
                labels = self.classifier(x).argmax(1)
        else:
            labels = torch.tensor([item.class_id for item in items], device=self.device)
            missing = [i for i, c in zip(ids, labels.tolist()) if c < 0]
            if missing:
                raise ValueError(f"image(s) {missing} have no class; task=defense scores "
                                 "classification (defense.labels=classifier only for smoke runs)")
        classes = labels.tolist() if str(self.d.purifier_class) == "label" else [-1] * len(ids)
        return _Batch(ids, x, labels.long(), classes)

    def _adversarial(self, setting: str, spec: Any, model: nn.Module, b: _Batch) -> Tensor:
        """Saved adversarial images of this setting and attack, or made now (and saved)."""
        folder = self._folder(setting, spec)
        meta = self._meta(setting, spec, b.x.shape[1:])
        saved = [self.store.load(folder, i, meta) for i in b.ids]
        if all(s is not None for s in saved):
            return torch.stack(saved).to(self.device)  # type: ignore[arg-type]
        seed = int(self.d.attack_seed)
        if setting == "adaptive" and str(_attack_value(spec, "name")).lower() == "square":
            # Square queries subsets of the batch: one image at a time keeps the purifier's ids
            adv = torch.cat([attack_with_restarts(
                spec, PurifiedClassifier(self.classifier, self.purifier, [i], [c], self.eot_seeds),
                b.x[k : k + 1], b.labels[k : k + 1], seed) for k, (i, c) in enumerate(zip(b.ids, b.classes))])
        else:
            adv = attack_with_restarts(spec, model, b.x, b.labels, seed)
        for i, image in zip(b.ids, adv):
            self.store.save(folder, i, image, meta)
        return adv

    def _run_batch(self, items: list[ImageItem]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        runs0, purify_s0 = self.purifier.runs, self.purifier.seconds
        b = self._prepare(items)
        clf = self.classifier
        B = len(b.ids)
        rows: list[dict[str, Any]] = [
            {"id": i, "status": "ok", "error": None, "class": int(c), "path": item.path}
            for i, c, item in zip(b.ids, b.labels.tolist(), items)]

        def put(prefix: str, images: Tensor) -> list[float]:
            with torch.no_grad():
                hits = topk_rows(clf(images), b.labels)
            for r, t1, t5 in zip(rows, hits["top1"], hits["top5"]):
                r[f"{prefix}_top1"], r[f"{prefix}_top5"] = t1, t5
            return hits["top1"]

        def purify(prefix: str, images: Tensor) -> list[float]:
            purified, info = self.purifier(images, b.ids, b.classes, self.seed)
            for r, inf in zip(rows, info):
                r[f"{prefix}_purify_steps"], r[f"{prefix}_purify_mse"] = inf["steps"], inf["mse"]
            return put(prefix, purified)

        put("clean", b.x)
        if self.d.purify_clean:
            purify("clean_purified", b.x)
        worst: dict[str, list[float]] = {}
        for spec in self.d.attacks:
            label = attack_label(spec)
            settings = [s for s in (spec.settings or self.d.settings)]
            adv = self._adversarial("transfer", spec, clf, b)
            _worst(worst, "adv", put(f"{label}_adv", adv))
            if "transfer" in settings:
                _worst(worst, "transfer", purify(f"{label}_transfer", adv))
            if "adaptive" in settings:
                model = PurifiedClassifier(clf, self.purifier, b.ids, b.classes, self.eot_seeds)
                adv_a = self._adversarial("adaptive", spec, model, b)
                put(f"{label}_adaptive_unpurified", adv_a)
                _worst(worst, "adaptive", purify(f"{label}_adaptive", adv_a))
        for kind, values in worst.items():
            for r, v in zip(rows, values):
                r[f"worst_{kind}_top1"] = v
        if "transfer" in worst or "adaptive" in worst:
            both = [min(v) for v in zip(*[worst[k] for k in ("transfer", "adaptive") if k in worst])]
            for r, v in zip(rows, both):
                r["worst_purified_top1"] = v  # correct under every attack and setting
        for k, eps in enumerate([*self.d.eps_sweep, self.d.unbounded_eps]):
            spec = {"name": "pgd", "eps": float(eps), "steps": int(self.d.sweep_steps),
                    "alpha": None, "restarts": 1, "norm": "Linf", "n_queries": 0}
            adv = attack_with_restarts(spec, clf, b.x, b.labels, int(self.d.attack_seed))
            put(f"sweep{k}", adv)
        seconds = (time.perf_counter() - start) / B
        for r in rows:
            r.update(seconds=seconds, purifier_runs=(self.purifier.runs - runs0) / B,
                     purifier_seconds=(self.purifier.seconds - purify_s0) / B)
        return rows


def _worst(acc: dict[str, list[float]], kind: str, values: list[float]) -> None:
    acc[kind] = values if kind not in acc else [min(a, v) for a, v in zip(acc[kind], values)]


def run(cfg: DictConfig, out: Path, *, items: Sequence[ImageItem] | None = None,
        on_row: Callable[[dict[str, Any]], None] | None = None,
        read: Callable[[ImageItem], ImageItem] | None = None,
        callbacks: Sequence[L.Callback] = (), classifier: nn.Module | None = None,
        purifier: Any = None) -> list[dict[str, Any]]:
    """``task=defense``: one row per image (module docstring), ``trainer.batch_size`` images at a
    time ("auto": CPU_AUTO_BATCH, as the purifier's memory is not probed).

    ``items`` (else the images ``data.*`` names) are read by ``read`` when their batch comes up;
    ``on_row`` gets every row as soon as it is final. ``classifier`` and ``purifier`` replace the
    configured ones (tests). ``write_defense_report`` turns the rows into the report.
    ``callbacks`` (the fit callbacks every task takes: evaluate.py's W&B progress) are not used:
    the defense has no fit of its own, and its purifications are quiet fits inside the attacks.
    """
    defense = Defense(cfg, Path(out), purifier=purifier, classifier=classifier)
    if items is None:
        items = load_items(cfg, methods.method_class(str(cfg.prior.kind)))
    items = list(items)
    B = resolve_batch_size(cfg.trainer.batch_size, defense.device, len(items))
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for start in range(0, len(items), B):
        batch = [read(item) if read is not None and item.image is None and item.error is None else item
                 for item in items[start : start + B]]
        for item in batch:
            if not item.usable:
                add(failed_row(item, item.error or "the image was not read"))
        for row in defense.rows([item for item in batch if item.usable]):
            add(row)
    return rows


# --------------------------------------------------------------------------------- report
def _mean(rows: Sequence[dict[str, Any]], key: str) -> tuple[float, int]:
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), int | float)
            and not isinstance(r.get(key), bool) and math.isfinite(float(r[key]))]
    return (math.fsum(vals) / len(vals), len(vals)) if vals else (math.nan, 0)


def _pct(rows: Sequence[dict[str, Any]], key: str) -> str:
    m, n = _mean(rows, key)
    return "-" if n == 0 else f"{m:.1f}"


def sanity_checks(cfg: DictConfig, rows: Sequence[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """(name, passed, detail) of the checks every credible robustness report must pass."""
    d = cfg.defense
    eps = [*d.eps_sweep, d.unbounded_eps]
    acc = [_mean(rows, f"sweep{k}_top1")[0] for k in range(len(eps))]
    shown = ", ".join(f"{e * 255:.3g}/255: {a:.1f} %" for e, a in zip(eps, acc))
    checks = []
    monotone = all(b <= a + 1e-9 for a, b in itertools.pairwise(acc)) and all(map(math.isfinite, acc))
    checks.append(("bare-classifier accuracy does not increase with eps (PGD-Linf)", monotone, shown))
    checks.append((f"unbounded eps ({d.unbounded_eps:g}) reaches 0 %", acc[-1] == 0.0,
                   f"{acc[-1]:.1f} %"))
    clean = _mean(rows, "clean_top1")[0]
    for spec in d.attacks:
        label = attack_label(spec)
        adv = _mean(rows, f"{label}_adv_top1")[0]
        checks.append((f"{label}: adversarial accuracy <= clean accuracy", adv <= clean,
                       f"{adv:.1f} % vs {clean:.1f} %"))
        ad, tr = _mean(rows, f"{label}_adaptive_top1")[0], _mean(rows, f"{label}_transfer_top1")[0]
        if math.isfinite(ad) and math.isfinite(tr):
            checks.append((f"{label}: adaptive attack at least as strong as transfer", ad <= tr,
                           f"purified {ad:.1f} % (adaptive) vs {tr:.1f} % (transfer)"))
    return checks


def accuracy_table(cfg: DictConfig, rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the accuracy table (top-1 / top-5 in %, mean over images)."""
    columns = ["attack", "norm", "eps", "steps", "restarts", "setting", "input",
               "top1", "top5", "n"]
    table: list[list[Any]] = []

    def add(attack: str, norm: str, eps: Any, steps: Any, restarts: Any, setting: str,
            what: str, prefix: str) -> None:
        m1, n = _mean(rows, f"{prefix}_top1")
        m5, _ = _mean(rows, f"{prefix}_top5")
        if n:
            table.append([attack, norm, eps, steps, restarts, setting, what, m1, m5, n])

    add("none", "-", 0, 0, 0, "-", "clean", "clean")
    add("none", "-", 0, 0, 0, "-", "purified", "clean_purified")
    d = cfg.defense
    for spec in d.attacks:
        label = attack_label(spec)
        args = (label, attack_norm(spec), float(spec.eps), attack_steps(spec), int(spec.restarts))
        add(*args, "transfer", "adversarial", f"{label}_adv")
        add(*args, "transfer", "purified", f"{label}_transfer")
        add(*args, "adaptive", "adversarial", f"{label}_adaptive_unpurified")
        add(*args, "adaptive", "purified", f"{label}_adaptive")
    for kind, what in (("adv", "adversarial"), ("transfer", "purified"), ("adaptive", "purified")):
        m, n = _mean(rows, f"worst_{kind}_top1")
        if n:
            setting = "transfer" if kind in ("adv", "transfer") else "adaptive"
            table.append(["worst case", "-", "-", "-", "-", setting, what, m, math.nan, n])
    m, n = _mean(rows, "worst_purified_top1")
    if n:
        table.append(["worst case", "-", "-", "-", "-", "all", "purified", m, math.nan, n])
    return columns, table


def defense_report(cfg: DictConfig, rows: Sequence[dict[str, Any]], device: str = "") -> str:
    """The markdown report: threat model, attack settings, accuracies, sanity checks, compute."""
    d = cfg.defense
    ok = [r for r in rows if r.get("status") == "ok"]
    purifier = ("identity (no purification)" if str(d.purifier) == "identity" else
                f"{cfg.prior.name} ({cfg.prior.kind})")
    stop = {"biggan": f"dgp.stop_mse = {cfg.dgp.stop_mse:g} (MSE on the reference's [-1, 1] "
                      "scale; ends each stage early, SPEC §6.2.9)",
            "dip": f"dip.stop_mse = {cfg.dip.stop_mse:g} (MSE on [0, 1] images)"}.get(
        str(cfg.prior.kind), "none")
    L = [f"# Adversarial-defense report: {purifier}, {d.classifier}", ""]
    L += [f"{len(ok)} image(s) scored ({len(rows) - len(ok)} failed). Accuracies are top-1 / "
          "top-5 in %, means over the scored images (per-image rows: results.jsonl).", ""]
    L += ["## Threat model", "",
          "- Untargeted evasion attacks on the classifier's decision for the true class "
          f"(labels: {'the dataset classes' if d.labels == 'data' else 'the bare classifier clean predictions (smoke run: random classifier)'}).",
          "- Perturbations bounded in [0, 1] pixel space at the image resolution, before the "
          "classifier's own resize and normalisation (inside the model).",
          f"- Classifier: timm `{d.classifier}`, weights `{d.classifier_weights}`, input size "
          f"{d.input_size or 'model default'}; fully known to the attacker (white box).",
          "- **transfer**: adversarial images made against the bare classifier, then purified "
          "(the DGP paper's setting; its ATN black-box images are not reproduced).",
          "- **adaptive**: the attacker knows the purifier and attacks classifier ∘ purifier: "
          "BPDA (the purifier's backward is the identity) and EOT (logits averaged over "
          f"{d.eot_samples} purifier runs with seeds {', '.join(str(int(cfg.seed) + 1 + j) for j in range(int(d.eot_samples)))}). "
          f"The defense's own run uses seed {int(cfg.seed)}, unseen by the attacker.",
          f"- Purifier: {purifier}; early stop {stop}; class: "
          f"{'chosen by the prior (select_z)' if d.purifier_class == 'select' else 'the true label (leaks the label; as the reference)'}.",
          ""]
    L += ["## Attacks (torchattacks)", "",
          "| attack | kind | norm | eps | eps x 255 | steps | step size | restarts | queries | settings |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for spec in d.attacks:
        name = str(spec.name).lower()
        settings = ", ".join(spec.settings or d.settings)
        steps = attack_steps(spec)
        alpha = f"{step_size(spec):.4g}" if name in ("pgd", "pgdl2") else "-"
        queries = str(spec.n_queries) if name == "square" else "-"
        L.append(f"| {attack_label(spec)} | {name} | {attack_norm(spec)} | {float(spec.eps):.4g} | "
                 f"{f'{float(spec.eps) * 255:.3g}' if attack_norm(spec) == 'Linf' else '-'} | {steps} | {alpha} | {spec.restarts} | {queries} | {settings} |")
    L += ["", f"EOT samples: {d.eot_samples}. Seeds: run seed {int(cfg.seed)} (the defense's "
          f"purification), EOT seeds seed+1..seed+{d.eot_samples}, attack seed {d.attack_seed} "
          "(random starts, Square; restart r uses attack seed + r).", ""]
    _, table = accuracy_table(cfg, ok)
    L += ["## Accuracy", "", "| attack | norm | eps | setting | input | top-1 % | top-5 % | n |",
          "|---|---|---:|---|---|---:|---:|---:|"]
    for attack, norm, eps, _, _, setting, what, t1, t5, n in table:
        e = eps if isinstance(eps, str) else f"{float(eps):.4g}"
        t5s = "-" if not math.isfinite(t5) else f"{t5:.1f}"
        L.append(f"| {attack} | {norm} | {e} | {setting} | {what} | {t1:.1f} | {t5s} | {n} |")
    L += ["", "Worst case: an image counts as correct only if it is classified correctly (top-1) "
          "under every attack of that setting; `all`: under every attack and setting.", ""]
    L += ["## Sanity checks", ""]
    for name, passed, detail in sanity_checks(cfg, ok):
        L.append(f"- **{'PASS' if passed else 'FAIL'}**: {name} ({detail})")
    secs, _ = _mean(ok, "seconds")
    runs, _ = _mean(ok, "purifier_runs")
    psecs, _ = _mean(ok, "purifier_seconds")
    L += ["", "## Compute", "",
          f"- {secs:.1f} s per image in all ({psecs:.1f} s of it purifying), "
          f"{runs:.1f} purifier runs per image (each a full fit of the prior, of all the "
          f"images of a batch at once; trainer.batch_size={cfg.trainer.batch_size}). Adversarial "
          "images reloaded from defense.adversarial_dir cost no purifier runs.",
          f"- Device: {device or cfg.trainer.accelerator}; torch {torch.__version__}.", ""]
    return "\n".join(L)


def write_defense_report(cfg: DictConfig, out: Path, rows: Sequence[dict[str, Any]],
                         report: Any = None) -> Path:
    """``<out>/defense_report.md``, printed, and the accuracy table on the W&B run (if any)."""
    device = str(pick_device(cfg))
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name()})"
    text = defense_report(cfg, rows, device)
    path = Path(out) / "defense_report.md"
    atomic_write_text(path, text)
    print("\n" + text, flush=True)
    if report is not None and hasattr(report, "log_table"):
        ok = [r for r in rows if r.get("status") == "ok"]
        columns, table = accuracy_table(cfg, ok)
        checks = {f"defense/check/{name}": "PASS" if passed else "FAIL"
                  for name, passed, _ in sanity_checks(cfg, ok)}
        # one type per W&B column: descriptive cells as text, accuracies as numbers or None
        cells = [[str(c) for c in row[:7]] + [None if not math.isfinite(v) else float(v)
                                              for v in row[7:9]] + [int(row[9])] for row in table]
        try:
            report.log_table("defense/accuracy", columns, cells, summary=checks)
        except Exception as err:  # the report file is written; W&B is a copy
            print(f"genprior defense: the W&B table failed: {type(err).__name__}: {err}")
    return path
