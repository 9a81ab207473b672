"""The VQA prompt every engine sends: one image, the question, a short-answer instruction."""

from __future__ import annotations

ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
# workload=multi_sample: a reasoning path per sample, its answer on a last line of its own.
REASONING_INSTRUCTION = (
    "Think step by step, then give the final answer on a last line as 'Answer: <word or phrase>'."
)
_ANSWER_PREFIX = "answer:"


def vqa_messages(
    question: str,
    system_prompt: str | None = None,
    instruction: str = ANSWER_INSTRUCTION,
    image: bool = True,
) -> list[dict]:
    """Chat messages for one question about one image (the image goes before the text);
    `image=False` leaves the image out (a text-only prompt)."""
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append(
        {
            "role": "user",
            "content": [
                *([{"type": "image"}] if image else []),
                {"type": "text", "text": f"{question}\n{instruction}"},
            ],
        }
    )
    return messages


def extract_answer(text: str) -> str:
    """The answer in a generated text: what follows its last 'Answer:' (a reasoning path), else its
    first line; without surrounding space or a final '.'."""
    at = text.lower().rfind(_ANSWER_PREFIX)
    if at >= 0:
        text = text[at + len(_ANSWER_PREFIX) :]
    line = text.strip().split("\n", 1)[0].strip()
    return line[:-1].rstrip() if line.endswith(".") else line
