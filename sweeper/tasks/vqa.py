"""Visual question answering: one image, a question, a short answer, scored by VQA accuracy
(sweeper/metrics/vqa.py) against the human answers: lmms-eval's (the default) or the official
evaluator's (`dataset.scoring`). The datasets: easy-VQA, OK-VQA in its official files, OK-VQA in
the Hugging Face layout (any parquet of its shape)."""

from __future__ import annotations

from typing import Any

from sweeper.data.easy_vqa import load_easy_vqa
from sweeper.data.okvqa import load_okvqa
from sweeper.data.okvqa_hf import load_okvqa_hf
from sweeper.metrics import normalize_answer, official_vqa_accuracy, top_answer_match, vqa_accuracy
from sweeper.metrics.vqa import official_prediction
from sweeper.tasks.base import Task


class VQATask(Task):
    takes_images = True
    scores = ("score", "top_answer_match")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.official = cfg.scoring == "official"
        self.metric = (
            "VQA accuracy, GT-Vision-Lab evaluator (vqaEval.py)"
            if self.official
            else "VQA accuracy, lmms-eval (EvalAI answer processor on prediction and answers)"
        )

    def score(self, answer: str, answers: list[str]) -> dict[str, float]:
        accuracy = official_vqa_accuracy if self.official else vqa_accuracy
        return {
            "score": accuracy(answer, answers),
            "top_answer_match": top_answer_match(answer, answers),
        }

    def normalize(self, answer: str) -> str:
        return official_prediction(answer) if self.official else normalize_answer(answer)


class EasyVQA(VQATask):
    source = staticmethod(load_easy_vqa)


class OKVQA(VQATask):
    source = staticmethod(load_okvqa)


class OKVQAHF(VQATask):
    source = staticmethod(load_okvqa_hf)
