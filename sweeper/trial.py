"""One trial: load (or reuse) the engine, stream the task's samples as requests, measure, score.

Order of work, so that what is measured means what it says:
1. warm-up: `warmup_batches` batches, never counted;
2. calibration (batch_size > 1): the first min(calibration_samples, N) samples at batch_size
   and one at a time, for `batch_efficiency`: each shape once untimed (a new batch shape may
   compile), then the two passes timed `calibration_repeats` times, interleaved;
3. the measured run over all N samples, `repeats` times (each from a cold prefix cache), whose
   per-request timings and wall time give the performance metrics and whose answers the task
   scores; with several repeats each metric is their mean, with its 95% confidence interval.
Peak memory is sampled throughout (it is a peak: warm-up does not inflate it beyond the run).
"""

from __future__ import annotations

import math
import platform
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from sweeper.config import EXACT_REFERENCE, ConfigError, TrialConfig
from sweeper.data import DataError, LoadedSample, Sample, prefetch
from sweeper.engines import ENGINE_CACHE, Engine
from sweeper.loads import Measured, build_load
from sweeper.metrics.memory import PeakMemoryTracker
from sweeper.metrics.performance import RequestTiming, batch_efficiency, summarize
from sweeper.metrics.quality import QUALITY_METRICS, quality_metrics
from sweeper.metrics.stats import CI_SUFFIX, combine_repeats
from sweeper.models import resolve_model_path
from sweeper.models.info import ModelInfo, model_info
from sweeper.reference import answers_key, changes, exact_reference, read_predictions
from sweeper.requests import DecodingParams, ServingParams
from sweeper.tasks import Task, task_class
from sweeper.workloads import Workload, build_workload


@dataclass
class TrialResult:
    metrics: dict[str, float]
    tags: dict[str, str]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # under dataset.on_error=skip
    repeats: list[dict[str, float]] = field(default_factory=list)  # each measured run's metrics
    # A rate sweep's steps: (label, metrics, tags) each, logged as child runs.
    steps: list[tuple[str, dict[str, float], dict[str, str]]] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)  # the engine's files (server log)


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
    if trial.load.open and (why := trial.engine.open_load_refusal(trial)):
        raise ConfigError("load", trial.load.name, why)
    chat_prompts(model, trial.model.chat_template)  # refuses a model without a chat template
    if trial.reference == EXACT_REFERENCE:
        reference = exact_reference(trial)
        reference.engine.check(reference, model)
    return model


# What run_trial adds to the performance summary and the task's scores.
TRIAL_METRICS = (
    "peak_mem_gb",
    "torch_peak_allocated_gb",
    "torch_peak_reserved_gb",
    "model_load_s",
    "num_samples_measured",
    "skipped_samples",
    "reference_accuracy",
    *QUALITY_METRICS,
)

Predictions = list[dict[str, Any]]


class ReferenceStore(Protocol):
    """Where a sweep keeps its references' predictions, by `answers_key` (its parent run)."""

    def get(self, key: str) -> Predictions | None: ...

    def put(self, key: str, predictions: Predictions) -> None: ...


# References answered in this process, by answers_key: a sweep's later trials reuse them.
REFERENCES: dict[str, Predictions] = {}


def metric_names() -> set[str]:
    """Every metric a trial can return, whatever its engine, task and device: what a study's
    objectives and constraints are checked against before its first trial."""
    from sweeper.config import SLOConfig
    from sweeper.engines.toolkit.prometheus import OWN_METRICS
    from sweeper.loads.load import LOAD_METRICS
    from sweeper.tasks.config import DATASET_CONFIGS

    # The summaries' own keys, from the functions that make them.
    timing = RequestTiming(0.0, 0.0, 0.0, 0.0, 0.1, 1, 2, itl_s=[0.1])
    objectives = SLOConfig(ttft_s=1.0)
    names = {*summarize([timing], 1.0, objectives), *batch_efficiency([1.0], [1.0], 1)}
    names |= {*TRIAL_METRICS, *OWN_METRICS, *LOAD_METRICS}
    for dataset in DATASET_CONFIGS:
        names |= set(task_class(dataset).aggregate_names())
    # With repeats, each one's 95% interval too.
    return names | {name + CI_SUFFIX for name in names}


class Progress(Protocol):
    """What a trial tells while it runs: its phase (`loading`, `warm-up`, `calibration`,
    `measuring`) with the requests it holds when known, then each request answered."""

    def phase(self, name: str, total: int | None = None) -> None: ...

    def advance(self, count: int = 1) -> None: ...


class _Silent:
    def phase(self, name: str, total: int | None = None) -> None:
        pass

    def advance(self, count: int = 1) -> None:
        pass


def _requests_per_s(
    workload: Workload,
    engine: Engine,
    items: list[LoadedSample],
    decoding: DecodingParams,
    serving: ServingParams,
    on_done: Callable[[int], None],
) -> tuple[float, float]:
    """One timed pass over `items`: its requests/s and its requests' mean latency (E2EL)."""
    engine.reset_prefix_cache()  # each timed pass over the slice starts cold
    start = engine.now()
    completions = workload.run(engine, items, decoding, serving, on_done)
    rps = len(items) / (engine.now() - start)
    return rps, statistics.fmean(c.timing.latency_s for c in completions)


def _calibrate(
    workload: Workload,
    engine: Engine,
    items: list[LoadedSample],
    decoding: DecodingParams,
    serving: ServingParams,
    repeats: int,
    on_done: Callable[[int], None],
) -> tuple[dict[str, float], float]:
    """batch_efficiency on `items`: batched against one at a time, interleaved `repeats` times;
    and the median of the one-at-a-time passes' mean request latency."""
    one = replace(serving, batch_size=1)
    # An untimed pass of each shape first: its first call may compile or capture graphs, which
    # the measured run (after warm-up at batch_size) never pays.
    for shape in (serving, one):
        workload.run(engine, items, decoding, shape, on_done)
    batched, single, alone_s = [], [], []
    for _ in range(repeats):
        batched.append(_requests_per_s(workload, engine, items, decoding, serving, on_done)[0])
        rps, latency_s = _requests_per_s(workload, engine, items, decoding, one, on_done)
        single.append(rps)
        alone_s.append(latency_s)
    efficiency = batch_efficiency(batched, single, min(serving.batch_size, len(items)))
    return efficiency, statistics.median(alone_s)


def _score(
    trial: TrialConfig,
    task: Task,
    workload: Workload,
    measured: Measured,
    samples: list[Sample],
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """A measurement's metrics (the one metrics function, the load's and the engine's own, the
    task's scores) and the task's prediction rows."""
    completions = measured.completions
    if not completions:
        raise DataError(f"dataset '{trial.dataset.name}': no image could be decoded")
    # By id: a sample whose image fails to decode (on_error=skip) has no completion.
    by_id = {sample.question_id: sample for sample in samples}
    predictions = [task.record(by_id[c.request_id], c, workload.reasoning) for c in completions]
    metrics = summarize([c.timing for c in completions], measured.window_s, trial.slo)
    # An engine behind HTTP sees no prefill of its own: the server's means (own metrics) stand in.
    metrics.update(measured.metrics)
    metrics["context_load_s"] = metrics["preprocess_s"] + metrics["prefill_s"]
    if not trial.ignore_eos:
        metrics.update(task.aggregate(predictions))
    return metrics, predictions


def _answer_once(trial: TrialConfig, progress: Progress) -> Predictions:
    """The trial's predictions from one unmeasured pass over its samples (a reference's)."""
    task = task_class(trial.dataset)(trial.dataset)
    samples, data_report = task.load()
    progress.phase("reference: loading")
    engine = ENGINE_CACHE.get(trial.engine, trial.model, trial.engine.load_options(trial)).engine
    workload = build_workload(trial, task, engine)
    samples = workload.arrange(samples)
    depth = max(trial.dataset.prefetch, trial.batch_size)
    decoding, serving = DecodingParams.from_trial(trial), ServingParams.from_trial(trial)

    def items() -> Iterable[LoadedSample]:
        engine.reset_prefix_cache()
        torch.manual_seed(trial.seed)
        return prefetch(samples, depth, data_report)

    progress.phase("reference", len(samples))
    load = build_load(trial.load)
    (measured,) = load.measure(
        engine, workload, items, len(samples), decoding, serving, progress.advance
    )
    return _score(trial, task, workload, measured, samples)[1]


def _reference_answers(
    trial: TrialConfig, progress: Progress, store: ReferenceStore | None
) -> tuple[str | None, Predictions | None, dict[str, str]]:
    """The reference's answers key (None for a file), its predictions (None when the trial is
    its own reference: they are the trial's own, known once it has run) and the tags that say
    what it is and where its answers came from."""
    assert trial.reference is not None
    if trial.reference != EXACT_REFERENCE:
        tags = {"reference": trial.reference, "reference_answers": "from the file"}
        return None, read_predictions(trial.reference), tags
    reference = exact_reference(trial)
    key = answers_key(reference)
    tags = {"reference": changes(trial, reference), "reference_key": key}
    if key == answers_key(trial):
        tags["reference"] = "this trial (every output-changing knob at its exact setting)"
    # Answered before in this sweep (by this configuration too: its answers are then compared
    # with the earlier run's, which is how deterministic the engine is).
    predictions = REFERENCES.get(key) or (store.get(key) if store else None)
    tags["reference_answers"] = "cached in this sweep"
    if predictions is None and key == answers_key(trial):
        return key, None, {**tags, "reference_answers": "this trial's own"}
    if predictions is None:
        predictions = _answer_once(reference, progress)
        tags["reference_answers"] = "answered for this trial"
        if store is not None:
            store.put(key, predictions)
    REFERENCES[key] = predictions
    return key, predictions, tags


def _headline(steps: list[dict[str, float]]) -> int:
    """The step a rate sweep reports as the trial's: the highest goodput, else throughput."""
    key = "goodput_rps" if "goodput_rps" in steps[0] else "tps"
    return max(range(len(steps)), key=lambda i: steps[i][key])


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


def run_trial(
    trial: TrialConfig, progress: Progress | None = None, references: ReferenceStore | None = None
) -> TrialResult:
    """Measure one trial, telling `progress` its phases and answered requests; with a reference
    (`trial.reference`), compare its answers with the reference's, which `references` (a sweep's
    store) and this process keep for the trials after it."""
    progress = progress or _Silent()
    model = check_trial(trial)
    # Answers compared only where the trial has them: ignore_eos generates past the answer.
    compared = trial.reference is not None and not trial.ignore_eos
    if compared:  # first: the trial's engine then stays loaded for the next trial
        reference_key, reference, reference_tags = _reference_answers(trial, progress, references)
    task = task_class(trial.dataset)(trial.dataset)
    samples, data_report = task.load()
    progress.phase("loading")
    loaded = ENGINE_CACHE.get(trial.engine, trial.model, trial.engine.load_options(trial))
    engine = loaded.engine
    decoding = DecodingParams.from_trial(trial)
    serving = ServingParams.from_trial(trial)
    workload = build_workload(trial, task, engine)
    samples = workload.arrange(samples)
    depth = max(trial.dataset.prefetch, trial.batch_size)

    with PeakMemoryTracker(engine.device) as memory:
        warmup = samples[: trial.batch_size * trial.warmup_batches]
        progress.phase("warm-up", len(warmup))
        warm = prefetch(warmup, depth, data_report)
        workload.run(engine, warm, decoding, serving, progress.advance)

        efficiency = {"batch_efficiency": 1.0, "batch_speedup": 1.0}  # exact for batch_size 1
        alone_latency_s = math.nan
        if trial.batch_size > 1 or trial.load.open:
            calibration = list(prefetch(samples[: trial.calibration_samples], depth, data_report))
            repeats = trial.calibration_repeats
            progress.phase("calibration", len(calibration) * 2 * (1 + repeats))
            efficiency, alone_latency_s = _calibrate(
                workload, engine, calibration, decoding, serving, repeats, progress.advance
            )

        steps_per_run = getattr(trial.load, "steps", 1)
        progress.phase("measuring", len(samples) * trial.repeats * steps_per_run)
        on_done = progress.advance

        def items() -> Iterable[LoadedSample]:
            engine.reset_prefix_cache()  # no reuse of the earlier phases' identical prompts
            torch.manual_seed(trial.seed)
            return prefetch(samples, depth, data_report)

        load = build_load(trial.load)
        runs = [  # repeats x steps
            load.measure(engine, workload, items, len(samples), decoding, serving, on_done)
            for _ in range(trial.repeats)
        ]

    scored = [[_score(trial, task, workload, step, samples) for step in run] for run in runs]
    steps = [combine_repeats([run[index][0] for run in scored]) for index in range(len(runs[0]))]
    headline = _headline(steps)
    metrics, predictions = steps[headline], scored[-1][headline][1]
    if trial.load.open:
        # Batching under load: a request's latency alone against in flight. By Little's law
        # requests/s / (requests in flight x 1 / latency alone). Not the one-at-a-time pass's
        # requests/s: its window also holds the client's turn-around between requests, which
        # made the ratio exceed 1 where the server was not loaded.
        metrics["batch_efficiency"] = alone_latency_s / metrics["latency_s"]
    else:
        metrics.update(efficiency)
    report = memory.report()
    metrics["peak_mem_gb"] = report.peak_mem_gb
    if report.torch_peak_allocated_gb is not None:
        metrics["torch_peak_allocated_gb"] = report.torch_peak_allocated_gb
        metrics["torch_peak_reserved_gb"] = report.torch_peak_reserved_gb
    if loaded.load_s is not None:
        metrics["model_load_s"] = loaded.load_s

    metrics["num_samples_measured"] = float(len(predictions))
    step_runs = [
        (step.label, combined, step.tags)
        for step, combined in zip(runs[-1], steps, strict=True)
        if len(steps) > 1
    ]
    metrics["skipped_samples"] = float(len(data_report.skipped))
    if compared:
        if reference is None:  # its own reference: the sweep's other trials compare with it
            reference = REFERENCES[reference_key] = predictions
            if references is not None:
                references.put(reference_key, predictions)
        metrics.update(quality_metrics(predictions, reference))
        metrics["reference_accuracy"] = sum(r["score"] for r in reference) / len(reference)

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
        **runs[-1][headline].tags,
        "load": trial.load.name,
    }
    if len(steps) > 1:
        tags["rate_sweep_step"] = runs[-1][headline].label
    tags["accuracy_metric"] = task.metric
    if trial.ignore_eos:  # the engines' texts run on past the answer, each engine differently
        tags["accuracy_metric"] = "not logged: ignore_eos=true generates past EOS"
    if compared:
        tags.update(reference_tags)
    if trial.model.random_weights:
        tags["random_weights"] = "random weights: accuracy is meaningless"
    skipped = [asdict(s) for s in data_report.skipped]
    repeats = [run[headline][0] for run in scored]
    return TrialResult(metrics, tags, predictions, skipped, repeats, step_runs, engine.artifacts())
