"""Typed configuration: OmegaConf structured configs, YAML presets and command-line overrides.

A run is configured by, in order of precedence (last wins):

1. the dataclass defaults below (the schema; every key and its type live here),
2. an ``experiment=<name>`` preset, which may also pick presets of the other groups,
3. group presets picked on the command line (``prior=biggan128 task=colorization``),
4. a user YAML given with ``config=<path>``,
5. dotted overrides (``dgp.w_nll=0.02`` or ``--dgp.w_nll=0.02``, the form a W&B sweep agent
   passes).

Presets live in ``configs/<group>/<name>.yaml`` (installed as ``genprior.configs``). Every preset
is a fragment of the root config, so a task preset can set ``task.*`` and ``dgp.*`` together.
A typo anywhere (an unknown key, a wrong type, an unknown preset) stops the run with a message
that names the key and suggests close matches.
"""

from __future__ import annotations

import difflib
import importlib.resources
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import BooleanNode, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

# Each method's config dataclass is its settings (docs/architecture.md); the schema reuses them,
# and the speed options live with their implementation (docs/performance.md).
from genprior.errors import UserError
from genprior.methods.dgp import DGPConfig
from genprior.methods.dip import DIPConfig
from genprior.methods.inversion import InversionConfig
from genprior.methods.mganprior import MGANConfig
from genprior.metrics import EXTRA_METRICS
from genprior.perf import AUTOCAST_MODES, PerfConfig
from genprior.precision import check_precision

GROUPS = ("experiment", "prior", "task", "data", "trainer", "logger")
# `python train.py` with no preset runs the embedded default: DIP denoising sized for a CPU.
DEFAULT_PRESETS = {"prior": "dip_skip", "task": "dip_denoising_quick"}
# Arguments a W&B sweep agent may add that are not ours; they are accepted and ignored.
IGNORED_PREFIXES = ("_wandb",)


class ConfigError(ValueError, UserError):
    """A configuration the user asked for cannot be built; the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass
class PriorConfig:
    # A name of genprior.priors.registry: biggan128, biggan256, biggan256_ch64, biggan512,
    # biggan_tiny, pggan_bedroom, pggan_churchoutdoor, pggan_celebahq, pggan_tiny, dip_skip, ...
    name: str = "dip_skip"
    kind: str = "dip"  # biggan | dip | pggan
    resolution: int = 128
    G_ch: int = 96
    D_ch: int = 96
    dim_z: int = 120
    shared_dim: int = 128
    n_classes: int = 1000
    # "pretrained" loads the published files; "random" is a seeded random init (tests, benchmarks).
    weights: str = "pretrained"
    weights_dir: str = "pretrained"
    G_path: str | None = None
    D_path: str | None = None
    use_ema: bool = True  # every DGP script loads G_ema_<suffix>.pth into the fine-tuned G
    random_G: bool = False  # the reference's --random_G: orthogonal init, train mode, random D
    init_seed: int = 0  # seed of weights=random


@dataclass
class TaskConfig:
    # reconstruct | colorization | inpainting | sr | hybrid | defence | denoising | jpeg |
    # random_mask | mask_image (the degradation kind follows from the name)
    name: str = "denoising"
    sr_factor: int = 4
    mask_path: str | None = None
    mask_fraction: float = 0.8  # random_mask: fraction of pixels dropped
    noise_sigma: float = 25.0  # denoising, on the 0..255 scale


@dataclass
class SubsetConfig:
    """Which images of a data source to evaluate (datamodules.SubsetSpec), applied in this
    order: ``ids`` (a list, an id file, a DGP list file or "dgp1k"), the first ``per_class``
    of every class, then ``count`` images (the first N, or N drawn with ``seed``)."""

    ids: Any = None
    per_class: int | None = None
    count: int | None = None
    seed: int | None = None


@dataclass
class DataConfig:
    # "sample" is the embedded default (scikit-image's astronaut); otherwise a path to an image,
    # a folder or a list file ("<path> [class]" per line).
    source: str = "sample"
    class_id: int = -1  # class of a single image (or default for files without one); -1 unknown
    image_size: int = 128  # working size for DIP images from the embedded sample
    limit: int | None = None  # only the first N images
    num_workers: int = 0
    # evaluate.py's datamodules (docs/evaluation.md): auto (from source, as train.py) | image |
    # folder | list | imagenet_val | lsun. imagenet_val reads ``root`` with ``labels`` (a DGP
    # list file, "dgp1k", the devkit ground truth or LOC_val_solution.csv); lsun reads ``lmdb``.
    kind: str = "auto"
    root: str | None = None  # ImageNet val folder; for list files, the folder paths are relative to
    labels: str | None = None
    devkit_meta: str | None = None  # the devkit's meta.mat (for its ground-truth file)
    lmdb: str | None = None  # LSUN export folder (<category>_<split>_lmdb) or its data.mdb
    preprocessing: str | None = None  # dgp | pggan | none; None: the datamodule's default
    subset: SubsetConfig = field(default_factory=SubsetConfig)
    # Where the data comes from (the dataset's published source), said by the data presets and
    # added to the error when their files are missing (docs/data.md "Where the data comes from").
    get_from: str | None = None


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    # 32-true | 64-true (every method end to end in float64, docs/faithfulness.md); Lightning's
    # bf16-mixed / 16-mixed run the step under its autocast
    precision: str = "32-true"
    # B: images fitted at once, each with its own parameters; an int, or "auto" (GPU: from the
    # free memory; CPU: 1), see genprior.perf.resolve_batch_size
    batch_size: Any = "auto"
    deterministic: bool = False
    enable_progress_bar: bool = True


@dataclass
class LoggerConfig:
    kind: str = "csv"  # csv | wandb | none
    project: str = "genprior"
    entity: str | None = None
    # offline unless the user is logged in ("auto"), or force "offline"/"online"/"disabled"
    mode: str = "auto"
    log_every_n_steps: int = 10
    # The W&B run's name, tags, group, notes and job type. A value set here wins over the
    # WANDB_* environment variable, which wins over the default (callbacks/wandb.py,
    # wandb_init_args; docs/evaluation.md "W&B").
    name: str | None = None
    tags: list[str] | None = None
    group: str | None = None
    notes: str | None = None
    job_type: str | None = None


@dataclass
class OutputConfig:
    dir: str = "outputs/${prior.name}-${task.name}"
    save_G: bool = False  # save the fine-tuned G and z of every image (needed for morphing)
    # train.py refuses an output.dir that holds another run's results (config.yaml,
    # results.jsonl) unless this is true; evaluate.py resumes into its folder instead.
    overwrite: bool = False


@dataclass
class MetricsConfig:
    # The reference's SSIM uses data_range 2 on [0,1] images (SPEC §8, quirk 12). 2.0 keeps
    # numbers comparable with the papers; 1.0 is the textbook value.
    ssim_data_range: float = 2.0
    # The papers' other metrics (genprior.metrics, docs/degradations_and_metrics.md):
    # any of lpips, niqe, accuracy, colorization_auc. A metric whose weights file is missing
    # is reported as unavailable (NaN, with instructions); the run goes on.
    extra: list[str] = field(default_factory=list)
    lpips_net: str = "alex"  # mGANprior §4.2: the lpips package's default backbone
    lpips_weights: str | None = None  # LPIPS v0.1 linear layers; None: the copy in torchmetrics
    lpips_backbone_weights: str | None = None  # torchvision alexnet/vgg16 file; None: torch hub cache
    niqe_model: str | None = None  # modelparameters.mat (MATLAB release) or niqe_pris_params.npz
    niqe_block_size: int = 96
    classifier: str = "resnet50.tv_in1k"  # any timm model name; DGP scores with ResNet-50
    classifier_weights: str | None = None  # None: the torchvision file in the torch hub cache
    classifier_input_size: int | None = None  # None: the model's own (224 for ResNet-50)
    auc_max_threshold: float = 150.0  # colorization AuC thresholds 0..150 in ab units


@dataclass
class ManipulationConfig:
    """Edits of a fitted image (SPEC §9): ``task=jitter``, ``morphing``, ``category_transfer``.

    The tasks fit the image(s) of ``data.source`` first, or edit saved reconstructions.
    """

    # reconstruction.pt files (or the image folders holding them) written by an earlier run;
    # when given, nothing is fitted and data.source is not read.
    saved: list[str] = field(default_factory=list)
    jitter_stds: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    jitter_samples: int = 30  # per std
    jitter_per_row: int = 9  # images per row of the jitter sheet
    morph_steps: int = 10  # frames at λ = 0, 1/morph_steps, ..., 1
    # main.py only morphs images of the same class; true also morphs a pair of different classes
    # by interpolating their class embeddings, as example.py (run_morphing.sh) does.
    interpolate_class: bool = False
    # Category-transfer targets: class indices, inclusive ranges "a-b", or ImageNet class names
    # or WordNet ids ("golden retriever", "n02099601"). Default: the reference's dogs and cats.
    classes: list[str] = field(default_factory=lambda: ["151-293"])
    gif_frame_ms: int = 150
    gif_bounce: bool = True  # play the morph there and back, so that the GIF loops smoothly
    mp4: bool = True  # also write morphing.mp4 when an encoder (imageio-ffmpeg) is installed
    render_chunk: int = 32  # images per generator forward pass


@dataclass
class MGANEditConfig:
    """Edits of an mGANprior inversion (genprior.tasks.mgan_edit, docs/mganprior.md):
    ``task=mgan_semantic`` (InterFaceGAN boundaries) and ``task=mgan_style_mixing``."""

    # mgan_fit.pt files (or the image folders holding them) written by an earlier run; when
    # given, nothing is fitted and data.source is not read.
    saved: list[str] = field(default_factory=list)
    # <boundaries_dir>/<boundary_prefix>_<attribute>_boundary.npy; prefix None: prior.name;
    # "random": seeded random unit normals (the tiny prior's smoke runs: meaningless directions)
    boundaries_dir: str = "pretrained/interfacegan"
    boundary_prefix: str | None = None
    attributes: list[str] = field(default_factory=lambda: ["age", "gender", "smile", "eyeglasses", "pose"])
    # distances t along each unit normal: every code z_n moves to z_n + t·n (α unchanged)
    strengths: list[float] = field(default_factory=lambda: [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
    # style mixing: crossover layers k (composing layer <= k < layers); each mixed image takes
    # the other image's feature statistics at every layer from k on
    mix_layers: list[int] = field(default_factory=lambda: [6, 8, 10, 12])
    tile_size: int = 256  # pixels of one image in the sheets (the PNGs keep the full size)
    render_chunk: int = 8  # edited images per generator forward pass
    gif_frame_ms: int = 150  # mgan_semantic: one GIF per attribute over the strengths


@dataclass
class EvalConfig:
    """evaluate.py: durable per-image results, resume, and the W&B report (docs/evaluation.md)."""

    results: str = "results"  # folder under output.dir holding rank<r>.jsonl
    resume: bool = True  # skip images that already have a row; false moves old results aside
    retry_failed: bool = False  # true: images whose row says "failed" are fitted again
    wandb_sheets_first_k: int = 8  # stage sheets (stages.png) of the first K images
    wandb_thumbnail_size: int = 96  # px, the table's result/observation thumbnails
    # Ranks finish their shards at different times and wait at the final barrier; the process
    # group timeout must outlast that (torch's default is 10-30 minutes).
    dist_timeout_s: int = 172800


@dataclass
class AttackConfig:
    """One attack of the adversarial-defense benchmark (genprior.defense, docs/defense.md)."""

    name: str = "pgd"  # fgsm | pgd (L-inf) | pgdl2 | square (gradient-free, score-based)
    label: str | None = None  # name in rows and the report; None: the attack's name
    norm: str = "Linf"  # square only (Linf | L2); fgsm/pgd are L-inf, pgdl2 is L2
    eps: float = 0.0156862745  # 4/255, in [0, 1] pixel space
    steps: int = 10  # gradient steps (pgd, pgdl2)
    alpha: float | None = None  # step size; None: 2.5 * eps / steps (Madry et al.)
    restarts: int = 1  # random restarts; per image the first success (else the worst loss) is kept
    n_queries: int = 1000  # square only
    settings: list[str] | None = None  # None: every defense.settings; e.g. [transfer]


@dataclass
class DefenseConfig:
    """task=defense: attacks on a classifier, purification by the prior, the robustness report."""

    classifier: str = "resnet50.tv_in1k"  # any timm model name
    # A local weights file; None: the torchvision file in the torch hub cache. "random": a
    # seeded random init with num_classes outputs, for tests and smoke runs only.
    classifier_weights: str | None = None
    num_classes: int = 1000  # classifier_weights=random only
    input_size: int | None = None  # None: the model's own (224 for ResNet-50)
    # data: the dataset's classes; classifier: the bare classifier's clean prediction (smoke runs
    # with a random classifier, whose clean accuracy is then 100 % by construction)
    labels: str = "data"
    # purifier: prior (the configured prior's fit, identity degradation) | identity (no defense)
    purifier: str = "prior"
    # The class a class-conditional prior (BigGAN) reconstructs with: select (chosen by select_z
    # from the image, nothing leaks) | label (the true class, as the reference's list files do)
    purifier_class: str = "select"
    attacks: list[AttackConfig] = field(default_factory=lambda: [
        AttackConfig(name="fgsm", eps=4 / 255),
        AttackConfig(name="pgd", eps=4 / 255, steps=10),
        AttackConfig(name="pgdl2", eps=1.0, steps=10),
        AttackConfig(name="square", eps=4 / 255, n_queries=1000, settings=["transfer"]),
    ])
    settings: list[str] = field(default_factory=lambda: ["transfer", "adaptive"])
    eot_samples: int = 4  # adaptive: purifier runs averaged per attack step (EOT)
    purify_clean: bool = True  # also score the purified clean image (the defense's clean cost)
    # Sanity check on the bare classifier: PGD-Linf accuracy at each eps must not increase, and
    # unbounded_eps (1.0 = any image in [0, 1]) must reach 0 %.
    eps_sweep: list[float] = field(default_factory=lambda: [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255])
    unbounded_eps: float = 1.0
    sweep_steps: int = 10
    adversarial_dir: str | None = None  # saved adversarial images; None: <output.dir>/adversarial
    attack_seed: int = 0  # random starts and Square's sampling; purifier seeds: seed, seed+1, ...


@dataclass
class Config:
    prior: PriorConfig = field(default_factory=PriorConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    dgp: DGPConfig = field(default_factory=DGPConfig)
    dip: DIPConfig = field(default_factory=DIPConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mganprior: MGANConfig = field(default_factory=MGANConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)  # DIP's network inversion
    manipulation: ManipulationConfig = field(default_factory=ManipulationConfig)
    mgan_edit: MGANEditConfig = field(default_factory=MGANEditConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    seed: int = 0
    # The presets this config was composed from (filled in by compose; informational).
    presets: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def presets_root() -> Path:
    """The folder of YAML presets (``configs/`` in a checkout, ``genprior/configs`` installed)."""
    return Path(str(importlib.resources.files("genprior.configs")))


def available_presets(group: str) -> list[str]:
    folder = presets_root() / group
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml"))


def preset_summary(group: str, name: str) -> str:
    """The first comment line of a preset file, used by --help."""
    path = presets_root() / group / f"{name}.yaml"
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def load_preset(group: str, name: str) -> DictConfig:
    names = available_presets(group)
    if name not in names:
        hint = _suggest(name, names)
        raise ConfigError(
            f"unknown {group} preset {name!r}.{hint} Available {group} presets: "
            f"{', '.join(names) or '(none)'}."
        )
    path = presets_root() / group / f"{name}.yaml"
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # a YAML syntax error in a preset file
        raise ConfigError(f"cannot parse preset {path}: {err}") from err
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"preset {path} must be a mapping of config keys")
    return loaded


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


@dataclass
class ParsedArgs:
    groups: dict[str, str]
    overrides: list[str]
    user_files: list[str]
    help: bool = False
    ignored: list[str] = field(default_factory=list)
    print_config: bool = False  # --print-config: print the composed config and stop
    dry_run: bool = False  # --dry-run: the program's up-front checks, then stop


def parse_args(argv: Sequence[str]) -> ParsedArgs:
    """Split ``key=value`` / ``--key=value`` / ``--key value`` arguments into groups and overrides."""
    parsed = ParsedArgs(groups={}, overrides=[], user_files=[])
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help", "help"):
            parsed.help = True
            continue
        if arg in ("--print-config", "--dry-run"):
            setattr(parsed, arg[2:].replace("-", "_"), True)
            continue
        body = arg[2:] if arg.startswith("--") else arg
        if "=" not in body:
            # `--key value`, the other form argparse-style users type
            if arg.startswith("--") and i < len(args) and "=" not in args[i]:
                body = f"{body}={args[i]}"
                i += 1
            else:
                raise ConfigError(
                    f"cannot read argument {arg!r}: use key=value (or --key=value), "
                    "for example task=colorization or dgp.w_nll=0.02"
                )
        key, value = body.split("=", 1)
        key = key.lstrip("+")
        if key.startswith(IGNORED_PREFIXES):
            parsed.ignored.append(arg)
            continue
        if key in GROUPS:
            parsed.groups[key] = value
        elif key == "config":
            parsed.user_files.append(value)
        else:
            parsed.overrides.append(f"{key}={value}")
    return parsed


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys: list[str] = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                keys.extend(_all_keys(child, full + "."))
    return keys


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)
    if not close:
        # also match on the last path component ("w_nl" -> "dgp.w_nll")
        tail = word.rsplit(".", 1)[-1]
        close = [o for o in options if o.rsplit(".", 1)[-1] in
                 difflib.get_close_matches(tail, [x.rsplit(".", 1)[-1] for x in options], n=3)]
        close = close[:3]
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    _check_bools(base, OmegaConf.to_container(other, resolve=False), "", source)
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except ConfigKeyError as err:
        key = _error_key(err)
        raise ConfigError(
            f"unknown config key {key!r} in {source}.{_suggest(key, _all_keys(base))} "
            "Run with --help to list the groups, or see src/genprior/config.py for every key."
        ) from None
    except ValidationError as err:
        key = _error_key(err)
        expected = _expected_type(base, key)
        raise ConfigError(
            f"wrong type for config key {key!r} in {source}: {err.msg.splitlines()[0]}"
            + (f" (expected {expected})" if expected else "")
        ) from None


def _check_bools(base: Any, values: Any, prefix: str, source: str) -> None:
    """OmegaConf reads every integer as a bool (``dgp.update_embed=2`` is true): a bool key (or
    list of bools) given an integer other than 0 or 1 is refused."""
    if not isinstance(base, DictConfig) or not isinstance(values, dict):
        return
    for key, value in values.items():
        if not isinstance(key, str) or key not in base:
            continue
        node = base._get_node(key)
        if isinstance(node, DictConfig):
            _check_bools(node, value, f"{prefix}{key}.", source)
            continue
        is_bool = isinstance(node, BooleanNode) or (
            isinstance(node, ListConfig) and node._metadata.element_type is bool)
        items = value if isinstance(value, list) else [value]
        bad = [v for v in items if isinstance(v, int) and not isinstance(v, bool) and v not in (0, 1)]
        if is_bool and bad:
            raise ConfigError(
                f"config key {prefix}{key!s} in {source} is "
                f"{'a list of bools' if isinstance(node, ListConfig) else 'a bool'}, got {value!r}: "
                f"use true or false (or 1 or 0)"
            )


def _error_key(err: OmegaConfBaseException) -> str:
    full = getattr(err, "full_key", None) or ""
    if full:
        return str(full)
    return str(getattr(err, "key", "") or "?")


def _expected_type(base: DictConfig, key: str) -> str:
    try:
        node = base._get_node(key.split(".")[0])
        for part in key.split(".")[1:]:
            node = node._get_node(part)  # type: ignore[union-attr]
        return node._metadata.ref_type.__name__  # type: ignore[union-attr]
    except Exception:
        return ""


def compose(argv: Sequence[str] = ()) -> DictConfig:
    """Build the validated run configuration from command-line style arguments."""
    parsed = parse_args(argv)
    return compose_parsed(parsed)


def compose_parsed(parsed: ParsedArgs) -> DictConfig:
    cfg: DictConfig = OmegaConf.structured(Config)
    groups = dict(parsed.groups)
    experiment_values = None
    if "experiment" in groups:
        experiment_values = load_preset("experiment", groups["experiment"])
        chosen = experiment_values.pop("groups", None)
        if chosen is not None:
            for group, name in chosen.items():
                if group not in GROUPS or group == "experiment":
                    raise ConfigError(
                        f"experiment {groups['experiment']!r} picks unknown group {group!r}; "
                        f"groups are {', '.join(GROUPS[1:])}"
                    )
                groups.setdefault(group, str(name))  # the command line wins over the experiment
    if not any(g in groups for g in ("experiment", "prior", "task")):
        groups.update(DEFAULT_PRESETS)
    for group in GROUPS[1:]:
        if group in groups:
            cfg = _merge(cfg, load_preset(group, groups[group]), f"preset {group}={groups[group]}")
    if experiment_values is not None:
        cfg = _merge(cfg, experiment_values, f"experiment={groups['experiment']}")
    for path in parsed.user_files:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        cfg = _merge(cfg, OmegaConf.load(path), f"config file {path}")  # type: ignore[arg-type]
    for item in parsed.overrides:
        key = item.split("=", 1)[0]
        try:
            dot = OmegaConf.from_dotlist([item])
        except Exception as err:
            raise ConfigError(f"cannot parse override {item!r}: {err}") from None
        cfg = _merge(cfg, dot, f"override {key}=...")
    cfg.presets = {g: n for g, n in groups.items()}
    _check_lists(cfg)
    _check_execution(cfg)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve the config: {err}") from None
    return cfg


def _check_lists(cfg: DictConfig) -> None:
    """Per-stage lists must agree in length (the reference crashes with IndexError otherwise)."""
    if cfg.prior.kind != "biggan":
        return
    stage_keys = ["iterations", "G_lrs", "z_lrs", "ftr_num", "ft_num", "lr_ratio", "w_D_loss",
                  "w_mse", "w_percep", "use_in"]
    n = len(cfg.dgp.iterations)
    for key in stage_keys:
        value = cfg.dgp[key]
        if not isinstance(value, ListConfig) or len(value) != n:
            length = len(value) if isinstance(value, ListConfig) else "not a list"
            raise ConfigError(
                f"dgp.{key} has {length} entries but dgp.iterations has {n} stages; give one "
                f"value per stage, e.g. dgp.{key}=[{', '.join(['...'] * n)}]"
            )
    if cfg.dgp.save_interval is not None and len(cfg.dgp.save_interval) != n:
        raise ConfigError(f"dgp.save_interval needs one entry per stage ({n})")


def _check_execution(cfg: DictConfig) -> None:
    """trainer.batch_size is an int or "auto" (typed Any, so checked here); perf.autocast."""
    value = cfg.trainer.batch_size
    if not (value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)):
        raise ConfigError(f"trainer.batch_size must be a positive integer or 'auto', got {value!r}")

    try:
        check_precision(cfg.trainer.precision)
    except ValueError as err:
        raise ConfigError(str(err)) from None

    if cfg.perf.autocast not in AUTOCAST_MODES:
        raise ConfigError(f"perf.autocast must be one of {', '.join(AUTOCAST_MODES)}, got {cfg.perf.autocast!r}")
    _check_choices(cfg)


def _check_choices(cfg: DictConfig) -> None:
    """metrics.extra is only built once a run has started (train.run_batches), where an unknown
    name would end the run with a traceback: refused at composition instead."""

    for name in cfg.metrics.extra:
        if name not in EXTRA_METRICS:
            raise ConfigError(f"metrics.extra: unknown metric {name!r}; valid: {', '.join(EXTRA_METRICS)}."
                              f"{_suggest(str(name), EXTRA_METRICS)}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def help_text(program: str) -> str:
    lines = [
        f"usage: {program} [group=preset ...] [key=value ...] [--key=value ...] [config=FILE]",
        "",
        "Groups and their presets (pick one per group, e.g. prior=biggan128 task=colorization):",
    ]
    for group in GROUPS:
        names = available_presets(group)
        lines.append(f"  {group}:")
        if not names:
            lines.append("    (none)")
        for name in names:
            summary = preset_summary(group, name)
            lines.append(f"    {name:<28} {summary}")
    lines += [
        "",
        "Overrides: any key of the schema, e.g. dgp.w_nll=0.02 trainer.batch_size=8",
        "  lists: dgp.G_lrs=[5e-5,5e-5,2e-5]; W&B sweep agents pass --key=value, also accepted.",
        "Top-level sections: " + ", ".join(OmegaConf.structured(Config).keys()),
        "Every run writes its resolved config to <output.dir>/config.yaml.",
        "--print-config prints the composed, resolved config (YAML) and exits without running;",
        "  --dry-run (train.py, evaluate.py) checks the files the run needs (weights, data) and",
        "  lists the images it would fit, then exits.",
    ]
    return "\n".join(lines)


def compose_or_exit(argv: Sequence[str], program: str) -> DictConfig | None:
    """CLI wrapper: print the help or (--print-config) the composed, resolved config and return
    None (the program exits 0), or print a one-paragraph error (exit code 2)."""
    try:
        parsed = parse_args(argv)
        if parsed.help:
            print(help_text(program))
            return None
        cfg = compose_parsed(parsed)
        if parsed.print_config:
            print(to_yaml(cfg), end="")
            return None
        return cfg
    except ConfigError as err:
        print(f"{program}: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
