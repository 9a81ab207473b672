"""Export the study's MLflow runs (every trial, FINISHED or FAILED) to runs.csv and runs.json.

    python experiments/okvqa_replica/export.py --tracking-uri sqlite:///DIR/mlflow.db --out DIR

One row per trial, and per run corrected afterwards (its `note` says how): status, overrides,
every metric and the tags that say what ran where (engine, device, versions, vLLM's memory and
KV cache).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from mlflow import MlflowClient

TAGS = (
    "engine",
    "device_name",
    "driver_version",
    "cuda_version",
    "torch_version",
    "transformers_version",
    "vllm_version",
    "vllm_load_format",
    "vllm_memory",
    "vllm_kv_cache_tokens",
    "peak_mem_source",
    "random_weights",
    "dataset_note",
    "error",
    "note",  # a correction made after the run (e.g. marked KILLED: why)
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", default="okvqa_replica")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=50_000)
    rows = []
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tags = run.data.tags
        if not {"engine", "error", "note"} & tags.keys():
            continue  # a sweep's parent run
        rows.append(
            {
                "run_name": run.info.run_name,
                "status": run.info.status,
                "overrides": tags.get("hydra_overrides", ""),
                **{f"tag.{key}": tags.get(key, "") for key in TAGS},
                **{key: value for key, value in sorted(run.data.metrics.items())},
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs.json").write_text(json.dumps(rows, indent=1))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with (args.out / "runs.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} trials -> {args.out}/runs.csv, runs.json")


if __name__ == "__main__":
    main()
