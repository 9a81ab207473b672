"""OK-VQA in the Hugging Face layout of lmms-lab/OK-VQA, read with `datasets`.

Columns: `question_id` (string), `image` (an Image feature, stored in parquet as a struct of
`bytes` and `path`), `question`, `answers` (the 10 stemmed OK-VQA answers), `question_type`,
`answer_type`. `dataset.path` may be a hub id (`load_dataset(id, split=...)`), a parquet file, a
folder of parquet files, a list of parquet files, or a `save_to_disk` folder.

Memory stays bounded: `datasets` memory-maps its Arrow data (for parquet input, the Arrow copy it
writes once into its cache), the text columns are read up front, and each sample keeps only a
row index into the image column, whose bytes are read and decoded when `prefetch` asks.

The records go through the same checks as the official files (`okvqa.build_samples`); a file
without the expected columns always raises, naming the file and the missing columns.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sweeper.data.base import DataError, LazyImage, LoadReport, Sample
from sweeper.data.okvqa import Record, build_samples

COLUMNS = ("question_id", "image", "question", "answers", "question_type", "answer_type")


def okvqa_hf_features() -> Any:
    """The `datasets` features of lmms-lab/OK-VQA (what fixtures and the replica write)."""
    from datasets import Features, Image, List, Value

    return Features(
        {
            "question_id": Value("string"),
            "image": Image(),
            "question": Value("string"),
            "answers": List(Value("string")),
            "question_type": Value("string"),
            "answer_type": Value("string"),
        }
    )


@dataclass(frozen=True, eq=False)
class ArrowImage(LazyImage):
    """Row `index` of a one-column (image) dataset: bytes, or a path when only that is stored."""

    images: Any  # datasets.Dataset, image column cast to Image(decode=False)
    index: int
    where: str

    def open(self) -> Image.Image:
        cell = self.images[self.index]["image"]
        if cell is None or (cell.get("bytes") is None and not cell.get("path")):
            raise FileNotFoundError("the image cell holds neither bytes nor a path")
        if cell["bytes"] is not None:
            return Image.open(io.BytesIO(cell["bytes"]))
        return Image.open(cell["path"])

    def __str__(self) -> str:
        return self.where


@dataclass(frozen=True)
class _Rows:
    """Names where row i of the loaded dataset came from: a parquet file and its row, if known."""

    files: list[str]
    starts: list[int]  # first dataset row of each file

    def __call__(self, index: int) -> str:
        file = bisect.bisect_right(self.starts, index) - 1
        return f"{self.files[file]} row {index - self.starts[file]}"


def _check_columns(where: str, columns: list[str]) -> None:
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"{where}: not the OK-VQA Hugging Face layout: missing column(s) "
            f"{', '.join(missing)} (found: {', '.join(columns) or 'none'})"
        )


def _parquet_files(path: Any) -> list[str] | None:
    """The parquet files `path` names, or None when it is a save_to_disk folder or a hub id."""
    if isinstance(path, list):
        return [str(Path(p).expanduser()) for p in path]
    local = Path(path).expanduser()
    if local.is_file():
        return [str(local)]
    saved = (local / "state.json").exists() or (local / "dataset_dict.json").exists()
    if not local.is_dir() or saved:
        return None
    files = sorted(str(f) for f in local.rglob("*.parquet"))
    if not files:
        raise DataError(f"{local}: no .parquet files in this folder")
    return files


def _open_parquet(files: list[str], cache_dir: str | None) -> tuple[Any, _Rows]:
    import pyarrow.parquet as pq
    from datasets import load_dataset

    starts, total = [], 0
    for file in files:
        # The footer alone: names the file that lacks a column, before datasets reads anything.
        try:
            metadata = pq.ParquetFile(file).metadata
        except (OSError, ValueError) as error:
            raise DataError(f"{file}: not a readable parquet file ({error})") from None
        _check_columns(file, metadata.schema.to_arrow_schema().names)
        starts.append(total)
        total += metadata.num_rows
    # load_dataset keeps the order of data_files, so `starts` maps rows back to files.
    dataset = load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
    return dataset, _Rows(files, starts)


def _open(cfg: Any) -> tuple[Any, Callable[[int], str]]:
    """The dataset and a function naming where row i came from."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    files = _parquet_files(cfg.path)
    if files is not None:
        return _open_parquet(files, cfg.cache_dir)
    name = str(cfg.path)
    local = Path(name).expanduser()
    if local.is_dir():
        dataset = load_from_disk(str(local))
        if isinstance(dataset, DatasetDict):
            if cfg.split not in dataset:
                raise DataError(
                    f"{local}: no split '{cfg.split}' (splits: {', '.join(dataset)}); "
                    "set dataset.split"
                )
            dataset = dataset[cfg.split]
    else:
        dataset = load_dataset(name, split=cfg.split, cache_dir=cfg.cache_dir)
    _check_columns(name, dataset.column_names)
    return dataset, lambda index: f"{name} row {index}"


def load_okvqa_hf(cfg: Any, report: LoadReport) -> list[Sample]:
    """Every good sample of the dataset, in row order; images stay in the Arrow data."""
    from datasets import Image as ImageFeature

    try:
        dataset, where = _open(cfg)
    except DataError:
        raise
    except Exception as error:  # datasets raises many types; the user needs the path and why
        first = str(error).splitlines()[0] if str(error) else ""
        raise DataError(f"{cfg.path}: cannot load ({type(error).__name__}: {first})") from None
    # decode=False: rows give the stored bytes/path, decoded by ArrowImage only when asked.
    images = dataset.select_columns(["image"]).cast_column("image", ImageFeature(decode=False))
    text = dataset.remove_columns("image")
    return build_samples(_records(text, images, where), cfg.question_types, report, str(cfg.path))


def _records(text: Any, images: Any, where: Callable[[int], str]) -> Iterator[Record]:
    for index, row in enumerate(text):
        place = where(index)
        yield Record(
            question_id=str(row["question_id"]),
            question=row["question"],
            answers=row["answers"],
            image=ArrowImage(images, index, place),
            where=place,
            answers_where=place,
            metadata={"question_type": row["question_type"], "answer_type": row["answer_type"]},
        )
