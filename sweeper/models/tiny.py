"""Build tiny Qwen2.5-VL-architecture models offline: tokenizer, processor and weights.

The models are real `Qwen2_5_VLForConditionalGeneration` checkpoints (the class users load for
Qwen2.5-VL-7B), shrunk so they run on two CPU cores. Nothing is downloaded: the BPE vocabulary is
trained on easy-VQA's own text and the chat template follows Qwen2.5-VL's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sweeper.models import cached_build
from sweeper.tasks.base import ANSWER_INSTRUCTION

# Qwen2.5-VL's special tokens in their official order (ids 151643-151664 in the real vocabulary).
QWEN2_5_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]

# Qwen2.5-VL's chat template, reduced to text and image content (no video, no tools).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyVLMSpec:
    """Shape of a tiny Qwen2.5-VL. Defaults give ~1 M parameters and 16 image tokens."""

    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    vision_hidden: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 128
    image_size: int = 112  # square side after resizing; (size/28)^2 image tokens
    bpe_vocab_size: int = 400
    seed: int = 0
    extra_corpus: tuple[str, ...] = field(default_factory=tuple)

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def easy_vqa_corpus() -> list[str]:
    """All question and answer text of easy-VQA (train and test), for the BPE vocabulary."""
    import easy_vqa

    texts: list[str] = []
    for questions, answers, _ in (easy_vqa.get_train_questions(), easy_vqa.get_test_questions()):
        texts.extend(questions)
        texts.extend(answers)
    texts.extend(easy_vqa.get_answers())
    texts.extend([ANSWER_INSTRUCTION, "You are a helpful assistant."])
    return texts


def build_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE (as Qwen's) trained on `corpus`, with Qwen2.5-VL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN2_5_VL_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=4096,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer, image_size: int):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    pixels = image_size * image_size
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def media_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The Qwen2_5_VLConfig arguments naming the image, video and vision-span tokens, from the
    special tokens' ids in a tokenizer."""
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def build_config(spec: TinyVLMSpec, tokenizer):
    from transformers import Qwen2_5_VLConfig

    head_dim = spec.text_hidden // spec.text_heads
    # M-RoPE splits head_dim/2 rotary frequencies over (temporal, height, width) like 16/24/24.
    half = head_dim // 2
    mrope = [half // 4, (half - half // 4) // 2]
    mrope.append(half - sum(mrope))
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN2_5_VL_SPECIAL_TOKENS}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": True,
    }
    vision_config = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_intermediate,
        "num_heads": spec.vision_heads,
        "out_hidden_size": spec.text_hidden,
        "fullatt_block_indexes": [spec.vision_depth - 1],
        "window_size": 112,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        **media_token_ids(ids),
        tie_word_embeddings=True,
    )


def build_tiny_vlm(
    out_dir: str | Path,
    spec: TinyVLMSpec | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
) -> Path:
    """Write a random-weight Qwen2.5-VL of `spec`'s shape (model, tokenizer, processor).

    `device="cuda"` initialises large shapes in seconds where a CPU takes minutes.
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    spec = spec or TinyVLMSpec()
    out = Path(out_dir)
    tokenizer = build_tokenizer(easy_vqa_corpus() + list(spec.extra_corpus), spec.bpe_vocab_size)
    processor = build_processor(tokenizer, spec.image_size)
    config = build_config(spec, tokenizer)
    config.dtype = getattr(torch, dtype)
    torch.manual_seed(spec.seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        bos_token_id=config.text_config.bos_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "sweeper_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out


def cached_tiny_vlm(cache_dir: str | Path, spec: TinyVLMSpec | None = None) -> Path:
    """Path of the tiny model for `spec`, built on first use and cached by its fingerprint."""
    spec = spec or TinyVLMSpec()
    target = Path(cache_dir).expanduser() / f"tiny-qwen2_5_vl-{spec.fingerprint()}"
    return cached_build(target, lambda folder: build_tiny_vlm(folder, spec))
