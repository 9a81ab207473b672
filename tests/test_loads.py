"""The loads: arrival schedules (goodness of fit, seeds, ramp-up), goodput against a hand count,
and open loads driving real engines (vLLM's AsyncLLM and transformers' continuous batching on
CPU): the achieved rate follows the schedule, the concurrency cap holds, the answers are the
offline run's, the client's lateness is caught, a rate sweep logs its steps."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from scipy import stats

from sweeper.cli import BadInput, preflight
from sweeper.config import SLOConfig
from sweeper.engines import ENGINE_CACHE
from sweeper.engines.base import Engine
from sweeper.loads.load import drive
from sweeper.loads.schedule import arrival_times
from sweeper.metrics.performance import RequestTiming, summarize
from sweeper.requests import Completion, DecodingParams, Request, ServingParams
from sweeper.trial import run_trial
from tests.conftest import run_cli

VLLM_ASYNC = ("engine=vllm", "engine.enforce_eager=true", "engine.frontend=async")
HF_TEXT = ("engine.device=cpu", "continuous_batching=true", "workload.images=false")
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="no vLLM")


@pytest.fixture(scope="module", autouse=True)
def _free_engine():
    yield
    ENGINE_CACHE.clear()


def _trial(*overrides: str):
    with initialize_config_module("sweeper.conf", version_base=None):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


# --- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 3.0])
def test_inter_arrival_times_follow_the_gamma_of_the_rate(burstiness: float) -> None:
    times = arrival_times(3000, rate=5.0, burstiness=burstiness, seed=1)
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.mean(gaps) == pytest.approx(0.2, rel=0.05)
    # Gamma of shape `burstiness` and mean 1/rate (exponential, Poisson arrivals, at 1).
    fit = stats.kstest(gaps, "gamma", args=(burstiness, 0, 1 / (5.0 * burstiness)))
    assert fit.pvalue > 0.01, fit
    other = stats.kstest(gaps, "gamma", args=(burstiness * 2, 0, 1 / (5.0 * burstiness * 2)))
    assert other.pvalue < 0.01, other  # the test tells another shape apart


def test_schedules_are_seeded_and_ramp_up_linearly() -> None:
    assert arrival_times(50, 4.0, seed=3) == arrival_times(50, 4.0, seed=3)
    assert arrival_times(50, 4.0, seed=3) != arrival_times(50, 4.0, seed=4)
    ramped = np.array(arrival_times(4000, 20.0, ramp_up_s=10.0, seed=0))
    # The rate rises from 0 to 20/s over 10 s: 100 arrivals by then, 25 in the first 5 s.
    assert np.sum(ramped < 10) == pytest.approx(100, rel=0.2)
    assert np.sum(ramped < 5) == pytest.approx(25, rel=0.35)
    after = np.diff(ramped[ramped > 10])
    assert np.mean(after) == pytest.approx(1 / 20, rel=0.05)


def _timing(ttft: float, tpot: float | None, e2el: float) -> RequestTiming:
    return RequestTiming(0.01, 0.02, ttft, e2el, tpot, 10, 5)


def test_goodput_counts_the_requests_meeting_every_objective() -> None:
    timings = [
        _timing(0.5, 0.04, 1.0),  # meets all
        _timing(1.5, 0.04, 2.0),  # TTFT too slow
        _timing(0.5, 0.09, 1.5),  # TPOT too slow
        _timing(0.2, None, 0.2),  # one token: no TPOT to miss
    ]
    slo = SLOConfig(ttft_s=1.0, tpot_s=0.05, e2el_s=1.8)
    metrics = summarize(timings, 2.0, slo)
    assert metrics["goodput_rps"] == 2 / 2.0 and metrics["slo_attainment"] == 0.5
    everyone = summarize(timings, 2.0, SLOConfig(ttft_s=10, tpot_s=10, e2el_s=10))
    assert everyone["slo_attainment"] == 1.0 and everyone["goodput_rps"] == 4 / 2.0
    nobody = summarize(timings, 2.0, SLOConfig(ttft_s=0.01))
    assert nobody["slo_attainment"] == 0.0 and nobody["goodput_rps"] == 0.0
    assert "goodput_rps" not in summarize(timings, 2.0, SLOConfig())


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        (["load=rate"], "load", "needs continuous_batching=true"),
        (["engine=vllm", "load=concurrency"], "load", "needs engine.frontend=async"),
        (["load=rate", "load.rate=0"], "load.rate", "requests per second > 0"),
        (["load=rate", "load.burstiness=-1"], "load.burstiness", "gamma shape > 0"),
        (["load=concurrency", "load.concurrency=0"], "load.concurrency", "integer >= 1"),
        (["load=rate_sweep", "load.steps=2"], "load.steps", "integer >= 3"),
        ([*HF_TEXT, "load=rate", "workload=multi_turn"], "workload", "no arrival schedule"),
        (["slo.ttft_s=-1"], "slo.ttft_s", "seconds > 0"),
    ],
)
def test_loads_refused_before_anything_loads(overrides, key, allowed) -> None:
    with pytest.raises(BadInput) as error:
        preflight(overrides)
    message = str(error.value)
    assert "\n" not in message and f"'{key}'" in message and allowed in message, message


class _SlowToPrepare(Engine):
    """A pure-logic stand-in for the request loop's test: preparing a request takes 20 ms (as
    engine=openai encodes an image), answering it nothing."""

    device = "cpu"

    def __init__(self) -> None:
        self.prepared: dict[str, float] = {}

    def prepare(self, request: Request, decoding: DecodingParams) -> Request:
        time.sleep(0.02)
        self.prepared[request.id] = time.perf_counter()
        return request

    def submit(self, request, decoding, serving) -> Future[Completion]:
        assert request.id in self.prepared, "sent before it was prepared"
        done: Future[Completion] = Future()
        done.set_result(Completion(request.id, [""], [[]], RequestTiming(0, 0, 0, 0, None, 0, 0)))
        return done

    def synchronize(self) -> None: ...
    def generate(self, requests, decoding, serving): ...
    def close(self) -> None: ...


def _drive(engine: Engine, requests: Iterator[Request], schedule: list[float]) -> list:
    decoding, serving = DecodingParams(max_new_tokens=1), ServingParams()
    run = drive(engine, requests, decoding, serving, schedule, None, lambda n: None)
    return asyncio.run(run)


def test_requests_are_prepared_ahead_of_their_send_times() -> None:
    # 60 requests at 80/s: prepared one by one as they come, 20 ms each would leave them late;
    # prepared ahead (the first ones before the clock starts), each leaves on time.
    engine = _SlowToPrepare()
    requests = (Request(str(index), []) for index in range(60))
    sent = _drive(engine, requests, [index / 80 for index in range(60)])
    assert len(sent) == 60 and all(record.completion for record in sent)
    assert np.percentile([r.ready - r.due for r in sent], 99) < 0.01


def test_a_request_that_fails_to_load_fails_the_load() -> None:
    def requests() -> Iterator[Request]:
        yield Request("0", [])
        raise OSError("image 1 is truncated")

    with pytest.raises(OSError, match="image 1 is truncated"):
        _drive(_SlowToPrepare(), requests(), [0.0, 0.0])


# --- open loads on real engines ------------------------------------------------------------------


@needs_vllm
def test_a_rate_load_follows_its_schedule_on_vllm() -> None:
    result = run_trial(
        _trial(*VLLM_ASYNC, "load=rate", "load.rate=6", "dataset.limit=60", "slo.ttft_s=5")
    )
    metrics = result.metrics
    # The server keeps up with 6/s: the achieved rate is the schedule's (a Poisson sample of 48
    # gaps: the planned times' own rate, within 10%), and the client sent on time.
    planned = arrival_times(60, 6.0, seed=0)[6:54]
    assert metrics["achieved_rate"] == pytest.approx(47 / (planned[-1] - planned[0]), rel=0.1)
    assert metrics["send_lag_p99_s"] < 0.05 and "client_bottleneck" not in result.tags
    assert metrics["num_samples_measured"] == 48 and metrics["warmup_requests"] == 6
    assert metrics["itl_p99_s"] >= metrics["itl_p50_s"] > 0 and metrics["tpot_s"] > 0
    assert metrics["goodput_rps"] == pytest.approx(metrics["requests_per_s"])
    assert metrics["ttft_p99_s"] <= metrics["latency_p99_s"]
    assert result.tags["load"] == "rate" and "48 requests over" in result.tags["load_window"]


@needs_vllm
def test_a_flood_the_client_cannot_send_is_flagged() -> None:
    result = run_trial(_trial(*VLLM_ASYNC, "load=rate", "load.rate=100000", "dataset.limit=40"))
    assert "client, not the server, paced this run" in result.tags["client_bottleneck"]
    assert result.metrics["achieved_rate"] < 0.1 * result.metrics["target_rate"]


def test_concurrency_on_hf_continuous_batching_keeps_the_cap_and_the_answers() -> None:
    common = (*HF_TEXT, "dataset.limit=24", "max_new_tokens=6")
    offline = run_trial(_trial(*common))
    loaded = run_trial(_trial(*common, "load=concurrency", "load.concurrency=3"))
    assert 1.5 < loaded.metrics["requests_in_flight"] <= 3.0 + 1e-6
    answers = {p["question_id"]: p["outputs"] for p in offline.predictions}
    assert all(answers[p["question_id"]] == p["outputs"] for p in loaded.predictions)
    assert loaded.metrics["itl_s"] > 0 and math.isfinite(loaded.metrics["batch_efficiency"])


@pytest.mark.slow
def test_a_rate_sweep_logs_its_steps_as_child_runs(tmp_path: Path, store) -> None:
    args = [*HF_TEXT, "load=rate_sweep", "load.steps=3", "dataset.limit=16", "max_new_tokens=4"]
    result = run_cli([*args, "slo.ttft_s=2", *store["args"]], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(store["uri"])
    runs = mlflow.search_runs(experiment_names=["sweeper"], output_format="list")
    (trial,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    steps = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
    labels = sorted(r.data.tags["rate_sweep_step"] for r in steps)
    assert len(labels) == 3 and "concurrency 1" in labels and "all at once" in labels
    best = max(steps, key=lambda r: r.data.metrics["goodput_rps"])
    assert trial.data.tags["rate_sweep_step"] == best.data.tags["rate_sweep_step"]
    assert trial.data.metrics["goodput_rps"] == pytest.approx(best.data.metrics["goodput_rps"])
