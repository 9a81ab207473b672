"""Each output-changing knob's effect on speed and on the answers, on CPU with the tiny VLM,
through the real trial code (`run_trial`: warm-up, calibration, measured run, then the quality
guard against the exact reference).

    python experiments/quality_guard/bench.py [--limit 64] [--repeats 3] [--out results.json]

Variants run in turn in this process, as a sweep's trials do: each engine's exact reference is
answered once (the first variant of each group is the exact configuration itself) and reused.
Writes results.json (every variant's metrics and tags) and results.png (beside --out), and
prints the README's markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sweeper.config import register_configs
from sweeper.engines import ENGINE_CACHE
from sweeper.trial import run_trial

HERE = Path(__file__).parent
VLLM = ["engine=vllm", "engine.enforce_eager=true"]
# (label, overrides): each group starts with its exact configuration.
VARIANTS = [
    ("hf exact", []),
    ("hf kv_cache=quantized", ["kv_cache=quantized"]),
    ("vllm exact (fp32)", VLLM),
    ("vllm kv_cache_dtype=fp8", [*VLLM, "engine.kv_cache_dtype=fp8"]),
    ("vllm ngram k=2", [*VLLM, "engine.num_speculative_tokens=2"]),
    ("vllm ngram k=4", [*VLLM, "engine.num_speculative_tokens=4"]),
    ("vllm exact (bf16)", [*VLLM, "engine.dtype=bfloat16"]),
    (
        "vllm int8 weights (bf16)",
        [*VLLM, "engine.dtype=bfloat16", "engine.quantization=int8_per_channel_weight_only"],
    ),
]
METRICS = [
    "tps",
    "ttft_s",
    "accuracy",
    "answer_agreement",
    "accuracy_delta",
    "spec_acceptance_rate",
]


def _trial(overrides: list[str]):  # noqa: ANN202 - a TrialConfig
    with initialize_config_module("sweeper.conf", version_base=None):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def _cell(metrics: dict[str, float], name: str) -> str:
    value = metrics.get(name)
    if value is None or not math.isfinite(value):
        return "-"
    half = metrics.get(name + "_ci95")
    if half is not None and math.isfinite(half) and half > 0:
        return f"{value:.3g} ± {half:.2g}"
    return f"{value:.3g}"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["label"] for row in rows]
    tps = [row["metrics"]["tps"] for row in rows]
    tps_ci = [row["metrics"].get("tps_ci95", 0.0) for row in rows]
    agreement = [row["metrics"].get("answer_agreement", math.nan) for row in rows]
    fig, (speed, same) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    positions = range(len(rows))
    speed.barh(positions, tps, xerr=tps_ci, color="tab:blue")
    speed.set_xlabel("output tokens/s (tps), mean ± 95% CI")
    speed.set_yticks(list(positions), labels)
    speed.invert_yaxis()
    same.barh(positions, agreement, color="tab:green")
    same.set_xlabel("answer_agreement with the exact reference")
    same.set_xlim(0, 1.05)
    fig.suptitle("Output-changing knobs on CPU, tiny VLM, easy-VQA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument(
        "--only", nargs="+", metavar="LABEL", help="these variants, in this order (a re-check)"
    )
    args = parser.parse_args()
    labels = dict(VARIANTS)
    variants = [(label, labels[label]) for label in args.only] if args.only else VARIANTS
    register_configs()
    common = [
        f"dataset.limit={args.limit}",
        f"repeats={args.repeats}",
        "batch_size=8",
        "max_new_tokens=8",
    ]
    rows = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for label, overrides in variants:
        begin = time.perf_counter()
        result = run_trial(_trial([*common, *overrides]))
        print(f"{label}: {time.perf_counter() - begin:.0f} s", flush=True)
        keep = ("reference", "reference_answers", "vllm_kv_cache_dtype", "vllm_quantization")
        tags = {k: v for k, v in result.tags.items() if k in keep}
        rows.append({"label": label, "overrides": overrides, "metrics": result.metrics, **tags})
    ENGINE_CACHE.clear()
    meta = {
        "started": started,
        "command": f"python experiments/quality_guard/bench.py --limit {args.limit} "
        f"--repeats {args.repeats}"
        + (f" --only {' '.join(map(repr, args.only))}" if args.only else ""),
        "common": common,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    _plot(rows, args.out.with_suffix(".png"))
    print("| variant | " + " | ".join(METRICS) + " |")
    print("| --- |" + " --- |" * len(METRICS))
    for row in rows:
        cells = " | ".join(_cell(row["metrics"], m) for m in METRICS)
        print(f"| {row['label']} | {cells} |")


if __name__ == "__main__":
    main()
