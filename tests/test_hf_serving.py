"""engine=hf serving flags and the workloads.

Greedy answers must not depend on how the KV cache is kept or reused. The default tiny model's
random weights answer every prompt with the same token, which would make such a comparison
vacuous; these tests re-draw its weights larger (sweeper/models/varied.py), so that every prompt
gets its own answer, and check that they do.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sweeper.cli import BadInput, preflight
from sweeper.config import EasyVQAConfig, HFEngineConfig
from sweeper.data import LoadedSample, VQASample, load_samples, prefetch
from sweeper.engines.base import Completion, DecodingParams, Engine
from sweeper.engines.hf import HFEngine, quanto_installed
from sweeper.metrics.performance import RequestTiming, summarize
from sweeper.models.varied import build_varied_vlm
from sweeper.prompt import vqa_messages
from sweeper.trial import run_trial
from sweeper.workloads import MultiTurnWorkload, Workload, synthetic_system_prompt

SYSTEM = "You are a careful assistant who looks twice before answering. " * 4


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory) -> Path:
    return build_varied_vlm(tmp_path_factory.mktemp("varied"))


@pytest.fixture(scope="module")
def engine(varied_model):
    engine = HFEngine(HFEngineConfig(device="cpu"), str(varied_model))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def items() -> list[LoadedSample]:
    samples, _ = load_samples(EasyVQAConfig(limit=6))
    return list(prefetch(samples, 8))


def decoding(**changes) -> DecodingParams:
    greedy = DecodingParams(
        beam_num=1, max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0, num_samples=1, seed=0
    )
    return replace(greedy, **changes)


def answer(engine, workload, items, params, batch_size: int = 3) -> list[Completion]:
    engine.reset_prefix_cache()
    torch.manual_seed(0)
    return workload.run(engine, items, params, batch_size)


def texts(completions: list[Completion]) -> list[list[str]]:
    return [c.texts for c in completions]


def test_greedy_answers_identical_across_kv_cache_modes(engine, items) -> None:
    workload = Workload(system_prompt=SYSTEM)
    reference = texts(answer(engine, workload, items, decoding()))
    assert len({tuple(t) for t in reference}) > 1, "the model must answer prompts differently"
    modes = ["static", "off"] + (["offloaded"] if torch.cuda.is_available() else [])
    for mode in modes:
        got = texts(answer(engine, workload, items, decoding(kv_cache=mode)))
        assert got == reference, mode


@pytest.mark.skipif(not quanto_installed(), reason="kv_cache=quantized needs optimum-quanto")
def test_quantized_cache_answers_every_request(engine, items) -> None:
    # 4-bit KV changes the logits, so answers may differ: agreement is reported by the benchmark.
    got = answer(engine, Workload(), items, decoding(kv_cache="quantized"))
    assert [c.question_id for c in got] == [i.sample.question_id for i in items]
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
    workload = Workload(system_prompt=SYSTEM)
    reference = texts(answer(engine, workload, items, decoding(**changes)))
    cached = answer(engine, workload, items, decoding(prefix_caching=True, **changes))
    assert texts(cached) == reference
    reused = [c.timing.cached_prompt_tokens for c in cached]
    # The first request pays for the shared system prompt; every other one reuses it.
    assert reused[0] == 0 and all(n >= 64 for n in reused[1:]), reused


def _hit_rate(completions: list[Completion]) -> float:
    return summarize([c.timing for c in completions], 1.0)["prefix_cache_hit_rate"]


def test_hit_rate_is_zero_when_prompts_share_no_prefix(engine, items) -> None:
    # Each request's system prompt differs from its first word on: nothing to reuse.
    distinct = [
        replace(item, messages=vqa_messages(item.sample.question, f"{index} {SYSTEM}"))
        for index, item in enumerate(items)
    ]
    engine.reset_prefix_cache()
    completions = engine.run(distinct, decoding(prefix_caching=True), 3)
    assert _hit_rate(completions) == 0.0
    shared = answer(engine, Workload(system_prompt=SYSTEM), items, decoding(prefix_caching=True))
    assert _hit_rate(shared) > 0.3


def test_multi_turn_reuses_the_conversation_so_far(engine) -> None:
    samples, _ = load_samples(EasyVQAConfig(limit=12))  # two images, several questions each
    workload = MultiTurnWorkload(turns=3)
    turns = list(prefetch(workload.arrange(samples), 8))
    reference = answer(engine, workload, turns, decoding(), batch_size=2)
    cached = answer(engine, workload, turns, decoding(prefix_caching=True), batch_size=2)
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
    workload = Workload(images=False, system_prompt=SYSTEM)
    reference = texts(answer(engine, workload, items, decoding()))
    continuous = answer(engine, workload, items, decoding(continuous_batching=True))
    assert texts(continuous) == reference
    shared = answer(
        engine, workload, items, decoding(continuous_batching=True, prefix_caching=True)
    )
    assert texts(shared) == reference and _hit_rate(shared) > 0


def test_shared_prefix_system_prompt_has_the_asked_length(engine) -> None:
    for tokens in (50, 300):
        text = synthetic_system_prompt(tokens, engine.count_tokens)
        assert tokens <= engine.count_tokens(text) < tokens + 8


class RecordingEngine(Engine):
    """Answers '<question> done' and keeps the messages of every request it was sent."""

    name = "recording"
    device = "cpu"

    def __init__(self) -> None:
        self.sent: dict[str, list[dict]] = {}

    def synchronize(self) -> None:
        pass

    def generate_batch(self, batch, decoding) -> list[Completion]:
        timing = RequestTiming(0.0, 0.0, 0.0, 0.0, None, 1, 1)
        for item in batch:
            self.sent[item.sample.question_id] = item.messages
        return [
            Completion(i.sample.question_id, [f"{i.sample.question} done"], timing) for i in batch
        ]

    def close(self) -> None:
        pass


def _sample(question_id: str, image_id: int) -> LoadedSample:
    sample = VQASample(question_id, f"q{question_id}?", ["a"], lambda: None, {"image_id": image_id})
    return LoadedSample(sample, None, 0.0)


def test_multi_turn_history_grows_turn_by_turn() -> None:
    # Image 1 has four questions (turns=3: a conversation of three, then one of one), image 2
    # one; `arrange` brings an image's questions together.
    order = [("a", 1), ("x", 2), ("b", 1), ("c", 1), ("d", 1)]
    workload = MultiTurnWorkload(turns=3)
    samples = workload.arrange([_sample(q, image).sample for q, image in order])
    assert [s.question_id for s in samples] == ["a", "b", "c", "d", "x"]
    engine = RecordingEngine()
    items = [LoadedSample(s, None, 0.0) for s in samples]
    completions = workload.run(engine, items, decoding(), batch_size=2)
    assert sorted(c.question_id for c in completions) == ["a", "b", "c", "d", "x"]

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
    monkeypatch.setattr("sweeper.engines.hf.quanto_installed", lambda: False)
    with pytest.raises(BadInput, match=r"'kv_cache': 'quantized'.*pip install optimum-quanto"):
        preflight(["kv_cache=quantized"])
