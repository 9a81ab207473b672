"""An offline model zoo: tiny random-weight folders in the real shapes of many architectures.

Each folder is what `from_pretrained` expects of the released checkpoint, shrunk so the engines run
it on two CPU cores: config.json of the real config class (2 text layers, a 2-layer vision tower,
images of a handful to a few dozen tokens, Phi-4-multimodal's ~545 as its processor hard-codes
448 px crops), seeded random weights in safetensors,
generation_config.json with the release's EOS ids, a fast tokenizer with the release's special
tokens under their names, the real processor class with tiny image sizes and a chat template
shaped like the release's, kept where the release keeps it (processor, tokenizer, both, none).
Nothing is downloaded: the vocabulary is a small BPE trained on easy-VQA's text.

    build_zoo_model("gemma3", "/tmp/gemma3")  # writes the folder
    cached_zoo_model("gemma3")                # ~/.cache/sweeper/models/zoo-gemma3-<hash>
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sweeper.models import cached_build, zoo_llama, zoo_others, zoo_qwen
from sweeper.models.zoo_common import CAUSAL_LM, IMAGE_TEXT_TO_TEXT, Recipe, write_folder

DEFAULT_CACHE = "~/.cache/sweeper/models"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    model_type: str  # config.json's model_type
    auto_class: str  # IMAGE_TEXT_TO_TEXT (AutoModelForImageTextToText) or CAUSAL_LM
    takes_images: bool
    builder: Callable[[], Recipe]
    release: str  # the checkpoint whose files the folder imitates
    template_writes_bos: bool  # as the release's template does
    extras: tuple[str, ...] = ()  # modules the processor needs beyond sweeper's dependencies

    @property
    def auto_model(self):
        import transformers

        name = (
            "AutoModelForImageTextToText"
            if self.auto_class == IMAGE_TEXT_TO_TEXT
            else "AutoModelForCausalLM"
        )
        return getattr(transformers, name)


_ITT, _LM = IMAGE_TEXT_TO_TEXT, CAUSAL_LM
REGISTRY: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            "qwen2_5_vl",
            "qwen2_5_vl",
            _ITT,
            True,
            zoo_qwen.qwen2_5_vl,
            "Qwen/Qwen2.5-VL-7B-Instruct",
            False,
        ),
        ZooEntry(
            "qwen2_vl",
            "qwen2_vl",
            _ITT,
            True,
            zoo_qwen.qwen2_vl,
            "Qwen/Qwen2-VL-7B-Instruct",
            False,
        ),
        ZooEntry(
            "qwen3_vl",
            "qwen3_vl",
            _ITT,
            True,
            zoo_qwen.qwen3_vl,
            "Qwen/Qwen3-VL-8B-Instruct",
            False,
        ),
        ZooEntry("gemma3", "gemma3", _ITT, True, zoo_others.gemma3, "google/gemma-3-4b-it", True),
        ZooEntry("llava", "llava", _ITT, True, zoo_others.llava, "llava-hf/llava-1.5-7b-hf", False),
        ZooEntry(
            "llava_onevision",
            "llava_onevision",
            _ITT,
            True,
            zoo_qwen.llava_onevision,
            "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
            False,
        ),
        ZooEntry(
            "idefics3",
            "idefics3",
            _ITT,
            True,
            zoo_llama.idefics3,
            "HuggingFaceM4/Idefics3-8B-Llama3",
            True,
        ),
        ZooEntry(
            "smolvlm",
            "smolvlm",
            _ITT,
            True,
            zoo_others.smolvlm,
            "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
            True,
            extras=("num2words",),  # SmolVLMProcessor refuses to start without it
        ),
        ZooEntry(
            "internvl",
            "internvl",
            _ITT,
            True,
            zoo_qwen.internvl,
            "OpenGVLab/InternVL3-1B-hf",
            False,
        ),
        ZooEntry(
            "mllama",
            "mllama",
            _ITT,
            True,
            zoo_llama.mllama,
            "meta-llama/Llama-3.2-11B-Vision-Instruct",
            True,
        ),
        ZooEntry(
            "paligemma",
            "paligemma",
            _ITT,
            True,
            zoo_others.paligemma,
            "google/paligemma-3b-mix-224",
            False,
        ),
        ZooEntry(
            "phi4_multimodal",
            "phi4_multimodal",
            _LM,
            True,
            zoo_others.phi4_multimodal,
            "microsoft/Phi-4-multimodal-instruct",
            False,
        ),
        ZooEntry(
            "qwen2_5_text",
            "qwen2",
            _LM,
            False,
            zoo_qwen.qwen2_5_text,
            "Qwen/Qwen2.5-0.5B-Instruct",
            False,
        ),
        ZooEntry(
            "llama3_2_text",
            "llama",
            _LM,
            False,
            zoo_llama.llama3_2_text,
            "meta-llama/Llama-3.2-1B-Instruct",
            True,
        ),
    )
}


def fingerprint(name: str) -> str:
    """Short hash of what decides a folder's content: the zoo's source, the entry's name and the
    transformers version that writes the files."""
    from importlib.metadata import version

    digest = hashlib.sha256(f"{name} transformers=={version('transformers')}".encode())
    for path in sorted(Path(__file__).parent.glob("zoo*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def build_zoo_model(name: str, out_dir: str | Path) -> Path:
    """Write the complete folder of zoo model `name` into `out_dir`."""
    import importlib.util

    entry = REGISTRY[name]
    missing = [m for m in entry.extras if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"zoo model {name} needs {', '.join(missing)}: pip install {' '.join(missing)}"
        )
    recipe = entry.builder()
    if recipe.config.model_type != entry.model_type:
        raise AssertionError(f"{name}: built {recipe.config.model_type}, not {entry.model_type}")
    provenance = {
        "what": "sweeper model zoo: a release's shapes, shrunk, random weights",
        "zoo_name": name,
        "release": entry.release,
        "template_in": recipe.template_in,
        "template_writes_bos": entry.template_writes_bos,
        "fingerprint": fingerprint(name),
    }
    return write_folder(recipe, entry.auto_class, Path(out_dir), provenance)


def cached_zoo_model(name: str, cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """The folder of zoo model `name`, built on first use and cached by its fingerprint."""
    if name not in REGISTRY:
        raise KeyError(f"no zoo model {name!r}; known: {', '.join(REGISTRY)}")
    target = Path(cache_dir).expanduser() / f"zoo-{name}-{fingerprint(name)}"
    return cached_build(target, lambda folder: build_zoo_model(name, folder))


def zoo_names(*, images: bool | None = None) -> list[str]:
    """Registered names, optionally only those that take images (True) or not (False)."""
    return [n for n, e in REGISTRY.items() if images is None or e.takes_images == images]


__all__ = ["REGISTRY", "ZooEntry", "build_zoo_model", "cached_zoo_model", "zoo_names"]


def main(argv: list[str] | None = None) -> None:
    """`python -m sweeper.models.zoo [NAME ...]`: build (or find) the folders, print their paths."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sweeper.models.zoo", description=main.__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"of {', '.join(REGISTRY)}")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where the folders are kept")
    args = parser.parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    for name in args.names or list(REGISTRY):
        if name not in REGISTRY:
            parser.error(f"no zoo model {name!r} (known: {', '.join(REGISTRY)})")
        print(name, cached_zoo_model(name, args.cache_dir))


if __name__ == "__main__":
    main()
