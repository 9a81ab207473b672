"""A request's chat rendered into the model's prompt and tokenized, one way for every engine.

The template, in this order (as `vllm serve --chat-template` overrides a checkpoint's):
`model.chat_template` when the user gives one (a Jinja string or file), the processor's, the
tokenizer's, else a small adapter for a `model_type` whose released checkpoint has none
(PaliGemma: its processor places the image tokens and BOS itself, so the prompt is the text).
Content goes to the template as the template reads it: as a list of parts when the template
loops over `message['content']` (how processors' templates place images), else as one string
(text LMs' templates), as vLLM's `--chat-template-content-format auto` decides.

Tokenizing: a template that writes BOS itself is not tokenized with special tokens again (no
double BOS), as transformers' processors do for `apply_chat_template(tokenize=True)`. Engines
that take token ids (vLLM, transformers' continuous batching) get `token_ids(text)`; engine=hf's
processor call gets the same `add_special_tokens`, so every engine sends the same prompt tokens
(image placeholders expanded by the engine's own processor).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from sweeper.config import ConfigError
from sweeper.models.info import ModelInfo

# model_type -> template, for released checkpoints without one.
ADAPTER_TEMPLATES = {
    # PaliGemma is prompted with plain text ("answer en <question>" and the like); its processor
    # (and vLLM's) put `<image>` x n, then BOS, before it and a newline after.
    "paligemma": (
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{% endif %}{% endfor %}"
    ),
}


def iterates_content(template: str) -> bool:
    """Whether the Jinja template loops over a message's content (a list of parts)."""
    import jinja2
    from jinja2 import nodes

    def names_content(node: nodes.Node) -> bool:
        return any(
            (
                isinstance(n, nodes.Getitem)
                and isinstance(n.arg, nodes.Const)
                and n.arg.value == "content"
            )
            or (isinstance(n, nodes.Getattr) and n.attr == "content")
            or (isinstance(n, nodes.Name) and n.name == "content")
            for n in [node, *node.find_all((nodes.Getitem, nodes.Getattr, nodes.Name))]
        )

    # transformers' `{% generation %}` blocks (assistant masks) wrap text, never loop over it.
    plain = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)
    tree = jinja2.Environment().parse(plain)
    return any(names_content(loop.iter) for loop in tree.find_all(nodes.For))


def _read_template(template: str) -> str:
    path = Path(template).expanduser()
    return path.read_text() if len(template) < 4096 and path.is_file() else template


class ChatPrompts:
    """The model's tokenizer and (for a model that takes images) processor, and its template."""

    def __init__(self, info: ModelInfo, chat_template: str | None = None):
        from transformers import AutoProcessor, AutoTokenizer

        self.info = info
        self.processor: Any = None
        try:
            if info.takes_images:
                self.processor = AutoProcessor.from_pretrained(info.path)
                self.tokenizer = self.processor.tokenizer
            else:  # a text-only folder: AutoProcessor would be the tokenizer itself
                self.tokenizer = AutoTokenizer.from_pretrained(info.path)
        except ImportError as error:  # a processor's optional package (e.g. num2words)
            first = str(error).strip().splitlines()[0]
            allowed = f"a model whose processor loads: {first}"
            raise ConfigError("model.path", info.path, allowed) from None
        self.tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        if self.tokenizer.pad_token is None:  # Llama 3 ships none; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.template, self.template_source = self._template(chat_template)
        self.content_as_parts = iterates_content(self.template)
        # What a string-content template gets for an image part: the processor's placeholder.
        self.image_placeholder = getattr(self.processor, "image_token", None) or ""

    def _template(self, chat_template: str | None) -> tuple[str, str]:
        candidates = [
            ("model.chat_template", chat_template and _read_template(chat_template)),
            ("processor", getattr(self.processor, "chat_template", None)),
            ("tokenizer", self.tokenizer.chat_template),
            ("adapter", ADAPTER_TEMPLATES.get(self.info.model_type)),
        ]
        for source, template in candidates:
            if isinstance(template, str) and template:
                return template, source
        raise ConfigError(
            "model.chat_template",
            chat_template,
            f"a Jinja chat template (a string or a file): {self.info.path} has none in its "
            "processor or tokenizer",
        )

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def _as_template_reads(self, messages: list[dict]) -> list[dict]:
        if self.content_as_parts:
            return messages
        flat = []
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                content = "".join(
                    self.image_placeholder if part["type"] == "image" else part["text"]
                    for part in content
                )
            flat.append({**message, "content": content})
        return flat

    def text(self, messages: list[dict]) -> str:
        """The prompt text of a chat, ending with the assistant's turn opened."""
        return self.tokenizer.apply_chat_template(
            self._as_template_reads(messages),
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=True,
        )

    def add_special_tokens(self, text: str) -> bool:
        """False when the rendered prompt already starts with BOS."""
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def token_ids(self, text: str) -> list[int]:
        """The prompt's token ids, image placeholders not expanded."""
        return self.tokenizer(text, add_special_tokens=self.add_special_tokens(text))["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, sequences: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=True)


@functools.cache
def chat_prompts(info: ModelInfo, chat_template: str | None = None) -> ChatPrompts:
    """One per model and template in a process: preflight checks the template, the engine uses
    the same object."""
    return ChatPrompts(info, chat_template)
