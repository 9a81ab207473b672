"""The Optuna sweeper plugin: search-space syntax, studies end to end through the real CLI with
real Optuna and MLflow SQLite stores, resume after Ctrl-C and after a crash, bad input.

Accuracy is flat on these few questions (0 with random weights, 1.0 with the trained tiny_vlm),
so the end-to-end studies optimise `tps`, which varies; on CPU, `peak_mem_gb` is the peak PSS of
the process tree, so the VRAM budget is a budget on peak PSS there.
"""

from __future__ import annotations

import html
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.sweeper_optuna._definition import (
    check_metrics,
    default_study_name,
    evaluate,
    make_sampler,
    parse_constraint,
    parse_objectives,
    worker_seed,
)
from hydra_plugins.sweeper_optuna._errors import StudyError
from hydra_plugins.sweeper_optuna._run import DUPLICATE_ATTR
from hydra_plugins.sweeper_optuna._space import parse_space
from sweeper.reports.recommend import dominates
from sweeper.trial import metric_names
from tests.conftest import REPO, run_cli, start_cli

# Small, quick trials; no predictions table (less to log, less allocator noise in peak RSS).
FAST = ["dataset.limit=4", "max_new_tokens=8", "tracking.log_predictions=false"]


# --- search space and study definition (no subprocess) ---------------------------------------


def test_params_syntax_maps_to_optuna_distributions() -> None:
    space = parse_space(
        {
            "temperature": "interval(0.1, 1.0)",
            "batch_size": "int(interval(1, 8))",
            "beam_num": "range(1, 5)",
            "prefix_caching": "choice(true, false)",
            "top_p": "tag(log, interval(0.01, 1.0))",
        },
        [],
        "tpe",
    )
    d = space.distributions
    assert d["temperature"] == FloatDistribution(0.1, 1.0)
    assert d["batch_size"] == IntDistribution(1, 8)
    assert d["beam_num"] == IntDistribution(1, 4)  # range's stop is exclusive, as in a grid
    assert d["prefix_caching"] == CategoricalDistribution([True, False])
    assert d["top_p"] == FloatDistribution(0.01, 1.0, log=True)
    assert space.grid is None  # an interval is not a grid
    overrides = space.overrides({"prefix_caching": False, "temperature": 0.5})
    assert overrides == ["prefix_caching=false", "temperature=0.5"]


def test_command_line_sweeps_replace_and_plain_values_pin_preset_params() -> None:
    space = parse_space(
        {"batch_size": "choice(1, 2, 4)", "beam_num": "choice(1, 2)"},
        ["beam_num=1,3", "batch_size=4", "dataset.limit=4"],
        "grid",
    )
    assert space.distributions == {"beam_num": CategoricalDistribution([1, 3])}
    assert space.fixed == ["batch_size=4", "dataset.limit=4"]
    assert space.grid == {"beam_num": [1, 3]} and space.grid_size == 2


def test_bad_space_and_definitions_are_one_line_errors() -> None:
    with pytest.raises(StudyError, match="needs discrete parameters"):
        parse_space({"temperature": "interval(0, 1)"}, [], "grid")
    with pytest.raises(StudyError, match="nothing to search"):
        parse_space({}, ["batch_size=4"], "tpe")
    with pytest.raises(StudyError, match="cannot parse"):
        parse_space({"batch_size": "choice(1,"}, [], "tpe")
    with pytest.raises(StudyError, match="invalid objective 'tps:up'"):
        parse_objectives(["tps:up"])
    with pytest.raises(StudyError, match="malformed constraint"):
        parse_constraint("peak_mem_gb < 3")
    with pytest.raises(StudyError, match="budget_gb"):
        parse_constraint("peak_mem_gb <= None")  # vram_budget with budget_gb unset


def test_constraints_objectives_and_the_default_study_name() -> None:
    objectives = parse_objectives(["accuracy:max", "peak_mem_gb:minimize"])
    assert [o.direction for o in objectives] == ["maximize", "minimize"]
    budget, floor = parse_constraint("peak_mem_gb <= 20"), parse_constraint("tps >= 100")
    outcome = evaluate({"accuracy": 0.5, "peak_mem_gb": 24.0, "tps": 150.0}, objectives, [budget])
    assert outcome.values == [0.5, 24.0] and outcome.constraints == {"peak_mem_gb <= 20": 4.0}
    assert not outcome.feasible
    assert floor.violation(150.0) == -50.0
    assert evaluate(None, objectives, [budget]).values is None  # a failed trial
    assert evaluate({"accuracy": float("nan"), "peak_mem_gb": 1.0}, objectives, []).values is None
    # A metric this trial lacks (another engine's, another task's) FAILs it; a name no trial
    # returns is refused before the study (check_metrics).
    missing = evaluate({"tps": 1.0}, parse_objectives(["vllm_ttft_s:min"]), [])
    assert missing.values is None and "'vllm_ttft_s' is not among this trial's" in missing.failure

    space = parse_space({"batch_size": "choice(1, 8)"}, ["dataset.limit=4"], "tpe")
    name = default_study_name("sweeper", "tpe", space, objectives, [budget])
    assert name == default_study_name("sweeper", "tpe", space, objectives, [budget])
    assert name != default_study_name("sweeper", "tpe", space, objectives, [floor])
    assert name.startswith("sweeper-")


def test_objectives_and_constraints_name_metrics_a_trial_returns() -> None:
    known = metric_names()
    assert {"accuracy", "top_answer_match", "tps", "peak_mem_gb", "vllm_ttft_s"} <= known
    check_metrics(parse_objectives(["accuracy:max"]), [parse_constraint("tps >= 1")], known)
    with pytest.raises(StudyError) as error:
        check_metrics(parse_objectives(["acuracy:max"]), [], known)
    assert (
        "invalid value for 'hydra.sweeper.objectives': 'acuracy' is not a metric a trial returns "
        "(did you mean 'accuracy'?"
    ) in str(error.value)
    with pytest.raises(StudyError, match="'hydra.sweeper.constraints': 'peak_mem' .*'peak_mem_gb'"):
        check_metrics(parse_objectives(["tps:max"]), [parse_constraint("peak_mem <= 3")], known)


def test_each_worker_of_a_study_seeds_its_sampler_apart() -> None:
    assert worker_seed(7, 0) == 7  # the first worker: the study's own seed, as before
    seeds = {worker_seed(7, worker) for worker in range(8)}
    assert len(seeds) == 8 and worker_seed(7, 3) == worker_seed(7, 3)  # distinct, reproducible
    assert worker_seed(None, 3) is None


@pytest.mark.parametrize(
    ("sweep_dir", "folder"),
    [
        ("multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}", "multirun"),  # Hydra's default: new per run
        ("studies/${experiment_name}/${now:%H-%M-%S}", "studies/sweeper"),
        ("sweeps/mine", "sweeps/mine"),  # stable: the study lives in it
    ],
)
def test_default_storage_is_where_the_same_command_finds_it(sweep_dir: str, folder: str) -> None:
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    from hydra_plugins.sweeper_optuna._run import study_folder

    setup_globals()  # Hydra's ${now:...} resolver
    config = OmegaConf.create(
        {"experiment_name": "sweeper", "hydra": {"sweep": {"dir": sweep_dir}}}
    )
    assert study_folder(config) == Path(folder).resolve()


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "gp", "random", "grid"])
def test_every_sampler_runs_ask_and_tell_with_constraints(sampler: str) -> None:
    space = parse_space({"batch_size": "choice(1, 2, 4)", "beam_num": "range(1, 3)"}, [], sampler)
    study = optuna.create_study(sampler=make_sampler(sampler, 0, space), direction="maximize")
    for _ in range(space.grid_size):
        trial = study.ask(space.distributions)
        value = trial.params["batch_size"] * trial.params["beam_num"]
        trial.set_constraint("product <= 4", value - 4)
        study.tell(trial, value)
    assert study.best_value == 4  # the best feasible, not the best (8)
    if sampler == "grid":  # every point exactly once
        assert len({tuple(t.params.values()) for t in study.trials}) == space.grid_size


# --- end to end ------------------------------------------------------------------------------


def _study(tmp_path: Path) -> optuna.Study:
    storage = f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def _runs(uri: str) -> tuple[list, list]:
    """(parent runs, child runs) of the `sweeper` experiment."""
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["sweeper"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _calibrated_budget(tmp_path: Path, store: dict) -> float:
    """A budget between the peak RSS of small trials and that of batch 4 x 16 beams, measured
    on this machine with a 4-trial grid (the same process conditions as the study)."""
    grid = tmp_path / "calibration"
    result = run_cli(
        [
            "-m",
            "batch_size=1,4",
            "beam_num=1,16",
            *FAST,
            f"tracking.uri=sqlite:///{grid / 'mlflow.db'}",
            f"tracking.artifact_location={grid / 'art'}",
            f"hydra.sweep.dir={grid / 'sweep'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, trials = _runs(f"sqlite:///{grid / 'mlflow.db'}")
    peak = {
        (t.data.params["batch_size"], t.data.params["beam_num"]): t.data.metrics["peak_mem_gb"]
        for t in trials
    }
    big = peak.pop(("4", "16"))
    assert big > max(peak.values()), peak
    return round((big + max(peak.values())) / 2, 4)


@pytest.mark.slow
def test_vram_budget_best_trial_is_the_best_feasible_one(tmp_path: Path, store: dict) -> None:
    budget = _calibrated_budget(tmp_path, store)
    # seed 2: TPE's first trials (random start-up) are small configurations, then batch 4 x 16
    # beams, which the budget excludes.
    result = run_cli(
        [
            "-m",
            "hydra/sweeper=vram_budget",
            f"budget_gb={budget}",
            "hydra.sweeper.n_trials=8",
            "hydra.sweeper.seed=2",
            "hydra.sweeper.objectives=[tps:max]",
            "batch_size=1,4",
            "beam_num=1,16",
            *FAST,
            *store["args"],
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(tmp_path)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 8
    feasible = [t for t in complete if t.constraints[f"peak_mem_gb <= {budget}"] <= 0]
    assert 0 < len(feasible) < 8, [t.constraints for t in complete]  # the budget bites
    best = study.best_trial
    assert best in feasible
    assert best.value == max(t.value for t in feasible)
    # Feasibility is the measured peak against the budget, as logged in MLflow. The space has 4
    # configurations: a trial asking for one that ran already is a duplicate, not run again, so
    # each configuration has one run, whose peak decides its duplicates too.
    parents, children = _runs(store["uri"])
    ran = [t for t in complete if DUPLICATE_ATTR not in t.user_attrs]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == len(ran)
    assert len(parents) == 1 and len(children) == len(ran)
    by_number = {int(c.data.tags["optuna_trial_number"]): c for c in children}
    for trial in complete:
        run = by_number[trial.user_attrs.get(DUPLICATE_ATTR, trial.number)]
        if trial in ran:
            assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        within = run.data.metrics["peak_mem_gb"] <= budget
        assert run.data.tags["optuna_feasible"] == str(within).lower()
        assert (trial in feasible) == within
    parent = parents[0]
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.tags["optuna_storage"].endswith("sweep/optuna.db")
    client = mlflow.MlflowClient(store["uri"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {"study/best_trials.json", "study/summary.html", "study/trials.csv"} <= artifacts


@pytest.mark.slow
def test_pareto_study_returns_a_non_dominated_set(tmp_path: Path, store: dict) -> None:
    result = run_cli(
        [
            "-m",
            "hydra/sweeper=pareto",
            "hydra.sweeper.n_trials=6",
            "hydra.sweeper.seed=0",
            "batch_size=1,2,4",
            "beam_num=1,2",
            *FAST,
            *store["args"],
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(tmp_path)
    maximize = [d == optuna.study.StudyDirection.MAXIMIZE for d in study.directions]
    assert maximize == [True, True, False]  # accuracy, tps, peak_mem_gb
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    front = study.best_trials
    assert len(complete) == 6 and front
    for trial in front:
        assert not any(dominates(t.values, trial.values, maximize) for t in complete)
    for trial in complete:
        if trial not in front:
            assert any(dominates(f.values, trial.values, maximize) for f in front)
    # A configuration asked again is a duplicate: not run, and listed once (as the trial that ran).
    ran = [t for t in front if DUPLICATE_ATTR not in t.user_attrs]
    assert {tuple(sorted(t.params.items())) for t in front} == {
        tuple(sorted(t.params.items())) for t in ran
    }
    (parent,), _ = _runs(store["uri"])
    assert parent.data.tags["pareto_trials"] == ",".join(str(t.number) for t in ran)

    # The study's report (written as it ended) marks the same front, from the MLflow runs, and
    # links Optuna's own plots with a caveat: 6 trials are too few for importances.
    import pandas as pd

    sweep = tmp_path / "sweep"
    table = pd.read_csv(sweep / "report" / "report.csv")
    assert sorted(table.loc[table.on_front, "trial"]) == sorted(t.number for t in ran)
    page = html.unescape((sweep / "report" / "report.html").read_text())
    assert 'href="../study/summary.html"' in page
    assert re.search(r"Only [1-6] trial\(s\) finished: Optuna's history is short", page)
    assert (sweep / "study" / "summary.html").is_file()  # where the link leads, on disk too
    client = mlflow.MlflowClient(store["uri"])
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/report.png", "report/report.csv"} == logged
    # python -m sweeper.report writes it again from MLflow alone.
    report = subprocess.run(
        [sys.executable, "-m", "sweeper.report", "--experiment", "sweeper"]
        + ["--tracking-uri", store["uri"], "--out", str(tmp_path / "again")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    again = pd.read_csv(tmp_path / "again" / "report" / "report.csv")
    assert sorted(again.loc[again.on_front, "trial"]) == sorted(t.number for t in ran)
    assert (tmp_path / "again" / "study" / "summary.html").is_file()


def _poll_trials(db: Path) -> dict[int, str]:
    """Trial number -> state, read straight from Optuna's SQLite file while a study runs."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as connection:
            return dict(connection.execute("SELECT number, state FROM trials").fetchall())
    except sqlite3.OperationalError:  # the tables do not exist yet, or a write holds the lock
        return {}


def _interrupt_when_running(
    proc: subprocess.Popen, db: Path, number: int, sig: int, log: Path
) -> None:
    """Send `sig` as soon as trial `number` is RUNNING (asked, not yet told)."""
    deadline = time.monotonic() + 240
    while _poll_trials(db).get(number) != "RUNNING":
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the trial never started"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)


def _tps_study(n_trials: int, batch_sizes: str, store: dict) -> list[str]:
    """A seeded study maximising tps over batch_size, on the test's MLflow store."""
    return [
        "-m",
        "hydra/sweeper=optuna",
        f"hydra.sweeper.n_trials={n_trials}",
        "hydra.sweeper.seed=0",
        "hydra.sweeper.objectives=[tps:max]",
        f"batch_size={batch_sizes}",
        *FAST,
        *store["args"],
    ]


def _interrupt_study(args: list[str], tmp_path: Path, number: int, sig: int) -> Path:
    """Start the study, send `sig` while trial `number` runs; the CLI must exit as after Ctrl-C.
    Returns the study's storage."""
    db = tmp_path / "sweep" / "optuna.db"
    log = tmp_path / "study.log"
    proc = start_cli(args, tmp_path, log)
    _interrupt_when_running(proc, db, number, sig, log)
    assert proc.returncode == 130, log.read_text()[-3000:]
    return db


@pytest.mark.slow
def test_resume_after_ctrl_c_and_after_a_crash(tmp_path: Path, store: dict) -> None:
    args = _tps_study(4, "1,2,4", store)
    log = tmp_path / "study.log"

    # Ctrl-C while trial 1 runs: trial 0 stays COMPLETE, trial 1 is FAIL.
    db = _interrupt_study(args, tmp_path, 1, signal.SIGINT)
    assert _poll_trials(db) == {0: "COMPLETE", 1: "FAIL", 2: "WAITING"}  # 2: trial 1 again

    # The same command, killed hard while trial 2 (the retry of 1) runs: it stays RUNNING.
    proc = start_cli(args, tmp_path, log)
    _interrupt_when_running(proc, db, 2, signal.SIGKILL, log)
    assert _poll_trials(db)[2] == "RUNNING"

    # The same command again: the study finishes; nothing finished runs twice.
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = _study(tmp_path)
    states = {t.number: t.state for t in study.trials}
    assert [n for n, s in states.items() if s == TrialState.FAIL] == [1, 2]
    assert sum(s == TrialState.COMPLETE for s in states.values()) == 4
    assert study.user_attrs["interrupted_trials"] == [1, 2]

    parents, children = _runs(store["uri"])
    assert len(parents) == 1  # the study's parent run, reopened twice
    assert parents[0].info.status == "FINISHED"
    numbers = [int(c.data.tags["hydra_job_num"]) for c in children]
    assert sorted(numbers) == sorted(set(numbers))  # one MLflow run per trial at most
    for child in children:
        number = int(child.data.tags["hydra_job_num"])
        assert child.data.tags["optuna_trial_number"] == str(number)
        if states[number] == TrialState.COMPLETE:
            assert child.info.status == "FINISHED"
            assert study.trials[number].user_attrs["mlflow_run_id"] == child.info.run_id
        else:
            assert child.info.status == "KILLED"
            assert child.data.tags["optuna_trial_state"] == "FAIL"


@pytest.mark.slow
def test_sigterm_ends_the_running_trial_as_ctrl_c_does(tmp_path: Path, store: dict) -> None:
    """`timeout`, Slurm preemption and `kill` send SIGTERM: nothing may stay RUNNING."""
    # While trial 1 runs: by then the study's parent run exists (trial 0 logged under it).
    db = _interrupt_study(_tps_study(2, "1,2", store), tmp_path, 1, signal.SIGTERM)
    assert _poll_trials(db)[1] == "FAIL"
    parents, children = _runs(store["uri"])
    assert [run.info.status for run in parents] == ["KILLED"]
    assert "RUNNING" not in {run.info.status for run in children}


@pytest.mark.slow
def test_failing_trial_is_fail_and_the_study_goes_on(tmp_path: Path, store: dict) -> None:
    result = run_cli(
        [
            "-m",
            "hydra/sweeper=optuna",
            "hydra.sweeper.sampler=grid",
            "hydra.sweeper.objectives=[tps:max]",
            "temperature=-1,0",
            *FAST,
            *store["args"],
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 1  # a trial failed
    study = _study(tmp_path)
    by_temperature = {t.params["temperature"]: t for t in study.trials}
    assert by_temperature[-1].state == TrialState.FAIL
    assert by_temperature[0].state == TrialState.COMPLETE
    _, children = _runs(store["uri"])
    failed = next(c for c in children if c.info.status == "FAILED")
    assert "temperature" in failed.data.tags["error"]
    assert failed.data.tags["optuna_trial_state"] == "FAIL"


def test_a_configuration_asked_again_is_a_duplicate_not_another_finding(
    tmp_path: Path, store: dict
) -> None:
    # Two configurations, five trials: at least three ask a configuration again.
    result = run_cli(
        [
            "-m",
            "hydra/sweeper=optuna",
            "hydra.sweeper.sampler=random",
            "hydra.sweeper.seed=0",
            "hydra.sweeper.n_trials=5",
            "hydra.sweeper.objectives=[tps:max]",
            "batch_size=choice(1,2)",
            *FAST,
            *store["args"],
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    study = _study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    originals = [t for t in study.trials if "duplicate_of" not in t.user_attrs]
    copies = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    configurations = {t.params["batch_size"] for t in study.trials}
    assert len(originals) == len(configurations) and len(copies) == 5 - len(originals) >= 3
    for copy in copies:
        original = study.trials[copy.user_attrs["duplicate_of"]]
        assert copy.params == original.params and copy.values == original.values
    _, children = _runs(store["uri"])
    assert len(children) == len(originals)  # each configuration ran once
    assert result.stdout.count("not run again") == len(copies)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["hydra/sweeper=optuna", "hydra.sweeper.sampler=annealing"],
            "unknown sampler 'annealing' (allowed: tpe,",
        ),
        (
            ["hydra/sweeper=optuna", 'hydra.sweeper.constraints=["peak_mem_gb < 3"]'],
            "malformed constraint 'peak_mem_gb < 3'",
        ),
        (["hydra/sweeper=vram_budget"], "needs budget_gb=<GiB>"),
        (
            ["hydra/sweeper=optuna", "hydra.sweeper.objectives=[acuracy:max]"],
            "'acuracy' is not a metric a trial returns (did you mean 'accuracy'?",
        ),
        (
            ["hydra/sweeper=vram_budget", "budget_gb=3", "hydra.sweeper.objectives=[tsp:max]"],
            "'tsp' is not a metric a trial returns (did you mean 'tps'?",
        ),
        (
            ["hydra/sweeper=optuna", 'hydra.sweeper.constraints=["peak_mem <= 3"]'],
            "'peak_mem' is not a metric a trial returns (did you mean 'peak_mem_gb'?",
        ),
    ],
)
def test_bad_study_input_is_one_line_with_status_2(
    tmp_path: Path, store: dict, overrides: list[str], message: str
) -> None:
    result = run_cli(["-m", *overrides, "batch_size=1,2", *store["args"]], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything was recorded


def test_plugin_ships_in_the_package() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "hydra_plugins.sweeper_optuna" in project["tool"]["setuptools"]["packages"]
    assert not (REPO / "hydra_plugins" / "__init__.py").exists()  # a namespace package


@pytest.mark.slow
def test_an_objective_a_trial_lacks_fails_its_mlflow_run_too(tmp_path: Path, store: dict) -> None:
    """vllm_ttft_s is a metric only engine=vllm returns: an engine=hf trial runs, and then both
    Optuna and MLflow say it failed (MLflow said FINISHED while Optuna said FAIL)."""
    args = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler=grid", "batch_size=1,2"]
    args += ["hydra.sweeper.n_trials=1", "hydra.sweeper.objectives=[vllm_ttft_s:min]"]
    args += [*FAST, *store["args"]]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    (trial,) = _study(tmp_path).trials
    assert trial.state == TrialState.FAIL
    assert "metric 'vllm_ttft_s' is not among this trial's" in trial.user_attrs["failure"]
    _, (child,) = _runs(store["uri"])
    assert child.info.status == "FAILED"
    assert child.data.tags["error"].startswith("Optuna FAILed the trial: metric 'vllm_ttft_s'")
    assert child.data.tags["optuna_trial_state"] == "FAIL"
    # Every metric a real trial logs is a name objectives are checked against.
    assert set(child.data.metrics) <= metric_names()


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_two_workers_with_one_seed_ask_distinct_parameters(
    tmp_path: Path, store: dict, sampler: str
) -> None:
    """Every worker runs the same command, seed included (docs/cluster.md): each must still get
    parameters of its own. A continuous dimension makes any repeat a seed's doing."""
    args = ["-m", "hydra/sweeper=optuna", f"hydra.sweeper.sampler={sampler}"]
    args += ["hydra.sweeper.seed=0", "hydra.sweeper.n_trials=4", "temperature=interval(0.1,1.0)"]
    args += ["hydra.sweeper.objectives=[tps:max]", "batch_size=1", *FAST]
    # One MLflow store and one study; each worker its own sweep dir (docs/cluster.md).
    args += [store["args"][0], store["args"][1]]
    args.append(f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [
        start_cli([*args, f"hydra.sweep.dir={tmp_path / log.stem}"], tmp_path, log) for log in logs
    ]
    for proc, log in zip(workers, logs, strict=True):
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    assert len(study.trials) == 4
    assert {t.user_attrs["worker"]["pid"] for t in study.trials} == {p.pid for p in workers}
    temperatures = [t.params["temperature"] for t in study.trials]
    assert len(set(temperatures)) == 4, temperatures
