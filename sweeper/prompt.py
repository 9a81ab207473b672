"""The VQA prompt every engine sends: one image, the question, a short-answer instruction."""

from __future__ import annotations

ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."


def vqa_messages(question: str, system_prompt: str | None = None) -> list[dict]:
    """Chat messages for one question about one image (the image goes before the text)."""
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append(
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": f"{question}\n{ANSWER_INSTRUCTION}"},
            ],
        }
    )
    return messages


def extract_answer(text: str) -> str:
    """The answer in a generated text: its first line, without surrounding space or a final '.'."""
    line = text.strip().split("\n", 1)[0].strip()
    return line[:-1].rstrip() if line.endswith(".") else line
