"""OK-VQA in its official files, and the record checks both OK-VQA layouts share.

What is checked when (policy `dataset.on_error`, see `LoadReport.reject`):
- at load, every record of the files: the question/annotation join, image ids agreeing,
  exactly 10 answers, non-empty question, unique question_id (the first occurrence is used,
  every later one is a bad sample);
- at load, after `dataset.limit`: each selected image's file exists and its header parses
  (`probe_images`, no pixels decoded);
- at decode, ahead of the engine: the pixels (`prefetch`), e.g. a JPEG truncated past its header.
Problems with a whole file (unreadable JSON, no `questions` list) always raise: there is no
sample to skip.

Scored answers are the 10 `answer` fields, which OK-VQA has already stemmed ("racing" ->
"race"); the annotators' own words are kept in `metadata["raw_answers"]`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper.data.base import DataError, FileImage, LazyImage, LoadReport, Sample

QUESTIONS_FILE = "OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS_FILE = "mscoco_val2014_annotations.json"
IMAGE_DIR = "val2014"
ANSWERS_PER_QUESTION = 10
# Written by `sweeper.data.replica` next to the questions file; trials on it are tagged.
REPLICA_MARKER = "SWEEPER_REPLICA.json"
REPLICA_NOTE = "performance replica: accuracy is meaningless"


def image_file_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


@dataclass
class Record:
    """One question as a layout stores it, before the shared checks turn it into a sample."""

    question_id: str
    question: Any
    answers: Any
    image: LazyImage
    where: str  # the file (and row) it came from, for messages
    answers_where: str  # the same, for its answers (the annotations file in the official layout)
    metadata: dict[str, Any] = field(default_factory=dict)


def _problem(record: Record, first_seen: dict[str, str]) -> tuple[str, str] | None:
    """(where, what) for a bad record, None for a good one."""
    if record.question_id in first_seen:
        first = first_seen[record.question_id]
        return record.where, f"duplicate question_id (first one in {first})"
    if not isinstance(record.question, str) or not record.question.strip():
        return record.where, "no question text"
    answers = record.answers
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        return record.answers_where, f"answers must be a list of strings, not {answers!r:.80}"
    if len(answers) != ANSWERS_PER_QUESTION:
        return record.answers_where, f"{len(answers)} answers, expected {ANSWERS_PER_QUESTION}"
    return None


def build_samples(
    records: Iterable[Record], question_types: list[str] | None, report: LoadReport, source: str
) -> list[Sample]:
    """Check every record (bad ones go to `report`), then keep the asked question types."""
    first_seen: dict[str, str] = {}
    samples: list[Sample] = []
    for record in records:
        problem = _problem(record, first_seen)
        if problem is not None:
            report.reject(record.question_id, *problem)
            continue
        first_seen[record.question_id] = record.where
        samples.append(
            Sample(
                record.question_id,
                record.question,
                record.answers,
                record.image,
                record.metadata,
            )
        )
    if question_types is None:
        kept = samples
    else:
        wanted = set(question_types)
        kept = [s for s in samples if s.metadata.get("question_type") in wanted]
    if not samples:
        raise report.nothing_left(source)
    if not kept:
        present = sorted({str(s.metadata.get("question_type")) for s in samples})
        raise DataError(
            f"{source}: no samples left (good samples: {len(samples)}, skipped: "
            f"{len(report.skipped)}, dataset.question_types={question_types}, "
            f"types present: {', '.join(present) or 'none'})"
        )
    return kept


def _entries(path: str, key: str) -> list[Any]:
    try:
        with Path(path).expanduser().open(encoding="utf-8") as file:
            content = json.load(file)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read as JSON ({type(error).__name__}: {error})") from None
    entries = content.get(key) if isinstance(content, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"{path}: no '{key}' list at the top level")
    return entries


def _question_id(entry: Any, index: int) -> str:
    """str(question_id), or the entry's position when it has none (still named in messages)."""
    if isinstance(entry, dict) and "question_id" in entry:
        return str(entry["question_id"])
    return f"<entry {index}>"


def _records(cfg: Any, report: LoadReport) -> Iterator[Record]:
    """Join questions and annotations on question_id; join problems go straight to `report`."""
    questions_file, annotations_file = cfg.questions_file, cfg.annotations_file
    annotations: dict[str, dict[str, Any]] = {}
    for index, entry in enumerate(_entries(annotations_file, "annotations")):
        question_id = _question_id(entry, index)
        if not isinstance(entry, dict) or "question_id" not in entry:
            report.reject(question_id, annotations_file, "annotation without a question_id")
        elif question_id in annotations:
            report.reject(question_id, annotations_file, "duplicate annotation")
        else:
            annotations[question_id] = entry

    image_dir = Path(cfg.image_dir).expanduser()
    answered: set[str] = set()
    for index, entry in enumerate(_entries(questions_file, "questions")):
        question_id = _question_id(entry, index)
        annotation = annotations.get(question_id)
        if not isinstance(entry, dict) or "question_id" not in entry:
            report.reject(question_id, questions_file, "question without a question_id")
            continue
        # Its annotation has a question, whatever else is wrong with it: one bad entry is one
        # skipped sample, not a second one for "no question".
        answered.add(question_id)
        if not isinstance(entry.get("image_id"), int):
            report.reject(question_id, questions_file, "no integer image_id")
            continue
        if annotation is None:
            report.reject(question_id, questions_file, f"no annotation in {annotations_file}")
            continue
        if annotation.get("image_id") != entry["image_id"]:
            report.reject(
                question_id,
                questions_file,
                f"image_id {entry['image_id']} but {annotation.get('image_id')} in "
                f"{annotations_file}",
            )
            continue
        answers = annotation.get("answers")
        if not isinstance(answers, list) or not all(
            isinstance(a, dict) and "answer" in a for a in answers
        ):
            report.reject(question_id, annotations_file, "answers must be objects with 'answer'")
            continue
        yield Record(
            question_id=question_id,
            question=entry.get("question"),
            answers=[a["answer"] for a in answers],
            image=FileImage(str(image_dir / image_file_name(entry["image_id"]))),
            where=questions_file,
            answers_where=annotations_file,
            metadata={
                "image_id": entry["image_id"],
                "question_type": annotation.get("question_type"),
                "answer_type": annotation.get("answer_type"),
                "confidence": annotation.get("confidence"),
                "raw_answers": [a.get("raw_answer") for a in answers],
            },
        )
    for question_id in annotations:
        if question_id not in answered:
            report.reject(question_id, annotations_file, f"no question in {questions_file}")


def load_okvqa(cfg: Any, report: LoadReport) -> list[Sample]:
    """Every good sample of the official files, in questions-file order, images unopened."""
    if (Path(cfg.questions_file).expanduser().parent / REPLICA_MARKER).exists():
        report.tags["dataset_note"] = REPLICA_NOTE
    return build_samples(_records(cfg, report), cfg.question_types, report, cfg.questions_file)
