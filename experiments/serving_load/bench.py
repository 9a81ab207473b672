"""A rate sweep against `vllm serve` on CPU, by sweeper's client and by `vllm bench serve`.

    python experiments/serving_load/bench.py [--count 64] [--passes 2] [--out DIR] [OVERRIDE ...]

OVERRIDEs are trial overrides after the script's own (another model or dataset); `--vllm-defaults`
starts the server with vLLM's own settings instead of the CPU tests' eager mode and 2,048-token
context (the GPU study, experiments/okvqa_replica/gpu_study.sh serve-client).

One `vllm serve` of the tiny model, started once by sweeper's engine (engine=openai
engine.server=vllm), serves everything. Each pass runs sweeper's `load=rate_sweep` (one trial,
`--steps` steps: concurrency 1, the rates between, everything at once), then `vllm bench serve`
at the same steps (--max-concurrency 1, each step's rate, --request-rate inf) with the same
requests (tests/vllm_bench.py writes them as its custom dataset). Writes, under --out:
`steps.csv` (one row per pass, client and step), `bench/*.json` (bench's saved summaries),
`run.json` (the settings, versions, the machine's load), and `ttft_goodput.png`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.append(str(REPO))  # tests.* (the bench helpers); an installed sweeper stays first

from sweeper.trial import run_trial  # noqa: E402
from tests.conftest import OPENAI_VLLM, cached_engine, compose_trial, trial_requests  # noqa: E402
from tests.vllm_bench import bench_command, run_bench, shell_command, write_dataset  # noqa: E402

COLUMNS = (
    "pass",
    "client",
    "step",
    "offered_rps",
    "target_rps",
    "requests_per_s",
    "ttft_mean_s",
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_mean_s",
    "output_tps",
    "goodput_rps",
    "slo_attainment",
    "send_lag_p99_s",
)


def sweeper_rows(result, index: int) -> list[dict]:
    """The rate sweep's steps as rows; the offered load is the target rate, or at the two ends
    (no rate of their own) the requests/s they achieved, as the sweep derives its rates."""
    rows = []
    for label, m, _ in result.steps:
        rows.append(
            {
                "pass": index,
                "client": "sweeper",
                "step": label,
                "offered_rps": m.get("target_rate", m["requests_per_s"]),
                "target_rps": m.get("target_rate", math.nan),
                "requests_per_s": m["requests_per_s"],
                "ttft_mean_s": m["ttft_s"],
                "ttft_p50_s": m["ttft_p50_s"],
                "ttft_p99_s": m["ttft_p99_s"],
                "tpot_mean_s": m["tpot_s"],
                "output_tps": m["tps"],
                "goodput_rps": m["goodput_rps"],
                "slo_attainment": m["slo_attainment"],
                "send_lag_p99_s": m.get("send_lag_p99_s", math.nan),
            }
        )
    return rows


def bench_row(found: dict, index: int, step: str, target: float | None) -> dict:
    return {
        "pass": index,
        "client": "vllm bench serve",
        "step": step,
        "offered_rps": target if target is not None else found["request_throughput"],
        "target_rps": target if target is not None else math.nan,
        "requests_per_s": found["request_throughput"],
        "ttft_mean_s": found["mean_ttft_ms"] / 1000,
        "ttft_p50_s": found["median_ttft_ms"] / 1000,
        "ttft_p99_s": found["p99_ttft_ms"] / 1000,
        "tpot_mean_s": found["mean_tpot_ms"] / 1000,
        "output_tps": found["output_throughput"],
        "goodput_rps": found["request_goodput"],
        "slo_attainment": found["request_goodput"] / found["request_throughput"],
        "send_lag_p99_s": math.nan,  # bench does not measure its own
    }


# Per-request lists bench saves with --save-detailed: read (texts, token counts), not kept.
_DETAILED = ("input_lens", "output_lens", "start_times", "ttfts", "itls", "generated_texts")


def plot(rows: list[dict], slo: dict[str, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"sweeper": ("o", "-", "C0"), "vllm bench serve": ("s", "--", "C1")}
    for (index, client), (marker, line, color) in (
        ((i, c), styles[c]) for i in sorted({r["pass"] for r in rows}) for c in styles
    ):
        mine = sorted(
            (r for r in rows if r["pass"] == index and r["client"] == client),
            key=lambda r: r["offered_rps"],
        )
        x = [r["offered_rps"] for r in mine]
        label = f"{client}, pass {index}"
        alpha = 1.0 if index == 1 else 0.5
        left.plot(x, [r["ttft_p99_s"] for r in mine], marker + line, color=color, alpha=alpha)
        right.plot(x, [r["goodput_rps"] for r in mine], marker + line, color=color, alpha=alpha)
        right.plot([], [], marker + line, color=color, alpha=alpha, label=label)
    top = max(r["offered_rps"] for r in rows)
    right.plot([0, top], [0, top], ":", color="grey", label="goodput = offered load")
    left.axhline(slo["ttft"], color="grey", linestyle=":", label=f"TTFT objective {slo['ttft']} s")
    left.set(xlabel="offered load (requests/s)", ylabel="TTFT p99 (s)", yscale="log")
    right.set(xlabel="offered load (requests/s)", ylabel="goodput (requests/s)")
    left.set_title("TTFT p99")
    right.set_title(f"goodput (TTFT <= {slo['ttft']} s, TPOT <= {slo['tpot']} s)")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.suptitle(f"{title}: sweeper's client vs vllm bench serve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64, help="requests per step")
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--ttft-slo", type=float, default=0.5)
    parser.add_argument("--tpot-slo", type=float, default=0.025)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--vllm-defaults", action="store_true", help="vLLM's own server settings (a GPU host)"
    )
    parser.add_argument(
        "--title", default="vllm serve, tiny_vlm on 2 shared CPU cores", help="the plot's title"
    )
    parser.add_argument("overrides", nargs="*", help="more trial overrides (model=..., ...)")
    args = parser.parse_args()
    out: Path = args.out
    (out / "bench").mkdir(parents=True, exist_ok=True)
    for stale in (out / "bench").glob("*.json"):  # an earlier run's steps had other rates
        stale.unlink()

    overrides = [
        *(OPENAI_VLLM[:2] if args.vllm_defaults else OPENAI_VLLM),
        "workload.images=false",  # bench's custom dataset is text: the same prompts both ways
        f"dataset.limit={args.count}",
        "ignore_eos=true",
        f"max_new_tokens={args.tokens}",
        "load=rate_sweep",
        f"load.steps={args.steps}",
        "load.warmup=0",  # bench leaves no request out: neither does sweeper here
        "load.cooldown=0",
        f"slo.ttft_s={args.ttft_slo}",
        f"slo.tpot_s={args.tpot_slo}",
        "calibration_samples=8",
        "calibration_repeats=1",
        "tracking.log_predictions=false",
        *args.overrides,
    ]
    trial = compose_trial(*overrides)
    started = time.time()
    load_before = os.getloadavg()
    engine = cached_engine(trial)  # the server, kept for every pass
    dataset = write_dataset(trial_requests(trial, engine), out / "requests.jsonl", args.tokens)
    slo = {"ttft": args.ttft_slo, "tpot": args.tpot_slo}
    rows: list[dict] = []
    commands: list[str] = []
    for index in range(1, args.passes + 1):
        print(f"pass {index}: sweeper rate_sweep", flush=True)
        result = run_trial(trial)
        mine = sweeper_rows(result, index)
        rows += mine
        for row in mine:
            step, target = row["step"], row["target_rps"]
            plan: dict = {}
            if step == "concurrency 1":
                plan = {"max_concurrency": 1}
            elif not math.isnan(target):
                plan = {"rate": round(target, 3), "burstiness": 1.0, "seed": index}
            name = f"pass{index}-" + step.replace(" ", "_").replace("/", "")
            bench_args = bench_command(
                engine.root,
                engine.server.spec.model_path,
                engine.model,
                dataset,
                args.count,
                args.tokens,
                out / "bench" / f"{name}.json",
                goodput=slo,
                **plan,
            )
            print(f"pass {index}: vllm bench serve, {step}", flush=True)
            found = run_bench(bench_args)
            assert sum(found["output_lens"]) == args.count * args.tokens, found["output_lens"]
            for key in _DETAILED + ("errors",):
                found.pop(key, None)
            # Paths relative to the repo: the results hold nothing of the machine they ran on.
            saved = json.dumps(found, indent=1).replace(str(REPO) + "/", "")
            (out / "bench" / f"{name}.json").write_text(saved)
            rows.append(bench_row(found, index, step, plan.get("rate")))
            if index == 1:
                commands.append(shell_command(bench_args).replace(str(REPO) + "/", ""))

    with (out / "steps.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.5g}" if isinstance(v, float) else v for k, v in row.items()})
    plot(rows, slo, out / "ttft_goodput.png", args.title)
    import torch
    import vllm

    run = {
        "sweeper": "python -m sweeper " + " ".join(overrides),
        "bench": commands,
        "server": result.tags.get("openai_server_command", "").replace(str(REPO) + "/", ""),
        "seconds": round(time.time() - started),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
    }
    (out / "run.json").write_text(json.dumps(run, indent=1))
    print(json.dumps(run, indent=1))
    engine.close()


if __name__ == "__main__":
    main()
