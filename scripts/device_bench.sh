#!/usr/bin/env bash
# Engine vs peer on a GPU machine, from the project root: W1 and W2 through HF transformers (the
# peer), W3 (shared prefix, radix cache on vs --cache none) and W4 (WebSocket load against a
# spawned server, several Poisson rates, with the plot). JSON lines, logs and the plot go to $OUT
# (default ./device-out). The engine's own W1/W2 figures come from scripts/device_run.sh; put its
# figures.jsonl next to peers.jsonl and run benchmarks/compare.py on both (done here at the end
# when $OUT/figures.jsonl exists, e.g. after both scripts ran with the same OUT).
# Stages are the arguments (default: all):  w1-peer w2-peer w3 w4 compare
#   also: w1-engine w2-engine w1-sub (engine and peer on the first $W1_SUB W1 requests),
#   w4-mixed (W4 with --enable-mixed-chunk, to set against w4 on the same card)
# A stage starts only while the run is younger than $BUDGET_S seconds (default 540), so one call
# stays inside a 10-minute limit with its logs intact; run the rest in a second call.
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/bench-run.log"; }
[ -f scripts/device_env.sh ] && . scripts/device_env.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
TOK=${TOK:-.tok}  # a tokenizer dir for the dummy models (the embedded one is used when absent)
[ -d "$TOK" ] && TOKARG="--tokenizer $TOK" || TOKARG=""
stages=${*:-w1-peer w2-peer w3 w4 compare}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/bench-run.log"
log "commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}; stages: $stages"
python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)" \
  2>&1 | tee -a "$OUT/bench-run.log"
left() { (( $(date +%s) - T0 < BUDGET_S )); }
remaining() { echo $(( BUDGET_S + 30 - ($(date +%s) - T0) )); }
step() {  # step NAME LOG CMD...: run one benchmark command under the budget, log its tail
  local name=$1 logf=$2; shift 2
  left || { log "skip $name (budget)"; return; }
  log "$name: $*"
  timeout "$(remaining)" "$@" >> "$OUT/$logf" 2>&1
  log "  rc=$? $(grep -v '^{' "$OUT/$logf" | tail -n 1)"
}
Q06=benchmarks/configs/qwen3-0.6b
L8=benchmarks/configs/llama-3.1-8b
for s in $stages; do
  case $s in
    w1-peer)  # HF continuous batching, both attention names docs/benchmarks.md mentions; plain generate on 64 prompts
      step "w1 peer generate_batch" peers.log python3 benchmarks/peers/hf.py --workload w1 --model $Q06 \
        --mode generate_batch --attn "paged|sdpa,paged|flash_attention_4" --no-progress --json "$OUT/peers.jsonl"
      step "w1 peer generate" peers.log python3 benchmarks/peers/hf.py --workload w1 --model $Q06 \
        --mode generate --attn sdpa --generate-prompts 64 --batch-size 64 --no-progress --json "$OUT/peers.jsonl" ;;
    w2-peer)
      step "w2 peer generate" peers.log python3 benchmarks/peers/hf.py --workload w2 --model $L8 \
        --mode generate --attn sdpa --repeats 2 --json "$OUT/peers.jsonl" ;;
    w3)  # same requests over the WebSocket, radix cache on, then off
      for cache in radix none; do
        step "w3 cache=$cache" w3.log python3 benchmarks/load.py --workload shared-prefix \
          --spawn "--model $Q06 --load-format dummy $TOKARG --cache $cache" --server-log "$OUT/w3-server-$cache.log" \
          --label "W3 cache=$cache" --json "$OUT/w3.jsonl"
      done ;;
    w4)  # W1-like Poisson stream at rising rates up to saturation (inf), with the plot
      step "w4 rates" w4.log python3 benchmarks/load.py --workload random --num-prompts 256 \
        --spawn "--model $Q06 --load-format dummy $TOKARG" --server-log "$OUT/w4-server.log" \
        --request-rate ${W4_RATES:-16,64,inf} --connections 16 --label "W4 qwen3-0.6b dummy" \
        --plot "$OUT/load_w4.png" --json "$OUT/w4.jsonl" ;;
    w4-mixed)  # the same, with decode rows riding along in prefill steps
      step "w4 rates, mixed" w4.log python3 benchmarks/load.py --workload random --num-prompts 256 \
        --spawn "--model $Q06 --load-format dummy $TOKARG --enable-mixed-chunk" --server-log "$OUT/w4-mixed-server.log" \
        --request-rate ${W4_RATES:-16,64,inf} --connections 16 --label "W4 qwen3-0.6b dummy, mixed" \
        --plot "$OUT/load_w4_mixed.png" --json "$OUT/w4-mixed.jsonl" ;;
    w1-sub)  # engine and peer on the same first N W1 requests (the peer's full W1 takes ~5 min)
      n=${W1_SUB:-64}
      step "w1[:$n] engine" peers.log python3 benchmarks/offline.py --workload w1 --model $Q06 \
        --load-format dummy $TOKARG --num-prompts "$n" --no-progress --json "$OUT/peers.jsonl"
      step "w1[:$n] peer generate_batch" peers.log python3 benchmarks/peers/hf.py --workload w1 --model $Q06 \
        --num-prompts "$n" --mode generate_batch --attn "paged|sdpa" --no-progress --json "$OUT/peers.jsonl" ;;
    w2-engine)
      step "w2 engine" peers.log python3 benchmarks/offline.py --workload w2 --model $L8 --load-format dummy \
        $TOKARG --repeats 2 --no-progress --json "$OUT/peers.jsonl" ;;
    w1-engine)
      step "w1 engine" peers.log python3 benchmarks/offline.py --workload w1 --model $Q06 --load-format dummy \
        $TOKARG --no-progress --json "$OUT/peers.jsonl" ;;
    compare)
      files="$OUT/peers.jsonl"; [ -f "$OUT/figures.jsonl" ] && files="$OUT/figures.jsonl $files"
      python3 benchmarks/compare.py $files 2>&1 | tee "$OUT/compare.txt" | tee -a "$OUT/bench-run.log" ;;
    *) log "unknown stage $s" ;;
  esac
done
log "done"; ls -la "$OUT"
