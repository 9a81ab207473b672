"""The answer a sweep ends with: the rule's ranking, the Pareto front, the chosen setting and
its command (pure logic on logged metrics)."""

from __future__ import annotations

import math

from sweeper.reports.recommend import Rule, Trial, recommend


def _trial(name: str, batch: int, accuracy: float, tps: float, memory: float, **more) -> Trial:
    metrics = {"accuracy": accuracy, "tps": tps, "peak_mem_gb": memory, **more}
    overrides = [f"batch_size={batch}", "dataset.limit=50", "tracking.uri=sqlite:///s.db"]
    return Trial(name, overrides, metrics)


def _sweep() -> list[Trial]:
    return [
        _trial("0", 1, 0.90, 100.0, 4.0, accuracy_ci95=0.03),
        _trial("1", 8, 0.88, 400.0, 6.0, accuracy_ci95=0.03),  # within the best's interval
        _trial("2", 32, 0.80, 900.0, 9.0, accuracy_ci95=0.03),  # fastest, too inaccurate
        _trial("3", 16, 0.87, 300.0, 7.0, accuracy_ci95=0.03),  # dominated by trial 1
    ]


def test_default_rule_is_the_fastest_within_the_best_accuracys_interval() -> None:
    answer = recommend(_sweep())
    assert answer.chosen is not None and answer.chosen.name == "1"
    assert [t.name for t in answer.ranked] == ["1", "3", "0", "2"]  # eligible ones first
    assert [t.eligible for t in answer.ranked] == [True, True, True, False]
    assert answer.throughput == "tps" and "within the 95% interval" in answer.rule
    assert {t.name for t in answer.ranked if t.on_front} == {"0", "1", "2"}
    assert answer.chosen.command.startswith("python -m sweeper batch_size=8 dataset.limit=50")
    assert answer.chosen.label == "batch_size=8"  # the varied knobs only


def test_other_rules_and_a_memory_budget() -> None:
    assert recommend(_sweep(), Rule.accuracy).chosen.name == "0"
    assert recommend(_sweep(), Rule.throughput).chosen.name == "2"
    assert recommend(_sweep(), Rule.memory).chosen.name == "0"
    within = recommend(_sweep(), budget_gb=5.0)
    assert within.chosen.name == "0" and "within 5 GiB" in within.rule
    none = recommend(_sweep(), budget_gb=1.0)
    assert none.chosen is None and "none is recommended" in none.notes[0]


def test_goodput_is_the_throughput_where_measured_and_noise_is_flagged() -> None:
    trials = [
        _trial("0", 1, 0.9, 100.0, 4.0, goodput_rps=5.0, goodput_rps_ci95=0.4),
        _trial("1", 2, 0.9, 120.0, 4.0, goodput_rps=4.8, goodput_rps_ci95=0.4),
        _trial("2", 4, 0.9, 150.0, 4.0, goodput_rps=3.0, goodput_rps_ci95=0.4),
    ]
    answer = recommend(trials)
    assert answer.throughput == "goodput_rps" and answer.chosen.name == "0"
    close = {t.name: t.close_to_chosen for t in answer.ranked[1:]}
    assert close == {"1": True, "2": False}  # 4.8 is within 5.0 +- 0.4, 3.0 is not


def test_without_accuracy_the_fastest_and_nothing_finished() -> None:
    trials = [_trial("0", 1, math.nan, 10.0, 1.0), _trial("1", 2, math.nan, 20.0, 1.0)]
    answer = recommend(trials)
    assert answer.chosen.name == "1" and "no trial logged accuracy" in answer.notes[0]
    empty = recommend([])
    assert empty.chosen is None and empty.ranked == []
