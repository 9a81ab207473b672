"""Scale-out with real servers on 127.0.0.1: workers sharing one Optuna study on PostgreSQL, their
runs in an MLflow tracking server (PostgreSQL backend, artifact root), a worker killed mid-trial,
a dead worker on another host found by its heartbeat, the joblib launcher, GPU slots on CPU.

No multi-GPU host runs these: `hydra/launcher=gpus` is checked for what it does on any host
(one GPU per joblib process, exclusive, kept across jobs); CUDA itself is not exercised.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from hydra_plugins.sweeper_optuna._run import DUPLICATE_ATTR, _consecutive, launcher_jobs
from sweeper.tracking.store import unreachable_reason
from tests.conftest import REPO, run_cli, start_cli
from tests.servers import create_database, free_port, mlflow_server, postgres_server

# Small, quick trials; tps varies with the configuration (accuracy is 1.0 on all of them).
FAST = ["dataset.limit=4", "tracking.log_predictions=false", "hydra.sweeper.objectives=[tps:max]"]
WORKER_TIMEOUT_S = 300


@dataclass(frozen=True)
class Servers:
    optuna_url: str  # the studies' database
    tracking_uri: str  # the MLflow server
    artifacts: Path  # the server's artifact root


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    root = tmp_path_factory.mktemp("servers")
    with postgres_server() as template:
        backend = create_database(template, "mlflow")
        studies = create_database(template, "optuna")
        with mlflow_server(backend, root / "artifacts", root / "mlflow.log") as url:
            yield Servers(studies, url, root / "artifacts")


def _study_args(servers: Servers, study: str, sweep_dir: Path) -> list[str]:
    """A worker's command line: every worker of a study runs the same one but its sweep dir."""
    return [
        "-m",
        "hydra/sweeper=optuna",
        f"hydra.sweeper.storage={servers.optuna_url}",
        f"hydra.sweeper.study_name={study}",
        f"tracking.uri={servers.tracking_uri}",
        f"experiment_name={study}",
        f"hydra.sweep.dir={sweep_dir}",
        *FAST,
    ]


def _finish(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"worker did not finish:\n{log.read_text()[-3000:]}")


def _study(servers: Servers, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=servers.optuna_url)


def _runs(servers: Servers, experiment: str) -> tuple[list, list]:
    """(parent runs, child runs) of `experiment` in the tracking server."""
    mlflow.set_tracking_uri(servers.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _params(trial: optuna.trial.FrozenTrial) -> tuple:
    return tuple(sorted(trial.params.items()))


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path: Path, servers: Servers) -> None:
    # A grid of 8 (batch_size x max_new_tokens): any point run twice would show.
    args = [*_study_args(servers, "shared", tmp_path / "{w}"), "hydra.sweeper.sampler=grid"]
    args += ["hydra.sweeper.n_trials=8", "batch_size=1,2,4,8", "max_new_tokens=4,8"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [start_cli([a.replace("{w}", log.stem) for a in args], tmp_path, log) for log in logs]
    for proc, log in zip(workers, logs, strict=True):
        assert _finish(proc, log) == 0, log.read_text()[-3000:]

    study = _study(servers, "shared")
    assert len(study.trials) == 8
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({_params(t) for t in study.trials}) == 8  # no configuration evaluated twice
    by_worker = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert by_worker == {proc.pid for proc in workers}  # both workers ran trials

    (parent,), children = _runs(servers, "shared")  # one parent run for both workers
    assert parent.data.tags["optuna_study_name"] == "shared"
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert len(children) == 8
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    runs = {int(c.data.tags["optuna_trial_number"]): c.info.run_id for c in children}
    assert runs == {t.number: t.user_attrs["mlflow_run_id"] for t in study.trials}
    # Artifacts went through the server into its artifact root.
    client = mlflow.MlflowClient(servers.tracking_uri)
    assert "study/summary.html" in {
        a.path for a in client.list_artifacts(parent.info.run_id, "study")
    }
    assert list(servers.artifacts.rglob("summary.html"))


def _trials_of(servers: Servers, study: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return _study(servers, study).get_trials(deepcopy=False)
    except KeyError:  # the first worker has not created the study yet
        return []


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_and_run_again(tmp_path: Path, servers: Servers) -> None:
    args = [*_study_args(servers, "killed", tmp_path / "{w}"), "hydra.sweeper.sampler=grid"]
    args += ["batch_size=1,2,4", "max_new_tokens=4,8"]  # 6 trials
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    survivor = start_cli([a.replace("{w}", "a") for a in args], tmp_path, log_a)
    victim = start_cli([a.replace("{w}", "b") for a in args], tmp_path, log_b)

    # SIGKILL the victim during its second trial, once that trial's MLflow run has started,
    # so that it has finished one trial (which must stay) and leaves one cut short.
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    mlflow.set_tracking_uri(servers.tracking_uri)
    killed = None
    while killed is None:
        assert time.monotonic() < deadline, log_b.read_text()[-3000:]
        assert victim.poll() is None, log_b.read_text()[-3000:]
        mine = [
            t
            for t in _trials_of(servers, "killed")
            if t.user_attrs.get("worker", {}).get("pid") == victim.pid
        ]
        done = [t for t in mine if t.state == TrialState.COMPLETE]
        running = [t for t in mine if t.state == TrialState.RUNNING]
        if done and running:
            runs = mlflow.search_runs(
                experiment_names=["killed"],
                filter_string=f"tags.hydra_job_num = '{running[0].number}'",
                output_format="list",
            )
            if runs:
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=30)
                killed, finished_before = running[0], done
        time.sleep(0.2)

    # The survivor finds the victim's trial at once (same machine, process gone), FAILs it and
    # runs its configuration again; it exits 0, or 1 because the sweep's summary counts the
    # killed trial's run among its failed ones.
    assert _finish(survivor, log_a) in (0, 1), log_a.read_text()[-3000:]
    assert f"trial {killed.number} FAIL: its worker's process is gone" in log_a.read_text()
    study = _study(servers, "killed")
    states = {t.number: t.state for t in study.trials}
    assert states[killed.number] == TrialState.FAIL
    assert study.user_attrs["interrupted_trials"] == [killed.number]
    (rerun,) = [t for t in study.trials if t.user_attrs.get("retry_of") == killed.number]
    assert rerun.state == TrialState.COMPLETE and rerun.params == killed.params
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6 and len({_params(t) for t in complete}) == 6
    assert set(states.values()) == {TrialState.COMPLETE, TrialState.FAIL}  # nothing left over
    for trial in finished_before:  # what the victim finished is kept
        assert states[trial.number] == TrialState.COMPLETE

    (parent,), children = _runs(servers, "killed")
    by_number = {int(c.data.tags["hydra_job_num"]): c for c in children}
    assert len(by_number) == len(children) == 7  # one run per trial
    assert by_number[killed.number].info.status == "KILLED"
    assert by_number[killed.number].data.tags["optuna_trial_state"] == "FAIL"
    for trial in complete:
        run = by_number[trial.number]
        assert run.info.status == "FINISHED"
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]


@pytest.mark.slow
# This test plays the dead worker with Optuna's API, heartbeats and ask outside optimize().
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_a_dead_worker_elsewhere_is_found_by_its_heartbeat(
    tmp_path: Path, servers: Servers
) -> None:
    # A trial left RUNNING by a worker on another host: its heartbeat stopped long ago.
    storage = optuna.storages.RDBStorage(servers.optuna_url, heartbeat_interval=1)
    study = optuna.create_study(storage=storage, study_name="remote", direction="maximize")
    study.set_user_attr("objectives", ["tps:maximize"])
    orphan = study.ask({"batch_size": CategoricalDistribution([1, 2, 4])})
    orphan.set_user_attr(
        "worker",
        {"host": "gpu-node-7", "boot": 1, "pid_namespace": "", "pid": 4242, "started": 1.0},
    )
    storage.record_heartbeat(orphan._trial_id)

    # One worker, two trials at a time through the joblib launcher.
    args = [*_study_args(servers, "remote", tmp_path / "sweep"), "hydra.sweeper.sampler=random"]
    args += ["hydra.sweeper.n_trials=3", "hydra.sweeper.seed=0", "batch_size=1,2,4"]
    args += ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3"]
    args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    result = run_cli(args, cwd=tmp_path, timeout=WORKER_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"trial {orphan.number} FAIL: no heartbeat for 3 s; queued" in result.stderr
    assert re.search(r"Joblib\.Parallel\(n_jobs=2,.*\) is launching 2 jobs", result.stdout)

    study = _study(servers, "remote")
    states = {t.number: t.state for t in study.trials}
    assert states[orphan.number] == TrialState.FAIL
    (rerun,) = [t for t in study.trials if t.user_attrs.get("retry_of") == orphan.number]
    assert rerun.state == TrialState.COMPLETE and rerun.params == orphan.params
    assert sum(s == TrialState.COMPLETE for s in states.values()) == 3
    # One run per configuration that ran: a trial asking again for one that ran (the random
    # sampler may) is a duplicate, not run again.
    ran = [t for t in study.trials if t.state == TrialState.COMPLETE]
    ran = [t for t in ran if DUPLICATE_ATTR not in t.user_attrs]
    _, children = _runs(servers, "remote")
    assert sorted(c.info.status for c in children) == ["FINISHED"] * len(ran)


@pytest.mark.slow
def test_gpu_launcher_grid_on_cpu_workers(tmp_path: Path, servers: Servers) -> None:
    """hydra/launcher=gpus is joblib with one GPU slot per process; on CPU the slots are
    named (no GPU to find) and CUDA_VISIBLE_DEVICES is set but unused."""
    result = run_cli(
        [
            "-m",
            "hydra/launcher=gpus",
            "hydra.launcher.n_jobs=2",
            "hydra.callbacks.gpu_slot.gpus=[0,1]",
            f"hydra.callbacks.gpu_slot.lock_dir={tmp_path / 'locks'}",
            "batch_size=1,2,4",
            "max_new_tokens=4",
            "dataset.limit=4",
            "tracking.log_predictions=false",
            f"tracking.uri={servers.tracking_uri}",
            "experiment_name=gpus",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        timeout=WORKER_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    slots = re.findall(r"\[gpus\] job (\d+) on GPU (\d+) \(process (\d+)\)", result.stdout)
    assert sorted(int(job) for job, _, _ in slots) == [0, 1, 2]
    gpu_of = {pid: gpu for _, gpu, pid in slots}
    assert len(gpu_of) == 2 and set(gpu_of.values()) == {"0", "1"}  # one GPU per process
    assert all(gpu_of[pid] == gpu for _, gpu, pid in slots)  # kept across its jobs
    (parent,), children = _runs(servers, "gpus")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)


def test_gpu_launcher_refuses_more_jobs_than_gpus(tmp_path: Path) -> None:
    args = ["-m", "hydra/launcher=gpus", "hydra.launcher.n_jobs=3"]
    args += ["hydra.callbacks.gpu_slot.gpus=[0,1]", "batch_size=1,2", f"hydra.sweep.dir={tmp_path}"]
    result = run_cli(args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "sweeper: error: invalid value for 'hydra.launcher.n_jobs': 3 "
        "(allowed: 1 to 2, one job per GPU of 0, 1)"
    )


_CLAIM = """
import sys, time
from pathlib import Path
from sweeper.gpus import NoFreeGpu, claim_gpu
try:
    print(claim_gpu(["0", "1"], Path(sys.argv[1]), wait_s=float(sys.argv[2])), flush=True)
except NoFreeGpu as error:
    print(error, flush=True)
    sys.exit(3)
time.sleep(float(sys.argv[3]))
"""


def test_gpu_slots_are_exclusive_and_freed_when_a_process_dies(tmp_path: Path) -> None:
    def claim(wait_s: float, hold_s: float) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", _CLAIM, str(tmp_path), str(wait_s), str(hold_s)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )

    first, second = claim(0, 60), claim(0, 60)
    gpus = {first.stdout.readline().strip(), second.stdout.readline().strip()}
    assert gpus == {"0", "1"}
    third = claim(0, 0)  # both GPUs taken
    assert third.wait(timeout=60) == 3
    assert "no free GPU among 0, 1" in third.stdout.read()
    fourth = claim(30, 0)
    time.sleep(1)
    first.kill()  # a killed process frees its GPU
    first.wait()
    assert fourth.stdout.readline().strip() in gpus
    assert fourth.wait(timeout=60) == 0
    second.kill()
    second.wait()


def test_batches_follow_the_launcher_and_keep_job_numbers_equal_to_trial_numbers() -> None:
    from omegaconf import OmegaConf

    def config(n_jobs: object) -> object:
        return OmegaConf.create({"hydra": {"launcher": {"n_jobs": n_jobs}}})

    assert launcher_jobs(OmegaConf.create({"hydra": {"launcher": {}}})) == 1  # basic
    assert launcher_jobs(config(3)) == 3
    assert launcher_jobs(config(-1)) == os.cpu_count()

    @dataclass
    class Asked:
        number: int

    batch = [Asked(9), Asked(12), Asked(13)]  # a rerun popped from the queue, then new trials
    groups = _consecutive(batch)  # type: ignore[arg-type]
    assert [[t.number for t in g] for g in groups] == [[9], [12, 13]]


def _closed_port() -> int:
    port = free_port()
    with socket.socket() as sock:  # nothing listens there: connections are refused at once
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    return port


@pytest.mark.parametrize("what", ["storage", "tracking"])
def test_unreachable_storage_or_tracking_server_is_one_line_in_seconds(
    tmp_path: Path, servers: Servers, what: str
) -> None:
    port = _closed_port()
    storage = f"postgresql://postgres@127.0.0.1:{port}/optuna"
    tracking = f"http://127.0.0.1:{port}"
    args = _study_args(servers, "unreachable", tmp_path / "sweep") + ["batch_size=1,2"]
    args.append(
        f"hydra.sweeper.storage={storage}" if what == "storage" else f"tracking.uri={tracking}"
    )
    started = time.monotonic()
    result = run_cli(args, cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    if what == "storage":
        assert line.startswith(f"sweeper: error: cannot reach the study storage {storage}: ")
    else:
        assert line.startswith(
            f"sweeper: error: cannot reach the MLflow tracking server {tracking}"
        )
    assert elapsed < 30, elapsed  # start-up included; the check itself gives up after 5 s


def test_reachability_check(servers: Servers) -> None:
    assert unreachable_reason(servers.tracking_uri) is None
    assert unreachable_reason(servers.optuna_url) is None  # a database, as MLflow's backend
    assert unreachable_reason("sqlite:///mlruns/mlflow.db") is None  # a local file
    port = _closed_port()
    assert "refused" in (unreachable_reason(f"http://127.0.0.1:{port}") or "")
    reason = unreachable_reason(f"postgresql://postgres@127.0.0.1:{port}/mlflow") or ""
    assert reason.startswith("cannot reach the MLflow tracking store postgresql://postgres@")
