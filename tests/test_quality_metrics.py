"""answer_agreement and accuracy_delta against a hand computation (pure logic: no engine)."""

from __future__ import annotations

import math

import pytest

from sweeper.metrics.quality import accuracy_delta, answer_agreement, quality_metrics


def _row(question_id: int, prediction: str, score: float) -> dict:
    return {"question_id": question_id, "prediction": prediction, "score": score}


# Five questions; the trial differs from the reference on questions 2 and 4. Question 3's
# answer differs in its raw text only ("Red." vs "red"): the normalised prediction is the same.
REFERENCE = [
    _row(0, "circle", 1.0),
    _row(1, "no", 1.0),
    _row(2, "red", 1.0),
    _row(3, "red", 0.0),
    _row(4, "yes", 0.0),
]
TRIAL = [  # in another order: rows pair by question_id
    _row(4, "no", 1.0),
    _row(3, "red", 0.0),
    _row(2, "blue", 0.0),
    _row(1, "no", 1.0),
    _row(0, "circle", 1.0),
]


def test_agreement_and_delta_equal_a_hand_computation() -> None:
    assert answer_agreement(TRIAL, REFERENCE) == 3 / 5
    delta, half_width = accuracy_delta(TRIAL, REFERENCE)
    # Differences per question: 0, 0, -1, 0, +1. Mean 0; sample sd sqrt(2/4); t(0.975, 4).
    assert delta == 0.0
    assert half_width == pytest.approx(2.7764451051977987 * math.sqrt(0.5) / math.sqrt(5))


def test_a_trial_against_itself() -> None:
    assert quality_metrics(REFERENCE, REFERENCE) == {
        "answer_agreement": 1.0,
        "accuracy_delta": 0.0,
        "accuracy_delta_ci95": 0.0,
    }


def test_one_lost_answer_out_of_four() -> None:
    reference = [_row(i, "yes", 1.0) for i in range(4)]
    trial = [*reference[:3], _row(3, "no", 0.0)]
    metrics = quality_metrics(trial, reference)
    assert metrics["answer_agreement"] == 0.75
    assert metrics["accuracy_delta"] == -0.25
    # Differences 0, 0, 0, -1: sd 0.5, t(0.975, 3) = 3.1824.
    assert metrics["accuracy_delta_ci95"] == pytest.approx(3.182446305284263 * 0.5 / 2)


def test_different_questions_are_refused() -> None:
    with pytest.raises(ValueError, match="different questions"):
        answer_agreement(TRIAL, REFERENCE[:4])
    # The trial's questions among the reference's (an open load's warm-up left out): compared.
    measured = [row for row in TRIAL if row["question_id"] < 4]
    assert answer_agreement(measured, REFERENCE) == answer_agreement(measured, REFERENCE[:4])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy_delta([], [])
