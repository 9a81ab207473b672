"""engine=hf serving flags side by side, through the real trial code (`run_trial`), on CPU.

    python experiments/hf_serving_flags/bench.py [--out results.json]

Each section runs its variants in turn in this process (so they share the loaded model, as a
sweep does), `--repeats` times interleaved, and prints one markdown table: the median of each
metric the flag should move, the change of the first two against the section's first variant,
and `same answers`: the share of questions whose answer equals the first variant's.

Models: the default (`tiny_vlm`, trained, answers in a few tokens) where answers matter;
`tiny_random` where outputs must be long (it never emits EOS); sweeper/models/varied.py where
answers must end at mixed lengths (continuous batching).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sweeper.config import register_configs
from sweeper.data import prefetch
from sweeper.models.varied import build_varied_vlm
from sweeper.requests import DecodingParams, ServingParams
from sweeper.trial import TrialResult, run_trial


@dataclass
class Section:
    title: str
    claim: str
    common: list[str]
    variants: dict[str, list[str]]
    metrics: list[str]
    model: str = "default"  # a key of `model_overrides`
    results: dict[str, list[TrialResult]] = field(default_factory=dict)


SECTIONS = [
    Section(
        "prefix_caching on workload=shared_prefix (1000-token system prompt)",
        "prefill_s and ttft_s down by >= 50%",
        [
            "workload=shared_prefix",
            "workload.system_prompt_tokens=1000",
            "dataset.limit=32",
            "batch_size=8",
            "max_new_tokens=16",
        ],
        {"prefix_caching=false": [], "prefix_caching=true": ["prefix_caching=true"]},
        ["prefill_s", "ttft_s", "tps", "prefix_cache_hit_rate"],
    ),
    Section(
        "continuous_batching on answers of mixed lengths (text-only prompts)",
        "batch_efficiency up against static batches",
        [
            "workload.images=false",
            "dataset.limit=32",
            "batch_size=8",
            "max_new_tokens=64",
            "calibration_samples=16",
        ],
        {
            "static batches": [],
            "continuous_batching=true": ["continuous_batching=true"],
        },
        ["batch_efficiency", "tps", "requests_per_s", "ttft_s", "latency_s", "output_tokens"],
        model="varied_eos",
    ),
    Section(
        "kv_cache=off vs dynamic on long outputs (256 tokens)",
        "TPS down sharply, memory down",
        ["dataset.limit=8", "batch_size=8", "max_new_tokens=256", "warmup_batches=0"],
        {"kv_cache=dynamic": [], "kv_cache=off": ["kv_cache=off"]},
        ["tps", "tpot_s", "ttft_s", "peak_mem_gb"],
        model="tiny_random",
    ),
    Section(
        "kv_cache=static (+ engine.compile, + engine.decode_loop=graphed) vs dynamic",
        "report it (GPU target later: >= 150 tok/s with compile)",
        ["dataset.limit=32", "batch_size=8", "max_new_tokens=64", "calibration_samples=8"],
        {
            "kv_cache=dynamic": [],
            "kv_cache=static": ["kv_cache=static"],
            "kv_cache=static engine.compile=true": ["kv_cache=static", "engine.compile=true"],
            "+ engine.decode_loop=graphed": [
                "kv_cache=static",
                "engine.compile=true",
                "engine.decode_loop=graphed",
            ],
        },
        ["tps", "tpot_s", "ttft_s", "prefill_s"],
        model="tiny_random",
    ),
    Section(
        "kv_cache=quantized (4-bit, optimum-quanto) vs dynamic",
        "agreement of answers, reported instead of identity",
        ["dataset.limit=32", "batch_size=8", "max_new_tokens=16"],
        {"kv_cache=dynamic": [], "kv_cache=quantized": ["kv_cache=quantized"]},
        ["tps", "tpot_s", "accuracy"],
    ),
    Section(
        "prefix_caching on workload=multi_turn (5 turns per image, 16-token answers)",
        "context_load_s of later turns down: the history's KV is reused",
        [
            "workload=multi_turn",
            "workload.turns=5",
            "dataset.limit=40",
            "batch_size=4",
            "max_new_tokens=16",
            "calibration_samples=8",
        ],
        {"prefix_caching=false": [], "prefix_caching=true": ["prefix_caching=true"]},
        ["context_load_s", "prefill_s", "ttft_s", "prefix_cache_hit_rate", "prompt_tokens"],
    ),
]

# Lower is better for these: their change is printed as a reduction.
_LOWER_IS_BETTER = {"prefill_s", "ttft_s", "tpot_s", "latency_s", "peak_mem_gb"}


def _trial(overrides: list[str]):
    with initialize_config_module("sweeper.conf", version_base=None):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def _same_answers(result: TrialResult, reference: TrialResult) -> float:
    expected = {p["question_id"]: p["prediction"] for p in reference.predictions}
    same = [expected[p["question_id"]] == p["prediction"] for p in result.predictions]
    return sum(same) / len(same)


def _change(value: float, base: float) -> str:
    return f"{(value - base) / base:+.0%}" if base else "n/a"


def medians(results: list[TrialResult]) -> dict[str, float]:
    """Per metric, the median over the repeats that have it (model_load_s: the first only)."""
    names = {m for r in results for m in r.metrics}
    return {m: statistics.median(r.metrics[m] for r in results if m in r.metrics) for m in names}


def table(section: Section) -> str:
    names = list(section.results)
    reference = medians(section.results[names[0]])
    head = ["variant", *section.metrics, *(f"Δ {m}" for m in section.metrics[:2]), "same answers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        metrics = medians(section.results[name])
        values = [f"{metrics[m]:.4g}" for m in section.metrics]
        changes = [_change(metrics[m], reference[m]) for m in section.metrics[:2]]
        same = _same_answers(section.results[name][0], section.results[names[0]][0])
        lines.append("| " + " | ".join([name, *values, *changes, f"{same:.0%}"]) + " |")
    return "\n".join(lines)


def image_blindness(model_overrides: list[str], limit: int = 32) -> str:
    """Why continuous batching is refused with images, measured: give it the image prompts (as
    the token ids it takes, the image reduced to its placeholder) and compare with `generate`
    given the pixels."""
    from sweeper.engines import ENGINE_CACHE
    from sweeper.metrics import vqa_accuracy
    from sweeper.tasks import task_class
    from sweeper.tasks.base import extract_answer
    from sweeper.workloads import build_workload

    trial = _trial(["engine.device=cpu", f"dataset.limit={limit}", *model_overrides])
    engine = ENGINE_CACHE.get(trial.engine, trial.model, {}).engine
    task = task_class(trial.dataset)(trial.dataset)
    samples, _ = task.load()
    workload = build_workload(trial, task, engine)
    items = list(prefetch(samples, limit))
    requests = [workload.request(item) for item in items]
    greedy = DecodingParams.from_trial(trial)
    static, blind_params = ServingParams(8), ServingParams(8, continuous_batching=True)
    seen = engine.run(requests, greedy, static)
    blind = engine.run(requests, greedy, blind_params)
    # Every image replaced by the first: a model that saw the images would answer differently.
    swapped = [replace(r, images=requests[0].images) for r in requests]
    swapped = engine.run(swapped, greedy, blind_params)
    ENGINE_CACHE.clear()

    def accuracy(completions) -> float:
        return statistics.mean(
            vqa_accuracy(extract_answer(c.texts[0]).lower(), i.sample.answers)
            for c, i in zip(completions, items, strict=True)
        )

    agree = statistics.mean(a.texts == b.texts for a, b in zip(seen, blind, strict=True))
    unchanged = statistics.mean(a.texts == b.texts for a, b in zip(blind, swapped, strict=True))
    return (
        f"Continuous batching given the image prompts as the token ids it takes ({limit} "
        f"questions, default model): {agree:.0%} of its answers equal `generate`'s given the "
        f"pixels, {unchanged:.0%} stay the same when every image is swapped for another; "
        f"accuracy {accuracy(blind):.2f} against {accuracy(seen):.2f} with the pixels."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--only", type=int, nargs="*", help="section numbers (1-based) to run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant")
    args = parser.parse_args()
    # One thread by default: on a small machine shared with other processes, every OpenMP
    # barrier of a 2-thread op waits for whichever thread was descheduled, and a tiny model's
    # step takes several times longer and varies run to run.
    torch.set_num_threads(args.threads)
    register_configs()
    models = Path(tempfile.mkdtemp(prefix="sweeper-bench-"))
    varied = build_varied_vlm(models / "varied_eos", eos_scale=2.0)
    model_overrides = {
        "default": [],
        "tiny_random": ["model=tiny_random"],
        # sweeper/models/varied.py with eos_scale=2: answers of 3 to 64 tokens.
        "varied_eos": ["model=custom", f"model.path={varied}"],
    }
    started = time.time()
    load = os.getloadavg()
    report = []
    for number, section in enumerate(SECTIONS, start=1):
        if args.only and number not in args.only:
            continue
        model = model_overrides[section.model]
        for _ in range(args.repeats):
            for name, overrides in section.variants.items():
                start = time.time()
                trial = _trial(["engine.device=cpu", *model, *section.common, *overrides])
                section.results.setdefault(name, []).append(run_trial(trial))
                print(f"[{number}] {name}: {time.time() - start:.0f} s", flush=True)
        shown = [f"model={section.model}"] if section.model != "default" else []
        text = (
            f"### {number}. {section.title}\n\nClaim: {section.claim}. Overrides: "
            f"`{' '.join(shown + section.common)}`.\n\n{table(section)}\n"
        )
        print(text, flush=True)
        report.append(
            {
                "section": section.title,
                "common": section.common,
                "model": section.model,
                "variants": {n: [r.metrics for r in rs] for n, rs in section.results.items()},
                "markdown": text,
            }
        )
    if not args.only:
        blindness = image_blindness(model_overrides["default"])
        print(blindness, flush=True)
        report.append({"section": "continuous batching with images", "markdown": blindness})
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": args.threads,
        "load_average_at_start": load,
        "load_average_at_end": os.getloadavg(),
        "repeats": args.repeats,
        "wall_s": time.time() - started,
    }
    print(json.dumps(meta))
    args.out.write_text(json.dumps({"meta": meta, "sections": report}, indent=2))


if __name__ == "__main__":
    main()
