"""engine.fuse_projections against the unfused model: the same logits and tokens, the same
weights (moved, not copied), the vision tower untouched; with either decode loop and end to end."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch
from torch import nn

from sweeper.config import ConfigError, ModelConfig, asset_path
from sweeper.engines import EngineCache
from sweeper.engines.hf.accel.fused import FusedGateUpMLP, FusedQKVAttention, fuse_projections
from sweeper.engines.hf.config import HFEngineConfig
from sweeper.engines.hf.engine import HFEngine
from sweeper.metrics import HEADLINE_METRICS
from sweeper.models.qwen_arch import build_qwen2_5_vl_arch
from tests.conftest import SMALL_QWEN_TEXT, SMALL_QWEN_VISION, load_engine, run_cli
from tests.test_hf_graphed import NEW_TOKENS, assert_same_tokens

UNFUSED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _fused_pair(path: str) -> tuple[nn.Module, HFEngine]:
    """The unfused model (a deep copy) and the engine whose model was then fused."""
    torch.manual_seed(0)
    engine = load_engine(HFEngineConfig(device="cpu"), path)
    reference = copy.deepcopy(engine.model)
    layers = engine.model.config.get_text_config(decoder=True).num_hidden_layers
    assert fuse_projections(engine.model) == layers
    return reference, engine


@pytest.fixture(scope="module")
def tiny():
    reference, engine = _fused_pair(asset_path("tiny_vlm"))
    yield reference, engine
    engine.close()


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    """Qwen2.5-VL-7B's architecture shrunk (GQA: q twice as wide as k and v), random weights."""
    folder = build_qwen2_5_vl_arch(
        tmp_path_factory.mktemp("arch") / "small",
        text_overrides=SMALL_QWEN_TEXT,
        vision_overrides=SMALL_QWEN_VISION,
    )
    reference, engine = _fused_pair(str(folder))
    yield reference, engine
    engine.close()


@pytest.mark.parametrize("model", ["tiny", "arch"])
def test_logits_and_greedy_tokens_are_the_unfused_models(model, request, items) -> None:
    reference, engine = request.getfixturevalue(model)
    inputs = engine._inputs(items[:3])  # a left-padded batch, with images
    assert "pixel_values" in inputs
    with torch.inference_mode():
        expected = reference(**inputs).logits
        got = engine.model(**inputs).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": engine.pad_id}
        kwargs.update(temperature=None, top_k=None, top_p=None)
        want = reference.generate(**inputs, **kwargs)
        assert torch.equal(engine.model.generate(**inputs, **kwargs), want)
    if model == "tiny":  # the trained model answers, the answers are words
        answers = engine.chat.tokenizer.batch_decode(want[:, inputs["input_ids"].shape[1] :])
        assert all(answer.strip() for answer in answers), answers


def test_the_weights_are_moved_not_copied_and_the_vision_tower_is_untouched(arch) -> None:
    reference, engine = arch
    fused = engine.model
    assert sum(p.numel() for p in fused.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )
    assert sum(p.numel() * p.element_size() for p in fused.parameters()) == sum(
        p.numel() * p.element_size() for p in reference.parameters()
    )
    layers = fused.model.language_model.layers
    for layer in layers:
        assert type(layer.self_attn) is FusedQKVAttention and type(layer.mlp) is FusedGateUpMLP
        names = {name.split(".")[-1] for name, _ in layer.named_modules()}
        assert names.isdisjoint(UNFUSED) and {"qkv_proj", "gate_up_proj"} <= names
    kept = {n: p for n, p in reference.named_parameters()}
    # The fused ones are the parts concatenated, in order.
    text = SMALL_QWEN_TEXT
    q = text["hidden_size"]
    kv = text["hidden_size"] // text["num_attention_heads"] * text["num_key_value_heads"]
    assert layers[0].self_attn.qkv_sizes == [q, kv, kv]
    part = "model.language_model.layers.0.self_attn"
    expected = torch.cat([kept[f"{part}.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(layers[0].self_attn.qkv_proj.weight, expected)
    # The vision tower: the same modules, classes and weights.
    vision = dict(fused.model.visual.named_parameters())
    assert vision.keys() == dict(reference.model.visual.named_parameters()).keys()
    assert all(torch.equal(p, kept[f"model.visual.{n}"]) for n, p in vision.items())
    assert [type(m) for m in fused.model.visual.modules()] == [
        type(m) for m in reference.model.visual.modules()
    ]


def test_the_graphed_loop_gives_the_unfused_tokens(items) -> None:
    path = asset_path("tiny_vlm")
    config = HFEngineConfig(device="cpu", compile=True, decode_loop="graphed")
    engines = [load_engine(replace(config, fuse_projections=fuse), path) for fuse in (False, True)]
    assert isinstance(engines[1].model.model.language_model.layers[0].mlp, FusedGateUpMLP)
    assert_same_tokens(engines, items[:3])


def test_the_engine_cache_key_tells_fused_from_unfused() -> None:
    model = ModelConfig(name="tiny", path=asset_path("tiny_vlm"))
    unfused = EngineCache.key(HFEngineConfig(), model, {})
    assert EngineCache.key(HFEngineConfig(fuse_projections=True), model, {}) != unfused
    assert EngineCache.key(HFEngineConfig(fuse_projections=False), model, {}) == unfused


def test_another_architecture_is_refused() -> None:
    with pytest.raises(ConfigError) as error:
        fuse_projections(nn.Sequential(nn.Linear(4, 4)))
    message = str(error.value)
    assert "\n" not in message and "'engine.fuse_projections'" in message, message
    assert "only Qwen2.5-VL decoder layers are fused" in message


@pytest.mark.slow
def test_cli_logs_the_metrics(tmp_path: Path, store) -> None:
    result = run_cli(
        [
            "engine.device=cpu",
            "batch_size=4",
            "dataset.limit=4",
            "engine.fuse_projections=true",
            *store["args"],
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(store["uri"])
    (run,) = mlflow.search_runs(experiment_names=["sweeper"], output_format="list")
    for name in HEADLINE_METRICS:
        assert math.isfinite(run.data.metrics[name]), (name, run.data.metrics)
    assert run.data.params["engine.fuse_projections"] == "True"
