"""Text question answering: a question alone, a short answer, scored by exact match against any
reference answer after the VQA answer normalisation (case, punctuation, articles, numbers). It
takes any text-only model."""

from __future__ import annotations

from sweeper.data.easy_vqa import load_easy_vqa_text
from sweeper.data.jsonl import load_jsonl
from sweeper.metrics import normalize_answer
from sweeper.tasks.base import Task


class TextTask(Task):
    takes_images = False
    metric = "exact match after VQA answer normalisation, any reference answer"

    def score(self, answer: str, answers: list[str]) -> dict[str, float]:
        return {"score": float(normalize_answer(answer) in {normalize_answer(a) for a in answers})}

    def normalize(self, answer: str) -> str:
        return normalize_answer(answer)


class EasyVQAText(TextTask):
    source = staticmethod(load_easy_vqa_text)


class TextJSONL(TextTask):
    source = staticmethod(load_jsonl)
