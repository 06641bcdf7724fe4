#!/usr/bin/env bash
# Every GPU check of fastinit in one run, each step time-boxed, logs in LOGDIR:
#
#     bash benchmarks/gpu_suite.sh [LOGDIR]        # default gpu-logs/
#
# 1. benchmarks/gpu_check.py: a sweep of kernel shapes, bandwidth of every fill
#    against memset, and one launch for a model-sized batch;
# 2. the kernel, engine, API, error and deferred-init tests with CUDA present
#    (materialize defaults to CUDA there, so the model tests run the Triton engine);
# 3. benchmarks/init_speed.py on CUDA: the drop-in calls, 64M and 1M elements;
# 4. fastinit bench on CUDA (the llama-1b preset, float32 and bfloat16);
# 5. benchmarks/materialize_llama.py on CUDA (transformers' Llama class).
#
# A step that fails or runs out of time is logged and the next one still runs;
# the exit code is the number of failed steps.
set -u
out=${1:-gpu-logs}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

failed=0
step() {  # step NAME SECONDS CMD...
    local name=$1 secs=$2
    shift 2
    echo "=== $name ($(date -u +%T))" | tee -a "$out/summary.txt"
    timeout "$secs" "$@" >"$out/step.log" 2>&1
    local rc=$?
    tail -n 40 "$out/step.log"
    { echo "=== $name"; cat "$out/step.log"; } >>"$out/steps.log"
    rm -f "$out/step.log"
    echo "=== $name: exit $rc" | tee -a "$out/summary.txt"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi -L; $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step gpu_check 100 $py benchmarks/gpu_check.py --skip-tests --sweep --json "$out/gpu_check.json"
step tests 90 $py -m pytest -q -p no:cacheprovider --tb=short tests/test_kernels.py tests/test_engines.py \
    tests/test_api.py tests/test_errors.py tests/test_deferred.py
step bench 40 $py -m fastinit bench --device cuda --repeat 3 --json "$out/bench.json"
step materialize_llama 60 $py -m benchmarks.materialize_llama --device cuda --json "$out/materialize_llama.json"
step init_speed 20 $py -m benchmarks.init_speed --device cuda --repeat 20 --json "$out/init_speed.json"
step init_speed_1m 15 $py -m benchmarks.init_speed --device cuda --repeat 50 --numel 1048576
step bench_bf16 30 $py -m fastinit bench --device cuda --dtype bfloat16 --repeat 3
echo "failed steps: $failed"
exit "$failed"
