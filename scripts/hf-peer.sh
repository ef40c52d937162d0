#!/usr/bin/env bash
# HuggingFace transformers (f32, CPU) as gptj's performance peer: see scripts/hf_peer.py.
#   scripts/hf-peer.sh [--model small|tiny|DIR] [--threads N] decode [--batches 1,2,4,8,16] ...
#   scripts/hf-peer.sh serve --port 8081 --max-batch 1      (the seed's sequential server)
# Uses the pinned CPU venv of scripts/setup-torch-venv.sh (created on first use), or $HF_PEER_VENV.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${HF_PEER_VENV:-$HERE/../.venv-torch}"
if [ ! -x "$VENV/bin/python" ]; then
    "$HERE/setup-torch-venv.sh" "$VENV"
fi
exec "$VENV/bin/python" "$HERE/hf_peer.py" "$@"
