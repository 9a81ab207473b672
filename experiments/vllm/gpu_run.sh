#!/usr/bin/env bash
# The GPU comparison of experiments/vllm/README.md: the default tiny model and a random-weight
# Qwen2.5-VL-3B-shaped model, each through engine=hf and engine=vllm, 200 easy-VQA questions.
# Runs on a host whose python3 holds torch 2.11 + CUDA 13 and the wheelhouse of
# ../shared/tools/README.md (vllm 0.26.0, hydra, mlflow, ...), from the repo root:
#
#   bash experiments/vllm/gpu_run.sh OUT_DIR [TRIAL ...]   # default: all four trials below
#
# (the fifth turns vLLM's two switches on). OUT_DIR gets the MLflow store, the built model, one log per trial and runs.json (every
# trial's metrics and tags).
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_run.sh OUT_DIR}")
mkdir -p "$out"
shift
only=" $* "
common=(dataset.limit=200 "tracking.uri=sqlite:///$out/mlflow.db"
        "tracking.artifact_location=$out/artifacts")
big=(model=custom "model.path=$out/qwen2_5_vl_3b_random" model.random_weights=true)
# enforce_eager: no torch.compile / CUDA graphs, which would add ~2 minutes per vLLM start-up.
vllm=(engine=vllm engine.enforce_eager=true)

trial() {
    local name=$1
    shift
    [[ "$only" == "  " || "$only" == *" $name "* ]] || return 0
    echo "== $name: python -m sweeper $*"
    python3 -m sweeper "$@" "${common[@]}" "hydra.run.dir=$out/hydra/$name" \
        >"$out/$name.log" 2>&1 || echo "!! $name failed (exit $?), see $name.log"
    grep -E '│ (tps|ttft_s|context_load_s|peak_mem_gb|batch_efficiency|accuracy) ' "$out/$name.log"
}

if [[ "$only" == "  " || "$only" == *" 3b"* ]]; then
    python3 experiments/vllm/build_random_vlm.py "$out/qwen2_5_vl_3b_random"
fi
trial tiny-hf engine=hf
trial tiny-vllm "${vllm[@]}"
trial 3b-hf engine=hf "${big[@]}"
trial 3b-vllm "${vllm[@]}" "${big[@]}"
trial 3b-vllm-cb-pc "${vllm[@]}" "${big[@]}" continuous_batching=true prefix_caching=true

python3 - "$out" <<'PY'
import json, sys
import mlflow
out = sys.argv[1]
mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
runs = mlflow.search_runs(experiment_names=["sweeper"], output_format="list")
rows = [
    {"name": r.info.run_name, "status": r.info.status, "metrics": r.data.metrics,
     "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")}}
    for r in sorted(runs, key=lambda r: r.info.start_time)
]
with open(f"{out}/runs.json", "w") as f:
    json.dump(rows, f, indent=1)
print(f"{len(rows)} runs -> {out}/runs.json")
PY
