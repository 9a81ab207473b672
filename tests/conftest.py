"""Shared test helpers: run the real CLI in a subprocess against a throwaway MLflow store; build
an engine for a model folder; easy-VQA questions as requests (a padded batch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A Qwen2.5-VL-7B-architecture folder shrunk to CPU size (sweeper.models.qwen_arch overrides):
# head size 32, the smallest vLLM's CPU attention has a kernel for.
SMALL_QWEN_TEXT = {
    "num_hidden_layers": 2,
    "max_window_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
SMALL_QWEN_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 128,
    "fullatt_block_indexes": [1],
}
# engine=openai on a `vllm serve` sweeper starts; no torch.compile: the server starts in tens of
# seconds instead of compiling first.
OPENAI_VLLM = (
    "engine=openai",
    "engine.server=vllm",
    "+engine.server_args.enforce_eager=true",
    "+engine.server_args.max_model_len=2048",
)


def cli_env() -> dict[str, str]:
    """This environment, minus what a sweep in the test process itself would hand its trials."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SWEEPER_PARENT_RUN_ID", None)
    env.pop("SWEEPER_SWEEP_ID", None)
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sweeper", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`python -m sweeper ARGS` in the background, its output to `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "sweeper", *args],
        cwd=cwd,
        env=cli_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def store(tmp_path: Path) -> dict[str, str]:
    """Overrides that point a run at a fresh SQLite MLflow store and sweep dir under tmp_path."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return {
        "uri": uri,
        "args": [
            f"tracking.uri={uri}",
            f"tracking.artifact_location={tmp_path / 'artifacts'}",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
    }


def compose_trial(*overrides: str):
    """The validated TrialConfig the CLI would run for `overrides`."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import sweeper.cli  # noqa: F401  (registers the config groups)

    with initialize_config_module("sweeper.conf", version_base=None):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def cached_engine(trial):
    """The engine the trial loads (or reuses) through the engine cache, as run_trial does."""
    from sweeper.engines import ENGINE_CACHE

    return ENGINE_CACHE.get(trial.engine, trial.model, trial.engine.load_options(trial)).engine


@pytest.fixture(scope="module")
def free_engine_cache():
    """Close the cached engine (and its processes) when the module's tests are done."""
    from sweeper.engines import ENGINE_CACHE

    yield ENGINE_CACHE
    ENGINE_CACHE.clear()


def trial_requests(trial, engine) -> list:
    """The requests the trial's workload sends for its task's samples, in order."""
    from sweeper.data import prefetch
    from sweeper.tasks import task_class
    from sweeper.workloads import build_workload

    task = task_class(trial.dataset)(trial.dataset)
    samples, _ = task.load()
    workload = build_workload(trial, task, engine)
    return [workload.request(item) for item in prefetch(samples, 8)]


def offline_vllm_answers(*overrides: str) -> list[list[str]]:
    """The offline engine=vllm's answers (every sequence's text, per request) to the questions
    of the trial `overrides` make (greedy by default), in its static batches: the reference an
    engine=openai serving the same model is held to."""
    from sweeper.requests import DecodingParams, ServingParams

    trial = compose_trial("engine=vllm", "engine.enforce_eager=true", *overrides)
    engine = load_engine(trial.engine, trial.model.path, **trial.engine.load_options(trial))
    try:
        decoding, serving = DecodingParams.from_trial(trial), ServingParams.from_trial(trial)
        completions = engine.run(trial_requests(trial, engine), decoding, serving)
        return [completion.texts for completion in completions]
    finally:
        engine.close()


def load_engine(engine_cfg, path, chat_template: str | None = None, **options):
    """The engine `engine_cfg` names, loaded on the model at `path` (as EngineCache builds it)."""
    from sweeper.engines import engine_class
    from sweeper.engines.toolkit.chat import chat_prompts
    from sweeper.models.info import model_info

    chat = chat_prompts(model_info(str(path)), chat_template)
    return engine_class(engine_cfg)(engine_cfg, chat, **options)


def task_samples(dataset_cfg) -> tuple[list, object]:
    """The samples (and the load report) of the task `dataset_cfg` names."""
    from sweeper.tasks import task_class

    return task_class(dataset_cfg)(dataset_cfg).load()


def easy_vqa_items(limit: int, split: str = "test", text: bool = False) -> list:
    """The first `limit` easy-VQA questions, images decoded (`text`: without images)."""
    from sweeper.data import prefetch
    from sweeper.tasks.config import EasyVQAConfig, EasyVQATextConfig
    from sweeper.tasks.text import EasyVQAText
    from sweeper.tasks.vqa import EasyVQA

    task = (
        EasyVQAText(EasyVQATextConfig(limit=limit))
        if text
        else EasyVQA(EasyVQAConfig(limit=limit, split=split))
    )
    samples, _ = task.load()
    return list(prefetch(samples, 8))


def vqa_requests(items: list, system_prompt: str | None = None, images: bool = True) -> list:
    """Loaded easy-VQA samples as the requests workload=single sends."""
    from sweeper.tasks.config import EasyVQAConfig
    from sweeper.tasks.vqa import EasyVQA
    from sweeper.workloads.config import WorkloadConfig
    from sweeper.workloads.workload import Workload

    workload = Workload(
        WorkloadConfig(images=images), EasyVQA(EasyVQAConfig()), system_prompt, None
    )
    return [workload.request(item) for item in items]


@pytest.fixture(scope="session")
def items() -> list:
    """easy-VQA questions of 4, 6, 8 and 5 words as requests, images loaded: the first three
    make a left-padded batch, which gives every decoder layer an attention mask."""
    loaded = easy_vqa_items(30)
    by_words = {len(item.sample.question.split()): item for item in loaded}
    return vqa_requests([by_words[words] for words in (4, 6, 8, 5)])
