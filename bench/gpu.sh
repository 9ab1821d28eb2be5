#!/usr/bin/env bash
# The GPU measurement in one command, for a machine with an NVIDIA GPU and the .NET SDK (no network, no Python):
#   bench/gpu.sh            kernel timings (device events) for the three reference shapes + `ftn train` tokens/s on --device cuda
# Without a CUDA device every part says so and exits 0. FTN_GPU_MODEL=<HF model dir> trains that model instead of
# models/ftn-tiny; the train runs twice: linear weights as stored (ftn-tiny: f32, SIMT kernel) and --base-dtype bf16
# (tensor-core kernel), each as an A/B of host/device overlap: "overlap" is the default (uploads staged through pinned
# memory on a copy stream, one wait for the device per optimizer step, the next window built while the device runs),
# "blocking" sets FTN_ILGPU_BLOCKING_COPIES=1 so that every upload drains the device before and after its copy, as
# before the staging ring (two drains per micro-batch). Needs the NuGet packages restored once (offline afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
dotnet build -c Release bench/FineTuneNative.Bench.csproj -v q -nologo
dotnet build -c Release src/Cli/FineTuneNative.Cli.csproj -v q -nologo
bench=bench/bin/Release/net10.0/FineTuneNative.Bench.dll
ftn=src/Cli/bin/Release/net10.0/ftn.dll
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for shape in smollm2 llama1b qwen7b; do
  dotnet "$bench" gpu --shape "$shape" | tee -a "$work/kernels.txt"
done
if grep -q "skipped" "$work/kernels.txt"; then
  echo "ftn train --device cuda: skipped (no CUDA device)"
  exit 0
fi
dotnet "$ftn" synth --tasks heldout --count 4000 --out "$work/data.jsonl"
model=${FTN_GPU_MODEL:-models/ftn-tiny}
# As stored (ftn-tiny: f32 linears -> SIMT kernel), then with the linear weights loaded as bf16 (tensor-core kernel,
# cp.async weight tiles); all with the fused AdamW, one gradient-norm reduction and the pool reserved from the plan.
# --grad-accum 4: four micro-batches per optimizer step; the overlap run waits for the device once per step, the blocking
# one 17 times (before and after the token and the target upload of each micro-batch, and the readback).
for dtype in "" bf16; do
  for copies in overlap blocking; do
    echo "ftn train --device cuda ${dtype:+--base-dtype $dtype} ($copies)"
    FTN_ILGPU_BLOCKING_COPIES=$([ "$copies" = blocking ] && echo 1 || echo 0) \
    dotnet "$ftn" train --model "$model" --data "$work/data.jsonl" --out "$work/run$dtype$copies" --device cuda ${dtype:+--base-dtype $dtype} \
      --max-steps 200 --batch-size 8 --grad-accum 4 --max-len 128 --eval-fraction 0.02 --exact-match 0 | tail -n 3 | head -n 2
  done
done
