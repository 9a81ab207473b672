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


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file, from its header alone: it must parse, and the file
    must hold every byte of the tensors it describes (a copy or download cut short does not)."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes: too short for a safetensors header"
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            return f"truncated: {size} bytes, its header alone takes {8 + length}"
        try:
            header = json.loads(handle.read(length))
            tensors = [entry for key, entry in header.items() if key != "__metadata__"]
            end = max((entry["data_offsets"][1] for entry in tensors), default=0)
        except (ValueError, TypeError, KeyError, IndexError) as error:
            return f"not a safetensors file (unreadable header: {type(error).__name__})"
    if 8 + length + end > size:
        return f"truncated: {size} bytes, its tensors need {8 + length + end}"
    return None


def _pickle_problem(file: Path) -> str | None:
    """A torch checkpoint (*.bin, *.pt, *.pth) is a zip since torch 1.6: its directory, at the
    end of the file, is missing when the file was cut short. (An older one is a bare pickle,
    which cannot be checked without loading it.)"""
    import zipfile

    with file.open("rb") as handle:
        legacy = handle.read(1) == b"\x80"  # a pickle's protocol opcode
    if not legacy and not zipfile.is_zipfile(file):
        return "truncated or not a torch checkpoint (no zip directory at its end)"
    return None


def weights_problem(path: str) -> str | None:
    """The first weight file of a local model folder that cannot load whole (named, with what
    is wrong), or None; read from headers only, before any weight loads."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    for index in folder.glob("*.index.json"):  # a sharded checkpoint lists its shards
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return f"{index}: unreadable shard index"
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        if missing:
            return f"{index}: lists {missing[0]}, which is missing"
    checks = {".safetensors": _safetensors_problem, ".bin": _pickle_problem}
    checks |= {".pt": _pickle_problem, ".pth": _pickle_problem}
    for file in sorted(folder.iterdir()):
        if file.suffix in checks and file.is_file() and (problem := checks[file.suffix](file)):
            return f"{file}: {problem}"
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
