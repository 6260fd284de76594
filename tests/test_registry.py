"""genprior.priors.registry: one name -> spec table for every prior, and the priors' layering."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from genprior.config import compose
from genprior.priors import registry
from genprior.priors.biggan import Discriminator, Generator
from genprior.priors.pggan import PGGANGenerator

PRIORS = Path(registry.__file__).parent
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "prior"


def test_every_kind_has_its_entries() -> None:
    assert registry.names("biggan") == [
        "biggan128", "biggan256", "biggan256_ch64", "biggan512", "biggan_tiny"]
    assert {"pggan_bedroom", "pggan_churchoutdoor", "pggan_celebahq", "pggan_tiny"} <= set(
        registry.names("pggan"))
    assert registry.names("dip") == ["dip_skip"]
    assert registry.names("tv") == ["tv"]
    assert registry.names() == [
        *registry.names("biggan"), *registry.names("pggan"), *registry.names("dip"), *registry.names("tv")]
    with pytest.raises(ValueError, match="prior kind"):
        registry.names("stylegan")


def test_specs_say_files_and_where_to_get_them() -> None:
    spec = registry.get("biggan256_ch64")
    assert (spec.kind, spec.resolution, spec.suffix) == ("biggan", 256, "ch64_256")
    assert dict(spec.kwargs) == {"resolution": 256, "G_ch": 64}
    assert spec.d_kwargs is not None and dict(spec.d_kwargs) == {"resolution": 256, "D_ch": 64}
    assert dict(spec.files) == {"G_ema": "G_ema_ch64_256.pth", "G": "G_ch64_256.pth",
                                "D": "D_ch64_256.pth"}
    assert spec.source is not None and "github.com/XingangPan/deep-generative-prior" in spec.source
    assert not registry.get("biggan512").has_discriminator
    assert "D" not in registry.get("biggan512").files
    church = registry.get("pggan_churchoutdoor")
    assert dict(church.files) == {"G": "pggan_churchoutdoor256_generator.pth"}
    assert church.original == "karras2018iclr-lsun-churchoutdoor-256x256.pkl"
    assert church.source is not None and "github.com/genforce/mganprior" in church.source
    for name in ("biggan_tiny", "pggan_tiny", "dip_skip"):
        spec = registry.get(name)
        assert not spec.published and spec.source is None
    assert registry.get("dip_skip").resolution is None
    with pytest.raises(TypeError):
        registry.get("biggan128").kwargs["G_ch"] = 8  # type: ignore[index]


def test_unknown_names_suggest_close_ones() -> None:
    with pytest.raises(registry.UnknownPriorError, match="Did you mean 'pggan_bedroom'"):
        registry.get("pggan_bedrom")
    with pytest.raises(registry.UnknownPriorError, match=r"'biggan128' is a biggan prior, not a pggan"):
        registry.load_pggan("biggan128")
    with pytest.raises(registry.UnknownPriorError, match="Known: biggan128"):
        registry.get("nothing_like_it")


def test_the_tv_prior_has_no_network() -> None:
    with pytest.raises(ValueError, match="no network"):
        registry.build("tv")


@pytest.mark.parametrize("name", [n for n in registry.names() if registry.get(n).kind != "tv"])
def test_every_entry_builds(name: str) -> None:
    spec = registry.get(name)
    with torch.device("meta"):
        net = registry.build(name)
    expected = {"biggan": Generator, "pggan": PGGANGenerator, "dip": torch.nn.Sequential}[spec.kind]
    assert isinstance(net, expected)
    if spec.kind == "pggan":
        assert net.resolution == spec.resolution
    if spec.kind == "biggan" and spec.has_discriminator:
        with torch.device("meta"):
            assert isinstance(registry.build_discriminator(name), Discriminator)


def test_builders_take_overrides() -> None:
    net = registry.build_dip("dip_skip", num_input_channels=32, num_channels_down=[8, 8],
                             num_channels_up=[8, 8], num_channels_skip=[2, 2])
    assert net(torch.zeros(1, 32, 16, 16)).shape == (1, 3, 16, 16)
    assert registry.build_pggan("pggan_tiny").channels(256) == 4
    with pytest.raises(ValueError, match="no discriminator"):
        registry.build_discriminator("biggan512")


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_prior_preset_names_a_registry_entry_of_its_kind(preset: str) -> None:
    prior = compose([f"prior={preset}"]).prior
    spec = registry.get(str(prior.name), str(prior.kind))
    if spec.resolution is not None:
        assert int(prior.resolution) == spec.resolution
    if spec.kind == "biggan":
        assert int(prior.G_ch) == spec.kwargs["G_ch"]


def test_build_biggan_from_a_prior_section() -> None:
    prior = compose(["prior=biggan_tiny"]).prior
    G, D = registry.build_biggan(prior, dtype=torch.float64)
    assert D is not None and not G.training
    assert G.linear.weight.dtype == torch.float64
    G2, _ = registry.build_biggan(OmegaConf.to_container(prior), need_D=False)  # a plain dict
    assert torch.equal(G2.linear.weight.double(), G.linear.weight)
    random_g = OmegaConf.merge(prior, {"random_G": True})
    assert registry.build_biggan(random_g, need_D=False)[0].training


# ------------------------------------------------------------------------------ layering
ALLOWED = {"genprior.weights", "genprior.perf", "genprior.precision", "genprior.errors"}


def _genprior_imports(path: Path) -> list[tuple[str, bool]]:
    """(module, is_function_local) for every genprior import in ``path``."""
    tree = ast.parse(path.read_text())
    local_nodes = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        else:
            continue
        for module in modules:
            if module.split(".")[0] == "genprior":
                found.append((module, id(node) in local_nodes))
    return found


def test_priors_import_nothing_above_them() -> None:
    # networks <- checkpoints <- registry, inside; outside only the core modules
    below = {"biggan": set(), "pggan": set(), "dip_nets": set(), "dip_archs": {"dip_nets"},
             "checkpoints": {"biggan", "pggan"},
             "registry": {"biggan", "pggan", "dip_nets", "dip_archs", "checkpoints"}}
    assert {p.stem for p in PRIORS.glob("*.py")} == {*below, "__init__"}
    for path in sorted(PRIORS.glob("*.py")):
        for module, local in _genprior_imports(path):
            assert not local, f"{path.name}: function-local import of {module}"
            parts = module.split(".")
            if parts[:2] == ["genprior", "priors"]:
                assert len(parts) > 2 and parts[2] in below[path.stem], (
                    f"{path.name} imports {module}")
            else:
                assert any(module == a or module.startswith(a + ".") for a in ALLOWED), (
                    f"{path.name} imports {module}, which is above the priors layer")


def test_weights_module_is_core() -> None:
    path = PRIORS.parent / "weights.py"
    # only the base class of user errors, from the one core module below it
    assert {m for m, _ in _genprior_imports(path)} <= {"genprior.errors", "genprior.errors.UserError"}
    assert not any(local for _, local in _genprior_imports(path))
