#!/usr/bin/env bash
# The one-GPU check (tests, then bf16 MFU, decode roofline and PPO episodes/s); exits non-zero
# when anything fails. Everything is in gpu_check.py; this name is kept for the docs.
#
#   bash benchmarks/gpu_check.sh                  # on the CUDA machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu-dry-run    # every stage at minimum size: checks the script
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python3 benchmarks/gpu_check.py "$@"
