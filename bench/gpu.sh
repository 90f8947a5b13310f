#!/usr/bin/env bash
# One prepared GPU benchmark, at most 8 minutes on one GPU (see bench/gpu.py for what it measures):
#   bash bench/gpu.sh [--out gpu-bench.md] [--fp16]     on a GPU machine (faiss-gpu, torch with CUDA)
#   bash bench/gpu.sh --smoke --out /tmp/gpu.md          anywhere: CPU, tiny sizes
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python3}"
exec timeout 480 "$py" "$here/gpu.py" "$@"
