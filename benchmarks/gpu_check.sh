#!/usr/bin/env bash
# The GPU tier, checked on a lent GPU machine (issue 15): about 8 minutes on an H200 with 16 cores.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --pack     # here, before: copies bitsandbytes into .gpu-site (ignored)
#   bash benchmarks/gpu_check.sh --cpu      # the same check on the CPU with tiny sizes (its own test)
#
# Steps, each under `timeout`, output into $OUT (default ./gpu-out): install dsmoe from this tree
# without network (pip --no-deps --no-build-isolation -e .; else the tree on PYTHONPATH), run the
# store's tests on the CUDA machine (tests/test_offload.py, tests/test_offload_stats.py: with a GPU
# present, the store picks it), then benchmarks/gpu_offload_check.py: a synthetic 28-layer model built
# there, all-resident on the GPU, then with --gpu-mem 4, --gpu-mem 8 and --gpu-mem 4 with the cost
# model free to run misses on the CPU; greedy tokens compared to the resident run's, decode tok/s,
# host->GPU bytes per decoded token against the plan's, misses run on the CPU.
#
# bitsandbytes: dsmoe's 4- and 8-bit layers run bitsandbytes' kernels on CUDA, and the machine has
# none and no network. `--pack` here copies the installed bitsandbytes (its Python, its CPU library
# and the CUDA 13 ones the machine's torch needs: a few MB, not the 125 MB of every build) into
# .gpu-site (with ../shared's tiny checkpoint, which the tests read and which does not travel); pass
# `carry: [".gpu-site"]` to the device run and the check uses 4-bit weights. Without it the check runs
# the same steps in bf16 (and says so in summary.txt), which needs no bitsandbytes.
set -uo pipefail

OUT=${OUT:-./gpu-out}
PY=${PYTHON:-python3}
CPU=${DSMOE_GPU_CHECK_CPU:-0}
SITE=.gpu-site

pack() {
    local src
    src=$("$PY" -c 'import bitsandbytes, os; print(os.path.dirname(bitsandbytes.__file__))') || exit 1
    rm -rf "$SITE" && mkdir -p "$SITE"
    cp -r "$src" "$SITE/bitsandbytes"
    find "$SITE/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete
    find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
    # The tests read ../shared's tiny checkpoint, and ../shared does not travel with the tree.
    if [ -d ../shared/fixtures/tiny-deepseek ]; then
        mkdir -p "$SITE/shared/fixtures" && cp -r ../shared/fixtures/tiny-deepseek "$SITE/shared/fixtures/"
    fi
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qx "/$SITE/" "$exclude" 2>/dev/null || echo "/$SITE/" >> "$exclude"
    du -sh "$SITE"
}

case ${1:-} in
    --pack) pack; exit 0 ;;
    --cpu) CPU=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--pack | --cpu]" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
: > "$OUT/summary.txt"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }
# step NAME SECONDS CMD...: the command's output into $OUT/NAME.log, its exit status into the summary.
step() {
    local name=$1 limit=$2 rc
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 124 ]; then log "$name: timed out after $limit s"; else log "$name: exit $rc"; fi
    return "$rc"
}

if [ -d "$SITE" ]; then
    export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
    if [ ! -e ../shared ] && [ -d "$SITE/shared" ]; then
        ln -s "$PWD/$SITE/shared" ../shared || log "could not link ../shared: tests that read its fixture fail"
    fi
fi
if "$PY" -c 'import bitsandbytes' > /dev/null 2>&1; then
    BITS=4
else
    BITS=16
    log "bitsandbytes absent (no $SITE carried): bf16 weights; dsmoe's 4/8-bit layers need bitsandbytes on CUDA"
fi

if [ "$CPU" = 1 ]; then
    log "CPU mode: tiny sizes on the CPU, no install and no test run (the same check's Python)"
    BITS=${DSMOE_GPU_CHECK_BITS:-16}
    LINK="$(mktemp -d)"
    ln -s "$PWD" "$LINK/dsmoe"
    export PYTHONPATH="$LINK${PYTHONPATH:+:$PYTHONPATH}"
    SPEC="16b:layers=3,vocab_size=512,hidden_size=64,intermediate_size=192,moe_intermediate_size=32"
    SPEC="$SPEC,n_routed_experts=16,num_experts_per_tok=4,num_attention_heads=4,num_key_value_heads=4"
    step offload 120 "$PY" benchmarks/gpu_offload_check.py --synthetic "$SPEC" --bits "$BITS" --device cpu \
        --expert-cache 4 8 --prompt-tokens 8 --new-tokens 6 --host-bandwidth 10 --output "$OUT/gpu_offload.json"
    rc=$?
    rm -rf "$LINK"
    exit "$rc"
fi

log "python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' 2>&1)"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed"

if ! step install 150 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .; then
    LINK="$(mktemp -d)"
    ln -s "$PWD" "$LINK/dsmoe"
    export PYTHONPATH="$LINK${PYTHONPATH:+:$PYTHONPATH}"
    log "install failed: dsmoe from PYTHONPATH, without its native kernels (see install.log)"
fi

step tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_offload.py tests/test_offload_stats.py
step offload 330 "$PY" benchmarks/gpu_offload_check.py --synthetic 16b --bits "$BITS" --device cuda \
    --gpu-mem 4 8 --host-compute-at 4 --draw-threads 14 --output "$OUT/gpu_offload.json"
rc=$?
tail -n 8 "$OUT/offload.log" | tee -a "$OUT/summary.txt"
exit "$rc"
