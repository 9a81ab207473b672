"""sweeper installs, imports and runs a trial with the lowest version of each dependency that its
ranges in pyproject.toml allow.

A fresh venv (uv, from PyPI) gets every direct dependency at its lower bound, resolved with the
newest versions of what those need, except torch and torchvision: those, and the CUDA libraries
beside them, are this environment's own (a .pth file puts its site-packages after the venv's
own), because the machine caps torch at the build in its local wheel cache and a second copy
would take about 5 GB. So torch and torchvision run at the constrained versions here, not at
their lower bounds (2.11 / 0.26: the pair vLLM 0.26 runs on the lent GPU hosts).

Needs PyPI (uv resolves and downloads there); about a minute with uv's cache warm.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO, cli_env

pytestmark = pytest.mark.slow

# This environment's binary stack, reused rather than installed again.
SHARED = ("torch", "torchvision", "triton")
SHARED_PREFIXES = ("nvidia-", "cuda-")

CHECK = """
import importlib.metadata as metadata, json, sys
import sweeper, sweeper.cli, torch
from hydra import compose, initialize_config_module
with initialize_config_module("sweeper.conf", version_base=None):
    cfg = compose("config")
names = json.loads(sys.argv[1])
print(json.dumps({
    "versions": {name: metadata.version(name) for name in names},
    "sweeper": sweeper.__file__,
    "torch": torch.__file__,
    "config": [cfg.model.name, cfg.dataset.name, cfg.engine.name],
}))
"""


def _uv(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "uv", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"uv {' '.join(args)}:\n{result.stderr[-4000:]}"
    return result


def _is_shared(name: str) -> bool:
    name = name.lower()
    return name in SHARED or (name.startswith(SHARED_PREFIXES) and name != "nvidia-ml-py")


def lowest_requirements() -> dict[str, str]:
    """name -> `name==version`: each dependency at its lower bound; torch and torchvision at the
    versions installed here."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in project["dependencies"]:
        req = Requirement(line)
        if req.name in ("torch", "torchvision"):
            pins[req.name] = f"{req.name}=={metadata.version(req.name)}"
            continue
        lows = [spec.version for spec in req.specifier if spec.operator in (">=", "==", "~=")]
        assert lows, f"{req.name} has no lower bound in pyproject.toml"
        pins[req.name] = f"{req.name}=={lows[0]}"
    return pins


def test_sweeper_runs_with_the_lowest_versions_its_ranges_allow(tmp_path: Path) -> None:
    pins = lowest_requirements()
    (tmp_path / "lowest.in").write_text("\n".join(pins.values()) + "\n")
    # Resolved for this interpreter and platform, from PyPI (uv reads no pip configuration).
    _uv(
        "pip",
        "compile",
        str(tmp_path / "lowest.in"),
        "--python",
        sys.executable,
        "--no-header",
        "--no-annotate",
        "--quiet",
        "--output-file",
        str(tmp_path / "lowest.txt"),
    )
    locked = [
        line
        for line in (tmp_path / "lowest.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    (tmp_path / "install.txt").write_text(
        "\n".join(line for line in locked if not _is_shared(Requirement(line).name)) + "\n"
    )

    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    _uv("venv", "--quiet", "--python", sys.executable, str(venv))
    _uv("pip", "install", "--quiet", "--python", str(python), "--no-deps", "-r",
        str(tmp_path / "install.txt"))  # fmt: skip
    # sweeper itself: its wheel, built here without fetching a build backend.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path / "wheel"), str(REPO)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("sweeper-*.whl")
    _uv("pip", "install", "--quiet", "--python", str(python), "--no-deps", str(wheel))
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    shared_site = Path(torch.__file__).parents[1]
    (site / "zz_shared_torch.pth").write_text(f"{shared_site}\n")

    env = {**cli_env(), "PYTHONPATH": ""}
    env.pop("VIRTUAL_ENV", None)
    check = subprocess.run(
        [str(python), "-c", CHECK, json.dumps(sorted(pins))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr[-4000:]
    report = json.loads(check.stdout.strip().splitlines()[-1])
    versions = {name: Version(version) for name, version in report["versions"].items()}
    assert versions == {name: Version(pin.split("==")[1]) for name, pin in pins.items()}
    assert report["sweeper"].startswith(str(site))  # the wheel's copy, not the source tree
    assert report["torch"].startswith(str(shared_site))
    assert report["config"] == ["tiny_vlm", "easy_vqa", "hf"]

    # The default trial, on a few questions: HF engine, Hydra, MLflow's SQLite store.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trial = subprocess.run(
        [str(python), "-m", "sweeper", "dataset.limit=4", "batch_size=2",
         f"tracking.uri={uri}", f"tracking.artifact_location={tmp_path / 'artifacts'}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert trial.returncode == 0, trial.stderr[-4000:]
    assert "accuracy" in trial.stdout
    # What ran, for the log (pytest -rA or a failure shows it).
    print(os.linesep.join(f"{name} {version}" for name, version in report["versions"].items()))
