"""The real CLI end to end: a 2x2 grid, a sweep with a failing trial, a single trial."""

from __future__ import annotations

import math

import mlflow
import pytest

from sweeper.metrics import HEADLINE_METRICS
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def _runs(uri: str):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["sweeper"], output_format="list")


def test_grid_makes_parent_and_four_children_loading_the_model_once(tmp_path, store) -> None:
    result = run_cli(
        ["-m", "beam_num=1,2", "temperature=0,0.7", "dataset.limit=8", *store["args"]],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _runs(store["uri"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    for child in children:
        assert child.info.status == "FINISHED"
        for name in HEADLINE_METRICS:
            assert math.isfinite(child.data.metrics[name]), (name, child.data.metrics)
        assert child.data.params["beam_num"] in {"1", "2"}
        assert child.data.tags["engine"] == "hf"
    # The engine cache: one trial loaded the model, the other three reused it.
    cache = sorted(c.data.tags["engine_cache"] for c in children)
    assert cache == ["hit", "hit", "hit", "miss"]
    assert sum("model_load_s" in c.data.metrics for c in children) == 1
    # The answer closes the sweep: the ranked table, the recommendation and its command.
    assert "sweep: 4 trials, 0 failed" in result.stdout
    assert "ranked by the highest tps whose accuracy is within" in result.stdout
    # Run names are the knobs the grid varies, not its constants.
    assert {c.info.run_name.split(": ", 1)[1] for c in children} == {
        f"beam_num={b} temperature={t}" for b in (1, 2) for t in (0, 0.7)
    }
    parent = parents[0]
    chosen = next(
        c for c in children if c.data.tags["hydra_job_num"] == parent.data.tags["recommended_trial"]
    )
    assert parent.data.tags["recommended_command"] == chosen.data.tags["reproduce"]
    assert parent.data.metrics["best_tps"] == chosen.data.metrics["tps"]
    assert "## The answer" in parent.data.tags["mlflow.note.content"]
    (line,) = [line for line in result.stdout.splitlines() if "reproduce: " in line]
    command = line.split("reproduce: python -m sweeper ", 1)[1].split()
    # The recommended command, run again, runs the chosen configuration.
    again = run_cli(command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = max(_runs(store["uri"]), key=lambda r: r.info.start_time)
    assert rerun.data.params == chosen.data.params
    assert "then open: http://127.0.0.1:5000/#/experiments/" in result.stdout


def test_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, store) -> None:
    result = run_cli(["-m", "temperature=-1,0", "dataset.limit=4", *store["args"]], cwd=tmp_path)
    assert result.returncode == 1
    assert "invalid value for 'temperature': -1.0" in result.stderr
    children = [r for r in _runs(store["uri"]) if "mlflow.parentRunId" in r.data.tags]
    status = {c.data.params["temperature"]: c.info.status for c in children}
    assert status == {"-1.0": "FAILED", "0.0": "FINISHED"}
    failed = next(c for c in children if c.info.status == "FAILED")
    assert "temperature" in failed.data.tags["error"]


def test_single_trial_prints_six_metrics_and_the_ui_command(tmp_path, store) -> None:
    result = run_cli(["dataset.limit=4", "batch_size=2", *store["args"]], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in HEADLINE_METRICS:
        assert name in result.stdout
    assert f"mlflow ui --backend-store-uri {store['uri']}" in result.stdout  # absolute already
    assert "runs?workflowType=machine_learning" in result.stdout
    (run,) = _runs(store["uri"])
    client = mlflow.MlflowClient(store["uri"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "predictions.json"} <= artifacts
    for tag in ("device_name", "cuda_version", "torch_version", "git_commit", "peak_mem_source"):
        assert run.data.tags[tag]
