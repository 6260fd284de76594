"""Shared pytest fixtures, the opt-in switches for slow tests, and the thread-count switch.

``--threads N`` (or ``GENPRIOR_TEST_THREADS=N``) runs the whole suite with N intra-op torch
threads: float32 results depend on it (oneDNN and MKL split their sums by thread), so every
float32 tolerance in the suite is checked at 1, 2 and 4 threads (docs/faithfulness.md).

``GENPRIOR_RECORD_TOLERANCES=<file.jsonl>`` records, for every ``torch.testing.assert_close``,
the largest absolute and relative difference it saw next to its tolerance;
``scripts/tolerance_report.py`` turns runs at several thread counts into the measured spread
that each float32 tolerance is justified by.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI and developers have ../shared beside the checkout; a user's clone does not.
SHARED_DIR = Path(os.environ.get("GENPRIOR_SHARED_DIR", REPO_ROOT.parent / "shared"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")
    parser.addoption("--threads", type=int, default=None,
                     help="torch intra-op threads for the whole run (default: torch's own choice; "
                          "also GENPRIOR_TEST_THREADS)")


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("--threads") or int(os.environ.get("GENPRIOR_TEST_THREADS", "0") or 0)
    if threads:
        import torch

        torch.set_num_threads(threads)
    record = os.environ.get("GENPRIOR_RECORD_TOLERANCES")
    if record:
        _record_assert_close(Path(record))


_DEFAULT_TOLERANCES: dict = {}


def _record_assert_close(path: Path) -> None:
    """Wrap torch.testing.assert_close to append what every call measured to ``path``."""
    import torch

    # torch.testing.assert_close's defaults (rtol, atol) per dtype
    _DEFAULT_TOLERANCES.update({torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5),
                                torch.float32: (1.3e-6, 1e-5), torch.float64: (1e-7, 1e-7)})
    original = torch.testing.assert_close

    def recording(actual, expected, *args, **kwargs):  # type: ignore[no-untyped-def]
        caller = inspect.stack()[1]
        row = {"site": f"{Path(caller.filename).name}:{caller.lineno}",
               "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
               "threads": torch.get_num_threads(), "rtol": kwargs.get("rtol"), "atol": kwargs.get("atol")}
        try:
            a, e = torch.as_tensor(actual), torch.as_tensor(expected)
            row["dtype"] = str(a.dtype).replace("torch.", "")
            if a.is_floating_point() and a.numel() and a.shape == e.shape:
                diff = (a.double() - e.to(a.device).double()).abs()
                finite = torch.isfinite(diff)
                row["max_abs"] = float(diff[finite].max()) if finite.any() else 0.0
                scale = e.to(a.device).double().abs()
                rel = diff / scale.clamp_min(1e-300)
                row["max_rel"] = float(rel[finite].max()) if finite.any() else 0.0
                # how much of its tolerance the call used (torch's defaults when none is given)
                default_rtol, default_atol = _DEFAULT_TOLERANCES.get(a.dtype, (0.0, 0.0))
                rtol = kwargs.get("rtol", default_rtol)
                atol = kwargs.get("atol", default_atol)
                allowed = atol + rtol * scale
                used = torch.where(allowed > 0, diff / allowed.clamp_min(1e-300), (diff > 0).double() * float("inf"))
                row["used"] = float(used[finite].max()) if finite.any() else 0.0
        except Exception:  # recording must never change a test's outcome
            pass
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        return original(actual, expected, *args, **kwargs)

    torch.testing.assert_close = recording


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
def mgan_ref(shared_dir: Path) -> Path:
    return shared_dir / "reference" / "mganprior"


@pytest.fixture(scope="session")
def evaluate_one_thread():
    """``run_evaluate`` in this process with one intra-op thread, as evaluate.py's subprocesses
    have (so in-process results compare with multi-process ones)."""
    import torch

    from genprior.cli.evaluate import run_evaluate

    def run(args: list[str]) -> int:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run_evaluate(args)
        finally:
            torch.set_num_threads(threads)

    return run


@pytest.fixture(scope="module")
def small_pggan():  # type: ignore[no-untyped-def]
    """A 32x32 PGGAN generator of few channels (seed 0; biases drawn too, so that they matter),
    frozen and in eval mode: the mGANprior tests' generator (test_mganprior, test_mgan_edit)."""
    import torch

    from genprior.priors.pggan import PGGANGenerator

    torch.manual_seed(0)
    G = PGGANGenerator(32, fmaps_base=256, fmaps_max=16)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    G.requires_grad_(False)
    return G.eval()


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Run the test at 1, then at 2 intra-op threads, and restore the session's count after:
    the float64 trace replays must hold at both (MKL and oneDNN split their sums by thread,
    so each count rounds differently)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
