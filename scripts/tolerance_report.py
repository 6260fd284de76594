"""The measured spread behind every float32 tolerance of the test suite.

Run the suite once per thread count with recording on, then summarise:

    for t in 1 2 4; do
        GENPRIOR_RECORD_TOLERANCES=/tmp/tol.jsonl .venv/bin/python -m pytest --threads $t -q
    done
    .venv/bin/python scripts/tolerance_report.py /tmp/tol.jsonl

For every ``torch.testing.assert_close`` call site it prints the dtype, the tolerance and the
largest absolute difference seen at each thread count with the fraction of its tolerance
used (|a - b| / (atol + rtol |b|)), and flags call sites that use more than 1/``--margin``
(default 3) of their tolerance.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path, nargs="+")
    parser.add_argument("--margin", type=float, default=3.0)
    parser.add_argument("--dtype", default="float32", help="only call sites of this dtype ('' for all)")
    args = parser.parse_args()
    sites: dict[str, dict] = defaultdict(lambda: {"threads": defaultdict(lambda: [0.0, 0.0]), "tol": set()})
    for path in args.records:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if args.dtype and row.get("dtype") != args.dtype:
                continue
            site = sites[row["site"]]
            worst = site["threads"][row["threads"]]
            worst[0] = max(worst[0], row.get("max_abs", 0.0))
            worst[1] = max(worst[1], row.get("used", 0.0))
            site["tol"].add((row.get("atol"), row.get("rtol")))
    print(f"{'call site':<34} {'atol/rtol':<22} " + "  ".join(f"{'abs@' + str(t):>9} {'used@' + str(t):>9}" for t in (1, 2, 4)))
    for name in sorted(sites, key=lambda n: (n.split(":")[0], int(n.split(":")[1]))):
        site = sites[name]
        tol = ", ".join(f"{a}/{r}" for a, r in sorted(site["tol"], key=str))
        cells = []
        flag = ""
        for t in (1, 2, 4):
            abs_, used = site["threads"].get(t, [float("nan"), float("nan")])
            cells.append(f"{abs_:9.1e} {used:9.2f}")
            if used * args.margin > 1:
                flag = "  <- less than the margin"
        print(f"{name:<34} {tol:<22} " + "  ".join(cells) + flag)


if __name__ == "__main__":
    main()
