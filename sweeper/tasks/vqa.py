"""Visual question answering: one image, a question, a short answer, scored by VQA accuracy
(sweeper/metrics/vqa.py) against the human answers. The datasets: easy-VQA, OK-VQA in its
official files, OK-VQA in the Hugging Face layout (any parquet of its shape)."""

from __future__ import annotations

from sweeper.data.easy_vqa import load_easy_vqa
from sweeper.data.okvqa import load_okvqa
from sweeper.data.okvqa_hf import load_okvqa_hf
from sweeper.metrics import exact_match, vqa_accuracy
from sweeper.tasks.base import Task


class VQATask(Task):
    takes_images = True
    scores = ("score", "exact_match")

    def score(self, prediction: str, answers: list[str]) -> dict[str, float]:
        return {
            "score": vqa_accuracy(prediction, answers),
            "exact_match": exact_match(prediction, answers),
        }


class EasyVQA(VQATask):
    source = staticmethod(load_easy_vqa)


class OKVQA(VQATask):
    source = staticmethod(load_okvqa)


class OKVQAHF(VQATask):
    source = staticmethod(load_okvqa_hf)
