"""Durable per-image results of an evaluation, and their summary.

Every rank appends one JSON line per finished image to its own file
``<output.dir>/<eval.results>/rank<r>.jsonl`` (one writer per file, so no locking). A line is
written with a single ``write`` on an ``O_APPEND`` descriptor and then ``fsync``-ed: after a
SIGKILL or a power cut the file holds every row that was reported finished, and at most one
cut-off last line, which readers ignore and `repair_tail` removes before the next append.

Readers merge every ``rank*.jsonl`` (the world size may change between runs) and keep one row
per id (`latest_rows`), so even rows written twice by a misuse (two runs on one folder at once)
count once.

`summarize` gives, for every metric of the ``ok`` rows (and the final losses and the seconds per
image), the mean, the sample standard deviation and a 95% confidence interval of the mean from
Student's t distribution, clipped to the metric's range. Which columns are metrics, and their
ranges, is known where the metrics are defined (``genprior.metrics.metric_range``, a layer
above this module): callers pass it in.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scipy import stats

__all__ = [
    "BOOKKEEPING_KEYS",
    "MetricStats",
    "ResultsWriter",
    "drop_failed_rows",
    "iter_rows",
    "latest_rows",
    "metric_names",
    "repair_tail",
    "summarize",
    "t_interval",
    "write_summary_files",
]

RANK_FILE_GLOB = "rank*.jsonl"

#: Numeric row fields that describe the run rather than the result; not summarised.
BOOKKEEPING_KEYS = frozenset({
    "class", "label", "rank", "world_size", "pid", "finished_at", "run_started_at", "steps",
})


def rank_file(results_dir: Path, rank: int) -> Path:
    return Path(results_dir) / f"rank{rank}.jsonl"


def to_jsonable(value: Any) -> Any:
    """JSON-safe copy: tensors/numpy scalars to numbers, non-finite floats to null."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class ResultsWriter:
    """Appends rows to one rank's file; each row is on disk when `append` returns."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, row: dict[str, Any]) -> None:
        data = (json.dumps(to_jsonable(row), allow_nan=False) + "\n").encode()
        view = memoryview(data)
        while view:  # one write() in practice; loop in case the kernel writes less
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def repair_tail(path: Path) -> int:
    """Cut a last line that has no newline (a write cut off by a kill); returns bytes removed."""
    if not path.is_file():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return 0
        # Find the last newline; everything after it is the cut-off row.
        block = 1 << 16
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - block)
            fh.seek(start)
            chunk = fh.read(end - start)
            k = chunk.rfind(b"\n")
            if k >= 0:
                keep = start + k + 1
                break
            end = start
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return size - keep


def iter_rows(results_dir: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every complete, parsable row of every rank file, in file order."""
    folder = Path(results_dir)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob(RANK_FILE_GLOB)):
        with path.open("rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    continue  # cut off by a kill: that image counts as not finished
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("id"), str):
                    yield row


def latest_rows(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per id: an ``ok`` row beats a ``failed`` one, then the later one wins."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        old = best.get(row["id"])
        if old is None or _rank_of(row) >= _rank_of(old):
            best[row["id"]] = row
    return best


def _rank_of(row: dict[str, Any]) -> tuple[int, float]:
    return (1 if row.get("status") == "ok" else 0, float(row.get("finished_at") or 0.0))


def drop_failed_rows(results_dir: str | os.PathLike[str]) -> list[str]:
    """Rewrite the rank files without their ``failed`` rows (for eval.retry_failed); returns the
    ids dropped. Each file is replaced atomically (written aside, fsync-ed, renamed)."""
    dropped: list[str] = []
    for path in sorted(Path(results_dir).glob(RANK_FILE_GLOB)):
        repair_tail(path)
        kept: list[bytes] = []
        changed = False
        with path.open("rb") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except ValueError:
                    changed = True
                    continue
                if isinstance(row, dict) and row.get("status") == "failed":
                    dropped.append(str(row.get("id")))
                    changed = True
                    continue
                kept.append(line)
        if changed:
            atomic_write_bytes(path, b"".join(kept))
    return dropped


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


@dataclass
class MetricStats:
    metric: str
    n: int
    mean: float
    std: float  # sample standard deviation (ddof = 1); nan for n < 2
    ci95_low: float  # 95% confidence interval of the mean, Student's t with n - 1 dof
    ci95_high: float


def t_interval(values: Sequence[float], confidence: float = 0.95,
               bounds: tuple[float, float] = (-math.inf, math.inf)) -> MetricStats:
    """Mean, sample std and the t confidence interval of the mean of ``values``, the interval
    clipped to ``bounds`` (the metric's range: the t-interval is symmetric, the metric may not
    be, e.g. SSIM <= 1)."""
    n = len(values)
    if n == 0:
        nan = float("nan")
        return MetricStats("", 0, nan, nan, nan, nan)
    mean = math.fsum(values) / n
    if n < 2:
        nan = float("nan")
        return MetricStats("", n, mean, nan, nan, nan)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    low, high = bounds
    return MetricStats("", n, mean, std, max(mean - half, low), min(mean + half, high))


#: What a result-row column is, for the summary: a metric (its range), or None.
MetricRange = Callable[[str], "tuple[float, float] | None"]

#: Columns summarised besides the metrics: the cost of an image (seconds, and the defense's
#: purifier runs: counts, >= 0) and the last step's losses (``final_*``, unclipped: a
#: method's objective may have terms of either sign).
COST_RANGES: dict[str, tuple[float, float]] = {"seconds": (0.0, math.inf), "purifier_runs": (0.0, math.inf)}
FINAL_LOSS_PREFIX = "final_"


def metric_names(rows: Iterable[dict[str, Any]], ranges: MetricRange | None = None) -> list[str]:
    """The summarised columns of the ok rows, sorted: with ``ranges``, the metrics (columns
    ``ranges`` knows), ``final_*`` losses and the costs (``COST_RANGES``); without, every numeric field that is
    not bookkeeping."""
    names: set[str] = set()
    for row in rows:
        if row.get("status") != "ok":
            continue
        for key, value in row.items():
            if key in BOOKKEEPING_KEYS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if ranges is None or _bounds(key, ranges) is not None:
                names.add(key)
    return sorted(names)


def _bounds(column: str, ranges: MetricRange) -> tuple[float, float] | None:
    if column in COST_RANGES:
        return COST_RANGES[column]
    if column.startswith(FINAL_LOSS_PREFIX):
        return (-math.inf, math.inf)
    return ranges(column)


def summarize(rows: Sequence[dict[str, Any]], ranges: MetricRange | None = None) -> list[MetricStats]:
    """Statistics of every summarised column over the ``ok`` rows (missing/null values skipped).

    ``ranges`` (``genprior.metrics.metric_range``): which columns are metrics and their value
    ranges. With it, config constants and per-image facts (``z_number``, ``composing_layer``,
    ``class``, ...) are left out and every interval is clipped to its metric's range; without
    it, every numeric column is summarised, unclipped.
    """
    ok = [r for r in rows if r.get("status") == "ok"]
    out = []
    for name in metric_names(ok, ranges):
        values = [float(r[name]) for r in ok
                  if isinstance(r.get(name), int | float) and not isinstance(r.get(name), bool)
                  and math.isfinite(float(r[name]))]
        bounds = (-math.inf, math.inf) if ranges is None else _bounds(name, ranges)
        stats = t_interval(values, bounds=bounds or (-math.inf, math.inf))
        stats.metric = name
        out.append(stats)
    return out


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.6g}"


def summary_markdown(stats: Sequence[MetricStats], counts: dict[str, int], title: str) -> str:
    lines = [f"# {title}", "", "| images | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    lines += ["", "| metric | n | mean | std | 95% CI |", "|---|---:|---:|---:|---|"]
    for s in stats:
        ci = "-" if not math.isfinite(s.ci95_low) else f"[{_fmt(s.ci95_low)}, {_fmt(s.ci95_high)}]"
        lines.append(f"| {s.metric} | {s.n} | {_fmt(s.mean)} | {_fmt(s.std)} | {ci} |")
    return "\n".join(lines) + "\n"


def write_summary_files(out: Path, stats: Sequence[MetricStats], counts: dict[str, int],
                        title: str) -> str:
    """``summary.csv`` (one row per metric), ``summary.md`` and ``summary.json`` (counts and
    metrics); returns the markdown."""
    fields = list(asdict(MetricStats("", 0, 0.0, 0.0, 0.0, 0.0)).keys())
    tmp = out / ".summary.csv.tmp"
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for s in stats:
            writer.writerow({k: (_fmt(v) if isinstance(v, float) else v)
                             for k, v in asdict(s).items()})
    os.replace(tmp, out / "summary.csv")
    markdown = summary_markdown(stats, counts, title)
    atomic_write_text(out / "summary.md", markdown)
    payload = {"title": title, "counts": counts,
               "metrics": {s.metric: to_jsonable(asdict(s)) for s in stats}}
    atomic_write_text(out / "summary.json", json.dumps(payload, indent=2) + "\n")
    return markdown
