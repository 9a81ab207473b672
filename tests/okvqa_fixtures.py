"""OK-VQA fixtures in the exact real formats, written by the tests themselves.

The official files come from the replica generator (small images); the Hugging Face layouts are
converted from those same files here, independently of the loaders, so that both loaders can be
held to giving identical samples.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.data.okvqa import (
    ANNOTATIONS_FILE,
    IMAGE_DIR,
    QUESTIONS_FILE,
    REPLICA_MARKER,
    image_file_name,
)
from sweeper.data.replica import generate
from sweeper.tasks.config import OKVQAConfig, OKVQAHFConfig

HF_FEATURES_SPEC = ("question_id", "image", "question", "answers", "question_type", "answer_type")


@dataclass
class Official:
    root: Path

    @property
    def questions_file(self) -> Path:
        return self.root / QUESTIONS_FILE

    @property
    def annotations_file(self) -> Path:
        return self.root / ANNOTATIONS_FILE

    @property
    def image_dir(self) -> Path:
        return self.root / IMAGE_DIR

    def config(self, **overrides: Any) -> OKVQAConfig:
        return OKVQAConfig(
            questions_file=str(self.questions_file),
            annotations_file=str(self.annotations_file),
            image_dir=str(self.image_dir),
            **overrides,
        )

    def cli_args(self) -> list[str]:
        return [
            "dataset=okvqa",
            f"dataset.questions_file={self.questions_file}",
            f"dataset.annotations_file={self.annotations_file}",
            f"dataset.image_dir={self.image_dir}",
        ]

    def questions(self) -> list[dict[str, Any]]:
        return json.loads(self.questions_file.read_text())["questions"]

    def image_path(self, index: int) -> Path:
        """The image file of the index-th question."""
        return self.image_dir / image_file_name(self.questions()[index]["image_id"])

    def edit(self, path: Path, change: Callable[[dict[str, Any]], None]) -> None:
        content = json.loads(path.read_text())
        change(content)
        path.write_text(json.dumps(content))


def write_official(root: Path, n: int = 20, seed: int = 0, replica: bool = False) -> Official:
    """n questions in the official layout; without the replica marker unless asked for."""
    generate(root, n, seed, scale=0.1, progress=False)
    if not replica:
        (root / REPLICA_MARKER).unlink()
    return Official(root)


def hf_rows(official: Official) -> dict[str, list[Any]]:
    """The official files as lmms-lab/OK-VQA columns (image as encoded bytes)."""
    annotations = {
        a["question_id"]: a
        for a in json.loads(official.annotations_file.read_text())["annotations"]
    }
    columns: dict[str, list[Any]] = {name: [] for name in HF_FEATURES_SPEC}
    for question in official.questions():
        annotation = annotations[question["question_id"]]
        path = official.image_dir / image_file_name(question["image_id"])
        columns["question_id"].append(str(question["question_id"]))
        columns["image"].append({"bytes": path.read_bytes(), "path": path.name})
        columns["question"].append(question["question"])
        columns["answers"].append([a["answer"] for a in annotation["answers"]])
        columns["question_type"].append(annotation["question_type"])
        columns["answer_type"].append(annotation["answer_type"])
    return columns


def hf_dataset(columns: dict[str, list[Any]]) -> Any:
    from datasets import Dataset

    from sweeper.data.okvqa_hf import okvqa_hf_features

    features = okvqa_hf_features()
    return Dataset.from_dict(columns, features=features)


def write_hf_parquet(columns: dict[str, list[Any]], folder: Path, shards: int = 2) -> list[Path]:
    """Parquet shards named like lmms-lab's (data/val2014-0000i-of-0000n.parquet)."""
    dataset = hf_dataset(columns)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index in range(shards):
        file = folder / f"val2014-{index:05d}-of-{shards:05d}.parquet"
        dataset.shard(shards, index, contiguous=True).to_parquet(str(file))
        files.append(file)
    return files


def write_hf_saved(columns: dict[str, list[Any]], folder: Path) -> Path:
    """A save_to_disk DatasetDict with the split lmms-lab uses."""
    from datasets import DatasetDict

    DatasetDict({"val2014": hf_dataset(columns)}).save_to_disk(str(folder))
    return folder


def hf_config(path: Any, tmp: Path, **overrides: Any) -> OKVQAHFConfig:
    paths = [str(p) for p in path] if isinstance(path, list) else str(path)
    return OKVQAHFConfig(path=paths, cache_dir=str(tmp / "hf-cache"), **overrides)
