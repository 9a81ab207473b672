"""easy-VQA, shipped inside the `easy-vqa` package: 64x64 PNG shapes, one answer per question."""

from __future__ import annotations

from typing import Any

from sweeper.data.base import LoadReport, Sample, image_file_loader


def load_easy_vqa(cfg: Any, report: LoadReport, images: bool = True) -> list[Sample]:
    """Every question of `cfg.split`; `images=False`: the questions alone (a text prompt set)."""
    import easy_vqa

    if cfg.split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        image_paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        image_paths = easy_vqa.get_test_image_paths()
    return [
        Sample(
            question_id=f"{cfg.split}-{index}",
            question=question,
            answers=[answer],
            image_loader=image_file_loader(image_paths[image_id]) if images else None,
            metadata={"image_id": image_id},
        )
        for index, (question, answer, image_id) in enumerate(
            zip(questions, answers, image_ids, strict=True)
        )
    ]


def load_easy_vqa_text(cfg: Any, report: LoadReport) -> list[Sample]:
    return load_easy_vqa(cfg, report, images=False)
