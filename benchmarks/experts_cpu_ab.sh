#!/usr/bin/env bash
# Build and run benchmarks/experts_cpu_ab.cpp over builds of the CPU experts kernel.
#   bash benchmarks/experts_cpu_ab.sh fp32|bf16|bf16-widened NAME=SOURCE.cpp [NAME=SOURCE.cpp ...]
# e.g. old=$(mktemp --suffix=.cpp); git show HEAD~3:lynx_compile/kernels/experts_cpu.cpp > "$old"; then
#   bash benchmarks/experts_cpu_ab.sh bf16 old="$old" new=lynx_compile/kernels/experts_cpu.cpp
# Env: ROUNDS (default 9), BATCHES (default "1 4 16 32"), AB_ROUTING=uniform (the same rows for
# every expert instead of skewed routing), ISA (default: -march=native with
# Inductor's AVX512 or AVX2 macro, as this CPU has; e.g. ISA="-mavx2 -mfma -mf16c -DCPU_CAPABILITY_AVX2").
set -euo pipefail
dtype=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
torch_dir=$("$py" -c "import os, torch; print(os.path.dirname(torch.__file__))")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
i=0; kernels=""; names=""
for build in "$@"; do
  name=${build%%=*}; src=$(realpath "${build#*=}")
  printf '#define lynx_experts lynx_experts_%d\n#define kernel kernel_%d\n#include "%s"\n#undef lynx_experts\n#undef kernel\n' \
    "$i" "$i" "$src" >> "$work/experts_cpu_ab_builds.inc"
  kernels="$kernels${kernels:+,}kernel_$i"; names="$names${names:+,}\"$name\""; i=$((i + 1))
done
{ echo "#define AB_KERNELS $kernels"; echo "#define AB_NAMES $names"; echo "#define AB_FIRST_KERNEL kernel_0"; } >> "$work/experts_cpu_ab_builds.inc"
if [ -z "${ISA:-}" ]; then
  if grep -q avx512f /proc/cpuinfo; then ISA="-march=native -DCPU_CAPABILITY_AVX512"; else ISA="-march=native -DCPU_CAPABILITY_AVX2"; fi
fi
g++ -O3 $ISA -std=c++17 -fopenmp -I"$work" -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" \
  "$root/benchmarks/experts_cpu_ab.cpp" -o "$work/ab" -L"$torch_dir/lib" -lc10 -Wl,-rpath,"$torch_dir/lib"
"$work/ab" "$dtype" "${ROUNDS:-9}" ${BATCHES:-1 4 16 32}
