"""How float rounding grows in DGP's optimisation, and why the proof of faithfulness is float64.

Needs ../shared (the reference traces). For each trace of ``dgp_pipeline_parity.pt`` that has a
float64 twin in ``dgp_traces_f64.pt`` it prints, per step, the relative difference of the total
loss between:

* genprior float32 at 1 and at 2 threads (rounding alone, same code);
* genprior float32 and the original code's float32 run (fixture made on another CPU);
* the original's float32 run and the original's float64 run;
* genprior float64 and the original's float64 run (the proof: ~1e-16 growing to ~1e-14).

    python benchmarks/trace_sensitivity.py            # the numbers in docs/faithfulness.md
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_dgp_pipeline as f32  # noqa: E402
import test_faithfulness_dgp as f64  # noqa: E402

TRACES = ("trace_hybrid", "trace_SR", "trace_SR_second_image_fresh_DGP_object")


def _float32_totals(tiny: dict, pipe: dict, name: str, threads: int) -> torch.Tensor:
    torch.set_num_threads(threads)
    ref = pipe[name]
    image = pipe["preprocess"]["ILSVRC2012_val_00003004_128"] if "second" in name else tiny["D_images"]["real"]
    method = f32._build(tiny, ref)
    f32._start(method, tiny, ref, image)
    module, _ = f32._fit(method)
    return torch.stack([r.total[0] for r in module.records]).double()


def _float64_totals(tiny: dict, traces: dict, name: str) -> torch.Tensor:
    trace = traces[name]
    method = f64.build(tiny, trace)
    _, recorder = f64.fit(method, trace["target_origin"], [int(trace["class_y"])], trace["initial_z"])
    return torch.stack(recorder.images[0].losses["total"])


def _row(label: str, a: torch.Tensor, b: torch.Tensor) -> None:
    print(f"  {label:<36}" + " ".join(f"{v:8.1e}" for v in ((a - b).abs() / b.abs()).tolist()))


def main() -> None:
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    ref_dir = ROOT.parent / "shared" / "reference" / "dgp"
    tiny = torch.load(ref_dir / "biggan_tiny_parity.pt", weights_only=True)
    pipe = torch.load(ref_dir / "dgp_pipeline_parity.pt", weights_only=True)
    traces = torch.load(ref_dir / "dgp_traces_f64.pt", weights_only=True)
    threads = torch.get_num_threads()
    for name in TRACES:
        print(f"{name}: relative difference of the total loss, step 1 ...")
        one, two = _float32_totals(tiny, pipe, name, 1), _float32_totals(tiny, pipe, name, 2)
        ref32 = pipe[name]["per_step_total_loss"].double()
        ref64 = traces[name]["per_step_total_loss"]
        torch.set_num_threads(threads)
        ours64 = _float64_totals(tiny, traces, name)
        _row("genprior f32: 1 vs 2 threads", one, two)
        _row("genprior f32 vs original f32", one, ref32)
        _row("original f32 vs original f64", ref32, ref64)
        _row("genprior f32 vs original f64", one, ref64)
        _row("genprior f64 vs original f64", ours64, ref64)


if __name__ == "__main__":
    main()
