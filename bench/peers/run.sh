#!/usr/bin/env bash
# The whole CPU peer comparison of issue 3 (training side and GEMM) in one command, from the repository root:
#   bench/peers/run.sh [threads]            (default 2; run it on an otherwise idle machine)
# Installs the peers with apt when they are missing (never as ftn dependencies): Debian's OpenMP OpenBLAS
# (libopenblas0-openmp) for the in-process sgemm peer and for PyTorch, and python3-torch 1.13.
# Prints: ftn vs OpenBLAS GFLOP/s per GEMM shape/layout/fused op, then ftn vs PyTorch LoRA training tokens/s
# and peak RSS, each with its ratio. See docs/PERFORMANCE.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
threads="${1:-2}"
need=()
[ -e /usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0 ] || need+=(libopenblas0-openmp)
/usr/bin/python3 -c "import torch" 2>/dev/null || need+=(python3-torch)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing peers: ${need[*]}"
  if [ "$(id -u)" = 0 ]; then apt-get install -y "${need[@]}"; else sudo apt-get install -y "${need[@]}"; fi
fi
dotnet build bench -c Release -v q -nologo | grep -E " error |[1-9][0-9]* Error" || true
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cpus, $(grep -o -w -E 'avx512f|avx512bw|avx512_bf16|avx512_vnni|avx2|fma' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
dotnet bench/bin/Release/net10.0/FineTuneNative.Bench.dll peers all "$threads"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
