"""Build a random-weight Qwen2.5-VL with the layer shapes of Qwen2.5-VL-3B-Instruct, offline.

The GPU comparison in README.md runs it through both engines. Text and vision towers have the
3B model's widths, depths and head counts; the tokenizer is the tiny model's (a BPE vocabulary
of 400 trained on easy-VQA, so the LM head is ~0.3% of the real one's 151,936 rows) and images
are resized to 448x448 (256 image tokens). Weights are initialised on the GPU in bfloat16 and
saved, so engine=hf and engine=vllm load the same ones.

    python experiments/vllm/build_random_vlm.py OUT_DIR
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from safetensors import safe_open

from sweeper.models.tiny import TinyVLMSpec, build_tiny_vlm

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
    # Initialising 3 B parameters on a CPU takes minutes; on the GPU, seconds.
    build_tiny_vlm(out, QWEN2_5_VL_3B, device="cuda", dtype="bfloat16")
    params = 0
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as weights:
            names = weights.keys()  # safe_open handles are not iterable
            params += sum(math.prod(weights.get_slice(name).get_shape()) for name in names)
    print(f"{out}: {params / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
