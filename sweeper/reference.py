"""The reference a trial's answers are compared with (`reference=`), and what identifies it.

`exact_reference(trial)` is the trial with every output-changing knob at its exact setting: the
engine's own (`EngineConfig.exact`: vLLM's KV cache in the model's dtype, no weight quantization,
no speculation; a started server without those flags), HF's quantized KV cache replaced by the
dynamic one, and greedy decoding (one sample, no beams; a workload that needs samples keeps
them). Everything else stays, batch shape included (padding and batching change float results
too), so a sweep over output-changing knobs alone has one reference. It runs once, offline,
unmeasured.

`answers_key(trial)` digests what decides a trial's answers (the measurement-only keys left
out): the reference's predictions are cached under it, and a trial whose key is its reference's
is its own reference.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from sweeper.config import ConfigError, KVCache, TrialConfig
from sweeper.loads.config import LoadConfig

# Keys that change how a trial is timed or recorded, never its answers.
_MEASUREMENT_KEYS = (
    "warmup_batches",
    "calibration_samples",
    "calibration_repeats",
    "repeats",
    "load",
    "slo",
    "tracking",
    "select",
    "budget_gb",
    "experiment_name",
    "reference",
)


def _answer_config(trial: TrialConfig) -> dict[str, Any]:
    config = {k: v for k, v in asdict(trial).items() if k not in _MEASUREMENT_KEYS}
    config["dataset"].pop("prefetch", None)
    return config


def answers_key(trial: TrialConfig) -> str:
    """A digest of what decides the trial's answers."""
    text = json.dumps(_answer_config(trial), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def exact_reference(trial: TrialConfig) -> TrialConfig:
    """The trial with its output-changing knobs at their exact settings, run once offline.
    Decoding becomes greedy, except for a workload that needs several samples
    (workload=multi_sample): its sampling is the workload's, and stays."""
    kv_cache = KVCache.dynamic if trial.kv_cache == KVCache.quantized else trial.kv_cache
    exact = replace(
        trial,
        engine=trial.engine.exact(),
        kv_cache=kv_cache,
        load=LoadConfig(),
        warmup_batches=0,
        repeats=1,
        reference=None,
    )
    try:
        return replace(exact, temperature=0.0, top_k=0, top_p=1.0, num_samples=1, beam_num=1)
    except ConfigError:  # the workload refuses greedy decoding
        return exact


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changes(trial: TrialConfig, reference: TrialConfig) -> str:
    """The keys the reference sets otherwise, as `key=value` overrides ('' when none)."""
    ours, theirs = _flat(_answer_config(trial)), _flat(_answer_config(reference))
    changed = [key for key in theirs if ours.get(key) != theirs[key]]

    def shown(value: Any) -> str:
        return "null" if value is None else str(value)

    return " ".join(f"{key}={shown(theirs[key])}" for key in changed)


def read_predictions(path: str) -> list[dict[str, Any]]:
    """A predictions table: MLflow's predictions.json ({"columns": [...], "data": [[...]]}) or a
    JSON list of rows."""
    table = json.loads(Path(path).expanduser().read_text())
    if isinstance(table, dict) and {"columns", "data"} <= table.keys():
        return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    if isinstance(table, list) and all(isinstance(row, dict) for row in table):
        return table
    raise ValueError(
        f"reference={path} is not a predictions table (a trial's predictions.json, or a JSON "
        "list of rows with question_id, prediction and score)"
    )
