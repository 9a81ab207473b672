"""One trial: load (or reuse) the engine, stream the task's samples as requests, measure, score.

Order of work, so that what is measured means what it says:
1. warm-up: `warmup_batches` batches, never counted;
2. calibration (batch_size > 1): the first min(calibration_samples, N) samples at batch_size,
   then one at a time, for `batch_efficiency`; each pass is timed after an untimed one over
   the same slice (a new batch shape may compile);
3. the measured run over all N samples, whose per-request timings and wall time give the
   performance metrics and whose answers the task scores.
Peak memory is sampled throughout (it is a peak: warm-up does not inflate it beyond the run).
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from sweeper.config import ConfigError, TrialConfig
from sweeper.data import DataError, LoadedSample, Sample, prefetch
from sweeper.engines import ENGINE_CACHE, Engine
from sweeper.metrics.memory import PeakMemoryTracker
from sweeper.metrics.performance import RequestTiming, batch_efficiency, summarize
from sweeper.models import resolve_model_path
from sweeper.models.info import ModelInfo, model_info
from sweeper.requests import DecodingParams, ServingParams
from sweeper.tasks import task_class
from sweeper.workloads import Workload, build_workload


@dataclass
class TrialResult:
    metrics: dict[str, float]
    tags: dict[str, str]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # under dataset.on_error=skip


def check_trial(trial: TrialConfig) -> ModelInfo:
    """Everything that can be refused without loading a model; the model's info."""
    from sweeper.engines.toolkit.chat import chat_prompts

    model = model_info(resolve_model_path(trial.model))
    if task_class(trial.dataset).takes_images and trial.workload.images and not model.takes_images:
        raise ConfigError(
            "dataset",
            trial.dataset.name,
            f"a text task (dataset=easy_vqa_text, text_jsonl) or workload.images=false: model "
            f"type {model.model_type!r} takes no images",
        )
    trial.engine.check(trial, model)
    chat_prompts(model, trial.model.chat_template)  # refuses a model without a chat template
    return model


# What run_trial adds to the performance summary and the task's scores.
TRIAL_METRICS = (
    "peak_mem_gb",
    "torch_peak_allocated_gb",
    "torch_peak_reserved_gb",
    "model_load_s",
    "num_samples_measured",
    "skipped_samples",
)


def metric_names() -> set[str]:
    """Every metric a trial can return, whatever its engine, task and device: what a study's
    objectives and constraints are checked against before its first trial."""
    from sweeper.engines.toolkit.prometheus import OWN_METRICS
    from sweeper.tasks.config import DATASET_CONFIGS

    # The summaries' own keys, from the functions that make them.
    timing = RequestTiming(0.0, 0.0, 0.0, 0.0, None, 1, 1)
    names = {*summarize([timing], 1.0), *batch_efficiency(1.0, 1.0, 1), *TRIAL_METRICS}
    names |= set(OWN_METRICS)
    for dataset in DATASET_CONFIGS:
        names |= set(task_class(dataset).aggregate_names())
    return names


def _requests_per_s(
    workload: Workload,
    engine: Engine,
    items: list[LoadedSample],
    decoding: DecodingParams,
    serving: ServingParams,
) -> float:
    # An untimed pass first: a batch shape's first call may compile or capture graphs, which
    # the measured run (after warm-up at batch_size) never pays.
    workload.run(engine, items, decoding, serving)
    engine.reset_prefix_cache()  # each timed pass over the slice starts cold, as the other did
    start = engine.now()
    workload.run(engine, items, decoding, serving)
    return len(items) / (engine.now() - start)


def _device_tags(device: str) -> dict[str, str]:
    tags = {
        "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
        "python_version": platform.python_version(),
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        tags["device_name"] = torch.cuda.get_device_name(index)
        tags["cuda_version"] = str(torch.version.cuda)
        try:
            import pynvml

            pynvml.nvmlInit()
            tags["driver_version"] = str(pynvml.nvmlSystemGetDriverVersion())
        except Exception as error:  # NVML missing: say so rather than guess
            tags["driver_version"] = f"unknown ({type(error).__name__})"
    else:
        tags["device_name"] = platform.processor() or platform.machine()
        tags["cuda_version"] = "cpu"
    return tags


def run_trial(trial: TrialConfig, progress: Callable[[int, int], Any] | None = None) -> TrialResult:
    """Measure one trial; `progress(done, total)` is told as measured requests are answered."""
    model = check_trial(trial)
    task = task_class(trial.dataset)(trial.dataset)
    samples, data_report = task.load()
    loaded = ENGINE_CACHE.get(trial.engine, trial.model, trial.engine.load_options(trial))
    engine = loaded.engine
    decoding = DecodingParams.from_trial(trial)
    serving = ServingParams.from_trial(trial)
    workload = build_workload(trial, task, engine)
    samples = workload.arrange(samples)
    depth = max(trial.dataset.prefetch, trial.batch_size)

    with PeakMemoryTracker(engine.device) as memory:
        warmup = samples[: trial.batch_size * trial.warmup_batches]
        workload.run(engine, prefetch(warmup, depth, data_report), decoding, serving)

        efficiency = {"batch_efficiency": 1.0, "batch_speedup": 1.0}  # exact for batch_size 1
        if trial.batch_size > 1:
            calibration = list(prefetch(samples[: trial.calibration_samples], depth, data_report))
            batched = _requests_per_s(workload, engine, calibration, decoding, serving)
            one = replace(serving, batch_size=1)
            single = _requests_per_s(workload, engine, calibration, decoding, one)
            efficiency = batch_efficiency(batched, single, min(trial.batch_size, len(calibration)))

        torch.manual_seed(trial.seed)
        done = 0

        def on_done(count: int) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress(done, len(samples))

        engine.reset_prefix_cache()  # no reuse of the earlier phases' identical prompts
        with engine.own_metrics() as own_metrics:
            start = engine.now()
            measured = prefetch(samples, depth, data_report)
            completions = workload.run(engine, measured, decoding, serving, on_done)
            generation_s = engine.now() - start
    if not completions:
        raise DataError(f"dataset '{trial.dataset.name}': no image could be decoded")

    metrics = summarize([c.timing for c in completions], generation_s)
    metrics.update(efficiency)
    metrics.update(own_metrics)
    report = memory.report()
    metrics["peak_mem_gb"] = report.peak_mem_gb
    if report.torch_peak_allocated_gb is not None:
        metrics["torch_peak_allocated_gb"] = report.torch_peak_allocated_gb
        metrics["torch_peak_reserved_gb"] = report.torch_peak_reserved_gb
    if loaded.load_s is not None:
        metrics["model_load_s"] = loaded.load_s

    # By id: a sample whose image fails to decode (on_error=skip) has no completion.
    by_id: dict[str, Sample] = {sample.question_id: sample for sample in samples}
    predictions = [task.record(by_id[c.request_id], c) for c in completions]
    metrics.update(task.aggregate(predictions))
    metrics["num_samples_measured"] = float(len(completions))
    metrics["skipped_samples"] = float(len(data_report.skipped))

    tags = {
        "engine": trial.engine.name,
        "model": trial.model.name,
        "model_type": model.model_type,
        "chat_template": engine.chat.template_source,
        "device": engine.device,
        "peak_mem_source": report.source,
        "engine_cache": "hit" if loaded.cache_hit else "miss",
        "dataset": trial.dataset.name,
        **_device_tags(engine.device),
        **data_report.tags,
        **engine.tags(),
    }
    if trial.model.random_weights:
        tags["random_weights"] = "random weights: accuracy is meaningless"
    skipped = [asdict(s) for s in data_report.skipped]
    return TrialResult(metrics, tags, predictions, skipped=skipped)
