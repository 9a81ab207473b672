"""Bare vLLM anchor: `LLM.generate` over the whole replica with vLLM's default settings.

Only what the model needs is set (random weights: load_format="dummy"); everything else is
vLLM's default for the offline `LLM` (on an H100: max_num_seqs 1024, max_num_batched_tokens
16384, prefix caching on, CUDA graphs). Images are decoded before the clock starts (5,046 open
files would exceed the usual file-handle limit); the timed call renders, processes and generates
every request, exactly --max-new-tokens tokens each (ignore_eos, greedy). A warm-up call on the
first --warmup requests runs first; prefix and multimodal caches are reset after it.

    python experiments/okvqa_replica/bare_vllm.py --model DIR --replica DIR --out vllm.json
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from replica_samples import replica_samples
from transformers import AutoProcessor

from sweeper.tasks.base import qa_messages  # the prompt text sweeper sends, nothing else


def _load(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def main() -> None:
    from vllm import LLM, SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="architecture-only model folder")
    parser.add_argument("--replica", required=True, help="replica folder (official layout)")
    parser.add_argument("--n", type=int, default=None, help="questions (default: all)")
    parser.add_argument("--warmup", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument(
        "--kv-cache-gb", type=float, help="a fixed KV cache (the CPU smoke test); default: vLLM's"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    args = parser.parse_args()

    samples = replica_samples(args.replica, args.n)
    processor = AutoProcessor.from_pretrained(args.model)
    with ThreadPoolExecutor(16) as pool:
        images = list(pool.map(_load, [path for _, path in samples]))
    prompts = [
        {
            "prompt": processor.apply_chat_template(
                qa_messages(q, image=True), add_generation_prompt=True
            ),
            "multi_modal_data": {"image": image},
        }
        for (q, _), image in zip(samples, images, strict=True)
    ]
    params = SamplingParams(temperature=0, max_tokens=args.max_new_tokens, ignore_eos=True)

    start = time.perf_counter()
    fixed = (
        {}
        if args.kv_cache_gb is None
        else {"kv_cache_memory_bytes": int(args.kv_cache_gb * 1024**3)}
    )
    llm = LLM(model=args.model, load_format="dummy", **fixed)
    load_s = time.perf_counter() - start
    llm.generate(prompts[: args.warmup], params, use_tqdm=False)
    llm.reset_prefix_cache()
    llm.reset_mm_cache()

    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall_s = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    config = llm.llm_engine.vllm_config
    gpu_used_gb = None
    try:  # the whole device's used memory (vLLM pre-allocates at start-up, so this is its peak)
        import pynvml

        pynvml.nvmlInit()
        gpu_used_gb = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
        gpu_used_gb /= 1024**3
    except Exception:  # no NVML (CPU build): leave it out rather than guess
        pass
    results = {
        "n": len(prompts),
        "load_s": load_s,
        "wall_s": wall_s,
        "output_tok_per_s": output_tokens / wall_s,
        "requests_per_s": len(prompts) / wall_s,
        "prompt_tokens_mean": prompt_tokens / len(prompts),
        "output_tokens_mean": output_tokens / len(prompts),
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "enable_prefix_caching": config.cache_config.enable_prefix_caching,
        "gpu_used_gb": gpu_used_gb,
        "kv_cache_tokens": (config.cache_config.num_gpu_blocks or 0)
        * config.cache_config.block_size,
    }
    print(json.dumps(results, indent=1), flush=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
