"""A trial's answers against a reference trial's, on the same questions (the quality guard).

Both come from the trials' prediction tables (`Task.record` rows, logged as predictions.json),
paired by `question_id`:
- `answer_agreement`: the share of questions whose answer (`prediction`: normalised as the
  task scores it) equals the reference's;
- `accuracy_delta`: the trial's accuracy minus the reference's, i.e. the mean over questions of
  the paired difference of their scores, with `accuracy_delta_ci95`, the half-width of that
  mean's 95% interval (Student's t over the per-question differences: paired, so the questions'
  own difficulty cancels out). Identical answers give 0 and an interval of 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sweeper.metrics.stats import CI_SUFFIX, mean_ci95

ANSWER_AGREEMENT = "answer_agreement"
ACCURACY_DELTA = "accuracy_delta"
QUALITY_METRICS = (ANSWER_AGREEMENT, ACCURACY_DELTA, ACCURACY_DELTA + CI_SUFFIX)

Row = Mapping[str, Any]
Rows = Sequence[Row]


def _paired(predictions: Rows, reference: Rows) -> list[tuple[Row, Row]]:
    """The trial's rows, each with the reference's row of the same question. The reference must
    hold every question the trial answered; it may hold more (an open load leaves its warm-up and
    cool-down requests out of the trial's table, the reference answered them all)."""
    ours = {row["question_id"]: row for row in predictions}
    theirs = {row["question_id"]: row for row in reference}
    if not ours:
        raise ValueError("no predictions to compare with the reference")
    missing = sorted(map(str, ours.keys() - theirs.keys()))
    if missing:
        raise ValueError(
            f"the trial and its reference answered different questions ({len(missing)} not in "
            f"the reference, e.g. {missing[0]}): compare them on the same dataset, limit and seed"
        )
    return [(ours[key], theirs[key]) for key in ours]


def answer_agreement(predictions: Rows, reference: Rows) -> float:
    """The share of questions whose normalised answer equals the reference's."""
    pairs = _paired(predictions, reference)
    return sum(ours["prediction"] == theirs["prediction"] for ours, theirs in pairs) / len(pairs)


def accuracy_delta(predictions: Rows, reference: Rows) -> tuple[float, float]:
    """Accuracy minus the reference's and the half-width of its paired 95% interval (nan for a
    single question)."""
    pairs = _paired(predictions, reference)
    return mean_ci95([float(ours["score"]) - float(theirs["score"]) for ours, theirs in pairs])


def quality_metrics(predictions: Rows, reference: Rows) -> dict[str, float]:
    """The three metrics of QUALITY_METRICS."""
    delta, half_width = accuracy_delta(predictions, reference)
    return {
        ANSWER_AGREEMENT: answer_agreement(predictions, reference),
        ACCURACY_DELTA: delta,
        ACCURACY_DELTA + CI_SUFFIX: half_width,
    }
