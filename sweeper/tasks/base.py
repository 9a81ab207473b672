"""A task: a dataset's samples, the chat each becomes (its prompt), and how a completion is
scored (as lmms-eval's tasks own `doc_to_text` and `process_results`). Engines know nothing of
tasks; the trial asks the task for requests' messages and for the scores."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from sweeper.data import LoadReport, Sample, load_samples
from sweeper.metrics import majority_vote
from sweeper.metrics.stats import CI_SUFFIX, mean_ci95
from sweeper.requests import Completion

ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
# workload=multi_sample: a reasoning path per sample, its answer on a last line of its own.
REASONING_INSTRUCTION = (
    "Think step by step, then give the final answer on a last line as 'Answer: <word or phrase>'."
)
_ANSWER_PREFIX = "answer:"


def extract_answer(text: str) -> str:
    """The answer of a reasoning path: what follows its last 'Answer:', else the text; its first
    line, without surrounding space or a final '.'."""
    at = text.lower().rfind(_ANSWER_PREFIX)
    if at >= 0:
        text = text[at + len(_ANSWER_PREFIX) :]
    line = text.strip().split("\n", 1)[0].strip()
    return line[:-1].rstrip() if line.endswith(".") else line


def qa_messages(
    question: str,
    history: Sequence[tuple[str, str]] = (),
    system_prompt: str | None = None,
    reasoning: bool = False,
    image: bool = False,
) -> list[dict]:
    """Chat turns asking `question` after the (question, answer) turns of `history`, for a
    short answer (or a reasoning path ending in one); `image`: an image part opens the first
    question."""
    instruction = REASONING_INSTRUCTION if reasoning else ANSWER_INSTRUCTION
    questions = [asked for asked, _ in history] + [question]
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    picture = [{"type": "image"}] if image else []
    text = {"type": "text", "text": f"{questions[0]}\n{instruction}"}
    messages.append({"role": "user", "content": [*picture, text]})
    for (_, answer), asked in zip(history, questions[1:], strict=True):
        messages.append({"role": "assistant", "content": answer})
        text = {"type": "text", "text": f"{asked}\n{instruction}"}
        messages.append({"role": "user", "content": [text]})
    return messages


class Task(ABC):
    """Questions with reference answers, asked for a short answer (or a reasoning path ending in
    one). A sequence's answer is its text as generated, as lmms-eval scores it (a reasoning
    path's: what follows its last 'Answer:'); a completion's is its sequences' majority vote."""

    takes_images: ClassVar[bool] = False
    # The keys `score` returns; `score` is the headline one, logged as `accuracy`.
    scores: ClassVar[tuple[str, ...]] = ("score",)
    # Which accuracy `score` is, for the run's `accuracy_metric` tag.
    metric: ClassVar[str]
    # Reads the dataset's files into samples; bad samples go to the report.
    source: ClassVar[Callable[[Any, LoadReport], list[Sample]]]

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def load(self) -> tuple[list[Sample], LoadReport]:
        return load_samples(self.cfg, type(self).source)

    def messages(
        self,
        sample: Sample,
        history: Sequence[tuple[str, str]] = (),
        system_prompt: str | None = None,
        reasoning: bool = False,
        image: bool = True,
    ) -> list[dict]:
        """The chat for `sample` after the (question, answer) turns of `history`; the image part
        (when the task has images and `image`) opens the first question."""
        picture = image and self.takes_images
        return qa_messages(sample.question, history, system_prompt, reasoning, picture)

    @staticmethod
    def answer(completion: Completion, reasoning: bool = False) -> str:
        """The completion's answer, as generated: its one sequence's, or the majority's."""
        answers = [extract_answer(t) if reasoning else t for t in completion.texts]
        return majority_vote(answers) if len(answers) > 1 else answers[0]

    @abstractmethod
    def score(self, answer: str, answers: list[str]) -> dict[str, float]:
        """The raw answer's scores against the sample's answers, by the names in `scores`."""

    @abstractmethod
    def normalize(self, answer: str) -> str:
        """The answer as the score compares it (for the predictions table)."""

    def record(
        self, sample: Sample, completion: Completion, reasoning: bool = False
    ) -> dict[str, Any]:
        """One row of the trial's predictions table: enough to rescore the run with any
        scorer (the raw outputs, the answer taken from them, the human answers)."""
        answer = self.answer(completion, reasoning)
        return {
            "question_id": sample.question_id,
            "question": sample.question,
            "outputs": completion.texts,
            "answer": answer,
            "prediction": self.normalize(answer),
            "answers": list(sample.answers),
            **self.score(answer, sample.answers),
            "ttft_s": completion.timing.ttft_s,
            "output_tokens": completion.timing.output_tokens,
        }

    @classmethod
    def aggregate_names(cls) -> tuple[str, ...]:
        """The metric names `aggregate` returns, one per score (`score`: `accuracy`)."""
        return tuple("accuracy" if name == "score" else name for name in cls.scores)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """The trial's task metrics: each score's mean over the records, and the half-width of
        the accuracy's 95% interval over the questions (`accuracy_ci95`: what a recommendation
        may not tell apart)."""
        metrics = {
            metric: sum(r[name] for r in records) / len(records)
            for name, metric in zip(self.scores, self.aggregate_names(), strict=True)
        }
        metrics["accuracy" + CI_SUFFIX] = mean_ci95([r["score"] for r in records])[1]
        return metrics
