"""OK-VQA loaders: both layouts load exactly and alike, every kind of bad data is caught."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sweeper.config import ConfigError, register_configs
from sweeper.data import DataError, LoadReport, prefetch
from sweeper.data.okvqa import REPLICA_NOTE
from sweeper.data.replica import MAX_WORDS, MIN_WORDS, generate, main, make_questions
from sweeper.tasks.config import OKVQAConfig, OKVQAHFConfig
from tests.conftest import task_samples
from tests.okvqa_fixtures import (
    Official,
    hf_config,
    hf_rows,
    write_hf_parquet,
    write_hf_saved,
    write_official,
)

POLICIES = ("raise", "skip")


@pytest.fixture
def official(tmp_path: Path) -> Official:
    return write_official(tmp_path / "official", n=20)


def _key(sample) -> tuple:
    meta = sample.metadata
    return sample.question_id, sample.question, sample.answers, meta["question_type"]


def _pixels(sample) -> np.ndarray:
    return np.asarray(sample.load_image())


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_official_files_give_every_question_with_its_stemmed_answers(official) -> None:
    samples, report = task_samples(official.config())
    assert len(samples) == 20 and report.skipped == [] and report.tags == {}
    questions = official.questions()
    annotations = json.loads(official.annotations_file.read_text())["annotations"]
    for sample, question, annotation in zip(samples, questions, annotations, strict=True):
        assert sample.question_id == str(question["question_id"])
        assert sample.question == question["question"]
        assert sample.answers == [a["answer"] for a in annotation["answers"]]
        assert sample.metadata["raw_answers"] == [a["raw_answer"] for a in annotation["answers"]]
        assert sample.metadata["image_id"] == question["image_id"]
    assert _pixels(samples[0]).shape[2] == 3


@pytest.mark.parametrize("layout", ["parquet folder", "parquet list", "parquet file", "saved"])
def test_hugging_face_layout_gives_identical_samples(official, tmp_path, layout) -> None:
    columns = hf_rows(official)
    if layout == "saved":
        path = write_hf_saved(columns, tmp_path / "saved")
    else:
        files = write_hf_parquet(columns, tmp_path / "hf" / "data", 1 if "file" in layout else 2)
        path = {"parquet folder": tmp_path / "hf", "parquet list": files}.get(layout, files[0])
    expected, _ = task_samples(official.config())
    got, report = task_samples(hf_config(path, tmp_path))
    assert [_key(s) for s in got] == [_key(s) for s in expected]
    assert [s.metadata["answer_type"] for s in got] == ["other"] * 20
    for ours, theirs in zip(got, expected, strict=True):
        assert np.array_equal(_pixels(ours), _pixels(theirs))
    assert report.skipped == []


def test_images_stored_as_paths_and_parquet_without_hf_metadata(official, tmp_path) -> None:
    columns = hf_rows(official)
    columns["image"] = [
        {"bytes": None, "path": str(official.image_dir / cell["path"])} for cell in columns["image"]
    ]
    pq.write_table(pa.table(columns), tmp_path / "plain.parquet")
    expected, _ = task_samples(official.config())
    got, _ = task_samples(hf_config(tmp_path / "plain.parquet", tmp_path))
    assert [_key(s) for s in got] == [_key(s) for s in expected]
    assert np.array_equal(_pixels(got[3]), _pixels(expected[3]))


@pytest.mark.parametrize("on_error", POLICIES)
def test_missing_image_file(official, on_error) -> None:
    path = official.image_path(3)
    path.unlink()
    question_id = str(official.questions()[3]["question_id"])
    if on_error == "raise":
        with pytest.raises(DataError) as error:
            task_samples(official.config())
        assert str(path) in _one_line(error) and f"sample {question_id}" in str(error.value)
        return
    samples, report = task_samples(official.config(on_error="skip"))
    assert len(samples) == 19 and question_id not in {s.question_id for s in samples}
    (skip,) = report.skipped
    assert (skip.question_id, skip.where) == (question_id, str(path))
    assert "unreadable image" in skip.reason


@pytest.mark.parametrize("on_error", POLICIES)
def test_corrupt_jpeg_header_is_caught_at_load(official, on_error) -> None:
    official.image_path(0).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    question_id = str(official.questions()[0]["question_id"])
    if on_error == "raise":
        with pytest.raises(DataError, match=f"sample {question_id}: unreadable image"):
            task_samples(official.config())
        return
    samples, report = task_samples(official.config(on_error="skip"))
    assert len(samples) == 19 and [s.question_id for s in report.skipped] == [question_id]


@pytest.mark.parametrize("on_error", POLICIES)
def test_truncated_jpeg_is_caught_at_decode(official, on_error) -> None:
    path = official.image_path(2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # header intact, entropy-coded data cut short
    samples, report = task_samples(official.config(on_error=on_error))
    assert len(samples) == 20  # the header check at load cannot see this damage
    question_id = str(official.questions()[2]["question_id"])
    if on_error == "raise":
        with pytest.raises(DataError) as error:
            list(prefetch(samples, depth=4, report=report))
        assert f"{path}: sample {question_id}: cannot decode image" in _one_line(error)
        return
    decoded = [item.sample.question_id for item in prefetch(samples, depth=4, report=report)]
    decoded_again = list(prefetch(samples, depth=4, report=report))
    assert len(decoded) == len(decoded_again) == 19 and question_id not in decoded
    (skip,) = report.skipped  # counted once although met twice
    assert skip.question_id == question_id


@pytest.mark.parametrize("on_error", POLICIES)
def test_question_without_annotation(official, on_error) -> None:
    question_id = official.questions()[5]["question_id"]
    official.edit(
        official.annotations_file,
        lambda c: c.update(
            annotations=[a for a in c["annotations"] if a["question_id"] != question_id]
        ),
    )
    if on_error == "raise":
        with pytest.raises(DataError) as error:
            task_samples(official.config())
        message = _one_line(error)
        assert f"sample {question_id}: no annotation" in message
        assert str(official.questions_file) in message and str(official.annotations_file) in message
        return
    samples, report = task_samples(official.config(on_error="skip"))
    assert len(samples) == 19 and [s.question_id for s in report.skipped] == [str(question_id)]


@pytest.mark.parametrize("on_error", POLICIES)
def test_annotation_without_question(official, on_error) -> None:
    official.edit(official.questions_file, lambda c: c["questions"].pop(7))
    if on_error == "raise":
        with pytest.raises(DataError, match="no question in"):
            task_samples(official.config())
        return
    samples, report = task_samples(official.config(on_error="skip"))
    assert len(samples) == 19 and len(report.skipped) == 1


@pytest.mark.parametrize("on_error", POLICIES)
def test_image_ids_must_agree(official, on_error) -> None:
    official.edit(official.annotations_file, lambda c: c["annotations"][6].update(image_id=1))
    question_id = str(official.questions()[6]["question_id"])
    if on_error == "raise":
        with pytest.raises(DataError, match=f"sample {question_id}: image_id .* but 1 in"):
            task_samples(official.config())
        return
    samples, report = task_samples(official.config(on_error="skip"))
    assert len(samples) == 19 and [s.question_id for s in report.skipped] == [question_id]


@pytest.mark.parametrize("on_error", POLICIES)
def test_annotation_with_other_than_ten_answers(official, on_error) -> None:
    official.edit(official.annotations_file, lambda c: c["annotations"][4]["answers"].pop())
    question_id = str(official.questions()[4]["question_id"])
    if on_error == "raise":
        with pytest.raises(DataError) as error:
            task_samples(official.config())
        expected = f"{official.annotations_file}: sample {question_id}: 9 answers, expected 10"
        assert expected in _one_line(error)
        return
    samples, report = task_samples(official.config(on_error="skip"))
    assert len(samples) == 19 and [s.question_id for s in report.skipped] == [question_id]


@pytest.mark.parametrize("on_error", POLICIES)
def test_hf_row_with_other_than_ten_answers_names_its_file_and_row(
    official, tmp_path, on_error
) -> None:
    columns = hf_rows(official)
    columns["answers"][15].append("extra")
    files = write_hf_parquet(columns, tmp_path / "hf", shards=2)
    cfg = hf_config(tmp_path / "hf", tmp_path, on_error=on_error)
    if on_error == "raise":
        with pytest.raises(DataError) as error:
            task_samples(cfg)
        # Row 15 of 20 is row 5 of the second of two shards.
        assert f"{files[1]} row 5: sample {columns['question_id'][15]}: 11 answers" in str(
            error.value
        )
        return
    samples, report = task_samples(cfg)
    assert len(samples) == 19 and [s.question_id for s in report.skipped] == [
        columns["question_id"][15]
    ]


@pytest.mark.parametrize("layout", ["official", "hf"])
@pytest.mark.parametrize("on_error", POLICIES)
def test_duplicate_question_id(official, tmp_path, layout, on_error) -> None:
    if layout == "official":
        official.edit(official.questions_file, lambda c: c["questions"].append(c["questions"][0]))
        cfg = official.config(on_error=on_error)
    else:
        columns = hf_rows(official)
        for values in columns.values():
            values.append(values[0])
        write_hf_parquet(columns, tmp_path / "hf", shards=1)
        cfg = hf_config(tmp_path / "hf", tmp_path, on_error=on_error)
    question_id = str(official.questions()[0]["question_id"])
    if on_error == "raise":
        with pytest.raises(DataError, match=f"sample {question_id}: duplicate question_id"):
            task_samples(cfg)
        return
    samples, report = task_samples(cfg)
    # The first occurrence is used; the second is left out and counted.
    assert len(samples) == 20 and samples[0].question_id == question_id
    assert [s.question_id for s in report.skipped] == [question_id]


@pytest.mark.parametrize("on_error", POLICIES)
def test_empty_dataset_after_filters(official, on_error) -> None:
    with pytest.raises(DataError) as error:
        task_samples(official.config(question_types=["no-such-type"], on_error=on_error))
    assert "no samples left" in _one_line(error) and "types present: " in str(error.value)


def test_every_sample_skipped_is_an_error(official) -> None:
    for path in official.image_dir.iterdir():
        path.unlink()
    with pytest.raises(DataError, match="every selected sample was skipped"):
        task_samples(official.config(on_error="skip"))


@pytest.mark.parametrize("on_error", POLICIES)
def test_parquet_without_the_expected_columns(official, tmp_path, on_error) -> None:
    columns = hf_rows(official)
    del columns["answers"]
    path = tmp_path / "broken.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(DataError) as error:
        task_samples(hf_config(path, tmp_path, on_error=on_error))
    assert f"{path}: not the OK-VQA Hugging Face layout: missing column(s) answers" in _one_line(
        error
    )


def test_question_types_filter(official) -> None:
    annotations = json.loads(official.annotations_file.read_text())["annotations"]
    wanted = {annotations[0]["question_type"], annotations[1]["question_type"]}
    samples, _ = task_samples(official.config(question_types=sorted(wanted)))
    assert {s.metadata["question_type"] for s in samples} == wanted
    assert len(samples) == sum(a["question_type"] in wanted for a in annotations)


def test_limit_and_seed_pick_the_same_samples_and_check_only_their_images(official) -> None:
    first, _ = task_samples(official.config(limit=5, seed=1))
    again, _ = task_samples(official.config(limit=5, seed=1))
    assert [s.question_id for s in first] == [s.question_id for s in again]
    assert [s.question_id for s in first] != [
        s.question_id for s in task_samples(official.config(limit=5))[0]
    ]
    chosen = {s.question_id for s in first}
    for index, question in enumerate(official.questions()):
        if str(question["question_id"]) not in chosen:
            official.image_path(index).unlink()
    assert len(task_samples(official.config(limit=5, seed=1))[0]) == 5


def test_replica_is_deterministic_and_tagged(tmp_path) -> None:
    for name, workers in (("a", 1), ("b", 2)):  # the bytes do not depend on the workers
        generate(tmp_path / name, 4, seed=7, scale=0.05, progress=False, workers=workers)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(files) == 3 + 4
    for file in files:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    _, report = task_samples(Official(tmp_path / "a").config())
    assert report.tags == {"dataset_note": REPLICA_NOTE}


def test_replica_has_the_shape_of_okvqa_val() -> None:
    questions = make_questions(5046, seed=0)
    words = [len(q.question.split()) for q in questions]
    assert (min(words), max(words)) == (MIN_WORDS, MAX_WORDS) and np.median(words) < 12
    assert len({q.question_id for q in questions}) == 5046
    assert len({q.image_id for q in questions}) == 5033
    assert all(len(q.answers) == 10 for q in questions)
    sizes = [q.size for q in questions]
    assert sizes.count((640, 480)) > 2000 and sizes.count((480, 640)) > 700


def test_replica_cli_help(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "--n" in capsys.readouterr().out


def test_config_checks_are_one_line_and_before_any_model(tmp_path) -> None:
    with pytest.raises(ConfigError, match="invalid value for 'dataset.questions_file': None"):
        OKVQAConfig()
    official = write_official(tmp_path / "o", n=2)
    with pytest.raises(ConfigError, match="dataset.question_types"):
        official.config(question_types=[])
    with pytest.raises(ConfigError, match="dataset.path"):
        OKVQAHFConfig(path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="dataset.path"):
        OKVQAHFConfig(path=[])
    assert OKVQAHFConfig().path == "lmms-lab/OK-VQA"  # a hub id is left to load time


def test_hydra_composes_both_okvqa_configs(official, tmp_path) -> None:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    register_configs()
    files = write_hf_parquet(hf_rows(official), tmp_path / "hf", shards=2)
    with initialize_config_module("sweeper.conf", version_base=None):
        cfg = compose(
            "config", overrides=[*official.cli_args()[0:4], "dataset.question_types=[one]"]
        )
        hf = compose(
            "config",
            overrides=["dataset=okvqa_hf", f"dataset.path=[{files[0]},{files[1]}]"],
        )
    trial, hf_trial = OmegaConf.to_object(cfg), OmegaConf.to_object(hf)
    assert isinstance(trial.dataset, OKVQAConfig) and trial.dataset.question_types == ["one"]
    assert trial.dataset.on_error == "raise" and trial.dataset.limit is None
    assert isinstance(hf_trial.dataset, OKVQAHFConfig)
    assert hf_trial.dataset.path == [str(f) for f in files]


def test_prefetch_without_report_raises(official) -> None:
    official.image_path(0).write_bytes(official.image_path(0).read_bytes()[:700])
    samples, _ = task_samples(official.config(limit=2))
    with pytest.raises(DataError, match="cannot decode image"):
        list(prefetch(samples, depth=2))
    assert LoadReport().on_error == "raise"


def test_a_bad_question_with_an_annotation_is_one_skipped_sample(official) -> None:
    """A question without an image_id is one bad sample: its annotation is not a second one
    ("no question"), which skipped_samples counted too."""
    question_id = str(official.questions()[3]["question_id"])
    official.edit(official.questions_file, lambda c: c["questions"][3].pop("image_id"))
    samples, report = task_samples(official.config(on_error="skip"))
    assert len(samples) == 19
    assert [(s.question_id, s.reason) for s in report.skipped] == [
        (question_id, "no integer image_id")
    ]


def test_files_without_questions_say_so(official) -> None:
    for path, key in (
        (official.questions_file, "questions"),
        (official.annotations_file, "annotations"),
    ):
        official.edit(path, lambda c, key=key: c.update({key: []}))
    with pytest.raises(DataError) as error:
        task_samples(official.config())
    # Not "no samples left ... dataset.question_types=None": no filter was involved.
    assert _one_line(error) == f"{official.questions_file}: no samples (its files hold no question)"


def test_every_question_skipped_names_the_first_reason(official) -> None:
    official.edit(official.questions_file, lambda c: c.update(questions=[]))
    with pytest.raises(DataError) as error:
        task_samples(official.config(on_error="skip"))
    message = _one_line(error)
    assert message.startswith(f"{official.questions_file}: no samples left: all 20 were skipped")
    assert f"no question in {official.questions_file}" in message


def test_an_empty_prompt_file_says_so(tmp_path) -> None:
    from sweeper.tasks.config import TextJSONLConfig

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n")
    with pytest.raises(DataError) as error:
        task_samples(TextJSONLConfig(path=str(prompts)))
    assert _one_line(error) == "dataset 'text_jsonl': no samples (its files hold no question)"
