#!/usr/bin/env bash
# bench/gpu.py on this machine's GPU, logged: bench/results/gpu-<gpu>-<date>.{json,log} plus nvidia-smi's view.
#   bench/gpu.sh [bench/gpu.py flags ...]      PYTHON=/path/to/python to use another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p bench/results
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' || true)
stem="bench/results/gpu-${gpu:-cpu}-$(date -u +%Y%m%dT%H%M%SZ)"
nvidia-smi > "$stem.nvidia-smi.txt" 2>&1 || true
timeout 480 "$PY" bench/gpu.py --out "$stem.json" "$@" 2>&1 | tee "$stem.log"
