"""The reproduction catalogue (configs/experiment/, docs/reproduction.md): one preset per paper
table row that genprior implements, each composing to a valid config. Only composes configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from genprior.config import available_presets, compose, preset_summary

EXPERIMENTS = available_presets("experiment")

# The rows of ../shared/reference/PAPER_NUMBERS.md that genprior runs, by experiment name.
# Rows of methods genprior does not implement are listed in docs/reproduction.md only.
IMPLEMENTED_ROWS = {
    # DGP
    "dgp_t1_a_latent_only": "Table 1 (a) latent optimisation",
    "dgp_t1_dgp": "Table 1 DGP",
    "dgp_t2_dgp": "Table 2 DGP",
    "dgp_colorization_dgp": "colorization accuracy DGP",
    "dgp_t3_mse_biased": "Table 3 DGP (MSE-biased)",
    "dgp_t3_d_biased": "Table 3 DGP (D-biased)",
    "dgp_t4_colorization_mse": "Table 4 colorization MSE",
    "dgp_t4_colorization_perceptual": "Table 4 colorization Perceptual",
    "dgp_t4_colorization_dfeature": "Table 4 colorization Discriminator",
    "dgp_t4_colorization_progressive": "Table 4 colorization Discriminator + progressive",
    "dgp_t4_sr_mse": "Table 4 SR MSE",
    "dgp_t4_sr_perceptual": "Table 4 SR Perceptual",
    "dgp_t4_sr_dfeature": "Table 4 SR Discriminator",
    "dgp_t4_sr_progressive": "Table 4 SR Discriminator + progressive",
    "dgp_ood_inpainting_dgp": "out-of-ImageNet inpainting DGP",
    "dgp_t5_dgp": "Table 5 DGP (and the clean and adversarial rows)",
    "dgp_t5_dip": "Table 5 DIP",
    "dgp_t2_dip": "Table 2 DIP",
    "dgp_t3_dip": "Table 3 DIP",
    "dgp_ood_inpainting_dip": "out-of-ImageNet inpainting DIP",
    # mGANprior
    "mganprior_t1_a_bedroom": "Table 1 (a) bedroom",
    "mganprior_t1_a_church": "Table 1 (a) church",
    "mganprior_t1_a_face": "Table 1 (a) face",
    "mganprior_t1_d_bedroom": "Table 1 (d) bedroom",
    "mganprior_t1_d_church": "Table 1 (d) church",
    "mganprior_t1_d_face": "Table 1 (d) face",
    "mganprior_t2_bedroom": "Table 2 mGANprior bedroom",
    "mganprior_t2_church": "Table 2 mGANprior church",
    "mganprior_t3_mganprior": "Table 3 mGANprior",
    "mganprior_t4_a_centre": "Table 4 single latent code, centre",
    "mganprior_t4_a_random": "Table 4 single latent code, random",
    "mganprior_t4_d_centre": "Table 4 mGANprior, centre",
    "mganprior_t4_d_random": "Table 4 mGANprior, random",
    "mganprior_fig11_colorization_l2": "Fig. 11 colorization layer 2",
    "mganprior_fig11_colorization_l4": "Fig. 11 colorization layer 4",
    "mganprior_fig11_colorization_l8": "Fig. 11 colorization layer 8",
    "mganprior_fig11_inpainting_l2": "Fig. 11 inpainting layer 2",
    "mganprior_fig11_inpainting_l4": "Fig. 11 inpainting layer 4",
    "mganprior_fig11_inpainting_l8": "Fig. 11 inpainting layer 8",
    "mganprior_t2_dip_bedroom": "Table 2 DIP bedroom",
    "mganprior_t2_dip_church": "Table 2 DIP church",
    "mganprior_t3_dip": "Table 3 DIP",
    "mganprior_t4_dip_centre": "Table 4 DIP, centre",
    "mganprior_t4_dip_random": "Table 4 DIP, random",
    # Deep Image Prior
    "dip_denoising_1800": "denoising, single output after 1800 steps",
    "dip_denoising_ema": "denoising, sliding-window average",
    "dip_sr_set5_x4": "SR DIP Set5 x4",
    "dip_sr_set14_x4": "SR DIP Set14 x4",
    "dip_sr_set5_x8": "SR DIP Set5 x8",
    "dip_sr_set14_x8": "SR DIP Set14 x8",
    "dip_inpainting_barbara": "inpainting 50 % DIP (Barbara)",
}


def test_catalogue_is_not_empty() -> None:
    assert len(EXPERIMENTS) >= len(IMPLEMENTED_ROWS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name: str) -> None:
    cfg = compose([f"experiment={name}"])
    assert cfg.presets["experiment"] == name
    assert "prior" in cfg.presets and "task" in cfg.presets


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_summary_names_the_paper(name: str) -> None:
    summary = preset_summary("experiment", name)
    paper = {"dgp": "DGP", "mganprior": "mGANprior", "dip": "DIP"}[name.split("_", 1)[0]]
    assert summary.startswith(paper), summary
    assert ":" in summary, f"{name}: the first comment line should end with the paper's targets"


@pytest.mark.parametrize("name", sorted(IMPLEMENTED_ROWS))
def test_every_implemented_row_has_an_experiment(name: str) -> None:
    assert name in EXPERIMENTS, f"no configs/experiment/{name}.yaml for {IMPLEMENTED_ROWS[name]}"


def test_no_unlisted_experiment() -> None:
    assert sorted(set(EXPERIMENTS) - set(IMPLEMENTED_ROWS)) == []


def test_command_line_wins_over_the_experiment() -> None:
    cfg = compose(
        ["experiment=mganprior_t2_bedroom", "prior=pggan_tiny", "mganprior.composing_layer=4"]
    )
    assert cfg.prior.name == "pggan_tiny"
    assert cfg.mganprior.composing_layer == 4


def test_docs_list_every_experiment() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "reproduction.md").read_text()
    missing = [n for n in EXPERIMENTS if f"experiment={n}" not in text]
    assert missing == []


@pytest.mark.shared
def test_targets_are_the_papers_numbers(shared_dir) -> None:
    """Every number in an experiment's summary line is one of PAPER_NUMBERS.md's."""
    paper = (shared_dir / "reference" / "PAPER_NUMBERS.md").read_text()
    for name in EXPERIMENTS:
        for number in re.findall(r"\d+\.\d+", preset_summary("experiment", name)):
            assert number in paper, f"{name}: {number} is not in PAPER_NUMBERS.md"
