"""A prompt set in JSON Lines: one object per line, `{"prompt": "...", "answers": ["...", ...]}`
(an `id` optional; `answer`, a single string, is taken for `answers` too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sweeper.data.base import LoadReport, Sample


def _sample(record: Any, line: int) -> tuple[Sample | None, str | None]:
    if not isinstance(record, dict):
        return None, f"a JSON object, not {type(record).__name__}"
    prompt = record.get("prompt")
    answers = record.get("answers", [record["answer"]] if "answer" in record else None)
    if not isinstance(prompt, str) or not prompt:
        return None, "a non-empty string 'prompt'"
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return None, "'answers': a non-empty list of strings (or 'answer': a string)"
    question_id = str(record.get("id", line))
    return Sample(question_id, prompt, answers), None


def load_jsonl(cfg: Any, report: LoadReport) -> list[Sample]:
    path = Path(cfg.path).expanduser()
    samples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                sample, problem = _sample(json.loads(line), number)
            except json.JSONDecodeError as error:
                sample, problem = None, f"valid JSON ({error.msg})"
            if sample is None:
                report.reject(str(number), where, f"each line must be {problem}")
                continue
            samples.append(sample)
    return samples
