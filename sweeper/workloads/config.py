"""The `workload` config group: how a task's samples become the requests sent (each config
names its class, sweeper/workloads/workload.py), and the trial keys each one needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sweeper.config import check


@dataclass
class WorkloadConfig:
    """`single`: one question per sample. `images: false` sends the question without its image
    (text-only prompts: what transformers' continuous batching takes)."""

    name: str = "single"
    _target_: str = "sweeper.workloads.workload.Workload"
    images: bool = True

    def check(self, trial: Any) -> None:
        """Refuse trial keys this workload cannot run with (ConfigError)."""


@dataclass
class SharedPrefixWorkloadConfig(WorkloadConfig):
    """Every request starts with the same system prompt of about this many tokens: the case
    prefix caching is for."""

    name: str = "shared_prefix"
    _target_: str = "sweeper.workloads.workload.SharedPrefixWorkload"
    system_prompt_tokens: int = 1000

    def __post_init__(self) -> None:
        check(
            self.system_prompt_tokens >= 1,
            "workload.system_prompt_tokens",
            self.system_prompt_tokens,
            "an integer >= 1",
        )

    def check(self, trial: Any) -> None:
        check(
            trial.system_prompt is None,
            "system_prompt",
            trial.system_prompt,
            "null with workload=shared_prefix (it writes its own, of "
            "workload.system_prompt_tokens tokens)",
        )


@dataclass
class MultiSampleWorkloadConfig(WorkloadConfig):
    """num_samples reasoning paths per question (sampled), each ending in 'Answer: ...' and
    majority-voted: e.g. num_samples=5 temperature=0.7 max_new_tokens=256."""

    name: str = "multi_sample"
    _target_: str = "sweeper.workloads.workload.MultiSampleWorkload"

    def check(self, trial: Any) -> None:
        check(
            trial.num_samples > 1,
            "num_samples",
            trial.num_samples,
            "an integer >= 2 with workload=multi_sample (with temperature > 0)",
        )


@dataclass
class MultiTurnWorkloadConfig(WorkloadConfig):
    """The questions about one image become one conversation of at most `turns` turns: each
    next question carries the earlier questions and the model's answers as history
    (batch_size counts conversations)."""

    name: str = "multi_turn"
    _target_: str = "sweeper.workloads.workload.MultiTurnWorkload"
    turns: int = 3

    def __post_init__(self) -> None:
        check(self.turns >= 1, "workload.turns", self.turns, "an integer >= 1")


WORKLOAD_CONFIGS = (
    WorkloadConfig,
    SharedPrefixWorkloadConfig,
    MultiSampleWorkloadConfig,
    MultiTurnWorkloadConfig,
)
