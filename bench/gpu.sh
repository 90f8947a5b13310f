#!/usr/bin/env bash
# One prepared GPU benchmark on a bare GPU machine, at most 8 minutes (bench/gpu.py says what it measures):
#   make gpu-wheels                                  here, once: fills .whl/ (what the GPU image lacks)
#   bash bench/gpu.sh [--out gpu-bench.md]           there: installs from .whl/ only, then benchmarks
#   bash bench/gpu.sh --smoke --out /tmp/gpu.md      anywhere: CPU, tiny sizes (tests/test_bench_gpu.py)
#
# The GPU image has Python 3.12, torch (CUDA), numpy, pyarrow, typer, matplotlib and pillow, and no
# network. Every module the benchmark needs that does not import there is installed from the wheel of
# .whl/ that provides it (pip --no-index --no-deps, or unpacked when pip is missing) into a folder on
# PYTHONPATH, beside a cir_mine link to this checkout: nothing is downloaded and nothing is built.
set -euo pipefail
start=$(date +%s)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
py="${PYTHON:-python3}"
wheels="${CIR_MINE_WHEELS:-$repo/.whl}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
site="$tmp/site"
mkdir -p "$site"
ln -s "$repo" "$site/cir_mine"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# module the benchmark imports -> the wheel (distribution name) that provides it
need=(faiss:faiss_cpu open_clip:open_clip_torch torchvision:torchvision ftfy:ftfy wcwidth:wcwidth
      regex:regex tqdm:tqdm duckdb:duckdb)
missing=()
for pair in "${need[@]}"; do
  module="${pair%%:*}" dist="${pair#*:}"
  if ! "$py" -c "import $module" >/dev/null 2>&1; then
    found=("$wheels"/"$dist"-*.whl)
    if [[ ! -e "${found[0]}" ]]; then
      echo "bench/gpu.sh: $module is not installed and $wheels has no $dist wheel; run \`make gpu-wheels\` and carry .whl/." >&2
      exit 1
    fi
    missing+=("${found[0]}")
  fi
done
if ((${#missing[@]})); then
  echo "bench/gpu.sh: installing ${#missing[@]} wheel(s) from $wheels: $(for w in "${missing[@]}"; do basename "$w"; done | tr '\n' ' ')" >&2
  if "$py" -m pip --version >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --target "$site" "${missing[@]}"
  else
    "$py" - "$site" "${missing[@]}" <<'EOF'
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
EOF
  fi
fi
left=$((480 - ($(date +%s) - start)))
CIR_MINE_BENCH_SECONDS="$left" timeout "$left" "$py" "$here/gpu.py" "$@"
