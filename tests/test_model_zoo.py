"""The offline model zoo (sweeper.models.zoo): every folder loads with transformers' auto classes,
its chat template renders a one-image VQA turn, its processor takes a left-padded batch of 8
prompts with one image each, and the model generates from that batch greedily on CPU.

Each folder is built once per session (into a session temp dir, through the cache's build-once
path); the whole zoo builds in seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sweeper.models.zoo import REGISTRY, build_zoo_model, cached_zoo_model, zoo_names

QUESTION = "What color is the shape?"
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
# Questions of different lengths, so a batch of them needs padding.
QUESTIONS = [
    QUESTION,
    "Is there a red shape?",
    "What shape is in the image?",
    "Does the image not contain a gray shape?",
    "What color is the rectangle?",
    "Is there a triangle in the image?",
    "Is no blue shape present?",
    "What is the color of the shape?",
]


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def image() -> Image.Image:
    import easy_vqa

    return Image.open(easy_vqa.get_test_image_paths()[0]).convert("RGB")


def folder(name: str, zoo_dir: Path) -> Path:
    for module in REGISTRY[name].extras:  # e.g. num2words, which SmolVLM's processor needs
        pytest.importorskip(module, reason=f"{name}'s processor needs {module}")
    return cached_zoo_model(name, zoo_dir)  # built by the first test that asks


def load_processor(path: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, local_files_only=True)


def folder_template(path: Path) -> str | None:
    """The processor's template file, for processors that do not load it (Phi-4-multimodal's)."""
    file = path / "chat_template.json"
    return json.loads(file.read_text())["chat_template"] if file.exists() else None


def vqa_prompt(name: str, processor, question: str, path: Path) -> str:
    """The rendered prompt: the folder's chat template, or PaliGemma's own convention (the
    processor prepends the image tokens and BOS to a task prefix and the question)."""
    if name == "paligemma":
        return f"answer en {question}"
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    template = processor.chat_template or folder_template(path)
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, chat_template=template
    )


def encode(processor, prompts: list[str], image: Image.Image):
    """As transformers' `apply_chat_template(tokenize=True)` does: no tokenizer-added special
    tokens when the rendered prompt already starts with BOS."""
    bos = processor.tokenizer.bos_token
    add_special = not (bos and prompts[0].startswith(bos))
    return processor(
        text=prompts,
        images=[[image] for _ in prompts],
        padding=True,
        add_special_tokens=add_special,
        return_tensors="pt",
    )


def test_registry_covers_the_required_architectures():
    required = {
        "qwen2_5_vl",
        "qwen2_vl",
        "qwen3_vl",
        "gemma3",
        "llava",
        "llava_onevision",
        "idefics3",
        "smolvlm",
        "internvl",
        "mllama",
        "paligemma",
        "phi4_multimodal",
    }
    assert required <= set(REGISTRY)
    assert zoo_names(images=False), "a text-only causal LM"
    assert REGISTRY["phi4_multimodal"].auto_class == "causal-lm"


@pytest.mark.parametrize("name", zoo_names())
def test_folder_loads_with_the_auto_classes(name, zoo_dir):
    from transformers import AutoConfig, AutoTokenizer

    entry = REGISTRY[name]
    path = folder(name, zoo_dir)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    assert config.model_type == entry.model_type
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if entry.takes_images:
        tokenizer = load_processor(path).tokenizer
    model, info = entry.auto_model.from_pretrained(
        path, local_files_only=True, output_loading_info=True
    )
    assert not any(info.values()), info  # every saved weight is read, none initialised anew
    text_config = config.get_text_config()
    extra = 1 if name == "mllama" else 0  # <|image|> lives in the 8 embedding rows past vocab_size
    assert text_config.vocab_size + extra == len(tokenizer)
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    eos = model.generation_config.eos_token_id
    assert eos is not None and all(
        0 <= i < len(tokenizer) for i in ([eos] if isinstance(eos, int) else eos)
    )


@pytest.mark.parametrize("name", zoo_names())
def test_chat_template_lives_where_the_release_keeps_it(name, zoo_dir):
    from transformers import AutoTokenizer

    path = folder(name, zoo_dir)
    where = json.loads((path / "sweeper_spec.json").read_text())["template_in"]
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert (path / "chat_template.json").exists() == (where in ("processor", "both"))
    if where in ("tokenizer", "both"):
        assert tokenizer.chat_template
    elif name != "phi4_multimodal":  # whose tokenizer has a text-only template of its own
        assert tokenizer.chat_template is None
    if REGISTRY[name].takes_images and where != "none":
        # transformers 5.19's Phi4MultimodalProcessor drops the chat template it is loaded with
        # (its __init__ takes no chat_template argument), as it would the release's.
        loaded = load_processor(path).chat_template
        assert (loaded is None) if name == "phi4_multimodal" else loaded


@pytest.mark.parametrize("name", zoo_names(images=True))
def test_vqa_batch_of_8_generates(name, zoo_dir, image):
    entry = REGISTRY[name]
    path = folder(name, zoo_dir)
    processor = load_processor(path)
    model = entry.auto_model.from_pretrained(path, local_files_only=True).eval()
    prompts = [vqa_prompt(name, processor, q, path) for q in QUESTIONS]
    assert QUESTION in prompts[0]
    inputs = encode(processor, prompts, image)
    mask = inputs["attention_mask"]
    assert mask.shape[0] == 8 and bool((mask[:, -1] == 1).all()), "left padding"
    assert bool((mask[:, 0] == 0).any()), "the prompts differ in length, so some are padded"
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 8 and out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("name", zoo_names(images=True))
def test_rendered_prompt_has_at_most_one_bos(name, zoo_dir, image):
    entry = REGISTRY[name]
    path = folder(name, zoo_dir)
    processor = load_processor(path)
    tokenizer = processor.tokenizer
    prompt = vqa_prompt(name, processor, QUESTION, path)
    if name != "paligemma":
        written = bool(tokenizer.bos_token) and prompt.startswith(tokenizer.bos_token)
        assert written == entry.template_writes_bos
    input_ids = encode(processor, [prompt], image)["input_ids"][0].tolist()
    bos = tokenizer.bos_token_id
    leading = next((i for i, t in enumerate(input_ids) if t != bos), len(input_ids))
    assert leading <= 1, tokenizer.convert_ids_to_tokens(input_ids[:4])


@pytest.mark.parametrize("name", zoo_names(images=False))
def test_text_lm_chat_batch_generates(name, zoo_dir):
    from transformers import AutoTokenizer

    path = folder(name, zoo_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tokenizer.chat_template
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in QUESTIONS
    ]
    if tokenizer.pad_token is None:  # Llama 3.2 is released without one; engines pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    bos = tokenizer.bos_token
    inputs = tokenizer(
        prompts,
        padding=True,
        return_tensors="pt",
        add_special_tokens=not (bos and prompts[0].startswith(bos)),
    )
    ids = inputs["input_ids"][0][inputs["attention_mask"][0] == 1].tolist()
    assert ids[:2] != [tokenizer.bos_token_id] * 2
    model = REGISTRY[name].auto_model.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 8 and out.shape[1] > inputs["input_ids"].shape[1]


def test_builds_are_deterministic_and_cached(tmp_path):
    def digest(path: Path) -> str:
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    first = build_zoo_model("qwen2_5_text", tmp_path / "a")
    second = build_zoo_model("qwen2_5_text", tmp_path / "b")
    assert digest(first) == digest(second)
    cached = cached_zoo_model("qwen2_5_text", tmp_path / "cache")
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    assert cached_zoo_model("qwen2_5_text", tmp_path / "cache") == cached
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp
