"""What every engine's config has: its name, the class it builds (`_target_`), the device and
dtype; and the two questions a trial asks an engine config before anything loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from sweeper.config import Device, DType
from sweeper.models.info import ModelInfo


@dataclass
class EngineConfig:
    name: str = MISSING
    _target_: str = MISSING  # the Engine subclass, imported only when an engine is built
    device: Device = Device.auto
    dtype: DType = DType.auto

    def check(self, trial: Any, model: ModelInfo) -> None:
        """Refuse (ConfigError) what this engine cannot run for `trial` on `model`, before load."""

    def exact(self) -> EngineConfig:
        """This config with every output-changing knob at its exact setting (the reference a
        trial's answers are compared with); an engine without such knobs returns itself."""
        return self

    def open_load_refusal(self, trial: Any) -> str | None:
        """Why this engine cannot serve `trial`'s open load (requests sent one by one as the
        load schedules them, `Engine.submit`), or None when it can."""
        return f"offline with engine={self.name}: it cannot take requests as they come"

    def load_options(self, trial: Any) -> dict[str, Any]:
        """Trial keys the engine fixes when it loads (e.g. vLLM's scheduler limits): keyword
        arguments of its constructor, and part of the engine cache key, so a trial that changes
        one loads a new engine."""
        return {}
