"""How sensitive are DGP's optimisation traces to float rounding?

Runs the reference traces of ``dgp_pipeline_parity.pt`` (needs ../shared) through genprior with
1 and with 2 CPU threads and prints, per step, the relative difference of the D-feature loss
between the two thread counts and between genprior and the reference. Used for the numbers in
docs/reconstruction.md ("Batching and numerical agreement").

    python benchmarks/trace_sensitivity.py
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_dgp_pipeline import _build, _fit, _start  # noqa: E402


def main() -> None:
    logging.disable(logging.WARNING)
    ref_dir = ROOT.parent / "shared" / "reference" / "dgp"
    tiny = torch.load(ref_dir / "biggan_tiny_parity.pt", weights_only=True)
    pipe = torch.load(ref_dir / "dgp_pipeline_parity.pt", weights_only=True)
    losses = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name in ("trace_SR", "trace_hybrid"):
            ref = pipe[name]
            method = _build(tiny, ref)
            _start(method, tiny, ref, tiny["D_images"]["real"])
            module, _ = _fit(method)
            losses[threads, name] = torch.stack([r.ftr_loss[0] for r in module.records])
    for name in ("trace_SR", "trace_hybrid"):
        ref = pipe[name]["per_step_ftr_loss"]
        a, b = losses[1, name], losses[2, name]
        print(f"{name}: 1 vs 2 threads  ", [f"{v:.1e}" for v in ((a - b).abs() / ref).tolist()])
        print(f"{name}: genprior vs ref ", [f"{v:.1e}" for v in ((b - ref).abs() / ref).tolist()])


if __name__ == "__main__":
    main()
