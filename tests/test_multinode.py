"""evaluate.py on two nodes, simulated on this machine: torchrun and SLURM, equal to one process.

Each "node" is one process group of its own (a torchrun agent and its worker, or the one
process srun would start), talking to the other over 127.0.0.1 with gloo, exactly as two hosts
would over the network. Both launchers must give the merged results of a 1-process run bit for
bit (every row field but timings/rank/pid, and every file in every image's folder), and must
resume after one node is SIGKILL-ed mid-run without fitting any image twice.

The computation per image is the same in every run for the reasons given in
test_evaluate.py's docstring (batch 1, one intra-op thread per process), whose helpers are used.

torchrun uses the c10d rendezvous (``--rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:<port>``):
both agents try to host its store on that port, the first to bind does and the other joins it
as a client, as on two hosts where the endpoint names one of them. ``--local-addr=127.0.0.1``
makes the workers' process group meet on 127.0.0.1 rather than on this host's name.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from run_helpers import REPO, TINY, by_id, raw_rows, result_fields, subprocess_env, synthetic_folder

IMAGES = 4  # 2 per node: a node killed after its first row leaves work for the resume
# Bounds for one launch. A finished node waits at evaluate.py's final barrier for the other;
# if the other was killed, gloo usually fails that barrier at once (the peer's socket closed),
# and eval.dist_timeout_s bounds it otherwise.
RUN_TIMEOUT_S = 300
DIST_TIMEOUT_S = 30
SURVIVOR_WAIT_S = DIST_TIMEOUT_S + 60

Launch = Callable[[int, Path], subprocess.Popen]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _slurm_job_id() -> str:
    """A job id whose port (SLURMEnvironment: its last 4 digits + 15000) is free here, so the
    rendezvous address and port come from SLURM's variables as on a cluster."""
    for _ in range(200):
        job_id = str(int.from_bytes(os.urandom(3), "big") % 900000 + 100000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", int(job_id[-4:]) + 15000))
            except OSError:
                continue
        return job_id
    raise AssertionError("no free port in 15000-24999")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_folder(tmp_path_factory.mktemp("multinode") / "images", good=IMAGES,
                             corrupt=0)


def _args(folder: Path, out: Path) -> list[str]:
    return [*TINY, f"data.source={folder}", "data.class_id=3", f"output.dir={out}",
            f"eval.dist_timeout_s={DIST_TIMEOUT_S}"]


@pytest.fixture(scope="module")
def one_process(folder: Path, tmp_path_factory: pytest.TempPathFactory,
                evaluate_one_thread) -> Path:
    """The reference: the same images evaluated by one process (in this one)."""
    out = tmp_path_factory.mktemp("one") / "out"
    assert evaluate_one_thread(_args(folder, out)) == 0
    return out


# ------------------------------------------------------------------------------ launchers
def torchrun_nodes(folder: Path, out: Path) -> Launch:
    """``torchrun --nnodes=2 --node-rank=<n>`` per node, c10d rendezvous on 127.0.0.1.

    With the c10d (dynamic) rendezvous torchrun numbers the nodes in the order they join, not
    by ``--node-rank``; the tests find which process holds which rank from the rows' pids.
    """
    port, rdzv_id = _free_port(), f"genprior-{os.getpid()}-{time.monotonic_ns()}"

    def launch(node: int, log: Path) -> subprocess.Popen:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                   "--nproc-per-node=1", f"--node-rank={node}", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}",
                   "--local-addr=127.0.0.1", "--max-restarts=0", "evaluate.py",
                   *_args(folder, out), "trainer.strategy=ddp", "trainer.num_nodes=2",
                   "trainer.devices=1"]
        return _popen(command, subprocess_env(), log)

    return launch


def slurm_nodes(folder: Path, out: Path) -> Launch:
    """What ``srun`` starts for ``--nodes=2 --ntasks-per-node=1``: one process per node with
    SLURM's variables (those Lightning's SLURMEnvironment reads; the job name must not be
    "bash" or "interactive", which it takes for an interactive shell). No MASTER_ADDR/PORT:
    Lightning takes them from SLURM_NODELIST and SLURM_JOB_ID, as on a cluster."""
    job_id = _slurm_job_id()

    def launch(node: int, log: Path) -> subprocess.Popen:
        env = subprocess_env()
        env.update(SLURM_JOB_ID=job_id, SLURM_JOB_NAME="genprior-multinode-test",
                   SLURM_NODELIST="127.0.0.1", SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2",
                   SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_PROCID=str(node),
                   SLURM_NODEID=str(node), SLURM_LOCALID="0")
        # trainer=slurm as scripts/slurm_evaluate.sh gives it, on CPU nodes
        command = [sys.executable, "evaluate.py", *_args(folder, out), "trainer=slurm",
                   "trainer.accelerator=cpu", "trainer.num_nodes=2", "trainer.devices=1"]
        return _popen(command, env, log)

    return launch


def _popen(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # A session per node: killing its process group is a node failure (agent and worker).
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _node_pids(proc: subprocess.Popen) -> set[int]:
    """The node's processes: the one started and its descendants (torchrun starts its workers
    in sessions of their own, so a kill of the agent's process group misses them)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid ...": the command may hold spaces and parentheses
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    pids, grew = {proc.pid}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in pids} - pids
        pids |= more
        grew = bool(more)
    return pids


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL a node: every process of it at once, as a power cut would."""
    if proc.poll() is None:
        for pid in _node_pids(proc):
            try:
                os.killpg(pid, signal.SIGKILL) if pid == proc.pid else os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def _logs(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)


def _run_both(launch: Launch, tmp_path: Path, name: str) -> list[int]:
    """Both nodes at once, to the end; their exit codes."""
    logs = [tmp_path / f"{name}-node{n}.log" for n in (0, 1)]
    procs = [launch(n, log) for n, log in enumerate(logs)]
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name}: no exit in {RUN_TIMEOUT_S} s\n{_logs(logs)}")
    finally:
        for proc in procs:
            _kill(proc)
    codes = [proc.returncode for proc in procs]
    assert codes == [0, 0], f"{name}: exit codes {codes}\n{_logs(logs)}"
    return codes


def _assert_same_as_one_process(out: Path, one: Path) -> None:
    rows, reference = by_id(out), by_id(one)
    assert list(rows) == list(reference)  # every image, in the subset's order
    for image_id, row in rows.items():
        assert row["status"] == "ok", row
        # exact: batch 1 and one thread make every image the same computation (docstring)
        assert result_fields(row) == result_fields(reference[image_id]), image_id
        files = sorted(p.name for p in (one / image_id).iterdir())
        assert files == sorted(p.name for p in (out / image_id).iterdir()), image_id
        for name in files:  # images, losses.csv, metrics.json: byte for byte
            assert (out / image_id / name).read_bytes() == (one / image_id / name).read_bytes(), \
                f"{image_id}/{name}"


def _check_two_nodes(make_launch: Callable[[Path, Path], Launch], folder: Path,
                     one: Path, tmp_path: Path, survivor_finishes: bool) -> None:
    """A clean run, then a run whose rank-1 node is killed, then its resume; ``survivor_finishes``:
    the other node is known to fit the rest of its shard before it stops."""
    # 1. a clean run on two nodes
    out = tmp_path / "clean"
    _run_both(make_launch(folder, out), tmp_path, "clean")
    _assert_same_as_one_process(out, one)
    rows = raw_rows(out)
    assert sorted(r["rank"] for r in rows) == [0, 0, 1, 1]  # contiguous shards of 2
    assert all(r["world_size"] == 2 for r in rows)

    # 2. the node that holds rank 1 dies (SIGKILL of its process group) after its first row
    out = tmp_path / "killed"
    launch = make_launch(folder, out)
    logs = [tmp_path / f"killed-node{n}.log" for n in (0, 1)]
    procs = [launch(n, log) for n, log in enumerate(logs)]
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        rank1 = out / "results" / "rank1.jsonl"
        while not (rank1.is_file() and rank1.read_text().endswith("\n")):
            assert all(p.poll() is None for p in procs), f"a node ended early\n{_logs(logs)}"
            assert time.monotonic() < deadline, _logs(logs)
            time.sleep(0.05)
        worker = json.loads(rank1.read_text().splitlines()[0])["pid"]
        victim = next(p for p in procs if worker in _node_pids(p))
        _kill(victim)
        survivor = next(p for p in procs if p is not victim)
        # What a user sees (docs/evaluation.md, "Multi-node"): the surviving node exits
        # non-zero without the merged results, either after fitting the rest of its shard
        # (its final barrier fails: gloo sees the peer's connection gone; at worst after
        # eval.dist_timeout_s) or at once (its torchrun agent lost the rendezvous store,
        # which the killed node's agent hosted, and stopped its worker mid-image).
        try:
            survivor.wait(timeout=SURVIVOR_WAIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the surviving node still runs {SURVIVOR_WAIT_S} s after the kill\n"
                        f"{_logs(logs)}")
    finally:
        for proc in procs:
            _kill(proc)
    assert survivor.returncode != 0, _logs(logs)
    assert not (out / "results.jsonl").exists()
    killed = raw_rows(out)
    assert [r["rank"] for r in killed].count(1) == 1  # killed after its first of 2 images
    assert len(killed) < IMAGES
    if survivor_finishes:
        assert [r["rank"] for r in killed].count(0) == 2
        log = next(log for log, p in zip(logs, procs, strict=True) if p is survivor).read_text()
        assert "another rank stopped before the end, so no summary" in log, log[-3000:]
    # everything a node reported finished is on disk (a row is written before its line is
    # printed, so the killed node's last row may have no line: a subset, not equality)
    reported = set(re.findall(r"^genprior evaluate \[rank \d\] \d+/\d+ (\S+):",
                              "".join(log.read_text() for log in logs), flags=re.MULTILINE))
    assert reported <= {r["id"] for r in killed}

    # 3. the same command again, both nodes: only the unfinished images are fitted
    _run_both(launch, tmp_path, "resumed")
    _assert_same_as_one_process(out, one)
    rows = raw_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(by_id(one))  # none lost, none twice
    first_pids = {r["pid"] for r in killed}
    again = [r for r in rows if r["pid"] not in first_pids]
    assert {r["id"] for r in again} == set(by_id(one)) - {r["id"] for r in killed}
    assert all(r["world_size"] == 2 for r in again)
    counts = json.loads((out / "summary.json").read_text())["counts"]
    assert counts == {"subset": IMAGES, "finished": IMAGES, "ok": IMAGES, "failed": 0,
                      "skipped": len(killed), "this_run": IMAGES - len(killed), "missing": 0}


# ---------------------------------------------------------------------------------- tests
# In the default suite: each case is three 2-node launches (clean, killed, resumed) of two
# fresh Python processes each; 27 s (torchrun) and 20 s (SLURM) on an idle 2-core machine.
@pytest.mark.distributed
@pytest.mark.parametrize(("launch", "survivor_finishes"), [
    # Which node hosts the rendezvous store decides whether the survivor finishes its shard.
    pytest.param(torchrun_nodes, False, id="torchrun"),
    pytest.param(slurm_nodes, True, id="slurm"),
])
def test_two_nodes_equal_one_process_and_resume_after_a_node_dies(
    launch: Callable[[Path, Path], Launch], survivor_finishes: bool, folder: Path, one_process: Path,
    tmp_path: Path,
) -> None:
    _check_two_nodes(launch, folder, one_process, tmp_path, survivor_finishes=survivor_finishes)
