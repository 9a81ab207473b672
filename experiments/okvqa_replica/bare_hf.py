"""Bare HF transformers anchor: a plain `generate` loop at batch 1, no sweeper harness.

What a user would write first: for each question, open the image, render the chat, run the
processor, `generate` exactly --max-new-tokens tokens (min_new_tokens, greedy), synchronise.
Each sample's time runs from opening its image to its output on the host. Modes:
- dynamic: transformers' default cache;
- static: `cache_implementation="static"`, which transformers compiles on a GPU by itself
  (its default CompileConfig) - the "static cache" anchor of the issue.
The first --warmup samples of each mode are not counted (compilation happens there).

    python experiments/okvqa_replica/bare_hf.py --model DIR --replica DIR --n 16 --out hf.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from replica_samples import replica_samples
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from sweeper.tasks.base import qa_messages  # the prompt text sweeper sends, nothing else


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="architecture-only model folder")
    parser.add_argument("--replica", required=True, help="replica folder (official layout)")
    parser.add_argument("--n", type=int, default=16, help="measured samples per mode")
    parser.add_argument("--warmup", type=int, default=3, help="samples per mode not counted")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--modes", default="dynamic,static")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    processor = AutoProcessor.from_pretrained(args.model)
    with device:  # random weights, initialised where they live
        model = AutoModelForImageTextToText.from_config(
            AutoConfig.from_pretrained(args.model), dtype=dtype
        )
    model.generation_config = GenerationConfig.from_pretrained(args.model)
    model.eval()
    samples = replica_samples(args.replica, args.warmup + args.n)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    results = {"n": args.n, "warmup": args.warmup, "max_new_tokens": args.max_new_tokens}
    for mode in args.modes.split(","):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times, prompt_tokens, output_tokens = [], [], []
        for index, (question, path) in enumerate(samples):
            sync()
            start = time.perf_counter()
            image = Image.open(path).convert("RGB")
            text = processor.apply_chat_template(
                qa_messages(question, image=True), add_generation_prompt=True
            )
            inputs = processor(text=[text], images=[image], return_tensors="pt").to(device)
            with torch.inference_mode():
                output = model.generate(
                    **inputs,
                    max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.max_new_tokens,
                    do_sample=False,
                    cache_implementation=None if mode == "dynamic" else mode,
                )
            sync()
            elapsed = time.perf_counter() - start
            if index >= args.warmup:
                times.append(elapsed)
                prompt_tokens.append(inputs["input_ids"].shape[1])
                output_tokens.append(output.shape[1] - inputs["input_ids"].shape[1])
        results[mode] = {
            "s_per_sample_mean": statistics.fmean(times),
            "s_per_sample_median": statistics.median(times),
            "output_tok_per_s": sum(output_tokens) / sum(times),
            "prompt_tokens_mean": statistics.fmean(prompt_tokens),
            "output_tokens_mean": statistics.fmean(output_tokens),
            "torch_peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1024**3
            if cuda
            else None,
        }
        print(mode, json.dumps(results[mode]), flush=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
