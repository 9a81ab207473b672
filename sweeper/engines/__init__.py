"""Engines behind one interface, and the cache that keeps one loaded across trials.

Trials of one process that differ only in decoding keys reuse the loaded engine; a trial with
another engine-level config closes the old engine (freeing its memory) before loading the new.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from sweeper.engines.base import Completion, DecodingParams, Engine

__all__ = ["Completion", "DecodingParams", "Engine", "EngineCache", "engine_class"]

# name -> "module:Class", imported only when used (vLLM is an optional install).
ENGINES = {"hf": "sweeper.engines.hf:HFEngine", "vllm": "sweeper.engines.vllm:VLLMEngine"}


def engine_class(name: str) -> type[Engine]:
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


@dataclass
class LoadedEngine:
    engine: Engine
    key: str
    load_s: float | None  # None when this trial reused an engine loaded earlier

    @property
    def cache_hit(self) -> bool:
        return self.load_s is None


class EngineCache:
    """Holds at most one engine: the one for the last engine-level config asked for."""

    def __init__(self) -> None:
        self._key: str | None = None
        self._engine: Engine | None = None
        self.loads = 0

    @staticmethod
    def key(engine_cfg: Any, model_cfg: Any, options: dict[str, Any] | None = None) -> str:
        return json.dumps(
            {"engine": asdict(engine_cfg), "model": asdict(model_cfg), "options": options or {}},
            sort_keys=True,
        )

    def get(
        self, engine_cfg: Any, model_cfg: Any, options: dict[str, Any] | None = None
    ) -> LoadedEngine:
        """The engine for this config; `options` are its `Engine.load_options` for the trial."""
        key = self.key(engine_cfg, model_cfg, options)
        if self._engine is not None and key == self._key:
            return LoadedEngine(self._engine, key, None)
        self.clear()
        from sweeper.models import resolve_model_path

        start = time.perf_counter()
        engine_type = engine_class(engine_cfg.name)
        engine = engine_type(engine_cfg, resolve_model_path(model_cfg), **(options or {}))
        self._engine, self._key = engine, key
        self.loads += 1
        return LoadedEngine(engine, key, time.perf_counter() - start)

    def clear(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine, self._key = None, None


ENGINE_CACHE = EngineCache()
