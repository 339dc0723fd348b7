#!/usr/bin/env bash
# The GPU figures of issues 16 and 20 in ONE prepared run of at most 8 minutes on a lent H200 (the device tool):
# end-to-end training vs the model-only rate (original JPEGs at batch 256 and 1024; pre-resized shards and nvJPEG
# decoding at 1024), the model step (SimZSS / LiT, cached, profile), the feature cache and the 448 px evaluator.
# Each benchmark has a hard time limit, so a slow one cannot eat the others' time.
#
# On the device (its python3 lacks some of our dependencies; carry them as wheels, see benchmarks/RESULTS.md):
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=480)
# A rerun of some benchmarks only (names as below; e.g. those that failed or ran out of time):
#   run(command="ONLY='e2e_variants eval' bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=240)
# Dry run on a CPU (tiny models, a minute or two; checks the plumbing, not the speed):
#   SMALL=1 OUT=/tmp/gpu_session bash benchmarks/gpu_session.sh
#
# Writes to $OUT (at most 8 files come back from the device): one JSON per benchmark and session.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_session}
mkdir -p "$OUT"
LOG="$OUT/session.log"
: > "$LOG"
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >> "$LOG" 2>&1 || { echo "wheel install failed (see $LOG)"; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; nproc
  $PY -c "import torch, torchvision, timm, transformers; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available())"; } >> "$LOG" 2>&1

# bench NAME SECONDS SCRIPT ARGS...: stdout (one JSON object) to $OUT/NAME.json, stderr to the log
bench() {
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        return
    fi
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*" >> "$LOG"
    timeout -k 5 "$limit" $PY "$@" > "$OUT/$name.json" 2>> "$LOG"
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
}

SHARDS=${SHARDS:-/tmp/simzss_e2e_shards}  # made once, shared by the two e2e benchmarks
if [ "${SMALL:-0}" = 1 ]; then  # the same commands with tiny models on the CPU
    bench e2e 300 benchmarks/bench_e2e.py --device cpu --small --batch 16 --samples 96 --epochs 1 --workers 1 \
        --model-only-steps 2 --data "$SHARDS"
    bench e2e_variants 300 benchmarks/bench_e2e.py --device cpu --small --batch 16 --samples 96 --epochs 1 \
        --workers 1 --model-only-steps 2 --data "$SHARDS" --variants resized pil
    bench train_step 120 benchmarks/bench_train_step.py --device cpu --depth 1 --image-size 56 --batch-size 8 \
        --text-layers 1 --text-width 64 --text-heads 2 --steps 1 --reps 1 --warmup 1 --no-legacy --dynamic-padding \
        --profile "$OUT/profile.json"
    bench train_step_cached 120 benchmarks/bench_train_step.py --device cpu --depth 1 --image-size 56 --batch-size 8 \
        --text-layers 1 --text-width 64 --text-heads 2 --steps 1 --reps 1 --warmup 1 --no-legacy --cached
    bench cache 300 benchmarks/bench_cache.py --device cpu --depth 1 --num-images 32 --toy-size 64 \
        --captions-per-image 2 --views 2 --image-size 56 --batch-size 8 --workers 1 --text-layers 1 --text-width 64 \
        --text-heads 2 --context-length 16 --modes disk ram --train-steps 4 --log-every 2 --parts build serve train
    bench eval 120 benchmarks/bench_eval.py --device cpu --depth 1 --images 2 --reps 1 --classes 21 \
        --background threshold --short-side 112 --crop 112 --stride 56
    exit 0
fi

B14=vit_base_patch14_reg4_dinov2
# issue 16: the trainer end to end against the model-only rate, batch 256 and 1024
bench e2e 150 benchmarks/bench_e2e.py --device cuda --batch 256 1024 --samples 8192 --workers 14 --data "$SHARDS"
bench e2e_variants 90 benchmarks/bench_e2e.py --device cuda --batch 1024 --samples 8192 --workers 14 --epochs 2 \
    --data "$SHARDS" --variants resized gpu
# issue 20 items 1-3: SimZSS / LiT full step with a profile, dynamic padding; then the cached step
bench train_step 60 benchmarks/bench_train_step.py --device cuda --bf16 --vision $B14 --image-size 224 \
    --batch-size 1024 --steps 5 --reps 3 --no-legacy --dynamic-padding --profile "$OUT/profile.json"
bench train_step_cached 30 benchmarks/bench_train_step.py --device cuda --bf16 --vision $B14 --image-size 224 \
    --batch-size 1024 --steps 10 --reps 3 --no-legacy --cached
# issue 20 item 4: cache build, serving from disk / RAM / GPU, training from it
bench cache 90 benchmarks/bench_cache.py --device cuda --bf16 --vision $B14 --num-images 2048 --toy-size 256 \
    --captions-per-image 5 --views 2 --image-size 224 --batch-size 1024 --workers 14 --text-layers 12 \
    --text-width 512 --context-length 77 --modes disk ram gpu --train-steps 60 --log-every 10 \
    --parts build serve train
# issue 20 item 5: the 448 px evaluator
bench eval 40 benchmarks/bench_eval.py --device cuda --vision $B14 --images 256 --reps 3 --bf16 --classes 21 \
    --background threshold
