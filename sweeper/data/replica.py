"""An offline performance replica of OK-VQA val, in the official file layout.

    python -m sweeper.data.replica --n 5046 --out DIR [--seed 0] [--scale 1.0]

writes DIR/OpenEnded_mscoco_val2014_questions.json, DIR/mscoco_val2014_annotations.json,
DIR/val2014/COCO_val2014_<image_id:012d>.jpg and the marker DIR/SWEEPER_REPLICA.json, so that
`dataset=okvqa` trials on it are tagged `dataset_note` = "performance replica: accuracy is
meaningless". Its *shape* follows the real split: COCO image sizes (mostly 640x480 and 480x640),
photographic-looking JPEGs (smooth multi-scale colour fields, a light gradient, soft-edged shapes
and sensor-like noise, so the encoder works as hard as on photos), questions of 5-40 words,
10 answers each (stemmed `answer` and `raw_answer`), OK-VQA question types, a few images with two
questions. Everything is a function of `--seed`: the same seed gives the same bytes.
`--scale` shrinks the images (tests use small ones).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sweeper.data.okvqa import (
    ANNOTATIONS_FILE,
    ANSWERS_PER_QUESTION,
    IMAGE_DIR,
    QUESTIONS_FILE,
    REPLICA_MARKER,
    REPLICA_NOTE,
    image_file_name,
)

JPEG_QUALITY = 95
# (width, height, share): COCO val2014 is mostly 640x480 landscape and 480x640 portrait.
IMAGE_SIZES = (
    (640, 480, 0.50),
    (480, 640, 0.20),
    (640, 427, 0.10),
    (427, 640, 0.05),
    (500, 375, 0.04),
    (640, 360, 0.04),
    (612, 612, 0.04),
    (640, 640, 0.03),
)
# OK-VQA's knowledge categories (question_type "one".."ten", "other"), roughly in its proportions,
# each with a question opening and "raw_answer:answer" pairs (OK-VQA stems `answer`).
QUESTION_TYPES: dict[str, tuple[float, str, str]] = {
    "one": (0.09, "what kind of vehicle is", "trains:train, buses:bus, boat:boat, racing:race"),
    "two": (0.04, "which brand makes the", "nike:nike, apple:apple, sony:sony, coke:coke"),
    "three": (0.12, "what material is the", "wooden:wood, metal:metal, plastics:plastic"),
    "four": (0.11, "what sport can you use", "surfing:surf, skiing:ski, tennis:tennis, golf:golf"),
    "five": (0.14, "what food is being", "pizzas:pizza, baked:bake, sandwiches:sandwich, egg:egg"),
    "six": (0.05, "in which country is the", "england:england, japanese:japan, italy:italy"),
    "seven": (0.09, "why is the person", "working:work, relaxing:relax, to stay warm:warm"),
    "eight": (0.15, "what animal is", "giraffes:giraffe, horses:horse, dogs:dog"),
    "nine": (0.03, "what technology does the", "electricity:electricity, batteries:battery"),
    "ten": (0.03, "what weather is typical for", "raining:rain, snowy:snow, sunny:sun, windy:wind"),
    "other": (0.15, "what is the", "fishing:fish, flowers:flower, running:run, kites:kite"),
}


def _answer_pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(pair.split(":")) for pair in text.split(", ")]  # type: ignore[misc]


# Words that lengthen a question to its drawn length (OK-VQA's run 5 to 40 words).
_FILLER_TEXT = (
    "this the that picture image shown here in of on near with people thing object used "
    "commonly known for being at left right side background front made usually kind"
)
FILLER = _FILLER_TEXT.split()
MIN_WORDS, MAX_WORDS = 5, 40
COCO_MAX_IMAGE_ID = 581_929
VAL_QUESTIONS, VAL_IMAGES = 5046, 5033  # 13 images of OK-VQA val carry two questions


@dataclass
class Question:
    question_id: int
    image_id: int
    question: str
    question_type: str
    answers: list[tuple[str, str]]  # (raw_answer, answer), ANSWERS_PER_QUESTION of them
    size: tuple[int, int]


def make_questions(n: int, seed: int) -> list[Question]:
    """The n questions of a replica: text, types, answers, image ids and image sizes."""
    rng = np.random.default_rng([seed, 0])
    n_images = max(1, n - n * (VAL_QUESTIONS - VAL_IMAGES) // VAL_QUESTIONS)
    image_ids = rng.choice(np.arange(1, COCO_MAX_IMAGE_ID + 1), size=n_images, replace=False)
    # The first n_images questions get their own image, the rest share an earlier one.
    owners = list(range(n_images)) + sorted(rng.integers(0, n_images, n - n_images).tolist())
    sizes = [(w, h) for w, h, _ in IMAGE_SIZES]
    size_of = rng.choice(len(sizes), size=n_images, p=[s for *_, s in IMAGE_SIZES])
    types = list(QUESTION_TYPES)
    type_p = np.array([QUESTION_TYPES[t][0] for t in types])
    questions_on: dict[int, int] = {}
    questions = []
    for owner in owners:
        image_id = int(image_ids[owner])
        k = questions_on.get(image_id, 0)
        questions_on[image_id] = k + 1
        kind = types[rng.choice(len(types), p=type_p / type_p.sum())]
        _, opening, answers = QUESTION_TYPES[kind]
        pairs = _answer_pairs(answers)
        # Most OK-VQA questions are short (about 8 words); 1% are long, up to 40, so that the
        # longest prompts of the real split are represented too.
        if rng.random() < 0.01:
            length = int(rng.integers(25, MAX_WORDS + 1))
        else:
            length = int(np.clip(round(rng.lognormal(np.log(8.5), 0.45)), MIN_WORDS, MAX_WORDS))
        words = opening.split()
        words += rng.choice(FILLER, size=max(0, length - len(words))).tolist()
        # A majority answer and a few dissenting ones, as annotators give.
        popular = rng.choice(len(pairs), size=2, replace=False)
        picks = rng.choice(popular, size=ANSWERS_PER_QUESTION, p=[0.7, 0.3])
        questions.append(
            Question(
                question_id=image_id * 10 + 5 + k,  # OK-VQA ids: image id, then a digit
                image_id=image_id,
                question=" ".join(words[:length]).capitalize() + "?",
                question_type=kind,
                answers=[pairs[int(i)] for i in picks],
                size=sizes[int(size_of[owner])],
            )
        )
    return questions


def _smooth_field(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Colour variation at several scales, like the large shapes and textures of a photo."""
    out = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((3, 55.0), (12, 30.0), (48, 16.0), (160, 8.0)):
        grid = (max(2, cells * height // 640), max(2, cells * width // 640))
        for channel in range(3):
            coarse = rng.normal(0.0, 1.0, grid).astype(np.float32)
            fine = Image.fromarray(coarse, mode="F").resize((width, height), Image.BICUBIC)
            out[..., channel] += amplitude * np.asarray(fine)
    return out


def _shapes(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A few soft-edged objects (pixels, opacity): the edges a photo has and a field lacks."""
    layer = Image.new("RGB", (width, height))
    mask = Image.new("L", (width, height))
    paint, cut = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            paint.ellipse((x0, y0, x1, y1), fill=colour)
            cut.ellipse((x0, y0, x1, y1), fill=200)
        else:
            paint.rectangle((x0, y0, x1, y1), fill=colour)
            cut.rectangle((x0, y0, x1, y1), fill=200)
    mask = mask.filter(ImageFilter.GaussianBlur(2))
    alpha = np.asarray(mask, np.float32)[..., None] / 255.0
    return np.asarray(layer, np.float32), alpha


def render_image(seed: int, index: int, size: tuple[int, int], scale: float = 1.0) -> Image.Image:
    """Image `index` of the replica with this seed: same arguments, same pixels."""
    rng = np.random.default_rng([seed, 1, index])
    width, height = (max(16, round(side * scale)) for side in size)
    base = rng.uniform(60, 190, 3).astype(np.float32)
    pixels = base + _smooth_field(rng, width, height)
    pixels += np.linspace(25, -25, height, dtype=np.float32)[:, None, None]  # sky-to-ground light
    objects, alpha = _shapes(rng, width, height)
    pixels = pixels * (1 - alpha) + objects * alpha
    # Noise strength varies per image (log-uniform): it is what spreads the JPEG file sizes.
    sigma = float(np.exp(rng.uniform(np.log(6), np.log(110))))
    pixels += rng.normal(0.0, sigma, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _official_files(questions: Sequence[Question]) -> tuple[dict, dict]:
    info = {"description": "sweeper performance replica of OK-VQA val2014", "note": REPLICA_NOTE}
    licence = {"name": "synthetic", "url": ""}
    return (
        {
            "info": info,
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "license": licence,
            "data_subtype": "val2014",
            "questions": [
                {"image_id": q.image_id, "question": q.question, "question_id": q.question_id}
                for q in questions
            ],
        },
        {
            "info": info,
            "license": licence,
            "data_subtype": "val2014",
            "data_type": "mscoco",
            "annotations": [
                {
                    "image_id": q.image_id,
                    "question_type": q.question_type,
                    "answer_type": "other",
                    "question_id": q.question_id,
                    "confidence": 3,
                    "answers": [
                        {
                            "answer_id": i + 1,
                            "raw_answer": raw,
                            "answer_confidence": "yes",
                            "answer": answer,
                        }
                        for i, (raw, answer) in enumerate(q.answers)
                    ],
                }
                for q in questions
            ],
        },
    )


@dataclass
class Summary:
    images: int
    questions: int
    file_sizes: list[int]
    seconds: float

    def describe(self) -> str:
        mb = np.array(self.file_sizes) / 1e6
        p5, p50, p95 = np.percentile(mb, [5, 50, 95])
        return (
            f"{self.questions} questions, {self.images} JPEGs in {self.seconds:.0f} s "
            f"({self.images / self.seconds:.1f} images/s); JPEG MB: min {mb.min():.2f}, "
            f"p5 {p5:.2f}, median {p50:.2f}, mean {mb.mean():.2f}, p95 {p95:.2f}, "
            f"max {mb.max():.2f}; total {mb.sum() / 1e3:.2f} GB"
        )


def _write_image(job: tuple[Path, int, int, tuple[int, int], float]) -> int:
    path, seed, index, size, scale = job
    # 4:4:4 chroma keeps the files near the heavy end of what COCO-sized photos can weigh.
    render_image(seed, index, size, scale).save(path, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return path.stat().st_size


def generate(
    out: Path,
    n: int,
    seed: int = 0,
    scale: float = 1.0,
    progress: bool = True,
    workers: int = 1,
) -> Summary:
    """Write the replica under `out` (official OK-VQA layout plus the replica marker)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    questions = make_questions(n, seed)
    image_dir = out / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    # The marker goes first, so even a half-written replica is never taken for real data.
    marker = {"generator": "sweeper.data.replica", "n": n, "seed": seed, "scale": scale}
    (out / REPLICA_MARKER).write_text(json.dumps({**marker, "note": REPLICA_NOTE}, indent=1))
    first_of_image = {}
    for question in questions:
        first_of_image.setdefault(question.image_id, question)
    jobs = [
        (image_dir / image_file_name(q.image_id), seed, index, q.size, scale)
        for index, q in enumerate(first_of_image.values())
    ]
    # Each image is a function of (seed, index) alone: the same bytes with any number of workers.
    with ProcessPoolExecutor(max(1, workers)) as pool:
        written = pool.map(_write_image, jobs, chunksize=16)
        sizes = list(tqdm(written, "images", total=len(jobs), disable=not progress))
    questions_json, annotations_json = _official_files(questions)
    (out / QUESTIONS_FILE).write_text(json.dumps(questions_json))
    (out / ANNOTATIONS_FILE).write_text(json.dumps(annotations_json))
    return Summary(len(sizes), len(questions), sizes, time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sweeper.data.replica",
        description="Write an offline performance replica of OK-VQA val in the official layout "
        "(trials on it are tagged: accuracy on it is meaningless).",
    )
    parser.add_argument("--n", type=int, default=VAL_QUESTIONS, help="questions (default: 5046)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files (default: 0)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="image size factor (default 1: COCO sizes)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes rendering images (default: one per CPU; the output does not depend on it)",
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.scale <= 0 or args.workers < 1:
        parser.error("--n and --workers must be >= 1 and --scale > 0")
    summary = generate(args.out, args.n, args.seed, args.scale, workers=args.workers)
    print(summary.describe())
    print(
        f"use: python -m sweeper dataset=okvqa dataset.questions_file={args.out / QUESTIONS_FILE} "
        f"dataset.annotations_file={args.out / ANNOTATIONS_FILE} "
        f"dataset.image_dir={args.out / IMAGE_DIR}"
    )


if __name__ == "__main__":
    main()
