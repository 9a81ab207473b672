"""Zoo builders on Gemma, Llama 2, SmolLM and Phi vocabularies: Gemma 3, PaliGemma, LLaVA-1.5,
SmolVLM2 and Phi-4-multimodal. Shapes: `zoo_common.TEXT` / `VISION`.
"""

from __future__ import annotations

from sweeper.models import zoo_templates as templates
from sweeper.models.zoo_common import (
    CLIP_MEAN,
    CLIP_STD,
    CLIP_TOWER_NAMES,
    HALF,
    SIGLIP,
    TEXT,
    VISION,
    Recipe,
    TokenizerSpec,
    build_tokenizer,
    ids,
)

GEMMA_LEADING = ("<pad>", "<eos>", "<bos>", "<unk>")
# Gemma's vocabulary has runs of newlines as single pieces (vLLM's Gemma 3 and PaliGemma code looks
# "\n" and "\n\n" up by their text); a byte-level BPE spells them "Ċ", so they are added as such.
GEMMA_NEWLINES = ("\n", "\n\n", "\n\n\n", "\n\n\n\n")
# Idefics3/SmolVLM image-splitting tags, named as the processors write them.
GRID_TAGS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)) + (
    "<global-img>",
)


def gemma3() -> Recipe:
    """google/gemma-3-4b-it: SigLIP (896 px, patch 14) average-pooled to 256 tokens, 5 sliding
    layers to 1 global; here 56 px, 4x4 patches pooled to 2x2 = 4 tokens, 1 sliding to 1 global."""
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

    tokenizer = build_tokenizer(
        TokenizerSpec(
            leading=GEMMA_LEADING + ("<mask>", "[multimodal]"),
            plain=GEMMA_NEWLINES,
            trailing=(
                "<start_of_turn>",
                "<end_of_turn>",
                "<start_of_image>",
                "<end_of_image>",
                "<image_soft_token>",
            ),
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            unk="<unk>",
            named={
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>",
            },
            add_bos=True,
            model_max_length=131072,
        )
    )
    pad, eos, bos, end_of_turn, boi, eoi, image = ids(
        tokenizer,
        "<pad>",
        "<eos>",
        "<bos>",
        "<end_of_turn>",
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
    )
    text = {
        **TEXT,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "vocab_size": len(tokenizer),
        "sliding_window": 32,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "pad_token_id": pad,
        "eos_token_id": eos,
        "bos_token_id": bos,
    }
    config = Gemma3Config(
        text_config=text,
        vision_config=SIGLIP,
        mm_tokens_per_image=4,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=image,
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 56, "width": 56}, **HALF),
        tokenizer=tokenizer,
        image_seq_length=4,
    )
    generation = {
        "bos_token_id": bos,
        "pad_token_id": pad,
        "eos_token_id": [eos, end_of_turn],
        "do_sample": True,
        "top_k": 64,
        "top_p": 0.95,
    }
    return Recipe(
        config,
        tokenizer,
        processor,
        generation,
        templates.GEMMA3,
        "both",
        weight_renames=CLIP_TOWER_NAMES,
    )


def paligemma() -> Recipe:
    """google/paligemma-3b-mix-224: SigLIP (224 px, patch 14, 256 tokens) and Gemma 2B; no chat
    template: the processor writes <image>*N + BOS + prompt + newline."""
    from transformers import PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessor

    locations = tuple(f"<loc{i:04d}>" for i in range(1024))
    segments = tuple(f"<seg{i:03d}>" for i in range(128))
    tokenizer = build_tokenizer(
        TokenizerSpec(
            leading=GEMMA_LEADING,
            trailing=("<image>",),
            plain=GEMMA_NEWLINES + locations + segments,
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            unk="<unk>",
            named={"image_token": "<image>"},
            add_bos=True,
            model_max_length=8192,
        )
    )
    pad, eos, bos, image = ids(tokenizer, "<pad>", "<eos>", "<bos>", "<image>")
    text = {
        "model_type": "gemma",
        **TEXT,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "vocab_size": len(tokenizer),
        "pad_token_id": pad,
        "eos_token_id": eos,
        "bos_token_id": bos,
    }
    config = PaliGemmaConfig(
        text_config=text,
        vision_config=SIGLIP,
        image_token_index=image,
        vocab_size=len(tokenizer),
        projection_dim=128,
        hidden_size=128,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=bos,
    )
    image_processor = SiglipImageProcessor(
        size={"height": 56, "width": 56}, resample=3, image_seq_length=16, **HALF
    )
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    return Recipe(
        config, tokenizer, processor, generation, None, "none", weight_renames=CLIP_TOWER_NAMES
    )


def llava() -> Recipe:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 (576 tokens, CLS dropped) and Vicuna-7B (Llama 2
    vocabulary, BOS added by the tokenizer); here 56 px, 16 tokens, multi-head attention."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor

    tokenizer = build_tokenizer(
        TokenizerSpec(
            leading=("<unk>", "<s>", "</s>"),
            trailing=("<image>", "<pad>"),
            bos="<s>",
            eos="</s>",
            pad="<pad>",
            unk="<unk>",
            named={"image_token": "<image>"},
            add_bos=True,
        )
    )
    bos, eos, image, pad = ids(tokenizer, "<s>", "</s>", "<image>", "<pad>")
    text = {
        "model_type": "llama",
        **TEXT,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(tokenizer),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    vision = {
        "model_type": "clip_vision_model",
        **VISION,
        "image_size": 56,
        "patch_size": 14,
        "projection_dim": 64,
        "hidden_act": "quick_gelu",
    }
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=image,
        image_seq_length=16,
        pad_token_id=pad,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 56},
            crop_size={"height": 56, "width": 56},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    return Recipe(
        config,
        tokenizer,
        processor,
        generation,
        templates.LLAVA_1_5,
        "processor",
        weight_renames=CLIP_TOWER_NAMES,
    )


def smolvlm() -> Recipe:
    """HuggingFaceTB/SmolVLM2-2.2B-Instruct (model_type smolvlm): Idefics3's design on SmolLM2;
    BOS <|im_start|> written by the template, EOS <end_of_utterance>. Here 64 px sub-images
    (patch 16) of 4 tokens, images resized to at most 128 px."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    tokenizer = build_tokenizer(
        TokenizerSpec(
            leading=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            trailing=("<fake_token_around_image>", "<image>") + GRID_TAGS + ("<end_of_utterance>",),
            bos="<|im_start|>",
            eos="<end_of_utterance>",
            pad="<|im_end|>",
            unk="<|endoftext|>",
            named={
                "fake_image_token": "<fake_token_around_image>",
                "image_token": "<image>",
                "end_of_utterance_token": "<end_of_utterance>",
                "global_image_token": "<global-img>",
            },
            model_max_length=8192,
        )
    )
    bos, eos, pad, image = ids(
        tokenizer, "<|im_start|>", "<end_of_utterance>", "<|im_end|>", "<image>"
    )
    text = {
        "model_type": "llama",
        **TEXT,
        "num_key_value_heads": 4,
        "vocab_size": len(tokenizer),
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 130000.0},
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "tie_word_embeddings": False,
    }
    vision = {**VISION, "image_size": 64, "patch_size": 16}
    config = SmolVLMConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=image,
        scale_factor=2,
        pad_token_id=pad,
    )
    size = {"longest_edge": 128}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(
            size=size, max_image_size={"longest_edge": 64}, **HALF
        ),
        video_processor=SmolVLMVideoProcessor(
            size=size, max_image_size={"longest_edge": 64}, **HALF
        ),
        tokenizer=tokenizer,
        image_seq_len=4,
    )
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    return Recipe(config, tokenizer, processor, generation, templates.SMOLVLM, "both")


def phi4_multimodal() -> Recipe:
    """microsoft/Phi-4-multimodal-instruct in the transformers format (Phi4MultimodalForCausalLM,
    loaded by AutoModelForCausalLM): SigLIP crops and a conformer audio encoder beside Phi-4-mini.
    The image processor hard-codes 448 px crops (256 + 16 tokens for the global view), so the
    crop size stays 448 here: ~545 tokens per easy-VQA image, through a 64-wide tower."""
    from transformers import (
        Phi4MultimodalConfig,
        Phi4MultimodalFeatureExtractor,
        Phi4MultimodalImageProcessor,
        Phi4MultimodalProcessor,
    )

    tokenizer = build_tokenizer(
        TokenizerSpec(
            trailing=(
                "<|endoftext|>",
                "<|image|>",
                "<|audio|>",
                "<|assistant|>",
                "<|end|>",
                "<|user|>",
                "<|system|>",
                "<|tool|>",
                "<|/tool|>",
                "<|tool_call|>",
                "<|/tool_call|>",
                "<|tool_response|>",
                "<|tag|>",
            ),
            bos="<|endoftext|>",
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            unk="<|endoftext|>",
            named={"image_token": "<|image|>", "audio_token": "<|audio|>"},
            model_max_length=131072,
        )
    )
    endoftext, end, image, audio = ids(
        tokenizer, "<|endoftext|>", "<|end|>", "<|image|>", "<|audio|>"
    )
    rotary_half = int(32 * 0.75) // 2  # Phi-4-mini rotates 3/4 of each head
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75,
        "short_factor": [1.0] * rotary_half,
        "long_factor": [1.0 + i for i in range(rotary_half)],
        "original_max_position_embeddings": 4096,
    }
    vision = {
        **VISION,
        "image_size": 448,
        "patch_size": 14,
        "crop_size": 448,
        "image_token_id": image,
        "feature_layer": -2,
    }
    audio_config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_blocks": 1,
        "num_attention_heads": 2,
        "ext_pw_out_channel": 64,
        "depthwise_separable_out_channel": 64,
        "nemo_conv_channels": 64,
        "audio_token_id": audio,
    }
    config = Phi4MultimodalConfig(
        **{**TEXT, "max_position_embeddings": 131072},
        vocab_size=len(tokenizer),
        original_max_position_embeddings=4096,
        rope_parameters=rope,
        bos_token_id=endoftext,
        eos_token_id=[endoftext, end],
        pad_token_id=endoftext,
        tie_word_embeddings=True,
        vision_config=vision,
        audio_config=audio_config,
    )
    processor = Phi4MultimodalProcessor(
        image_processor=Phi4MultimodalImageProcessor(),
        audio_processor=Phi4MultimodalFeatureExtractor(),
        tokenizer=tokenizer,
    )
    generation = {
        "bos_token_id": endoftext,
        "eos_token_id": [end, endoftext],
        "pad_token_id": endoftext,
    }
    return Recipe(
        config,
        tokenizer,
        processor,
        generation,
        templates.PHI4_MULTIMODAL,
        "processor",
        tokenizer_template=templates.PHI4_MULTIMODAL_TOKENIZER,
    )
