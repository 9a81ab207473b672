"""The `dataset` config group: each dataset's config names the task that reads and scores it
(`_target_`, sweeper/tasks/)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from sweeper.config import check, check_existing_path, check_file, looks_like_local_path

# A bad sample (missing or broken image, malformed record): raise a one-line error, or skip it
# and count it (metric `skipped_samples`, artifact `skipped_samples.json`). `raise` is a
# keyword, and OmegaConf reads Enum members by name.
OnError = StrEnum("OnError", {"raise": "raise", "skip": "skip"})


class Split(StrEnum):
    train = "train"
    test = "test"


class VQAScoring(StrEnum):
    """Which VQA accuracy `accuracy` is (sweeper/metrics/vqa.py says how they differ)."""

    lmms_eval = "lmms_eval"  # lmms-eval's OK-VQA/VQAv2 scoring: the EvalAI processor on all
    official = "official"  # the GT-Vision-Lab evaluator (vqaEval.py)


@dataclass
class DatasetConfig:
    name: str = MISSING
    _target_: str = MISSING  # the Task class
    limit: int | None = None
    seed: int | None = None  # shuffle with this seed before `limit`; None keeps file order
    prefetch: int = 16  # decoded images kept ready ahead of the engine
    on_error: OnError = OnError["raise"]

    def __post_init__(self) -> None:
        if self.limit is not None:
            check(self.limit >= 1, "dataset.limit", self.limit, "an integer >= 1 or null")
        check(self.prefetch >= 1, "dataset.prefetch", self.prefetch, "an integer >= 1")


@dataclass
class VQADatasetConfig(DatasetConfig):
    """What every VQA dataset has: how its answers are scored."""

    scoring: VQAScoring = VQAScoring.lmms_eval


@dataclass
class EasyVQAConfig(VQADatasetConfig):
    """easy-VQA (shipped by the easy-vqa package): 64x64 shapes, one answer per question."""

    name: str = "easy_vqa"
    _target_: str = "sweeper.tasks.vqa.EasyVQA"
    split: Split = Split.test
    limit: int | None = 200


@dataclass
class EasyVQATextConfig(DatasetConfig):
    """easy-VQA's questions without their images: a text prompt set with reference answers (for
    text-only models; the answers are about images the model never sees)."""

    name: str = "easy_vqa_text"
    _target_: str = "sweeper.tasks.text.EasyVQAText"
    split: Split = Split.test
    limit: int | None = 200


@dataclass
class TextJSONLConfig(DatasetConfig):
    """Any prompt set in JSON Lines: `{"prompt": "...", "answers": ["..."]}` per line."""

    name: str = "text_jsonl"
    _target_: str = "sweeper.tasks.text.TextJSONL"
    path: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_file("dataset.path", self.path, "an existing JSON Lines file of prompts and answers")


@dataclass
class OKVQABaseConfig(VQADatasetConfig):
    """What both OK-VQA layouts share: the optional filter on the annotated question type."""

    question_types: list[str] | None = None  # e.g. [one, eight]; null keeps every type

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.question_types is not None:
            check(
                len(self.question_types) > 0,
                "dataset.question_types",
                self.question_types,
                "a non-empty list of question types, or null for all",
            )


@dataclass
class OKVQAConfig(OKVQABaseConfig):
    """OK-VQA val2014 in its official files (5,046 questions, 10 human answers each, COCO
    images). The three paths are required; null paths are refused before any model loads."""

    name: str = "okvqa"
    _target_: str = "sweeper.tasks.vqa.OKVQA"
    questions_file: str | None = None  # OpenEnded_mscoco_val2014_questions.json
    annotations_file: str | None = None  # mscoco_val2014_annotations.json
    image_dir: str | None = None  # val2014/ (COCO_val2014_<image_id:012d>.jpg)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_file(
            "dataset.questions_file",
            self.questions_file,
            "an existing OpenEnded_mscoco_val2014_questions.json",
        )
        check_file(
            "dataset.annotations_file",
            self.annotations_file,
            "an existing mscoco_val2014_annotations.json",
        )
        check(
            self.image_dir is not None and Path(self.image_dir).expanduser().is_dir(),
            "dataset.image_dir",
            self.image_dir,
            "an existing folder of COCO_val2014_<image_id>.jpg files",
        )


@dataclass
class OKVQAHFConfig(OKVQABaseConfig):
    """OK-VQA in the Hugging Face layout (lmms-lab/OK-VQA), read with `datasets`; images stay in
    the memory-mapped Arrow data and are decoded one at a time, ahead of the engine.

    `path`: a hub id, a folder of parquet files, a parquet file, a list of parquet files, or a
    folder written by `save_to_disk`. (Any: OmegaConf has no str-or-list type.)
    """

    name: str = "okvqa_hf"
    _target_: str = "sweeper.tasks.vqa.OKVQAHF"
    path: Any = "lmms-lab/OK-VQA"
    split: str = "val2014"  # for a hub id or a save_to_disk DatasetDict
    cache_dir: str | None = None  # where `datasets` keeps its Arrow copy; null: its own cache

    def __post_init__(self) -> None:
        super().__post_init__()
        key = "dataset.path"
        allowed = "a hub id, an existing parquet file or folder, or a list of parquet files"
        if isinstance(self.path, list):
            check(len(self.path) > 0, key, self.path, allowed)
            for item in self.path:
                check_file(key, item, allowed)
        else:
            check(isinstance(self.path, str) and bool(self.path), key, self.path, allowed)
            if looks_like_local_path(self.path):
                check_existing_path(key, self.path, allowed)


DATASET_CONFIGS = (
    EasyVQAConfig,
    EasyVQATextConfig,
    TextJSONLConfig,
    OKVQAConfig,
    OKVQAHFConfig,
)
