"""repeats=N: the measured run N times on the loaded engine, each metric logged as the mean of
the runs with the half-width of its 95% interval, the raw runs kept as an artifact; batch
efficiency from interleaved calibration repeats."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import mlflow
import pytest

from sweeper.metrics.stats import mean_ci95
from tests.conftest import run_cli


@pytest.mark.slow
def test_repeats_log_the_mean_the_interval_and_the_runs(tmp_path: Path, store) -> None:
    args = ["dataset.limit=8", "repeats=3", "calibration_repeats=2", *store["args"]]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "±" in result.stdout  # the table shows the interval
    mlflow.set_tracking_uri(store["uri"])
    (run,) = mlflow.search_runs(experiment_names=["sweeper"], output_format="list")
    metrics = run.data.metrics
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="repeats.json")
    runs = json.loads(Path(path).read_text())["repeats"]
    assert len(runs) == 3
    for name in ("tps", "ttft_s", "context_load_s", "accuracy", "latency_s"):
        mean, half = mean_ci95([r[name] for r in runs])
        assert metrics[name] == pytest.approx(mean) and metrics[f"{name}_ci95"] == pytest.approx(
            half
        )
    assert len({r["tps"] for r in runs}) == 3  # three measurements, not one copied
    assert statistics.pvariance([r["accuracy"] for r in runs]) == 0  # greedy: same answers
    low, high = metrics["batch_efficiency_min"], metrics["batch_efficiency_max"]
    assert low <= metrics["batch_efficiency"] <= high
    assert metrics["num_samples_measured"] == 8
