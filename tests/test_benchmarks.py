"""The throughput benchmark still runs and writes its section (speed itself is never asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dgp_throughput_writes_its_section_with_baseline_and_batched_rows(tmp_path: Path) -> None:
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n\nprose that must survive\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "benchmarks/dgp_throughput.py", "--width", "8", "--steps", "2", "--batch-sizes", "2",
         "--dtypes", "fp32", "--images", "2", "--no-memory", "--threads", "1", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = out.read_text()
    assert "prose that must survive" in text
    assert "<!-- dgp-cpu-1:begin -->" in text and "<!-- dgp-cpu-1:end -->" in text
    assert "python benchmarks/dgp_throughput.py --width 8" in text  # the exact command
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "sequential B=1 fp32 (baseline)" in rows and "B=2 fp32" in rows, rows.keys()
    cells = [c.strip() for c in rows["B=2 fp32"].split("|")[1:-1]]
    assert re.fullmatch(r"\d+\.\d+x", cells[4]), cells  # speed-up vs the baseline
    # the batched engine's final PSNR equals the sequential loop's on the same images (fp32) to
    # float rounding: the max |ΔPSNR| reads 0.000 dB (below the table's 5e-4 dB resolution) at
    # --threads 1, 2 and 4 alike, so 0.01 dB is a >20x margin; a batching bug costs whole dB
    assert abs(float(cells[-1])) < 0.01, cells
