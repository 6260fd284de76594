"""Shared pytest fixtures and the opt-in switches for slow tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI and developers have ../shared beside the checkout; a user's clone does not.
SHARED_DIR = Path(os.environ.get("GENPRIOR_SHARED_DIR", REPO_ROOT.parent / "shared"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow") or "slow" in (config.getoption("-m") or "")
    skip_slow = pytest.mark.skip(reason="slow: opt in with --run-slow")
    skip_shared = pytest.mark.skip(reason=f"needs the shared fixtures at {SHARED_DIR}")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "shared" in item.keywords and not SHARED_DIR.is_dir():
            item.add_marker(skip_shared)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"needs the shared fixtures at {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(scope="session")
def dgp_ref(shared_dir: Path) -> Path:
    return shared_dir / "reference" / "dgp"


@pytest.fixture(scope="session")
def dip_ref(shared_dir: Path) -> Path:
    return shared_dir / "reference" / "dip"


@pytest.fixture(scope="session")
def evaluate_one_thread():
    """``run_evaluate`` in this process with one intra-op thread, as evaluate.py's subprocesses
    have (so in-process results compare with multi-process ones)."""
    import torch

    from genprior.evaluate import run_evaluate

    def run(args: list[str]) -> int:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run_evaluate(args)
        finally:
            torch.set_num_threads(threads)

    return run
