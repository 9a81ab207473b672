"""VQA answer normalisation and VQA soft accuracy, in the two variants people report.

`vqa_accuracy` is lmms-eval's OK-VQA / VQAv2 accuracy (`ok_vqa_process_results`): the raw
prediction and every human answer go through the EvalAI answer processor (MMF's, which lmms-eval
copies: `EvalAIAnswerProcessor.__call__`) once - lowercase, drop commas and ``?``, split off
``'s``, then the official ``processPunctuation`` and ``processDigitArticle`` steps (number words to
digits, articles dropped, contractions restored), quirks included - then each human i scores
min(1, matches among the other humans / 3) and these are averaged.

`official_vqa_accuracy` is the GT-Vision-Lab evaluator's (VQA/vqa/vqaEval.py, the Python 3 one,
which LAVIS ships too): the prediction gets ``processPunctuation`` and ``processDigitArticle``
only (no EvalAI step: "1,000" keeps its comma handling, "What's" its case until the digit step),
and human answers get ``processPunctuation`` alone, and only when they disagree with each other.
So "Two" against ten "2" scores 1 in both; "the dog" against ten "the dog" scores 0 officially
(the prediction loses its article, the agreeing humans keep theirs) and 1 in lmms-eval.

The normaliser is not idempotent ("whats" -> "what's" -> "what 's"): a prediction is normalised
exactly once, when it is scored. tests/test_vqa_reference.py checks both variants against the
reference code on generated cases.
"""

import re
from collections import Counter
from collections.abc import Sequence

# Verbatim from the official evaluator / MMF. Some keys can never match here (capitalised ones
# after lowercasing, "she's" after the "'s" split) and "somebody'd" maps the wrong way; they are
# kept as-is so scores agree with published numbers.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

_NUMBER_MAP = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# The official regexes, bugs and all: "(?!<=\d)" is a lookahead for the literal "<=" followed by
# a digit, not the intended lookbehind, so any period not followed by a digit goes ("3." -> "3",
# "3.5" stays).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")

_PUNCTUATIONS = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)  # fmt: skip

# The official code calls periodStrip.sub("", text, re.UNICODE), which passes re.UNICODE (32) as
# the replacement count; keep the cap so answers with over 32 periods normalise identically.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATIONS:
        # The space and digit-comma tests look at the input text, not the partially cleaned one,
        # exactly as upstream does.
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_MAP.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """Normalise a VQA answer the way lmms-eval's ``EvalAIAnswerProcessor`` does."""
    # EvalAI's word_tokenize step: commas go before the punctuation pass, so "1,000" -> "1000".
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _require_answers(answers: Sequence[str]) -> None:
    if not answers:
        raise ValueError("answers must hold at least one human answer")


def _soft_accuracy(prediction: str, answers: list[str]) -> float:
    """Mean over humans i of min(1, #other humans whose answer is the prediction / 3). A single
    answer (easy-VQA) stands for ten identical human answers: 1.0 on a match, else 0.0."""
    if len(answers) == 1:
        answers = answers * 10
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    # Leave-one-out: human i's own answer never counts towards its agreement.
    per_human = [min(1.0, (total - own) / 3) for own in matches]
    return sum(per_human) / len(per_human)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """lmms-eval's VQA accuracy in [0, 1] of a raw prediction (normalised here, once)."""
    _require_answers(answers)
    return _soft_accuracy(normalize_answer(prediction), [normalize_answer(a) for a in answers])


def official_prediction(prediction: str) -> str:
    """A raw prediction as the GT-Vision-Lab evaluator compares it."""
    pred = prediction.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(pred))


def official_vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The GT-Vision-Lab evaluator's VQA accuracy in [0, 1] of a raw prediction."""
    _require_answers(answers)
    pred = official_prediction(prediction)
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [_process_punctuation(answer) for answer in gts]
    return _soft_accuracy(pred, gts)


def top_answer_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the prediction equals a most common human answer (both normalised), else 0.0."""
    _require_answers(answers)
    counts = Counter(normalize_answer(a) for a in answers)
    top = max(counts.values())
    return float(counts.get(normalize_answer(prediction)) == top)


def majority_vote(predictions: Sequence[str]) -> str:
    """The prediction of the largest group of predictions equal once normalised (ties: the group
    met first), as it was written: it is normalised when it is scored."""
    if not predictions:
        raise ValueError("majority_vote needs at least one prediction")
    keys = [normalize_answer(p) for p in predictions]
    counts = Counter(keys)
    # Counter keeps first-occurrence order and max() returns the first maximum it meets.
    winner = max(counts, key=counts.__getitem__)
    return predictions[keys.index(winner)]
