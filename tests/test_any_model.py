"""Any model: every architecture of the offline zoo (sweeper/models/zoo.py) runs a trial on
engine=hf at batch_size 8, and on engine=vllm where vLLM implements the architecture; both engines
send the same prompt token ids (one BOS); what a model cannot do is refused in one line before it
loads."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import replace

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from sweeper.cli import BadInput, preflight
from sweeper.config import TrialConfig
from sweeper.data import prefetch
from sweeper.engines import ENGINE_CACHE
from sweeper.metrics import HEADLINE_METRICS
from sweeper.models.zoo import REGISTRY, cached_zoo_model, zoo_names
from sweeper.requests import DecodingParams
from sweeper.tasks import task_class
from sweeper.trial import run_trial
from sweeper.workloads import build_workload

# vLLM 0.32 removed Mllama (0.10.2) and Phi-4-multimodal's image path (0.12).
NOT_IN_VLLM = {"mllama", "phi4_multimodal"}
# Small and quick: no warm-up batch, a one-question calibration slice.
QUICK = ("dataset.limit=8", "batch_size=8", "max_new_tokens=4", "warmup_batches=0")
VLLM = ("engine=vllm", "engine.enforce_eager=true", "engine.max_model_len=2048")


@pytest.fixture(scope="module", autouse=True)
def _free_engine():
    yield
    ENGINE_CACHE.clear()


def _args(name: str, *overrides: str) -> list[str]:
    dataset = "easy_vqa" if REGISTRY[name].takes_images else "easy_vqa_text"
    path = cached_zoo_model(name)
    return ["model=custom", f"model.path={path}", f"dataset={dataset}", *overrides]


def _trial(name: str, *overrides: str) -> TrialConfig:
    with initialize_config_module("sweeper.conf", version_base=None):
        return OmegaConf.to_object(compose("config", overrides=_args(name, *overrides)))


def _check(result, name: str) -> None:
    for metric in HEADLINE_METRICS:
        assert math.isfinite(result.metrics[metric]), (metric, result.metrics)
    assert result.metrics["num_samples_measured"] == 8
    assert result.metrics["output_tokens"] >= 8
    assert result.tags["model_type"] == REGISTRY[name].model_type


@pytest.mark.parametrize("name", zoo_names())
def test_hf_runs_a_trial_at_batch_size_8(name: str) -> None:
    result = run_trial(_trial(name, "engine.device=cpu", "calibration_samples=2", *QUICK))
    _check(result, name)
    ENGINE_CACHE.clear()


def _prompt_ids(engine, requests) -> tuple[list[list[int]], list[list[int]]]:
    """The prompt ids vLLM ran the requests with, and those transformers' processor (or
    tokenizer) makes of the same chats: image placeholders expanded by each side's own code."""
    submissions = engine._submissions(requests, time.time())
    done = engine.frontend.run(
        submissions, engine._sampling_params(DecodingParams(4)), together=True
    )
    chat = engine.chat
    theirs = []
    for request in requests:
        text = chat.text(request.messages)
        options = {"add_special_tokens": chat.add_special_tokens(text)}
        if chat.processor is None:
            theirs.append(chat.tokenizer(text, **options)["input_ids"])
        else:
            inputs = chat.processor(text=[text], images=[request.images], **options)
            theirs.append(list(inputs["input_ids"][0]))
    return [list(output.prompt_token_ids) for _, output in done], theirs


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in zoo_names() if n not in NOT_IN_VLLM])
def test_vllm_runs_a_trial_with_the_prompt_ids_hf_sends(name: str) -> None:
    trial = _trial(name, *VLLM, "calibration_samples=1", *QUICK)
    _check(run_trial(trial), name)
    # The engine of that trial, still loaded: three of its requests, ids compared.
    engine = ENGINE_CACHE.get(trial.engine, trial.model, trial.engine.load_options(trial)).engine
    task = task_class(trial.dataset)(trial.dataset)
    samples, _ = task.load()
    workload = build_workload(trial, task, engine)
    requests = [workload.request(item) for item in prefetch(samples[:3], 3)]
    vllm_ids, hf_ids = _prompt_ids(engine, requests)
    assert vllm_ids == hf_ids
    bos = engine.chat.tokenizer.bos_token_id
    assert all(ids.count(bos) <= 1 for ids in vllm_ids) if bos is not None else True
    ENGINE_CACHE.clear()


def test_hf_static_and_continuous_batching_tokenize_alike(items) -> None:
    """A template that writes BOS (Gemma 3): the static path's processor call and the token ids
    continuous batching (and vLLM) get are the same, with one BOS; with an image too."""
    from sweeper.engines.hf.config import HFEngineConfig
    from tests.conftest import load_engine

    engine = load_engine(HFEngineConfig(device="cpu"), cached_zoo_model("gemma3"))
    chat = engine.chat
    bos = chat.tokenizer.bos_token_id
    try:
        for request in items:
            with_image = engine._inputs([request])["input_ids"][0].tolist()
            assert with_image.count(bos) == 1 and with_image[0] == bos
            text_only = replace(
                request, messages=[_text_only(m) for m in request.messages], images=[]
            )
            static = engine._inputs([text_only])["input_ids"][0].tolist()
            assert static == chat.token_ids(chat.text(text_only.messages))
            assert static.count(bos) == 1 and static[0] == bos
    finally:
        engine.close()


def _text_only(message: dict) -> dict:
    content = message["content"]
    if isinstance(content, str):
        return message
    return {**message, "content": [part for part in content if part["type"] != "image"]}


def _refusal(args: list[str]) -> str:
    start = time.perf_counter()
    with pytest.raises(BadInput) as error:
        preflight(args)
    assert time.perf_counter() - start < 60  # before any model loads
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("name", sorted(NOT_IN_VLLM))
def test_vllm_refuses_an_architecture_it_does_not_implement(name: str) -> None:
    message = _refusal(_args(name, "engine=vllm"))
    assert "'engine': 'vllm'" in message and "no implementation" in message, message


def test_a_text_only_model_refuses_an_image_task_before_load() -> None:
    message = _refusal(["model=custom", f"model.path={cached_zoo_model('qwen2_5_text')}"])
    assert "'dataset': 'easy_vqa'" in message and "takes no images" in message, message
    assert "dataset=easy_vqa_text" in message


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["prefix_caching=true"], "prefix_caching"),
        (["engine.fuse_projections=true"], "engine.fuse_projections"),
        (["engine.attn_implementation=sdpa_gqa"], "engine.attn_implementation"),
        (
            ["kv_cache=static", "engine.compile=true", "engine.decode_loop=graphed"],
            "engine.decode_loop",
        ),
    ],
)
def test_qwen_vl_only_acceleration_is_refused_for_other_architectures(overrides, key) -> None:
    message = _refusal(_args("gemma3", *overrides))
    assert f"'{key}'" in message and "checked only on model types qwen2_5_vl" in message, message
    assert "'gemma3'" in message


def test_the_chat_template_comes_from_the_model_else_the_user_else_an_adapter(tmp_path) -> None:
    from sweeper.engines.toolkit.chat import ChatPrompts
    from sweeper.models.info import model_info

    assert ChatPrompts(model_info(str(cached_zoo_model("paligemma")))).template_source == "adapter"
    # A folder without any template: refused in one line, unless the user gives one.
    bare = tmp_path / "bare"
    shutil.copytree(cached_zoo_model("qwen2_5_text"), bare)
    for file in bare.glob("chat_template*"):
        file.unlink()
    config = bare / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"_no_template"'))
    message = _refusal(["model=custom", f"model.path={bare}", "dataset=easy_vqa_text"])
    assert "'model.chat_template': None" in message and "has none" in message, message
    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    )
    preflight(["model=custom", f"model.path={bare}", "dataset=easy_vqa_text",
               f"model.chat_template={template}"])  # fmt: skip
    chat = ChatPrompts(model_info(str(bare)), str(template))
    assert chat.template_source == "model.chat_template" and not chat.content_as_parts
    assert chat.text([{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"
