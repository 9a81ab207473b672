"""The wheel ships every module and the Hydra configs, and Hydra finds them from the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO

COMPOSE = """
import sweeper, sweeper.cli
from hydra import compose, initialize_config_module
with initialize_config_module("sweeper.conf", version_base=None):
    cfg = compose("config")
print(sweeper.__file__, cfg.model.name, cfg.dataset.name, cfg.engine.name)
"""


def test_wheel_holds_configs_and_packages(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("sweeper-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in REPO.glob("conf/**/*.yaml"):
        assert f"sweeper/conf/{config.relative_to(REPO / 'conf')}" in names
    for module in REPO.glob("sweeper/**/*.py"):
        assert str(module.relative_to(REPO)) in names

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        [sys.executable, "-c", COMPOSE],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0].startswith(str(target))  # the wheel's copy, not the source tree
    assert out[1:] == ["tiny_vlm", "easy_vqa", "hf"]
