"""The weightless Qwen2.5-VL-7B folder has the real model's shapes, token ids and prompt sizes.

Performance runs on it stand in for the real model only if what decides their cost matches: the
parameter count, the tokenizer (prompt lengths), the image processor (image token counts) and the
chat template. Official numbers are asserted literally, so a drift in any of them shows here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from sweeper.models import has_weights, qwen_arch
from sweeper.models.tiny import QWEN2_5_VL_SPECIAL_TOKENS
from sweeper.tasks.base import qa_messages
from tests.conftest import SMALL_QWEN_TEXT, SMALL_QWEN_VISION

# The official rendering of a question about an image ("What is the shape?", the VQA prompt) by
# Qwen2.5-VL-7B-Instruct's template.
OFFICIAL_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is the shape?\n"
    "Answer the question using a single word or phrase.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return qwen_arch.build_qwen2_5_vl_arch(tmp_path_factory.mktemp("arch") / "qwen7b")


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def processor(folder):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder, local_files_only=True)


def test_folder_has_everything_but_weights(folder):
    assert not has_weights(str(folder))
    assert {p.name for p in folder.iterdir()} == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "sweeper_spec.json",
    }


def test_tokenizer_is_qwens(tokenizer):
    assert tokenizer("Hello world").input_ids == [9707, 1879]
    assert tokenizer("<|image_pad|>").input_ids == [151655]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert tokenizer.padding_side == "left" and tokenizer.model_max_length == 131072
    ids = tokenizer.convert_tokens_to_ids(QWEN2_5_VL_SPECIAL_TOKENS)
    assert ids == list(range(151643, 151665)) and len(tokenizer) == 151665
    text = "Ünïcödé café — 中文测试，你好！ 日本語 한국어 🤖👍🏽\n\tcode: x**2  "
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_chat_template_renders_the_official_prompt(tokenizer, processor):
    for system_prompt in (None, "You are a helpful assistant."):
        messages = qa_messages("What is the shape?", system_prompt=system_prompt, image=True)
        assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
            OFFICIAL_PROMPT
        )
        rendered = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        assert rendered == OFFICIAL_PROMPT


@pytest.mark.parametrize("size", [(640, 480), (480, 640)])
def test_image_token_count(processor, size):
    image = Image.new("RGB", size, (200, 40, 90))
    inputs = processor(text=[OFFICIAL_PROMPT], images=[image], return_tensors="pt")
    # smart_resize to 476x644 (or 644x476): 34x46 patches of 14, merged 2x2 into 17x23 tokens.
    assert (inputs["input_ids"] == 151655).sum().item() == 391


def test_config_is_7b(folder):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    text, vision = config.text_config, config.vision_config
    assert config.architectures == ["Qwen2_5_VLForConditionalGeneration"]
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (28, 3584, 18944)
    assert (text.num_attention_heads, text.num_key_value_heads) == (28, 4)
    assert (text.vocab_size, text.max_position_embeddings) == (152064, 128000)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert text.rope_parameters["rope_theta"] == 1e6
    assert not config.tie_word_embeddings
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (32, 1280, 3584)
    assert (vision.window_size, vision.tokens_per_second) == (112, 2)
    assert list(vision.fullatt_block_indexes) == [7, 15, 23, 31]
    assert (config.image_token_id, config.video_token_id) == (151655, 151656)
    assert (config.vision_start_token_id, config.vision_end_token_id) == (151652, 151653)
    assert config.dtype == torch.bfloat16


def test_parameter_count_is_the_official_one(folder):
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(folder))
    assert sum(p.numel() for p in model.parameters()) == 8_292_166_656


def test_shrunk_folder_generates(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    folder = qwen_arch.build_qwen2_5_vl_arch(
        tmp_path / "shrunk", text_overrides=SMALL_QWEN_TEXT, vision_overrides=SMALL_QWEN_VISION
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder)).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    prompt = processor.apply_chat_template(
        qa_messages("What is it?", image=True), add_generation_prompt=True
    )
    image = Image.new("RGB", (640, 480), (10, 120, 60))
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] - inputs["input_ids"].shape[1] == 5


def test_cache_builds_once(tmp_path, monkeypatch):
    builds: list[Path] = []

    def fake_build(out_dir: Path) -> Path:
        builds.append(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(qwen_arch, "build_qwen2_5_vl_arch", fake_build)
    first = qwen_arch.cached_qwen2_5_vl_7b_arch(tmp_path)
    assert first.name == f"qwen2_5_vl_7b_arch-{qwen_arch.fingerprint()}"
    assert qwen_arch.cached_qwen2_5_vl_7b_arch(tmp_path) == first
    assert len(builds) == 1 and (first / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial left behind
