#!/usr/bin/env bash
# The whole GPU run, on the device, from the project root: install the carried wheels, compile
# flashinfer's kernels, run the GPU tests, then the benchmarks; logs and a JSON line per figure
# go to $OUT (default ./device-out). Stages to run are the arguments (default: all of them):
#   jit tests w1-fi w1-fa w2-fi w2-fa tp
# (tp needs two GPUs: tp=2 logits against tp=1, W6 at tp=1 and tp=2, and a tp=2 server under load)
# A stage starts only while the run is younger than $BUDGET_S seconds (default 540), so that one
# call ends inside the device's 10-minute limit with its logs intact.
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/run.log"; }
. scripts/device_env.sh
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
stages=${*:-jit tests w1-fi w1-fa w2-fi w2-fa}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/run.log"
log "commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}; stages: $stages"
python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tee -a "$OUT/run.log"
python3 -c "import flash_attn.cute; print('flash_attn.cute ok')" 2>&1 | tail -1 | tee -a "$OUT/run.log"
left() { (( $(date +%s) - T0 < BUDGET_S )); }
# A test that hangs inside NCCL or CUDA must fail with its stack, not eat the call: pytest-timeout's
# thread method works there (its signal method waits for the main thread, which is stuck in C).
PT_TIMEOUT=""
python3 -c "import pytest_timeout" 2>/dev/null && PT_TIMEOUT="--timeout 300 --timeout-method thread"
bench() {  # bench LOGNAME ARGS...: one offline.py run, appended to figures.jsonl
  local name=$1; shift
  left || { log "skip $name (budget)"; return; }
  log "bench $name: $*"
  timeout $(( BUDGET_S + 30 - ($(date +%s) - T0) )) python3 benchmarks/offline.py --load-format dummy \
    --tokenizer .tok --no-progress --json "$OUT/figures.jsonl" "$@" >> "$OUT/bench.log" 2>&1
  log "  rc=$? $(tail -n 2 "$OUT/bench.log" | head -n 1)"
}
for s in $stages; do
  case $s in
    jit) log "flashinfer JIT"; python3 scripts/fi_warmup.py 2>&1 | tee -a "$OUT/run.log" ;;
    tests) log "gpu tests"
      timeout $(( BUDGET_S + 30 - ($(date +%s) - T0) )) python3 -m pytest -m gpu -v -rsP tests/test_gpu.py \
        -p no:cacheprovider $PT_TIMEOUT 2>&1 | tee "$OUT/gpu-tests.log" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed" \
        | tee -a "$OUT/run.log" ;;
    w1-fi|w1-fa) a=${s#w1-}
      bench "$s overlap" --workload w1 --model benchmarks/configs/qwen3-0.6b --attn "$a"
      bench "$s no-overlap" --workload w1 --model benchmarks/configs/qwen3-0.6b --attn "$a" --disable-overlap ;;
    w2-fi|w2-fa) a=${s#w2-}
      bench "$s overlap" --workload w2 --model benchmarks/configs/llama-3.1-8b --attn "$a" --repeats 2
      bench "$s no-overlap" --workload w2 --model benchmarks/configs/llama-3.1-8b --attn "$a" --repeats 2 \
        --disable-overlap ;;
    tp) log "tp=2 logits vs tp=1 (Qwen3-8B shape)"
      timeout $(( BUDGET_S + 30 - ($(date +%s) - T0) )) python3 -m pytest -m gpu -v -rsP tests/test_gpu.py -k tp2 \
        -p no:cacheprovider $PT_TIMEOUT 2>&1 | tee "$OUT/tp-tests.log" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed" \
        | tee -a "$OUT/run.log"
      bench "w6 tp=1" --workload w6 --model benchmarks/configs/qwen3-8b
      bench "w6 tp=2" --workload w6 --model benchmarks/configs/qwen3-8b --tp 2
      left && { log "tp=2 server under load (64 W1-like requests over 8 connections)"
        timeout $(( BUDGET_S + 30 - ($(date +%s) - T0) )) python3 benchmarks/load.py --workload random \
          --num-prompts 64 --request-rate inf --connections 8 --json "$OUT/tp-load.jsonl" --spawn \
          "--model benchmarks/configs/qwen3-8b --load-format dummy --tokenizer .tok --tp 2" \
          > "$OUT/tp-load.log" 2>&1; log "  rc=$? $(grep -m1 -i 'tok/s' "$OUT/tp-load.log")"; } ;;
    *) log "unknown stage $s" ;;
  esac
done
# bring compiled flashinfer kernels back (the next run installs them as AOT modules)
so=$(cd /tmp/fi/.cache/flashinfer 2>/dev/null && find . -name '*.so' | head -n 50)
if [ -n "$so" ]; then
  (cd /tmp/fi/.cache/flashinfer/*/*/cached_ops && find . -name '*.so' | tar czf - -T -) \
    | split -b 15000000 - "$OUT/fi_so.tgz.part-"
fi
log "done"; ls -la "$OUT"
