"""`python -m sweeper dataset=okvqa ...` end to end on a small fixture, tracked in MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest

from sweeper.data.okvqa import REPLICA_NOTE
from sweeper.metrics import HEADLINE_METRICS
from tests.conftest import run_cli
from tests.okvqa_fixtures import write_official

pytestmark = pytest.mark.slow


def _only_run(uri: str):
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["sweeper"], output_format="list")
    return run


def test_okvqa_trial_runs_end_to_end_and_is_tagged_as_replica(tmp_path, store) -> None:
    official = write_official(tmp_path / "okvqa", n=8, replica=True)
    result = run_cli([*official.cli_args(), "dataset.limit=4", *store["args"]], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = _only_run(store["uri"])
    assert run.info.status == "FINISHED"
    for name in HEADLINE_METRICS:
        assert math.isfinite(run.data.metrics[name]), name
    assert run.data.metrics["num_samples_measured"] == 4
    assert run.data.metrics["skipped_samples"] == 0
    assert run.data.tags["dataset"] == "okvqa"
    assert run.data.tags["dataset_note"] == REPLICA_NOTE


def test_skip_policy_logs_the_skipped_sample(tmp_path, store) -> None:
    official = write_official(tmp_path / "okvqa", n=8)
    official.image_path(1).unlink()
    question_id = str(official.questions()[1]["question_id"])
    args = [*official.cli_args(), "dataset.limit=4", "dataset.on_error=skip", *store["args"]]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = _only_run(store["uri"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["skipped_samples"] == 1
    assert run.data.metrics["num_samples_measured"] == 3
    assert "dataset_note" not in run.data.tags
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="skipped_samples.json", dst_path=str(tmp_path)
    )
    (skip,) = json.loads(Path(local).read_text())["skipped_samples"]
    assert skip["question_id"] == question_id and "unreadable image" in skip["reason"]


def test_raise_policy_fails_the_trial_with_one_line(tmp_path, store) -> None:
    official = write_official(tmp_path / "okvqa", n=8)
    official.image_path(0).unlink()
    result = run_cli([*official.cli_args(), "dataset.limit=4", *store["args"]], cwd=tmp_path)
    assert result.returncode == 1
    (line,) = [x for x in result.stderr.splitlines() if "DataError" in x]
    assert str(official.image_path(0)) in line and "unreadable image" in line
    assert _only_run(store["uri"]).info.status == "FAILED"


def test_missing_paths_are_refused_before_any_model(tmp_path, store) -> None:
    result = run_cli(["dataset=okvqa", *store["args"]], cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid value for 'dataset.questions_file': None" in result.stderr
