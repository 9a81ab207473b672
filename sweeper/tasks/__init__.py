"""Tasks: what a trial asks (a dataset's samples as chats) and how answers are scored. Each
dataset's config (config.py) names its task class; vqa.py and text.py hold them."""

from __future__ import annotations

from typing import Any

from sweeper.tasks.base import Task

__all__ = ["Task", "task_class"]


def task_class(dataset_cfg: Any) -> type[Task]:
    from hydra.utils import get_class

    return get_class(dataset_cfg._target_)
