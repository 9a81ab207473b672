"""A sweep's reference answers, kept on its MLflow parent run (`references/<answers key>.json`):
the trials of every process and worker of the sweep (or study) reuse them."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

FOLDER = "references"


class ParentRunReferences:
    """`ReferenceStore` (sweeper/trial.py) on the sweep's parent run."""

    def __init__(self, parent_run_id: str) -> None:
        self.parent_run_id = parent_run_id

    def get(self, key: str) -> list[dict[str, Any]] | None:
        from mlflow import MlflowClient

        client = MlflowClient()
        name = f"{FOLDER}/{key}.json"
        if name not in {item.path for item in client.list_artifacts(self.parent_run_id, FOLDER)}:
            return None
        with tempfile.TemporaryDirectory() as folder:
            path = client.download_artifacts(self.parent_run_id, name, folder)
            return json.loads(Path(path).read_text())["predictions"]

    def put(self, key: str, predictions: list[dict[str, Any]]) -> None:
        from mlflow import MlflowClient

        table = {"predictions": predictions}
        MlflowClient().log_dict(self.parent_run_id, table, f"{FOLDER}/{key}.json")
