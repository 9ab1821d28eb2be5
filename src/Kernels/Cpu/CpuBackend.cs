namespace FineTuneNative.Kernels.Cpu;

// TEMPORARY STUB: replaced by the real implementation.
public sealed class CpuBackend : IBackend
{
    public CpuBackend(int threads) { }
    public string Name => "CpuBackend";
    public Tensor Allocate(DType dtype, params int[] shape) => throw new NotImplementedException();
    public void Upload(Tensor dst, ReadOnlySpan<float> src) => throw new NotImplementedException();
    public void Upload(Tensor dst, ReadOnlySpan<int> src) => throw new NotImplementedException();
    public void UploadRaw(Tensor dst, ReadOnlySpan<byte> src) => throw new NotImplementedException();
    public void Download(Tensor src, Span<float> dst) => throw new NotImplementedException();
    public void Download(Tensor src, Span<int> dst) => throw new NotImplementedException();
    public void Synchronize() => throw new NotImplementedException();
    public void Fill(Tensor t, float value) => throw new NotImplementedException();
    public void Copy(Tensor dst, Tensor src) => throw new NotImplementedException();
    public void Add(Tensor dst, Tensor a, Tensor b) => throw new NotImplementedException();
    public void Scale(Tensor t, float s) => throw new NotImplementedException();
    public double SumOfSquares(Tensor t) => throw new NotImplementedException();
    public void MatMul(Tensor y, Tensor x, Tensor w, Tensor? bias, int m, int n, int k, bool accumulate) => throw new NotImplementedException();
    public void MatMulBackwardInput(Tensor dx, Tensor dy, Tensor w, int m, int n, int k, bool accumulate) => throw new NotImplementedException();
    public void MatMulBackwardWeight(Tensor dw, Tensor? dBias, Tensor dy, Tensor x, int m, int n, int k) => throw new NotImplementedException();
    public void LoraLinearForward(Tensor y, Tensor x, Tensor w, Tensor? bias, LoraParams lora, Tensor u, Tensor? xDrop, int m, int n, int k, int r) => throw new NotImplementedException();
    public void LoraLinearBackward(Tensor dx, Tensor dy, Tensor x, Tensor w, LoraParams lora, Tensor u, Tensor? xDrop, Tensor g, Tensor dA, Tensor dB, Tensor? dW, Tensor? dBias, int m, int n, int k, int r, bool accumulate) => throw new NotImplementedException();
    public void RmsNormForward(Tensor y, Tensor rstd, Tensor x, Tensor w, int m, int c, float eps) => throw new NotImplementedException();
    public void RmsNormBackward(Tensor dx, Tensor dw, Tensor dy, Tensor x, Tensor w, Tensor rstd, int m, int c, bool accumulate) => throw new NotImplementedException();
    public void Rope(Tensor x, Tensor positions, int m, int nHeads, int headSize, float theta, RopeLayout layout, bool inverse) => throw new NotImplementedException();
    public void SwiGluForward(Tensor h, Tensor gate, Tensor up, long count) => throw new NotImplementedException();
    public void SwiGluBackward(Tensor dGate, Tensor dUp, Tensor dh, Tensor gate, Tensor up, long count) => throw new NotImplementedException();
    public void AttentionForward(Tensor output, Tensor? lse, Tensor q, Tensor k, Tensor v, int batch, int tq, int tkv, int kvLen, int nHeads, int nKvHeads, int headSize, float scale) => throw new NotImplementedException();
    public void AttentionBackward(Tensor dq, Tensor dk, Tensor dv, Tensor dOut, Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v, int batch, int t, int nHeads, int nKvHeads, int headSize, float scale) => throw new NotImplementedException();
    public void EmbeddingForward(Tensor output, Tensor tokens, Tensor table, int m, int c) => throw new NotImplementedException();
    public void EmbeddingBackward(Tensor dTable, Tensor dOut, Tensor tokens, int m, int c) => throw new NotImplementedException();
    public void CrossEntropy(Tensor logits, Tensor targets, Tensor losses, int m, int v, int ignoreIndex, float gradScale, bool computeGrad) => throw new NotImplementedException();
    public void AdamW(Tensor param, Tensor grad, Tensor m, Tensor v, float lr, float beta1, float beta2, float eps, float weightDecay, int step, float gradScale) => throw new NotImplementedException();
    public void Dispose() { }
}