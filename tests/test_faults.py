"""Faults a trial survives, for real: `kill -9` and SIGTERM of a vLLM trial (vllm-cpu) leave no
engine process behind, a crash that took the guard along is reaped by the next trial, no run
stays RUNNING after a kill, a read-only or full store is one line before anything runs, and a
disk that fills up during a trial loses none of its metrics.

The disk tests mount a tmpfs in a private mount namespace (`unshare -m`), so nothing outside the
test's processes sees it and it goes away with them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import psutil
import pytest

from sweeper.engines.toolkit.processes import RECORDS
from tests.conftest import REPO, cli_env, run_cli, start_cli

VLLM_TRIAL = [
    "engine=vllm",
    "engine.enforce_eager=true",
    "dataset.limit=4",
    "tracking.log_predictions=false",
]
HF_TRIAL = ["dataset.limit=4", "max_new_tokens=4", "tracking.log_predictions=false"]
needs_vllm = pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is None,
    reason="vLLM is not installed (scripts/install_vllm_cpu.sh installs it for CPU)",
)


def _wait_for(what: str, probe: Callable[[], Any], proc: subprocess.Popen, log: Path) -> Any:
    deadline = time.monotonic() + 300
    while not (found := probe()):
        assert proc.poll() is None, f"exited before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    return found


def _engine_processes(pid: int) -> list[psutil.Process]:
    """The vLLM processes under `pid` (vLLM titles them VLLM::EngineCore, VLLM::Worker...)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "VLLM::" in " ".join(child.cmdline()) or child.name().startswith("VLLM::"):
                found.append(child)
        except psutil.Error:
            continue
    return found


def _runs(uri: str) -> list:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["sweeper"], output_format="list")


def _running_run(uri: str) -> list:
    try:
        return [run for run in _runs(uri) if run.info.status == "RUNNING"]
    except Exception:  # noqa: BLE001 - the store is not created yet
        return []


def _start_vllm_trial(tmp_path: Path, store: dict) -> tuple[subprocess.Popen, Path, list]:
    """A vLLM trial, once its engine core process exists (start-up has begun)."""
    log = tmp_path / "trial.log"
    proc = start_cli([*VLLM_TRIAL, *store["args"]], tmp_path, log)
    engine = _wait_for("vLLM engine process", lambda: _engine_processes(proc.pid), proc, log)
    return proc, log, engine


@needs_vllm
@pytest.mark.slow
def test_kill_9_of_a_vllm_trial_leaves_no_engine_process(tmp_path: Path, store: dict) -> None:
    proc, log, engine = _start_vllm_trial(tmp_path, store)
    time.sleep(5)  # its worker and the rest of the tree
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert {p.pid for p in engine} <= {p.pid for p in tree}
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=20)
    left = [f"{p.name()} ({p.pid})" for p in alive]
    for process in alive:  # the test's own clean-up, whatever it found
        process.kill()
    assert not left, f"left behind: {left}"


@needs_vllm
@pytest.mark.slow
def test_a_crash_that_took_the_guard_along_is_reaped_by_the_next_trial(
    tmp_path: Path, store: dict
) -> None:
    """Both the trial and its guard killed (as the OOM killer might): the engine processes are
    orphaned, the run stays RUNNING; the next trial on the machine kills them and ends it."""
    proc, log, _ = _start_vllm_trial(tmp_path, store)
    records = lambda: list(RECORDS.glob(f"{proc.pid}-*.json"))  # noqa: E731
    (record,) = _wait_for("guard record", records, proc, log)
    guard = psutil.Process(json.loads(record.read_text())["guard"]["pid"])
    assert "guard" in guard.cmdline()
    _wait_for("run", lambda: _running_run(store["uri"]), proc, log)
    time.sleep(3)  # the guard has recorded the engine's tree
    orphans = psutil.Process(proc.pid).children(recursive=True)
    guard.kill()
    guard.wait(10)
    proc.kill()
    proc.wait()
    try:
        time.sleep(2)
        assert any(p.is_running() for p in orphans)  # what the reaper is for
        result = run_cli([*HF_TRIAL, *store["args"]], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "killed" in result.stderr and "left by a trial process that is gone" in (
            result.stderr
        )
        _, alive = psutil.wait_procs(orphans, timeout=10)
        assert not alive, [p.pid for p in alive]
    finally:
        for process in orphans:  # the test's own clean-up, whatever happened
            if process.is_running():
                process.kill()
    crashed, finished = sorted(_runs(store["uri"]), key=lambda run: run.info.start_time)
    assert crashed.info.status == "KILLED"
    assert f"pid {proc.pid}" in crashed.data.tags["killed"]
    assert finished.info.status == "FINISHED"


@needs_vllm
@pytest.mark.slow
def test_sigterm_during_vllm_start_up_ends_killed(tmp_path: Path, store: dict) -> None:
    """vLLM's start-up swallows the KeyboardInterrupt SIGTERM becomes (its ZMQ socket context):
    the trial must still end KILLED with status 130, not run on to FINISHED."""
    proc, log, _ = _start_vllm_trial(tmp_path, store)
    tree = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 130, log.read_text()[-3000:]
    (run,) = _runs(store["uri"])
    assert run.info.status == "KILLED"
    assert "tps" not in run.data.metrics  # it stopped in start-up, before measuring
    _, alive = psutil.wait_procs(tree, timeout=20)
    assert not alive, [p.pid for p in alive]


@pytest.mark.slow
def test_kill_9_of_a_grid_leaves_no_run_running(tmp_path: Path, store: dict) -> None:
    log = tmp_path / "grid.log"
    proc = start_cli(["-m", "batch_size=1,2", *HF_TRIAL, *store["args"]], tmp_path, log)
    _wait_for("trial run", lambda: len(_running_run(store["uri"])) == 2, proc, log)
    proc.kill()
    proc.wait()
    assert {run.info.status for run in _runs(store["uri"])} == {"RUNNING"}  # parent and trial

    # The next command that opens the experiment ends them: their process is gone.
    result = run_cli([*HF_TRIAL, *store["args"]], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _runs(store["uri"])
    killed = [run for run in runs if run.info.status == "KILLED"]
    assert len(killed) == 2 and len(runs) == 3
    for run in killed:
        assert run.data.tags["killed"].startswith(f"its process (pid {proc.pid} on ")
        assert json.loads(run.data.tags["sweeper_process"])["pid"] == proc.pid


# --- the store's disk -----------------------------------------------------------------------


def _namespace() -> list[str]:
    """A private mount namespace in which this user may mount a tmpfs (root: unshare -m;
    others: a user namespace that maps them to root)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "tmpfs", "/mnt"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace: {probe.stderr.decode()[:200]}")
    return prefix


def _cli_on_tmpfs(
    mount: Path, options: str, setup: str, args: list[str], log: Path
) -> subprocess.Popen:
    """`python -m sweeper ARGS` with a tmpfs of `options` at `mount`, `setup` run on it first."""
    mount.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o {options} tmpfs "$1" && {setup} && shift && exec "$@"'
    command = [*_namespace(), "sh", "-c", script, "sh", str(mount)]
    command += [sys.executable, "-m", "sweeper", *args]
    return subprocess.Popen(
        command, cwd=REPO, env=cli_env(), stdout=log.open("w"), stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize(
    ("options", "setup", "problem"),
    [
        ("ro,size=1m", "true", "is on a read-only file system"),
        (
            "size=256k",
            'head -c 1m /dev/zero > "$1/fill" 2>/dev/null; true',
            "is on a full disk (0 KiB free)",
        ),
    ],
    ids=["read-only", "full"],
)
def test_a_read_only_or_full_store_is_one_line(
    tmp_path: Path, options: str, setup: str, problem: str
) -> None:
    mount = tmp_path / "store"
    uri = f"sqlite:///{mount}/mlflow.db"
    args = [f"tracking.uri={uri}", f"tracking.artifact_location={mount}/art", *HF_TRIAL]
    proc = _cli_on_tmpfs(mount, options, setup, args, tmp_path / "out.log")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith(
        f"sweeper: error: invalid value for 'tracking.uri': '{uri}' (allowed: a store sweeper "
        f"can write to; {mount}"
    ), line
    assert line.endswith(f"{problem})"), line


@pytest.mark.slow
def test_a_disk_that_fills_during_a_trial_loses_no_metric(tmp_path: Path) -> None:
    """The artifact folder's disk fills up while the trial runs: the metrics are printed before
    anything is written, what can be written (metrics, tags: the database is elsewhere) is, the
    run ends FAILED naming what was not, and the error is one line."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifacts = tmp_path / "artifacts"
    args = [f"tracking.uri={uri}", f"tracking.artifact_location={artifacts}", *HF_TRIAL]
    args.append(f"hydra.run.dir={tmp_path / 'run'}")
    log = tmp_path / "out.log"
    proc = _cli_on_tmpfs(artifacts, "size=1m", "true", args, log)
    _wait_for("run", lambda: _running_run(uri), proc, log)
    # Fill the tmpfs through the trial's own view of the file system (its mount namespace).
    with open(f"/proc/{proc.pid}/root{artifacts}/fill", "wb") as fill:
        try:
            while True:
                fill.write(b"\0" * 65536)
                fill.flush()
        except OSError as error:
            assert error.errno == 28  # ENOSPC: the disk is full
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    printed = log.read_text()
    assert "tps" in printed and "accuracy" in printed  # the table, before any write
    (line,) = [line for line in stderr.splitlines() if line.strip()]
    assert "failed: RecordError: not written to MLflow: config.yaml (" in line, line
    assert "No space left on device" in line
    (run,) = _runs(uri)
    assert run.info.status == "FAILED"
    assert {"tps", "accuracy", "peak_mem_gb"} <= set(run.data.metrics)  # written all the same
    assert run.data.tags["engine"] == "hf"
    assert "No space left on device" in run.data.tags["error"]
