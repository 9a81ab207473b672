"""The sample every dataset yields, and what loading it may find wrong. A task turns samples
into requests (sweeper/tasks/)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

# What PIL raises for a missing, unreadable or broken image file: OSError (missing file,
# unidentified format, "image file is truncated"), SyntaxError and ValueError (malformed headers in
# some plugins), EOFError (data ends early), DecompressionBombError (absurd dimensions).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass
class Sample:
    """One question (about one image, or text alone) and its reference answers. The image is
    loaded only when `load_image` is called."""

    question_id: str
    question: str
    answers: list[str]
    image_loader: Callable[[], Image.Image] | None = field(default=None, repr=False)
    metadata: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image | None:
        return None if self.image_loader is None else self.image_loader().convert("RGB")


@dataclass
class LoadedSample:
    """A sample whose image (if any) has been decoded; `decode_s` is the time that took."""

    sample: Sample
    image: Image.Image | None
    decode_s: float


class DataError(ValueError):
    """Bad or missing data; the message names the file and the sample."""


@dataclass(frozen=True)
class Skip:
    """A sample left out under `dataset.on_error=skip`: which, where it lives, and why."""

    question_id: str
    where: str
    reason: str


@dataclass
class LoadReport:
    """What loading found besides the samples: the ones skipped, and tags for the trial's run.

    Every bad sample goes through `reject`, so nothing is dropped without being counted.
    """

    on_error: str = "raise"
    skipped: list[Skip] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def reject(self, question_id: str, where: str, reason: str) -> None:
        """Raise a one-line DataError (policy raise) or record the sample as skipped."""
        if self.on_error != "skip":
            raise DataError(
                f"{where}: sample {question_id}: {reason} (dataset.on_error=skip skips and counts)"
            )
        skip = Skip(question_id, where, reason)
        # The same broken image is met again by warm-up, calibration and the measured run.
        if skip not in self.skipped:
            self.skipped.append(skip)

    def nothing_left(self, source: str) -> DataError:
        """The error for a source that gave no sample: its files hold none, or every one was
        bad and skipped (the first named)."""
        if not self.skipped:
            return DataError(f"{source}: no samples (its files hold no question)")
        first = self.skipped[0]
        return DataError(
            f"{source}: no samples left: all {len(self.skipped)} were skipped as bad (the "
            f"first: {first.where}: sample {first.question_id}: {first.reason})"
        )


class LazyImage(ABC):
    """An image loader that opens its source only when called; `str()` names the source."""

    @abstractmethod
    def open(self) -> Image.Image:
        """The image with its header parsed and its pixels not decoded yet (PIL opens lazily)."""

    def __call__(self) -> Image.Image:
        with self.open() as image:
            image.load()
            return image

    def probe(self) -> None:
        """The cheap check made at load time: the source exists and its header parses."""
        with self.open():
            pass


@dataclass(frozen=True)
class FileImage(LazyImage):
    path: str

    def open(self) -> Image.Image:
        return Image.open(self.path)

    def __str__(self) -> str:
        return self.path


def image_source(sample: Sample) -> str:
    loader = sample.image_loader
    if loader is None:
        return "text"
    return str(loader) if isinstance(loader, LazyImage) else "image"


def reject_image(sample: Sample, problem: str, error: BaseException, report: LoadReport) -> None:
    """Hand a sample whose image failed to `report` (which raises under policy raise)."""
    detail = f"{type(error).__name__}: {error}".replace("\n", " ")
    report.reject(sample.question_id, image_source(sample), f"{problem} ({detail})")


def probe_images(samples: Iterable[Sample], report: LoadReport) -> list[Sample]:
    """The samples whose image source exists and has a readable header; the rest go to `report`.

    Only headers are read (a few KB each, no pixels decoded), so this is cheap enough to run on
    every selected sample before a model loads; damage past the header (a truncated JPEG) is
    found when the image is decoded, by `prefetch`.
    """
    kept = []
    for sample in samples:
        if isinstance(sample.image_loader, LazyImage):
            try:
                sample.image_loader.probe()
            except IMAGE_ERRORS as error:
                reject_image(sample, "unreadable image", error, report)
                continue
        kept.append(sample)
    return kept


def select(samples: Iterable[Sample], limit: int | None, seed: int | None) -> list[Sample]:
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
    return FileImage(path)
