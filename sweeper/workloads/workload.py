"""Workloads: how a task's samples become the requests an engine answers, the same for every
engine and task. The task writes each chat (`Task.messages`); the workload decides what goes in
it (system prompt, history, the image or not, an answer or a reasoning path) and drives
`Engine.run`:
- `single`: one request per sample.
- `shared_prefix`: every request starts with the same system prompt of about
  `workload.system_prompt_tokens` tokens (counted by the engine's tokenizer) - the prefix a
  prefix cache computes once.
- `multi_sample`: a reasoning prompt (steps, then 'Answer: ...'); `num_samples` sampled paths per
  question are majority-voted. The prompt is shared by the question's samples.
- `multi_turn`: the questions about one image (consecutive after `arrange`, at most
  `workload.turns`) form a conversation. Turn t is sent once turn t-1 is answered, with the
  earlier questions and the model's own answers as history (the image sits in the first turn).
  `batch_size` conversations run side by side, one engine call per turn. Each turn is a request
  with its own timing; its `context_load_s` grows with the history it has to load.
`workload.images=false` leaves the image out of every prompt (text-only requests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import cycle, islice
from typing import Any

from sweeper.data.base import LoadedSample, Sample, image_source
from sweeper.engines.base import Engine, OnDone
from sweeper.requests import Completion, DecodingParams, Request, ServingParams
from sweeper.tasks import Task

_SYSTEM_INTRO = "You are a careful visual question answering assistant. Follow these rules."
_RULES = (
    "Look at the whole image before you answer.",
    "Name colors and shapes plainly.",
    "Give the shortest answer that is still correct.",
    "Answer yes or no when the question asks whether something is there.",
    "Count carefully when the question asks how many.",
    "Do not describe anything the question does not ask about.",
)


def synthetic_system_prompt(tokens: int, count_tokens: Callable[[str], int]) -> str:
    """A deterministic system prompt of the fewest words reaching `tokens` tokens."""
    rules = (f"Rule {n}: {rule}" for n, rule in enumerate(cycle(_RULES), start=1))
    words = _SYSTEM_INTRO.split()
    while count_tokens(" ".join(words)) < tokens:
        words.extend(" ".join(islice(rules, max(1, len(words) // 8))).split())
    low, high = 1, len(words)  # the shortest prefix of `words` with >= `tokens` tokens
    while low < high:
        middle = (low + high) // 2
        if count_tokens(" ".join(words[:middle])) >= tokens:
            high = middle
        else:
            low = middle + 1
    return " ".join(words[:low])


class Workload:
    """`single`, and the base of the others: one request per sample, sent as it comes."""

    reasoning = False  # ask for a reasoning path ending in 'Answer: ...' instead of an answer

    def __init__(self, cfg: Any, task: Task, system_prompt: str | None, engine: Engine):
        self.task = task
        self.images = cfg.images and task.takes_images
        self.system_prompt = system_prompt

    def arrange(self, samples: list[Sample]) -> list[Sample]:
        """The samples in the order the workload sends them."""
        return samples

    def request(self, item: LoadedSample, history: Sequence[tuple[str, str]] = ()) -> Request:
        """The request for `item` after the (question, answer) turns of `history`."""
        messages = self.task.messages(
            item.sample, history, self.system_prompt, self.reasoning, self.images
        )
        images = [item.image] if self.images and item.image is not None else []
        return Request(item.sample.question_id, messages, images, item.decode_s)

    def run(
        self,
        engine: Engine,
        items: Iterable[LoadedSample],
        decoding: DecodingParams,
        serving: ServingParams,
        on_done: OnDone | None = None,
    ) -> list[Completion]:
        """Answer every item through `engine.run` (its batching, static or continuous)."""
        return engine.run((self.request(item) for item in items), decoding, serving, on_done)


class SharedPrefixWorkload(Workload):
    def __init__(self, cfg: Any, task: Task, system_prompt: str | None, engine: Engine):
        super().__init__(cfg, task, system_prompt, engine)
        self.system_prompt = synthetic_system_prompt(cfg.system_prompt_tokens, engine.count_tokens)


class MultiSampleWorkload(Workload):
    reasoning = True


def _image_key(sample: Sample) -> str:
    image_id = sample.metadata.get("image_id")
    return str(image_id) if image_id is not None else image_source(sample)


class MultiTurnWorkload(Workload):
    def __init__(self, cfg: Any, task: Task, system_prompt: str | None, engine: Engine):
        super().__init__(cfg, task, system_prompt, engine)
        self.turns = cfg.turns

    def arrange(self, samples: list[Sample]) -> list[Sample]:
        """Questions about one image next to each other, images in order of first appearance."""
        groups: dict[str, list[Sample]] = {}
        for sample in samples:
            groups.setdefault(_image_key(sample), []).append(sample)
        return [sample for group in groups.values() for sample in group]

    def _conversations(self, items: Iterable[LoadedSample]) -> Iterator[list[LoadedSample]]:
        """Runs of consecutive items about one image, of at most `turns` items."""
        current: list[LoadedSample] = []
        for item in items:
            same = current and _image_key(current[0].sample) == _image_key(item.sample)
            if current and (not same or len(current) == self.turns):
                yield current
                current = []
            current.append(item)
        if current:
            yield current

    def run(
        self,
        engine: Engine,
        items: Iterable[LoadedSample],
        decoding: DecodingParams,
        serving: ServingParams,
        on_done: OnDone | None = None,
    ) -> list[Completion]:
        """`batch_size` conversations at a time; each turn's answers go into the next turn's
        history (the first returned sequence, as the model wrote it)."""
        completions: list[Completion] = []
        conversations = self._conversations(items)
        while group := list(islice(conversations, serving.batch_size)):
            histories: list[list[tuple[str, str]]] = [[] for _ in group]
            for turn in range(max(len(c) for c in group)):
                live = [index for index, c in enumerate(group) if turn < len(c)]
                # Each turn's sample shows the conversation's image (one image key).
                requests = [self.request(group[i][turn], histories[i]) for i in live]
                answered = engine.run(requests, decoding, serving, on_done)
                for i, completion in zip(live, answered, strict=True):
                    question = group[i][turn].sample.question
                    histories[i].append((question, completion.texts[0].strip()))
                completions.extend(answered)
        return completions
