"""What a finished trial leaves in its MLflow run."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


class RecordError(Exception):
    """Part of a finished trial's record could not be written (a full disk, a store that went
    away); the message says which parts and why, in one line."""


def log_result(result: Any, resolved_config_yaml: str, log_predictions: bool = True) -> None:
    """Metrics (finite ones), tags, the resolved config and (optionally) the predictions table.

    Each part is written on its own, metrics first: one that cannot be written (a disk that
    filled up during the trial) keeps none of the others out. RecordError names those that
    failed once all were tried.
    """
    import mlflow

    from sweeper.tracking.credentials import redact

    parts: list[tuple[str, Callable[[], Any]]] = [
        ("metrics", lambda: mlflow.log_metrics(_finite(result.metrics))),
        ("tags", lambda: mlflow.set_tags(result.tags)),
        ("config.yaml", lambda: mlflow.log_text(redact(resolved_config_yaml), "config.yaml")),
    ]
    if result.skipped:  # the metric skipped_samples counts them; this says which and why
        skipped = {"skipped_samples": result.skipped}
        parts.append(
            ("skipped_samples.json", lambda: mlflow.log_dict(skipped, "skipped_samples.json"))
        )
    if len(result.repeats) > 1:  # the raw values behind each mean and its interval
        repeats = {"repeats": result.repeats}
        parts.append(("repeats.json", lambda: mlflow.log_dict(repeats, "repeats.json")))
    if result.steps:
        parts.append(("rate sweep steps", lambda: _log_steps(result.steps)))
    for name, path in result.artifacts.items():  # an engine's files (a server's log)
        parts.append((name, lambda path=path: mlflow.log_artifact(str(path))))
    if log_predictions and result.predictions:
        parts.append(("predictions.json", lambda: _log_predictions(result.predictions)))
    failed = []
    for name, write in parts:
        try:
            write()
        except Exception as error:  # noqa: BLE001 - every part is tried; all failures reported
            lines = str(error).strip().splitlines()
            failed.append(f"{name} ({type(error).__name__}: {lines[0] if lines else ''})")
    if failed:
        raise RecordError(f"not written to MLflow: {'; '.join(failed)}")


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def _log_steps(steps: list[tuple[str, dict[str, float], dict[str, str]]]) -> None:
    """A rate sweep: each step a child run of the trial's run."""
    import mlflow

    for label, metrics, tags in steps:
        with mlflow.start_run(run_name=label, nested=True):
            mlflow.log_metrics(_finite(metrics))
            mlflow.set_tags({**tags, "rate_sweep_step": label})


def _log_predictions(predictions: list[dict[str, Any]]) -> None:
    import mlflow
    import pandas as pd

    # Raw outputs and the human answers as lists: any scorer can rescore the run from it.
    mlflow.log_table(pd.DataFrame(predictions), artifact_file="predictions.json")
