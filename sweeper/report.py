"""`python -m sweeper.report --experiment NAME`: the Pareto front of a sweep or Optuna study.

Reads the trials (child runs) of a sweep's parent run from MLflow, marks the non-dominated ones,
writes pareto.html (interactive, plotly), pareto.png and pareto.csv, and logs the three files to
the parent run under `report/`. Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sweeper.reports.pareto import (
    DEFAULT_OBJECTIVES,
    ReportError,
    front_table,
    latest_parent,
    load_points,
    mark_front,
    parse_objectives,
    write_csv,
    write_html,
    write_png,
)

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"  # the default of tracking.uri in conf/config.yaml


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sweeper.report",
        description="Pareto front of a sweep or Optuna study from its MLflow runs: "
        "HTML (plotly), PNG and CSV, also logged to the sweep's parent run.",
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument(
        "--objectives",
        default=DEFAULT_OBJECTIVES,
        help=f"metric:max|min, comma-separated, two or more (default: {DEFAULT_OBJECTIVES})",
    )
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
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: outputs/report/<experiment>/<parent run id>)",
    )
    return parser


def report(args: argparse.Namespace) -> Path:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from sweeper.reports.tables import show

    objectives = parse_objectives(args.objectives)
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
    try:
        parent = (
            None
            if args.all_runs
            else args.parent or latest_parent(client, experiment.experiment_id)
        )
        run_name = "all runs" if parent is None else client.get_run(parent).info.run_name
    except MlflowException:
        raise ReportError(f"no run '{args.parent}' in {args.tracking_uri}") from None
    points, incomplete = load_points(client, experiment.experiment_id, parent, objectives)
    if not points:
        metrics = ", ".join(o.metric for o in objectives)
        raise ReportError(f"no finished trial of run {parent} logged all of: {metrics}")
    mark_front(points, objectives)

    out = args.out or Path("outputs/report") / args.experiment / (parent or "all_runs")
    out.mkdir(parents=True, exist_ok=True)
    title = f"{args.experiment}: {run_name} ({len(points)} trials)"
    files = [out / "pareto.html", out / "pareto.png", out / "pareto.csv"]
    write_html(points, objectives, title, files[0])
    write_png(points, objectives, title, files[1])
    write_csv(points, objectives, files[2])
    if parent is not None:  # runs of several sweeps have no one run to log to
        for path in files:
            client.log_artifact(parent, str(path), "report")

    show(front_table(points, objectives))
    if incomplete:
        print(f"{incomplete} finished trial(s) left out: they lack one of the objectives")
    logged = f" (logged to run {parent})" if parent else ""
    print(f"report: {out}/pareto.html, pareto.png, pareto.csv{logged}")
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
