#!/usr/bin/env bash
# Regenerate the HuggingFace-transformers golden fixtures under engine/tests/fixtures/golden/
# (see the README there). Creates the CPU-only torch venv first if it is missing.
#   usage: scripts/make-golden.sh [OUT_DIR]     (venv: $TORCH_VENV, default .venv-torch)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="${TORCH_VENV:-$ROOT/.venv-torch}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import torch, transformers' 2>/dev/null; then
    echo "creating torch venv at $VENV"
    "$HERE/setup-torch-venv.sh" "$VENV"
fi
cd "$ROOT"
# Reproducibility: one thread everywhere, no hash randomisation.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONHASHSEED=0 CUBLAS_WORKSPACE_CONFIG=:4096:8
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec "$VENV/bin/python" "$HERE/make_golden.py" "$@"
