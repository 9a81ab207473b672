"""`python -m sweeper.report`: the Pareto front of a real grid sweep from MLflow, as HTML, PNG and
CSV logged to the sweep's parent run, and the HTML checked in headless Chromium."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from sweeper.reports.pareto import (
    Objective,
    ReportError,
    TrialPoint,
    dominates,
    mark_front,
    parse_objectives,
)
from tests.conftest import run_cli

CHROMIUM = Path("/usr/bin/chromium")
TRIALS = 4  # the grid below
OBJECTIVES = "accuracy:max,tps:max,peak_mem_gb:min"  # 3 objectives: 3 panels of pairs


def _report(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sweeper.report", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2x2 grid in a fresh MLflow store, then its report."""
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    result = run_cli(
        [
            "-m",
            "batch_size=1,4",
            "max_new_tokens=4,8",
            "dataset.limit=4",
            "tracking.log_predictions=false",
            f"tracking.uri={uri}",
            f"tracking.artifact_location={root / 'art'}",
            f"hydra.sweep.dir={root / 'sweep'}",
        ],
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = _report(
        ["--experiment", "sweeper", "--tracking-uri", uri, "--objectives", OBJECTIVES]
        + ["--out", str(root / "out")],
        root,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    return {"root": root, "uri": uri, "out": root / "out", "stdout": report.stdout}


@pytest.mark.slow
def test_report_writes_html_png_csv_and_logs_them_to_the_parent(sweep: dict) -> None:
    out = sweep["out"]
    html = (out / "pareto.html").read_text()
    assert "plotly" in html.lower() and "Pareto front" in html
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(out / "pareto.csv")
    assert len(table) == TRIALS  # one row per finished trial
    assert sorted(table["trial"]) == list(range(TRIALS))
    # The front in the CSV is exactly the non-dominated rows.
    maximize = [True, True, False]
    values = table[["accuracy", "tps", "peak_mem_gb"]].to_numpy().tolist()
    for row, on_front in zip(values, table["on_front"], strict=True):
        assert on_front == (not any(dominates(other, row, maximize) for other in values))
    assert "Pareto front:" in sweep["stdout"]

    mlflow.set_tracking_uri(sweep["uri"])
    runs = mlflow.search_runs(experiment_names=["sweeper"], output_format="list")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    client = mlflow.MlflowClient(sweep["uri"])
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {"report/pareto.html", "report/pareto.png", "report/pareto.csv"}


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium: apt-get install -y chromium")
def test_html_renders_one_point_per_trial_in_headless_chromium(sweep: dict) -> None:
    page = (sweep["out"] / "pareto.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    dom = subprocess.run(
        [str(CHROMIUM), *flags, "--dump-dom", page],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(sweep["root"])},  # Chromium writes its profile there
    ).stdout
    # plotly draws each marker as <path class="point">; three panels (one per objective pair).
    assert len(re.findall(r'class="point"', dom)) == 3 * TRIALS
    assert "accuracy (max)" in dom and "peak_mem_gb (min)" in dom  # axis titles rendered
    shot = sweep["root"] / "pareto-screenshot.png"
    subprocess.run(
        [str(CHROMIUM), *flags, "--window-size=1500,600", f"--screenshot={shot}", page],
        capture_output=True,
        timeout=120,
        env={**os.environ, "HOME": str(sweep["root"])},
    )
    assert shot.stat().st_size > 10_000  # a drawn page, not a blank one


def test_front_leaves_out_infeasible_and_dominated_points() -> None:
    objectives = parse_objectives("accuracy:max,peak_mem_gb:min")
    points = [
        TrialPoint("0", "a", [0.5, 10.0], ""),
        TrialPoint("1", "b", [0.6, 12.0], ""),
        TrialPoint("2", "c", [0.4, 12.0], ""),  # dominated by 0 and 1
        TrialPoint("3", "d", [0.9, 8.0], "", feasible=False),  # would dominate all: over budget
        TrialPoint("4", "e", [0.5, 10.0], ""),  # equal to 0: neither dominates
    ]
    mark_front(points, objectives)
    assert [p.trial for p in points if p.on_front] == ["0", "1", "4"]
    assert objectives == [Objective("accuracy", True), Objective("peak_mem_gb", False)]
    with pytest.raises(ReportError, match="two or more"):
        parse_objectives("accuracy:max")
    with pytest.raises(ReportError, match="invalid objective 'tps:fast'"):
        parse_objectives("accuracy:max,tps:fast")


def test_bad_report_input_is_one_line_with_status_2(tmp_path: Path) -> None:
    missing = _report(
        ["--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path}/no.db"], tmp_path
    )
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"sweeper.report: error: no MLflow store at sqlite:///{tmp_path}/no.db (see --tracking-uri)"
    )
    bad = _report(["--experiment", "x", "--objectives", "tps"], tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "invalid objective 'tps'" in bad.stderr
    assert "--objectives" in _report(["--help"], tmp_path).stdout


@pytest.mark.slow
def test_all_runs_takes_every_trial_of_every_sweep_and_single_run(sweep: dict) -> None:
    root, uri = sweep["root"], sweep["uri"]
    single = run_cli(
        ["dataset.limit=4", "batch_size=2", "tracking.log_predictions=false"]
        + [f"tracking.uri={uri}", f"tracking.artifact_location={root / 'art'}"],
        cwd=root,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    out = root / "all"
    report = _report(
        ["--experiment", "sweeper", "--tracking-uri", uri, "--all-runs"]
        + ["--objectives", "tps:max,peak_mem_gb:min", "--out", str(out)],
        root,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    table = pd.read_csv(out / "pareto.csv")
    # The grid's trials and the single run, numbered in start order; the grid's parent is no trial.
    assert sorted(table["trial"]) == list(range(TRIALS + 1))
    assert table["overrides"].str.contains("batch_size=2").sum() == 1
    both = _report(
        ["--experiment", "sweeper", "--tracking-uri", uri, "--all-runs"] + ["--parent", "x"], root
    )
    assert both.returncode == 2 and "exclude each other" in both.stderr
