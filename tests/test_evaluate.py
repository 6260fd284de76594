"""evaluate.py: 2 processes equal 1, kill and resume, durable rows, summary, W&B report, sweeps.

The runs use the tiny random BigGAN on CPU with two optimisation steps per image. Every process
is pinned to one intra-op thread: oneDNN splits reductions by thread count, and Lightning gives
each of N CPU processes cores/N threads, so without pinning a 1-process and a 2-process run
would round differently (docs/reconstruction.md, "Batching and numerical agreement"). Every
run also fits one image at a time (trainer.batch_size=1, what "auto" gives on a CPU): however
the images are sharded, each is then the same computation, on one thread, in every run, so the
runs are compared bit for bit (whatever the --threads of the test session).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from run_helpers import (
    REPO,
    TINY,
    by_id,
    raw_rows,
    read_wandb_records,
    result_fields,
    subprocess_env,
    synthetic_folder,
)

from genprior import engine
from genprior.callbacks import WandbReport
from genprior.cli.evaluate import list_subset, run_evaluate
from genprior.config import compose, presets_root
from genprior.datamodules import ImageRecordDataset
from genprior.results import (
    ResultsWriter,
    iter_rows,
    latest_rows,
    repair_tail,
    t_interval,
)

# The reference's classes for the ImageNet val JPEGs in ../shared/data/dgp (its README).
DGP_CLASSES = {
    "00000525": 863, "00001172": 269, "00001970": 737, "00003004": 693, "00004291": 442,
    "00008229": 174, "00020814": 185, "00022130": 511, "00042095": 260, "00044065": 425,
}

def _start(args: list[str], log: Path) -> subprocess.Popen:
    # A new session: the rank Fabric starts is in the same process group, so a kill of the
    # group stops the whole job, as scancel or a node failure would.
    return subprocess.Popen([sys.executable, "evaluate.py", *args], cwd=REPO, env=subprocess_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 900) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"evaluate.py did not finish in {timeout} s; log:\n{log.read_text()[-4000:]}")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def imagenet_val(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> tuple[Path, Path]:
    """An ImageNet-val style flat folder of 10 JPEGs and a DGP-format list file."""
    root = tmp_path_factory.mktemp("imagenet") / "val"
    root.mkdir()
    lines = []
    for number, cls in DGP_CLASSES.items():
        name = f"ILSVRC2012_val_{number}.JPEG"
        shutil.copyfile(shared_dir / "data" / "dgp" / name, root / name)
        lines.append(f"{name} {cls}")
    listing = root.parent / "val_10.txt"
    listing.write_text("\n".join(lines) + "\n")
    return root, listing


def _data_args(imagenet_val: tuple[Path, Path]) -> list[str]:
    root, listing = imagenet_val
    return ["data.kind=imagenet_val", f"data.root={root}", f"data.labels={listing}"]


@pytest.fixture(scope="module")
def one_process(imagenet_val: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory,
                evaluate_one_thread) -> dict:
    """The 10 images evaluated by one process: the reference for the distributed runs."""
    out = tmp_path_factory.mktemp("one") / "out"
    assert evaluate_one_thread([*TINY, *_data_args(imagenet_val), f"output.dir={out}"]) == 0
    return by_id(out)


# ------------------------------------------------------------------- distributed runs
@pytest.mark.shared
@pytest.mark.distributed
def test_two_processes_give_the_results_of_one(imagenet_val, one_process, tmp_path: Path) -> None:
    out = tmp_path / "out"
    log = tmp_path / "two.log"
    proc = _start([*TINY, *_data_args(imagenet_val), "trainer=ddp_cpu", f"output.dir={out}"], log)
    assert _wait(proc, log) == 0, log.read_text()[-4000:]
    two = by_id(out)
    assert list(two) == list(one_process)  # every image, in the subset's order
    assert {r["rank"] for r in two.values()} == {0, 1}
    assert all(r["world_size"] == 2 for r in two.values())
    for image_id, row in two.items():
        assert row["status"] == "ok", row
        # exact equality of every metric, final loss and the chosen class: batch 1 and one
        # thread in both runs make every image the same computation (module docstring)
        assert result_fields(row) == result_fields(one_process[image_id]), image_id
    # contiguous shards of 5: the first half on rank 0
    assert [r["rank"] for r in two.values()] == [0] * 5 + [1] * 5
    assert len((out / "results" / "rank0.jsonl").read_text().splitlines()) == 5
    assert len((out / "results" / "rank1.jsonl").read_text().splitlines()) == 5


@pytest.mark.shared
@pytest.mark.distributed
def test_killed_run_resumes_without_losing_or_repeating_images(
    imagenet_val, one_process, tmp_path: Path, evaluate_one_thread
) -> None:
    out = tmp_path / "out"
    subset = ["data.subset.count=6"]
    log = tmp_path / "killed.log"
    proc = _start([*TINY, *_data_args(imagenet_val), *subset, "trainer=ddp_cpu",
                   f"output.dir={out}"], log)
    deadline = time.monotonic() + 600
    while len(raw_rows(out)) < 2:
        assert proc.poll() is None, f"finished before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks, mid-run
    proc.wait()
    killed = raw_rows(out)
    assert 2 <= len(killed) < 6
    first_pids = {r["pid"] for r in killed}
    # Everything the killed run reported finished is on disk.
    reported = set(re.findall(r"^genprior evaluate \[rank \d\] \d+/\d+ (\S+):", log.read_text(),
                              flags=re.MULTILINE))
    assert reported <= {r["id"] for r in killed}

    # Rerun the same evaluation (here with one process: the world size may change).
    assert evaluate_one_thread([*TINY, *_data_args(imagenet_val), *subset, f"output.dir={out}"]) == 0
    rows = raw_rows(out)
    ids = [r["id"] for r in rows]
    expected = list(one_process)[:6]
    assert sorted(ids) == sorted(expected)  # every image exactly once: none lost, none twice
    again = [r for r in rows if r["pid"] == os.getpid()]
    assert {r["id"] for r in again} == set(expected) - {r["id"] for r in killed}
    assert all(r["pid"] in first_pids for r in rows if r not in again)
    for row in rows:  # the resumed and the killed run agree with the single-process run (exact:
        # batch 1, one thread, the same computation per image; module docstring)
        assert result_fields(row) == result_fields(one_process[row["id"]]), row["id"]
    counts = json.loads((out / "summary.json").read_text())["counts"]
    assert counts == {"subset": 6, "finished": 6, "ok": 6, "failed": 0, "skipped": len(killed),
                      "this_run": 6 - len(killed), "missing": 0}


# ----------------------------------------------------------- single-process behaviour
@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory, evaluate_one_thread) -> Path:
    """Three good images and a corrupt one, reported to an offline W&B run."""
    base = tmp_path_factory.mktemp("wandb_run")
    folder = synthetic_folder(base / "images", good=3, corrupt=1)
    out = base / "out"
    mp = pytest.MonkeyPatch()
    # A key in the environment must never end up in anything written (mode forced offline).
    mp.setenv("WANDB_API_KEY", "local-0000genprior-test-secret-key-00000000")
    mp.setenv("WANDB_SILENT", "true")
    try:
        code = evaluate_one_thread([*TINY, "logger=wandb", "logger.mode=offline", "data.class_id=7",
                                f"data.source={folder}", "eval.wandb_sheets_first_k=2",
                                f"output.dir={out}"])
    finally:
        mp.undo()
    assert code == 0
    return out


def test_failed_image_is_recorded_with_its_reason(wandb_run: Path) -> None:
    rows = by_id(wandb_run)
    assert list(rows) == ["broken0", "img0", "img1", "img2"]  # folder order
    failed = rows["broken0"]
    assert failed["status"] == "failed" and failed["error"]
    assert "jpeg" in failed["error"].lower() or "image" in failed["error"].lower()
    for k in range(3):
        row = rows[f"img{k}"]
        assert row["status"] == "ok" and row["error"] is None and row["class"] == 7
        for key in ("psnr", "ssim", "final_loss", "seconds", "rank", "finished_at"):
            assert isinstance(row[key], int | float), key


def test_summary_files_hold_mean_std_and_t_interval(wandb_run: Path) -> None:
    import csv

    from scipy import stats

    rows = [r for r in by_id(wandb_run).values() if r["status"] == "ok"]
    table = {r["metric"]: r for r in csv.DictReader((wandb_run / "summary.csv").open())}
    assert {"psnr", "ssim", "final_loss", "seconds", "observation_psnr"} <= set(table)
    assert not {"rank", "pid", "class", "finished_at"} & set(table)
    psnr = [r["psnr"] for r in rows]
    n, mean, std = len(psnr), sum(psnr) / len(psnr), float(torch.tensor(psnr).double().std())
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    got = table["psnr"]
    assert int(got["n"]) == 3
    # float64 statistics of the very rows read here (no float32 arithmetic in between); rel 1e-5
    # only allows for the digits summary.csv prints
    assert float(got["mean"]) == pytest.approx(mean, rel=1e-5)
    assert float(got["std"]) == pytest.approx(std, rel=1e-5)
    assert float(got["ci95_low"]) == pytest.approx(mean - half, rel=1e-5)
    assert float(got["ci95_high"]) == pytest.approx(mean + half, rel=1e-5)
    summary = json.loads((wandb_run / "summary.json").read_text())
    assert summary["counts"] == {"subset": 4, "finished": 4, "ok": 3, "failed": 1, "skipped": 0,
                                 "this_run": 4, "missing": 0}
    markdown = (wandb_run / "summary.md").read_text()
    assert "| failed | 1 |" in markdown and "| psnr | 3 |" in markdown


def test_wandb_offline_run_holds_sheets_table_summary_and_config(wandb_run: Path) -> None:
    mirror = json.loads((wandb_run / "wandb_mirror.json").read_text())
    assert mirror["run"]["mode"] == "offline"
    assert mirror["config"]["prior"]["name"] == "biggan_tiny"  # the resolved config
    assert [i["key"] for i in mirror["images"]] == ["stages/img0", "stages/img1"]  # first K = 2
    assert all(Path(i["path"]).is_file() for i in mirror["images"])
    table = mirror["table"]
    assert table["columns"][:6] == ["id", "class", "status", "error", "observation", "result"]
    assert [row[0] for row in table["rows"]] == ["broken0", "img0", "img1", "img2"]
    assert table["rows"][1][5]["_type"] == "image" and table["rows"][0][5] is None
    psnr_col = table["columns"].index("psnr")
    assert table["rows"][1][psnr_col] == by_id(wandb_run)["img0"]["psnr"]
    summary = json.loads((wandb_run / "summary.json").read_text())
    assert mirror["summary"]["mean/psnr"] == pytest.approx(summary["metrics"]["psnr"]["mean"])
    assert mirror["summary"]["images/failed"] == 1
    assert mirror["history"] and mirror["history"][-1]["progress/finished"] == 4

    # The offline run itself: its folder, and the records in its .wandb file.
    run_dir = Path(mirror["run"]["dir"])
    assert run_dir.is_dir() and run_dir.parent == wandb_run / "wandb"
    assert run_dir.name.startswith("offline-run-") and run_dir.name.endswith(mirror["run"]["id"])
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1
    records = read_wandb_records(files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and "exit" in kinds
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {u.key: json.loads(u.value_json) for u in run_record.config.update}
    assert config["task"]["name"] == "colorization" and config["eval"]["wandb_sheets_first_k"] == 2
    history_keys = {item.nested_key[0] if item.nested_key else item.key
                    for r in records if r.WhichOneof("record_type") == "history"
                    for item in r.history.item}
    assert {"results", "stages/img0", "stages/img1", "progress/finished"} <= history_keys
    summary_keys = {u.nested_key[0] if u.nested_key else u.key
                    for r in records if r.WhichOneof("record_type") == "summary"
                    for u in r.summary.update}
    assert {"mean/psnr", "std/psnr", "ci95_low/psnr", "images/failed"} <= summary_keys
    uploaded = {f.path for r in records if r.WhichOneof("record_type") == "files"
                for f in r.files.files}
    assert any(p.startswith("media/table/results") for p in uploaded)
    assert any(p.startswith("media/images/stages/img0") for p in uploaded)


def test_wandb_never_writes_the_api_key(wandb_run: Path) -> None:
    secret = b"0000genprior-test-secret-key"
    for path in wandb_run.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path


def test_rerun_skips_finished_and_retry_failed_refits_only_failures(tmp_path: Path, evaluate_one_thread) -> None:
    folder = synthetic_folder(tmp_path / "images", good=1, corrupt=1)
    out = tmp_path / "out"
    args = [*TINY, f"data.source={folder}", "data.class_id=3", f"output.dir={out}"]
    assert evaluate_one_thread(args) == 0
    first = raw_rows(out)
    assert sorted(r["id"] for r in first) == ["broken0", "img0"]

    assert evaluate_one_thread(args) == 0  # nothing left to do
    assert raw_rows(out) == first
    counts = json.loads((out / "summary.json").read_text())["counts"]
    assert counts["skipped"] == 2 and counts["this_run"] == 0

    assert evaluate_one_thread([*args, "eval.retry_failed=true"]) == 0
    rows = raw_rows(out)
    assert sorted(r["id"] for r in rows) == ["broken0", "img0"]  # still one row per image
    assert next(r for r in rows if r["id"] == "img0") == next(r for r in first if r["id"] == "img0")
    retried = next(r for r in rows if r["id"] == "broken0")
    assert retried["status"] == "failed" and retried["finished_at"] > first[0]["finished_at"]

    # Results of another configuration are never mixed in.
    assert evaluate_one_thread([*args, "dgp.w_nll=0.5"]) == 2
    assert raw_rows(out) == rows
    # ... unless asked to start over, which moves the old results aside.
    assert evaluate_one_thread([*args, "dgp.w_nll=0.5", "eval.resume=false"]) == 0
    assert len(list(tmp_path.glob("out/results.old-*/rank0.jsonl"))) == 1
    assert {r["id"] for r in raw_rows(out)} == {"broken0", "img0"}


def test_several_processes_from_python_are_refused(tmp_path: Path) -> None:
    # Fabric starts the other ranks by re-running the command line, which is pytest here.
    args = [*TINY, "trainer=ddp_cpu", f"output.dir={tmp_path / 'out'}"]
    assert run_evaluate(args) == 2
    assert not (tmp_path / "out").exists()


def test_a_shard_is_one_fit_reading_each_image_when_its_batch_comes_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, evaluate_one_thread
) -> None:
    """One Trainer.fit for the whole shard, "auto" resolved once for it, and every image read
    only when its batch comes up: by then the rows of the images before it are on disk."""
    folder = synthetic_folder(tmp_path / "images", good=3, corrupt=1)
    out = tmp_path / "out"
    fits: list[L.Trainer] = []
    sizes: list[int] = []
    rows_when_read: dict[str, list[str]] = {}
    fit, choose, read = L.Trainer.fit, engine.choose_batch_size, ImageRecordDataset.read

    def counted_fit(self: L.Trainer, *args: Any, **kwargs: Any) -> Any:
        fits.append(self)
        return fit(self, *args, **kwargs)

    def counted_choice(*args: Any, **kwargs: Any) -> int:
        sizes.append(choose(*args, **kwargs))
        return sizes[-1]

    def watched_read(self: ImageRecordDataset, item: Any) -> Any:
        rows_when_read[item.id] = [r["id"] for r in raw_rows(out)]
        return read(self, item)

    monkeypatch.setattr(L.Trainer, "fit", counted_fit)
    monkeypatch.setattr(engine, "choose_batch_size", counted_choice)
    monkeypatch.setattr(ImageRecordDataset, "read", watched_read)
    assert evaluate_one_thread([*TINY, "trainer.batch_size=auto", f"data.source={folder}",
                                f"output.dir={out}"]) == 0
    assert len(fits) == 1
    assert sizes == [1]  # "auto" on a CPU
    assert rows_when_read == {"broken0": [], "img0": ["broken0"], "img1": ["broken0", "img0"],
                              "img2": ["broken0", "img0", "img1"]}
    assert [r["status"] for r in raw_rows(out)] == ["failed", "ok", "ok", "ok"]


def test_wandb_report_is_a_callback_that_only_rank_zero_acts_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose([*TINY, "logger=wandb", "logger.mode=offline", f"output.dir={tmp_path}"])
    report = WandbReport(cfg, tmp_path, tmp_path / "results", {"img0"})
    assert isinstance(report, L.Callback) and report.enabled
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # as on every other rank of evaluate.py
    report.start(total=1)
    report.on_train_epoch_end(None, None)  # type: ignore[arg-type]
    report.log_table("t", ["a"], [[1]])
    report.finish([], [], {"subset": 1}, tmp_path)
    assert report.run is None and report.mirror == {}
    assert list(tmp_path.iterdir()) == []  # no W&B run, no mirror


# ---------------------------------------------------------------- results file format
def test_rows_survive_a_cut_off_write_and_dedupeby_id(tmp_path: Path) -> None:
    path = tmp_path / "results" / "rank0.jsonl"
    with ResultsWriter(path) as writer:
        writer.append({"id": "a", "status": "ok", "psnr": 20.0, "finished_at": 1.0})
        writer.append({"id": "b", "status": "failed", "error": "x", "psnr": float("nan")})
    with path.open("ab") as fh:  # a kill in the middle of the third row
        fh.write(b'{"id": "c", "status": "ok", "ps')
    assert [r["id"] for r in iter_rows(tmp_path / "results")] == ["a", "b"]
    assert repair_tail(path) > 0
    with ResultsWriter(path) as writer:  # appending after a cut-off row starts a fresh line
        writer.append({"id": "c", "status": "ok", "psnr": 21.0, "finished_at": 2.0})
    rows = list(iter_rows(tmp_path / "results"))
    assert [r["id"] for r in rows] == ["a", "b", "c"] and rows[1]["psnr"] is None
    # Rows written twice (two runs on one folder at once) count once; ok beats failed.
    (tmp_path / "results" / "rank1.jsonl").write_text(
        json.dumps({"id": "a", "status": "failed", "finished_at": 9.0}) + "\n"
        + json.dumps({"id": "b", "status": "ok", "finished_at": 3.0}) + "\n")
    best = latest_rows(iter_rows(tmp_path / "results"))
    assert sorted(best) == ["a", "b", "c"]
    assert best["a"]["status"] == "ok" and best["b"]["status"] == "ok"


def test_t_interval_matches_scipy() -> None:
    from scipy import stats

    values = [21.3, 19.8, 23.1, 20.4, 22.0]
    s = t_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 5,
                                 scale=stats.sem(values))
    assert (s.n, s.ci95_low, s.ci95_high) == (5, pytest.approx(low), pytest.approx(high))
    assert math.isnan(t_interval([1.0]).std) and t_interval([1.0]).mean == 1.0


# -------------------------------------------------------------------------------- sweeps
def _sample(spec: dict[str, Any], rng: random.Random) -> Any:
    """One value of a W&B sweep parameter, for the kinds our sweep files use."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    kind = spec.get("distribution")
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))
    if kind == "int_uniform":
        return rng.randint(spec["min"], spec["max"])
    if kind in (None, "uniform"):
        return rng.uniform(spec["min"], spec["max"])
    raise AssertionError(f"the test does not sample {kind!r} parameters")


def _agent_command(sweep: dict[str, Any], params: dict[str, Any], monkeypatch, tmp_path: Path) -> list[str]:
    """The command line the W&B agent builds for a run with ``params`` (its own code path)."""
    from wandb import wandb_agent

    started: dict[str, Any] = {}

    class Recorder:  # stands in for the agent's subprocess
        def __init__(self, command: list[str] | None = None, env: dict | None = None, **_: Any) -> None:
            started.update(command=command, env=env)

    monkeypatch.setattr(wandb_agent, "AgentProcess", Recorder)
    monkeypatch.chdir(tmp_path)  # the agent writes wandb/sweep-<id>/config-<run>.yaml here
    # The agent sets WANDB_RUN_ID and WANDB_SWEEP_PARAM_PATH itself; monkeypatch restores them.
    monkeypatch.setenv("WANDB_RUN_ID", "placeholder")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "placeholder")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw33p")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    agent = wandb_agent.Agent.__new__(wandb_agent.Agent)
    agent._sweep_command = list(sweep["command"])
    agent._function, agent._in_jupyter, agent._forward_signals = None, False, False
    agent._run_processes = {}
    args = {name: {"value": value} for name, value in params.items()}
    args["_wandb"] = {"value": {"sweep_param": True}}  # noise a CLI must tolerate
    agent._command_run({"type": "run", "run_id": "r7un1d", "program": sweep["program"],
                        "args": args})
    return started["command"]


@pytest.mark.parametrize("name", ["dgp_colorization_lr", "dip_denoising"])
def test_sweep_agent_command_line_becomes_the_config(name: str, monkeypatch, tmp_path: Path) -> None:
    sweep = yaml.safe_load((presets_root() / "sweep" / f"{name}.yaml").read_text())
    assert sweep["program"] == "evaluate.py" and (REPO / sweep["program"]).is_file()
    assert sweep["metric"]["name"].startswith("mean/")  # a summary key of WandbReport
    rng = random.Random(0)
    for _ in range(3):
        params = {k: _sample(v, rng) for k, v in sweep["parameters"].items()}
        argv = _agent_command(sweep, params, monkeypatch, tmp_path)
        assert argv[:3] == ["/usr/bin/env", "python", "evaluate.py"]
        assert any(a.startswith("--_wandb=") for a in argv)
        cfg = compose(argv[3:])  # what evaluate.py composes from the agent's arguments
        for key, value in params.items():
            section, field = key.split(".")
            got = cfg[section][field]
            got = list(got) if isinstance(value, list) else got
            assert got == value, key  # exact: Python prints floats round-trip
        assert cfg.logger.kind == "wandb"
        assert cfg.output.dir.endswith(f"sweeps/{name}/r7un1d")  # a folder per run


# ------------------------------------------------------------------ data sources wiring
def test_data_presets_pick_the_datamodule_and_subset(tmp_path: Path) -> None:
    import io

    import lmdb

    path = tmp_path / "bedroom_val_lmdb"
    env = lmdb.open(str(path), map_size=1 << 24)
    keys = [f"{k:040x}" for k in (5, 1, 9, 3)]
    with env.begin(write=True) as txn:
        for k, key in enumerate(keys):
            buf = io.BytesIO()
            Image.new("RGB", (300, 256), (30 * k, 80, 120)).save(buf, format="WEBP")
            txn.put(key.encode(), buf.getvalue())
    env.close()
    cfg = compose([*TINY, "data=lsun_bedroom", f"data.lmdb={path}", "data.subset.count=2",
                   "data.subset.seed=1"])
    dm, items = list_subset(cfg)
    assert type(dm).__name__ == "LSUNDataModule" and dm.preprocessing == "pggan"
    assert len(items) == 2 and [i.id for i in items] == sorted(i.id for i in items)
    records = dm.make_dataset(items)
    assert records[0]["error"] == "" and tuple(records[0]["image"].shape) == (3, 128, 128)
    read = records.read(items[0])  # what the engine calls when the image's batch comes up
    assert read.usable and torch.equal(read.image, records[0]["image"]) and items[0].image is None

    folder = synthetic_folder(tmp_path / "images", good=3)
    listing = tmp_path / "list.txt"
    listing.write_text("img2.png 5\nimg0.png 5\nimg1.png 6\n")
    cfg = compose([*TINY, "data=folder", f"data.source={listing}", "data.subset.per_class=1"])
    dm, items = list_subset(cfg)
    assert [(i.id, i.class_id) for i in items] == [("img2", 5), ("img1", 6)]
    cfg = compose([*TINY, "data=folder", f"data.source={folder}", "data.limit=2"])
    assert [i.id for i in list_subset(cfg)[1]] == ["img0", "img1"]
