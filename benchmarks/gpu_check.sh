#!/usr/bin/env bash
# One call on a CUDA machine: the Triton kernel tests compiled for the GPU, then one MoE
# layer timed for four models (benchmarks/moe_layer_gpu.py). Needs torch, triton and
# transformers already installed; no network. Under 8 minutes; tables and logs go to $OUT.
#
#   PYTHONPATH=$PWD bash benchmarks/gpu_check.sh        (from the repository root)
#   bash benchmarks/gpu_check.sh --dry-run              (CPU: interpreter, tiny shapes)
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
unset TRITON_INTERPRET
OUT="${OUT:-./out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"  # the GPU image: python3
if [ "${1:-}" = "--dry-run" ]; then
  test_env=(env -u LYNX_TEST_CUDA) bench_args=(--dry-run --no-sweep)
else
  test_env=(env LYNX_TEST_CUDA=1) bench_args=()
fi

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv 2>&1 || true
  "$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu_env.txt"

echo "== Triton kernel tests (${test_env[*]} pytest -m triton)"
timeout 150 "${test_env[@]}" "$PYTHON" -m pytest -q -m triton -p no:cacheprovider \
  --continue-on-collection-errors -W ignore::pytest.PytestConfigWarning 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== One MoE layer, four models, batch 1-64"
timeout 300 "$PYTHON" benchmarks/moe_layer_gpu.py --out "$OUT" --budget-s 230 "${bench_args[@]}" 2>&1 | tee "$OUT/moe_layer.log"
bench_rc=${PIPESTATUS[0]}

echo "== tests exit $tests_rc, benchmark exit $bench_rc; files in $OUT"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
