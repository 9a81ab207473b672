"""engine.attn_implementation=sdpa_gqa against transformers' sdpa on the trained tiny Qwen2.5-VL
(4 query heads on 2 KV heads): the same logits and tokens with either decode loop, and the KV
heads reach the kernel unrepeated."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from sweeper.config import asset_path
from sweeper.engines.hf.accel.attention import SDPA_GQA
from sweeper.engines.hf.config import HFEngineConfig
from sweeper.engines.hf.engine import HFEngine
from tests.conftest import load_engine
from tests.test_hf_graphed import NEW_TOKENS, assert_same_tokens

IMPLEMENTATIONS = ("sdpa", SDPA_GQA)


def _engines(config: HFEngineConfig) -> list[HFEngine]:
    path = asset_path("tiny_vlm")
    return [
        load_engine(replace(config, attn_implementation=name), path) for name in IMPLEMENTATIONS
    ]


@pytest.fixture(scope="module")
def engines():
    pair = _engines(HFEngineConfig(device="cpu"))
    yield pair
    for engine in pair:
        engine.close()


def test_logits_and_greedy_tokens_are_sdpas(engines, items) -> None:
    sdpa, gqa = engines
    assert gqa.model.config._attn_implementation == SDPA_GQA
    inputs = sdpa._inputs(items[:3])
    assert "pixel_values" in inputs
    kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": sdpa.pad_id}
    kwargs.update(temperature=None, top_k=None, top_p=None)
    with torch.inference_mode():
        torch.testing.assert_close(
            gqa.model(**inputs).logits, sdpa.model(**inputs).logits, atol=1e-5, rtol=1e-5
        )
        for cache in ("dynamic", "static"):
            want = sdpa.model.generate(**inputs, **kwargs, cache_implementation=cache)
            assert torch.equal(
                gqa.model.generate(**inputs, **kwargs, cache_implementation=cache), want
            )
    answers = sdpa.chat.tokenizer.batch_decode(want[:, inputs["input_ids"].shape[1] :])
    assert all(answer.strip() for answer in answers), answers


def test_the_kv_heads_reach_the_kernel_unrepeated(engines, items, monkeypatch) -> None:
    """sdpa copies the 2 KV heads out to 4 before the kernel; sdpa_gqa hands it the 2."""
    text = engines[0].model.config.get_text_config(decoder=True)
    calls: list[tuple[int, int, bool]] = []
    kernel = F.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        calls.append((query.shape[1], key.shape[1], kwargs.get("attn_mask") is not None))
        return kernel(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    heads = {}
    for engine in engines:
        inputs = engine._inputs(items[:3])
        calls.clear()
        with torch.inference_mode():
            engine.model(**inputs)
        # The text layers' calls: the padded batch's mask is theirs (the vision tower's have none).
        text_calls = [call for call in calls if call[2]]
        assert len(text_calls) == text.num_hidden_layers, calls
        assert {call[0] for call in text_calls} == {text.num_attention_heads}
        heads[engine.model.config._attn_implementation] = {c[1] for c in text_calls}
    assert heads == {"sdpa": {text.num_attention_heads}, SDPA_GQA: {text.num_key_value_heads}}


def test_the_graphed_loop_gives_sdpas_tokens(items) -> None:
    engines = _engines(HFEngineConfig(device="cpu", compile=True, decode_loop="graphed"))
    assert_same_tokens(engines, items[:3])
