using System.Globalization;
using System.Text;

namespace FineTuneNative.Tests.Kernels.Gpu;

/// <summary>
/// The analysis half of docs/kernels.md, generated with the ptxas table: per kernel the FLOPs and bytes it must
/// move for the reference shapes, the H100 floor those give, and occupancy from ptxas' registers and shared
/// memory. Predictions from arithmetic, not measurements.
/// </summary>
public static class KernelsDoc
{
    /// <summary>H100 SXM: dense bf16 tensor-core peak and HBM3 bandwidth (NVIDIA's datasheet).</summary>
    public const double PeakFlops = 989e12, PeakBytes = 3.35e12;

    // H100 (sm_90) per-SM limits: 65536 registers, 228 KiB shared memory (227 KiB per block), 64 warps, 32 groups.
    private const int SmRegisters = 65536, SmShared = 228 * 1024, SmWarps = 64, SmGroups = 32;

    public sealed record Model(string Name, int C, int F, int L, int NH, int NKV, int HS, int V);

    public static readonly Model[] Models =
    {
        new("SmolLM2-135M", 576, 1536, 30, 9, 3, 64, 49152),
        new("Llama-3.2-1B", 2048, 8192, 16, 32, 8, 64, 128256),
        new("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 128, 152064),
    };

    public const int Batch = 8, Seq = 2048, Tokens = Batch * Seq;

    /// <summary>Resident warps per SM for a group of <paramref name="threads"/> threads (registers allocated per warp in units of 256).</summary>
    public static (int Groups, double Occupancy, string Limit) Occupancy(int registers, int sharedBytes, int threads)
    {
        int warps = (threads + 31) / 32;
        int regsPerWarp = (Math.Max(registers, 1) * 32 + 255) / 256 * 256;
        int byRegs = SmRegisters / (regsPerWarp * warps);
        int byShared = sharedBytes == 0 ? int.MaxValue : SmShared / (sharedBytes + 1024); // 1 KiB reserved per block
        int byWarps = SmWarps / warps;
        int groups = Math.Min(Math.Min(byRegs, byShared), Math.Min(byWarps, SmGroups));
        string limit = groups == byRegs ? "registers" : groups == byShared ? "shared memory" : groups == byWarps ? "warps" : "groups";
        return (groups, groups * warps / (double)SmWarps, limit);
    }

    private sealed record Op(string Kernel, string What, double Flops, double Bytes, string Stops);

    private static IEnumerable<Op> Ops(Model m)
    {
        double M = Tokens;
        double Mm(double n, double k) => 2 * M * n * k;
        // activations f32 (4 B), weights bf16 (2 B): read x and W, write y
        double MmBytes(double n, double k) => 4 * M * k + 2 * n * k + 4 * M * n;
        double qkv = (m.NH + 2.0 * m.NKV) * m.HS;
        const string tc = "f32 activations are read (4 B, 16-byte loads issued before the current tile's mma) and rounded to bf16 on the way into shared memory (register-staged, twice the activation bytes of a bf16 pipeline); " +
                          "the bf16 weight tiles go global -> shared by cp.async.cg (LDGSTS) into the free buffer, one stage ahead (two buffers, not a deeper pipeline); 2 groups/SM (16 warps) at the 128-register cap to hide latency";
        const string tcDx = "as the forward, with W's rows copied k-major by cp.async and read with ldmatrix.trans; the k16 loop stays a 2-trip loop in the SASS (no unrolling at the 128-register cap)";
        yield return new("MatMulTensorCore (q,k,v)", "x·Wᵀ, N=(NH+2·NKV)·HS, K=C", Mm(qkv, m.C), MmBytes(qkv, m.C), tc);
        // o_proj and down_proj write the residual stream: residual + x·Wᵀ in the epilogue reads the residual (4 B) instead
        // of a separate add's 12 B per element (read y and residual, write the sum) after the matmul's write of y
        yield return new("MatMulTensorCore (o, + residual)", "residual + x·Wᵀ, N=K=C; add fused in the epilogue", Mm(m.C, m.C), MmBytes(m.C, m.C) + 4 * M * m.C, tc);
        // the rank-r term is r more k of the mma: [x, s·u]·[W, B]ᵀ (joined along k) (u's and B's bytes counted once per tile row/column, as x's and W's)
        yield return new("MatMulTensorCore (o, + LoRA r=16, + residual)", "residual + [x, s·u]·[W, B]ᵀ (joined along k) in one launch: r=16 more k (an extra 32-k step, half zero padding); u = x·Aᵀ (SIMT) before it",
            Mm(m.C, m.C + 16), MmBytes(m.C, m.C) + 4 * M * m.C + 4 * M * 16 + 4.0 * m.C * 16,
            "the rank step loads s·u (f32) and B per 128×128 tile, 8 vector loads per thread (4 of u, 4 of B), rounded to bf16 into shared memory " +
            "(was 2·r = 32 scalar loads per output element in the epilogue, 2048 per thread: 19x the main loop's 108 at K=C=576); " +
            "its loads are stored before its multiply (one exposed load latency per tile, 1 of 19 steps); it multiplies both k16 slices (1/18 more mma, half of it zeros: stopping at r costs a register and spills at the 128 cap); u = x·Aᵀ is a separate SIMT pass over x");
        yield return new("MatMulTensorCore (gate+up)", "x·Wᵀ, N=2F, K=C", Mm(2.0 * m.F, m.C), MmBytes(2.0 * m.F, m.C), tc);
        yield return new("MatMulTensorCore (down, + residual)", "residual + x·Wᵀ, N=C, K=F; add fused in the epilogue", Mm(m.C, m.F), MmBytes(m.C, m.F) + 4 * M * m.C, tc);
        yield return new("MatMulTensorCore (down, dx)", "dy·W, N=F, K=C", Mm(m.F, m.C), MmBytes(m.F, m.C), tcDx);
        // full fine-tuning of a bf16 weight (autocast: dy and x rounded to bf16): dW (N, K) += dyᵀ·x reduces over the M tokens, dW read and written in f32
        yield return new("MatMulTensorCore (down, dW; bf16 full fine-tuning)", "dW += dyᵀ·x over M, N=C, K=F; dy, x rounded to bf16", Mm(m.C, m.F), 4 * M * m.C + 4 * M * m.F + 8.0 * m.C * m.F,
            "both operands are f32 activations contiguous along rows, not along the reduction: 16-byte row-run loads, rounded, stored transposed (A: four 16-bit shared stores per run) or k-major (B, read with ldmatrix.trans); no cp.async (f32 needs converting)");
        yield return new("MatMulTensorCore, Q8_0 weight (gate+up)", "x·Wᵀ, W 34 B per 32 elements", Mm(2.0 * m.F, m.C), 4.0 * M * m.C + 2.0 * m.F * m.C * 34 / 32 + 8.0 * M * m.F,
            "dequantized per element in the tile load (byte loads, no vector loads), then as bf16");
        yield return new("MatMulTensorCore, NF4 weight (gate+up)", "x·Wᵀ, W 0.5 B per element + stats", Mm(2.0 * m.F, m.C), 4.0 * M * m.C + 2.0 * m.F * m.C * 0.5 + 8.0 * M * m.F,
            "per element: a code nibble, an absmax code and two table lookups in the tile load; then as bf16");
        // LoRA rank 16 on a C × C linear: dB (C, 16) += s·dyᵀ·u reduces over all M tokens into one row of output tiles
        int splits = FineTuneNative.Kernels.Gpu.MatMulKernels.SplitsFor((m.C + 63) / 64, Tokens);
        yield return new("MatMulTiled split-K + SplitKReduce (LoRA dB, r=16)", $"dyᵀ·u over M: N=C, 16 columns; {splits} slices × {(m.C + 63) / 64} tiles",
            2 * M * m.C * 16, 4 * M * m.C + 4 * M * 16 + 8.0 * splits * m.C * 16,
            "f32 SIMT on a 64×64 tile of which 16 columns are real (the FMAs are cheap, the dy read is the floor); partial sums of every slice round-trip through memory before the reduce pass");
        yield return new("MatMulTiled (LM head, f32 SIMT)", "x·Eᵀ, N=V, K=C", Mm(m.V, m.C), 4 * M * m.C + 4.0 * m.V * m.C + 4 * M * m.V,
            "f32 FMA on CUDA cores (no tensor cores for f32 weights): 67 TFLOP/s f32 peak, 15x below the bf16 floor");
        // decode (one token per sequence, M = 1): the GEMV reads each bf16 weight element once (2 B) for 2 FLOPs; x and y are
        // noise. The tensor-core kernel at the same M launches ceil(N/128) groups, one 128×128 tile each (127 of 128 rows
        // padding): its floor below assumes each busy SM streams no more than its 1/132 share of the H100's bandwidth.
        foreach (var (name, n, k, res) in new (string, double, double, bool)[]
                 { ("q,k,v", qkv, m.C, false), ("o, + residual", m.C, m.C, true), ("gate+up", 2.0 * m.F, m.C, false), ("down, + residual", m.C, m.F, true) })
        {
            double bytes = 2 * n * k + 4 * k + 4 * n * (res ? 2 : 1);
            double groups = Math.Ceiling(n / 128), tcFloor = bytes / (PeakBytes * Math.Min(1, groups / 132)) * 1e6;
            yield return new($"MatMulGemv (decode M=1, {name})", $"x·Wᵀ{(res ? " + residual" : "")}, N={n}, K={k}; {Math.Ceiling(n / FineTuneNative.Kernels.Gpu.MatMulGemvKernels.WarpsPerGroup)} groups of 4 warps",
                2 * n * k, bytes,
                $"memory bound: one warp per column, lanes stride K in runs of 4 (one 8-byte bf16 weight load and one 16-byte x load per lane and step, K % 4 == 0: LD.E.64 / LD.E.128 in the SASS, generic-space loads as ILGPU emits them, not the LDG.CONSTANT read-only path); x (f32) re-read through L1 by every warp (not staged in shared memory); 4 warps per group: fewer than 132 × 16 resident warps at small N; " +
                $"the tensor-core kernel at M=1 launches {groups} groups on 132 SMs: ≥ {F(tcFloor, "0.0")} µs ({F(tcFloor / (bytes / PeakBytes * 1e6), "0.0")}x this floor)");
        }
        double T = Seq, pairs = Batch * m.NH * T * (T + 1) / 2;
        yield return new("AttentionForward", "causal, 4·HS FLOPs per (query, key) pair", 4 * pairs * m.HS,
            4 * M * (m.NH * 2.0 + m.NKV * 2.0) * m.HS, "f32 SIMT FMAs (the f32 q/k/v path): the FLOP floor assumes tensor cores");
        yield return new("AttentionTensorCoreForward (bf16 q, k, v)", "causal, 4·HS FLOPs per (query, key) pair, mma m16n8k16", 4 * pairs * m.HS,
            2 * M * (m.NH + 2.0 * m.NKV) * m.HS + 4 * M * m.NH * m.HS,
            "K/V tiles are register-converted into one shared buffer (no cp.async double buffering: each tile waits for its load); " +
            "exp2 on the SFU for every score (16 FLOPs of mma per exp at HS=64); the causal diagonal tiles half masked; K/V re-read per query head (GQA shares them only through L2)");
        yield return new("AttentionDecode (1 token, f32 cache of 2048)", $"B={Batch}: 4·HS FLOPs per cached key; split-K + combine", 4.0 * Batch * m.NH * Seq * m.HS,
            4.0 * Batch * Seq * m.NKV * m.HS * 2 + 8.0 * Batch * m.NH * m.HS,
            "memory bound: each query head's group re-reads its kv head's rows (NH/NKV times, from L2 when the heads run together); scalar 4-byte loads; warp-sum per key");
        if (m.HS <= 64)
            yield return new("AttentionTensorCoreBackward (bf16 q, k, v; dq + dk/dv)", "recomputes P: 10·HS FLOPs per pair, mma m16n8k16", 10 * pairs * m.HS,
                2 * M * (m.NH + 2.0 * m.NKV) * m.HS * 2 + 4 * M * m.NH * m.HS * 4 + 4 * M * m.NKV * m.HS * 2,
                "two kernels each recompute S (and dP): 14·HS FLOPs of mma per pair are executed for 10·HS useful; dO is re-rounded per tile; " +
                "no double buffering; the dk/dv groups of a kv head walk all its query heads serially");
        else
            yield return new("AttentionTensorCoreBackward, head split (bf16 q, k, v; HS 65..128)", "recomputes P: 10·HS FLOPs per pair, mma m16n8k16; 32 rows per group, warps = 2 row halves × 2 channel halves",
                10 * pairs * m.HS, 2 * M * (m.NH + 2.0 * m.NKV) * m.HS * 2 + 4 * M * m.NH * m.HS * 4 + 4 * M * m.NKV * m.HS * 2,
                "the dk/dv kernel's channel halves each recompute S and dP over the whole head (the dq kernel's add their partials): 18·HS FLOPs of mma per pair are executed for 10·HS useful " +
                "(1.29x the 14·HS of the head-64 kernels), so the real floor is 1.8x the one shown; the dq kernel's 232-236 registers allow 2 groups/SM; 32-row groups re-read K/V (dq) and Q/dO (dk/dv) tiles twice as often; " +
                "no double buffering; the dk/dv groups of a kv head walk all its query heads serially");
        yield return new("AttentionBackward (q + kv)", "recomputes P: 10·HS FLOPs per pair", 10 * pairs * m.HS,
            4 * M * (m.NH * 4.0 + m.NKV * 4.0) * m.HS, "f32 SIMT FMAs; two kernels (dq, dk/dv) each recompute P");
        yield return new("RmsNormForward", "read x, write y", 4 * M * m.C, 8 * M * m.C, "bandwidth bound: one group per row, reaches the floor only with C >= ~1k");
        yield return new("SwiGluForward", "read gate, up; write h", 6 * M * m.F, 12 * M * m.F, "bandwidth bound, scalar 4-byte loads");
        yield return new("RopeKernel", "q and k in place", 6 * M * (m.NH + m.NKV) * m.HS, 8 * M * (m.NH + m.NKV) * m.HS, "bandwidth bound; recomputes sin/cos per element");
        yield return new("RopeIntoKernel (bf16 attention)", "q and k rotated from f32 into the saved bf16 tensors", 6 * M * (m.NH + m.NKV) * m.HS, 6 * M * (m.NH + m.NKV) * m.HS,
            "bandwidth bound; replaces RopeKernel + the rounding copy (8 + 6 bytes per element)");
        yield return new("CrossEntropyKernel", "read logits, write dlogits", 5 * M * m.V, 8 * M * m.V, "bandwidth bound; the logits pass is separate from the LM-head matmul");
    }

    /// <summary>Threads per group a kernel is launched with on CUDA.</summary>
    public static int GroupThreads(string kernel)
        => kernel.StartsWith("AttentionTensorCoreKernels.", StringComparison.Ordinal) ? FineTuneNative.Kernels.Gpu.AttentionTensorCoreKernels.Threads
            : kernel.StartsWith("MatMulGemvKernels.", StringComparison.Ordinal) ? FineTuneNative.Kernels.Gpu.MatMulGemvKernels.WarpsPerGroup * 32 : 256;

    private static string F(double v, string fmt = "0.00") => v.ToString(fmt, CultureInfo.InvariantCulture);

    public static string Analysis(IReadOnlyList<PtxasTests.PtxasReport> reports)
    {
        var sb = new StringBuilder();
        sb.AppendLine();
        sb.AppendLine("## Occupancy on an H100 (from the table above)");
        sb.AppendLine();
        sb.AppendLine("Resident groups per SM at 256 threads per group (the explicitly grouped kernels' size on CUDA; the tensor-core attention and the GEMV: 128) from the sm_90");
        sb.AppendLine("registers and static shared memory above: 65536 registers, 228 KiB shared memory, 64 warps per SM.");
        sb.AppendLine();
        sb.AppendLine("| kernel | registers | smem (B) | groups/SM | occupancy | limited by |");
        sb.AppendLine("|---|---:|---:|---:|---:|---|");
        foreach (var r in reports.Where(r => r.Arch == "sm_90").OrderBy(r => r.Kernel, StringComparer.Ordinal))
        {
            var (g, occ, limit) = Occupancy(r.Registers, r.SharedBytes, GroupThreads(r.Kernel));
            sb.AppendLine($"| {r.Kernel} | {r.Registers} | {r.SharedBytes} | {g} | {F(occ * 100, "0")}% | {limit} |");
        }
        sb.AppendLine();
        sb.AppendLine("## FLOPs, bytes and the H100 floor for the reference shapes");
        sb.AppendLine();
        sb.AppendLine($"Batch × sequence {Batch} × {Seq} = {Tokens} tokens, one layer (×L for the model), activations f32 and weights bf16");
        sb.AppendLine($"as this runtime stores them. Floor = max(FLOPs / {F(PeakFlops / 1e12, "0")} TFLOP/s, bytes / {F(PeakBytes / 1e12, "0.00")} TB/s) (H100 SXM dense bf16");
        sb.AppendLine("and HBM3). These are predictions from arithmetic: no GPU was available where they were written, nothing here is measured.");
        foreach (var m in Models)
        {
            sb.AppendLine();
            sb.AppendLine($"### {m.Name} (C={m.C}, F={m.F}, L={m.L}, NH={m.NH}, NKV={m.NKV}, HS={m.HS}, V={m.V})");
            sb.AppendLine();
            sb.AppendLine("| kernel | what | GFLOP | MB | FLOP/B | floor (µs) | bound | what stops it reaching the floor |");
            sb.AppendLine("|---|---|---:|---:|---:|---:|---|---|");
            foreach (var op in Ops(m))
            {
                double tf = op.Flops / PeakFlops, tb = op.Bytes / PeakBytes;
                sb.AppendLine($"| {op.Kernel} | {op.What} | {F(op.Flops / 1e9, "0.0")} | {F(op.Bytes / 1e6, "0.0")} | {F(op.Flops / op.Bytes, "0")} | " +
                              $"{F(Math.Max(tf, tb) * 1e6, "0.0")} | {(tf >= tb ? "compute" : "memory")} | {op.Stops} |");
            }
        }
        sb.AppendLine();
        sb.AppendLine("## Measuring on a GPU");
        sb.AppendLine();
        sb.AppendLine("One command on a machine with an NVIDIA GPU and the .NET SDK (no network, no Python): `bench/gpu.sh`. It runs");
        sb.AppendLine("`dotnet bench/bin/Release/net10.0/FineTuneNative.Bench.dll gpu --shape smollm2|llama1b|qwen7b [--tokens 16384] [--iters 10]`");
        sb.AppendLine("for the three shapes above (every op timed with device events: ILGPU profiling markers around the launches, after");
        sb.AppendLine("two warm-up launches; it prints ms, achieved TFLOP/s and TB/s, the H100 floor and the fraction of it reached), then");
        sb.AppendLine("`ftn train --device cuda` on a synthetic dataset and prints its tokens/s (models/ftn-tiny by default, f32 linears:");
        sb.AppendLine("SIMT matmuls; `FTN_GPU_MODEL=<bf16 HF model dir>` exercises the tensor-core path). Without a GPU every part says");
        sb.AppendLine("it is skipped and exits 0.");
        sb.AppendLine();
        sb.AppendLine("Not yet measured: no GPU was available to this project. The tensor-core path is proven by the fragment-layout");
        sb.AppendLine("emulation (tests/Kernels/Gpu/MmaFragmentEmulationTests.cs), the simulator run of its scalar path");
        sb.AppendLine("(TensorCoreSimulatorTests), the HMMA count and the absence of local memory in its SASS above; its speed is a");
        sb.AppendLine("prediction until a GPU run reports it.");
        sb.AppendLine();
        sb.AppendLine("## Before the first GPU run: the tensor-core dispatch on the simulator");
        sb.AppendLine();
        sb.AppendLine("On CUDA sm_80+ (`IlgpuBackend.TensorCores`) bf16/f16-weight matmuls, NF4 matmuls, the LoRA forward's rank-r term and");
        sb.AppendLine("bf16/f16 attention take the tensor-core kernels, which round their operands to 16 bits; the plain simulator never does.");
        sb.AppendLine($"A matmul forward of at most {FineTuneNative.Kernels.Gpu.MatMulGemvKernels.MaxRows} rows (decode) takes the f32 GEMV on every accelerator instead (MatMulGemvKernels: x not rounded).");
        sb.AppendLine("Device `ilgpu-sim-tc` (tests and diagnostics only) is the simulator with that dispatch (the kernels' scalar paths, same");
        sb.AppendLine("rounding). The test suite runs on it by default (FTN_TEST_TC_SIM=0 leaves it out); `dotnet test tests/FineTuneNative.Tests.csproj -c Release --filter \"DisplayName~ilgpu-sim-tc\"`");
        sb.AppendLine("runs every op test of `TestBackends.All` on it, plus a training step and a generation over bf16 weights; the");
        sb.AppendLine("tolerances that depend on it ask `TestBackends.RoundsOperands` (true there and on an sm_80+ GPU), and compare against");
        sb.AppendLine("the reference on the rounded operands where the rounding is reproducible (matmul, NF4, LoRA, DoRA: f32 tolerance),");
        sb.AppendLine("the dtype's tolerance where it is not (attention's P at online-softmax tile boundaries).");
        return sb.ToString();
    }
}
