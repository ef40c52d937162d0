#!/usr/bin/env bash
# One sitting against the peers of ../shared/tools/peers/ (vLLM CPU, OpenVINO GenAI, CTranslate2)
# on the `small` GPT-J shape, after their set-up (see docs/benchmarks.md, "Against the peers"):
#   1. the engine's decode step at batch 1 and 64 with the dot-product peaks and the fraction of
#      peak each precision reaches (benches/decode.rs), and bf16 on AMX (where the CPU has it),
#      on vdpbf16ps and on the widening kernel;
#   2. the peers' table (bench_all.sh: 128 + 128 tokens, 1 and 64 concurrent clients over HTTP
#      with vLLM's own client; CTranslate2 and OpenVINO in-process at batch 1 and 64);
#   3. step `long`: the seed's long lengths for gptj and vLLM: 64 clients with 1,024-token
#      prompts, and 8 clients at 2,048 tokens (1,920 + 128); LONG_ENGINES="gptj vllm" by default,
#      and gptj as LONG_GPTJ="q8_0 q8_0:int8 bf16" by default (precision[:kv cache dtype]).
# usage: bench/run-peers-sitting.sh OUT_DIR [steps...]   steps: decode peers long (default: decode peers)
# Needs target/release/gptj and the decode bench (cargo build --release --benches --bins), and
# .peers/ set up (PEERS_DIR). Run on a quiet machine: the load average is logged before each step.
set -euo pipefail
OUT="${1:?usage: bench/run-peers-sitting.sh OUT_DIR [decode peers long]}"
shift
STEPS="${*:-decode peers}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${PEERS_TOOLS:-$ROOT/../shared/tools/peers}"
P="${PEERS_DIR:-$ROOT/.peers}"
CKPT="${CKPT:-$P/ckpt-small}"
GPTJ="${GPTJ:-$ROOT/target/release/gptj}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
log() { echo "[$(date +%T)] $* (load: $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$OUT/log.txt" >&2; }

long() { # label base endpoint model conc n input output
  local f="$OUT/long-$1-c$5-in$7.json"
  VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
    "$P/venv-vllm/bin/python" "$PEERS/vbench.py" --backend openai --base-url "$2" --endpoint "$3" \
    --model "$4" --tokenizer "$CKPT" --dataset-name random --random-input-len "$7" \
    --random-output-len "$8" --num-prompts "$6" --max-concurrency "$5" --temperature 0 \
    --extra-body "{\"min_tokens\": $8}" --seed 0 --disable-tqdm --save-result \
    --result-dir "$OUT" --result-filename "$(basename "$f")" > "$f.log" 2>&1 \
    || { log "long $1 c$5 failed: $(tail -3 "$f.log")"; return 0; }
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], "c"+sys.argv[3], "in"+sys.argv[4], "out tok/s", round(d["output_throughput"],1), "tpot ms", round(d["median_tpot_ms"],1), "ttft ms", round(d["median_ttft_ms"],1), "failed", d["failed"])' \
    "$f" "$1" "$5" "$7" | tee -a "$OUT/long.txt"
}

wait_ready() { # url seconds
  for _ in $(seq "$2"); do curl -sf -o /dev/null "$1" && return 0; sleep 1; done
  return 1
}

for step in $STEPS; do case $step in
decode)
  log "decode step, all precisions, with peaks"
  (cd "$ROOT" && cargo bench -q --bench decode -- --shape small --precisions f32,bf16,q8_0 \
    --batches 1,64 --context 128 --steps 8 --json "$OUT/decode.json") | tee "$OUT/decode.md"
  log "decode step, bf16 on vdpbf16ps instead of the AMX tile unit (GPTJ_CPU_AMX=0)"
  (cd "$ROOT" && GPTJ_CPU_AMX=0 cargo bench -q --bench decode -- --shape small \
    --precisions bf16 --batches 1,64 --context 128 --steps 8) | tee "$OUT/decode-bf16-vdpbf16ps.md"
  log "decode step, bf16 without vdpbf16ps (GPTJ_CPU_BF16_DOT=0)"
  (cd "$ROOT" && GPTJ_CPU_BF16_DOT=0 cargo bench -q --bench decode -- --shape small \
    --precisions bf16 --batches 1,64 --context 128 --steps 8) | tee "$OUT/decode-bf16-widening.md"
  ;;
peers)
  log "peers: bench_all.sh"
  RES="$OUT/peers.jsonl" CKPT="$CKPT" GPTJ="$GPTJ" PEERS_DIR="$P" "$PEERS/bench_all.sh" 2>&1 \
    | tee "$OUT/peers.log"
  ;;
long)
  engines="${LONG_ENGINES:-gptj vllm}"
  # precision[:kv cache dtype]; the default cache is `auto` (f16 under q8_0 and bf16)
  for spec in ${LONG_GPTJ:-q8_0 q8_0:int8 bf16}; do
    [[ " $engines " == *" gptj "* ]] || continue
    prec="${spec%%:*}" kv=auto label="gptj-${spec/:/-kv}"
    [[ "$spec" == *:* ]] && kv="${spec#*:}"
    log "long lengths: gptj $prec, kv cache $kv"
    "$GPTJ" serve --model "$CKPT" --precision "$prec" --kv-cache-dtype "$kv" --port 18721 \
      --host 127.0.0.1 --max-num-seqs 64 --kv-cache-memory 6GiB > "$OUT/long-$label.log" 2>&1 &
    pid=$!
    if wait_ready http://127.0.0.1:18721/v2/health/ready 180; then
      long "$label" http://127.0.0.1:18721 /openai/v1/completions eleutherai-gpt-j-6b 64 64 1024 128
      long "$label" http://127.0.0.1:18721 /openai/v1/completions eleutherai-gpt-j-6b 8 16 1920 128
    fi
    kill $pid; wait $pid 2>/dev/null || true
  done
  [[ " $engines " == *" vllm "* ]] || continue
  log "long lengths: vLLM bf16"
  VLLM_CPU_KVCACHE_SPACE=6 MODEL="$CKPT" PEERS_DIR="$P" "$PEERS/vllm_serve.sh" 18722 bfloat16 \
    > "$OUT/long-vllm.log" 2>&1 &
  pid=$!
  if wait_ready http://127.0.0.1:18722/health 300; then
    long vllm-bf16 http://127.0.0.1:18722 /v1/completions gptj 64 64 1024 128
    long vllm-bf16 http://127.0.0.1:18722 /v1/completions gptj 8 16 1920 128
  fi
  kill $pid; wait $pid 2>/dev/null || true
  ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac; done
log "done: $OUT"
