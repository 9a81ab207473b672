"""Bad input: one line naming key, value and what is allowed; exit 2; no model loaded."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from sweeper.cli import BadInput, preflight
from tests.conftest import run_cli


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("beam_num=0", "beam_num", "an integer >= 1"),
        ("max_new_tokens=0", "max_new_tokens", "an integer >= 1"),
        ("temperature=-0.5", "temperature", "a finite number >= 0"),
        ("temperature=inf", "temperature", "a finite number >= 0"),
        ("budget_gb=inf", "budget_gb", "a number of GiB > 0"),
        ("budget_gb=nan", "budget_gb", "a number of GiB > 0"),
        ("top_k=-1", "top_k", "an integer >= 0"),
        ("top_p=0", "top_p", "a number in (0, 1]"),
        ("top_p=1.5", "top_p", "a number in (0, 1]"),
        ("num_samples=0", "num_samples", "an integer >= 1"),
        ("batch_size=0", "batch_size", "an integer >= 1"),
        ("kv_cache=paged", "kv_cache", "one of dynamic"),
        ("dataset.limit=0", "dataset.limit", "an integer >= 1"),
        ("dataset.on_error=ignore", "dataset.on_error", "one of raise, skip"),
        ("engine.device=tpu", "engine.device", "one of auto, cpu, cuda"),
        ("continuous_batching=true", "continuous_batching", "false with images"),
        ("engine.decode_loop=eager", "engine.decode_loop", "one of generate, graphed"),
        ("engine.attn_implementation=flash", "engine.attn_implementation", "sdpa, sdpa_gqa, eager"),
    ],
)
def test_out_of_range_values(override: str, key: str, allowed: str) -> None:
    value = override.split("=", 1)[1]
    with pytest.raises(BadInput) as error:
        preflight([override])
    message = str(error.value)
    assert "\n" not in message
    assert f"'{key}'" in message and value.lower() in message.lower() and allowed in message


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        (["engine.frontend=sync"], "engine.frontend", "one of llm, async"),
        (["engine.kv_cache_dtype=int3"], "engine.kv_cache_dtype", "one of auto, float16"),
        (["engine.renderer_num_workers=0"], "engine.renderer_num_workers", "an integer >= 1"),
        (["engine.renderer_num_workers=2"], "engine.renderer_num_workers", "engine.frontend=llm"),
        (
            ["engine.frontend=async", "engine.renderer_num_workers=2"],
            "engine.renderer_num_workers",
            "unless engine.mm_processor_cache_gb=0",
        ),
        (
            ["engine.renderer_num_workers=2", "engine.mm_processor_cache_gb=0"],
            "engine.renderer_num_workers",
            "engine.frontend=llm",
        ),
    ],
)
def test_vllm_frontend_keys(overrides: list[str], key: str, allowed: str) -> None:
    # Refused by the config itself, so without vLLM installed too.
    with pytest.raises(BadInput) as error:
        preflight(["engine=vllm", *overrides])
    message = str(error.value)
    assert "\n" not in message and f"'{key}'" in message and allowed in message, message


GRAPHED = ["engine.decode_loop=graphed", "kv_cache=static", "engine.compile=true"]


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        (GRAPHED[:2], "engine.compile", "true with engine.decode_loop=graphed"),
        ([GRAPHED[0], GRAPHED[2]], "kv_cache", "static with engine.decode_loop=graphed"),
        ([*GRAPHED, "beam_num=2"], "beam_num", "1 with engine.decode_loop=graphed"),
        ([*GRAPHED, "prefix_caching=true"], "prefix_caching", "false with engine.decode_loop"),
        (
            [*GRAPHED, "continuous_batching=true", "workload.images=false"],
            "continuous_batching",
            "false with engine.decode_loop=graphed",
        ),
    ],
)
def test_graphed_decode_loop_needs_its_combination(overrides, key, allowed) -> None:
    with pytest.raises(BadInput) as error:
        preflight(overrides)
    message = str(error.value)
    assert "\n" not in message and f"'{key}'" in message and allowed in message, message


def test_graphed_decode_loop_with_its_combination_is_accepted() -> None:
    preflight([*GRAPHED, "temperature=0.7", "num_samples=3"])


def test_sdpa_gqa_is_refused_with_continuous_batching() -> None:
    overrides = ["continuous_batching=true", "workload.images=false"]
    preflight(overrides)
    with pytest.raises(BadInput) as error:
        preflight([*overrides, "engine.attn_implementation=sdpa_gqa"])
    message = str(error.value)
    assert "\n" not in message and "'engine.attn_implementation': 'sdpa_gqa'" in message, message
    assert "sdpa or eager with continuous_batching=true" in message


def test_unknown_key_lists_known_keys() -> None:
    with pytest.raises(BadInput, match=r"unknown key 'beams' \(value '3'\).*beam_num"):
        preflight(["beams=3"])


def test_unknown_nested_key() -> None:
    with pytest.raises(BadInput, match=r"unknown key 'dataset.limt'.*dataset.limit"):
        preflight(["dataset.limt=3"])


def test_non_numeric_value() -> None:
    with pytest.raises(BadInput, match=r"'beam_num': 'three' \(allowed: a value of type integer"):
        preflight(["beam_num=three"])
    with pytest.raises(BadInput, match=r"'temperature': 'hot' \(allowed: a value of type float"):
        preflight(["temperature=hot"])


def test_unknown_group_option() -> None:
    with pytest.raises(
        BadInput, match=r"invalid value for 'model': 'nope' \(allowed: .*tiny_random"
    ):
        preflight(["model=nope"])


def test_missing_model_path(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(BadInput, match=r"'model.path': '.*no-such-model' \(allowed: an existing"):
        preflight(["model=custom", f"model.path={missing}"])


def test_a_hub_id_the_hub_cannot_serve_is_one_line_in_seconds(monkeypatch) -> None:
    # A hub id is not a missing path: its config is read from the hub cache, else the hub.
    # With the hub out of reach (this machine has no internet; a closed port stands in for it
    # where there is one), one line names it at once instead of half a minute of retries.
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(BadInput) as error:
        preflight(["model=custom", "model.path=nobody/no-such-model"])
    message = str(error.value)
    assert "\n" not in message and "'model.path': 'nobody/no-such-model'" in message, message
    assert "127.0.0.1 is unreachable" in message, message
    assert time.perf_counter() - start < 10


def test_grid_with_a_typo_fails_before_any_trial() -> None:
    with pytest.raises(BadInput, match="unknown key 'temprature'"):
        preflight(["-m", "beam_num=1,2", "temprature=0,0.7"])


def test_grid_leaves_range_checks_to_each_trial() -> None:
    preflight(["-m", "temperature=0,-1"])  # the bad trial is recorded FAILED at run time


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["engine=vlm"], "'engine': 'vlm' (did you mean 'vllm'? allowed: hf, openai, vllm)"),
        (["kv_cache=statc"], "did you mean 'static'? allowed: one of dynamic"),
        (["temprature=1"], "did you mean 'temperature'?"),
        (["beam_num=1,2"], "'beam_num=1,2' is a sweep: add -m (--multirun)"),
        (["-m", "hydra/sweeper=paretto"], "'hydra/sweeper': 'paretto' (did you mean 'pareto'?"),
        (
            ["-m", "hydra/sweeper=pareto", "hydra.sweeper.n_trial=4"],
            "did you mean 'hydra.sweeper.n_trials'?",
        ),
        (
            ["-m", "hydra/sweeper=pareto", "hydra.sweeper.objectives=accuracy"],
            "'hydra.sweeper.objectives': 'accuracy' (allowed: a list",
        ),
    ],
)
def test_typos_get_a_did_you_mean_in_one_line(args: list[str], message: str) -> None:
    with pytest.raises(BadInput) as error:
        preflight(args)
    text = str(error.value)
    assert "\n" not in text and message in text, text


@pytest.mark.parametrize(
    "args",
    [
        ["beam_num=0"],
        ["unknown_key=1"],
        ["beam_num=x"],
        ["model=custom", "model.path=/nonexistent/model"],
        ["engine=vllm", "engine.frontend=async", "engine.renderer_num_workers=2"],
    ],
)
def test_cli_exits_2_with_one_line(args: list[str], tmp_path, store) -> None:
    start = time.monotonic()
    result = run_cli(args + store["args"], cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sweeper: error:"), result.stderr
    assert elapsed < 30
    # No model was loaded and no run was made: the MLflow store was never created.
    assert not (tmp_path / "mlflow.db").exists()


def test_an_unknown_engine_key_lists_that_engines_keys() -> None:
    with pytest.raises(BadInput) as error:
        preflight(["engine=vllm", "engine.devic=cpu"])
    message = str(error.value)
    assert "unknown key 'engine.devic' (value 'cpu'); did you mean 'engine.device'?" in message
    assert "engine.gpu_memory_utilization" in message, message
    assert "engine.decode_loop" not in message and "_target_" not in message  # engine=hf's
    with pytest.raises(BadInput) as error:
        preflight(["engine.max_num_seqs=4"])  # a vLLM key under engine=hf
    assert "engine.decode_loop" in str(error.value) and "engine.gpu_memory" not in str(error.value)


def _model_copy(tmp_path: Path) -> Path:
    from sweeper.config import asset_path

    folder = tmp_path / "model"
    shutil.copytree(asset_path("tiny_vlm"), folder)
    return folder


def test_a_truncated_weight_file_is_named_before_any_load(tmp_path) -> None:
    folder = _model_copy(tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(BadInput) as error:
        preflight(["model=custom", f"model.path={folder}"])
    message = str(error.value)
    assert "\n" not in message and f"invalid value for 'model.path': '{folder}'" in message
    assert f"{weights}: truncated: {len(data) // 2} bytes, its tensors need {len(data)}" in message


def test_a_corrupt_config_json_is_named(tmp_path) -> None:
    folder = _model_copy(tmp_path)
    (folder / "config.json").write_text('{"model_type": "qwen2_5_vl", ')
    with pytest.raises(BadInput) as error:
        preflight(["model=custom", f"model.path={folder}"])
    message = str(error.value)
    assert "\n" not in message and f"{folder / 'config.json'}: " in message, message
