#!/usr/bin/env bash
# The one-GPU check (tests, then bf16 MFU, decode roofline and PPO episodes/s); exits non-zero
# when anything fails. Everything is in gpu_check.py (see its docstring); this wrapper only
# readies the device machine's Python and brings results back.
#
#   bash benchmarks/gpu_check.sh --prepare        # here, before: wheels the device lacks -> .whl/
#   bash benchmarks/gpu_check.sh                  # on the CUDA machine (carry .whl), repo root
#   bash benchmarks/gpu_check.sh --cpu-dry-run    # every stage at minimum size: checks the script
#
# The device image has torch, accelerate, einops, tqdm, sentencepiece, safetensors and pytest
# but not beartype (nor the optional test extras, whose tests skip themselves): `--prepare`
# downloads this machine's beartype as a wheel into .whl/ (git-excluded), and the check installs
# .whl/*.whl into a private target first. With $OUT set (the device's return folder), the JSON
# results and every pytest log are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if [[ "${1:-}" == "--prepare" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
  version=$(python3 -c 'import beartype; print(beartype.__version__)')
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d .whl "beartype==$version"
  ls .whl
  exit 0
fi

site_dir="${TMPDIR:-/tmp}/gpu-check-site"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site_dir" .whl/*.whl
  export PYTHONPATH="$site_dir${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

extra=()
[[ -n "${OUT:-}" ]] && extra=(--logs "$OUT/logs")
status=0
python3 benchmarks/gpu_check.py "${extra[@]}" "$@" || status=$?
if [[ -n "${OUT:-}" ]]; then
  cp benchmarks/results/gpu-*.json "$OUT/" 2>/dev/null || true
fi
exit "$status"
