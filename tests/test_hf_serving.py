"""engine=hf serving flags and the workloads.

Greedy answers must not depend on how the KV cache is kept or reused. The default tiny model's
random weights answer every prompt with the same token, which would make such a comparison
vacuous; these tests re-draw its weights larger (sweeper/models/varied.py), so that every prompt
gets its own answer, and check that they do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sweeper.cli import BadInput, preflight
from sweeper.data import LoadedSample, Sample
from sweeper.engines.base import Engine
from sweeper.engines.hf.config import HFEngineConfig, quanto_installed
from sweeper.metrics.performance import RequestTiming, summarize
from sweeper.models.varied import build_varied_vlm
from sweeper.requests import Completion, DecodingParams, ServingParams
from sweeper.tasks.config import EasyVQAConfig
from sweeper.tasks.vqa import EasyVQA
from sweeper.trial import run_trial
from sweeper.workloads.config import MultiTurnWorkloadConfig, WorkloadConfig
from sweeper.workloads.workload import MultiTurnWorkload, Workload, synthetic_system_prompt
from tests.conftest import easy_vqa_items, load_engine

TASK = EasyVQA(EasyVQAConfig())
SYSTEM = "You are a careful assistant who looks twice before answering. " * 4


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory) -> Path:
    return build_varied_vlm(tmp_path_factory.mktemp("varied"))


@pytest.fixture(scope="module")
def engine(varied_model):
    engine = load_engine(HFEngineConfig(device="cpu"), varied_model)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def items() -> list[LoadedSample]:
    return easy_vqa_items(6)


def single(system_prompt: str | None = None, images: bool = True) -> Workload:
    return Workload(WorkloadConfig(images=images), TASK, system_prompt, None)


def multi_turn(turns: int = 3) -> MultiTurnWorkload:
    return MultiTurnWorkload(MultiTurnWorkloadConfig(turns=turns), TASK, None, None)


DECODING_KEYS = {"beam_num", "num_samples", "temperature", "ignore_eos"}


def answer(engine, workload, items, batch_size: int = 3, **changes) -> list[Completion]:
    """Greedy answers of 8 tokens at most, with the decoding and serving `changes`."""
    engine.reset_prefix_cache()
    torch.manual_seed(0)
    decoding = DecodingParams(
        max_new_tokens=8, **{k: changes.pop(k) for k in DECODING_KEYS & changes.keys()}
    )
    serving = ServingParams(batch_size=batch_size, **changes)
    return workload.run(engine, items, decoding, serving)


def texts(completions: list[Completion]) -> list[list[str]]:
    return [c.texts for c in completions]


def test_greedy_answers_identical_across_kv_cache_modes(engine, items) -> None:
    workload = single(SYSTEM)
    reference = texts(answer(engine, workload, items))
    assert len({tuple(t) for t in reference}) > 1, "the model must answer prompts differently"
    modes = ["static", "off"] + (["offloaded"] if torch.cuda.is_available() else [])
    for mode in modes:
        got = texts(answer(engine, workload, items, kv_cache=mode))
        assert got == reference, mode


@pytest.mark.skipif(not quanto_installed(), reason="kv_cache=quantized needs optimum-quanto")
def test_quantized_cache_answers_every_request(engine, items) -> None:
    # 4-bit KV changes the logits, so answers may differ: agreement is reported by the benchmark.
    got = answer(engine, single(), items, kv_cache="quantized")
    assert [c.request_id for c in got] == [i.sample.question_id for i in items]
    assert all(c.timing.output_tokens > 0 for c in got)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"kv_cache": "static"},
        {"beam_num": 2, "num_samples": 2},  # one prompt run, its KV copied to each beam
        {"temperature": 0.8, "num_samples": 3},  # same seed, same samples
    ],
    ids=["greedy", "static", "beams", "samples"],
)
def test_prefix_caching_keeps_the_answers_and_reuses_the_system_prompt(
    engine, items, changes
) -> None:
    workload = single(SYSTEM)
    reference = texts(answer(engine, workload, items, **changes))
    cached = answer(engine, workload, items, prefix_caching=True, **changes)
    assert texts(cached) == reference
    reused = [c.timing.cached_prompt_tokens for c in cached]
    # The first request pays for the shared system prompt; every other one reuses it.
    assert reused[0] == 0 and all(n >= 64 for n in reused[1:]), reused


def _hit_rate(completions: list[Completion]) -> float:
    return summarize([c.timing for c in completions], 1.0)["prefix_cache_hit_rate"]


def test_hit_rate_is_zero_when_prompts_share_no_prefix(engine, items) -> None:
    # Each request's system prompt differs from its first word on: nothing to reuse.
    distinct = [single(f"{index} {SYSTEM}").request(item) for index, item in enumerate(items)]
    engine.reset_prefix_cache()
    completions = engine.run(
        distinct, DecodingParams(max_new_tokens=8), ServingParams(3, prefix_caching=True)
    )
    assert _hit_rate(completions) == 0.0
    shared = answer(engine, single(SYSTEM), items, prefix_caching=True)
    assert _hit_rate(shared) > 0.3


def test_multi_turn_reuses_the_conversation_so_far(engine) -> None:
    loaded = easy_vqa_items(12)  # two images, several questions each
    workload = multi_turn(3)
    by_id = {item.sample.question_id: item for item in loaded}
    turns = [by_id[s.question_id] for s in workload.arrange([i.sample for i in loaded])]
    reference = answer(engine, workload, turns, batch_size=2)
    cached = answer(engine, workload, turns, batch_size=2, prefix_caching=True)
    assert texts(cached) == texts(reference)
    # A first turn (the shortest prompts) reuses at most the chat template's opening; a later
    # turn reuses most of its prompt: the earlier turns' prompt and answer.
    shortest = min(c.timing.prompt_tokens for c in cached)
    firsts = [c for c in cached if c.timing.prompt_tokens < shortest + 20]
    laters = [c for c in cached if c.timing.prompt_tokens >= shortest + 20]
    assert len(laters) >= 4
    assert all(c.timing.cached_prompt_tokens >= c.timing.prompt_tokens // 2 for c in laters)
    assert all(c.timing.cached_prompt_tokens < 32 for c in firsts)


def test_continuous_batching_matches_static_batches_on_text(engine, items) -> None:
    workload = single(SYSTEM, images=False)
    reference = texts(answer(engine, workload, items))
    continuous = answer(engine, workload, items, continuous_batching=True)
    assert texts(continuous) == reference
    shared = answer(engine, workload, items, continuous_batching=True, prefix_caching=True)
    assert texts(shared) == reference and _hit_rate(shared) > 0


def test_shared_prefix_system_prompt_has_the_asked_length(engine) -> None:
    for tokens in (50, 300):
        text = synthetic_system_prompt(tokens, engine.count_tokens)
        assert tokens <= engine.count_tokens(text) < tokens + 8


class RecordingEngine(Engine):
    """Answers '<question> done' and keeps the messages of every request it was sent."""

    device = "cpu"

    def __init__(self) -> None:
        self.sent: dict[str, list[dict]] = {}

    def synchronize(self) -> None:
        pass

    def generate(self, requests, decoding, serving) -> list[Completion]:
        timing = RequestTiming(0.0, 0.0, 0.0, 0.0, None, 1, 1)
        for request in requests:
            self.sent[request.id] = request.messages
        question = {"a": "qa?", "b": "qb?", "c": "qc?", "d": "qd?", "x": "qx?"}
        return [Completion(r.id, [f"{question[r.id]} done"], [[0]], timing) for r in requests]

    def close(self) -> None:
        pass


def _sample(question_id: str, image_id: int) -> LoadedSample:
    sample = Sample(question_id, f"q{question_id}?", ["a"], lambda: None, {"image_id": image_id})
    return LoadedSample(sample, None, 0.0)


def test_multi_turn_history_grows_turn_by_turn() -> None:
    # Image 1 has four questions (turns=3: a conversation of three, then one of one), image 2
    # one; `arrange` brings an image's questions together.
    order = [("a", 1), ("x", 2), ("b", 1), ("c", 1), ("d", 1)]
    workload = multi_turn(3)
    samples = workload.arrange([_sample(q, image).sample for q, image in order])
    assert [s.question_id for s in samples] == ["a", "b", "c", "d", "x"]
    engine = RecordingEngine()
    items = [LoadedSample(s, None, 0.0) for s in samples]
    completions = workload.run(engine, items, DecodingParams(max_new_tokens=8), ServingParams(2))
    assert sorted(c.request_id for c in completions) == ["a", "b", "c", "d", "x"]

    def turns(question_id: str) -> list[tuple[str, str]]:
        messages = engine.sent[question_id]
        return [
            (m["role"], m["content"] if isinstance(m["content"], str) else "") for m in messages
        ]

    roles = {q: [role for role, _ in turns(q)] for q in engine.sent}
    assert roles["a"] == ["user"]
    assert roles["b"] == ["user", "assistant", "user"]
    assert roles["c"] == ["user", "assistant", "user", "assistant", "user"]
    assert roles["d"] == roles["x"] == ["user"]  # a new conversation each
    assert [text for role, text in turns("c") if role == "assistant"] == ["qa? done", "qb? done"]
    # The image is in the first turn only.
    images = [
        part
        for m in engine.sent["c"]
        if isinstance(m["content"], list)
        for part in m["content"]
        if part["type"] == "image"
    ]
    assert len(images) == 1


def _trial(*overrides: str):
    with initialize_config_module("sweeper.conf", version_base=None):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def test_trial_hit_rate_on_shared_prefix_and_not_on_single(varied_model) -> None:
    common = [
        "model=custom",
        f"model.path={varied_model}",
        "engine.device=cpu",
        "dataset.limit=4",
        "batch_size=2",
        "max_new_tokens=4",
        "calibration_samples=2",
    ]
    shared = run_trial(
        _trial(
            *common,
            "workload=shared_prefix",
            "workload.system_prompt_tokens=64",
            "prefix_caching=true",
        )
    )
    assert shared.metrics["prefix_cache_hit_rate"] > 0.2
    single = run_trial(_trial(*common, "prefix_caching=false"))
    assert single.metrics["prefix_cache_hit_rate"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        (["kv_cache=off", "prefix_caching=true"], "kv_cache", "with prefix_caching=true"),
        (["continuous_batching=true"], "continuous_batching", "false with images"),
        (
            ["continuous_batching=true", "workload.images=false", "beam_num=2"],
            "beam_num",
            "1 with continuous_batching=true",
        ),
        (
            ["continuous_batching=true", "workload.images=false", "kv_cache=static"],
            "kv_cache",
            "dynamic with continuous_batching=true",
        ),
        (["engine.compile=true"], "engine.compile", "false unless kv_cache=static"),
        (["kv_cache=offloaded", "engine.device=cpu"], "kv_cache", "on a CPU"),
        (["workload=multi_sample"], "num_samples", "with workload=multi_sample"),
        (["workload=shared_prefix", "system_prompt=hi"], "system_prompt", "null with"),
        (["workload=multi_turn", "workload.turns=0"], "workload.turns", "an integer >= 1"),
    ],
)
def test_bad_combinations_fail_before_loading(overrides, key, allowed) -> None:
    with pytest.raises(BadInput) as error:
        preflight(overrides)
    message = str(error.value)
    assert "\n" not in message and f"'{key}'" in message and allowed in message, message


def test_quantized_without_its_backend_is_refused(monkeypatch) -> None:
    monkeypatch.setattr("sweeper.engines.hf.config.quanto_installed", lambda: False)
    with pytest.raises(BadInput, match=r"'kv_cache': 'quantized'.*pip install optimum-quanto"):
        preflight(["kv_cache=quantized"])
