"""The reference implementations sweeper's metrics are checked against, run from their own
released sources: wheels fetched from PyPI at a pinned version (nothing of theirs is copied into
this repository), the few pure-Python files needed loaded as modules.

- lmms-eval 0.7.3 (MIT): `EvalAIAnswerProcessor` (tasks/_task_utils/vqa_eval_metric.py) and
  `ok_vqa_process_results` (tasks/ok_vqa/utils.py), what lmms-eval scores OK-VQA with.
- salesforce-lavis 1.0.2 (BSD-3-Clause): lavis/common/vqa_tools/vqa_eval.py, the GT-Vision-Lab
  VQA evaluator (VQA/vqa/vqaEval.py, its Python 3 version) as LAVIS ships it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import pytest

CACHE = Path("~/.cache/sweeper/references").expanduser()
LMMS_EVAL = "lmms-eval==0.7.3"
LAVIS = "salesforce-lavis==1.0.2"


def _wheel(requirement: str) -> Path:
    """The requirement's wheel, downloaded once (no dependencies: only its own files are used)."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(CACHE.glob(pattern))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE),
             requirement],
            capture_output=True,
            text=True,
        )  # fmt: skip
        found = sorted(CACHE.glob(pattern))
        if fetched.returncode != 0 or not found:
            pytest.skip(f"cannot download {requirement} from PyPI: {fetched.stderr[-300:]}")
    return found[0]


def _load(wheel: Path, member: str, module: str) -> types.ModuleType:
    """`member` of the wheel, imported as `module` (its package entries stubbed, not run)."""
    source = zipfile.ZipFile(wheel).read(member)
    folder = CACHE / wheel.stem
    path = folder / member
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(source)
    parts = module.split(".")
    for depth in range(1, len(parts)):  # the package modules, empty: their __init__ is not run
        sys.modules.setdefault(".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
    spec = importlib.util.spec_from_file_location(module, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)
    return loaded


def lmms_eval_okvqa() -> Any:
    """lmms-eval's `ok_vqa_process_results(doc, [prediction])`."""
    wheel = _wheel(LMMS_EVAL)
    utils = "lmms_eval/tasks/_task_utils"
    _load(wheel, f"{utils}/vqa_eval_metric.py", "lmms_eval.tasks._task_utils.vqa_eval_metric")
    _load(wheel, f"{utils}/file_utils.py", "lmms_eval.tasks._task_utils.file_utils")
    return _load(wheel, "lmms_eval/tasks/ok_vqa/utils.py", "lmms_eval.tasks.ok_vqa.utils")


class _QA:
    """What VQAEval reads of its `vqa` and `vqaRes` arguments."""

    def __init__(self, qa: dict[int, dict[str, Any]]):
        self.qa = qa

    def getQuesIds(self) -> list[int]:  # noqa: N802 (the evaluator's name)
        return list(self.qa)


def official_vqa_scores(cases: list[tuple[str, list[str]]]) -> list[float]:
    """The GT-Vision-Lab evaluator's accuracy of each (prediction, human answers) case."""
    module = _load(_wheel(LAVIS), "lavis/common/vqa_tools/vqa_eval.py", "lavis_vqa_eval")
    gts, res = {}, {}
    for question_id, (prediction, answers) in enumerate(cases):
        gts[question_id] = {
            "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
            "question_type": "other",
            "answer_type": "other",
        }
        res[question_id] = {"answer": prediction}
    evaluator = module.VQAEval(_QA(gts), _QA(res), n=12)  # rounding: 12 digits of percent
    evaluator.evaluate()
    return [evaluator.evalQA[question_id] / 100 for question_id in range(len(cases))]
