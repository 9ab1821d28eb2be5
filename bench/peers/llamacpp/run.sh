#!/usr/bin/env bash
# ftn vs llama.cpp generation (decode tg64, prefill pp128) at f32 / F16 / Q8_0 / Q4_0 on random weights of the
# stories15M and SmolLM2-135M shapes, 2 threads. One command, from the repository root:
#   bench/peers/llamacpp/run.sh [SHAPES] [PRECISIONS] [THREADS]
# e.g. bench/peers/llamacpp/run.sh stories15M f32,f16,q8_0,q4_0 2
# The peer (node-llama-cpp 3.22.1 + its CPU prebuilt) is installed here with npm, never as a dependency of ftn.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d node_modules/node-llama-cpp ]; then
  NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --no-audit --no-fund --ignore-scripts >&2
fi
cd ../../..
dotnet build bench/FineTuneNative.Bench.csproj -c Release 2>&1 | grep -E "error|Warn|Elapsed" >&2 || true
dotnet bench/bin/Release/net10.0/FineTuneNative.Bench.dll peers generate "${1:-stories15M,smollm2-135M}" "${2:-f32,f16,q8_0,q4_0}" "${3:-2}"
