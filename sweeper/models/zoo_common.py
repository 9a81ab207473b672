"""What every zoo folder shares: one small BPE vocabulary, tokenizers with an architecture's
special tokens, and the writing of a complete model folder.

The BPE is trained once per process on easy-VQA's text (plus the words chat templates write), so
prompts stay a few dozen tokens long; each architecture then adds its released checkpoint's special
tokens, under their released names, before or after that vocabulary as the real one has them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BPE_VOCAB_SIZE = 512
SEED = 0

# Text the chat templates and system prompts write, so that they tokenize into few tokens.
TEMPLATE_TEXT = [
    "system",
    "user",
    "assistant",
    "model",
    "User:",
    "Assistant:",
    "USER:",
    "ASSISTANT:",
    "You are a helpful assistant.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "Cutting Knowledge Date: December 2023",
    "Today Date: 26 Jul 2024",
    "answer en",
    "What color is the shape?",
    "Answer the question with a single word or phrase.",
]

# Names of the two transformers auto classes a zoo model is loaded with.
IMAGE_TEXT_TO_TEXT = "image-text-to-text"
CAUSAL_LM = "causal-lm"

# The shrunk shapes: 2 text layers of 128 (head size 32, the smallest vLLM's CPU attention has a
# kernel for), 2-layer vision towers of 64 (head size 32).
TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
SIGLIP = {
    "model_type": "siglip_vision_model",
    **VISION,
    "image_size": 56,
    "patch_size": 14,
    "vision_use_head": False,
}
HALF = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def corpus() -> list[str]:
    """All question and answer text of easy-VQA (train and test) and the template words."""
    import easy_vqa

    texts: list[str] = []
    for questions, answers, _ in (easy_vqa.get_train_questions(), easy_vqa.get_test_questions()):
        texts.extend(questions)
        texts.extend(answers)
    texts.extend(easy_vqa.get_answers())
    # Capitalised questions too: prompts are written as sentences.
    texts.extend(q[:1].upper() + q[1:] for q in easy_vqa.get_test_questions()[0][:2000])
    return texts + TEMPLATE_TEXT


@functools.lru_cache(maxsize=1)
def bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE (vocabulary, merges) trained on `corpus()`; trained once per process."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


@dataclass(frozen=True)
class TokenizerSpec:
    """An architecture's special tokens, named as in its released tokenizer_config.json."""

    leading: tuple[str, ...] = ()  # at ids 0.. (SentencePiece-style vocabularies: Gemma, Llama 2)
    trailing: tuple[str, ...] = ()  # appended after the BPE vocabulary (Qwen, Llama 3, Phi-4)
    plain: tuple[str, ...] = ()  # added tokens that are not special, appended last
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    # Model-specific named tokens the processor reads (image_token, boi_token, ...).
    named: dict[str, str] = field(default_factory=dict)
    add_bos: bool = (
        False  # the tokenizer itself prepends BOS (Llama, Gemma), as tokenizer.json has it
    )
    model_max_length: int = 4096


def build_tokenizer(spec: TokenizerSpec):
    """A fast byte-level BPE tokenizer: the shared vocabulary plus `spec`'s tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = bpe()
    offset = len(spec.leading)
    full = {token: i for i, token in enumerate(spec.leading)}
    full.update({token: i + offset for token, i in vocab.items()})
    backend = Tokenizer(models.BPE(vocab=full, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = list(spec.leading) + list(spec.trailing)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.plain])
    if spec.add_bos:
        bos_id = backend.token_to_id(spec.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos}:0 $A:0",
            pair=f"{spec.bos}:0 $A:0 {spec.bos}:1 $B:1",
            special_tokens=[(spec.bos, bos_id)],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token=spec.unk,
        extra_special_tokens=dict(spec.named) or None,
        model_max_length=spec.model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    missing = [
        t
        for t in specials + list(spec.named.values())
        if tokenizer.convert_tokens_to_ids(t) is None
    ]
    if missing:
        raise ValueError(f"tokens not in the vocabulary: {missing}")
    return tokenizer


def ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


@dataclass
class Recipe:
    """Everything a builder decides; `write_folder` turns it into files."""

    config: Any  # the architecture's PreTrainedConfig
    tokenizer: Any
    processor: Any | None  # None for a text-only model
    generation: dict  # generation_config.json of the released checkpoint (token ids remapped)
    chat_template: str | None
    template_in: str  # "processor", "tokenizer", "both" or "none": where the release keeps it
    tokenizer_template: str | None = None  # tokenizer_config.json's, where it differs (Phi-4)
    # Regex renames from the weight names transformers saves to the release's, where they differ.
    weight_renames: tuple[tuple[str, str], ...] = ()


# transformers 5.19 drops the `vision_model.` level of CLIP/SigLIP towers when it loads a
# LLaVA-style checkpoint but does not put it back when it saves one; the releases (and vLLM) have
# `vision_tower.vision_model.*`.
CLIP_TOWER_NAMES = ((r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),)


def rename_weights(path: Path, renames: tuple[tuple[str, str], ...]) -> None:
    import re

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        tensors = {}
        for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
            new = key
            for pattern, replacement in renames:
                new = re.sub(pattern, replacement, new)
            tensors[new] = f.get_tensor(key)
    save_file(tensors, path, metadata=metadata)


def write_folder(recipe: Recipe, auto_class: str, out: Path, provenance: dict) -> Path:
    """Random weights (seeded) as safetensors, configs, tokenizer, processor and template files."""
    import torch
    import transformers
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        GenerationConfig,
    )

    auto = AutoModelForImageTextToText if auto_class == IMAGE_TEXT_TO_TEXT else AutoModelForCausalLM
    out.mkdir(parents=True, exist_ok=True)
    recipe.config.dtype = torch.float32
    torch.manual_seed(SEED)
    model = auto.from_config(recipe.config, dtype=torch.float32)
    model.generation_config = GenerationConfig(**recipe.generation)
    model.save_pretrained(out)
    if recipe.weight_renames:
        rename_weights(out / "model.safetensors", recipe.weight_renames)

    recipe.tokenizer.chat_template = None
    if recipe.processor is None:
        recipe.tokenizer.save_pretrained(out)
    else:
        recipe.processor.chat_template = None
        recipe.processor.save_pretrained(out)
        # The released folders' per-component files too, for readers that look for them by name.
        for attr in ("image_processor", "video_processor"):
            component = getattr(recipe.processor, attr, None)
            if component is not None:
                component.save_pretrained(out)

    template = recipe.chat_template
    if recipe.template_in in ("tokenizer", "both") or recipe.tokenizer_template:
        path = out / "tokenizer_config.json"
        tokenizer_config = json.loads(path.read_text())
        tokenizer_config["chat_template"] = recipe.tokenizer_template or template
        path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    if recipe.template_in in ("processor", "both"):
        # The legacy processor file (the released folders' chat_template.json): only the processor
        # reads it, so a processor-only template stays out of the tokenizer as in the release.
        blob = {"chat_template": template}
        (out / "chat_template.json").write_text(
            json.dumps(blob, indent=2, ensure_ascii=False) + "\n"
        )
    spec = {**provenance, "transformers_version": transformers.__version__}
    (out / "sweeper_spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    return out
