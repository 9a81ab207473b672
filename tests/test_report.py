"""A real 2x2 grid against a real MLflow server, then what a user meets: the runs page the grid's
printed link opens, and the report it logged (HTML, PNG, CSV), both rendered in headless
Chromium; `python -m sweeper.report` on the same store; the report's logic on its own."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from sweeper.metrics import HEADLINE_METRICS
from sweeper.reports import plots
from sweeper.reports.recommend import Trial, dominates, recommend
from tests.conftest import run_cli
from tests.servers import mlflow_server

CHROMIUM = Path("/usr/bin/chromium")
TRIALS = 4  # the grid below
# The width of MLflow's artifact viewer (the frame an HTML artifact is shown in) in a
# 1600-px-wide browser window, MLflow 3.17: measured on a screenshot of the run page.
VIEWER_WIDTH = 700
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Chromium: apt-get install -y chromium"
)


def _chromium(root: Path, *args: str) -> str:
    """Headless Chromium with a profile of its own under `root`; its stdout (a DOM dump)."""
    profile = root / "chromium-profile"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
    ]
    done = subprocess.run(
        [str(CHROMIUM), *flags, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HOME": str(root)},
    )
    return done.stdout


def _report(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sweeper.report", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory):
    """A small 2x2 grid as a user types it, against an MLflow server."""
    root = tmp_path_factory.mktemp("report")
    with mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root / "art", root / "server.log") as url:
        result = run_cli(
            ["-m", "batch_size=1,4", "max_new_tokens=2,4", "dataset.limit=4"]
            + [f"tracking.uri={url}", f"hydra.sweep.dir={root / 'sweep'}"],
            cwd=root,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        client = mlflow.MlflowClient(url)
        runs = client.search_runs([client.get_experiment_by_name("sweeper").experiment_id])
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(children) == TRIALS
        files = root / "logged"
        client.download_artifacts(parent.info.run_id, "report", str(files))
        yield {
            "root": root,
            "url": url,
            "stdout": result.stdout,
            "client": client,
            "parent": parent,
            "children": children,
            "report": files / "report",
        }


def _printed(stdout: str, label: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.strip().startswith(label)]
    return line.strip().removeprefix(label).strip()


@pytest.mark.slow
@needs_chromium
def test_the_printed_link_opens_the_sweeps_trials_with_the_six_metrics_as_columns(grid) -> None:
    link = _printed(grid["stdout"], "open:")
    assert link.startswith(f"{grid['url']}/#/experiments/") and "viewStateShareKey=" in link
    dom = _chromium(grid["root"], "--window-size=1900,1000", "--dump-dom", link)
    for child in grid["children"]:  # every trial is a row, not folded under the parent run
        assert child.info.run_name in dom, child.info.run_name
    for name in HEADLINE_METRICS:  # a header cell and one cell per trial
        assert dom.count(f'col-id="metrics.`{name}`"') == TRIALS + 1, name
    for knob in ("batch_size", "max_new_tokens"):  # the knobs the grid varies
        assert f'col-id="params.`{knob}`"' in dom
    # Without the saved view MLflow shows no metric column: the view is what makes them.
    plain = link.split("&viewStateShareKey=")[0]
    assert 'col-id="metrics.' not in _chromium(grid["root"], "--dump-dom", plain)


@pytest.mark.slow
def test_the_answer_and_the_report_are_on_the_parent_run_and_on_disk(grid) -> None:
    parent, client = grid["parent"], grid["client"]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {"report/report.html", "report/report.png", "report/report.csv"}
    local = grid["root"] / "sweep" / "report"
    printed = [line.strip() for line in grid["stdout"].splitlines()]
    assert [line for line in printed if line.startswith("report: ")] == [
        f"report: {local / 'report.html'} (and on the parent run, report/)",  # on disk
        f"report: {grid['url']}/#/experiments/{parent.info.experiment_id}/runs/"
        f"{parent.info.run_id}/artifacts/report/report.html",  # the MLflow page that shows it
    ]
    assert (local / "report.csv").read_text() == (grid["report"] / "report.csv").read_text()
    table = pd.read_csv(grid["report"] / "report.csv")
    assert sorted(table["trial"]) == list(range(TRIALS))
    # The front is exactly the rows no other row dominates (accuracy, tps up; memory down).
    values = table[["accuracy", "tps", "peak_mem_gb"]].to_numpy().tolist()
    higher = [True, True, False]
    for row, on_front in zip(values, table["on_front"], strict=True):
        assert on_front == (not any(dominates(other, row, higher) for other in values))
    chosen = table.loc[table["recommended"]]
    assert chosen["trial"].tolist() == [int(parent.data.tags["recommended_trial"])]
    assert chosen["command"].item() == parent.data.tags["recommended_command"]
    # Every trial's run holds its dataset as an MLflow input and its reproduce command.
    for child in grid["children"]:
        run = client.get_run(child.info.run_id)
        (entry,) = run.inputs.dataset_inputs
        assert entry.dataset.name == "easy_vqa test[:4]"
        assert {t.key: t.value for t in entry.tags}["mlflow.data.context"] == "eval"
        assert run.data.tags["reproduce"].startswith("python -m sweeper batch_size=")


@pytest.mark.slow
@needs_chromium
def test_report_html_shows_the_recommendation_table_and_labelled_points(grid) -> None:
    parent = grid["parent"]
    page = (grid["report"] / "report.html").resolve()
    dom = _chromium(grid["root"], "--window-size=1200,3000", "--dump-dom", page.as_uri())
    trial = parent.data.tags["recommended_trial"]
    setting = parent.data.tags["recommended_setting"]
    assert f"recommended: trial {trial} ({setting})" in dom
    assert "by the rule: the highest tps whose accuracy is within the 95% interval" in dom
    assert "reproduce:" in dom and parent.data.tags["recommended_command"] in dom
    rows = re.findall(r"<tr( class=\"chosen\")?><td>([^<]*)</td><td>(\d+)</td>", dom)
    assert len(rows) == TRIALS
    (chosen,) = [row for row in rows if row[0]]  # the recommended row, highlighted and marked
    assert chosen[1].startswith("→") and chosen[2] == trial
    # plotly drew the main plot: a marker per trial, each labelled by its knobs, in [0, 1].
    main = dom[dom.index("Accuracy against throughput") :]
    assert len(re.findall(r'class="point"', main[: main.index("All trials, ranked")])) >= TRIALS
    for child in grid["children"]:
        for knob in child.info.run_name.split(": ", 1)[1].split():
            assert f">{knob}</tspan>" in dom, knob
    assert "peak memory" in dom and "throughput: tps (tok/s)" in dom
    assert "What each knob does" in dom  # a grid: each knob's effect


@pytest.mark.slow
@needs_chromium
def test_report_fits_the_width_of_mlflows_artifact_viewer(grid) -> None:
    """Shown in a frame as wide as MLflow's artifact viewer, the page is no wider than it."""
    page = grid["report"] / "report.html"
    harness = grid["report"].parent / "frame.html"
    harness.write_text(
        f'<iframe id="f" src="{page.name}" style="width:{VIEWER_WIDTH}px;height:900px;border:0">'
        "</iframe><script>document.getElementById('f').onload = () => setTimeout(() => {"
        "const d = document.getElementById('f').contentDocument.documentElement;"
        "document.body.insertAdjacentHTML('beforeend',"
        "`<p id=width>${d.scrollWidth} ${d.clientWidth}</p>`);}, 2000);</script>"
    )
    (grid["report"].parent / page.name).write_bytes(page.read_bytes())
    dom = _chromium(grid["root"], "--allow-file-access-from-files", "--dump-dom", harness.as_uri())
    scroll, client = map(int, re.search(r"<p id=\"width\">(\d+) (\d+)</p>", dom).groups())
    assert client <= VIEWER_WIDTH and scroll <= client, (scroll, client)


@pytest.mark.slow
def test_png_is_the_main_plot_with_every_point_labelled(grid) -> None:
    image = Image.open(grid["report"] / "report.png")
    assert image.format == "PNG" and image.size[0] >= 900
    described = image.text["Description"]  # what the plot draws, as matplotlib wrote it
    assert described.startswith("accuracy against tps")
    for child in grid["children"]:
        number = child.data.tags["hydra_job_num"]
        label = child.info.run_name.split(": ", 1)[1]
        assert f"trial {number}: {label}" in described
    assert len(image.getcolors(1 << 16) or range(300)) > 200  # drawn in colour, not blank


@pytest.mark.slow
def test_the_cli_writes_it_again_by_another_rule_and_over_all_runs(grid) -> None:
    root, url = grid["root"], grid["url"]
    out = root / "cli"
    again = _report(
        ["--experiment", "sweeper", "--tracking-uri", url, "--select", "memory"]
        + ["--out", str(out)],
        root,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ranked by the least peak memory" in again.stdout
    table = pd.read_csv(out / "report" / "report.csv")
    least = table.loc[table["peak_mem_gb"].idxmin(), "trial"]
    assert table.loc[table["recommended"], "trial"].tolist() == [least]
    assert f"open: {url}/#/experiments/" in again.stdout
    every = _report(
        ["--experiment", "sweeper", "--tracking-uri", url, "--all-runs", "--out", str(root / "a")],
        root,
    )
    assert every.returncode == 0, every.stderr[-3000:]
    # The grid's trials numbered in start order; its parent run is no trial.
    assert sorted(pd.read_csv(root / "a" / "report" / "report.csv")["trial"]) == list(range(TRIALS))
    clash = _report(
        ["--experiment", "sweeper", "--tracking-uri", url, "--all-runs", "--parent", "x"], root
    )
    assert clash.returncode == 2 and "exclude each other" in clash.stderr


def test_bad_report_input_is_one_line_with_status_2(tmp_path: Path) -> None:
    missing = _report(
        ["--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path}/no.db"], tmp_path
    )
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"sweeper.report: error: no MLflow store at sqlite:///{tmp_path}/no.db (see --tracking-uri)"
    )
    for args, message in (
        (["--objectives", "tps:max,peak_mem_gb:min"], "--objectives is gone"),
        (["--select", "fastest"], "invalid value for --select: 'fastest' (allowed: "),
    ):
        bad = _report(["--experiment", "x", *args], tmp_path)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert message in bad.stderr
    assert "--select" in _report(["--help"], tmp_path).stdout


# --- the report's logic, on made-up trials ----------------------------------------------------


def _trial(name: str, knobs: str, accuracy: float, tps: float, memory: float, **more) -> Trial:
    metrics = {"accuracy": accuracy, "tps": tps, "peak_mem_gb": memory}
    return Trial(name, [*knobs.split(), "tracking.uri=sqlite\\:///s.db"], metrics, **more)


def test_a_study_constraint_keeps_a_trial_off_the_front_and_unrecommended() -> None:
    trials = [
        _trial("0", "batch_size=1", 0.5, 10.0, 4.0),
        _trial("1", "batch_size=2", 0.6, 12.0, 5.0),
        _trial("2", "batch_size=4", 0.4, 12.0, 5.0),  # dominated by 1
        _trial("3", "batch_size=8", 0.9, 30.0, 3.0, feasible=False),  # best, but over budget
    ]
    answer = recommend(trials)
    assert [t.name for t in answer.ranked if t.on_front] == ["1", "0"]
    assert answer.chosen.name == "1" and not trials[3].eligible
    assert trials[0].label == "batch_size=1" and trials[0].knobs == {"batch_size": "1"}


def test_the_step_line_the_labels_and_each_knobs_effect() -> None:
    trials = [
        _trial("0", "batch_size=1 engine=hf", 0.9, 10.0, 1.0),
        _trial("1", "batch_size=8 engine=hf", 0.8, 40.0, 2.0),
        _trial("2", "batch_size=1 engine=vllm", 0.7, 20.0, 1.5),  # dominated by 1
        _trial("3", "batch_size=8 engine=vllm", 0.85, 35.0, 2.5),
    ]
    answer = recommend(trials, "accuracy")
    # The staircase from the y axis at the most accurate corner to 0 below the fastest.
    xs, ys = plots.step_line(answer)
    assert (xs, ys) == ([0.0, 10.0, 35.0, 40.0, 40.0], [0.9, 0.9, 0.85, 0.8, 0.0])
    assert plots.label_text(trials[3]) == "batch_size=8\nengine=vllm"
    assert plots.effects(trials, "tps") == {
        "batch_size": [("1", 15.0, 2), ("8", 37.5, 2)],
        "engine": [("hf", 25.0, 2), ("vllm", 27.5, 2)],
    }
    # Two points close together get their labels on opposite sides.
    close = [_trial("0", "a=1", 0.5, 10.0, 1.0), _trial("1", "a=2", 0.5, 10.5, 1.0)]
    sides = plots.label_sides(close, "tps", "accuracy")
    assert sides[id(close[0])] != sides[id(close[1])]
    # Without accuracy (ignore_eos, random weights) the plot is throughput against memory.
    blind = recommend([_trial("0", "a=1", math.nan, 10.0, 1.0)])
    assert plots.y_metric(blind) == "peak_mem_gb"
