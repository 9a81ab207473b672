"""engine.decode_loop=graphed against an independent reference: transformers' `model.generate`
on a static cache (eager), given the same batch by the same engine code.

CPU, inductor (compile mode "default"). Each (model, rows, greedy or sampling) compiles once,
~17 s on a 2-core machine with a cold inductor cache: the tests share the engines and four
shapes (one cache length per model).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sweeper.config import ConfigError, TrialConfig, asset_path, register_configs
from sweeper.engines.hf.config import HFEngineConfig
from sweeper.engines.hf.engine import HFEngine
from sweeper.metrics import HEADLINE_METRICS
from sweeper.models.qwen_arch import build_qwen2_5_vl_arch
from sweeper.requests import DecodingParams, Request, ServingParams
from sweeper.trial import run_trial
from tests.conftest import SMALL_QWEN_TEXT, SMALL_QWEN_VISION, load_engine, run_cli

NEW_TOKENS = 12
GREEDY = DecodingParams(max_new_tokens=NEW_TOKENS)
STATIC = ServingParams(batch_size=3, kv_cache="static")


def _pair(path: str) -> tuple[HFEngine, HFEngine]:
    """The reference (`generate`, kv_cache=static, not compiled) and the graphed engine, with the
    same weights (a weightless folder's random ones are drawn from the same seed)."""
    torch.manual_seed(0)
    reference = load_engine(HFEngineConfig(device="cpu"), path)
    torch.manual_seed(0)
    graphed = load_engine(HFEngineConfig(device="cpu", compile=True, decode_loop="graphed"), path)
    return reference, graphed


@pytest.fixture(scope="module")
def tiny():
    engines = _pair(asset_path("tiny_vlm"))
    yield engines
    for engine in engines:
        engine.close()


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    """Qwen2.5-VL-7B's architecture shrunk, random weights: the real processor and vocabulary,
    and the checkpoint's generation_config (repetition_penalty 1.05)."""
    folder = build_qwen2_5_vl_arch(
        tmp_path_factory.mktemp("arch") / "small",
        text_overrides=SMALL_QWEN_TEXT,
        vision_overrides=SMALL_QWEN_VISION,
    )
    engines = _pair(str(folder))
    yield engines
    for engine in engines:
        engine.close()


def _tokens(
    engine: HFEngine, items: list[Request], decoding: DecodingParams
) -> tuple[list[list[int]], list[int]]:
    """The batch's new tokens (padding after EOS included), and its prompts' lengths."""
    inputs = engine._inputs(items)
    run, _ = engine._decode(inputs, [], decoding, STATIC)
    return run.tokens, inputs["attention_mask"].sum(dim=1).tolist()


def assert_same_tokens(engines: list[HFEngine], items: list[Request]) -> None:
    """The second engine's greedy tokens are the first's, ending at EOS or not; both closed."""
    try:
        for ignore_eos in (False, True):
            decoding = replace(GREEDY, ignore_eos=ignore_eos)
            expected, _ = _tokens(engines[0], items, decoding)
            got, _ = _tokens(engines[1], items, decoding)
            assert got == expected, ignore_eos
    finally:
        for engine in engines:
            engine.close()


# The random architecture on the left-padded batch only: another shape is another compile.
@pytest.mark.parametrize(("model", "rows"), [("tiny", 1), ("tiny", 3), ("arch", 3)])
def test_greedy_tokens_are_generates(model, rows, request, items) -> None:
    reference, graphed = request.getfixturevalue(model)
    for ignore_eos in (False, True):
        decoding = replace(GREEDY, ignore_eos=ignore_eos)
        expected, lengths = _tokens(reference, items[:rows], decoding)
        assert len(set(lengths)) == rows, lengths  # a batch is left-padded: lengths all differ
        got, _ = _tokens(graphed, items[:rows], decoding)
        assert got == expected, ignore_eos
        if ignore_eos:
            assert all(len(row) == NEW_TOKENS for row in got)
        elif model == "tiny":  # the trained model answers in a word, then EOS
            assert all(len(row) < NEW_TOKENS for row in got)


def test_a_sequence_ending_first_pads_as_in_generate(arch, items, monkeypatch) -> None:
    reference, graphed = arch
    answers, _ = _tokens(reference, items[:3], replace(GREEDY, ignore_eos=True))
    # A token first met mid-way through the first answer made an EOS: that sequence ends there,
    # the batch goes on, and it emits padding, in `generate` as in the graphed loop.
    end = next(i for i in range(4, NEW_TOKENS) if answers[0][i] not in answers[0][:i])
    for engine in (reference, graphed):
        config = engine.model.generation_config
        monkeypatch.setattr(config, "eos_token_id", [*config.eos_token_id, answers[0][end]])
    expected, _ = _tokens(reference, items[:3], GREEDY)
    assert len(expected[0]) > end + 1, "another sequence runs on"
    assert expected[0][end + 1 :] == [reference.pad_id] * (len(expected[0]) - end - 1)
    got, _ = _tokens(graphed, items[:3], GREEDY)
    assert got == expected


def test_the_step_launched_after_the_last_is_dropped(tiny, items, monkeypatch) -> None:
    """The loop launches step i+1 before it reads step i's flag: when every sequence has ended
    before max_new_tokens, one step ran in vain, and neither its tokens nor its time count."""
    reference, graphed = tiny
    expected, _ = reference._decode(reference._inputs(items[:3]), [], GREEDY, STATIC)
    launches = []
    launch = graphed.graphed._launch
    monkeypatch.setattr(
        graphed.graphed, "_launch", lambda *args: launches.append(args[-1]) or launch(*args)
    )
    run, _ = graphed._decode(graphed._inputs(items[:3]), [], GREEDY, STATIC)
    columns = len(run.tokens[0])
    assert columns < NEW_TOKENS  # the trained model answers in a word, then EOS
    assert run.tokens == expected.tokens
    assert len(run.step_times) == columns == len(expected.step_times)
    assert len(launches) == columns  # tokens 1 .. columns - 1, then one in vain
    assert launches == [i % 2 for i in range(1, columns + 1)]  # the host flags alternate
    assert run.prefill_done <= run.step_times[0]
    assert all(a < b for a, b in zip(run.step_times, run.step_times[1:], strict=False))


def test_timings_and_token_counts(tiny, items) -> None:
    reference, graphed = tiny
    expected = reference.generate(items[:3], GREEDY, STATIC)
    got = graphed.generate(items[:3], GREEDY, STATIC)
    assert [c.texts for c in got] == [c.texts for c in expected]
    for mine, theirs in zip(got, expected, strict=True):
        timing = mine.timing
        assert timing.output_tokens == theirs.timing.output_tokens
        assert timing.prompt_tokens == theirs.timing.prompt_tokens
        assert 0 < timing.prefill_s <= timing.ttft_s <= timing.latency_s
        assert timing.tpot_s is None or timing.tpot_s > 0
    assert any(c.timing.tpot_s is not None for c in got)


def test_sampling_follows_the_seed_and_the_filters(tiny, items) -> None:
    _, graphed = tiny
    hot = replace(GREEDY, temperature=3.0, ignore_eos=True)  # long and very random answers
    first, _ = _tokens(graphed, items[:3], hot)
    again, _ = _tokens(graphed, items[:3], hot)
    other, _ = _tokens(graphed, items[:3], replace(hot, seed=1))
    assert first == again
    assert first != other
    # Filters that leave one token leave greedy decoding.
    greedy, _ = _tokens(graphed, items[:3], replace(GREEDY, ignore_eos=True))
    assert first != greedy
    assert _tokens(graphed, items[:3], replace(hot, top_k=1))[0] == greedy
    assert _tokens(graphed, items[:3], replace(hot, top_p=1e-6))[0] == greedy
    # num_samples: one prompt's KV copied to three sequences, each sampled on its own.
    samples, _ = _tokens(graphed, items[3:], replace(hot, num_samples=3))
    assert len(samples) == 3 and len({tuple(s) for s in samples}) == 3


def test_a_generation_config_asking_for_more_is_refused(tiny, items, monkeypatch) -> None:
    _, graphed = tiny
    monkeypatch.setattr(graphed.model.generation_config, "no_repeat_ngram_size", 3)
    with pytest.raises(ConfigError, match="no_repeat_ngram_size=3"):
        graphed.generate(items[:1], GREEDY, STATIC)


def _trial(*overrides: str) -> TrialConfig:
    register_configs()
    with initialize_config_module("sweeper.conf", version_base=None):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


@pytest.mark.slow
def test_cli_logs_the_metrics_and_keeps_the_accuracy(tmp_path: Path, store) -> None:
    common = ["engine.device=cpu", "kv_cache=static", "batch_size=1", "dataset.limit=8"]
    result = run_cli(
        [*common, "engine.compile=true", "engine.decode_loop=graphed", *store["args"]],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(store["uri"])
    (run,) = mlflow.search_runs(experiment_names=["sweeper"], output_format="list")
    metrics = run.data.metrics
    for name in HEADLINE_METRICS:
        assert math.isfinite(metrics[name]), (name, metrics)
    assert run.data.params["engine.decode_loop"] == "graphed"
    assert metrics["tpot_s"] > 0
    reference = run_trial(_trial(*common))
    assert metrics["accuracy"] >= reference.metrics["accuracy"] >= 0.5
