"""How much of the graphed HF decode step's time the fusions serving engines make would save, at
batch 1, for Qwen2.5-VL-7B's decoder shapes: measured on the GPU, one layer's ops x 28 layers
(distinct weights per layer, so they stream from HBM as in the model, not from L2), each variant
recorded once as a CUDA graph and replayed:

- qkv: q_proj, k_proj, v_proj as three linears (with bias: HF's Qwen2.5-VL) vs one linear over
  the concatenated weights (vLLM's QKVParallelLinear), split after;
- gate_up: gate_proj and up_proj as two linears vs one over both (vLLM's
  MergedColumnParallelLinear);
- attention: one decode query over a 1,024-slot static cache with its mask: the KV heads repeated
  to the query heads (`repeat_kv`, what transformers does when a mask is passed) then SDPA, vs
  SDPA with `enable_gqa=True` on the 4 KV heads.

    python experiments/okvqa_replica/decode_fusion_bench.py [--replays 50] [--out FILE.json]

Prints, per variant, the step time over the 28 layers (ms) and the weights' bytes / time (TB/s).
The ops are the eager ATen ones (cuBLAS for the linears, as Inductor's compiled step calls them);
a variant's delta is what that fusion alone would save per token. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS, CACHE = 3584, 18944, 28, 4, 128, 28, 1024


def _timed(run: Callable[[], object], replays: int) -> float:
    """ms per call of `run`, recorded once as a CUDA graph (after a warm-up on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def _weights(rows: int, bias: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [
        (
            torch.randn(rows, HIDDEN, dtype=torch.bfloat16, device="cuda") * 0.02,
            torch.randn(rows, dtype=torch.bfloat16, device="cuda") if bias else None,
        )
        for _ in range(LAYERS)
    ]


def _linears(x: torch.Tensor, parts: list[list[tuple[torch.Tensor, torch.Tensor | None]]]):
    def run() -> None:
        for layer in range(LAYERS):
            for weights in parts:
                weight, bias = weights[layer]
                F.linear(x, weight, bias)

    return run


def bench_projections(replays: int) -> dict[str, dict[str, float]]:
    x = torch.randn(1, 1, HIDDEN, dtype=torch.bfloat16, device="cuda")
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    variants = {
        "qkv separate": [_weights(q_rows, True), _weights(kv_rows, True), _weights(kv_rows, True)],
        "qkv fused": [_weights(q_rows + 2 * kv_rows, True)],
        "gate_up separate": [_weights(INTER, False), _weights(INTER, False)],
        "gate_up fused": [_weights(2 * INTER, False)],
    }
    results = {}
    for name, parts in variants.items():
        ms = _timed(_linears(x, parts), replays)
        weight_bytes = sum(w.numel() * w.element_size() for part in parts for w, _ in part)
        results[name] = {"ms": ms, "tb_per_s": weight_bytes / ms / 1e9}
        del parts
    return results


def bench_attention(replays: int) -> dict[str, dict[str, float]]:
    groups = HEADS // KV_HEADS
    query = torch.randn(1, HEADS, 1, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    caches = [
        (
            torch.randn(1, KV_HEADS, CACHE, HEAD_DIM, dtype=torch.bfloat16, device="cuda"),
            torch.randn(1, KV_HEADS, CACHE, HEAD_DIM, dtype=torch.bfloat16, device="cuda"),
        )
        for _ in range(LAYERS)
    ]
    # The prompt's 438 tokens + the token decoded: the later slots are not written yet.
    mask = (torch.arange(CACHE, device="cuda") <= 438).view(1, 1, 1, CACHE)

    def repeated() -> None:
        for keys, values in caches:
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
            F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)

    def gqa() -> None:
        for keys, values in caches:
            F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)

    torch.testing.assert_close(  # the same attention, both ways
        F.scaled_dot_product_attention(query, *caches[0], attn_mask=mask, enable_gqa=True),
        F.scaled_dot_product_attention(
            query,
            caches[0][0].repeat_interleave(groups, dim=1),
            caches[0][1].repeat_interleave(groups, dim=1),
            attn_mask=mask,
        ),
    )
    return {
        "attention repeat_kv + sdpa": {"ms": _timed(repeated, replays)},
        "attention sdpa enable_gqa": {"ms": _timed(gqa, replays)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replays", type=int, default=50, help="graph replays timed per variant")
    parser.add_argument("--out", help="write the results here (JSON)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_fusion_bench.py needs a CUDA GPU")
    torch.manual_seed(0)
    results = {**bench_projections(args.replays), **bench_attention(args.replays)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {LAYERS} layers, batch 1")
    print(f"{'variant':<30} {'ms/step':>8} {'TB/s':>6}")
    for name, row in results.items():
        rate = f"{row['tb_per_s']:.2f}" if "tb_per_s" in row else "-"
        print(f"{name:<30} {row['ms']:>8.3f} {rate:>6}")
    for separate, fused in (
        ("qkv separate", "qkv fused"),
        ("gate_up separate", "gate_up fused"),
        ("attention repeat_kv + sdpa", "attention sdpa enable_gqa"),
    ):
        saved = results[separate]["ms"] - results[fused]["ms"]
        print(f"saved per token by {fused}: {saved:.3f} ms")
    if args.out:
        with open(args.out, "w") as file:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, file, indent=1)


if __name__ == "__main__":
    main()
