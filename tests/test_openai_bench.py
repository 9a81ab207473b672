"""engine=openai under load against `vllm bench serve`, on one real `vllm serve` of the tiny
model (vllm-cpu) that sweeper's engine starts: sweeper's `load=rate` and `load=concurrency`
runs, then bench with the same requests at the same rate or concurrency, back to back on the
same server. Both answer as the offline engine=vllm does, both send the same prompts (the
server's token counts agree), and sweeper's TTFT, TPOT and output throughput are bench's within
the tolerances below.

The requests: easy-VQA's first 32 questions without their images (`workload.images=false`),
each one user message of one text part, the question and the task's instruction, which bench's
`openai-chat` backend sends the same way (tests/vllm_bench.py); greedy, exactly 32 tokens each
(sweeper's ignore_eos=true, bench's --ignore-eos), so both generate the same tokens. Every
request is measured on both sides: sweeper's warm-up and cool-down shares are 0 (bench leaves
none out). The rate's arrivals are near-regular (gamma shape 1000: gaps within ~3% of 1/rate)
in both clients: two Poisson draws of 32 arrivals (sweeper and bench draw from different
generators) would differ in their bursts, and so in their queueing, more than the clients do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed (scripts/install_vllm_cpu.sh installs it for CPU)"
)

from sweeper.engines import Engine  # noqa: E402
from sweeper.trial import TrialResult, run_trial  # noqa: E402
from tests.conftest import (  # noqa: E402
    OPENAI_VLLM,
    cached_engine,
    compose_trial,
    offline_vllm_answers,
    trial_requests,
)
from tests.vllm_bench import bench_command, run_bench, write_dataset  # noqa: E402

COUNT, TOKENS, RATE, CONCURRENCY = 32, 32, 4.0, 4
QUESTIONS = ("workload.images=false", f"dataset.limit={COUNT}")
TRIAL = (
    *OPENAI_VLLM,
    *QUESTIONS,
    "ignore_eos=true",
    f"max_new_tokens={TOKENS}",
    # The calibration (batch_efficiency's one-at-a-time rate) on 8 requests, once: it is not
    # compared here, and every pass of it is seconds of this file's time.
    "calibration_samples=8",
    "calibration_repeats=1",
)
BURSTINESS = 1000.0
MEASURE_ALL = ("load.warmup=0", "load.cooldown=0")

# Tolerances. The server is the same for both clients, but on the project's 2-core CPU machine,
# shared with a CI run (load average 2-12 while these were set), each run meets another share of
# the CPUs, and a 2.3 M-parameter model makes the server's own work a few ms, so what the other
# processes do moves every number. Measured over 25 back-to-back pairs (sweeper, then bench,
# 32 requests each, this file's settings: 12 at 4/s, 13 under the closed loop; some before the
# memory sampler kept to 10% of a core; those pairs were not kept, a machine restart lost them;
# experiments/serving_load/README.md has one run of this file and a rate sweep):
# - output throughput at 4/s: both paced by the schedule (each request done before the next is
#   due), 0.96-1.07 of bench's (bench's window also holds the wait before its first request,
#   1/32 of it): within 15%, and the rate x 32 tokens within 15%;
# - output throughput under a closed loop of 4: the server's speed, 0.36-1.2 of bench's, and
#   below 1 in all but one pair, then; since requests are made ahead and the heap is frozen
#   (experiments/serving_load/README.md), 0.94-0.99 in the runs of 2026-12-04. Within a
#   factor 3: the server stalls for 0.3-0.6 s at times under either client;
# - TTFT: 10-450 ms in either client. At 4/s the pair's ratio of means 0.9-3.5, of medians
#   0.5-9 (bench's medians of 12-20 ms against sweeper's up to 127 ms, then; one cause, the memory
#   sampler's page-table walks stalled the server; 2026-12-04: medians 14-15 ms against
#   bench's 13-15); under the closed loop 1.5-3.7 (0.9-1.0 now). Within a factor 4 plus 100 ms
#   (a stall delays a stream that much here), and a pair that disagrees is measured once more;
# - TPOT: the tiny model's tokens come in bursts (the API server sends what the engine made
#   since its last send: a median gap of 5 us between chunks), so the mean TPOT is how many
#   streams were split, 0.1-15 ms in either client: compared within 30 ms.
# What they still catch: another window or token count in the throughput (the warm-up or the
# calibration counted), TTFT from another moment (the schedule instead of the send, the stream's
# end) or in other units, a client that cannot keep up with 4/s. The exact checks are elsewhere:
# the same prompt tokens, output tokens and answers on both sides.
RATE_THROUGHPUT_REL = 0.15
LOOP_THROUGHPUT_FACTOR = 3.0
TTFT_FACTOR, TTFT_SLACK_S = 4.0, 0.1
TPOT_ABS_S = 0.03


@dataclass
class Served:
    """The started server, and the trial's requests as bench's dataset."""

    engine: Engine
    dataset: Path
    tmp: Path


@pytest.fixture(scope="module")
def reference() -> list[list[str]]:
    """The offline engine=vllm's greedy answers to the questions (before the server starts: the
    two vLLMs never share the 2 CPUs)."""
    return offline_vllm_answers(*QUESTIONS)


@pytest.fixture(scope="module")
def served(reference, free_engine_cache, tmp_path_factory) -> Served:
    trial = compose_trial(*TRIAL)
    engine = cached_engine(trial)  # starts the server; the trials below reuse it
    tmp = tmp_path_factory.mktemp("bench")
    dataset = write_dataset(trial_requests(trial, engine), tmp / "requests.jsonl", TOKENS)
    return Served(engine, dataset, tmp)


def _bench(served: Served, name: str, **load) -> dict:
    engine = served.engine
    args = bench_command(
        engine.root,
        engine.server.spec.model_path,
        engine.model,
        served.dataset,
        COUNT,
        TOKENS,
        served.tmp / f"{name}.json",
        **load,
    )
    return run_bench(args)


def _compare(result: TrialResult, bench: dict) -> dict[str, tuple[float, float]]:
    """sweeper's and bench's numbers side by side, in seconds and tokens/s."""
    m = result.metrics
    pairs = {
        "ttft mean": (m["ttft_s"], bench["mean_ttft_ms"] / 1000),
        "ttft p50": (m["ttft_p50_s"], bench["median_ttft_ms"] / 1000),
        "ttft p99": (m["ttft_p99_s"], bench["p99_ttft_ms"] / 1000),
        "tpot mean": (m["tpot_s"], bench["mean_tpot_ms"] / 1000),
        "output tokens/s": (m["tps"], bench["output_throughput"]),
        "requests/s": (m["requests_per_s"], bench["request_throughput"]),
    }
    table = "\n".join(f"{k:>16}: sweeper {a:10.4f}  bench {b:10.4f}" for k, (a, b) in pairs.items())
    lag = m.get("send_lag_p99_s", math.nan)
    print(f"\n{result.tags['load']}: {result.tags['load_window']}, send lag p99 {lag:.3f} s")
    print(table)
    return pairs


def _assert_same_work(result: TrialResult, bench: dict, reference: list[list[str]]) -> None:
    """Both clients asked the same of the server and got the offline engine's answers."""
    # The same prompts: the server counted as many prompt tokens for each client's requests.
    assert result.metrics["prompt_tokens"] == sum(bench["input_lens"])
    assert result.metrics["output_tokens"] == sum(bench["output_lens"]) == COUNT * TOKENS
    assert result.metrics["num_samples_measured"] == bench["completed"] == COUNT
    # Greedy: past the answer the model writes only special tokens, which the server leaves
    # out of the text, so 32 tokens read as the offline engine's answer.
    assert [p["outputs"] for p in result.predictions] == reference
    assert [[text] for text in bench["generated_texts"]] == reference


def _assert_ttft(pairs: dict[str, tuple[float, float]]) -> None:
    for key in ("ttft mean", "ttft p50"):
        ours, theirs = pairs[key]
        low, high = theirs / TTFT_FACTOR - TTFT_SLACK_S, theirs * TTFT_FACTOR + TTFT_SLACK_S
        assert low <= ours <= high, (key, pairs)
    ours, theirs = pairs["tpot mean"]
    assert abs(ours - theirs) <= TPOT_ABS_S, pairs


def _pair(
    served: Served, reference, overrides: tuple[str, ...], name: str, **load
) -> tuple[TrialResult, dict[str, tuple[float, float]]]:
    """sweeper's trial, then bench on the same requests; the exact checks on every pair."""
    result = run_trial(compose_trial(*TRIAL, *overrides, *MEASURE_ALL))
    bench = _bench(served, name, **load)
    _assert_same_work(result, bench, reference)
    return result, _compare(result, bench)


def _timing_agrees(measure: Callable[[], None]) -> None:
    """`measure` (a pair and its timing checks) once, and once more if its timing disagreed:
    on this machine the server stalls at times for 0.3-0.6 s, all requests in flight at once,
    under either client (bench's TTFT p99 at a closed loop of 4: 37-489 ms over four runs of 64
    requests, one after the other), and a stall in one client's run and not the other's is
    not the clients' difference. A client that measures something else disagrees twice."""
    try:
        measure()
    except AssertionError as first:
        print(f"\ntiming disagreed, measured once more: {first}")
        measure()


@pytest.mark.slow
def test_a_rate_load_measures_as_vllm_bench_serve(served: Served, reference) -> None:
    def measure() -> None:
        load = ("load=rate", f"load.rate={RATE}", f"load.burstiness={BURSTINESS}")
        result, pairs = _pair(served, reference, load, "rate", rate=RATE, burstiness=BURSTINESS)
        # The server kept up: both sent at the rate, and their throughput is the schedule's.
        # (Not asserted: sweeper's `client_bottleneck`, its requests' p99 lateness over 25 ms,
        # which the CI run beside this one causes at times; bench does not measure its own.)
        assert result.metrics["achieved_rate"] == pytest.approx(RATE, rel=0.1)
        ours, theirs = pairs["output tokens/s"]
        assert ours == pytest.approx(theirs, rel=RATE_THROUGHPUT_REL), pairs
        assert theirs == pytest.approx(RATE * TOKENS, rel=RATE_THROUGHPUT_REL), pairs
        _assert_ttft(pairs)

    _timing_agrees(measure)


@pytest.mark.slow
def test_a_concurrency_load_measures_as_vllm_bench_serve(served: Served, reference) -> None:
    def measure() -> None:
        load = ("load=concurrency", f"load.concurrency={CONCURRENCY}")
        result, pairs = _pair(served, reference, load, "concurrency", max_concurrency=CONCURRENCY)
        assert 1 < result.metrics["requests_in_flight"] <= CONCURRENCY + 1e-6
        assert math.isfinite(result.metrics["batch_efficiency"])
        ours, theirs = pairs["output tokens/s"]
        assert theirs / LOOP_THROUGHPUT_FACTOR <= ours <= theirs * LOOP_THROUGHPUT_FACTOR, pairs
        _assert_ttft(pairs)

    _timing_agrees(measure)
