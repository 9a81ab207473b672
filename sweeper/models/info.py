"""What a model is, read from its config before any weight loads: which transformers class
generates with it, whether it takes images. Engines and their preflight decide from this, so
nothing assumes one architecture."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sweeper.config import ConfigError


class ModelClass(StrEnum):
    """The transformers auto class a model generates through."""

    image_text_to_text = "image-text-to-text"  # AutoModelForImageTextToText (most VLMs)
    causal_lm = "causal-lm"  # AutoModelForCausalLM (text LMs; Phi-4-multimodal takes images too)


@dataclass(frozen=True)
class ModelInfo:
    path: str
    model_type: str
    architecture: str  # config.architectures[0], the class name vLLM's registry knows
    model_class: ModelClass
    takes_images: bool

    @property
    def auto_class(self) -> type:
        import transformers

        if self.model_class is ModelClass.image_text_to_text:
            return transformers.AutoModelForImageTextToText
        return transformers.AutoModelForCausalLM


def _config_error(path: str, error: Exception) -> ConfigError:
    config_file = Path(path).expanduser() / "config.json"
    where = str(config_file) if config_file.exists() else path
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError("model.path", path, f"a model whose config loads: {where}: {detail}")


@functools.cache
def model_info(path: str) -> ModelInfo:
    """The model at `path` (a local folder or a hub id), from its config alone."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        raise _config_error(path, error) from None
    model_type = config.model_type
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        model_class = ModelClass.image_text_to_text
    elif model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        model_class = ModelClass.causal_lm
    else:
        raise ConfigError(
            "model.path",
            path,
            f"a model transformers generates with (image-text-to-text or causal LM); "
            f"model_type {model_type!r} is neither",
        )
    takes_images = model_class is ModelClass.image_text_to_text or (
        getattr(config, "vision_config", None) is not None
    )
    architecture = (config.architectures or [""])[0]
    return ModelInfo(path, model_type, architecture, model_class, takes_images)
