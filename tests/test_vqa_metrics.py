import random

import pytest

from sweeper.metrics.vqa import majority_vote, normalize_answer, top_answer_match, vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("a cat", "cat"),
        ("An Apple", "apple"),
        ("dont", "don't"),
        ("don't", "don't"),
        ("yes!", "yes"),
        ("Yes.", "yes"),
        ("What?", "what"),
        # Commas are dropped before the punctuation pass, so thousands separators vanish.
        ("1,000", "1000"),
        ("1, 2", "1 2"),
        # A period followed by a digit survives (decimals), any other period goes.
        ("3.5", "3.5"),
        ("3.", "3"),
        ("a.m.", "am"),
        # A punctuation mark touching a space is deleted, one inside a word becomes a space.
        ("t-shirt", "t shirt"),
        ("t - shirt", "t shirt"),
        ("black/white", "black white"),
        ("dog's", "dog 's"),
        ("none", "0"),
        ("  Ten\tdogs\n", "10 dogs"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("n_matching", "expected"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_by_number_of_matching_humans(n_matching: int, expected: float) -> None:
    answers = ["red"] * n_matching + ["blue"] * (10 - n_matching)
    assert vqa_accuracy("red", answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [("Two", "2"), ("the dog.", "dog"), ("a cat", "cat"), ("dont", "don't"), ("yes!", "yes")],
)
def test_vqa_accuracy_normalises_both_sides(prediction: str, answer: str) -> None:
    assert vqa_accuracy(prediction, [answer] * 10) == 1.0
    assert vqa_accuracy(answer, [prediction] * 10) == 1.0


def test_vqa_accuracy_single_answer_counts_as_ten_humans() -> None:
    assert vqa_accuracy("Yes", ["yes"]) == 1.0
    assert vqa_accuracy("no", ["yes"]) == 0.0


def test_vqa_accuracy_rejects_empty_answers() -> None:
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("yes", [])


def test_top_answer_match() -> None:
    answers = ["dog"] * 6 + ["cat"] * 4
    assert top_answer_match("The dog.", answers) == 1.0
    assert top_answer_match("cat", answers) == 0.0
    assert top_answer_match("two", ["2"]) == 1.0
    assert top_answer_match("bird", answers) == 0.0


def test_top_answer_match_accepts_any_tied_answer() -> None:
    answers = ["red", "blue", "red", "blue", "green"]
    assert top_answer_match("red", answers) == 1.0
    assert top_answer_match("Blue!", answers) == 1.0
    assert top_answer_match("green", answers) == 0.0


def test_top_answer_match_rejects_empty_answers() -> None:
    with pytest.raises(ValueError, match="at least one"):
        top_answer_match("yes", [])


def test_majority_vote() -> None:
    # The winning group's first member, as written: it is normalised when scored.
    assert majority_vote(["Yes", "no", "yes."]) == "Yes"
    assert majority_vote(["two", "2", "3"]) == "two"


def test_majority_vote_tie_goes_to_first_occurrence() -> None:
    assert majority_vote(["cat", "dog", "Dog", "the cat"]) == "cat"
    assert majority_vote(["The Dog", "cat", "dog", "Cat"]) == "The Dog"
    assert majority_vote(["dog", "cat"]) == "dog"
    assert majority_vote(["b", "a", "a", "b"]) == "b"


def test_majority_vote_rejects_empty() -> None:
    with pytest.raises(ValueError, match="at least one"):
        majority_vote([])


def _reference_accuracy(res_ans: str, gt_answers: list[str]) -> float:
    """Literal transcription of the official VQA eval accuracy loop, on normalised strings."""
    # Dicts carry answer_id as upstream's do, so `item != gtAnsDatum` excludes only human i.
    answers = [{"answer_id": i + 1, "answer": a} for i, a in enumerate(gt_answers)]
    # Upstream's camelCase names are kept for a line-by-line comparison.
    gtAcc = []
    for gtAnsDatum in answers:
        otherGTAns = [item for item in answers if item != gtAnsDatum]
        matchingAns = [item for item in otherGTAns if item["answer"] == res_ans]
        acc = min(1, float(len(matchingAns)) / 3)
        gtAcc.append(acc)
    return float(sum(gtAcc)) / len(gtAcc)


def test_vqa_accuracy_matches_official_loop() -> None:
    vocab = ["yes", "no", "2", "3", "red", "blue car", "dog", "10"]
    assert all(normalize_answer(word) == word for word in vocab)
    rng = random.Random(0)
    # Skewed weights, and predictions mostly drawn from the answers, so that low and high
    # numbers of matching humans (around and above the cap of 3) both occur.
    weights = [8, 4, 2, 2, 1, 1, 1, 1]
    for _ in range(50):
        answers = rng.choices(vocab, weights=weights, k=rng.choice([10, 10, 10, 5, 3, 2]))
        prediction = rng.choice(answers) if rng.random() < 0.7 else rng.choice(vocab)
        assert vqa_accuracy(prediction, answers) == pytest.approx(
            _reference_accuracy(prediction, answers)
        )
