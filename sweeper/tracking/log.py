"""What a finished trial leaves in its MLflow run."""

from __future__ import annotations

import math
from typing import Any


def log_result(result: Any, resolved_config_yaml: str, log_predictions: bool = True) -> None:
    """Metrics (finite ones), tags, the resolved config and (optionally) the predictions table."""
    import mlflow
    import pandas as pd

    mlflow.log_metrics({k: v for k, v in result.metrics.items() if math.isfinite(v)})
    mlflow.set_tags(result.tags)
    mlflow.log_text(resolved_config_yaml, "config.yaml")
    if result.skipped:  # the metric skipped_samples counts them; this says which and why
        mlflow.log_dict({"skipped_samples": result.skipped}, "skipped_samples.json")
    if len(result.repeats) > 1:  # the raw values behind each mean and its interval
        mlflow.log_dict({"repeats": result.repeats}, "repeats.json")
    for label, metrics, tags in result.steps:  # a rate sweep: each step a child run
        with mlflow.start_run(run_name=label, nested=True):
            mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
            mlflow.set_tags({**tags, "rate_sweep_step": label})
    if log_predictions and result.predictions:
        # Raw outputs and the human answers as lists: any scorer can rescore the run from it.
        mlflow.log_table(pd.DataFrame(result.predictions), artifact_file="predictions.json")
