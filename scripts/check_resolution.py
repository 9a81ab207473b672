"""Resolve sweeper's installs for a Linux x86_64 GPU host, from PyPI, without installing anything.

    python scripts/check_resolution.py          # the Python running it needs pip and uv

`pip install sweeper vllm` as a user types it: pip's own dry run (`--dry-run --report`) with this
machine's pip configuration switched off (its local wheel cache and its torch cap), on this
interpreter and platform (Linux x86_64, where PyPI's torch is the CUDA build). pip reads the
wheels' metadata through HTTP range requests (fast-deps), so no wheel is downloaded whole.

Then each install line of the README and each extra, with `uv pip compile` for manylinux_2_35
x86_64 (Ubuntu 22.04 and later) on Python 3.11 and 3.12: metadata alone, in seconds. uv reads no
pip configuration either. (uv is not used for `sweeper vllm` without the extra: its resolver
settles sweeper's torch first and walks vllm back to 0.1.2, an sdist; pip settles vllm first. With
uv, install `sweeper[vllm]`.)

Fails (exit 1) if a case does not resolve, or if sweeper holds vLLM or SGLang below the release
that resolves on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLATFORM = "x86_64-manylinux_2_35"
PYTHONS = ("3.11", "3.12")
SWEEPER = f"sweeper @ {REPO.as_uri()}"
# name -> requirements, for uv.
CASES = {
    "sweeper": [SWEEPER],
    "sweeper[vllm]": [SWEEPER.replace("sweeper", "sweeper[vllm]", 1)],
    "sweeper[sglang]": [SWEEPER.replace("sweeper", "sweeper[sglang]", 1)],
    "sweeper[cluster]": [SWEEPER.replace("sweeper", "sweeper[cluster]", 1)],
    "sweeper[ray]": [SWEEPER.replace("sweeper", "sweeper[ray]", 1)],
    # The releases that resolve without sweeper: sweeper must not hold them back.
    "vllm alone": ["vllm"],
    "sglang alone": ["sglang"],
}
# Not one environment (they pin different torch builds): reported, not required.
CONFLICT = {"sweeper[vllm,sglang]": [SWEEPER.replace("sweeper", "sweeper[vllm,sglang]", 1)]}
SHOWN = (
    "vllm",
    "sglang",
    "torch",
    "torchvision",
    "transformers",
    "hydra-core",
    "mlflow",
    "optuna",
    "ray",
)


def compile_(requirements: list[str], python: str, workdir: Path) -> tuple[dict[str, str], str]:
    """name -> version, or ({}, the resolver's message)."""
    workdir.mkdir(parents=True)
    source = workdir / "requirements.in"
    source.write_text("\n".join(requirements) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "uv", "pip", "compile", str(source), "--python-platform",
         PLATFORM, "--python-version", python, "--no-header", "--no-annotate", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    if result.returncode != 0:
        return {}, result.stderr.strip()
    pins = {}
    for line in result.stdout.splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pins[name.split("[")[0].lower()] = version.split(";")[0].strip()
    return pins, ""


def pip_dry_run(requirements: list[str], workdir: Path) -> tuple[dict[str, str], str]:
    """name -> version from pip's dry run on this interpreter, or ({}, pip's message)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    # No configuration file at all (the machine's /etc/xdg/pip caps torch and adds local indexes).
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    workdir.mkdir(parents=True)
    report = workdir / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--use-feature=fast-deps", "--report", str(report), *requirements],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )  # fmt: skip
    if result.returncode != 0:
        return {}, (result.stderr or result.stdout).strip()[-4000:]
    installs = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in installs}, ""


def show(pins: dict[str, str]) -> str:
    return " ".join(f"{name} {pins[name]}" for name in SHOWN if name in pins)


def timed(function, *args):
    started = time.monotonic()
    pins, error = function(*args)
    return pins, error, time.monotonic() - started


def main() -> int:
    here = ".".join(map(str, sys.version_info[:2]))
    failures = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(8) as pool:
        workdir = Path(tmp)
        # Every case at once: each waits on the network, not on the 2 cores.
        pip_case = pool.submit(timed, pip_dry_run, [SWEEPER, "vllm"], workdir / "pip")
        cases = {
            (python, name): pool.submit(
                timed, compile_, requirements, python, workdir / f"{python}-{i}"
            )
            for python in PYTHONS
            for i, (name, requirements) in enumerate((CASES | CONFLICT).items())
        }
        print(f"== pip install sweeper vllm: pip's dry run, Linux x86_64, Python {here}")
        pip_pins, error, took = pip_case.result()
        if error:
            failures.append(f"pip install sweeper vllm does not resolve:\n{error}")
            print(f"  {'sweeper vllm':18} DOES NOT RESOLVE ({took:.0f} s)", flush=True)
        else:
            print(f"  {'sweeper vllm':18} {show(pip_pins)} ({took:.0f} s)", flush=True)
        for python in PYTHONS:
            print(f"== Linux x86_64 (manylinux_2_35) GPU host, Python {python}", flush=True)
            resolved = {"sweeper vllm (pip)": pip_pins} if python == here else {}
            for name in CASES:
                pins, error, took = cases[python, name].result()
                if error:
                    failures.append(f"{name} (Python {python}) does not resolve:\n{error}")
                    print(f"  {name:18} DOES NOT RESOLVE ({took:.0f} s)", flush=True)
                    continue
                resolved[name] = pins
                print(f"  {name:18} {show(pins)} ({took:.0f} s)", flush=True)
            for package, case in (("vllm", "sweeper vllm (pip)"), ("vllm", "sweeper[vllm]"),
                                  ("sglang", "sweeper[sglang]")):  # fmt: skip
                alone = resolved.get(f"{package} alone", {}).get(package)
                with_sweeper = resolved.get(case, {}).get(package)
                if alone and with_sweeper and alone != with_sweeper:
                    failures.append(
                        f"{case} (Python {python}) gets {package} {with_sweeper}, "
                        f"{package} alone resolves to {alone}: sweeper holds it back"
                    )
            for name in CONFLICT:
                pins, error, _ = cases[python, name].result()
                outcome = show(pins) if pins else "does not resolve (expected: one extra per env)"
                print(f"  {name:18} {outcome}", flush=True)
    for failure in failures:
        print(f"\nFAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
