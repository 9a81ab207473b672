"""Zoo builders on Qwen vocabularies: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL (HF-native),
LLaVA-OneVision and the Qwen2.5 text LM.

Each returns a `Recipe`: the released config shrunk (2 text layers of 128, head size 32, a 2-layer
vision tower of 64), the released special tokens, processor settings with tiny image sizes and
generation_config values (token ids in the zoo vocabulary, sampling defaults as released).
"""

from __future__ import annotations

from sweeper.models import zoo_templates as templates
from sweeper.models.tiny import QWEN2_5_VL_SPECIAL_TOKENS
from sweeper.models.zoo_common import (
    CLIP_TOWER_NAMES,
    TEXT,
    Recipe,
    TokenizerSpec,
    build_tokenizer,
    ids,
)

# Qwen2.5's added tokens in the released order; from <tool_call> on they are not special.
_TOOL_CALL = QWEN2_5_VL_SPECIAL_TOKENS.index("<tool_call>")
QWEN_SPECIAL = tuple(QWEN2_5_VL_SPECIAL_TOKENS[:_TOOL_CALL])
QWEN_PLAIN = tuple(QWEN2_5_VL_SPECIAL_TOKENS[_TOOL_CALL:])
QWEN3_PLAIN = QWEN_PLAIN + ("<tool_response>", "</tool_response>", "<think>", "</think>")


def qwen_tokenizer(plain=QWEN_PLAIN, extra=(), named=None):
    return build_tokenizer(
        TokenizerSpec(
            trailing=QWEN_SPECIAL + tuple(extra),
            plain=plain,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            named=named or {},
            model_max_length=32768,
        )
    )


def qwen_generation(tokenizer, **sampling) -> dict:
    endoftext, im_end = ids(tokenizer, "<|endoftext|>", "<|im_end|>")
    return {
        "bos_token_id": endoftext,
        "pad_token_id": endoftext,
        "eos_token_id": [im_end, endoftext],
        **sampling,
    }


def _vision_ids(tokenizer) -> dict:
    image, video, start, end = ids(
        tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    return {
        "image_token_id": image,
        "video_token_id": video,
        "vision_start_token_id": start,
        "vision_end_token_id": end,
    }


def _mrope(head_dim: int, split=(1, 1.5, 1.5)) -> list[int]:
    """M-RoPE's split of head_dim/2 frequencies over (t, h, w), in the released proportions."""
    half = head_dim // 2
    t = round(half * split[0] / sum(split))
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qwen_vl(version: str) -> Recipe:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = qwen_tokenizer()
    endoftext, im_end = ids(tokenizer, "<|endoftext|>", "<|im_end|>")
    text = {
        **TEXT,
        "vocab_size": len(tokenizer),
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope(32)},
        "bos_token_id": endoftext,
        "eos_token_id": im_end,
    }
    if version == "2":  # Qwen2-VL-7B-Instruct: embed_dim 1280, merger out = text hidden
        vision = {"depth": 2, "embed_dim": 64, "hidden_size": 128, "mlp_ratio": 2, "num_heads": 2}
        config_class, processor_class = Qwen2VLConfig, Qwen2VLProcessor
    else:  # Qwen2.5-VL-7B-Instruct: windowed attention but in the full-attention blocks
        vision = {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": 128,
            "fullatt_block_indexes": [1],
            "window_size": 112,
        }
        config_class, processor_class = Qwen2_5_VLConfig, Qwen2_5_VLProcessor
    config = config_class(text_config=text, vision_config=vision, **_vision_ids(tokenizer))
    # 28x28 pixels per image token; min 4, max 16 tokens (the release: 4 to 16384).
    pixels = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
    )
    sampling = {"do_sample": True, "temperature": 0.1, "top_p": 0.001, "top_k": 1}
    if version == "2.5":
        sampling["repetition_penalty"] = 1.05
    template = templates.QWEN2_VL if version == "2" else templates.QWEN2_5_VL
    return Recipe(
        config, tokenizer, processor, qwen_generation(tokenizer, **sampling), template, "both"
    )


def qwen2_vl() -> Recipe:
    return _qwen_vl("2")


def qwen2_5_vl() -> Recipe:
    return _qwen_vl("2.5")


def qwen3_vl() -> Recipe:
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = qwen_tokenizer(plain=QWEN3_PLAIN)
    endoftext, im_end = ids(tokenizer, "<|endoftext|>", "<|im_end|>")
    text = {
        **TEXT,
        "head_dim": 32,
        "vocab_size": len(tokenizer),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": _mrope(32, (24, 20, 20)),
            "mrope_interleaved": True,
        },
        "bos_token_id": endoftext,
        "eos_token_id": im_end,
    }
    # Qwen3-VL-8B: a 27-block SigLIP-2 ViT (patch 16, 48x48 learned positions), DeepStack
    # features of blocks 8/16/24 added into the first LM layers.
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 128,
        "patch_size": 16,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [1],
    }
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_vision_ids(tokenizer))
    # 32x32 pixels per image token; 4 to 16 tokens (the release: 64 to 16384).
    size = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}
    norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "patch_size": 16}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **norm),
        video_processor=Qwen3VLVideoProcessor(size=size, **norm),
        tokenizer=tokenizer,
    )
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    generation = qwen_generation(tokenizer, **sampling, repetition_penalty=1.0)
    return Recipe(config, tokenizer, processor, generation, templates.QWEN3_VL, "both")


def internvl() -> Recipe:
    """OpenGVLab/InternVL3-1B-hf: an InternViT (448 px tiles, patch 14, pixel shuffle 0.5) and a
    Qwen2.5 LM; the Qwen2.5-VL tokenizer plus <img>, </img>, <IMG_CONTEXT> and grounding tokens."""
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    extra = (
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<quad>",
        "</quad>",
        "<ref>",
        "</ref>",
        "<box>",
        "</box>",
        "<video>",
    )
    tokenizer = qwen_tokenizer(extra=extra, named=named)
    endoftext, im_end, context = ids(tokenizer, "<|endoftext|>", "<|im_end|>", "<IMG_CONTEXT>")
    text = {
        "model_type": "qwen2",
        **TEXT,
        "vocab_size": len(tokenizer),
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "bos_token_id": endoftext,
        "eos_token_id": im_end,
        "tie_word_embeddings": True,
    }
    vision = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": [56, 56],
        "patch_size": [14, 14],
    }
    # A 56 px tile is 4x4 patches, 2x2 = 4 tokens after the pixel shuffle.
    config = InternVLConfig(
        text_config=text, vision_config=vision, image_token_id=context, image_seq_length=4
    )
    imagenet = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    tile = {"height": 56, "width": 56}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=tile, max_patches=12, **imagenet),
        video_processor=InternVLVideoProcessor(size=tile, **imagenet),
        tokenizer=tokenizer,
        image_seq_length=4,
    )
    generation = {"bos_token_id": endoftext, "eos_token_id": im_end, "pad_token_id": endoftext}
    return Recipe(config, tokenizer, processor, generation, templates.INTERNVL, "both")


def llava_onevision() -> Recipe:
    """llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP (384 px, patch 14) with anyres tiling
    and a Qwen2 LM; <image>/<video> appended to Qwen2's vocabulary."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    tokenizer = build_tokenizer(
        TokenizerSpec(
            trailing=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"),
            eos="<|im_end|>",
            pad="<|endoftext|>",
            named={"image_token": "<image>", "video_token": "<video>"},
            model_max_length=32768,
        )
    )
    endoftext, im_end, image, video = ids(
        tokenizer, "<|endoftext|>", "<|im_end|>", "<image>", "<video>"
    )
    text = {
        "model_type": "qwen2",
        **TEXT,
        "vocab_size": len(tokenizer),
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "bos_token_id": endoftext,
        "eos_token_id": im_end,
        "tie_word_embeddings": True,
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
        "vision_use_head": False,
    }
    # The release's 36 pinpoints are the 1x1..6x6 grids of 384 px tiles, a small image fits one
    # tile; here 1x1, 1x2 and 2x1 grids of 56 px: 36 tokens for a square image, 52 for others.
    pinpoints = [[56, 56], [56, 112], [112, 56]]
    config = LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=image,
        video_token_index=video,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=True,
    )
    size = {"height": 56, "width": 56}
    norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=pinpoints, **norm
        ),
        video_processor=LlavaOnevisionVideoProcessor(size=size, **norm),
        tokenizer=tokenizer,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
    )
    generation = {"bos_token_id": endoftext, "eos_token_id": im_end, "pad_token_id": endoftext}
    return Recipe(
        config,
        tokenizer,
        processor,
        generation,
        templates.LLAVA_ONEVISION,
        "processor",
        weight_renames=CLIP_TOWER_NAMES,
    )


def qwen2_5_text() -> Recipe:
    """Qwen/Qwen2.5-0.5B-Instruct (Qwen2ForCausalLM), tied embeddings as released."""
    from transformers import Qwen2Config

    tokenizer = qwen_tokenizer()
    endoftext, im_end = ids(tokenizer, "<|endoftext|>", "<|im_end|>")
    config = Qwen2Config(
        **TEXT,
        vocab_size=len(tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=endoftext,
        eos_token_id=im_end,
        tie_word_embeddings=True,
    )
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    generation = qwen_generation(tokenizer, **sampling, repetition_penalty=1.05)
    return Recipe(config, tokenizer, None, generation, templates.QWEN2_5, "tokenizer")
