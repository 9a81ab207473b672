"""Workloads: how a trial's dataset questions become requests, the same for every engine.

A workload sets each `LoadedSample.messages` (the chat to send) and drives `Engine.run`; engines
only send what they are given (`request_messages`). The four (config group `workload`):
- `single`: one question per image, the plain VQA prompt.
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

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import cycle, islice
from typing import Any

from sweeper.data.base import LoadedSample, VQASample, image_source
from sweeper.engines.base import Completion, DecodingParams, Engine
from sweeper.prompt import ANSWER_INSTRUCTION, REASONING_INSTRUCTION, vqa_messages

_SYSTEM_INTRO = "You are a careful visual question answering assistant. Follow these rules."
_RULES = (
    "Look at the whole image before you answer.",
    "Name colors and shapes plainly.",
    "Give the shortest answer that is still correct.",
    "Answer yes or no when the question asks whether something is there.",
    "Count carefully when the question asks how many.",
    "Do not describe anything the question does not ask about.",
)


def request_messages(item: LoadedSample, decoding: DecodingParams) -> list[dict]:
    """The chat an engine sends for `item`: the workload's, else the plain VQA prompt."""
    if item.messages is not None:
        return item.messages
    return vqa_messages(item.sample.question, decoding.system_prompt)


def has_image(messages: list[dict]) -> bool:
    return any(
        isinstance(m["content"], list) and any(part.get("type") == "image" for part in m["content"])
        for m in messages
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


@dataclass
class Workload:
    """`single`, and the base of the others: one request per sample, sent as it comes."""

    images: bool = True
    system_prompt: str | None = None
    instruction: str = ANSWER_INSTRUCTION

    def arrange(self, samples: list[VQASample]) -> list[VQASample]:
        """The samples in the order the workload sends them."""
        return samples

    def messages(self, sample: VQASample, history: list[tuple[str, str]]) -> list[dict]:
        """The chat for `sample` after the (question, answer) turns of `history`."""
        questions = [question for question, _ in history] + [sample.question]
        messages = vqa_messages(questions[0], self.system_prompt, self.instruction, self.images)
        for (_, answer), question in zip(history, questions[1:], strict=True):
            messages.append({"role": "assistant", "content": answer})
            text = f"{question}\n{self.instruction}"
            messages.append({"role": "user", "content": [{"type": "text", "text": text}]})
        return messages

    def run(
        self,
        engine: Engine,
        items: Iterable[LoadedSample],
        decoding: DecodingParams,
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Answer every item through `engine.run` (its batching, static or continuous)."""
        prepared = (replace(item, messages=self.messages(item.sample, [])) for item in items)
        return engine.run(prepared, decoding, batch_size, on_batch)


def _image_key(sample: VQASample) -> str:
    image_id = sample.metadata.get("image_id")
    return str(image_id) if image_id is not None else image_source(sample)


@dataclass
class MultiTurnWorkload(Workload):
    turns: int = 3

    def arrange(self, samples: list[VQASample]) -> list[VQASample]:
        """Questions about one image next to each other, images in order of first appearance."""
        groups: dict[str, list[VQASample]] = {}
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
        batch_size: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """`batch_size` conversations at a time; each turn's answers go into the next turn's
        history (the first returned sequence, as the model wrote it)."""
        completions: list[Completion] = []
        conversations = self._conversations(items)
        while group := list(islice(conversations, batch_size)):
            histories: list[list[tuple[str, str]]] = [[] for _ in group]
            for turn in range(max(len(c) for c in group)):
                live = [index for index, c in enumerate(group) if turn < len(c)]
                requests = [
                    replace(
                        group[i][turn],
                        messages=self.messages(group[i][turn].sample, histories[i]),
                    )
                    for i in live
                ]
                answered = engine.run(requests, decoding, batch_size, on_batch)
                for i, request, completion in zip(live, requests, answered, strict=True):
                    histories[i].append((request.sample.question, completion.texts[0].strip()))
                completions.extend(answered)
        return completions


def build_workload(trial: Any, engine: Engine) -> Workload:
    """The trial's workload; `shared_prefix` sizes its system prompt with the engine's tokenizer."""
    cfg = trial.workload
    common: dict[str, Any] = {"images": cfg.images, "system_prompt": trial.system_prompt}
    if cfg.name == "shared_prefix":
        common["system_prompt"] = synthetic_system_prompt(
            cfg.system_prompt_tokens, engine.count_tokens
        )
    if cfg.name == "multi_sample":
        return Workload(instruction=REASONING_INSTRUCTION, **common)
    if cfg.name == "multi_turn":
        return MultiTurnWorkload(turns=cfg.turns, **common)
    return Workload(**common)
