"""How close genprior's PGGAN is to the mGANprior parity fixture, in float32 and float64.

    python benchmarks/pggan_parity.py [path/to/pggan_tiny_parity.pt]

Prints the max abs difference of every fixture tensor against genprior in float32, against the
same network run in float64, and the fixture's own distance from float64 (its float32 rounding
on the machine that made it). The multi-code output is the method's own composition
(``MGANPrior.render``, what every fitting step computes). See the docstring of
tests/test_pggan.py for the reading.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from genprior.degradations import Identity
from genprior.methods.mganprior import MGANConfig, MGANPrior
from genprior.priors.pggan import PGGANGenerator
from genprior.priors.registry import build_pggan

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mganprior" / "pggan_tiny_parity.pt"


def outputs(G: PGGANGenerator, fx: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    z = fx["z"].to(dtype)
    mc = fx["multi_code"]
    out = {"images": G(z)}
    for key in fx["features"]:
        out[f"features[{key}]"] = G.head(z, int(key))
        out[f"post_outputs[{key}]"] = G.tail(fx["features"][key].to(dtype), int(key))
    out["multi_code.per_code_features"] = G.head(mc["z"].to(dtype).reshape(-1, 512), 6).view(
        mc["per_code_features"].shape)
    method = MGANPrior(G, MGANConfig(composing_layer=6, z_number=mc["z"].shape[1], vgg_lambda=0.0), Identity())
    out["multi_code.output"] = method.render(mc["z"].to(dtype), mc["alpha"].to(dtype))
    return out


@torch.no_grad()
def main() -> None:
    fx = torch.load(sys.argv[1] if len(sys.argv) > 1 else DEFAULT, weights_only=True)
    nets = {}
    for dtype in (torch.float32, torch.float64):
        G = build_pggan("pggan_tiny").to(dtype)
        G.load_state_dict({k: v.to(dtype) for k, v in fx["state_dict"].items()})
        nets[dtype] = outputs(G.eval(), fx, dtype)

    def ref(name: str) -> torch.Tensor:
        if "." in name and name.startswith("multi_code"):
            return fx["multi_code"][name.split(".", 1)[1]]
        if "[" in name:
            group, key = name[:-1].split("[")
            return fx[group][key]
        return fx[name]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'tensor':34} {'f32 vs fixture':>15} {'f64 vs fixture':>15} {'f32 vs f64':>12}")
    for name, ours in nets[torch.float32].items():
        r = ref(name).double()
        f64 = nets[torch.float64][name]
        print(f"{name:34} {float((ours.double() - r).abs().max()):15.2e} "
              f"{float((f64 - r).abs().max()):15.2e} {float((ours.double() - f64).abs().max()):12.2e}")


if __name__ == "__main__":
    main()
