"""VQA accuracy against the reference code, run from its own released sources (tests/references.py):
lmms-eval's OK-VQA scoring for `accuracy` (dataset.scoring=lmms_eval, the default) and the
GT-Vision-Lab evaluator for dataset.scoring=official, on thousands of generated cases and on a
trial's own predictions."""

from __future__ import annotations

import json
import random
import shutil
import statistics
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import sweeper.cli  # noqa: F401  (registers the configs)
from sweeper.data.okvqa import ANNOTATIONS_FILE, IMAGE_DIR, QUESTIONS_FILE, image_file_name
from sweeper.metrics.vqa import normalize_answer, official_vqa_accuracy, vqa_accuracy
from sweeper.trial import run_trial
from tests.references import lmms_eval_okvqa, official_vqa_scores

# Answers and model outputs as they come: case, punctuation, articles, numbers, contractions,
# possessives, commas in numbers, periods, newlines, and phrases around them.
PIECES = [
    "two", "2", "Two", "ten", "10", "none", "0", "zero", "the dog", "dog", "a dog", "dogs",
    "dog's", "whats", "what's", "What's", "dont", "don't", "isnt", "its", "it's", "1,000", "1000",
    "3.5", "3.", "a.m.", "am", "t-shirt", "t shirt", "yes", "Yes.", "yes!", "no", "No", "red",
    "red ", " Red", "red\n", "Red?", "black/white", "black and white", "hot-dog", "(red)",
    '"quoted"', "e-mail", "#1", "50%", "u.s.", "mr. smith", "rock & roll", "an apple", "the",
    "It is two.", "The answer is: dog", "yes, it is", "a red ball\nthat bounces", "cat; dog",
]  # fmt: skip


def _cases(count: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """(prediction, ten human answers): answers from a few variants, so humans agree and differ."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        variants = rng.sample(PIECES, rng.choice([1, 1, 2, 3]))
        answers = [rng.choice(variants) for _ in range(10)]
        words = rng.choice([1, 1, 1, 2])
        prediction = " ".join(rng.choice(variants + PIECES) for _ in range(words))
        cases.append((prediction, answers))
    return cases


def test_accuracy_is_lmms_evals_ok_vqa_scoring() -> None:
    process_results = lmms_eval_okvqa().ok_vqa_process_results
    cases = _cases(4000)
    differ = []
    for prediction, answers in cases:
        theirs = process_results({"answers": list(answers), "question_id": 1}, [prediction])
        if abs(vqa_accuracy(prediction, answers) - theirs["exact_match"]) > 1e-12:
            differ.append((prediction, answers, theirs["exact_match"]))
    assert not differ, differ[:5]
    scores = {round(vqa_accuracy(p, a), 6) for p, a in cases}
    assert {0.0, 1.0} < scores and len(scores) >= 5  # the cases cover partial agreement


def test_official_scoring_is_the_gt_vision_lab_evaluator() -> None:
    cases = _cases(4000, seed=1)
    reference = official_vqa_scores(cases)
    differ = [
        (p, a, ref)
        for (p, a), ref in zip(cases, reference, strict=True)
        if abs(official_vqa_accuracy(p, a) - ref) > 1e-9
    ]
    assert not differ, differ[:5]
    # The two scorings do differ, which is why the option exists.
    assert sum(vqa_accuracy(p, a) != official_vqa_accuracy(p, a) for p, a in cases) > 100


def test_a_prediction_is_normalised_once() -> None:
    # The normaliser is not idempotent (EvalAI's, kept verbatim): normalising twice, as the trial
    # once did, scored "whats" against ten "whats" 0.
    assert normalize_answer("whats") == "what's" and normalize_answer("what's") == "what 's"
    assert vqa_accuracy("whats", ["whats"] * 10) == 1.0
    assert vqa_accuracy(normalize_answer("whats"), ["whats"] * 10) == 0.0


def _okvqa_from_easy_vqa(root: Path, count: int) -> list[str]:
    """easy-VQA questions in OK-VQA's official layout, ten answers each: the right answer k times
    (k cycling 0..4) among others, so that VQA accuracy takes several values. The flags."""
    import easy_vqa
    from PIL import Image

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    (root / IMAGE_DIR).mkdir(parents=True)
    others = ["Circle", "the rectangle", "Two", "yes.", "no!"]
    entries, annotations = [], []
    for index in range(count):
        image_id = index + 1
        Image.open(paths[image_ids[index]]).convert("RGB").save(
            root / IMAGE_DIR / image_file_name(image_id)
        )
        k = index % 5
        humans = [answers[index]] * k + [others[(index + j) % 5] for j in range(10 - k)]
        entries.append({"image_id": image_id, "question": questions[index], "question_id": index})
        annotations.append(
            {
                "question_id": index,
                "image_id": image_id,
                "question_type": "other",
                "answer_type": "other",
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(humans)
                ],
            }
        )
    (root / QUESTIONS_FILE).write_text(json.dumps({"questions": entries}))
    (root / ANNOTATIONS_FILE).write_text(json.dumps({"annotations": annotations}))
    return [
        "dataset=okvqa",
        f"dataset.questions_file={root / QUESTIONS_FILE}",
        f"dataset.annotations_file={root / ANNOTATIONS_FILE}",
        f"dataset.image_dir={root / IMAGE_DIR}",
    ]


@pytest.fixture(scope="module")
def okvqa_args(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("okvqa")
    yield _okvqa_from_easy_vqa(root, 30)
    shutil.rmtree(root, ignore_errors=True)


def _trial(*overrides: str):
    with initialize_config_module("sweeper.conf", version_base=None):
        cfg = compose("config", overrides=["engine.device=cpu", "max_new_tokens=8", *overrides])
    return OmegaConf.to_object(cfg)


@pytest.mark.parametrize("scoring", ["lmms_eval", "official"])
def test_a_trials_predictions_rescored_by_the_reference_give_its_accuracy(
    okvqa_args, scoring
) -> None:
    result = run_trial(_trial(*okvqa_args, f"dataset.scoring={scoring}"))
    rows = result.predictions
    assert all(row["outputs"] and isinstance(row["answers"], list) for row in rows)
    assert len({row["score"] for row in rows}) >= 3, rows  # the model's answers score variously
    if scoring == "lmms_eval":
        process_results = lmms_eval_okvqa().ok_vqa_process_results
        rescored = [
            process_results({"answers": list(row["answers"]), "question_id": 0}, row["outputs"])[
                "exact_match"
            ]
            for row in rows
        ]
    else:
        rescored = official_vqa_scores([(row["outputs"][0], row["answers"]) for row in rows])
    assert result.metrics["accuracy"] == pytest.approx(statistics.mean(rescored), abs=1e-9)
    assert scoring.split("_")[0] in result.tags["accuracy_metric"].lower().replace("-", "_") or (
        scoring == "official" and "GT-Vision-Lab" in result.tags["accuracy_metric"]
    )
