#!/usr/bin/env bash
# The GPU study of README.md: Qwen2.5-VL-7B's architecture (random weights) on the 5,046-question
# OK-VQA replica, HF transformers vs vLLM, bare anchors beside sweeper trials.
#
#   bash experiments/okvqa_replica/gpu_study.sh PHASE [PHASE ...]
#
# Runs from the repo root on a GPU host with torch 2.11 + vllm 0.26.0 and sweeper installed
# (`pip install --no-deps -e .`; README.md says how on a host without a package index). State lives in
# $STUDY_DIR (default ~/okvqa_study): the replica, the MLflow store (mlflow.db), the Optuna
# storage, one log and one JSON per phase. With $OUT set (the device tool's output folder),
# everything but the replica and the model is archived there at the end (study.tgz).
# Phases, in the order they were run (README.md has the numbers):
#   setup        replica (5,046 questions) + the model folder (config, tokenizer, processor)
#   hf-bare      bare `generate` loop, batch 1: dynamic vs static cache (transformers' own compile)
#   hf           sweeper engine=hf: hf-b1 (batch 1, dynamic / static), hf-b1-compile
#                (static + compile), hf-batched (batch 16, dynamic); hf-b1-dynamic and
#                hf-batched-compile (batch 16, static + compile) run on their own, as does
#                hf-b1-graphed / hf-batched-graphed (batch 1 / 16, static + compile,
#                engine.decode_loop=graphed)
#   hf-profile   hf_decode_profile.py: the graphed loop's TPOT, pipelined vs synced, top kernels
#   decode-fusion  decode_fusion_bench.py: merged projections / GQA attention, per token
#   vllm-bare    bare LLM.generate, vLLM defaults, all 5,046 questions
#   vllm-default sweeper engine=vllm with vLLM's default settings, all 5,046 questions
#   vllm-default-no-pc  the same with prefix caching off
#   vllm-kv-fp8  vLLM defaults with an fp8 KV cache, all questions
#   vllm-mnbt    vLLM defaults with max_num_batched_tokens in $MNBT, $SUBSET questions
#   vllm-async   vLLM defaults through AsyncLLM with RENDERERS renderer threads, all questions
#   vllm-optuna-async  Optuna study over the AsyncLLM frontend's settings, $SUBSET questions
#   vllm-flags   continuous vs static batches of 256, $SUBSET questions
#   vllm-optuna  Optuna study (TPE) over vLLM's serving settings, $SUBSET questions
#   vllm-best    the study's best settings on all 5,046 questions
#   serve-baseline  `vllm serve` with vLLM's defaults (1 API server) through engine=openai,
#                load=rate_sweep from one request at a time to saturation, $SERVE_N questions
#   serve-default   the same server under load=rate at $SERVE_RATE requests/s, $SERVE_STUDY_N
#                questions: the study's baseline at the study's load
#   serve-optuna Optuna study (hydra/sweeper=serving_goodput): the server flags and the load's
#                concurrency cap that maximise goodput at $SERVE_RATE requests/s
#   serve-best   BEST (the study's best overrides) under load=rate_sweep, as serve-baseline
#   serve-client sweeper's client against `vllm bench serve`, same server, same (text) requests,
#                back to back: one at a time, one rate below saturation, everything at once
#   serve-hf     transformers' continuous batching (text prompts) under load=concurrency 1 / 16
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
study=${STUDY_DIR:-$HOME/okvqa_study}
replica=$study/replica
subset=${SUBSET:-1000}
replica_n=${REPLICA_N:-5046}
hf_n=${HF_N:-16}
hf_batched_n=${HF_BATCHED_N:-128}
mkdir -p "$study/logs" "$study/results"

# MODEL_ARGS / MODEL_DIR: another model (the CPU smoke test uses a shrunk architecture).
read -r -a model <<<"${MODEL_ARGS:-model=qwen2_5_vl_7b_arch model.cache_dir=$study/models}"
model_dir() { echo "${MODEL_DIR:-$(ls -d "$study"/models/qwen2_5_vl_7b_arch-*)}"; }
common=(
    "${model[@]}"
    dataset=okvqa "dataset.questions_file=$replica/OpenEnded_mscoco_val2014_questions.json"
    "dataset.annotations_file=$replica/mscoco_val2014_annotations.json"
    "dataset.image_dir=$replica/val2014"
    max_new_tokens=100 ignore_eos=true temperature=0
    experiment_name=okvqa_replica "tracking.uri=sqlite:///$study/mlflow.db"
    "tracking.artifact_location=$study/artifacts"
)
# vLLM's offline defaults on an H100 (vllm/engine/arg_utils.py): max_num_seqs 1024, prefix
# caching on; under continuous batching sweeper's max_num_seqs is batch_size.
vllm_default=(engine=vllm continuous_batching=true prefix_caching=true batch_size=1024)
async_frontend=(engine.frontend=async engine.mm_processor_cache_gb=0)
# The serving study's objectives (issue 22): goodput counts the requests that met both.
slo=(slo.ttft_s=1 slo.tpot_s=0.05)
serve_n=${SERVE_N:-200}
serve_study_n=${SERVE_STUDY_N:-800}
serve_rate=${SERVE_RATE:-40}
serve=(engine=openai engine.server=vllm "${slo[@]}")
# The one-at-a-time half of batch_efficiency costs ~1 s per sample at batch 1: keep it short.
calibration=(calibration_samples=4)

sweep() {  # sweep NAME ARGS...: one sweeper command (a multirun with -m), its log kept
    local name=$1
    shift
    echo "== $name: python -m sweeper $*"
    # The GPU's utilization (share of time a kernel runs) and power once a second, beside the
    # log: how busy a setting keeps the GPU (README.md, "Is the GPU busy?").
    local sampler=
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw,clocks.sm \
            --format=csv,noheader -lms 1000 >"$study/logs/smi-$name.csv" &
        sampler=$!
    fi
    python3 -m sweeper "$@" "${common[@]}" "hydra.run.dir=$study/hydra/$name" \
        "hydra.sweep.dir=$study/hydra/$name" >"$study/logs/$name.log" 2>&1 \
        || echo "!! $name: exit $? (see logs/$name.log)"
    [[ -n $sampler ]] && kill "$sampler"
    grep -E '│ (tps|ttft_s|context_load_s|peak_mem_gb|batch_efficiency|accuracy) |trials|best' \
        "$study/logs/$name.log" | tail -40
}

phase() {
    case $1 in
    setup)
        [[ -f $replica/SWEEPER_REPLICA.json && -f $replica/mscoco_val2014_annotations.json ]] \
            || python3 -m sweeper.data.replica --n "$replica_n" --out "$replica" --workers "$(nproc)" 2>&1 | grep -v '^images'
        # The MLflow store of an earlier machine, carried in (.carry/study), goes on growing: one
        # store holds the whole study.
        [[ -f .carry/study/mlflow.db && ! -f $study/mlflow.db ]] && cp .carry/study/mlflow.db "$study/"
        # A folder built here and carried in (.carry/models) is used as is: the host may lack
        # the builder's tokenizer packages.
        [[ -d .carry/models ]] && mkdir -p "$study/models" && cp -rn .carry/models/. "$study/models/"
        python3 -c "from sweeper.models.qwen_arch import cached_qwen2_5_vl_7b_arch as b; print(b('$study/models'))"
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        ;;
    hf-bare)
        python3 "$here/bare_hf.py" --model "$(model_dir)" \
            --replica "$replica" --n "$hf_n" --device "${BARE_DEVICE:-cuda}" \
            --out "$study/results/hf_bare.json" \
            2>&1 | tee "$study/logs/hf-bare.log" | grep -v Warning
        ;;
    hf) phase hf-b1; phase hf-b1-compile; phase hf-batched ;;
    hf-b1)
        sweep hf-b1 -m engine=hf batch_size=1 kv_cache=dynamic,static "dataset.limit=$hf_n"
        ;;
    hf-b1-dynamic)
        sweep hf-b1-dynamic engine=hf batch_size=1 kv_cache=dynamic "dataset.limit=$hf_n"
        ;;
    hf-b1-compile)
        sweep hf-b1-compile engine=hf engine.compile=true kv_cache=static batch_size=1 \
            warmup_batches=3 "dataset.limit=$hf_n"
        ;;
    hf-b1-graphed)
        # The step compiles (and records its CUDA graph) once per cache length: prompt + 100
        # tokens rounded up to a power of two. A length first met after the warm-up batches is
        # compiled inside the measured run, and timed with it.
        # HF_ARGS: more overrides, e.g. engine.fuse_projections=true.
        sweep hf-b1-graphed engine=hf engine.compile=true kv_cache=static engine.decode_loop=graphed \
            batch_size=1 warmup_batches=3 "dataset.limit=$hf_n" ${HF_ARGS:-}
        ;;
    hf-batched-graphed)
        sweep hf-batched-graphed engine=hf engine.compile=true kv_cache=static \
            engine.decode_loop=graphed batch_size=16 warmup_batches=2 "dataset.limit=$hf_batched_n" \
            "${calibration[@]}"
        ;;
    hf-batched)
        sweep hf-batched -m engine=hf batch_size=16 kv_cache=dynamic "dataset.limit=$hf_batched_n" \
            "${calibration[@]}"
        ;;
    hf-batched-compile)
        sweep hf-batched-compile engine=hf batch_size=16 kv_cache=static engine.compile=true \
            warmup_batches=2 "dataset.limit=$hf_batched_n" "${calibration[@]}"
        ;;
    hf-profile)
        # The graphed loop at batch 1 outside a trial: pipelined vs per-token sync, CUDA-event
        # check of the clock, torch.profiler's top kernels (PROFILE_ARGS: e.g. --override ...).
        python3 "$here/hf_decode_profile.py" --model "$(model_dir)" --replica "$replica" \
            --tokens 100 --runs 5 --out "$study/results/decode_profile" ${PROFILE_ARGS:-} \
            >"$study/logs/hf-profile.log" 2>&1 || echo "!! hf-profile failed"
        tail -12 "$study/logs/hf-profile.log"
        ;;
    decode-fusion)
        # What merging the decoder's projections (and GQA attention without repeated KV heads)
        # would save per token at batch 1, on the 7B shapes: no model, a minute.
        python3 "$here/decode_fusion_bench.py" --out "$study/results/decode_fusion.json" \
            2>&1 | tee "$study/logs/decode-fusion.log"
        ;;
    vllm-bare)
        python3 "$here/bare_vllm.py" --model "$(model_dir)" \
            --replica "$replica" --out "$study/results/vllm_bare.json" ${BARE_VLLM_ARGS:-} \
            >"$study/logs/vllm-bare.log" 2>&1 || echo "!! vllm-bare failed"
        tail -20 "$study/logs/vllm-bare.log"
        ;;
    vllm-default)
        sweep vllm-default "${vllm_default[@]}" "${calibration[@]}"
        ;;
    vllm-default-no-pc)
        sweep vllm-default-no-pc "${vllm_default[@]}" prefix_caching=false "${calibration[@]}"
        ;;
    vllm-kv-fp8)
        # vLLM's defaults with an fp8 KV cache: half the bytes per cached token for decode
        # attention to read, all questions.
        sweep vllm-kv-fp8 "${vllm_default[@]}" engine.kv_cache_dtype=fp8 "${calibration[@]}"
        ;;
    vllm-mnbt)
        # MNBT: max_num_batched_tokens values (tokens per scheduler step); each recompiles.
        for tokens in ${MNBT:-8192 32768}; do
            sweep "vllm-mnbt-$tokens" "${vllm_default[@]}" "engine.max_num_batched_tokens=$tokens" \
                "dataset.limit=$subset" "${calibration[@]}"
        done
        ;;
    vllm-async)
        # vLLM's defaults, but requests go through AsyncLLM, whose renderer pool of RENDERERS
        # threads preprocesses images in parallel (it needs the processor cache off).
        for workers in ${RENDERERS:-2 4}; do
            sweep "vllm-async-$workers" "${vllm_default[@]}" "${async_frontend[@]}" \
                "engine.renderer_num_workers=$workers" "${calibration[@]}" ${VLLM_ARGS:-}
        done
        ;;
    vllm-optuna-async)
        sweep vllm-optuna-async -m engine=vllm continuous_batching=true "${async_frontend[@]}" \
            hydra/sweeper=vllm_async_throughput "hydra.sweeper.n_trials=${N_TRIALS:-8}" \
            "hydra.sweeper.storage=sqlite:///$study/optuna.db" "dataset.limit=$subset" \
            "${calibration[@]}"
        ;;
    vllm-flags)
        sweep vllm-flags -m engine=vllm prefix_caching=true continuous_batching=true,false \
            batch_size=256 engine.max_num_seqs=256 "dataset.limit=$subset" "${calibration[@]}"
        ;;
    vllm-optuna)
        sweep vllm-optuna -m engine=vllm continuous_batching=true hydra/sweeper=vllm_throughput \
            "hydra.sweeper.n_trials=${N_TRIALS:-8}" "hydra.sweeper.storage=sqlite:///$study/optuna.db" \
            "dataset.limit=$subset" "${calibration[@]}"
        ;;
    vllm-best)
        # BEST: the study's best parameters as overrides, e.g. "batch_size=512 ..." (README).
        read -r -a best <<<"${BEST:?set BEST to the overrides of the best trial}"
        sweep vllm-best engine=vllm continuous_batching=true "${best[@]}" "${calibration[@]}"
        ;;
    serve-baseline)
        # vLLM's serve defaults: sweeper passes no scheduler flag (continuous_batching=false
        # under an open load sends each request as it comes; --max-num-seqs is left to vLLM).
        sweep serve-baseline "${serve[@]}" load=rate_sweep load.steps=5 "dataset.limit=$serve_n" \
            "${calibration[@]}"
        ;;
    serve-default)
        sweep serve-default "${serve[@]}" load=rate "load.rate=$serve_rate" \
            "dataset.limit=$serve_study_n" "${calibration[@]}"
        ;;
    serve-optuna)
        sweep serve-optuna -m "${serve[@]}" load=rate "load.rate=$serve_rate" \
            hydra/sweeper=serving_goodput "hydra.sweeper.n_trials=${N_TRIALS:-6}" \
            "hydra.sweeper.storage=sqlite:///$study/optuna-serve.db" "dataset.limit=$serve_study_n" \
            "${calibration[@]}"
        ;;
    serve-best)
        read -r -a best <<<"${BEST:?set BEST to the overrides of the best trial}"
        sweep serve-best "${serve[@]}" load=rate_sweep load.steps=5 "dataset.limit=$serve_n" \
            "${best[@]}" "${calibration[@]}"
        ;;
    serve-client)
        # One server (vLLM's defaults), text prompts (bench's custom dataset is text): a rate
        # sweep of 3 steps (one at a time, the rate between, everything at once) by sweeper's
        # client, then each step again by `vllm bench serve`.
        python3 "$here/../serving_load/bench.py" --count "${CLIENT_N:-100}" --tokens 100 \
            --steps 3 --passes 1 --ttft-slo 1 --tpot-slo 0.05 --vllm-defaults \
            --title "vllm serve, Qwen2.5-VL-7B arch on one H200" --out "$study/results/client" \
            "${common[@]}" >"$study/logs/serve-client.log" 2>&1 || echo "!! serve-client failed"
        tail -30 "$study/logs/serve-client.log"
        ;;
    serve-hf)
        sweep serve-hf -m engine=hf continuous_batching=true workload.images=false \
            load=concurrency load.concurrency=1,16 "dataset.limit=${HF_SERVE_N:-128}" \
            "${slo[@]}" "${calibration[@]}"
        ;;
    *) echo "unknown phase $1" && return 1 ;;
    esac
}

for name in "$@"; do
    start=$(date +%s)
    phase "$name"
    echo "-- $name took $(($(date +%s) - start)) s"
done
if [[ -n ${OUT:-} ]]; then  # one archive: the device tool brings back a limited number of files
    tar -C "$study" --exclude=./replica --exclude=./models -czf "$OUT/study.tgz" .
fi
