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


# The config keys that say where a dataset's files are (sweeper/tasks/config.py).
_DATASET_FILE_KEYS = ("path", "questions_file")


def _dataset_source(dataset: dict[str, Any]) -> Any:
    """Where the dataset comes from: its file or folder, a hub id, or the easy-vqa package."""
    import warnings
    from pathlib import Path

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    place = next((str(dataset[k]) for k in _DATASET_FILE_KEYS if dataset.get(k)), None)
    if place is None and str(dataset.get("name", "")).startswith("easy_vqa"):
        import easy_vqa  # its questions and images ship inside the package

        place = str(Path(easy_vqa.__file__).parent / "data")
    if place is None:  # a task that reads no file of its own
        from mlflow.data.code_dataset_source import CodeDatasetSource

        return CodeDatasetSource({"dataset": str(dataset.get("name", ""))})
    if place.startswith(("http://", "https://")):
        return HTTPDatasetSource(place)
    if not Path(place).expanduser().exists() and "/" in place and "://" not in place:
        return HuggingFaceDatasetSource(place, split=dataset.get("split"))  # a hub id
    with warnings.catch_warnings():  # MLflow registers local files under two schemes; either
        warnings.simplefilter("ignore")
        return resolve_dataset_source(Path(place).expanduser().resolve().as_uri())


def dataset_input(params: dict[str, Any]) -> Any:
    """The trial's dataset as an MLflow dataset (metadata only): named by its name, split and
    limit, e.g. `easy_vqa test[:200]`; its digest covers every `dataset.*` key (seed, scoring,
    question types...), so two trials share a digest exactly when they read the same questions
    the same way."""
    import hashlib
    import json

    from mlflow.data.meta_dataset import MetaDataset

    dataset = {k.removeprefix("dataset."): v for k, v in params.items() if k.startswith("dataset.")}
    name = str(dataset.get("name", "dataset"))
    if dataset.get("split"):
        name += f" {dataset['split']}"
    if dataset.get("limit") is not None:
        name += f"[:{dataset['limit']}]"
    digest = hashlib.sha256(json.dumps(dataset, sort_keys=True, default=str).encode()).hexdigest()
    return MetaDataset(_dataset_source(dataset), name=name, digest=digest[:10])


def log_dataset(params: dict[str, Any]) -> None:
    """The trial's dataset as the run's input (MLflow's Datasets column and filter)."""
    import mlflow

    dataset = dataset_input(params)
    tags = {
        k: str(params[f"dataset.{k}"])
        for k in ("split", "limit", "seed")
        if params.get(f"dataset.{k}") is not None
    }
    mlflow.log_input(dataset, context="eval", tags=tags)
