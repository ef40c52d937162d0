#!/usr/bin/env bash
# Re-takes the numbers in docs/benchmarks.md for the `small` GPT-J shape on this CPU.
#   bench/run-docs-benchmarks.sh [OUT_DIR] [SECTIONS...]     (default bench-out/, all sections)
# Sections: machine concurrent sustained serving mixed prefix prefix-alone hf-decode
#           hf-decode-large table table-f32
# Run it on a quiet machine: every other busy process slows a 2-core run many times over.
# Needs `cargo build --release` and the torch venv (scripts/hf-peer.sh makes it on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench-out}"
shift || true
SECTIONS="${*:-machine concurrent sustained serving mixed prefix prefix-alone hf-decode hf-decode-large table table-f32}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)" # absolute: `cargo bench` runs in bench/
GPTJ="${GPTJ_BIN:-target/release/gptj}"
REPEATS="${REPEATS:-3}"
REQUESTS="${REQUESTS:-64}"
RATE="${RATE:-4}"
PORT="${PORT:-18090}"
URL="http://127.0.0.1:$PORT"
log() { echo "[$(date +%T)] $* (load: $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$OUT/log.txt"; }

wait_ready() {
    for _ in $(seq 1 600); do
        curl -sf "$URL/v2/health/ready" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    echo "server on $URL not ready" >&2
    return 1
}

# load NAME SEED: 64 requests of 128 prompt + 128 output tokens, KServe V1 predict; Poisson
# arrivals at $RATE/s, or with ARRIVALS=closed, 64 clients at once (closed loop).
load() {
    log "load $1"
    local arrivals=(--rate "$RATE")
    [ "${ARRIVALS:-poisson}" = closed ] && arrivals=(--concurrency 64)
    "$GPTJ" load --url "$URL" --protocol v1 --requests "$REQUESTS" "${arrivals[@]}" --seed "$2" \
        --prompt-tokens 128 --output-tokens 128 --duration 30m --json "$OUT/serving-$1.json" \
        | tee "$OUT/serving-$1.txt"
}

gptj_server() { # NAME SEED ARGS...
    local name=$1 seed=$2
    shift 2
    "$GPTJ" serve --model builtin:small --host 127.0.0.1 --port "$PORT" "$@" >"$OUT/server-$name.log" 2>&1 &
    local pid=$!
    wait_ready
    load "$name" "$seed"
    kill "$pid"
    wait "$pid" || true
}

hf_server() { # NAME SEED MAX_BATCH
    scripts/hf-peer.sh --model small serve --port "$PORT" --max-batch "$3" >"$OUT/server-$1.log" 2>&1 &
    local pid=$!
    wait_ready
    load "$1" "$2"
    kill "$pid"
    wait "$pid" || true
}

for section in $SECTIONS; do
    case $section in
    machine)
        { uptime; lscpu; free -g; git log -1 --oneline; git status --short engine scheduler server; } >"$OUT/machine.txt"
        cargo bench -p gptj-bench --bench serving -- --bandwidth-only | tee -a "$OUT/machine.txt"
        ;;
    concurrent)
        # The issue's aim: 64 concurrent clients (closed loop), each 128 prompt + 128 new
        # tokens, against gptj (continuous and static, q8_0 and f32) and HF transformers (static
        # batches of up to 16, and sequential once: it takes ~6 minutes alone).
        for r in $(seq 1 "$REPEATS"); do
            ARRIVALS=closed gptj_server "closed-continuous-q8_0-$r" "$r" --precision q8_0 --scheduler continuous
            ARRIVALS=closed gptj_server "closed-static-q8_0-$r" "$r" --precision q8_0 --scheduler static
            ARRIVALS=closed gptj_server "closed-continuous-f32-$r" "$r" --precision f32 --scheduler continuous
            ARRIVALS=closed gptj_server "closed-static-f32-$r" "$r" --precision f32 --scheduler static
            ARRIVALS=closed hf_server "closed-hf-static16-$r" "$r" 16
            if [ "$r" = 1 ]; then
                ARRIVALS=closed hf_server "closed-hf-sequential-$r" "$r" 1
            fi
        done
        ;;
    sustained)
        # The same 64 clients kept busy for 192 requests (three waves), once each.
        REQUESTS=192 ARRIVALS=closed gptj_server "sustained-continuous-q8_0-1" 1 --precision q8_0
        REQUESTS=192 ARRIVALS=closed gptj_server "sustained-continuous-f32-1" 1 --precision f32
        REQUESTS=192 ARRIVALS=closed hf_server "sustained-hf-static16-1" 1 16
        REQUESTS=192 ARRIVALS=closed hf_server "sustained-hf-static64-1" 1 64
        ;;
    serving)
        # (b) The same Poisson load against gptj (continuous and static batching, q8_0 and
        # f32) and HF transformers (static batches of up to 16, and sequential), in turn.
        for r in $(seq 1 "$REPEATS"); do
            gptj_server "continuous-q8_0-$r" "$r" --precision q8_0 --scheduler continuous
            gptj_server "static-q8_0-$r" "$r" --precision q8_0 --scheduler static
            gptj_server "continuous-f32-$r" "$r" --precision f32 --scheduler continuous
            gptj_server "static-f32-$r" "$r" --precision f32 --scheduler static
            hf_server "hf-static16-$r" "$r" 16
            # The sequential server takes ~4x longer than the rest together: once unless asked,
            # never with SKIP_SEQUENTIAL=1 (the `concurrent` section measures it too).
            if [ -z "${SKIP_SEQUENTIAL:-}" ] && { [ "$r" = 1 ] || [ -n "${HF_SEQUENTIAL_EVERY_REPEAT:-}" ]; }; then
                hf_server "hf-sequential-$r" "$r" 1
            fi
        done
        ;;
    mixed)
        # Continuous vs static batching where they differ most: output lengths spread over
        # 16..256 tokens, so a static batch holds its slots until its longest member ends.
        log mixed
        cargo bench -p gptj-bench --bench serving -- --model builtin:small --precision f32 \
            --configs continuous,static --requests 64 --rate 2 --prompt-tokens 128 \
            --output-tokens 16..256 --repeats "$REPEATS" --json "$OUT/mixed.json" | tee "$OUT/mixed.txt"
        ;;
    prefix)
        # (c) TTFT of a repeated few-shot prompt (~380 tokens, ~370 shared), with and without
        # prefix caching, in-process.
        log prefix
        cargo bench -p gptj-bench --bench serving -- --model builtin:small --precision q8_0 \
            --configs continuous,continuous-nocache --dataset "$PWD/bench/data/fewshot-sentiment.jsonl" \
            --requests 32 --rate 1 --repeats "$REPEATS" --json "$OUT/prefix.json" | tee "$OUT/prefix.txt"
        ;;
    prefix-alone)
        # (c) The same prompts one at a time (closed loop, one client): TTFT without queueing.
        log prefix-alone
        cargo bench -p gptj-bench --bench serving -- --model builtin:small --precision q8_0 \
            --configs continuous,continuous-nocache --dataset "$PWD/bench/data/fewshot-sentiment.jsonl" \
            --requests 16 --concurrency 1 --repeats "$REPEATS" --json "$OUT/prefix-alone.json" | tee "$OUT/prefix-alone.txt"
        ;;
    hf-decode)
        log hf-decode
        scripts/hf-peer.sh --model small decode --batches 1,4,16 --repeats "$REPEATS" \
            --json "$OUT/hf-decode.json" | tee "$OUT/hf-decode.txt"
        ;;
    hf-decode-large)
        # HF's static batches beyond 16, once (batch 64 takes ~45 s per repeat).
        log hf-decode-large
        scripts/hf-peer.sh --model small decode --batches 32,64 --repeats 1 \
            --json "$OUT/hf-decode-large.json" | tee "$OUT/hf-decode-large.txt"
        ;;
    table)
        # (a) The seed's table: batch 1..8, sequence lengths 128..512.
        log table-q8_0
        "$GPTJ" bench --model builtin:small --precision q8_0 --batch-size 8 --min-length 128 \
            --max-length 512 --length-step 128 --warmup-rounds 1 --out-dir "$OUT/table-q8_0"
        ;;
    table-f32)
        log table-f32
        "$GPTJ" bench --model builtin:small --precision f32 --batch-size 8 --min-length 128 \
            --max-length 512 --length-step 128 --warmup-rounds 1 --out-dir "$OUT/table-f32"
        ;;
    *) echo "unknown section $section" >&2; exit 2 ;;
    esac
done
log done
