"""Architecture-only model folders (no weight files) through both engines, with outputs of a
fixed length: what the GPU study of experiments/okvqa_replica runs, shrunk to CPU size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sweeper.config import ConfigError, TrialConfig, register_configs
from sweeper.engines import ENGINE_CACHE
from sweeper.engines.hf.generation import cache_kwargs
from sweeper.models import has_weights
from sweeper.models.qwen_arch import build_qwen2_5_vl_arch
from sweeper.trial import run_trial
from tests.conftest import SMALL_QWEN_TEXT, SMALL_QWEN_VISION

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def arch_folder(tmp_path_factory) -> Path:
    folder = build_qwen2_5_vl_arch(
        tmp_path_factory.mktemp("arch") / "small",
        text_overrides=SMALL_QWEN_TEXT,
        vision_overrides=SMALL_QWEN_VISION,
    )
    yield folder
    ENGINE_CACHE.clear()


def _trial(folder: Path, *overrides: str) -> TrialConfig:
    register_configs()
    with initialize_config_module("sweeper.conf", version_base=None):
        cfg = compose(
            "config",
            overrides=[
                "model=custom",
                f"model.path={folder}",
                "model.random_weights=true",
                "dataset.limit=4",
                "batch_size=2",
                f"max_new_tokens={NEW_TOKENS}",
                "ignore_eos=true",
                *overrides,
            ],
        )
        return OmegaConf.to_object(cfg)


def _check_fixed_length(result) -> None:
    assert [p["output_tokens"] for p in result.predictions] == [NEW_TOKENS] * 4
    assert result.tags["random_weights"] == "random weights: accuracy is meaningless"


def test_folder_has_no_weights_and_hub_ids_are_assumed_to(arch_folder: Path) -> None:
    assert not has_weights(str(arch_folder))
    assert has_weights("Qwen/Qwen2.5-VL-7B-Instruct")


def test_a_weightless_folder_needs_random_weights_said(arch_folder: Path) -> None:
    with pytest.raises(ConfigError, match="model.random_weights=true"):
        _trial(arch_folder, "model.random_weights=false")


def test_hf_initialises_random_weights_and_generates_exactly_max_new_tokens(arch_folder) -> None:
    for kv_cache in ("dynamic", "static"):
        _check_fixed_length(run_trial(_trial(arch_folder, "engine=hf", f"kv_cache={kv_cache}")))
    # Without ignore_eos the same model is free to stop early; the count is then at most the cap.
    free = run_trial(_trial(arch_folder, "engine=hf", "ignore_eos=false"))
    assert all(p["output_tokens"] <= NEW_TOKENS for p in free.predictions)


def test_static_cache_is_sized_to_a_power_of_two() -> None:
    assert cache_kwargs("static", None, length=441 + 100)["max_cache_len"] == 1024
    assert cache_kwargs("static", None, length=512)["max_cache_len"] == 512
    assert "max_cache_len" not in cache_kwargs("dynamic", None, length=541)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_loads_dummy_weights_and_generates_exactly_max_new_tokens(arch_folder) -> None:
    # With the frontend's image path changed too: no processed-image cache, shared-memory IPC.
    frontend = ("engine.mm_processor_cache_gb=0", "engine.mm_tensor_ipc=torch_shm")
    engine = ("engine=vllm", "engine.enforce_eager=true", "engine.max_model_len=2048")
    result = run_trial(_trial(arch_folder, *engine, *frontend))
    _check_fixed_length(result)
    assert result.tags["vllm_load_format"] == "dummy"
