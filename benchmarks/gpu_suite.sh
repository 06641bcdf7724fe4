#!/usr/bin/env bash
# Every GPU check of fastinit in one run, each step time-boxed, logs in LOGDIR:
#
#     bash benchmarks/gpu_suite.sh [LOGDIR]     # default: $OUT/gpu-logs if $OUT is set, else out/gpu-logs
#
# The Python that runs every step is $PYTHON if set, else the project's
# .venv/bin/python (the README's set-up) when it exists, else python3.
#
# 1. benchmarks/sass_count.py: the sm_90 instruction counts and the predicted
#    bound of every fill (docs/gpu-bound.md), logged next to what is measured;
# 2. benchmarks/host_path.py --device cuda: host cost of a drop-in call with the
#    launch stubbed, then real calls on 1M float32 elements against torch's;
# 3. benchmarks/gpu_check.py: a sweep of kernel shapes, then 2 GiB fills against
#    memset for uniform/normal/trunc_normal (+-2 sigma and std=.02's default
#    +-100 sigma)/constant and the shape rules, float32 and bfloat16, each row
#    marked with its goal; one launch for a model-sized batch;
# 4. benchmarks/init_speed.py on CUDA: the drop-in calls per call on 1M
#    float32 elements, then on 64M;
# 5. fastinit bench on CUDA: llama-8b in bfloat16 (torch eager, meta path,
#    fastinit; the GPU synchronized), then llama-1b in float32;
# 6. the kernel, engine, API, error and deferred-init tests with CUDA present
#    (materialize defaults to CUDA there, so the model tests run the Triton engine);
# 7. benchmarks/materialize_llama.py on CUDA (transformers' Llama class).
#
# A step that fails or runs out of time is logged and the next one still runs;
# the exit code is the number of failed steps. Without a GPU, DRY_RUN=1 runs
# the steps that can run on CPU (sass_count, host_path, gpu_check --dry-run)
# to check the script itself.
set -u
out=${1:-${OUT:-out}/gpu-logs}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=${PYTHON:-python3}
fi

failed=0
step() {  # step NAME SECONDS CMD...   (output in $out/NAME.log, a summary in $out/summary.txt)
    local name=$1 secs=$2
    shift 2
    echo "=== $name ($(date -u +%T)): $*" | tee -a "$out/summary.txt"
    timeout "$secs" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.log"
    echo "=== $name: exit $rc" | tee -a "$out/summary.txt"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

if [ "${DRY_RUN:-0}" = 1 ]; then
    step sass_count 300 $py -m benchmarks.sass_count --check --json "$out/sass_count.json"
    step host_path 300 $py -m benchmarks.host_path --device cpu --calls 500 --repeat 3 --json "$out/host_path.json"
    step gpu_check 300 $py benchmarks/gpu_check.py --dry-run --json "$out/gpu_check.json"
    echo "failed steps: $failed"
    exit "$failed"
fi

nvidia-smi -L; $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step sass_count 120 $py -m benchmarks.sass_count --check --json "$out/sass_count.json"
step host_path 60 $py -m benchmarks.host_path --device cuda --json "$out/host_path.json"
step gpu_check 150 $py benchmarks/gpu_check.py --skip-tests --sweep --json "$out/gpu_check.json"
step init_speed_1m 30 $py -m benchmarks.init_speed --device cuda --repeat 50 --numel 1048576 --json "$out/init_speed_1m.json"
step bench_llama8b_bf16 240 $py -m fastinit bench --device cuda --model llama-8b --dtype bfloat16 --repeat 3 \
    --json "$out/bench_llama8b_bf16.json"
step bench 60 $py -m fastinit bench --device cuda --repeat 3 --json "$out/bench.json"
step tests 120 $py -m pytest -q -p no:cacheprovider --tb=short tests/test_kernels.py tests/test_engines.py \
    tests/test_api.py tests/test_errors.py tests/test_deferred.py
step init_speed 30 $py -m benchmarks.init_speed --device cuda --repeat 20 --json "$out/init_speed.json"
step materialize_llama 60 $py -m benchmarks.materialize_llama --device cuda --json "$out/materialize_llama.json"
echo "failed steps: $failed"
exit "$failed"
