"""Workloads: how a task's samples become requests (workload.py); each workload's config
(config.py) names its class."""

from __future__ import annotations

from typing import Any

from sweeper.engines.base import Engine
from sweeper.tasks import Task
from sweeper.workloads.workload import Workload

__all__ = ["Workload", "build_workload"]


def build_workload(trial: Any, task: Task, engine: Engine) -> Workload:
    """The trial's workload (`shared_prefix` sizes its system prompt with the engine's
    tokenizer)."""
    from hydra.utils import get_class

    return get_class(trial.workload._target_)(trial.workload, task, trial.system_prompt, engine)
