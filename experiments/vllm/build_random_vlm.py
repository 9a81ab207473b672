"""Build a random-weight Qwen2.5-VL with the layer shapes of Qwen2.5-VL-3B-Instruct, offline.

The GPU comparison in README.md runs it through both engines. Text and vision towers have the
3B model's widths, depths and head counts; the tokenizer is the tiny model's (a BPE vocabulary
of 400 trained on easy-VQA, so the LM head is ~0.3% of the real one's 151,936 rows) and images
are resized to 448x448 (256 image tokens). Weights are initialised on the GPU in bfloat16 and
saved, so engine=hf and engine=vllm load the same ones.

    python experiments/vllm/build_random_vlm.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

from sweeper.models.tiny import (
    TinyVLMSpec,
    build_config,
    build_processor,
    build_tokenizer,
    easy_vqa_corpus,
)

QWEN2_5_VL_3B = TinyVLMSpec(
    text_hidden=2048,
    text_layers=36,
    text_heads=16,
    text_kv_heads=2,
    text_intermediate=11008,
    vision_hidden=1280,
    vision_depth=32,
    vision_heads=16,
    vision_intermediate=3420,
    image_size=448,
)


def main(out: Path) -> None:
    spec = QWEN2_5_VL_3B
    tokenizer = build_tokenizer(easy_vqa_corpus(), spec.bpe_vocab_size)
    config = build_config(spec, tokenizer)
    config.dtype = torch.bfloat16
    torch.manual_seed(spec.seed)
    with torch.device("cuda"):  # initialising 3 B parameters on a CPU takes minutes
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        bos_token_id=config.text_config.bos_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_processor(tokenizer, spec.image_size).save_pretrained(out)
    (out / "sweeper_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    params = sum(p.numel() for p in model.parameters())
    print(f"{out}: {params / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
