#!/usr/bin/env bash
# The CUDA path in one go (<= 5 minutes on a data-centre GPU): see benchmarks/gpu_check.py.
# Without a CUDA GPU it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 300 python benchmarks/gpu_check.py "$@"
