"""TPE vs grid on a 4-key space: trials TPE needs to reach the grid's best feasible value.

Two steps (see README.md beside this file):

1. `measure`: the full grid, run for real through the CLI and this project's Optuna sweeper
   (`hydra.sweeper.sampler=grid`), every trial measured on the model; the grid's metrics are
   exported to grid.csv.
2. `replay`: TPE (and random search, for scale) over the *measured* grid: each suggested
   configuration is answered with its row of grid.csv, the budget is set as a constraint
   exactly as the sweeper sets it (`Trial.set_constraint`), and we count the trials until TPE
   first suggests a configuration whose value equals the grid's best feasible one. Replaying
   the table (instead of re-measuring) gives every seed the same noisy measurements, so
   "reached the grid's best" is well defined, and 100 seeds cost seconds.

    python experiments/optuna_tpe_vs_grid/benchmark.py measure --work /tmp/tpe_vs_grid
    python experiments/optuna_tpe_vs_grid/benchmark.py replay --budget-quantile 0.5
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution

HERE = Path(__file__).resolve().parent
# The 4-key space: 4 x 3 x 3 x 2 = 72 configurations.
SPACE: dict[str, list] = {
    "batch_size": [1, 2, 4, 8],
    "beam_num": [1, 2, 4],
    "max_new_tokens": [4, 8, 16],
    "temperature": [0.0, 0.7],
}
METRICS = ("tps", "peak_mem_gb", "accuracy", "ttft_s")


@dataclass
class SearchResult:
    sampler: str
    seeds: int
    median: float
    mean: float
    p90: float
    worst: int
    not_reached: int  # seeds that did not reach the best within the cap (counted as the cap)


def measure(args: argparse.Namespace) -> None:
    work = args.work.resolve()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    grid_size = len(list(itertools.product(*SPACE.values())))
    command = [
        sys.executable,
        "-m",
        "sweeper",
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.sampler=grid",
        f"hydra.sweeper.n_trials={grid_size}",
        f"hydra.sweeper.objectives=[{args.objective}]",
        *(f"{key}={','.join(str(v) for v in values)}" for key, values in SPACE.items()),
        f"model={args.model}",
        f"dataset.limit={args.limit}",
        "tracking.log_predictions=false",
        "experiment_name=tpe_vs_grid",
        f"tracking.uri={uri}",
        f"tracking.artifact_location={work / 'artifacts'}",
        f"hydra.sweep.dir={work / 'sweep'}",
    ]
    print(" ".join(command), flush=True)
    # Exit status 1 only says that some trial failed; the table below keeps the finished ones.
    subprocess.run(command, check=False)
    storage = f"sqlite:///{work / 'sweep' / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    client_runs = _runs_by_trial(uri)
    rows = []
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        metrics = client_runs[trial.number]
        rows.append({**trial.params, **{m: metrics.get(m) for m in METRICS}})
    table = pd.DataFrame(rows).sort_values(list(SPACE))
    table.to_csv(args.table, index=False)
    print(f"{len(table)} of {grid_size} configurations measured -> {args.table}")


def _runs_by_trial(uri: str) -> dict[int, dict[str, float]]:
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tpe_vs_grid"], output_format="list")
    return {
        int(run.data.tags["optuna_trial_number"]): run.data.metrics
        for run in runs
        if "optuna_trial_number" in run.data.tags
    }


def _trials_to_best(
    table: pd.DataFrame,
    metric: str,
    maximize: bool,
    budget: float,
    sampler: optuna.samplers.BaseSampler,
    cap: int,
) -> int:
    """Trials until the sampler first proposes a configuration with the grid's best feasible
    value (capped at `cap`)."""
    rows = {tuple(row[k] for k in SPACE): row for row in table.to_dict("records")}
    feasible = [row[metric] for row in rows.values() if row["peak_mem_gb"] <= budget]
    target = max(feasible) if maximize else min(feasible)
    distributions = {key: CategoricalDistribution(values) for key, values in SPACE.items()}
    study = optuna.create_study(sampler=sampler, direction="maximize" if maximize else "minimize")
    for number in range(1, cap + 1):
        trial = study.ask(distributions)
        row = rows.get(tuple(trial.params[k] for k in SPACE))
        if row is None:  # a configuration whose real trial failed: FAIL, as in the sweeper
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        trial.set_constraint(f"peak_mem_gb <= {budget}", row["peak_mem_gb"] - budget)
        study.tell(trial, row[metric])
        if row["peak_mem_gb"] <= budget and row[metric] == target:
            return number
    return cap


def replay(args: argparse.Namespace) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = pd.read_csv(args.table)
    metric, _, direction = args.objective.partition(":")
    maximize = direction.startswith("max")
    budget = round(float(table["peak_mem_gb"].quantile(args.budget_quantile)), 4)
    grid_size = len(table)
    cap = 3 * grid_size
    results = []
    for name, make in (
        ("tpe", lambda seed: optuna.samplers.TPESampler(seed=seed)),
        ("random", lambda seed: optuna.samplers.RandomSampler(seed=seed)),
    ):
        counts = [
            _trials_to_best(table, metric, maximize, budget, make(seed), cap)
            for seed in range(args.seeds)
        ]
        results.append(
            SearchResult(
                sampler=name,
                seeds=args.seeds,
                median=statistics.median(counts),
                mean=round(statistics.mean(counts), 1),
                p90=statistics.quantiles(counts, n=10)[-1],
                worst=max(counts),
                not_reached=sum(c == cap for c in counts),
            )
        )
    feasible = table[table["peak_mem_gb"] <= budget]
    best = feasible[metric].idxmax() if maximize else feasible[metric].idxmin()
    summary = {
        "objective": args.objective,
        "budget": f"peak_mem_gb <= {budget}",
        "grid_size": grid_size,
        "feasible": len(feasible),
        "grid_best": {k: feasible.at[best, k].item() for k in [*SPACE, metric, "peak_mem_gb"]},
        "results": [asdict(r) for r in results],
    }
    (HERE / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"grid: {grid_size} configurations, {len(feasible)} within {summary['budget']}")
    print(f"grid's best feasible: {summary['grid_best']}")
    print(
        "| sampler | trials to the grid's best (median) | mean | p90 | worst | median / grid size |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r.sampler} | {r.median:g} | {r.mean:g} | {r.p90:g} | {r.worst} | "
            f"{r.median / grid_size:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=HERE / "grid.csv")
    parser.add_argument("--objective", default="tps:max", help="metric:max|min (default: tps:max)")
    sub = parser.add_subparsers(dest="step", required=True)
    run = sub.add_parser("measure", help="run the full grid for real and export grid.csv")
    run.add_argument("--work", type=Path, required=True, help="MLflow store and sweep folder")
    run.add_argument("--model", default="tiny_random")
    run.add_argument("--limit", type=int, default=8, help="dataset.limit per trial")
    again = sub.add_parser("replay", help="TPE and random search over grid.csv")
    again.add_argument("--seeds", type=int, default=100)
    again.add_argument(
        "--budget-quantile",
        type=float,
        default=0.5,
        help="peak_mem_gb budget as this quantile of the grid's peaks (default: the median)",
    )
    args = parser.parse_args()
    measure(args) if args.step == "measure" else replay(args)


if __name__ == "__main__":
    main()
