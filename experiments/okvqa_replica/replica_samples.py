"""The replica's questions and image paths read straight from its official files, for the bare
anchor scripts (which must not go through sweeper's data pipeline they are compared with)."""

from __future__ import annotations

import json
from pathlib import Path

QUESTIONS = "OpenEnded_mscoco_val2014_questions.json"


def replica_samples(root: str | Path, n: int | None = None) -> list[tuple[str, Path]]:
    """(question, image path) of the first `n` questions, in file order (as sweeper reads it)."""
    root = Path(root)
    questions = json.loads((root / QUESTIONS).read_text())["questions"][:n]
    return [
        (q["question"], root / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg")
        for q in questions
    ]
