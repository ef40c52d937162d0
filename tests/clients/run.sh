#!/usr/bin/env bash
# The client-compatibility suite: sets up the venv, then drives the real `gptj serve` binary
# with the openai SDK, vLLM's benchmark request shapes and tritonclient.
#   tests/clients/run.sh [PATH_TO_GPTJ]      (default: target/debug/gptj)
set -euo pipefail
cd "$(dirname "$0")/../.."
python=$(tests/clients/setup-venv.sh)
exec "$python" tests/clients/test_clients.py "${1:-${CARGO_TARGET_DIR:-target}/debug/gptj}"
