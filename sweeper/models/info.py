"""What a model is, read from its config before any weight loads: which transformers class
generates with it, whether it takes images. Engines and their preflight decide from this, so
nothing assumes one architecture."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sweeper.config import ConfigError, looks_like_local_path


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


def _hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the model hub cannot be reached (None: it answers). Checked before a download, which
    would retry for half a minute and print a line per try."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
    except OSError as error:
        return f"{endpoint.hostname} is unreachable ({error.strerror or error})"
    return None


@functools.cache
def model_info(path: str) -> ModelInfo:
    """The model at `path` (a local folder or a hub id), from its config alone."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    local = looks_like_local_path(path)
    try:
        # A hub id: its cached copy first, so an offline machine that has it needs no hub.
        config = AutoConfig.from_pretrained(path, local_files_only=not local)
    except OSError:
        if local or (why := _hub_unreachable()) is None:
            try:
                config = AutoConfig.from_pretrained(path)
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
                raise _config_error(path, error) from None
        else:
            raise ConfigError(
                "model.path", path, f"a local model folder, or a hub id the hub serves: {why}"
            ) from None
    except (ValueError, KeyError, json.JSONDecodeError) as error:
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
