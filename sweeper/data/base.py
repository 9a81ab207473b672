"""The sample every dataset yields and the engines consume."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class VQASample:
    """One question about one image. The image is loaded only when `load_image` is called."""

    question_id: str
    question: str
    answers: list[str]
    image_loader: Callable[[], Image.Image] = field(repr=False)
    metadata: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        return self.image_loader().convert("RGB")


@dataclass
class LoadedSample:
    """A sample whose image has been decoded; `decode_s` is the time that took."""

    sample: VQASample
    image: Image.Image
    decode_s: float


class DataError(ValueError):
    """Bad or missing data; the message names the file and the sample."""


def select(samples: Iterable[VQASample], limit: int | None, seed: int | None) -> list[VQASample]:
    """The first `limit` samples, after a seeded shuffle when `seed` is set."""
    import random

    chosen = list(samples)
    if seed is not None:
        random.Random(seed).shuffle(chosen)
    if limit is not None:
        chosen = chosen[:limit]
    if not chosen:
        raise DataError("the dataset is empty after dataset.limit and filters")
    return chosen


def image_file_loader(path: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        with Image.open(path) as image:
            image.load()
            return image

    return load


def chunks(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter), pulled lazily."""
    from itertools import islice

    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch
