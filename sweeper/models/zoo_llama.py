"""Zoo builders on Llama 3 vocabularies: Idefics3, Llama-3.2-Vision (mllama) and the Llama-3.2
text LM. Shapes: `zoo_common.TEXT` / `VISION`.
"""

from __future__ import annotations

from sweeper.models import zoo_templates as templates
from sweeper.models.zoo_common import (
    CLIP_MEAN,
    CLIP_STD,
    HALF,
    TEXT,
    VISION,
    Recipe,
    TokenizerSpec,
    build_tokenizer,
    ids,
)
from sweeper.models.zoo_others import GRID_TAGS

LLAMA3_SPECIAL = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def idefics3() -> Recipe:
    """HuggingFaceM4/Idefics3-8B-Llama3: SigLIP (364 px, patch 14) pixel-shuffled by 2 to 169
    tokens per sub-image, images split into a grid of sub-images plus a global one; Llama 3.1.
    Here 56 px sub-images of 4 tokens, images resized to at most 112 px (2x2 + global)."""
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    tokenizer = build_tokenizer(
        TokenizerSpec(
            trailing=LLAMA3_SPECIAL
            + GRID_TAGS
            + ("<fake_token_around_image>", "<image>", "<end_of_utterance>"),
            bos="<|begin_of_text|>",
            eos="<|end_of_text|>",
            pad="<|reserved_special_token_0|>",
            add_bos=True,
        )
    )
    bos, eos, pad, image, utterance = ids(
        tokenizer,
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<image>",
        "<end_of_utterance>",
    )
    text = {
        "model_type": "llama",
        **TEXT,
        "vocab_size": len(tokenizer),
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    vision = {**VISION, "image_size": 56, "patch_size": 14}
    config = Idefics3Config(
        text_config=text,
        vision_config=vision,
        image_token_id=image,
        scale_factor=2,
        pad_token_id=pad,
    )
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            size={"longest_edge": 112}, max_image_size={"longest_edge": 56}, **HALF
        ),
        tokenizer=tokenizer,
        image_seq_len=4,
    )
    generation = {"bos_token_id": bos, "eos_token_id": [eos, utterance], "pad_token_id": pad}
    return Recipe(config, tokenizer, processor, generation, templates.IDEFICS3, "processor")


def mllama() -> Recipe:
    """meta-llama/Llama-3.2-11B-Vision-Instruct: a tiled ViT (560 px tiles, up to 4) read by
    cross-attention layers; one <|image|> token per image, id = text vocab_size (the embedding
    has 8 rows more). Here 56 px tiles and 3 text layers, the middle one cross-attention."""
    from transformers import MllamaConfig, MllamaImageProcessor, MllamaProcessor

    tokenizer = build_tokenizer(
        TokenizerSpec(
            trailing=LLAMA3_SPECIAL + ("<|image|>",),
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            pad="<|finetune_right_pad_id|>",
            add_bos=True,
            model_max_length=131072,
        )
    )
    bos, pad, end, eom, eot, image = ids(
        tokenizer,
        "<|begin_of_text|>",
        "<|finetune_right_pad_id|>",
        "<|end_of_text|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|image|>",
    )
    assert image == len(tokenizer) - 1
    text = {
        **TEXT,
        "num_hidden_layers": 3,
        "cross_attention_layers": [1],
        "vocab_size": image,
        "max_position_embeddings": 131072,
        "rope_parameters": LLAMA3_ROPE,
        "bos_token_id": bos,
        "eos_token_id": end,
        "pad_token_id": pad,
    }
    vision = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_global_layers": 1,
        "attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
        "max_num_tiles": 4,
        "intermediate_layers_indices": [0],
        "vision_output_dim": 128,
    }
    config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=image)
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessor(
            size={"height": 56, "width": 56},
            max_image_tiles=4,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ),
        tokenizer=tokenizer,
    )
    generation = {
        "bos_token_id": bos,
        "eos_token_id": [end, eom, eot],
        "pad_token_id": pad,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
    }
    return Recipe(config, tokenizer, processor, generation, templates.MLLAMA, "both")


def llama3_2_text() -> Recipe:
    """meta-llama/Llama-3.2-1B-Instruct (LlamaForCausalLM): tied embeddings, llama3 RoPE scaling,
    BOS added by the tokenizer and written by the template (as released)."""
    from transformers import LlamaConfig

    tokenizer = build_tokenizer(
        TokenizerSpec(
            trailing=LLAMA3_SPECIAL,
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            add_bos=True,
            model_max_length=131072,
        )
    )
    bos, end, eom, eot = ids(
        tokenizer, "<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"
    )
    config = LlamaConfig(
        **{**TEXT, "max_position_embeddings": 131072},
        vocab_size=len(tokenizer),
        rope_parameters=LLAMA3_ROPE,
        rms_norm_eps=1e-5,
        bos_token_id=bos,
        eos_token_id=[end, eom, eot],
        tie_word_embeddings=True,
    )
    generation = {
        "bos_token_id": bos,
        "eos_token_id": [end, eom, eot],
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
    }
    return Recipe(config, tokenizer, None, generation, templates.LLAMA3_2, "tokenizer")
