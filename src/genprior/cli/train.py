"""``train.py``: restore (or manipulate) the given images by fitting a prior to each one.

Reads top to bottom like the experiment: compose the config, run the task (tasks.run: read the
images, build the method, fit them through the engine), write results.jsonl and print a line
per image.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from genprior import errors, tasks
from genprior.config import compose_or_exit, to_yaml

__all__ = ["run_train", "train", "train_main"]


def train_main(argv: Sequence[str] | None = None) -> int:
    return run_train(sys.argv[1:] if argv is None else list(argv))


def run_train(argv: Sequence[str]) -> int:
    """Exit code 0 when an image was fitted, 1 when every image failed, 2 for a user error
    (one line on stderr, no traceback unless GENPRIOR_DEBUG=1; genprior.errors)."""
    cfg = compose_or_exit(argv, "train.py")
    if cfg is None:
        return 0
    try:
        return train(cfg)
    except errors.UserError as err:
        if errors.debug_enabled():
            raise
        return errors.report("train.py", err)


def train(cfg: Any) -> int:
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    rows = tasks.run(cfg, out)
    write_results(rows, out)
    print_summary(rows, out, cfg)
    return 0 if any(r["status"] == "ok" for r in rows) or not rows else 1


def write_results(rows: list[dict[str, Any]], out: Path) -> None:
    with (out / "results.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=str) + "\n")


def print_summary(rows: list[dict[str, Any]], out: Path, cfg: Any) -> None:
    print(f"\ngenprior: {cfg.prior.name} / {cfg.task.name} on {len(rows)} image(s)")
    for row in rows:
        if row["status"] != "ok":
            print(f"  {row['id']}: FAILED - {row.get('error')}")
            continue
        parts = []
        if "observation_psnr" in row:
            parts.append(f"observation PSNR {row['observation_psnr']:.2f} dB")
        if "psnr" in row:
            parts.append(f"result PSNR {row['psnr']:.2f} dB")
        if "ssim" in row:
            parts.append(f"SSIM {row['ssim']:.4f}")
        if isinstance(row.get("outputs"), dict):  # manipulation rows (tasks/manipulation.py)
            parts.append(f"{row['task']}: {row['outputs'].get('gif') or row['outputs'].get('sheet')}")
        print(f"  {row['id']}: " + ", ".join(parts) + f" ({row.get('seconds', 0):.1f} s)")
    print(f"outputs: {out.resolve()}")
