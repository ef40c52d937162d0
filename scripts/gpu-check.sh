#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU and no network, runs the golden checks of the CUDA
# path against HuggingFace's outputs, a ragged-batch check, and a decode benchmark with
# GPT-J-6B-shaped random weights, within ~8 minutes; prints a short report.
#
# Build the binary on any machine first (no GPU needed; see docs/cuda.md):
#   eval "$(scripts/setup-cuda-toolkit.sh /work/cuda-toolkit | tail -1)"
#   cargo build --release --features cuda -p gptj-engine --example gpu_check
# then run this script from the repository root where that binary and the fixtures are:
#   scripts/gpu-check.sh [path/to/gpu_check]
set -uo pipefail
BIN=${1:-target/release/examples/gpu_check}
[ -x "$BIN" ] || { echo "no binary at $BIN: build it with --features cuda first" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 | head -3

# CUDA 13 runtime libraries: the driver provides libcuda.so.1; cublas/cudart/curand come from a
# Python CUDA wheel set (torch's) or a system toolkit, whichever is found first.
LIB=""
for py in python3 /usr/bin/python3; do
  LIB=$($py -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))' 2>/dev/null) && [ -e "$LIB/libcublas.so.13" ] && break
  LIB=""
done
[ -n "$LIB" ] || LIB=$(dirname "$(find / -name 'libcublas.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)" 2>/dev/null)
export LD_LIBRARY_PATH="${LIB:+$LIB:}${LD_LIBRARY_PATH:-}"
echo "CUDA libraries: ${LIB:-not found}"
if ldd "$BIN" | grep 'not found'; then
  echo "missing libraries (above): cannot run" >&2
  exit 3
fi
timeout 480 "$BIN" --fixtures engine/tests/fixtures/golden
rc=$?
echo "gpu_check exit status: $rc"
exit $rc
