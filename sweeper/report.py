"""`python -m sweeper.report --experiment NAME`: the report of a sweep or Optuna study.

Every grid and study writes its report when it ends (sweeper/tracking/callback.py); this command
writes it again, for an earlier sweep (`--parent`), for every trial of an experiment
(`--all-runs`) or by another rule (`--select`, `--budget-gb`). It reads the sweep's trials (child
runs of its parent run) from MLflow, ranks them (sweeper/reports/recommend.py), prints the
ranked table and the recommendation, writes `<out>/report/report.html|png|csv`
(sweeper/reports/page.py) and logs them to the parent run under `report/`, with the saved view of
MLflow's runs page that shows the sweep's trials and six metrics (sweeper/tracking/views.py).
Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sweeper.config import Selection
from sweeper.reports.runs import ReportError

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"  # the default of tracking.uri in conf/config.yaml


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sweeper.report",
        description="The report of a sweep or Optuna study from its MLflow runs: the ranked "
        "trials and the recommended setting, accuracy against throughput with the Pareto "
        "front; HTML (plotly), PNG and CSV, also logged to the sweep's parent run.",
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument(
        "--tracking-uri", default=DEFAULT_URI, help=f"MLflow store (default: {DEFAULT_URI})"
    )
    parser.add_argument(
        "--parent", help="the sweep's parent run id (default: the experiment's latest sweep)"
    )
    parser.add_argument(
        "--all-runs",
        action="store_true",
        help="every finished trial of the experiment (all sweeps and single runs), not one sweep",
    )
    rules = ", ".join(rule.value for rule in Selection)
    parser.add_argument(
        "--select",
        help=f"the rule the recommended trial is chosen by: {rules} (default: the sweep's own "
        "select=, else throughput_within_accuracy)",
    )
    parser.add_argument(
        "--budget-gb",
        type=float,
        help="peak memory the recommended trial must stay within (default: the sweep's own "
        "budget_gb=)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder the report goes to, as report/ (and a study's summary as study/) "
        "(default: outputs/report/<experiment>/<parent run id>)",
    )
    # Gone: the front is the answer's (accuracy, throughput, peak memory); say so in one line.
    parser.add_argument("--objectives", help=argparse.SUPPRESS)
    return parser


def _sweep_rule(client: Any, experiment_id: str, parent: str | None) -> tuple[str, float | None]:
    """The rule and memory budget the sweep ran with (its trials' params `select`, `budget_gb`)."""
    default = Selection.throughput_within_accuracy.value
    if parent is None:
        return default, None
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1
    )
    params = runs[0].data.params if runs else {}
    budget = params.get("budget_gb", "None")
    return params.get("select", default), None if budget == "None" else float(budget)


def report(args: argparse.Namespace) -> Path:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from sweeper.reports.page import describe, make_report
    from sweeper.reports.recommend import recommend
    from sweeper.reports.runs import latest_parent, load_trials
    from sweeper.reports.tables import answer_lines, answer_metrics, answer_table, show
    from sweeper.tracking.credentials import redact
    from sweeper.tracking.store import runs_page, ui_server, view_lines
    from sweeper.tracking.views import sweep_view

    if args.objectives is not None:
        raise ReportError(
            "--objectives is gone: the front is accuracy, throughput and peak memory, as at the "
            "end of every sweep; --select and --budget-gb choose the recommended trial"
        )
    if args.select is not None and args.select not in {rule.value for rule in Selection}:
        rules = ", ".join(rule.value for rule in Selection)
        raise ReportError(f"invalid value for --select: '{args.select}' (allowed: {rules})")
    store_file = args.tracking_uri.removeprefix("sqlite:///")
    if args.tracking_uri.startswith("sqlite:///") and not Path(store_file).is_file():
        # MLflow would create an empty store there; say the path is wrong instead.
        raise ReportError(f"no MLflow store at {args.tracking_uri} (see --tracking-uri)")
    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ReportError(
            f"no experiment '{args.experiment}' in {args.tracking_uri} (experiments: {known})"
        )
    if args.all_runs and args.parent:
        raise ReportError("--all-runs and --parent exclude each other")
    experiment_id = experiment.experiment_id
    try:
        parent = None if args.all_runs else args.parent or latest_parent(client, experiment_id)
        if parent is not None:
            client.get_run(parent)
    except MlflowException:
        raise ReportError(f"no run '{args.parent}' in {args.tracking_uri}") from None
    trials = load_trials(client, experiment_id, parent)
    if not trials:
        raise ReportError(f"no finished trial under run {parent} in {args.tracking_uri}")
    rule, budget = _sweep_rule(client, experiment_id, parent)
    answer = recommend(
        trials, args.select or rule, args.budget_gb if args.budget_gb is not None else budget
    )
    context = describe(client, parent, args.experiment, answer)
    out = args.out or Path("outputs/report") / args.experiment / (parent or "all_runs")
    uri = redact(args.tracking_uri)
    if parent is not None:
        knobs = sorted({k for t in answer.ranked for k in t.knobs})
        sweep_view(client, experiment_id, parent, answer.throughput, knobs)
        context.runs_url = runs_page(ui_server(uri), experiment_id, parent)
    files = make_report(client, parent, answer, context, out)

    show(answer_table(answer, answer_metrics(answer)))
    print("\n".join(answer_lines(answer)))
    logged = f" (logged to run {parent} as report/)" if parent else ""
    print(f"report: {', '.join(str(f) for f in files)}{logged}")
    if parent is not None:
        for line in view_lines(uri, experiment_id, parent, report=parent):
            print(f"  {line}")
    return out


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        report(args)
    except ReportError as error:
        from sweeper.tracking.credentials import redact

        print(f"sweeper.report: error: {redact(str(error))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
