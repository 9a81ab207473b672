"""easy-VQA, shipped inside the `easy-vqa` package: 64x64 PNG shapes, one answer per question."""

from __future__ import annotations

from sweeper.data.base import VQASample, image_file_loader


def load_easy_vqa(split: str) -> list[VQASample]:
    import easy_vqa

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        image_paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        image_paths = easy_vqa.get_test_image_paths()
    return [
        VQASample(
            question_id=f"{split}-{index}",
            question=question,
            answers=[answer],
            image_loader=image_file_loader(image_paths[image_id]),
            metadata={"image_id": image_id},
        )
        for index, (question, answer, image_id) in enumerate(
            zip(questions, answers, image_ids, strict=True)
        )
    ]
